"""Proof on real public data: our DICOM loader against dcm2niix, SimpleITK and highdicom.

Reads ``../shared/data`` (skips cleanly when absent).  dcm2niix comparisons use its reference
outputs in ``dcm_qa_ts/Ref`` and, when the ``dcm2niix`` PyPI package is installed, a fresh
dcm2niix run in a temporary folder.  dcm2niix writes NIfTI with the row axis flipped, so
volumes are compared in world space: the grids must hold the same voxel centres (within
1e-3 mm) and the voxels, re-indexed without interpolation, must be identical.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.io import Volume, axis_mapping, load_volume, read_dicom_series, reindex_to, scan_dicom

EXPECTED_SYNTAXES = {
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
}


def _dcm2niix() -> str | None:
    found = shutil.which("dcm2niix")
    if found:
        return found
    candidate = Path(sys.executable).parent / "dcm2niix"
    return str(candidate) if candidate.is_file() else None


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same_as_sitk(ours: Volume, ref: sitk.Image) -> None:
    g = ours.geometry
    assert ref.GetSize() == g.shape
    assert np.allclose(ref.GetSpacing(), g.spacing, rtol=0, atol=1e-6)
    assert np.allclose(ref.GetOrigin(), g.origin, rtol=0, atol=1e-5)
    assert np.allclose(np.reshape(ref.GetDirection(), (3, 3)), g.direction, rtol=0, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(ref).transpose(2, 1, 0), ours.array[0])


def _assert_same_voxels_in_world(ours: Volume, ref: Volume, *, atol_mm: float = 1e-3) -> None:
    mapping = axis_mapping(ours.geometry, ref.geometry, atol=atol_mm)
    assert mapping is not None, f"{ours.geometry.describe()} vs {ref.geometry.describe()}"
    assert mapping.max_error_mm <= atol_mm
    moved = reindex_to(ours, ref.geometry, atol=atol_mm)
    assert np.array_equal(moved.array, ref.array.astype(moved.array.dtype))


# ----------------------------------------------------------------------------- dcm_qa_ts
@pytest.mark.parametrize("number", range(1, 10))
def test_dcm_qa_ts_every_transfer_syntax_equals_dcm2niix_reference(shared_data: Path, number: int) -> None:
    source = shared_data / "dcm_qa_ts" / "In" / f"{number}.dcm"
    ours = read_dicom_series(source)
    reference = load_volume(shared_data / "dcm_qa_ts" / "Ref" / f"{number}.nii")
    assert ours.geometry.shape == (64, 64, 35)  # the 384x384 mosaic holds 35 slices of 64x64
    _assert_same_voxels_in_world(ours, reference, atol_mm=1e-3)
    assert np.allclose(ours.geometry.spacing, (3.25, 3.25, 3.6), atol=1e-6)


def test_dcm_qa_ts_covers_all_common_syntaxes(shared_data: Path) -> None:
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in sorted((shared_data / "dcm_qa_ts" / "In").glob("*.dcm"))
    }
    assert syntaxes == EXPECTED_SYNTAXES


def test_dcm_qa_ts_folder_drops_identical_duplicate_mosaics(shared_data: Path) -> None:
    """The 9 files are one acquisition in 9 syntaxes: same UID, same positions, identical pixels."""
    volume = read_dicom_series(shared_data / "dcm_qa_ts" / "In")
    reference = load_volume(shared_data / "dcm_qa_ts" / "Ref" / "1.nii")
    _assert_same_voxels_in_world(volume, reference)
    issues = volume.meta["slice_issues"]
    assert len(issues) == 8 and all("35 duplicate slices" in i and "identical" in i for i in issues)


# ----------------------------------------------------------------------------- TotalSegmentator CT
def test_totalseg_ct_equals_simpleitk_and_loads_despite_empty_uids(shared_data: Path) -> None:
    folder = shared_data / "totalseg-tests" / "example_ct_dicom"
    scan = scan_dicom(folder)
    assert len(scan.series) == 1 and not scan.skipped
    series = scan.series[0]
    assert series.uid == "" and series.key.startswith("nouid-")
    assert (series.modality, series.num_slices, series.rows, series.cols) == ("CT", 20, 512, 512)
    ours = read_dicom_series(folder)
    _assert_same_as_sitk(ours, _sitk_series(folder))
    assert ours.array.min() == -1024  # RescaleIntercept applied: HU
    assert ours.meta["slice_issues"] == []


def test_totalseg_segmentation_lies_on_our_ct_grid(shared_data: Path) -> None:
    ct = read_dicom_series(shared_data / "totalseg-tests" / "example_ct_dicom")
    seg = load_volume(shared_data / "totalseg-tests" / "example_seg_dicom.nii.gz", kind="label")
    mapping = axis_mapping(seg.geometry, ct.geometry, atol=1e-3)
    assert mapping is not None and mapping.max_error_mm < 1e-3
    labels = reindex_to(seg, ct.geometry).array[0] > 0
    hu = ct.array[0]
    # Anatomy check of the mapping: labelled organs/bones are almost never air, the rest often is.
    assert np.mean(hu[labels] < -500) < 0.05
    assert np.mean(hu[~labels] < -500) > 0.5


# ----------------------------------------------------------------------------- PGBM tilted MR
def _pgbm_series(shared_data: Path) -> list[Path]:
    root = shared_data / "pgbm-brain-tumor-progression"
    folders = sorted(p for p in root.glob("*/*/*") if p.is_dir())
    if not folders:
        pytest.skip("pgbm-brain-tumor-progression not available")
    return folders


def test_pgbm_series_equal_simpleitk(shared_data: Path) -> None:
    for folder in _pgbm_series(shared_data):
        ours = read_dicom_series(folder)
        _assert_same_as_sitk(ours, _sitk_series(folder))
        # oblique slices: the direction is far from the identity and must be kept
        assert np.max(np.abs(ours.geometry.direction - np.eye(3))) > 0.05
        assert ours.meta["slice_issues"] == []


def test_pgbm_mask_tumor_lies_exactly_on_its_t1post_grid(shared_data: Path) -> None:
    studies = sorted({p.parent for p in _pgbm_series(shared_data)})
    for study in studies:
        (t1,) = [p for p in study.iterdir() if "T1post" in p.name]
        (mask,) = [p for p in study.iterdir() if "MaskTumor" in p.name]
        image = read_dicom_series(t1)
        label = load_volume(mask, kind="label")
        assert label.kind == "label" and label.array.dtype == np.uint8
        # Same grid, same index order; the mask headers round direction cosines to 6 decimals.
        assert label.geometry.allclose(image.geometry, atol=1e-4)
        mapping = axis_mapping(label.geometry, image.geometry, atol=1e-3)
        assert mapping is not None and mapping.axes == (0, 1, 2) and mapping.flip == (False, False, False)
        assert label.array.max() >= 1


def test_pgbm_series_equal_a_fresh_dcm2niix_run(shared_data: Path, tmp_path: Path) -> None:
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    for folder in _pgbm_series(shared_data)[:6]:
        out = tmp_path / folder.name
        out.mkdir()
        subprocess.run(
            [exe, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(folder)], check=True, capture_output=True
        )
        (converted,) = sorted(out.glob("*.nii"))
        ours = read_dicom_series(folder)
        _assert_same_voxels_in_world(ours, load_volume(converted), atol_mm=1e-3)


# ----------------------------------------------------------------------------- enhanced multi-frame
def test_enhanced_multiframe_mr_equals_the_single_frame_series(shared_data: Path, tmp_path: Path) -> None:
    """highdicom's legacy conversion writes per-frame functional groups independently of us."""
    hd_legacy = pytest.importorskip("highdicom.legacy")
    folder = next(p for p in _pgbm_series(shared_data) if "T1post" in p.name)
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    multiframe = hd_legacy.LegacyConvertedEnhancedMRImage(
        datasets, pydicom.uid.generate_uid(), 99, pydicom.uid.generate_uid(), 1
    )
    path = tmp_path / "enhanced"  # no suffix, like in real archives
    multiframe.save_as(path)
    single = read_dicom_series(folder)
    enhanced = read_dicom_series(path)
    (series,) = scan_dicom(path).series
    assert series.multiframe and series.num_slices == len(datasets)
    assert enhanced.geometry.allclose(single.geometry, atol=1e-6)
    assert np.array_equal(enhanced.array, single.array)
    assert sorted(enhanced.meta["frame_numbers"]) == list(range(1, len(datasets) + 1))
