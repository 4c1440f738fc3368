"""Dataset fingerprint -> preprocessing plan.

The plan is the part of a model that preprocessing needs: target spacing and
orientation, per-channel normalisation with its statistics, patch size, label names
and the network shape.  It is a readable YAML file saved in every model directory.

Normalisation follows nnU-Net: CT channels are clipped to the 0.5-99.5 percentiles
of the foreground intensities of the training set and z-scored with the foreground
mean/std; other channels are z-scored per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medseg.config import Config, ModelConfig, dump_yaml, load_yaml
from medseg.data.datasets import DatasetInfo
from medseg.errors import ConfigError
from medseg.io import load_volume
from medseg.types import PathLike

__all__ = ["ChannelNorm", "NetworkPlan", "Plan", "load_plan", "make_plan", "ras_order", "ras_spacing", "save_plan"]

_SAMPLES_PER_CASE = 20_000


class ChannelNorm(BaseModel):
    """Normalisation of one input channel."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scheme: Literal["ct", "zscore"]
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)


class NetworkPlan(ModelConfig):
    """The network to build: the model config plus its input/output channels."""

    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=2)


class Plan(BaseModel):
    """Everything preprocessing and network construction need; saved as ``plan.yaml``."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    channels: list[ChannelNorm]
    labels: dict[int, str]
    target_spacing: tuple[float, float, float]
    orientation: str = "RAS"
    patch_size: tuple[int, int, int]
    network: NetworkPlan
    fingerprint: dict[str, object] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return len(self.labels)


def ras_order(affine: np.ndarray, values: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Per-voxel-axis ``values`` reordered along R, A, S (the axis order after reorienting to RAS)."""
    axis_of_voxel = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    out = np.empty(3)
    out[axis_of_voxel] = np.asarray(values, dtype=float)
    return out


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing ordered along the R, A, S world axes (i.e. after reorienting to RAS)."""
    return ras_order(affine, np.linalg.norm(affine[:3, :3], axis=0))


def _fingerprint(info: DatasetInfo, *, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    spacings, shapes = [], []
    samples: list[list[np.ndarray]] = [[] for _ in info.channel_names]
    class_voxels = np.zeros(info.num_classes, dtype=np.int64)
    for case in info.training:
        label = load_volume(case.label, kind="label") if case.label else None
        for c, path in enumerate(case.images):
            image = load_volume(path)
            if c == 0:
                spacings.append(ras_spacing(image.geometry.affine))
                shapes.append(ras_order(image.geometry.affine, image.geometry.shape))
            values = image.array[0]
            fg = values[label.array[0] > 0] if label is not None else values.ravel()
            if fg.size == 0:
                fg = values.ravel()
            take = min(_SAMPLES_PER_CASE, fg.size)
            samples[c].append(rng.choice(fg.ravel(), size=take, replace=False).astype(np.float64))
        if label is not None:
            counts = np.bincount(label.array.ravel(), minlength=info.num_classes)
            class_voxels += counts[: info.num_classes]
    stats = []
    for values in (np.concatenate(s) for s in samples):
        lo, hi = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, lo, hi)
        stats.append(
            {"p00_5": float(lo), "p99_5": float(hi), "mean": float(clipped.mean()), "std": float(clipped.std())}
        )
    return {
        "num_cases": len(info.training),
        "spacings_ras": np.asarray(spacings).tolist(),
        "median_spacing_ras": np.median(spacings, axis=0).tolist(),
        "median_shape_ras": np.median(np.asarray(shapes), axis=0).tolist(),
        "foreground_intensity": stats,
        "class_fraction": (class_voxels / max(1, class_voxels.sum())).tolist(),
    }


def _fit_patch(requested: tuple[int, int, int], image_shape: np.ndarray, divisor: int) -> tuple[int, int, int]:
    """Shrink the patch to at most the (rounded-up) image size, as a multiple of ``divisor``."""
    out = []
    for want, have in zip(requested, image_shape, strict=True):
        have_rounded = int(np.ceil(have / divisor) * divisor)
        size = min(want, max(divisor, have_rounded))
        out.append(int(max(divisor, (size // divisor) * divisor)))
    return (out[0], out[1], out[2])


def make_plan(info: DatasetInfo, config: Config) -> Plan:
    """Fingerprint a dataset and derive the plan (spacing, normalisation, patch, network).

    Args:
        info: The dataset (training cases with labels are read).
        config: The run's config (requested patch size, spacing, normalisation, network).
    """
    fp = _fingerprint(info, seed=config.seed)
    median_spacing = np.asarray(fp["median_spacing_ras"], dtype=float)
    target = np.asarray(config.preprocess.target_spacing or median_spacing, dtype=float)
    resampled_shape = np.asarray(fp["median_shape_ras"], dtype=float) * median_spacing / target
    divisor = int(np.prod(config.model.strides))
    patch = _fit_patch(config.preprocess.patch_size, resampled_shape, divisor)
    channels = []
    stats: list[dict[str, float]] = fp["foreground_intensity"]  # type: ignore[assignment]
    for name, stat in zip(info.channel_names, stats, strict=True):
        scheme = config.preprocess.normalization
        if scheme == "auto":
            scheme = "ct" if name.strip().upper() == "CT" else "zscore"
        if scheme == "ct":
            channels.append(
                ChannelNorm(
                    name=name,
                    scheme="ct",
                    clip=(stat["p00_5"], stat["p99_5"]),
                    mean=stat["mean"],
                    std=max(stat["std"], 1e-6),
                )
            )
        else:
            channels.append(ChannelNorm(name=name, scheme="zscore"))
    network = NetworkPlan(
        **config.model.model_dump(), in_channels=len(info.channel_names), out_channels=info.num_classes
    )
    return Plan(
        channels=channels,
        labels=dict(info.label_names),
        target_spacing=(float(target[0]), float(target[1]), float(target[2])),
        orientation=config.preprocess.orientation,
        patch_size=patch,
        network=network,
        fingerprint=fp,
    )


def save_plan(plan: Plan, path: PathLike, *, overwrite: bool = True) -> Path:
    """Write the plan as YAML (label values as integer keys)."""
    data = plan.model_dump(mode="json")
    data["labels"] = {int(k): v for k, v in data["labels"].items()}
    return dump_yaml(data, path, overwrite=overwrite)


def load_plan(path: PathLike) -> Plan:
    """Read and validate a ``plan.yaml``.

    Raises:
        ConfigError: Missing file or invalid content, naming the bad key.
    """
    from pydantic import ValidationError

    raw = load_yaml(path)
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        keys = "; ".join(".".join(map(str, e["loc"])) + f": {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid plan ({keys})") from None
