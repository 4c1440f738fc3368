"""Dataset descriptions (nnU-Net folder, YAML, CSV, DICOM series) and their validation report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.datasets import case_group, load_dataset, read_dataset, read_label, validate_dataset
from medseg.data.plan import make_plan
from medseg.data.transforms import train_transforms
from medseg.errors import DatasetError, GeometryError, reraise_medseg
from medseg.io import Geometry, Volume, load_volume, write_volume

PYRADIOMICS = "pyradiomics-data"


def test_reads_nnunet_layout(sample_root: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    assert info.channel_names == ["CT"]
    assert info.label_names == {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}
    assert [c.case_id for c in info.training] == ["ct_000", "ct_001", "ct_002", "ct_003"]
    assert all(c.label is not None for c in info.test)


def test_every_problem_is_listed(sample_root: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(sample_root / "Dataset001_CTPhantom", ds)
    (ds / "labelsTr" / "ct_001.nii.gz").unlink()
    (ds / "labelsTr" / "ct_003.nii.gz").unlink()
    with pytest.raises(DatasetError) as info:
        read_dataset(ds)
    assert "ct_001" in str(info.value) and "ct_003" in str(info.value)


def test_msd_style_labels(sample_root: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(sample_root / "Dataset001_CTPhantom", ds)
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["channel_names"]
    meta["modality"] = {"0": "CT"}
    meta["labels"] = {"0": "background", "1": "liver", "2": "kidney", "3": "lesion"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    assert read_dataset(ds).label_names[3] == "lesion"


def _two_channel_copy(sample_root: Path, tmp_path: Path) -> Path:
    """The phantom dataset with a second channel ``_0001`` (a scaled copy) declared as MR."""
    ds = tmp_path / "mc"
    shutil.copytree(sample_root / "Dataset001_CTPhantom", ds)
    for image in sorted((ds / "imagesTr").glob("*_0000.nii.gz")):
        volume = load_volume(image)
        second = Volume(volume.array * 0.5 + 10, volume.geometry)
        write_volume(second, image.with_name(image.name.replace("_0000", "_0001")))
    for image in (ds / "imagesTs").glob("*"):
        image.unlink()
    meta = json.loads((ds / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "T2"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def test_validation_reports_every_problem_of_a_multichannel_dataset(sample_root: Path, tmp_path: Path) -> None:
    ds = _two_channel_copy(sample_root, tmp_path)
    info = load_dataset(ds)
    assert info.channel_names == ["CT", "T2"] and all(len(c.images) == 2 for c in info.training)
    assert validate_dataset(info).ok
    # break four cases in four different ways
    (ds / "labelsTr" / "ct_000.nii.gz").unlink()  # missing label
    (ds / "imagesTr" / "ct_001_0001.nii.gz").unlink()  # missing channel
    label = load_volume(ds / "labelsTr" / "ct_002.nii.gz", kind="label")
    shifted = label.geometry.affine.copy()
    shifted[1, 3] += 0.5
    write_volume(
        Volume(label.array, Geometry(label.geometry.shape, shifted), kind="label"),
        ds / "labelsTr/ct_002.nii.gz",
        overwrite=True,
    )  # label off the image grid
    bad = load_volume(ds / "labelsTr" / "ct_003.nii.gz", kind="label")
    array = bad.array.copy()
    array[0, :2, :2, :2] = 7
    write_volume(Volume(array, bad.geometry, kind="label"), ds / "labelsTr" / "ct_003.nii.gz", overwrite=True)
    report = validate_dataset(load_dataset(ds))
    text = report.format()
    assert not report.ok and len(report.problems) == 4, text
    assert "ct_000: no label" in text
    assert "ct_001: channels [0] found, expected 0..1" in text
    assert "ct_002: label" in text and "not on the image grid" in text
    assert "ct_003: label" in text and "values [7] outside the declared classes" in text
    with pytest.raises(DatasetError, match="4 problem"):
        report.raise_for_problems()


def test_empty_dataset_and_unknown_description(tmp_path: Path) -> None:
    spec = tmp_path / "empty.yaml"
    spec.write_text("channels: [MR]\nlabels: {0: background, 1: tumour}\ntraining: []\n")
    report = validate_dataset(load_dataset(spec))
    assert report.problems == ["no training cases (an empty dataset)"]
    typo = tmp_path / "typo.yaml"
    typo.write_text("channels: [MR]\nlabels: {0: background}\ntrainig: []\n")
    with pytest.raises(DatasetError, match="trainig"):
        load_dataset(typo)
    with pytest.raises(DatasetError, match="not a dataset"):
        load_dataset(tmp_path)


def test_yaml_with_csv_cases_on_real_nrrd_pairs(shared_data: Path, tmp_path: Path) -> None:
    """A YAML description whose cases come from a CSV; real NRRD image/label pairs; all problems listed."""
    src = shared_data / PYRADIOMICS
    label = load_volume(src / "brain1_label.nrrd", kind="label")
    write_volume(Volume(label.array * 2, label.geometry, kind="label"), tmp_path / "brain1_label_x2.nrrd")
    rows = [
        "case_id,group,image_MR,label,split",
        f"b1,patA,{src / 'brain1_image.nrrd'},{src / 'brain1_label.nrrd'},train",
        f"b2,patB,{src / 'brain2_image.nrrd'},{src / 'brain2_label.nrrd'},val",
        f"mix,patC,{src / 'brain2_image.nrrd'},{src / 'breast1_label.nrrd'},train",
        f"gone,patD,{tmp_path / 'missing.nrrd'},{src / 'brain1_label.nrrd'},train",
        f"x2,patA,{src / 'brain1_image.nrrd'},brain1_label_x2.nrrd,train",
    ]
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "ds.yaml").write_text("channels: [MR]\nlabels: {0: background, 1: lesion}\ntraining: cases.csv\n")
    info = load_dataset(tmp_path / "ds.yaml")
    assert [c.case_id for c in info.training] == ["b1", "mix", "gone", "x2"]
    assert [c.case_id for c in info.validation] == ["b2"]
    assert case_group(info.training[3], None) == "patA"
    report = validate_dataset(info)
    text = report.format()
    assert len(report.problems) == 3, text
    assert "mix: label" in text and "breast1_label.nrrd is not on the image grid" in text
    assert "gone: channel 0:" in text and "missing.nrrd" in text
    assert "x2: label" in text and "values [2] outside the declared classes [0, 1]" in text
    # the same list as a bare CSV: label names are inferred from the values found
    bare = load_dataset(tmp_path / "cases.csv")
    assert bare.channel_names == ["MR"] and not bare.labels_declared
    assert bare.label_names == {0: "background", 1: "label_1", 2: "label_2"}


def test_yaml_discovers_dicom_series_cases(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "pgbm-brain-tumor-progression"
    spec = tmp_path / "pgbm.yaml"
    spec.write_text(
        f"channels: [T1post, FLAIRreg]\nlabels: {{0: background, 1: tumour}}\nroot: {root}\n"
        "group_pattern: '^(PGBM-\\d+)'\n"
        "training: {discover: 'PGBM-001/*', image: ['*-T1post-*', '*-FLAIRreg-*'], label: '*-MaskTumor-*'}\n"
    )
    info = load_dataset(spec)
    assert len(info.training) == 2 and all(case_group(c, info.group_pattern) == "PGBM-001" for c in info.training)
    case = info.training[0]
    assert case.images[0].is_dir() and "T1post" in case.images[0].name and "MaskTumor" in str(case.label)
    label = read_label(case.label)
    assert label.kind == "label" and np.issubdtype(label.array.dtype, np.integer)
    assert set(np.unique(label.array)) == {0, 1}
    report = validate_dataset(info)
    assert report.ok, report.format()
    assert report.scans[0].label_counts[1] > 1000  # real tumour masks
    # a pattern that matches nothing is a listed problem, not a crash
    spec.write_text(spec.read_text().replace("*-MaskTumor-*", "*-NoSuchMask-*"))
    report = validate_dataset(load_dataset(spec))
    assert len(report.problems) == 2 and all("nothing matches '*-NoSuchMask-*'" in p for p in report.problems)


def test_label_off_the_image_grid_is_rejected_by_the_transforms(sample_root: Path, tmp_path: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    case = info.training[0]
    label = load_volume(case.label, kind="label")
    affine = label.geometry.affine.copy()
    affine[0, 3] += 2.0
    shifted = Volume(label.array, type(label.geometry)(shape=label.geometry.shape, affine=affine), kind="label")
    path = write_volume(shifted, tmp_path / "shifted.nii.gz")
    config = load_config(
        overrides={"preprocess.patch_size": [32, 32, 16], "model.channels": [8, 16, 32], "model.strides": [2, 2]}
    )
    plan = make_plan(info, config)
    with pytest.raises(GeometryError, match="not on the same grid"), reraise_medseg():
        train_transforms(plan, config.train)({"image": [str(case.images[0])], "label": str(path)})
