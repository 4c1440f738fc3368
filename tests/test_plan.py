"""Planning: target spacing, topology, memory estimate, normalisation, the editable plan YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.config import load_config
from medseg.data.datasets import read_dataset
from medseg.data.plan import (
    NetworkPlan,
    estimate_activation_bytes,
    load_plan,
    make_plan,
    plan_target_spacing,
    plan_topology,
    ras_spacing,
    save_plan,
)
from medseg.data.transforms import normalize_channel
from medseg.errors import ConfigError
from medseg.io import load_volume
from medseg.models.networks import build_network


def test_target_spacing_is_the_median_unless_strongly_anisotropic() -> None:
    spacings = np.array([[0.8, 0.8, 1.0], [0.7, 0.7, 1.2], [0.9, 0.9, 1.1]])
    shapes = np.array([[200, 200, 150]] * 3)
    target, aniso = plan_target_spacing(spacings, shapes)
    assert not aniso and np.allclose(target, [0.8, 0.8, 1.1])
    # thick slices (median 5 mm) with one 1.5 mm case: the coarse axis takes the 10th percentile
    spacings = np.array([[0.7, 0.7, 5.0]] * 7 + [[0.7, 0.7, 1.5], [0.7, 0.7, 5.0], [0.7, 0.7, 6.0]])
    shapes = np.array([[512, 512, 40]] * 10)
    target, aniso = plan_target_spacing(spacings, shapes)
    assert aniso and np.allclose(target[:2], 0.7)
    assert np.isclose(target[2], np.percentile(spacings[:, 2], 10)) and target[2] < 5.0
    # anisotropic spacing but not fewer voxels along that axis: plain median (nnU-Net's second condition)
    target, aniso = plan_target_spacing(spacings, np.array([[128, 128, 128]] * 10))
    assert not aniso and np.isclose(target[2], 5.0)


def test_topology_follows_nnunet_pooling_rules() -> None:
    iso = plan_topology((1.0, 1.0, 1.0), (128, 128, 128))
    assert iso.strides == [(2, 2, 2)] * 5 and iso.kernel_sizes == [(3, 3, 3)] * 6
    # 0.7 x 0.7 x 5 mm: z is not pooled and has 1-kernels until in-plane spacing comes within 2x of it
    aniso = plan_topology((0.7, 0.7, 5.0), (320, 320, 20))
    assert aniso.strides[:3] == [(2, 2, 1), (2, 2, 1), (2, 2, 2)]  # 2.8 mm in-plane is within 2x of 5 mm
    assert aniso.kernel_sizes[:3] == [(3, 3, 1), (3, 3, 1), (3, 3, 3)]
    for topo in (iso, aniso):
        assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisor, strict=True))
        # no axis is pooled below 4 voxels
        assert all(p // d >= 4 for p, d in zip(topo.patch_size, topo.divisor, strict=True))


def _saved_activation_bytes(network: torch.nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("name", "res", "spacing", "patch"),
    [
        ("dynunet", 0, (1.0, 1.0, 1.0), (48, 48, 48)),
        ("dynunet", 1, (0.7, 0.7, 2.5), (64, 64, 24)),
        ("unet", 1, (1.0, 1.0, 1.0), (48, 48, 48)),
        ("unet", 2, (0.7, 0.7, 5.0), (96, 96, 16)),
    ],
)
def test_memory_estimate_matches_autograd_saved_tensors(name: str, res: int, spacing: tuple, patch: tuple) -> None:
    topo = plan_topology(spacing, patch)
    feats = tuple(min(8 * 2**i, 64) for i in range(len(topo.strides) + 1))
    net_plan = NetworkPlan(
        name=name,
        channels=feats,
        strides=tuple(topo.strides),
        kernel_sizes=tuple(topo.kernel_sizes),
        num_res_units=res,
        in_channels=2,
        out_channels=3,
    )
    network = build_network(net_plan).train()
    measured = _saved_activation_bytes(network, torch.zeros(1, 2, *topo.patch_size))
    estimate = estimate_activation_bytes(net_plan, topo.patch_size)
    assert 0.8 < estimate / measured < 1.25
    assert estimate_activation_bytes(net_plan, topo.patch_size, batch_size=2) == pytest.approx(2 * estimate)


def test_plan_uses_median_spacing_and_ct_statistics(sample_root: Path, tmp_path: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    plan = make_plan(info, load_config())
    spacings = [ras_spacing(load_volume(c.images[0]).geometry.affine) for c in info.training]
    assert np.allclose(plan.target_spacing, np.median(spacings, axis=0))
    norm = plan.channels[0]
    assert norm.scheme == "ct" and norm.clip is not None
    assert -200 < norm.clip[0] < norm.mean < norm.clip[1] < 600  # foreground HU of soft tissue and organs
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.network.divisor, strict=True))
    assert plan.batch_size is not None and plan.batch_size >= 2
    save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan


def test_memory_budget_shrinks_patch_and_sets_batch(sample_root: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    from medseg.data.datasets import scan_dataset

    scans = scan_dataset(info.training, info)
    big = make_plan(info, load_config(overrides={"preprocess.memory_budget_gb": 8}), scans=scans)
    small = make_plan(info, load_config(overrides={"preprocess.memory_budget_gb": 0.05}), scans=scans)
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    for plan, budget in ((big, 8), (small, 0.05)):
        per_patch = float(plan.fingerprint["activation_gb_per_patch"])  # type: ignore[arg-type]
        assert plan.batch_size is not None and 2 * per_patch <= budget * 1.001
    with pytest.raises(ConfigError, match="too small"):
        make_plan(info, load_config(overrides={"preprocess.memory_budget_gb": 1e-5}), scans=scans)


def test_mr_zscore_uses_the_foreground_when_the_background_is_constant() -> None:
    from medseg.data.plan import ChannelNorm

    x = torch.zeros(1, 10, 10, 10)
    x[0, 2:8, 2:8, 2:8] = torch.linspace(100, 300, 216).reshape(6, 6, 6)
    fg = normalize_channel(x, ChannelNorm(name="T1", scheme="zscore", region="foreground"))
    inside = fg[x > 0]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std(correction=0)) - 1) < 1e-4
    assert float(fg[x == 0].abs().max()) == 0.0
    whole = normalize_channel(x, ChannelNorm(name="T1", scheme="zscore"))
    assert abs(float(whole.mean())) < 1e-5 and float(whole[x == 0].max()) < 0


def test_edited_plan_is_validated(sample_root: Path, tmp_path: Path) -> None:
    info = read_dataset(sample_root / "Dataset001_CTPhantom")
    config = load_config(overrides={"model.channels": [8, 16, 32], "model.strides": [2, 2]})
    path = save_plan(make_plan(info, config), tmp_path / "plan.yaml")
    text = path.read_text()
    assert text.startswith("# medseg plan")
    data = yaml.safe_load(text)
    data["patch_size"] = [30, 32, 16]  # not a multiple of the strides
    data["channels"][0]["scheme"] = "ct"
    data["channels"][0]["clip"] = [400, 100]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert "patch_size" in str(err.value) or "clip" in str(err.value)
    data["channels"][0]["clip"] = [-100, 400]
    data["patch_size"] = [48, 48, 16]
    data["target_spacing"] = [3.0, 3.0, 3.0]
    path.write_text(yaml.safe_dump(data))
    edited = load_plan(path)
    assert edited.patch_size == (48, 48, 16) and edited.target_spacing == (3.0, 3.0, 3.0)
