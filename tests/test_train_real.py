"""Real data: the PGBM DICOM studies (T1post + FLAIRreg series -> MaskTumor series) planned, validated,
trained briefly with a patient-grouped fold, interrupted and resumed.  Downsampled and tiny so it stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg.config import load_config
from medseg.data.plan import load_plan
from medseg.models.package import load_model
from medseg.train import checkpoint as ckpt
from medseg.train import loop
from medseg.train.cli import main

REPO = Path(__file__).resolve().parents[1]
PGBM_YAML = REPO / "configs" / "datasets" / "pgbm.yaml"


def test_pgbm_dicom_plan_train_resume(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (shared_data / "pgbm-brain-tumor-progression").is_dir()
    # 1. the automatic plan of the real studies (default config): anisotropic 6.5 mm slices
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(PGBM_YAML), "-o", str(plan_path), "--quiet"]) == 0
    plan = load_plan(plan_path)
    assert [c.name for c in plan.channels] == ["T1post", "FLAIRreg"]
    assert all(c.scheme == "zscore" for c in plan.channels)
    assert plan.labels == {0: "background", 1: "tumour"}
    assert plan.fingerprint["num_cases"] == 4 and plan.fingerprint["anisotropic"] is True
    assert np.isclose(plan.target_spacing[2], 6.5, atol=1e-3) and plan.target_spacing[0] < 0.7
    strides = plan.network.strides
    assert strides != "auto" and strides[0] == (2, 2, 1)  # thick slices are not pooled first
    fraction = plan.fingerprint["class_fraction"]
    assert isinstance(fraction, list) and 0 < fraction[1] < 0.01  # tumour is ~0.1 % of the voxels

    # 2. train a tiny net at 2 mm on one patient, validate on the other (fold by patient), crash, resume
    config = load_config(
        REPO / "configs" / "pgbm.yaml",
        overrides={
            "preprocess.target_spacing": [2.0, 2.0, 6.5],
            "preprocess.patch_size": [32, 32, 8],
            "model.name": "unet",
            "model.channels": [4, 8, 16],
            "model.strides": [[2, 2, 1], 2],
            "model.num_res_units": 0,
            "model.deep_supervision": False,
            "train.batch_size": 2,
            "train.iterations": 4,
            "train.checkpoint_every": 2,
            "train.val_every": 4,
            "train.fold": 0,
            "train.folds": 2,
            "train.precision": "fp32",
            "train.cache": "disk",  # the resumed run reuses the decoded cases
            "infer.overlap": 0.0,
            "infer.sw_batch_size": 8,
        },
    )

    def crash(step: int) -> None:
        if step == 3:
            raise RuntimeError("simulated crash")

    out = tmp_path / "model"
    monkeypatch.setattr(loop, "on_iteration", crash)
    with pytest.raises(RuntimeError):
        loop.train(PGBM_YAML, config=config, out_dir=out, progress=False)
    assert ckpt.load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 2
    monkeypatch.setattr(loop, "on_iteration", None)
    loop.train(PGBM_YAML, config=None, out_dir=out, resume=True, progress=False)
    split = json.loads((out / "splits.json").read_text())
    assert {split["groups"][c] for c in split["train"]} != {split["groups"][c] for c in split["val"]}
    assert len({split["groups"][c] for c in split["val"]}) == 1 and len(split["val"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val_dice"]) == {"tumour"} and len(metrics["val_case_dice"]) == 2
    assert 0.0 <= metrics["val_dice"]["tumour"] <= 1.0
    rows = (out / "train_log.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[-1].split(",")[5] != ""  # 4 iterations, validation on the last
    model = load_model(out)
    assert (
        model.plan.network.in_channels == 2 and yaml.safe_load((out / "config.yaml").read_text())["train"]["fold"] == 0
    )
