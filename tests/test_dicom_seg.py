from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.errors import GeometryError, InputError
from medseg.io import read_dicom_series, read_image_file, write_volume
from medseg.io.dicom_seg import coded_property, read_dicom_seg, write_dicom_seg
from medseg.io.volume import Geometry, Volume
from medseg.sample_data import make_phantom, write_ct_dicom_series

NAMES = {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dicom3tools' dciodvfy (skips when it is not installed)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume, Volume]:
    """A small tilted CT phantom series on disk, the image read back and its true label volume."""
    phantom = make_phantom(1)  # neurological x/y flip + tilt: exercises the grid matching
    image, label = phantom.channels[0], phantom.label
    a = image.geometry.affine.copy()
    a[:3, 3] += a[:3, :3] @ np.array([16, 16, 6])
    crop = (slice(None), slice(16, 64), slice(16, 64), slice(6, 30))
    grid = Geometry(shape=(48, 48, 24), affine=a)
    folder = tmp_path_factory.mktemp("seg") / "ct"
    # The DICOM writer needs a right-handed grid; the phantom's case 1 is, after cropping, still a rotation.
    write_ct_dicom_series(Volume(image.array[crop].copy(), grid), folder, case_id="seg1")
    read = read_dicom_series(folder)
    labels = Volume(label.array[crop].copy(), grid, kind="label")
    labels = Volume(_onto(labels, read.geometry), read.geometry, kind="label")
    return folder, read, labels


def _onto(volume: Volume, target: Geometry) -> np.ndarray:
    """Axis permutation/flip of ``volume`` onto ``target`` (test helper via nibabel, exact)."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(volume.geometry.affine), nib.orientations.io_orientation(target.affine)
    )
    return nib.orientations.apply_orientation(volume.array[0], ornt)[None]


def test_seg_roundtrip_valid_and_identical(phantom_series: tuple[Path, Volume, Volume], tmp_path: Path) -> None:
    folder, image, labels = phantom_series
    assert set(np.unique(labels.array)) == {0, 1, 2, 3}
    nifti = write_volume(labels, tmp_path / "labels.nii.gz", label_names=NAMES)
    out = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", label_names=NAMES)
    assert dciodvfy_errors(out) == []

    # Back with highdicom on the source grid (frames located by referenced SOP instance) ...
    back = read_dicom_seg(out, reference=image)
    reference = nib.load(str(nifti))
    assert np.array_equal(back.array[0], np.asarray(reference.dataobj))
    assert np.allclose(reference.affine, back.geometry.affine, atol=1e-4)
    assert back.meta["label_names"] == {1: "liver", 2: "kidney", 3: "lesion"}
    # ... and on its own plane positions (only non-empty frames are stored: a sub-block of the grid).
    own = read_dicom_seg(out)
    ijk = np.rint(np.linalg.inv(image.geometry.affine) @ own.geometry.affine[:, 3]).astype(int)[:3]
    assert np.allclose(own.geometry.affine[:3, :3], image.geometry.affine[:3, :3], atol=1e-4)
    block = labels.array[0][ijk[0] :, ijk[1] :, ijk[2] : ijk[2] + own.geometry.shape[2]]
    assert np.array_equal(own.array[0], block)
    assert labels.array[0].sum() == own.array[0].sum()

    # pydicom view: references, copied patient/study attributes, new UIDs, coded categories.
    ds = pydicom.dcmread(out)
    src = pydicom.dcmread(next(folder.iterdir()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == image.geometry.shape[2]
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyID"):
        assert ds.get(keyword) == src.get(keyword), keyword
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    liver = ds.SegmentSequence[0]
    assert liver.SegmentLabel == "liver"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    lesion = ds.SegmentSequence[2]
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morph. abnormal structure


def test_labelmap_seg_roundtrip(phantom_series: tuple[Path, Volume, Volume], tmp_path: Path) -> None:
    """LABELMAP (DICOM 2024) reads back identically; the installed dciodvfy (2022) does not know the SOP class."""
    folder, image, labels = phantom_series
    out = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", label_names=NAMES, segmentation_type="labelmap")
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and ds.SegmentationType == "LABELMAP"
    back = read_dicom_seg(out, reference=image)
    assert np.array_equal(back.array, labels.array)
    assert back.meta["label_names"] == {1: "liver", 2: "kidney", 3: "lesion"}


def test_seg_reorients_permuted_labels_and_refuses_other_grids(
    phantom_series: tuple[Path, Volume, Volume], tmp_path: Path
) -> None:
    folder, image, labels = phantom_series
    # The same labels stored with the first two axes swapped and the slice axis reversed.
    ornt = np.array([[1, 1], [0, 1], [2, -1]])
    array = nib.orientations.apply_orientation(labels.array[0], ornt)
    affine = labels.geometry.affine @ nib.orientations.inv_ornt_aff(ornt, labels.geometry.shape)
    flipped = Volume(array[None], Geometry(shape=array.shape, affine=affine), kind="label")
    assert not flipped.geometry.allclose(image.geometry)
    assert np.allclose(flipped.geometry.affine @ [3, 5, 7, 1], labels.geometry.affine @ [5, 3, 16, 1])
    out = write_dicom_seg(flipped, folder, tmp_path / "seg.dcm", label_names=NAMES)
    assert np.array_equal(read_dicom_seg(out, reference=image).array, labels.array)

    shifted = labels.geometry.affine.copy()
    shifted[:3, 3] += 1.0
    with pytest.raises(GeometryError, match="not on the source series' grid"):
        write_dicom_seg(
            Volume(labels.array, Geometry(shape=labels.geometry.shape, affine=shifted), kind="label"),
            folder,
            tmp_path / "x.dcm",
        )
    assert not (tmp_path / "x.dcm").exists()


def test_seg_non_consecutive_labels_roundtrip(phantom_series: tuple[Path, Volume, Volume], tmp_path: Path) -> None:
    folder, image, labels = phantom_series
    remapped = np.select([labels.array == 1, labels.array == 3], [7, 12], 0).astype(np.uint8)
    volume = Volume(remapped, labels.geometry, kind="label")
    out = write_dicom_seg(volume, folder, tmp_path / "seg.dcm", label_names={7: "liver", 12: "tumour"})
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2]
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    back = read_dicom_seg(out, reference=image)
    assert np.array_equal(back.array, remapped)
    assert back.meta["label_names"] == {7: "liver", 12: "tumour"}
    with pytest.raises(Exception, match=r"label value\(s\) \[12\] have no name"):
        write_dicom_seg(volume, folder, tmp_path / "bad.dcm", label_names={7: "liver"})


def test_seg_refuses_blank_uids(phantom_series: tuple[Path, Volume, Volume], tmp_path: Path) -> None:
    folder, _, labels = phantom_series
    blank = tmp_path / "blank"
    blank.mkdir()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = ""
        ds.StudyInstanceUID = ""
        ds.save_as(blank / path.name)
    with pytest.raises(InputError) as info:
        write_dicom_seg(labels, blank, tmp_path / "seg.dcm", label_names=NAMES)
    message = str(info.value)
    assert str(blank) in message and "empty StudyInstanceUID, SeriesInstanceUID" in message
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_refuses_real_anonymised_series(shared_data: Path, tmp_path: Path) -> None:
    """TotalSegmentator's example CT was anonymised by blanking its UIDs: refuse, say why."""
    folder = shared_data / "totalseg-tests" / "example_ct_dicom"
    image = read_dicom_series(folder)
    labels = Volume(np.zeros_like(image.array, dtype=np.uint8), image.geometry, kind="label")
    labels.array[0, 100:120, 100:120, 5:8] = 1
    with pytest.raises(InputError, match=r"empty .*SeriesInstanceUID.*anonymised by blanking"):
        write_dicom_seg(labels, folder, tmp_path / "seg.dcm", label_names={1: "x"})


def test_pgbm_mask_series_as_seg(shared_data: Path, tmp_path: Path) -> None:
    """Real MR: the PGBM MaskTumor series, written as a SEG over its T1post series."""
    study = shared_data / "pgbm-brain-tumor-progression" / "PGBM-001" / "11-19-1991-FH-HEADBrain Protocols-40993"
    t1 = read_dicom_series(study / "11-T1post-03326")
    mask = read_dicom_series(study / "5364-MaskTumor-94345")
    assert mask.geometry.allclose(t1.geometry)  # same grid (oblique slices)
    tumour = Volume((mask.array > 0).astype(np.uint8), t1.geometry, kind="label")
    assert 1000 < int(tumour.array.sum()) < tumour.array.size // 10
    out = write_dicom_seg(tumour, study / "11-T1post-03326", tmp_path / "seg.dcm", label_names={1: "tumor"})
    assert dciodvfy_errors(out) == []
    assert np.array_equal(read_dicom_seg(out, reference=t1).array, tumour.array)
    ds = pydicom.dcmread(out)
    src = pydicom.dcmread(next((study / "11-T1post-03326").iterdir()), stop_before_pixels=True)
    assert ds.PatientName == src.PatientName and ds.PatientID == src.PatientID  # copied as is, never invented
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"


def test_read_dcmqi_segs_match_their_nrrd(shared_data: Path) -> None:
    folder = shared_data / "dcmqi-data" / "segmentations"
    liver = read_dicom_seg(folder / "liver.dcm")
    nrrd = read_image_file(folder / "liver_seg.nrrd", kind="label")  # SimpleITK, independent of highdicom
    assert liver.geometry.allclose(nrrd.geometry, atol=1e-3)
    assert np.array_equal(liver.array > 0, nrrd.array > 0)
    assert liver.meta["label_names"] == {1: "Liver"}

    with pytest.raises(InputError, match="segments overlap"):
        read_dicom_seg(folder / "partial_overlaps.dcm")
    channels = read_dicom_seg(folder / "partial_overlaps.dcm", combine=False)
    parts = [read_image_file(folder / f"partial_overlaps-{i}.nrrd", kind="label") for i in (1, 2, 3)]
    for index, number in enumerate(channels.meta["segment_labels"]):
        expected = np.any([p.array[0] == number for p in parts], axis=0)
        assert parts[0].geometry.allclose(channels.geometry, atol=1e-3)
        assert np.array_equal(channels.array[index], expected), number


def test_read_highdicom_testfiles_match_raw_frames(shared_data: Path) -> None:
    """Voxel counts per segment equal pydicom's own decoding of the (bit-packed / fractional) frames."""
    folder = shared_data / "highdicom-testfiles"
    for name, combine in (
        ("seg_image_ct_binary.dcm", True),
        ("seg_image_ct_binary_fractional.dcm", True),
        ("seg_image_ct_true_fractional.dcm", True),
        ("seg_image_ct_binary_overlap.dcm", False),
    ):
        ds = pydicom.dcmread(folder / name)
        frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
        numbers = np.array(
            [
                int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                for f in ds.PerFrameFunctionalGroupsSequence
            ]
        )
        threshold = 0.5 * int(ds.get("MaximumFractionalValue", 1)) if ds.SegmentationType == "FRACTIONAL" else 0
        volume = read_dicom_seg(folder / name, combine=combine)
        for index, number in enumerate(sorted(set(numbers))):
            raw = int((frames[numbers == number] > threshold).sum())
            ours = int((volume.array[0] == number).sum()) if combine else int(volume.array[index].sum())
            assert ours == raw > 0, (name, number)


def test_coded_property_lookup() -> None:
    category, kind = coded_property("liver")
    assert (category.value, kind.value) == ("91723000", "10200004")
    category, kind = coded_property("Left Kidney")
    assert category.meaning == "Anatomical Structure" and "Kidney" in kind.meaning
    category, kind = coded_property("lesion")
    assert (category.value, kind.value) == ("49755003", "52988006")
    assert coded_property("tumour")[1].meaning == "Neoplasm"
    category, kind = coded_property("class_7")
    assert category.value == kind.value == "85756007"  # generic Tissue
