"""Training: exact resume, atomic checkpoints, k-fold groups, CLI errors, DynUNet, DDP (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medseg.config import Config, load_config
from medseg.data.datasets import Case, load_dataset
from medseg.errors import ModelError
from medseg.infer.predictor import Predictor
from medseg.models.package import load_model
from medseg.train import checkpoint as ckpt
from medseg.train import loop
from medseg.train.cli import main
from medseg.train.splits import kfold_split

REPO = Path(__file__).resolve().parents[1]


def _make_tiny_dataset(root: Path, *, cases: int = 4, shape: tuple[int, int, int] = (24, 24, 16)) -> Path:
    """nnU-Net layout, 2 channels (``_0000``, ``_0001``), labels 0-2; two 'patients' p0, p1 with two studies each."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        for value, radius in ((1, 6.0), (2, 3.0)):
            centre = rng.uniform([6, 6, 4], [18, 18, 12])
            label[np.linalg.norm((grid - centre) * [1, 1, 2], axis=-1) < radius] = value
        case = f"p{i // 2}s{i % 2}"
        for c, gain in enumerate((100.0, -60.0)):
            image = gain * label + rng.normal(0, 20, shape) + 50 * c
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
    meta = {"name": "tiny", "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "Dataset002_Tiny")


TINY = {
    "preprocess.patch_size": [16, 16, 8],
    "model.channels": [4, 8],
    "model.strides": [2],
    "model.num_res_units": 0,
    "train.iterations": 6,
    "train.batch_size": 2,
    "train.samples_per_volume": 1,
    "train.checkpoint_every": 2,
    "train.precision": "fp32",
    "train.flip_axes": [0, 1, 2],
    "train.val_fraction": 0.0,
}


def _config(**extra: Any) -> Config:
    return load_config(overrides={**TINY, **{k.replace("__", "."): v for k, v in extra.items()}})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "weights.pt", weights_only=True)


def _losses(model_dir: Path) -> list[str]:
    return [line.split(",")[1] for line in (model_dir / "train_log.csv").read_text().splitlines()[1:]]


def test_resume_after_crash_and_after_sigint_is_bit_identical(
    tiny_ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config()
    reference = loop.train(tiny_ds, config=config, out_dir=tmp_path / "a", progress=False)

    def crash(step: int) -> None:
        if step == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop, "on_iteration", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(tiny_ds, config=config, out_dir=tmp_path / "b", progress=False)
    assert ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["iteration"] == 2
    assert not (tmp_path / "b" / "weights.pt").exists()

    def ctrl_c(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the iteration, save, stop

    monkeypatch.setattr(loop, "on_iteration", ctrl_c)
    with pytest.raises(loop.TrainingInterrupted):
        loop.train(tiny_ds, config=None, out_dir=tmp_path / "b", resume=True, progress=False)
    assert ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["iteration"] == 4
    monkeypatch.setattr(loop, "on_iteration", None)
    resumed = loop.train(tiny_ds, config=None, out_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(reference) == _losses(resumed) and len(_losses(resumed)) == 6
    # resuming with a different config is refused, naming the key
    with pytest.raises(Exception, match=r"train\.learning_rate"):
        loop.train(tiny_ds, config=_config(train__learning_rate=0.1), out_dir=tmp_path / "b", resume=True)


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint(path, {"iteration": 1, "model": {"w": torch.ones(3)}, "rng": ckpt.capture_rng()})
    before = path.read_bytes()

    def killed_mid_write(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(ckpt.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"iteration": 2, "model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert ckpt.load_checkpoint(path)["iteration"] == 1
    # a truncated file (e.g. copied while being written elsewhere) is a clear error
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(ModelError, match="not a medseg training checkpoint"):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trips() -> None:
    state = ckpt.capture_rng()
    expected = (np.random.rand(), torch.rand(1).item())  # noqa: NPY002 - the global generator on purpose
    ckpt.restore_rng(state)
    assert (np.random.rand(), torch.rand(1).item()) == expected  # noqa: NPY002


def test_kfold_keeps_patients_together() -> None:
    cases = [Case(f"PAT{p:02d}_study{s}", []) for p in range(7) for s in range(1 + p % 3)]
    pattern = r"^(PAT\d+)_"
    seen: list[str] = []
    for fold in range(3):
        train, val = kfold_split(cases, folds=3, fold=fold, seed=1, group_pattern=pattern)
        patients_val = {c.case_id.split("_")[0] for c in val}
        patients_train = {c.case_id.split("_")[0] for c in train}
        assert patients_val and not patients_val & patients_train
        assert len(train) + len(val) == len(cases)
        seen += [c.case_id for c in val]
    assert sorted(seen) == sorted(c.case_id for c in cases)  # every case validated exactly once
    with pytest.raises(Exception, match="at least 9 patients"):
        kfold_split(cases, folds=9, fold=0, seed=1, group_pattern=pattern)


def test_cli_plan_edit_train_with_plan_and_fold(tiny_ds: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "tiny.yaml"
    config = _config(train__iterations=2, train__val_every=2, train__group_pattern=r"^(p\d)")
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(tiny_ds), "-o", str(plan_path), "--config", str(cfg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0 problem(s)" in out and "plan written" in out
    assert main(["plan", str(tiny_ds), "-o", str(plan_path), "--quiet"]) == 2  # exists
    plan = yaml.safe_load(plan_path.read_text())
    plan["patch_size"] = [8, 8, 8]  # a user edit
    plan_path.write_text(yaml.safe_dump(plan))
    model = tmp_path / "model"
    argv = ["train", str(tiny_ds), "--out", str(model), "--config", str(cfg), "--plan", str(plan_path)]
    assert main([*argv, "--fold", "1", "--folds", "2", "--quiet"]) == 0
    saved = yaml.safe_load((model / "plan.yaml").read_text())
    assert saved["patch_size"] == [8, 8, 8]
    split = json.loads((model / "splits.json").read_text())
    assert split["method"] == "fold 1 of 2" and len(split["val"]) == 2
    assert len({split["groups"][c] for c in split["val"]}) == 1  # one patient's two studies
    metrics = json.loads((model / "metrics.json").read_text())
    assert set(metrics["val_dice"]) == {"a", "b"} and metrics["val_iteration"] == 2
    log = (model / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("iteration,loss,lr,seconds,data_wait,val_mean_dice,val_dice_a,val_dice_b")
    assert {"best.pt", "last.pt"} <= {p.name for p in (model / "checkpoints").iterdir()}
    assert main([*argv, "--quiet"]) == 2  # refuses to overwrite the model
    assert "output exists" in capsys.readouterr().err
    assert load_model(model).plan.patch_size == (8, 8, 8)


def test_bad_dataset_and_config_fail_cleanly(tiny_ds: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ds, broken)
    (broken / "labelsTr" / "p0s1.nii.gz").unlink()
    nib.save(
        nib.Nifti1Image(np.zeros((24, 24, 15), np.uint8), np.diag([1.5, 1.5, 3.0, 1])), broken / "labelsTr/p1s0.nii.gz"
    )
    (broken / "imagesTr" / "p1s1_0001.nii.gz").unlink()
    out = tmp_path / "model"
    assert main(["train", str(broken), "--out", str(out), "--iterations", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "p0s1: no label" in err and "p1s0: label" in err and "p1s1: channels [0] found" in err
    assert not out.exists() or not any(out.rglob("*"))  # nothing half-written
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  iteratons: 5\n")
    assert main(["train", str(tiny_ds), "--out", str(out), "--config", str(typo), "--quiet"]) == 2
    assert "train.iteratons" in capsys.readouterr().err
    assert main(["train", str(tiny_ds), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_dynunet_with_deep_supervision_trains_and_predicts(tiny_ds: Path, tmp_path: Path) -> None:
    config = _config(
        model__name="dynunet",
        model__channels=[4, 8, 16],
        model__strides=[2, [2, 2, 1]],
        model__deep_supervision=True,
        train__iterations=2,
        train__batch_size=2,
        train__cache="disk",
    )
    model_dir = loop.train(tiny_ds, config=config, out_dir=tmp_path / "m", progress=False)
    model = load_model(model_dir)
    assert model.plan.network.name == "dynunet" and model.plan.network.kernel_sizes != "auto"
    assert any((tmp_path / "m" / "cache").iterdir())  # PersistentDataset cache on disk
    info = load_dataset(tiny_ds)
    from medseg.io import load_volume

    channels = [load_volume(p) for p in info.training[0].images]
    pred = Predictor(model).predict(channels)
    assert pred.geometry.allclose(channels[0].geometry) and pred.array.max() <= 2


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_ds: Path, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes under gloo, vs one process with the same global batch (per-sample Dice, SGD)."""
    config = _config(
        train__iterations=4,
        train__batch_size=4,
        train__batch_dice=False,
        train__optimizer="sgd",
        train__learning_rate=0.01,
        train__checkpoint_every=0,
    )
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "medseg.train.cli",
        "train",
        str(tiny_ds),
        "--out",
        str(tmp_path / "ddp"),
        "--config",
        str(cfg),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    single = loop.train(tiny_ds, config=config, out_dir=tmp_path / "one", progress=False)
    a, b = _weights(single), _weights(tmp_path / "ddp")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert _losses(single) == _losses(tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_ds: Path, tmp_path: Path) -> None:
    config = _config(train__iterations=40, train__checkpoint_every=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "medseg.train.cli",
        "train",
        str(tiny_ds),
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and ckpt.load_checkpoint(last)["iteration"] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, possibly mid-write
    proc.wait()
    state = ckpt.load_checkpoint(last)  # still a valid checkpoint
    assert 5 <= state["iteration"] < 40
    loop.train(tiny_ds, config=None, out_dir=out, resume=True, progress=False)
    reference = loop.train(tiny_ds, config=config, out_dir=tmp_path / "ref", progress=False)
    a, b = _weights(reference), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
