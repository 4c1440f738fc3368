"""`medseg convert` glue for annotations (RTSTRUCT, polygon JSON, label -> RTSTRUCT) and the label-map writers."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError, OutputExistsError
from medseg.io import read_image_file
from medseg.io.annotations import add_annotation_arguments, convert_annotation, write_label_maps
from medseg.io.rtstruct import labels_to_rtstruct, load_reference_series
from medseg.io.volume import Geometry, Volume
from medseg.sample_data import write_ct_dicom_series

SHAPE = (20, 16, 4)


def _parser() -> argparse.ArgumentParser:
    """The shape of the `medseg convert` sub-parser the annotation options are added to."""
    parser = argparse.ArgumentParser(prog="medseg convert")
    parser.add_argument("input")
    parser.add_argument("output_dir")
    parser.add_argument("--overwrite", action="store_true")
    add_annotation_arguments(parser)
    return parser


def _run(*argv: str) -> int | None:
    return convert_annotation(_parser().parse_args([str(a) for a in argv]))


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:6, 2:6, 1:3] = 1  # organ, one component
    labels[10:13, 3:5, 1] = 2  # lesion component 1
    labels[10:13, 9:12, 2] = 2  # lesion component 2 (not touching, 26-connectivity)
    labels[0:20, 14:16, 3] = 3  # strip on the border
    return labels


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DICOM CT series folder and an RTSTRUCT (written by our writer) of `_labels()` beside it."""
    root = tmp_path_factory.mktemp("study")
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # sagittal-like slices
    geometry = Geometry.from_itk(shape=SHAPE, spacing=(0.9, 1.1, 2.0), origin=(-5.0, 10.0, 30.0), direction=direction)
    image = Volume(array=np.zeros((1, *SHAPE), np.float32), geometry=geometry)
    series = write_ct_dicom_series(image, root / "ct", case_id="cli")
    labels = Volume(array=_labels()[None], geometry=geometry, kind="label")
    rs = labels_to_rtstruct(labels, series, root / "RS.dcm", label_names={1: "organ", 2: "lesion", 3: "strip"})
    return series, rs


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_rtstruct_to_nifti_keeps_the_series_geometry(study: tuple[Path, Path], tmp_path: Path) -> None:
    series, rs = study
    assert _run(rs, tmp_path / "out", "--reference", series) == 0
    out = tmp_path / "out" / "RS.nii.gz"
    written, dicom = sitk.ReadImage(str(out)), _sitk_series(series)  # independent readers
    assert written.GetSize() == dicom.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), dicom.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), dicom.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), dicom.GetDirection(), atol=1e-6)
    data = np.asarray(nib.load(str(out)).dataobj)
    sidecar = json.loads((tmp_path / "out" / "RS.json").read_text())
    assert sidecar["labels"] == {"1": "organ", "2": "lesion", "3": "strip"}
    assert sidecar["overlap_policy"] == "smaller" and sidecar["pixel_rule"] == "centre"
    for value in (1, 2, 3):
        np.testing.assert_array_equal(data == value, _labels() == value)


def test_folder_holding_series_and_rtstruct_and_instance_outputs(study: tuple[Path, Path], tmp_path: Path) -> None:
    series, rs = study
    folder = tmp_path / "study"
    shutil.copytree(series, folder / "ct")
    shutil.copy(rs, folder / "RS.dcm")
    out = tmp_path / "out"
    assert _run(folder, out, "--instances", "--panoptic", "--to", "nrrd") == 0
    classes = read_image_file(out / "RS.nrrd", kind="label")
    instances = read_image_file(out / "RS_instances.nrrd", kind="label")
    panoptic = read_image_file(out / "RS_panoptic.nrrd", kind="label")
    assert classes.geometry.allclose(instances.geometry) and classes.geometry.allclose(panoptic.geometry)
    table = json.loads((out / "RS_instances.json").read_text())["instances"]
    lesion = sorted(int(k) for k, v in table.items() if v["class_name"] == "lesion")
    assert len(table) == 4 and len(lesion) == 2  # organ, two lesion components, strip
    codes = sorted(int(c) for c in np.unique(panoptic.array) if c)
    assert codes == [1001, 2001, 2002, 3001]
    segments = json.loads((out / "RS_panoptic.json").read_text())["segments"]
    assert (
        segments["2002"]["class_name"] == "lesion"
        and json.loads((out / "RS_panoptic.json").read_text())["divisor"] == 1000
    )
    np.testing.assert_array_equal(panoptic.array[0] // 1000, classes.array[0])


def test_label_to_rtstruct_and_back_through_the_cli(study: tuple[Path, Path], tmp_path: Path) -> None:
    series, _ = study
    geometry = load_reference_series(series).geometry
    label_file = tmp_path / "pred.nii.gz"
    nib.save(nib.Nifti1Image(_labels(), geometry.affine), str(label_file))
    (tmp_path / "pred.json").write_text(json.dumps({"labels": {"1": "organ", "2": "lesion", "3": "strip"}}))
    assert _run(label_file, tmp_path / "rt", "--to", "rtstruct", "--reference", series) == 0
    rs = tmp_path / "rt" / "pred_rtstruct.dcm"
    assert _run(rs, tmp_path / "back.nii.gz", "--reference", series) == 0
    back = np.asarray(nib.load(str(tmp_path / "back.nii.gz")).dataobj)
    np.testing.assert_array_equal(back, _labels())
    with pytest.raises(OutputExistsError):
        _run(label_file, tmp_path / "rt", "--to", "rtstruct", "--reference", series)
    assert _run(label_file, tmp_path / "rt", "--to", "rtstruct", "--reference", series, "--overwrite") == 0
    with pytest.raises(InputError, match="needs --reference"):
        _run(label_file, tmp_path / "rt2", "--to", "rtstruct")


def test_polygon_json_with_a_nifti_reference(tmp_path: Path) -> None:
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -30.0]
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 3), np.int16), affine), str(image))
    doc = {
        "format": "medseg-polygons",
        "coordinates": "voxel",
        "polygons": [
            {"label": "cell", "object_id": "a", "slice": 1, "points": [[0.5, 0.5], [3.5, 0.5], [3.5, 3.5], [0.5, 3.5]]},
            {"label": "cell", "object_id": "b", "slice": 1, "points": [[5.5, 5.5], [8.5, 5.5], [8.5, 8.5], [5.5, 8.5]]},
        ],
    }
    (tmp_path / "cells.json").write_text(json.dumps(doc))
    assert _run(tmp_path / "cells.json", tmp_path / "out", "--reference", image, "--instances") == 0
    semantic = nib.load(str(tmp_path / "out" / "cells.nii.gz"))
    instances = nib.load(str(tmp_path / "out" / "cells_instances.nii.gz"))
    np.testing.assert_allclose(semantic.affine, affine)
    np.testing.assert_allclose(instances.affine, affine)
    assert np.asarray(semantic.dataobj).sum() == 18 and sorted(np.unique(np.asarray(instances.dataobj))) == [0, 1, 2]
    table = json.loads((tmp_path / "out" / "cells_instances.json").read_text())["instances"]
    assert table == {
        "1": {"class": 1, "class_name": "cell", "object_id": "a"},
        "2": {"class": 1, "class_name": "cell", "object_id": "b"},
    }
    with pytest.raises(InputError, match="need --reference"):
        _run(tmp_path / "cells.json", tmp_path / "out2")


def test_non_annotations_are_left_to_the_generic_converter(study: tuple[Path, Path], tmp_path: Path) -> None:
    series, _ = study
    assert _run(series, tmp_path / "out") is None  # a plain DICOM series
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(image))
    assert _run(image, tmp_path / "out") is None


def test_partial_flag_and_failures_in_a_folder(study: tuple[Path, Path], tmp_path: Path) -> None:
    series, rs = study
    folder = tmp_path / "study"
    shutil.copytree(series, folder / "ct")
    shutil.copy(rs, folder / "RS_good.dcm")
    (folder / "ct" / sorted(p.name for p in (folder / "ct").iterdir())[1]).unlink()  # drop slice 1: non-uniform
    with pytest.raises(InputError, match="non-uniform slice spacing"):
        _run(folder / "RS_good.dcm", tmp_path / "out")
    # A series reduced to slices 0 and 1 (uniform), with contours referencing slices 2 and 3 missing.
    short = tmp_path / "short"
    short.mkdir()
    reference = load_reference_series(series)
    keep = set(reference.sop_instance_uids[:2])
    import pydicom

    for p in series.iterdir():
        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID in keep:
            shutil.copy(p, short / p.name)
    with pytest.raises(InputError, match="missing from the series"):
        _run(rs, tmp_path / "o1", "--reference", short)
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").iterdir())
    assert _run(rs, tmp_path / "o2", "--reference", short, "--partial") == 0
    data = np.asarray(nib.load(str(tmp_path / "o2" / "RS.nii.gz")).dataobj)
    np.testing.assert_array_equal(data, _labels()[:, :, :2])
    # Several RTSTRUCTs in one folder: a bad one is reported, the others are converted, exit code 1.
    two = tmp_path / "two"
    shutil.copytree(series, two / "ct")
    shutil.copy(rs, two / "A.dcm")
    bad = pydicom.dcmread(rs)
    bad.ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    bad.save_as(two / "B.dcm")
    assert _run(two, tmp_path / "o3") == 1
    assert (tmp_path / "o3" / "A.nii.gz").is_file() and not (tmp_path / "o3" / "B.nii.gz").exists()


def test_write_label_maps_writes_nothing_when_a_target_exists(tmp_path: Path) -> None:
    geometry = Geometry(shape=SHAPE, affine=np.eye(4))
    semantic = Volume(array=_labels()[None], geometry=geometry, kind="label")
    ids = Volume(array=(_labels() > 0).astype(np.int32)[None], geometry=geometry, kind="label")
    (tmp_path / "x_instances.nii.gz").write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        write_label_maps(semantic, tmp_path / "x.nii.gz", label_names={1: "a"}, instances=ids, instance_table={1: 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_instances.nii.gz"]
    assert (tmp_path / "x_instances.nii.gz").read_bytes() == b"keep"


def test_options_fit_the_generic_convert_parser(study: tuple[Path, Path], tmp_path: Path) -> None:
    convert = pytest.importorskip("medseg.io.convert")
    parser = argparse.ArgumentParser(prog="medseg")
    sub = parser.add_subparsers(dest="command")
    convert.add_convert_parser(sub)
    add_annotation_arguments(sub.choices["convert"])  # must not clash with the generic options
    series, rs = study
    args = parser.parse_args(["convert", str(rs), str(tmp_path / "out"), "--reference", str(series), "--instances"])
    assert convert_annotation(args) == 0
    assert (tmp_path / "out" / "RS.nii.gz").is_file() and (tmp_path / "out" / "RS_instances.nii.gz").is_file()
