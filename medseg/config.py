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
    patch_size: tuple[int, int, int] = (64, 64, 32)

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
        if value is not None and min(value) <= 0:
            raise ValueError("must be positive")
        return value


class ModelConfig(_Strict):
    """A MONAI 3D U-Net."""

    name: Literal["unet"] = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(default=1, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @field_validator("strides")
    @classmethod
    def _strides(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 1 for s in value):
            raise ValueError("strides must be >= 1")
        return value

    @model_validator(mode="after")
    def _depth(self) -> ModelConfig:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"need len(strides) == len(channels) - 1, got {self.strides} / {self.channels}")
        return self


class TrainConfig(_Strict):
    """Optimisation settings (iteration-based, like nnU-Net's fixed budget)."""

    iterations: int = Field(default=600, ge=1)
    batch_size: int = Field(default=2, ge=1)
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


class InferConfig(_Strict):
    """Sliding-window inference settings."""

    overlap: float = Field(default=0.5, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(default=2, ge=1)
    mirror_axes: tuple[int, ...] = ()
    precision: Precision = "auto"
    device: str = "auto"

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
    """Read a YAML file; errors name the file."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: no such file") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc


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
