"""Read -> write -> read keeps voxels and geometry, checked against independent readers.

Property tests draw random rotations (including left-handed grids), spacings, origins and
shapes; each written file is read back by medseg and by an independent reader (nibabel for
NIfTI, SimpleITK for every format) and compared voxel by voxel and in world space.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.io import Geometry, Volume, load_volume, read_dicom_series, write_volume
from medseg.io.volume import LPS_FROM_RAS

SUFFIXES = [".nii.gz", ".nrrd", ".mha"]


def _rotation(q: tuple[float, float, float, float], flip: bool) -> np.ndarray:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    r = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    return r @ np.diag([1.0, 1.0, -1.0]) if flip else r


grids = st.builds(
    lambda q, flip, spacing, origin, shape: Geometry.from_itk(
        shape=shape, spacing=spacing, origin=origin, direction=_rotation(q, flip)
    ),
    st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: np.linalg.norm(q) > 0.1),
    st.booleans(),
    st.tuples(*[st.floats(0.2, 6.0) for _ in range(3)]),
    st.tuples(*[st.floats(-400, 400) for _ in range(3)]),
    st.tuples(*[st.integers(1, 9) for _ in range(3)]),
)


def _sitk_world(image: sitk.Image, index: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(image.TransformIndexToPhysicalPoint(index))  # LPS


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=grids, seed=st.integers(0, 2**16), suffix=st.sampled_from(SUFFIXES))
def test_image_round_trip_keeps_voxels_and_geometry(tmp_path: Path, geometry: Geometry, seed: int, suffix: str) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(-2000, 3000, size=(1, *geometry.shape)).astype(np.int16)
    path = write_volume(Volume(array, geometry), tmp_path / f"case_{seed}{suffix}", overwrite=True)

    back = load_volume(path)
    assert np.array_equal(back.array, array)
    assert back.geometry.allclose(geometry, atol=1e-4)

    image = sitk.ReadImage(str(path))  # independent reader, LPS
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), array[0])
    corner = tuple(n - 1 for n in geometry.shape)
    for index in [(0, 0, 0), corner]:
        ras = geometry.affine @ np.array([*index, 1.0])
        assert np.allclose(_sitk_world(image, index), LPS_FROM_RAS @ ras[:3], atol=1e-3)
    if suffix == ".nii.gz":
        img = nib.load(str(path))
        assert np.allclose(img.affine, geometry.affine, atol=1e-4)
        assert np.array_equal(np.asanyarray(img.dataobj), array[0])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=grids, n_labels=st.integers(1, 300), suffix=st.sampled_from(SUFFIXES))
def test_label_round_trip_keeps_dtype_names_and_grid(
    tmp_path: Path, geometry: Geometry, n_labels: int, suffix: str
) -> None:
    rng = np.random.default_rng(n_labels)
    labels = rng.integers(0, n_labels + 1, size=(1, *geometry.shape))
    names = {i: f"structure {i}" for i in range(1, n_labels + 1)}
    path = write_volume(
        Volume(labels, geometry, kind="label"), tmp_path / f"lab_{n_labels}{suffix}", overwrite=True, label_names=names
    )
    back = load_volume(path, kind="label")
    assert back.array.dtype == (np.uint8 if labels.max() < 256 else np.uint16)
    assert np.array_equal(back.array, labels)
    assert back.geometry.allclose(geometry, atol=1e-4)
    assert back.meta["sidecar"]["labels"][str(n_labels)] == f"structure {n_labels}"
    if suffix == ".nrrd":
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        values = {reader.GetMetaData(k) for k in reader.GetMetaDataKeys() if k.endswith("_Name")}
        assert f"structure {n_labels}" in values


def test_nifti_sform_wins_over_a_different_qform_as_in_nibabel(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    sform = np.diag([-0.9, 1.1, 2.0, 1.0])
    sform[:3, 3] = (10, -20, 30)
    img = nib.Nifti1Image(data, None)
    img.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    img.set_sform(sform, code=2)
    nib.save(img, tmp_path / "both.nii")
    assert np.allclose(load_volume(tmp_path / "both.nii").geometry.affine, sform)


def test_dicom_to_nifti_nrrd_mha_keeps_the_dicom_grid(shared_data: Path, tmp_path: Path) -> None:
    folders = sorted((shared_data / "pgbm-brain-tumor-progression").glob("*/*/*T1post*"))
    if not folders:
        pytest.skip("pgbm data not available")
    folder = folders[0]
    ours = read_dicom_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    for suffix in SUFFIXES:
        written = write_volume(ours, tmp_path / f"t1{suffix}")
        image = sitk.ReadImage(str(written))
        assert image.GetSize() == ref.GetSize()
        assert np.allclose(image.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        assert np.allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        assert np.allclose(image.GetDirection(), ref.GetDirection(), atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ref))
