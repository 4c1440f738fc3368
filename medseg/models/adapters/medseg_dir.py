"""The medseg model directory as a :class:`~medseg.models.adapters.base.ModelAdapter`.

Wraps :mod:`medseg.models.package` (``config.yaml`` + ``plan.yaml`` + ``weights.pt``): config and plan
are read on construction (YAML only), the network when :meth:`MedsegModelDir.load_networks` is first
called.  The recipe is :class:`~medseg.models.adapters.base.PlanRecipe`, which the predictor runs with
the pipeline it always had (results unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import ConfigError, ModelError
from medseg.models.adapters.base import (
    InputChannel,
    ModelAdapter,
    OutputDecoding,
    PlanRecipe,
    WindowSettings,
    hash_files,
)

if TYPE_CHECKING:
    from torch import nn

    from medseg.config import Config, InferConfig
    from medseg.data.plan import Plan
    from medseg.models.package import LoadedModel

__all__ = ["MedsegModelDir"]

#: Plan fields that must agree between ensembled medseg models.
SHARED_PLAN_FIELDS = ("channels", "labels", "target_spacing", "orientation", "patch_size")
MODEL_FILES = ("config.yaml", "plan.yaml", "weights.pt")


def check_model_dir(directory: Path) -> Path:
    """``directory`` if it is a folder holding every file in :data:`MODEL_FILES` (no torch import).

    Raises:
        ModelError: Not a folder, or a model file is missing.
    """
    if not directory.is_dir():
        raise ModelError(f"{directory}: model directory not found")
    missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"{directory}: not a medseg model directory (missing {', '.join(missing)})")
    return directory


class MedsegModelDir(ModelAdapter):
    """A model directory written by ``medseg train``.

    Args:
        path: The directory.
        loaded: An already loaded model (its network is used as is).

    Raises:
        ModelError: Missing files or an invalid config/plan.
    """

    kind = "medseg"

    def __init__(self, path: Path, *, loaded: LoadedModel | None = None) -> None:
        super().__init__(Path(path))
        if loaded is not None:
            self.config: Config = loaded.config
            self.plan: Plan = loaded.plan
            self._loaded: LoadedModel | None = loaded
            self._networks = [loaded.network]
            return
        directory = check_model_dir(self.path)
        from medseg.config import load_config
        from medseg.data.plan import load_plan

        try:
            self.config = load_config(directory / "config.yaml")
            self.plan = load_plan(directory / "plan.yaml")
        except ConfigError as exc:
            raise ModelError(str(exc)) from exc
        self._loaded = None

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> MedsegModelDir:
        """Wrap a :class:`~medseg.models.package.LoadedModel`."""
        return cls(Path(loaded.path), loaded=loaded)

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """A directory with ``plan.yaml`` (the other files are checked when it is opened)."""
        return path.is_dir() and (path / "plan.yaml").is_file()

    @property
    def loaded(self) -> LoadedModel:
        """The loaded model directory (network included)."""
        if self._loaded is None:
            from medseg.models.package import load_model

            self._loaded = load_model(self.path)
            self.config, self.plan = self._loaded.config, self._loaded.plan
        return self._loaded

    @property
    def channels(self) -> tuple[InputChannel, ...]:
        """The plan's channels."""

        def modality(name: str, scheme: str) -> str:
            if scheme == "ct" or name.upper() == "CT":
                return "CT"
            return "MR" if name.upper() not in ("PET", "PT", "US") else "other"

        out = []
        for c in self.plan.channels:
            norm = c.scheme if c.scheme != "zscore" or c.region == "image" else "zscore-foreground"
            out.append(InputChannel(name=c.name, modality=modality(c.name, c.scheme), normalization=norm))
        return tuple(out)

    @property
    def output(self) -> OutputDecoding:
        """Softmax over the plan's labels."""
        return OutputDecoding(labels={int(k): str(v) for k, v in self.plan.labels.items()})

    @property
    def window(self) -> WindowSettings:
        """MONAI tiling with the plan's patch."""
        return WindowSettings(patch_size=tuple(self.plan.patch_size))  # type: ignore[arg-type]

    @property
    def preprocessing(self) -> PlanRecipe:
        """The plan (orientation, spacing, normalisation)."""
        return PlanRecipe(plan=self.plan)

    @property
    def infer_defaults(self) -> InferConfig:
        """The model's ``config.infer``."""
        return self.config.infer

    def _load_networks(self) -> list[nn.Module]:
        return [self.loaded.network]

    def fingerprint(self) -> str:
        """SHA-256 of ``weights.pt`` and ``plan.yaml`` (unchanged from earlier medseg versions)."""
        return hash_files([self.path / "weights.pt", self.path / "plan.yaml"])

    def check_ensemble(self, other: ModelAdapter) -> None:
        """Models ensemble when their channels, labels, spacing, orientation and patch agree."""
        if not isinstance(other, MedsegModelDir):
            super().check_ensemble(other)
            return
        for name in SHARED_PLAN_FIELDS:
            if getattr(self.plan, name) != getattr(other.plan, name):
                raise ModelError(
                    f"{other.path}: cannot ensemble with {self.path}: plans differ in {name} "
                    f"({getattr(other.plan, name)!r} vs {getattr(self.plan, name)!r})"
                )

    def describe(self) -> dict[str, Any]:
        """Path, format, channels, labels, spacing, patch and network."""
        plan = self.plan
        return {
            "path": str(self.path.resolve()),
            "format": "medseg model directory",
            "channels": [c.__dict__ for c in self.channels],
            "labels": {int(k): str(v) for k, v in plan.labels.items()},
            "target_spacing": list(plan.target_spacing),
            "orientation": plan.orientation,
            "patch_size": list(plan.patch_size),
            "network": plan.network.name,
            "networks": 1,
        }
