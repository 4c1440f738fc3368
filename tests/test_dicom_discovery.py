"""Discovery over messy folders: grouping, splitting, skipping, header-only reading."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_dicom_fakes import edit, phantom, write_series

from medseg.errors import InputError
from medseg.io import discover_series, is_dicom_file, read_dicom_series, scan_dicom


def _minimal_object(path: Path, sop_class: str) -> Path:
    """A header-only DICOM object of the given SOP class (presentation state, DICOMDIR, ...)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "PR"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_messy_archive_finds_the_image_series_and_says_why_it_skipped_the_rest(
    shared_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "archive"
    ct_dir = root / "patient1" / "study" / "DIR000"
    ct_dir.mkdir(parents=True)
    ct_files = sorted((shared_data / "totalseg-tests" / "example_ct_dicom").iterdir())
    for i, src in enumerate(ct_files):  # files without extension, names unrelated to order
        os.symlink(src, ct_dir / f"{(i * 7919) % 1000:08d}")
    study = sorted((shared_data / "pgbm-brain-tumor-progression" / "PGBM-003").iterdir())[0]
    for series_dir in sorted(study.iterdir()):
        dest = root / "patient2" / series_dir.name
        dest.mkdir(parents=True)
        for src in series_dir.iterdir():
            os.symlink(src, dest / src.stem)
    other = root / "other"
    other.mkdir()
    os.symlink(shared_data / "highdicom-testfiles" / "sr_document.dcm", other / "sr")
    os.symlink(shared_data / "highdicom-testfiles" / "seg_image_ct_binary.dcm", other / "seg")
    os.symlink(shared_data / "rtstruct-rtutils-mock" / "rt.dcm", other / "rtstruct")
    _minimal_object(other / "gsps", "1.2.840.10008.5.1.4.1.1.11.1")
    _minimal_object(root / "DICOMDIR", "1.2.840.10008.1.3.10")
    (other / "README.txt").write_text("not an image\n")
    (other / "empty").write_bytes(b"")
    shutil.copy(shared_data / "highdicom-testfiles" / "frame_rgb.jpeg", other / "photo.jpeg")
    edit(ct_files[0], other / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesInstanceUID=generate_uid())
    edit(ct_files[1], other / "nopixels", PixelData=None, SeriesInstanceUID=generate_uid())

    scan = scan_dicom(root)
    by_description = sorted((s.description, s.num_slices) for s in scan.series)
    assert by_description == [("CT Body 3.0", 20), ("FLAIR_reg", 22), ("Mask_Tumor", 22), ("T1post", 22)]
    reasons = {p.name: r for p, r in scan.skipped}
    assert reasons["sr"] == "structured report"
    assert reasons["seg"] == "segmentation (DICOM SEG)"
    assert reasons["rtstruct"] == "RT structure set (RTSTRUCT)"
    assert reasons["gsps"] == "presentation state"
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert reasons["scout"] == "localizer"
    assert reasons["nopixels"] == "no pixel data"
    assert reasons["README.txt"] == reasons["empty"] == reasons["photo.jpeg"] == "not DICOM"
    ct = next(s for s in scan.series if s.modality == "CT")
    assert (ct.uid, ct.body_part, ct.rows, ct.cols, ct.slice_thickness) == ("", "PARTIALBODY", 512, 512, 3.0)
    assert ct.orientation_code == "LPS" and ct.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert "ORIGINAL" in ct.image_type and ct.to_dict()["num_files"] == 20

    with_scouts = discover_series(root, include_localizers=True)
    assert len(with_scouts) == 5

    with pytest.raises(InputError, match=r"contains 4 series.*series_uid"):
        read_dicom_series(root)
    t1 = next(s for s in scan.series if s.description == "T1post")
    picked = read_dicom_series(root, series_uid=t1.uid)
    direct = read_dicom_series(next(p for p in study.iterdir() if "T1post" in p.name))
    assert picked.geometry.allclose(direct.geometry, atol=0) and np.array_equal(picked.array, direct.array)


def test_echoes_on_one_grid_are_one_multi_volume_series(tmp_path: Path) -> None:
    uid, study = generate_uid(), generate_uid()
    echo1, echo2 = phantom(seed=1), phantom(seed=2)
    write_series(echo2, tmp_path / "s", series_uid=uid, study_uid=study, prefix="A", EchoNumbers="2")
    write_series(echo1, tmp_path / "s", series_uid=uid, study_uid=study, prefix="B", EchoNumbers="1")
    (series,) = discover_series(tmp_path / "s")
    assert series.key == uid and series.num_volumes == 2 and series.num_slices == echo1.geometry.shape[2]
    both = read_dicom_series(tmp_path / "s")
    assert both.array.shape == (2, *echo1.geometry.shape)  # volumes in echo order, whatever the file order
    assert np.array_equal(both.array[0], echo1.array[0]) and np.array_equal(both.array[1], echo2.array[0])
    assert [v["echo"] for v in both.meta["volumes"]] == ["1", "2"]
    # One volume of it, by key: <UID>#vol=<n> (1-based).
    second = read_dicom_series(tmp_path / "s", series_uid=f"{uid}#vol=2")
    assert np.array_equal(second.array, echo2.array) and second.geometry.allclose(echo2.geometry, atol=1e-5)
    assert second.meta["series_key"] == f"{uid}#vol=2"


def test_echoes_on_different_positions_stay_separate_series(tmp_path: Path) -> None:
    uid, study = generate_uid(), generate_uid()
    echo1, echo2 = phantom(seed=1), phantom(seed=2)
    shifted = echo2.geometry.affine.copy()
    shifted[:3, 3] += shifted[:3, 2] * 0.5  # interleaved: half a slice further along
    write_series(echo1, tmp_path / "s", series_uid=uid, study_uid=study, prefix="A", EchoNumbers="1")
    moved = type(echo2)(echo2.array, type(echo2.geometry)(shape=echo2.geometry.shape, affine=shifted))
    write_series(moved, tmp_path / "s", series_uid=uid, study_uid=study, prefix="B", EchoNumbers="2")
    keys = [s.key for s in discover_series(tmp_path / "s")]
    assert keys == [f"{uid}#echo=1", f"{uid}#echo=2"]
    assert keys == [s.key for s in discover_series(tmp_path / "s")]  # stable
    with pytest.raises(InputError, match="contains 2 series"):
        read_dicom_series(tmp_path / "s", series_uid=uid)
    second = read_dicom_series(tmp_path / "s", series_uid=f"{uid}#echo=2")
    assert np.array_equal(second.array, echo2.array)


def test_acquisition_number_makes_volumes_only_of_full_volumes(tmp_path: Path) -> None:
    volume = phantom(seed=3)
    # Some scanners count AcquisitionNumber per slice: that must stay one series.
    files = write_series(volume, tmp_path / "per_slice")
    for k, path in enumerate(files):
        edit(path, AcquisitionNumber=str(k + 1))
    (series,) = discover_series(tmp_path / "per_slice")
    assert series.num_slices == volume.geometry.shape[2] and series.num_volumes == 1
    assert np.array_equal(read_dicom_series(tmp_path / "per_slice").array, volume.array)
    # Two complete acquisitions at the same positions (e.g. pre/post contrast in one series): one 4D series.
    uid, study = generate_uid(), generate_uid()
    write_series(volume, tmp_path / "two", series_uid=uid, study_uid=study, prefix="A", AcquisitionNumber="1")
    later = phantom(seed=4)
    write_series(later, tmp_path / "two", series_uid=uid, study_uid=study, prefix="B", AcquisitionNumber="2")
    (both,) = discover_series(tmp_path / "two")
    assert both.key == uid and both.num_volumes == 2
    assert np.array_equal(read_dicom_series(tmp_path / "two", series_uid=f"{uid}#vol=2").array, later.array)
    # Complete acquisitions on overlapping but different positions (slabs) are separate series, in numeric order.
    slab = tmp_path / "slabs"
    for shift, acq in ((3, 10), (2, 2), (1, 1)):
        a = volume.geometry.affine.copy()
        a[:3, 3] += a[:3, 2] * shift
        geometry = type(volume.geometry)(shape=volume.geometry.shape, affine=a)
        write_series(
            type(volume)(volume.array, geometry),
            slab,
            series_uid=uid,
            study_uid=study,
            prefix=f"S{acq}",
            AcquisitionNumber=str(acq),
        )
    assert [s.key for s in discover_series(slab)] == [f"{uid}#acq=1", f"{uid}#acq=2", f"{uid}#acq=10"]


def test_mixed_image_sizes_in_one_uid_become_separate_series(tmp_path: Path) -> None:
    uid = generate_uid()
    write_series(phantom(shape=(20, 16, 6)), tmp_path / "s", series_uid=uid, prefix="A")
    write_series(phantom(shape=(12, 10, 4), seed=5), tmp_path / "s", series_uid=uid, prefix="B")
    parts = discover_series(tmp_path / "s")
    assert sorted((s.key.split("#")[1], s.num_slices) for s in parts) == [("size=12x10", 4), ("size=20x16", 6)]
    with pytest.raises(InputError, match="contains 2 series"):
        read_dicom_series(tmp_path / "s")


def test_preamble_less_implicit_vr_files_are_found_and_read(tmp_path: Path) -> None:
    volume = phantom(seed=6)
    files = write_series(volume, tmp_path / "src")
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(raw / path.name, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (raw / files[0].name).read_bytes()[128:132] != b"DICM"
    assert all(is_dicom_file(raw / p.name) for p in files)
    loaded = read_dicom_series(raw)
    assert np.array_equal(loaded.array, volume.array) and loaded.geometry.allclose(volume.geometry, atol=1e-5)


def test_discovery_reads_headers_only(shared_data: Path, tmp_path: Path) -> None:
    """Corrupt JPEG 2000 codestreams: discovery lists the series, loading names the bad file."""
    folder = tmp_path / "ct"
    folder.mkdir()
    sources = sorted((shared_data / "totalseg-tests" / "example_ct_dicom").iterdir())
    for src in sources[:3]:
        ds = pydicom.dcmread(src)
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds.save_as(folder / src.name, enforce_file_format=True)
    (series,) = discover_series(folder)
    assert series.num_slices == 3 and series.shape == (512, 512, 3)
    with pytest.raises(InputError, match=r"cannot decode pixel data \(JPEG 2000"):
        read_dicom_series(folder)
