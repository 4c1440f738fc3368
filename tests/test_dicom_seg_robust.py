"""DICOM SEG writing on real, slightly noisy headers; typed errors naming the series; compression.

Real TCIA exports carry ImageOrientationPatient values that differ by ~1e-7 between slices of
one series.  The loader accepts them; highdicom demands exact equality, so the writer normalises
within-tolerance jitter first.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.errors import ExportError, GeometryError, InputError, MedsegError
from medseg.io import read_dicom_series, write_volume
from medseg.io.dicom_seg import read_dicom_seg, series_label, write_dicom_seg
from medseg.io.volume import Geometry, Volume

STUDY = Path("pgbm-brain-tumor-progression") / "PGBM-001" / "11-19-1991-FH-HEADBrain Protocols-40993"
SERIES = "patient PGBM-001, study 19911119, series 11 'T1post'"


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def jittered(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume, Volume]:
    """The PGBM-001 T1post series with every third slice's orientation perturbed by ~1e-7, and its tumour mask."""
    study = shared_data / STUDY
    if not study.is_dir():
        pytest.skip("pgbm-brain-tumor-progression not available")
    folder = tmp_path_factory.mktemp("jitter") / "t1post"
    shutil.copytree(study / "11-T1post-03326", folder)
    for k, path in enumerate(sorted(folder.glob("*.dcm"))[::3]):
        ds = pydicom.dcmread(path)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        iop[0] += 1.3e-7 if k % 2 else -1.1e-7
        iop[4] -= 0.9e-7
        ds.ImageOrientationPatient = [f"{v:.15g}" for v in iop]
        if k == 1:
            ds.PixelSpacing = [f"{float(v) + 2e-7:.10g}" for v in ds.PixelSpacing]
        ds.save_as(path)
    image = read_dicom_series(folder)  # the loader accepts the jitter (tolerance 1e-3)
    mask = read_dicom_series(study / "5364-MaskTumor-94345")
    labels = Volume((mask.array > 0).astype(np.uint8), image.geometry, kind="label")
    return folder, image, labels


def test_seg_written_despite_orientation_jitter(jittered: tuple[Path, Volume, Volume], tmp_path: Path) -> None:
    folder, image, labels = jittered
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    assert len({tuple(float(v) for v in ds.ImageOrientationPatient) for ds in headers}) > 1
    before = _digest(folder)
    nifti = write_volume(labels, tmp_path / "labels.nii.gz", label_names={1: "tumour"})
    out = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", label_names={1: "tumour"})
    assert dciodvfy_errors(out) == []
    back = read_dicom_seg(out, reference=image)
    assert np.array_equal(back.array[0], np.asarray(nib.load(str(nifti)).dataobj))
    assert _digest(folder) == before  # inputs untouched
    ds = pydicom.dcmread(out)
    first = min(
        headers, key=lambda h: float(np.asarray(h.ImagePositionPatient, float) @ image.geometry.direction[:, 2])
    )
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        float(v) for v in first.ImageOrientationPatient
    ]
    # Positions stay the sources' own: every frame references its slice and sits where it does.
    positions = {str(h.SOPInstanceUID): [float(v) for v in h.ImagePositionPatient] for h in headers}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            positions[uid], abs=1e-6
        )
    # The caller's header objects are not modified either.
    again = write_dicom_seg(labels, headers, tmp_path / "seg2.dcm", label_names={1: "tumour"})
    assert len({tuple(float(v) for v in h.ImageOrientationPatient) for h in headers}) > 1
    assert np.array_equal(read_dicom_seg(again, reference=image).array, back.array)


def test_seg_refuses_orientations_beyond_the_loader_tolerance(
    jittered: tuple[Path, Volume, Volume], tmp_path: Path
) -> None:
    folder, _, labels = jittered
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    iop = [float(v) for v in headers[5].ImageOrientationPatient]
    iop[1] += 5e-3
    headers[5].ImageOrientationPatient = iop
    with pytest.raises(InputError, match="mix orientations"):
        write_dicom_seg(labels, headers, tmp_path / "seg.dcm", label_names={1: "tumour"})


def test_seg_errors_name_the_series_never_the_output_path(
    jittered: tuple[Path, Volume, Volume], tmp_path: Path
) -> None:
    folder, _, labels = jittered
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    assert series_label(headers[0]) == SERIES
    hidden = tmp_path / ".tmp" / "claim-123" / "seg.dcm"
    two = Volume((labels.array * 2).astype(np.uint8), labels.geometry, kind="label")
    with pytest.raises(ExportError) as info:
        write_dicom_seg(two, headers, hidden, label_names={1: "tumour"})
    assert str(info.value).startswith(f"{SERIES}: DICOM SEG not written: label value(s) [2] have no name")
    assert info.value.series == SERIES and "claim-123" not in str(info.value)
    shifted = labels.geometry.affine.copy()
    shifted[:3, 3] += 2.0
    moved = Volume(labels.array, Geometry(shape=labels.geometry.shape, affine=shifted), kind="label")
    with pytest.raises(GeometryError, match=rf"^{SERIES}: DICOM SEG not written: the label volume is not on"):
        write_dicom_seg(moved, headers, hidden)
    # ... and the caller's name wins when given.
    with pytest.raises(ExportError, match=r"^series 11 of study X: DICOM SEG not written: .* one-channel"):
        write_dicom_seg(
            Volume(np.zeros((2, *labels.geometry.shape), np.uint8), labels.geometry),
            headers,
            hidden,
            series="series 11 of study X",
        )
    assert not hidden.exists()


def test_seg_compression_defaults_and_choices(jittered: tuple[Path, Volume, Volume], tmp_path: Path) -> None:
    folder, image, labels = jittered
    two = Volume(labels.array.copy(), labels.geometry, kind="label")
    two.array[0, :40, :40, 3:6] = 2
    names = {1: "tumour", 2: "edema"}
    sizes = {}
    for seg_type, compression, syntax in (
        ("binary", "auto", pydicom.uid.JPEG2000Lossless),
        ("binary", "none", pydicom.uid.ExplicitVRLittleEndian),
        ("binary", "deflate", pydicom.uid.DeflatedExplicitVRLittleEndian),
        ("labelmap", "auto", pydicom.uid.JPEGLSLossless),
        ("labelmap", "rle", pydicom.uid.RLELossless),
        ("labelmap", "jpeg2000", pydicom.uid.JPEG2000Lossless),
        ("labelmap", "none", pydicom.uid.ExplicitVRLittleEndian),
    ):
        out = write_dicom_seg(
            two,
            folder,
            tmp_path / f"{seg_type}-{compression}.dcm",
            label_names=names,
            segmentation_type=seg_type,
            compression=compression,  # type: ignore[arg-type]
        )
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        back = read_dicom_seg(out, reference=image)
        assert np.array_equal(back.array, two.array), (seg_type, compression)
        assert back.meta["label_names"] == names
        sizes[seg_type, compression] = out.stat().st_size
    assert sizes["binary", "auto"] < sizes["binary", "none"] / 3
    assert sizes["labelmap", "auto"] < sizes["labelmap", "none"] / 10
    assert dciodvfy_errors(tmp_path / "binary-auto.dcm") == []  # the default BINARY encoding validates
    with pytest.raises(MedsegError, match="not available for BINARY"):
        write_dicom_seg(two, folder, tmp_path / "x.dcm", label_names=names, compression="jpegls")
