"""Dataset fingerprint -> experiment plan (nnU-Net-style, without its global paths).

The plan is the part of a model that preprocessing and network construction need:
target spacing and orientation, per-channel normalisation with its statistics, patch
and batch size, label names and the network topology.  It is a readable YAML file
(``medseg plan DATASET -o plan.yaml``) that a user may edit and pass back with
``medseg train --plan``; every model directory keeps the plan it was trained with.

Rules (following nnU-Net's ``ExperimentPlanner``, re-implemented here):

* **Target spacing**: the median spacing of the training cases.  When the coarsest
  axis is more than ``anisotropy_threshold`` (3) times coarser than the others *and*
  has fewer than 1/3 as many voxels, its target is the 10th percentile of that axis's
  spacings instead (so thick-slice outliers do not make every case coarser), but never
  finer than the other axes.
* **Normalisation**: CT channels are clipped to the 0.5-99.5 percentiles of the
  foreground (label > 0) intensities of the training set and z-scored with the
  foreground mean/std; other channels (MR, ...) are z-scored per image -- over the
  voxels above the image minimum when at least 25 % of the voxels sit at that minimum
  (a constant, e.g. skull-stripped, background), else over the whole image.
* **Patch size**: starts from a 256^3-voxel box shaped like the physical field of
  view, clipped to the median (resampled) image shape, and shrinks the axis that is
  largest relative to the median shape until the estimated training activation memory
  for a batch of 2 fits ``memory_budget_gb``; the batch size is then the largest that
  fits, capped so one batch covers at most 5 % of the dataset's voxels (at least 2).
* **Topology**: each level halves every axis whose size is still >= 8 and whose
  spacing is within a factor 2 of the finest one (anisotropic axes wait until the
  others catch up); kernel sizes are 3 on axes within a factor 2 of the finest
  spacing and 1 otherwise (nnU-Net's ``get_pool_and_conv_props``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medseg.config import Config, ModelConfig, load_yaml
from medseg.data.datasets import CaseScan, DatasetInfo, scan_dataset
from medseg.errors import ConfigError
from medseg.io.images import atomic_path
from medseg.types import PathLike

__all__ = [
    "ChannelNorm",
    "NetworkPlan",
    "Plan",
    "Topology",
    "axis_strides",
    "estimate_activation_bytes",
    "fingerprint",
    "load_plan",
    "make_plan",
    "plan_target_spacing",
    "plan_topology",
    "ras_order",
    "ras_spacing",
    "save_plan",
]

#: Samples per case and channel for the foreground intensity statistics (as nnU-Net).
SAMPLES_PER_CASE = 10_000
_SAMPLES_PER_CASE = SAMPLES_PER_CASE  # backward-compatible name
#: Smallest feature-map edge at the bottleneck (an axis is halved only while >= 2x this).
MIN_FEATURE_MAP = 4
#: Constant-background fraction above which MR z-scoring uses only the foreground.
FOREGROUND_NORM_MIN_BACKGROUND = 0.25
#: A batch covers at most this fraction of the dataset's voxels (nnU-Net's 5 % rule).
MAX_BATCH_DATASET_FRACTION = 0.05


class ChannelNorm(BaseModel):
    """Normalisation of one input channel.

    Attributes:
        name: Channel name (``CT``, ``FLAIR``, ...).
        scheme: ``ct`` (clip to ``clip`` then ``(x - mean) / std`` with dataset statistics),
            ``zscore`` (per image) or ``none``.
        region: ``zscore`` only: statistics over the whole ``image`` or the ``foreground``
            (voxels above the image minimum; the background is set to 0).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    scheme: Literal["ct", "zscore", "none"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)
    region: Literal["image", "foreground"] = "image"

    @model_validator(mode="after")
    def _ct_needs_statistics(self) -> ChannelNorm:
        if self.scheme == "ct" and (self.clip is None or self.mean is None or self.std is None):
            raise ValueError(f"channel {self.name!r}: scheme 'ct' needs clip, mean and std")
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            raise ValueError(f"channel {self.name!r}: clip must be [low, high] with low < high")
        return self


def axis_strides(values: Sequence[int | Sequence[int]]) -> list[tuple[int, int, int]]:
    """Per-level sizes as ``(x, y, z)`` triples (an int means the same on all axes)."""
    out = []
    for v in values:
        if isinstance(v, int):
            out.append((v, v, v))
        else:
            t = tuple(int(x) for x in v)
            if len(t) != 3:
                raise ValueError(f"expected one size or three (one per axis), got {v!r}")
            out.append((t[0], t[1], t[2]))
    return out


def _divisor(strides: Sequence[int | Sequence[int]]) -> tuple[int, int, int]:
    prod = np.prod(np.asarray(axis_strides(strides), dtype=int).reshape(-1, 3), axis=0) if strides else np.ones(3)
    return (int(prod[0]), int(prod[1]), int(prod[2]))


#: Limits on what a plan may ask for (a hand-edited or hostile plan.yaml is validated before anything is built).
MAX_CHANNELS = 64
MAX_CLASSES = 1024
MAX_PATCH = 1024
MAX_PARAMETERS = 1e9


class NetworkPlan(ModelConfig):
    """The network to build: the model config with every ``auto`` resolved, plus its in/out channels."""

    in_channels: int = Field(ge=1, le=MAX_CHANNELS)
    out_channels: int = Field(ge=2, le=MAX_CLASSES)

    @model_validator(mode="after")
    def _concrete(self) -> NetworkPlan:
        if self.channels == "auto" or self.strides == "auto":
            raise ValueError("a plan's network needs explicit channels and strides")
        if self.name == "dynunet" and self.kernel_sizes == "auto":
            raise ValueError("a plan's dynunet needs explicit kernel_sizes")
        if (params := self.estimated_parameters()) > MAX_PARAMETERS:
            raise ValueError(f"the network would have about {params:.3g} parameters (more than {MAX_PARAMETERS:.0e})")
        return self

    def estimated_parameters(self) -> float:
        """Rough parameter count (3x3x3 convolutions, two per level and unit, encoder + decoder)."""
        assert self.channels != "auto"
        features = [self.in_channels, *self.channels]
        convs = 2 * (1 + self.num_res_units)
        return float(sum(27 * a * b * convs for a, b in itertools.pairwise(features))) * 2

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Patch sizes must be multiples of this per axis (product of the strides)."""
        assert self.strides != "auto"
        return _divisor(self.strides)


class Plan(BaseModel):
    """Everything preprocessing and network construction need; saved as ``plan.yaml``."""

    model_config = ConfigDict(extra="forbid")

    version: int = 2
    channels: list[ChannelNorm]
    labels: dict[int, str]
    target_spacing: tuple[float, float, float]
    orientation: str = "RAS"
    patch_size: tuple[int, int, int]
    batch_size: int | None = Field(default=None, ge=1, description="planned patches per step (train.batch_size: auto)")
    network: NetworkPlan
    fingerprint: dict[str, object] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return len(self.labels)

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if sorted(self.labels) != list(range(len(self.labels))):
            raise ValueError(f"labels must be 0..{len(self.labels) - 1} without gaps, got {sorted(self.labels)}")
        if self.network.in_channels != len(self.channels):
            raise ValueError(f"network.in_channels {self.network.in_channels} != {len(self.channels)} channels")
        if self.network.out_channels != len(self.labels):
            raise ValueError(f"network.out_channels {self.network.out_channels} != {len(self.labels)} labels")
        if min(self.target_spacing) <= 0 or min(self.patch_size) < 1:
            raise ValueError("target_spacing and patch_size must be positive")
        if not all(math.isfinite(s) for s in self.target_spacing) or max(self.patch_size) > MAX_PATCH:
            raise ValueError(f"target_spacing must be finite and patch_size at most {MAX_PATCH} per axis")
        div = self.network.divisor
        if any(p % d for p, d in zip(self.patch_size, div, strict=True)):
            raise ValueError(f"patch_size {list(self.patch_size)} must be a multiple of {list(div)} (network strides)")
        return self


# ----------------------------------------------------------------- geometry helpers
def ras_order(affine: np.ndarray, values: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Per-voxel-axis ``values`` reordered along R, A, S (the axis order after reorienting to RAS)."""
    axis_of_voxel = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    out = np.empty(3)
    out[axis_of_voxel] = np.asarray(values, dtype=float)
    return out


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing ordered along the R, A, S world axes (i.e. after reorienting to RAS)."""
    return ras_order(affine, np.linalg.norm(affine[:3, :3], axis=0))


# ----------------------------------------------------------------- fingerprint
def fingerprint(info: DatasetInfo, scans: Sequence[CaseScan]) -> dict[str, Any]:
    """Dataset statistics the plan is derived from (JSON/YAML friendly).

    Args:
        info: The dataset (channel and label names).
        scans: One :class:`CaseScan` per training case (from :func:`scan_dataset`).

    Returns:
        ``num_cases``, per-case ``spacings_ras`` / ``shapes_ras``, their medians, per-channel
        ``foreground_intensity`` (mean, std, percentiles 0.5/50/99.5, min, max of samples
        inside the labels), per-channel ``background_fraction`` (median share of voxels at the
        image minimum) and per-class ``class_voxels`` / ``class_fraction``.
    """
    good = [s for s in scans if s.spacing_ras is not None and s.shape_ras is not None]
    if not good:
        raise ConfigError(f"{info.root}: no readable training case to plan from")
    spacings = np.asarray([s.spacing_ras for s in good], dtype=float)
    shapes = np.asarray([s.shape_ras for s in good], dtype=float)
    stats = []
    for c in range(len(info.channel_names)):
        parts = [s.samples[c] for s in good if c < len(s.samples) and s.samples[c].size]
        values = np.concatenate(parts).astype(np.float64) if parts else np.zeros(1)
        lo, median, hi = np.percentile(values, [0.5, 50.0, 99.5])
        clipped = np.clip(values, lo, hi)
        stats.append(
            {
                "mean": float(clipped.mean()),
                "std": float(clipped.std()),
                "median": float(median),
                "p00_5": float(lo),
                "p99_5": float(hi),
                "min": float(values.min()),
                "max": float(values.max()),
            }
        )
    k = info.num_classes
    class_voxels = np.zeros(k, dtype=np.int64)
    for s in good:
        for value, count in s.label_counts.items():
            if 0 <= value < k:
                class_voxels[value] += count
    background = [
        float(np.median([s.background_fraction[c] for s in good if c < len(s.background_fraction)] or [0.0]))
        for c in range(len(info.channel_names))
    ]
    return {
        "num_cases": len(good),
        "spacings_ras": np.round(spacings, 6).tolist(),
        "shapes_ras": shapes.astype(int).tolist(),
        "median_spacing_ras": np.median(spacings, axis=0).tolist(),
        "median_shape_ras": np.median(shapes, axis=0).tolist(),
        "foreground_intensity": stats,
        "background_fraction": background,
        "class_voxels": class_voxels.tolist(),
        "class_fraction": (class_voxels / max(1, int(class_voxels.sum()))).tolist(),
    }


def plan_target_spacing(
    spacings: np.ndarray, shapes: np.ndarray, *, anisotropy_threshold: float = 3.0
) -> tuple[np.ndarray, bool]:
    """nnU-Net's target spacing: the median, except for a strongly anisotropic coarse axis.

    Args:
        spacings: ``(N, 3)`` per-case spacings (RAS axis order).
        shapes: ``(N, 3)`` per-case shapes in voxels (same axis order).
        anisotropy_threshold: Spacing (and voxel-count) ratio that counts as anisotropic.

    Returns:
        The ``(3,)`` target spacing and whether the anisotropy rule was applied.
    """
    spacings = np.asarray(spacings, dtype=float).reshape(-1, 3)
    shapes = np.asarray(shapes, dtype=float).reshape(-1, 3)
    target = np.median(spacings, axis=0)
    size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    max_other_spacing = float(max(target[i] for i in others))
    aniso_spacing = target[worst] > anisotropy_threshold * max_other_spacing
    aniso_voxels = size[worst] * anisotropy_threshold < min(size[i] for i in others)
    if not (aniso_spacing and aniso_voxels):
        return target, False
    coarse = float(np.percentile(spacings[:, worst], 10))
    if coarse < max_other_spacing:
        coarse = max(max_other_spacing, coarse) + 1e-5
    target = target.copy()
    target[worst] = coarse
    return target, True


class Topology(BaseModel):
    """U-Net levels for one patch size: ``strides[l]`` downsamples into level ``l + 1``."""

    strides: list[tuple[int, int, int]]
    kernel_sizes: list[tuple[int, int, int]]
    patch_size: tuple[int, int, int]

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Patch sizes must be multiples of this per axis."""
        return _divisor(self.strides)


def plan_topology(
    spacing: Sequence[float] | np.ndarray,
    patch_size: Sequence[int] | np.ndarray,
    *,
    min_feature_map: int = MIN_FEATURE_MAP,
) -> Topology:
    """Downsampling and kernel sizes per level for a patch (nnU-Net's ``get_pool_and_conv_props``).

    Each level halves the axes whose current size is at least ``2 * min_feature_map`` and
    whose current spacing is within a factor 2 of the finest valid axis; a lone axis is
    halved only while it is at least ``3 * min_feature_map``.  Kernels are 3 on axes within
    a factor 2 of the finest current spacing and 1 before that; the bottleneck is 3x3x3.
    The returned patch is padded up to a multiple of the total stride.
    """
    spacing_now = [float(s) for s in spacing]
    size_now = [float(p) for p in patch_size]
    kernel = [1, 1, 1]
    strides: list[tuple[int, int, int]] = []
    kernels: list[tuple[int, int, int]] = []
    while True:
        valid = [i for i in range(3) if size_now[i] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(spacing_now[i] for i in valid)
        valid = [i for i in valid if spacing_now[i] / finest < 2]
        if len(valid) == 1 and size_now[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        finest_all = min(spacing_now)
        for d in range(3):
            if kernel[d] != 3 and spacing_now[d] / finest_all < 2:
                kernel[d] = 3
        step = [1, 1, 1]
        for i in valid:
            step[i] = 2
            spacing_now[i] *= 2
            size_now[i] = math.ceil(size_now[i] / 2)
        kernels.append((kernel[0], kernel[1], kernel[2]))
        strides.append((step[0], step[1], step[2]))
    kernels.append((3, 3, 3))
    div = _divisor(strides)
    padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch_size, div, strict=True))
    return Topology(strides=strides, kernel_sizes=kernels, patch_size=(padded[0], padded[1], padded[2]))


# ----------------------------------------------------------------- memory estimate
#: Saved activations per (feature x voxel) of a level, and per (in + out channel x input voxel), fitted
#: (least squares) to the bytes autograd's saved-tensor hooks record for MONAI's networks in fp32;
#: tests/test_plan.py checks the estimate against that measurement.
_DYNUNET_PER_LEVEL = {False: 10.6, True: 11.6}
_UNET_PER_LEVEL = (7.5, 3.4)  # 7.5 + 3.4 * num_res_units
_UNET_FULL_RES = {0: 0.4}  # per (in + out) channel at the input resolution; 2.2 with residual units


def estimate_activation_bytes(
    network: NetworkPlan | ModelConfig,
    patch_size: Sequence[int],
    *,
    batch_size: int = 1,
    channels: Sequence[int] | None = None,
    strides: Sequence[int | Sequence[int]] | None = None,
    in_channels: int | None = None,
    out_channels: int | None = None,
    bytes_per_value: int = 4,
) -> float:
    """Activation memory the network keeps for backward in one training step (fp32), in bytes.

    The dominant cost of a 3D U-Net: every level stores a few ``features x voxels`` maps
    for the backward pass.  ``dynunet`` levels run at their own resolution (level 0 at the
    input's); MONAI's ``unet`` downsamples in its first convolution, so its level ``l`` runs at
    the resolution after ``l + 1`` strides.  Weights, optimiser state and the loss are extra.

    Args:
        network: The network (name, residual units; channels/strides/in/out when concrete).
        patch_size: ``(X, Y, Z)`` voxels.
        batch_size: Patches per step.
        channels: Features per level (overrides ``network.channels``).
        strides: Per-level strides (overrides ``network.strides``).
        in_channels: Input channels (default ``network.in_channels``, else 1).
        out_channels: Classes (default ``network.out_channels``, else 2).
        bytes_per_value: 4 for fp32 (bf16/fp16 autocast keeps roughly half for convolutions).
    """
    feats: list[int] = list(channels if channels is not None else network.channels)  # type: ignore[arg-type]
    steps = axis_strides(strides if strides is not None else network.strides)  # type: ignore[arg-type]
    n_in = in_channels if in_channels is not None else getattr(network, "in_channels", 1)
    n_out = out_channels if out_channels is not None else getattr(network, "out_channels", 2)
    size = np.asarray(patch_size, dtype=float)
    full_res = float(np.prod(size))
    levels = 0.0
    if network.name == "dynunet":
        for level, f in enumerate(feats):
            if level > 0:
                size = np.ceil(size / np.asarray(steps[level - 1], dtype=float))
            levels += f * float(np.prod(size))
        values = _DYNUNET_PER_LEVEL[network.num_res_units > 0] * levels
    else:
        for level, f in enumerate(feats):
            if level < len(steps):
                size = np.ceil(size / np.asarray(steps[level], dtype=float))
            levels += f * float(np.prod(size))
        per_level = _UNET_PER_LEVEL[0] + _UNET_PER_LEVEL[1] * network.num_res_units
        values = per_level * levels + _UNET_FULL_RES.get(network.num_res_units, 2.2) * (n_in + n_out) * full_res
    return values * batch_size * bytes_per_value


# ----------------------------------------------------------------- planning
def _features(config: ModelConfig, depth: int) -> list[int]:
    return [min(config.base_features * 2**level, config.max_features) for level in range(depth + 1)]


def _fit_patch(
    requested: tuple[int, int, int], image_shape: np.ndarray, divisor: Sequence[int]
) -> tuple[int, int, int]:
    """Shrink the patch to at most the (rounded-up) image size, as a multiple of ``divisor`` per axis."""
    out = []
    for want, have, div in zip(requested, image_shape, divisor, strict=True):
        have_rounded = int(np.ceil(have / div) * div)
        size = min(want, max(div, have_rounded))
        out.append(int(max(div, (size // div) * div)))
    return (out[0], out[1], out[2])


def _kernels_for(
    spacing: Sequence[float] | np.ndarray, strides: Sequence[tuple[int, int, int]]
) -> list[tuple[int, int, int]]:
    """Kernel sizes for given strides by nnU-Net's spacing rule (3 within a factor 2 of the finest axis)."""
    now = [float(s) for s in spacing]
    kernel = [1, 1, 1]
    out = []
    for step in [*strides, None]:
        finest = min(now)
        for d in range(3):
            if kernel[d] != 3 and now[d] / finest < 2:
                kernel[d] = 3
        out.append((kernel[0], kernel[1], kernel[2]) if step is not None else (3, 3, 3))
        if step is not None:
            now = [n * s for n, s in zip(now, step, strict=True)]
    return out


def _auto_patch(
    config: Config, spacing: np.ndarray, median_shape: np.ndarray, in_channels: int, out_channels: int
) -> tuple[Topology, list[int], float]:
    """nnU-Net's patch search: start big, shrink the axis largest relative to the image until it fits."""
    budget = config.preprocess.memory_budget_gb * 1024**3
    inv = 1.0 / spacing
    patch = np.round(inv * (256.0**3 / np.prod(inv)) ** (1 / 3)).astype(int)
    patch = np.maximum(np.minimum(patch, np.ceil(median_shape).astype(int)), 1)
    while True:
        topo = plan_topology(spacing, patch)
        feats = _features(config.model, len(topo.strides))
        need = estimate_activation_bytes(
            config.model,
            topo.patch_size,
            batch_size=2,
            channels=feats,
            strides=topo.strides,
            in_channels=in_channels,
            out_channels=out_channels,
        ) + _io_bytes(topo.patch_size, in_channels, out_channels, batch_size=2)
        if need <= budget:
            return topo, feats, need
        ratios = np.asarray(topo.patch_size, dtype=float) / np.maximum(median_shape, 1)
        axis = int(np.argmax(ratios))
        step = topo.divisor[axis]
        smaller = patch.copy()
        smaller[axis] = min(smaller[axis], topo.patch_size[axis]) - step
        if smaller[axis] < 2 * MIN_FEATURE_MAP:
            shrinkable = [a for a in range(3) if topo.patch_size[a] - topo.divisor[a] >= 2 * MIN_FEATURE_MAP]
            if not shrinkable:
                raise ConfigError(
                    f"preprocess.memory_budget_gb {config.preprocess.memory_budget_gb} is too small for even the "
                    f"smallest patch {list(topo.patch_size)} (needs {need / 1024**3:.3f} GB)"
                )
            axis = max(shrinkable, key=lambda a: ratios[a])
            smaller = patch.copy()
            smaller[axis] = min(smaller[axis], topo.patch_size[axis]) - topo.divisor[axis]
        patch = smaller


def _io_bytes(patch: Sequence[int], in_channels: int, out_channels: int, *, batch_size: int) -> float:
    # input, logits, softmax and one-hot target of the loss (fp32)
    return float(np.prod(patch)) * (in_channels + 3 * out_channels) * batch_size * 4


def _batch_size(
    config: Config, patch: Sequence[int], per_sample: float, median_shape: np.ndarray, num_cases: int
) -> int:
    budget = config.preprocess.memory_budget_gb * 1024**3
    fits = int(budget // max(per_sample, 1.0))
    dataset_voxels = float(np.prod(median_shape)) * max(num_cases, 1)
    cap = round(MAX_BATCH_DATASET_FRACTION * dataset_voxels / float(np.prod(patch)))
    return max(2, min(fits, cap))


def _channel_norms(info: DatasetInfo, config: Config, fp: dict[str, Any]) -> list[ChannelNorm]:
    stats: list[dict[str, float]] = fp["foreground_intensity"]
    background: list[float] = fp.get("background_fraction", [0.0] * len(stats))
    out = []
    for name, stat, bg in zip(info.channel_names, stats, background, strict=True):
        scheme = config.preprocess.normalization
        key = name.strip().upper()
        if scheme == "auto":
            scheme = "ct" if key == "CT" else "zscore"
            if key in ("NONORM", "NONE"):
                out.append(ChannelNorm(name=name, scheme="none"))
                continue
        if scheme == "ct":
            lo, hi = stat["p00_5"], stat["p99_5"]
            if hi <= lo:
                hi = lo + 1.0
            out.append(
                ChannelNorm(name=name, scheme="ct", clip=(lo, hi), mean=stat["mean"], std=max(stat["std"], 1e-6))
            )
        else:
            region: Literal["image", "foreground"] = "foreground" if bg >= FOREGROUND_NORM_MIN_BACKGROUND else "image"
            out.append(ChannelNorm(name=name, scheme="zscore", region=region))
    return out


def make_plan(info: DatasetInfo, config: Config, *, scans: Sequence[CaseScan] | None = None) -> Plan:
    """Fingerprint a dataset and derive the plan (spacing, normalisation, patch, batch, network).

    Args:
        info: The dataset (its training cases are read unless ``scans`` are given).
        config: The run's config: ``preprocess`` (spacing, patch, memory budget) and ``model``
            (explicit values are kept, ``auto`` ones planned).
        scans: Already computed :func:`scan_dataset` results of ``info.training``.
    """
    if scans is None:
        scans = scan_dataset(info.training + info.validation, info, seed=config.seed)
    fp = fingerprint(info, scans)
    spacings = np.asarray(fp["spacings_ras"], dtype=float)
    shapes = np.asarray(fp["shapes_ras"], dtype=float)
    if config.preprocess.target_spacing is not None:
        target = np.asarray(config.preprocess.target_spacing, dtype=float)
        anisotropic = False
    else:
        target, anisotropic = plan_target_spacing(
            spacings, shapes, anisotropy_threshold=config.preprocess.anisotropy_threshold
        )
    resampled_shape = np.median(shapes * spacings / target, axis=0)
    fp["anisotropic"] = bool(anisotropic)
    fp["median_shape_at_target_spacing"] = np.round(resampled_shape, 1).tolist()
    mc = config.model
    n_in, n_out = len(info.channel_names), info.num_classes
    if mc.strides == "auto":
        if config.preprocess.patch_size == "auto":
            topo, feats, _ = _auto_patch(config, target, resampled_shape, n_in, n_out)
        else:
            requested = np.minimum(np.asarray(config.preprocess.patch_size), np.ceil(resampled_shape)).astype(int)
            topo = plan_topology(target, np.maximum(requested, 1))
            feats = _features(mc, len(topo.strides))
        strides: list[tuple[int, int, int]] = topo.strides
        kernels = topo.kernel_sizes
        patch = topo.patch_size
    else:
        strides = axis_strides(mc.strides)
        feats = list(mc.channels) if mc.channels != "auto" else _features(mc, len(strides))
        kernels = _kernels_for(target, strides)
        if config.preprocess.patch_size == "auto":
            topo, _, _ = _auto_patch(config, target, resampled_shape, n_in, n_out)
            patch = _fit_patch(topo.patch_size, np.asarray(topo.patch_size), _divisor(strides))
        else:
            patch = _fit_patch(config.preprocess.patch_size, resampled_shape, _divisor(strides))
    if mc.kernel_sizes != "auto":
        kernels = axis_strides(mc.kernel_sizes)
    stride_values: list[int | tuple[int, int, int]] = [s[0] if len(set(s)) == 1 else s for s in strides]
    kernel_values: list[int | tuple[int, int, int]] = [k[0] if len(set(k)) == 1 else k for k in kernels]
    fields = mc.model_dump(exclude={"channels", "strides", "kernel_sizes", "deep_supervision_heads"})
    heads = min(mc.deep_supervision_heads, max(1, len(strides) - 1))
    network = NetworkPlan(
        **fields,
        channels=tuple(feats),
        strides=tuple(stride_values),
        kernel_sizes=tuple(kernel_values) if mc.name == "dynunet" else "auto",
        deep_supervision_heads=heads,
        in_channels=n_in,
        out_channels=n_out,
    )
    per_sample = estimate_activation_bytes(network, patch) + _io_bytes(patch, n_in, n_out, batch_size=1)
    fp["activation_gb_per_patch"] = round(per_sample / 1024**3, 4)
    batch = _batch_size(config, patch, per_sample, resampled_shape, len(scans))
    return Plan(
        channels=_channel_norms(info, config, fp),
        labels=dict(info.label_names),
        target_spacing=(float(target[0]), float(target[1]), float(target[2])),
        orientation=config.preprocess.orientation,
        patch_size=patch,
        batch_size=batch,
        network=network,
        fingerprint=fp,
    )


# ----------------------------------------------------------------- YAML
_HEADER = """\
# medseg plan: how cases are brought to the network grid and what network is trained.
# Edit and pass back with `medseg train DATASET --plan plan.yaml`; every model keeps its plan.
#   target_spacing  mm per axis AFTER reorienting to `orientation` (R, A, S order for RAS)
#   channels        per input channel: ct = clip + dataset z-score, zscore = per image
#                   (region: foreground = only voxels above the image minimum), none
#   patch_size      voxels per axis, a multiple of the product of network.strides per axis
#   batch_size      patches per optimiser step (used when train.batch_size is auto)
#   network         channels per level, strides per level (int or [x, y, z]), kernel_sizes (dynunet)
#   fingerprint     dataset statistics the plan was derived from (informational)
"""


def plan_to_yaml(plan: Plan) -> str:
    """The plan as commented, readable YAML (short lists inline, label values as integer keys)."""
    data = plan.model_dump(mode="json")
    data["labels"] = {int(k): v for k, v in data["labels"].items()}
    return _HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def save_plan(plan: Plan, path: PathLike, *, overwrite: bool = True) -> Path:
    """Write the plan as YAML atomically."""
    text = plan_to_yaml(plan)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)


def load_plan(path: PathLike) -> Plan:
    """Read and validate a ``plan.yaml``.

    Raises:
        ConfigError: Missing file or invalid content, naming every bad key.
    """
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a plan must be a mapping, got {type(raw).__name__}")
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        keys = "; ".join((".".join(map(str, e["loc"])) or "<plan>") + f": {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid plan ({keys})") from None
