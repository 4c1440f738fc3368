"""The data contract and NIfTI/NRRD/MHA IO: geometry round-trips against independent readers."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medseg.errors import GeometryError, InputError, OutputExistsError
from medseg.io import Geometry, Volume, label_dtype, load_volume, write_volume


def _oblique_geometry(shape=(7, 6, 5), angles=(10.0, -20.0, 35.0), spacing=(0.7, 1.3, 2.9), origin=(-12.5, 40.0, 3.25)):
    direction = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    return Geometry.from_itk(shape=shape, spacing=spacing, origin=origin, direction=direction)


def test_itk_parameters_round_trip_and_ras_convention() -> None:
    g = _oblique_geometry()
    assert np.allclose(g.spacing, (0.7, 1.3, 2.9))
    assert np.allclose(g.origin, (-12.5, 40.0, 3.25))
    # RAS affine translation is the LPS origin with x and y negated.
    assert np.allclose(g.affine[:3, 3], (12.5, -40.0, 3.25))
    again = Geometry.from_itk(shape=g.shape, **g.to_itk())
    assert again.allclose(g, atol=1e-12)
    # Voxel (i, j, k) maps to origin + D @ diag(spacing) @ ijk in LPS, as ITK defines it.
    ijk = np.array([2.0, 3.0, 4.0])
    lps = np.asarray(g.origin) + g.direction @ (np.asarray(g.spacing) * ijk)
    ras = g.affine @ np.append(ijk, 1.0)
    assert np.allclose(ras[:3], lps * [-1, -1, 1])


def test_identity_lps_grid_has_orientation_code_lps() -> None:
    g = Geometry.from_itk(shape=(2, 2, 2), spacing=(1, 1, 1), origin=(0, 0, 0), direction=np.eye(3))
    assert g.orientation == "LPS"


def test_invalid_geometry_and_shape_mismatch_are_errors() -> None:
    with pytest.raises(GeometryError):
        Geometry(shape=(2, 2, 2), affine=np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(GeometryError, match="does not match"):
        Volume(np.zeros((1, 3, 3, 3)), _oblique_geometry())


def test_label_dtype_is_sized_to_label_count() -> None:
    assert label_dtype(3) == np.uint8
    assert label_dtype(255) == np.uint8
    assert label_dtype(256) == np.uint16
    assert label_dtype(70000) == np.uint32


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_then_read_with_independent_readers(tmp_path: Path, suffix: str) -> None:
    g = _oblique_geometry()
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(1, *g.shape)).astype(np.int16)
    path = write_volume(Volume(array, g), tmp_path / f"img{suffix}")
    # SimpleITK reads every format: LPS parameters and voxel order (ITK index i, j, k == array X, Y, Z).
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == g.shape
    assert np.allclose(img.GetSpacing(), g.spacing, atol=1e-5)
    assert np.allclose(img.GetOrigin(), g.origin, atol=1e-4)
    assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), g.direction, atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), array[0])
    if suffix.startswith(".nii"):
        nimg = nib.load(str(path))
        assert np.allclose(nimg.affine, g.affine, atol=1e-4)
        assert int(nimg.header["sform_code"]) == 1 and int(nimg.header["qform_code"]) == 1
        assert np.allclose(nimg.get_qform(), g.affine, atol=1e-4)
    back = load_volume(path)
    assert back.geometry.allclose(g, atol=1e-4)
    assert np.array_equal(back.array, array)


@settings(max_examples=25, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.2, 6.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    flip=st.sampled_from([(1, 1, 1), (-1, 1, 1), (1, -1, -1), (-1, -1, -1)]),
    suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha"]),
)
def test_round_trip_property_any_direction(tmp_path_factory, angles, spacing, origin, flip, suffix) -> None:
    direction = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(flip)  # proper and improper
    g = Geometry.from_itk(shape=(4, 3, 2), spacing=spacing, origin=origin, direction=direction)
    array = np.arange(24, dtype=np.uint8).reshape(1, 4, 3, 2)
    path = write_volume(Volume(array, g, kind="label"), tmp_path_factory.mktemp("rt") / f"lab{suffix}")
    back = load_volume(path, kind="label")
    assert back.geometry.allclose(g, atol=1e-3)
    assert np.array_equal(back.array, array)
    img = sitk.ReadImage(str(path))
    assert np.allclose(img.GetOrigin(), g.origin, atol=1e-3)
    assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), g.direction, atol=1e-5)


def test_multichannel_round_trip(tmp_path: Path) -> None:
    g = _oblique_geometry()
    array = np.random.default_rng(1).normal(size=(2, *g.shape)).astype(np.float32)
    for suffix in (".nii.gz", ".mha"):
        back = load_volume(write_volume(Volume(array, g), tmp_path / f"mc{suffix}"))
        assert back.channels == 2
        assert np.allclose(back.array, array)
        assert back.geometry.allclose(g)


def test_label_names_sidecar_and_nrrd_segment_metadata(tmp_path: Path) -> None:
    g = _oblique_geometry()
    labels = np.zeros((1, *g.shape), dtype=np.int64)
    labels[0, 1:3, 1:3, 1:3] = 2
    path = write_volume(Volume(labels, g, kind="label"), tmp_path / "seg.nrrd", label_names={0: "bg", 2: "kidney"})
    img = sitk.ReadImage(str(path))
    assert img.GetPixelID() == sitk.sitkUInt8
    assert img.GetMetaData("Segment0_Name") == "kidney"
    assert img.GetMetaData("Segment0_LabelValue") == "2"
    assert (tmp_path / "seg.json").is_file()
    assert load_volume(path, kind="label").meta["sidecar"]["labels"]["2"] == "kidney"


def test_refuses_overwrite_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    g = _oblique_geometry()
    vol = Volume(np.zeros((1, *g.shape), dtype=np.uint8), g, kind="label")
    path = write_volume(vol, tmp_path / "a.nii.gz")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        write_volume(Volume(np.ones((1, *g.shape), dtype=np.uint8), g, kind="label"), path)
    assert path.read_bytes() == before
    write_volume(Volume(np.ones((1, *g.shape), dtype=np.uint8), g, kind="label"), path, overwrite=True)
    assert load_volume(path, kind="label").array.max() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    g = _oblique_geometry()
    vol = Volume(np.zeros((1, *g.shape), dtype=np.float64), g)
    with pytest.raises(Exception, match="mhd"):
        write_volume(vol, tmp_path / "x.mhd")
    assert list(tmp_path.iterdir()) == []


def _nifti(tmp_path: Path, data: np.ndarray, name: str = "x.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _nifti(p, np.full((3, 3, 3), np.nan, dtype=np.float32)), "NaN"),
        (lambda p: _nifti(p, np.zeros((3, 3), dtype=np.float32)), "3D"),
        (
            lambda p: (p / "bad.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 30)) and p / "bad.nii.gz",
            "NIfTI",
        ),
        (lambda p: (p / "trunc.nii.gz").write_bytes(gzip.compress(b"\x00" * 100)[:40]) and p / "trunc.nii.gz", "NIfTI"),
        (lambda p: p / "missing.nii.gz", "no such"),
        (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "not a supported volume"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_file(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_non_integer_labels_rejected(tmp_path: Path) -> None:
    path = _nifti(tmp_path, np.full((3, 3, 3), 0.5, dtype=np.float32))
    with pytest.raises(InputError, match="non-integer"):
        load_volume(path, kind="label")


def test_metatensor_carries_ras_affine_and_original_geometry() -> None:
    g = _oblique_geometry()
    vol = Volume(np.zeros((1, *g.shape), dtype=np.float32), g, source="x.nii.gz")
    mt = vol.to_metatensor()
    assert np.allclose(mt.affine.numpy(), g.affine)
    assert np.allclose(mt.meta["original_affine"].numpy(), g.affine)
    back = Volume.from_metatensor(mt)
    assert back.geometry.allclose(g, atol=0)
