"""``write_volume`` writes a label volume and its ``<stem>.json`` sidecar together: both or neither.

With ``overwrite=False`` an existing volume *or* sidecar refuses the write before anything is
written (the error names the file); with ``overwrite=True`` both are replaced, and a failure while
writing leaves both old files untouched.  Geometry is checked with independent readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import OutputExistsError
from medseg.io import Geometry, Volume, load_volume, write_volume
from medseg.io.images import atomic_paths

SUFFIXES = [".nii.gz", ".nrrd"]


def _labels(value: int = 1) -> Volume:
    """A (1, 5, 4, 3) label volume on an oblique, anisotropic grid."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry.from_itk(
        shape=(5, 4, 3), spacing=(0.7, 0.9, 2.5), origin=(-12.0, 30.5, 7.25), direction=rotation
    )
    array = np.zeros((1, 5, 4, 3), dtype=np.uint8)
    array[0, 1:4, 1:3, 1] = value
    return Volume(array=array, geometry=geometry, kind="label")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_existing_sidecar_refuses_the_write_and_nothing_is_written(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "case.json").write_text('{"labels": {"1": "kept"}}\n')
    before = _snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=r"case\.json: output exists"):
        write_volume(_labels(), tmp_path / f"case{suffix}", label_names={0: "background", 1: "liver"})
    assert _snapshot(tmp_path) == before  # no volume, sidecar untouched, no temporary files


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_existing_volume_refuses_the_write_and_no_sidecar_appears(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"case{suffix}"
    target.write_bytes(b"not ours")
    with pytest.raises(OutputExistsError, match=rf"case{suffix}: output exists"):
        write_volume(_labels(), target, label_names={1: "liver"})
    assert _snapshot(tmp_path) == {target.name: b"not ours"}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_overwrite_replaces_volume_and_sidecar(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"case{suffix}"
    write_volume(_labels(1), target, label_names={1: "old"})
    write_volume(_labels(2), target, overwrite=True, label_names={0: "background", 2: "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "case.json"])
    sidecar = json.loads((tmp_path / "case.json").read_text())
    assert sidecar["labels"] == {"0": "background", "2": "new"}
    back = load_volume(target, kind="label")
    assert np.array_equal(back.array, _labels(2).array) and back.meta["sidecar"] == sidecar
    assert sidecar["geometry"] == _labels().geometry.to_dict()
    # the grid, as independent readers see it
    params = _labels().geometry.to_itk()
    image = sitk.ReadImage(str(target))
    assert np.allclose(image.GetSpacing(), params["spacing"]) and np.allclose(image.GetOrigin(), params["origin"])
    assert np.allclose(image.GetDirection(), params["direction"])
    if suffix == ".nii.gz":
        assert np.allclose(nib.load(str(target)).affine, _labels().geometry.affine, atol=1e-5)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failure_while_writing_leaves_both_old_files(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"case{suffix}"
    write_volume(_labels(1), target, label_names={1: "old"})
    before = _snapshot(tmp_path)
    # NIfTI: the sidecar fails after the volume was written; NRRD: already its Slicer segment metadata
    with pytest.raises(TypeError):
        write_volume(_labels(2), target, overwrite=True, label_names={2: object()})  # type: ignore[dict-item]
    assert _snapshot(tmp_path) == before


def test_without_label_names_an_existing_sidecar_is_not_an_obstacle(tmp_path: Path) -> None:
    (tmp_path / "case.json").write_text("{}\n")
    write_volume(_labels(), tmp_path / "case.nii.gz")
    assert (tmp_path / "case.json").read_text() == "{}\n" and (tmp_path / "case.nii.gz").is_file()


def test_atomic_paths_checks_every_target_again_before_renaming(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(OutputExistsError, match=r"b\.json"), atomic_paths([a, b]) as (tmp_a, tmp_b):
        tmp_a.write_text("A")
        tmp_b.write_text("B")
        b.write_text("someone else")  # appears while we write
    assert _snapshot(tmp_path) == {"b.json": b"someone else"}  # a.json not renamed either
