"""Bad DICOM input: typed errors naming the file and the reason; tolerated issues are recorded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_dicom_fakes import edit, phantom, write_series

from medseg.errors import InputError
from medseg.io import load_volume, read_dicom_series


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "series"
    return folder, write_series(phantom(shape=(20, 16, 8)), folder)


def test_a_clean_synthetic_series_round_trips(series: tuple[Path, list[Path]]) -> None:
    folder, _ = series
    volume = read_dicom_series(folder)
    expected = phantom(shape=(20, 16, 8))
    assert np.array_equal(volume.array, expected.array)
    assert volume.geometry.allclose(expected.geometry, atol=1e-5)
    assert volume.meta["slice_issues"] == []
    assert volume.meta["slice_files"] == [str(p) for p in sorted(folder.iterdir())]


def test_truncated_pixel_data_names_the_file(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="truncated pixel data") as info:
        read_dicom_series(folder)
    assert info.value.path == str(files[3])


def test_file_truncated_inside_its_header_is_not_an_image(series: tuple[Path, list[Path]]) -> None:
    _, files = series
    files[0].write_bytes(files[0].read_bytes()[:300])
    with pytest.raises(InputError) as info:
        read_dicom_series(files[0])
    assert info.value.path == str(files[0])
    assert "not a DICOM image" in info.value.reason


def test_non_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("hello, not DICOM\n" * 20)
    with pytest.raises(InputError, match="not a DICOM image: not DICOM") as info:
        read_dicom_series(path)
    assert info.value.path == str(path)
    with pytest.raises(InputError, match="not DICOM"):
        load_volume(path)


def test_dicom_without_pixel_data(series: tuple[Path, list[Path]]) -> None:
    _, files = series
    edit(files[0], PixelData=None)
    with pytest.raises(InputError, match="no pixel data") as info:
        read_dicom_series(files[0])
    assert info.value.path == str(files[0])


def test_missing_slice_is_an_error_naming_the_slice_after_the_gap(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    files[4].unlink()
    with pytest.raises(InputError, match=r"1 missing slice\(s\) \(non-uniform slice spacing\)") as info:
        read_dicom_series(folder)
    assert info.value.path == str(files[5])
    assert str(files[3]) in info.value.reason


def test_conflicting_duplicate_slice_is_an_error(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    edit(files[2], folder / "copy", PixelData=bytes(len(pydicom.dcmread(files[2]).PixelData)))
    with pytest.raises(InputError, match=r"duplicate slice position .* different pixels") as info:
        read_dicom_series(folder)
    assert {info.value.path} <= {str(files[2]), str(folder / "copy")}


def test_identical_duplicate_slice_is_dropped_and_recorded(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    edit(files[2], folder / "copy", SOPInstanceUID=pydicom.uid.generate_uid())
    volume = read_dicom_series(folder)
    assert volume.geometry.shape == (20, 16, 8)
    assert np.array_equal(volume.array, phantom(shape=(20, 16, 8)).array)
    (issue,) = volume.meta["slice_issues"]
    assert "identical" in issue and "dropped" in issue and "copy" in issue


def test_non_uniform_spacing_is_an_error(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    ds = pydicom.dcmread(files[5])
    normal = np.cross(
        np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    )
    moved = np.asarray(ds.ImagePositionPatient, float) + 0.9 * normal  # 0.9 mm off a 2.5 mm grid
    edit(files[5], ImagePositionPatient=[f"{v:.6f}" for v in moved])
    with pytest.raises(InputError, match="non-uniform slice spacing"):
        read_dicom_series(folder)


def test_rounded_positions_are_tolerated_and_recorded(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    ds = pydicom.dcmread(files[5])
    normal = np.cross(
        np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    )
    edit(
        files[5], ImagePositionPatient=[f"{v:.6f}" for v in np.asarray(ds.ImagePositionPatient, float) + 0.01 * normal]
    )
    volume = read_dicom_series(folder)
    assert volume.geometry.allclose(phantom(shape=(20, 16, 8)).geometry, atol=1e-3)
    (issue,) = volume.meta["slice_issues"]
    assert "deviate" in issue and "tolerated" in issue


def test_mixed_slice_sizes_within_one_stack_are_rejected(series: tuple[Path, list[Path]]) -> None:
    from medseg.io import load_series, scan_dicom

    folder, _ = series
    (whole,) = scan_dicom(folder).series
    small = write_series(phantom(shape=(12, 10, 8)), folder.parent / "small")
    (other,) = scan_dicom(small[0]).series
    whole.frames.append(other.frames[0])
    whole.layouts[small[0]] = other.layouts[small[0]]
    with pytest.raises(InputError, match="mixes slice sizes 16x20") as info:
        load_series(whole)
    assert info.value.path == str(small[0])


def test_missing_geometry_tag_names_the_file(series: tuple[Path, list[Path]]) -> None:
    folder, files = series
    edit(files[6], ImagePositionPatient=None)
    with pytest.raises(InputError, match="missing or invalid ImagePositionPatient") as info:
        read_dicom_series(folder)
    assert info.value.path == str(files[6])


def test_gantry_tilt_is_refused_by_default_and_resampled_on_request(tmp_path: Path) -> None:
    volume = phantom(shape=(20, 16, 6), spacing=(0.7, 0.8, 2.5))
    write_series(volume, tmp_path / "tilted", shear_rows_per_slice=1)
    with pytest.raises(InputError, match=r"gantry tilt / sheared slices \(17\.74 degrees") as info:
        read_dicom_series(tmp_path / "tilted")
    assert "tilt='resample'" in info.value.reason
    fixed = read_dicom_series(tmp_path / "tilted", tilt="resample")
    assert fixed.geometry.allclose(volume.geometry, atol=1e-5)  # orthogonal grid through slice 0
    for k in range(6):  # whole-row shifts: linear interpolation reproduces the voxels exactly
        rows = 16 - k
        assert np.array_equal(fixed.array[0, :, :rows, k], volume.array[0, :, :rows, k])
    assert fixed.meta["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.8 / 2.5)), abs=1e-3)
    assert any("gantry tilt" in issue for issue in fixed.meta["slice_issues"])


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        read_dicom_series(tmp_path / "missing")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(InputError, match="broken symlink"):
        load_volume(tmp_path / "dangling")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM image series found"):
        read_dicom_series(tmp_path / "empty")
