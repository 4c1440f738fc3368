"""YAML configuration: validated models, loading with clear errors, saving.

A config has four sections (``preprocess``, ``model``, ``train``, ``infer``) plus a
``seed``.  Every key is validated on load (unknown keys are errors, so a typo never
silently falls back to a default) and the *resolved* config is saved next to every
model and every prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError
from medseg.io.images import atomic_path
from medseg.types import PathLike

__all__ = [
    "Config",
    "InferConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "dump_yaml",
    "load_config",
    "load_yaml",
    "save_config",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(_Strict):
    """How volumes are brought to the network's grid and intensity range."""

    target_spacing: tuple[float, float, float] | None = Field(
        default=None, description="mm; null = the dataset's median spacing"
    )
    orientation: str = Field(default="RAS", description="axis codes the network sees")
    normalization: Literal["auto", "ct", "zscore"] = Field(
        default="auto", description="auto: 'ct' for CT channels, per-image z-score otherwise"
    )
    patch_size: tuple[int, int, int] | Literal["auto"] = Field(
        default="auto", description="voxels (RAS axis order); auto = largest that fits memory_budget_gb"
    )
    memory_budget_gb: float = Field(
        default=8.0, gt=0, description="activation memory per training process for auto patch and batch size"
    )
    anisotropy_threshold: float = Field(
        default=3.0, gt=1, description="spacing ratio above which the coarse axis gets the 10th percentile spacing"
    )

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str) -> str:
        value = value.upper()
        axes = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
        if len(value) != 3 or sorted(axes.get(c, -1) for c in value) != [0, 1, 2]:
            raise ValueError(f"orientation must be three axis codes like 'RAS', got {value!r}")
        return value

    @field_validator("target_spacing", "patch_size")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if value is not None and value != "auto" and min(value) <= 0:
            raise ValueError("must be positive")
        return value


#: Bounds that keep a hand-edited (or hostile) config or plan from asking for terabytes of weights.
MAX_FEATURES = 4096
MAX_LEVELS = 12
#: A per-level stride or kernel size: one int for all axes or one per (RAS) axis.
AxisSizes = int | tuple[int, int, int]


class ModelConfig(_Strict):
    """A MONAI 3D U-Net (``unet``: monai.networks.nets.UNet; ``dynunet``: the nnU-Net architecture)."""

    name: Literal["unet", "dynunet"] = "unet"
    channels: tuple[int, ...] | Literal["auto"] = Field(
        default="auto", description="features per level; auto = base_features doubling up to max_features"
    )
    strides: tuple[AxisSizes, ...] | Literal["auto"] = Field(
        default="auto", description="downsampling per level; auto = planned from patch size and spacing"
    )
    kernel_sizes: tuple[AxisSizes, ...] | Literal["auto"] = Field(
        default="auto", description="dynunet: convolution kernel per level (len(strides) + 1); auto = planned"
    )
    base_features: int = Field(default=32, ge=1, le=MAX_FEATURES)
    max_features: int = Field(default=320, ge=1, le=MAX_FEATURES)
    num_res_units: int = Field(default=1, ge=0, le=16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    deep_supervision: bool = Field(default=False, description="dynunet only: auxiliary losses at coarser levels")
    deep_supervision_heads: int = Field(default=2, ge=1, description="number of auxiliary outputs")

    @field_validator("strides", "kernel_sizes")
    @classmethod
    def _strides(cls, value: Any) -> Any:
        if value == "auto":
            return value
        flat = [v for item in value for v in (item if isinstance(item, tuple) else (item,))]
        if any(s < 1 for s in flat):
            raise ValueError("strides and kernel sizes must be >= 1")
        if any(s > 16 for s in flat) or len(value) > MAX_LEVELS:
            raise ValueError(f"at most {MAX_LEVELS} levels of strides / kernel sizes up to 16")
        return value

    @field_validator("channels")
    @classmethod
    def _features(cls, value: Any) -> Any:
        if value != "auto" and (len(value) > MAX_LEVELS + 1 or any(not 1 <= c <= MAX_FEATURES for c in value)):
            raise ValueError(f"at most {MAX_LEVELS + 1} levels of 1..{MAX_FEATURES} features each")
        return value

    @model_validator(mode="after")
    def _depth(self) -> ModelConfig:
        if self.channels != "auto" and self.strides == "auto":
            raise ValueError("give strides together with channels (or leave both 'auto')")
        if self.channels != "auto" and self.strides != "auto" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"need len(strides) == len(channels) - 1, got {self.strides} / {self.channels}")
        if self.kernel_sizes != "auto" and self.strides != "auto" and len(self.kernel_sizes) != len(self.strides) + 1:
            raise ValueError(f"need len(kernel_sizes) == len(strides) + 1, got {self.kernel_sizes} / {self.strides}")
        if self.deep_supervision and self.name != "dynunet":
            raise ValueError("deep_supervision needs name: dynunet")
        return self


class TrainConfig(_Strict):
    """Optimisation settings (iteration-based, like nnU-Net's fixed budget)."""

    iterations: int = Field(default=600, ge=1)
    batch_size: int | Literal["auto"] = Field(default=2, description="patches per step (global); auto = plan's")
    samples_per_volume: int = Field(default=2, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    lr_schedule: Literal["poly", "cosine", "constant"] = "poly"
    grad_clip: float | None = Field(default=12.0, gt=0)
    foreground_ratio: float = Field(default=0.67, ge=0, le=1, description="share of patches centred on foreground")
    augment: bool = True
    precision: Precision = "auto"
    num_workers: int = Field(default=0, ge=0)
    val_every: int = Field(default=0, ge=0, description="iterations between validations; 0 = only at the end")
    val_fraction: float = Field(default=0.0, ge=0, lt=1)
    val_regions: dict[str, tuple[int, ...]] = Field(
        default_factory=dict, description="extra validation Dice of label unions, e.g. whole_tumour: [1, 2, 3, 4]"
    )
    fold: int | None = Field(default=None, ge=0, description="k-fold validation fold (None: val_fraction split)")
    folds: int = Field(default=5, ge=2)
    group_pattern: str | None = Field(
        default=None, description="regex on case ids giving the patient key (first group); keeps studies together"
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    batch_dice: bool = Field(default=True, description="Dice over the whole batch (nnU-Net) instead of per sample")
    flip_axes: tuple[int, ...] = Field(default=(), description="random mirroring along these spatial axes")
    cache: Literal["memory", "disk", "none"] = Field(
        default="memory", description="cache preprocessed cases: memory (CacheDataset), disk (PersistentDataset)"
    )
    checkpoint_every: int = Field(default=250, ge=0, description="iterations between 'last' checkpoints; 0 = end only")
    deterministic: bool = Field(default=False, description="torch deterministic algorithms (slower on CUDA)")

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    @field_validator("flip_axes")
    @classmethod
    def _flip(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in value):
            raise ValueError("flip_axes are spatial axes 0, 1, 2")
        return value

    @model_validator(mode="after")
    def _fold(self) -> TrainConfig:
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} does not exist with folds: {self.folds} (0..{self.folds - 1})")
        return self


class InferConfig(_Strict):
    """Sliding-window inference settings."""

    overlap: float = Field(default=0.5, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(default=2, ge=1)
    mirror_axes: tuple[int, ...] = ()
    precision: Precision = "auto"
    device: str = "auto"
    body_crop: Literal["windows", "box", "none"] = Field(
        default="windows",
        description="body = CT > -500 HU / other channels non-zero; windows: skip windows outside its box "
        "(same result inside); box: crop to the box and re-tile it (fewer windows); none: every window. "
        "nnU-Net folders: windows and box skip the windows of nnU-Net's tiling that see only air",
    )
    logits_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="network-grid logits kept for resampling (blending is float32 per slab)"
    )
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = torch's default")
    keep_largest_component: bool = Field(default=False, description="post-processing: largest component per class")
    min_component_mm3: float = Field(default=0.0, ge=0, description="post-processing: drop smaller components")
    fill_holes: bool = Field(default=False, description="post-processing: fill enclosed background per class")

    @field_validator("mirror_axes")
    @classmethod
    def _axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(a not in (0, 1, 2) for a in value):
            raise ValueError("mirror_axes are spatial axes 0, 1, 2")
        return value


class Config(_Strict):
    """The whole configuration of a training run (and of the model it makes)."""

    seed: int = 0
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()


def load_yaml(path: PathLike) -> Any:
    """Read a YAML file safely (bounded size and alias expansion, :mod:`medseg.io.safe_yaml`); errors name the file."""
    from medseg.io.safe_yaml import load_yaml_file

    return load_yaml_file(path)


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"  {key}: {err['msg']}" + (f" (got {err['input']!r})" if err["type"] != "missing" else ""))
    return f"{source}: invalid configuration\n" + "\n".join(lines)


def load_config(path: PathLike | None = None, *, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a config (defaults when ``path`` is None), applying overrides.

    Args:
        path: YAML file.
        overrides: Dotted keys to values, e.g. ``{"train.iterations": 50}``.

    Raises:
        ConfigError: Unknown keys, wrong types or values; every problem is listed with its key.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        loaded = load_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def dump_yaml(data: Any, path: PathLike, *, overwrite: bool = True) -> Path:
    """Write plain data as YAML atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def save_config(config: Config, path: PathLike, *, overwrite: bool = True) -> Path:
    """Save the resolved config as YAML (tuples as lists)."""
    return dump_yaml(config.model_dump(mode="json"), path, overwrite=overwrite)
