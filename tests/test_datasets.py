from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.datasets import read_dataset
from medseg.data.plan import load_plan, make_plan, ras_spacing, save_plan
from medseg.data.transforms import train_transforms
from medseg.errors import DatasetError, GeometryError, reraise_medseg
from medseg.io import Volume, load_volume, write_volume


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


def test_plan_uses_median_spacing_and_ct_statistics(sample_root: Path, tmp_path: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    plan = make_plan(info, load_config())
    spacings = [ras_spacing(load_volume(c.images[0]).geometry.affine) for c in info.training]
    assert np.allclose(plan.target_spacing, np.median(spacings, axis=0))
    norm = plan.channels[0]
    assert norm.scheme == "ct" and norm.clip is not None
    assert -200 < norm.clip[0] < norm.mean < norm.clip[1] < 600  # foreground HU of soft tissue and organs
    assert all(p % 8 == 0 for p in plan.patch_size)
    save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan


def test_label_off_the_image_grid_is_rejected(sample_root: Path, tmp_path: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    case = info.training[0]
    label = load_volume(case.label, kind="label")
    affine = label.geometry.affine.copy()
    affine[0, 3] += 2.0
    shifted = Volume(label.array, type(label.geometry)(shape=label.geometry.shape, affine=affine), kind="label")
    path = write_volume(shifted, tmp_path / "shifted.nii.gz")
    plan = make_plan(info, load_config())
    with pytest.raises(GeometryError, match="not on the same grid"), reraise_medseg():
        train_transforms(plan, load_config().train)({"image": [str(case.images[0])], "label": str(path)})
