"""The model seam: what every runnable model supplies, whatever made it.

A *model* is anything :func:`medseg.models.adapters.open_model` recognises: a medseg model directory,
an nnU-Net v2 results folder, or a file written by ``medseg export`` (ONNX / TorchScript).  Callers (the predictor,
``medseg predict``, batch, PACS, ``evaluate --labels``, ``info``) hold a :class:`ModelAdapter` and use
only what it declares:

* :attr:`ModelAdapter.channels` - the input channels (name, modality, normalisation),
* :attr:`ModelAdapter.preprocessing` - a declarative, serialisable *recipe* for the input -> network-grid
  mapping (normalisation, spacing, orientation/transpose, crop) and for the way back
  (:class:`PlanRecipe` for medseg's plan, ``NnUNetRecipe`` for nnU-Net's);
* :attr:`ModelAdapter.window` - patch size, window placement and blending, allowed mirror axes;
* :attr:`ModelAdapter.output` - how logits become labels (softmax argmax or sigmoid regions with a
  class order) and the label names;
* :meth:`ModelAdapter.load_networks` - the network(s) (one per fold), on the CPU in eval mode;
* :attr:`ModelAdapter.infer_defaults`, :meth:`ModelAdapter.fingerprint`, :meth:`ModelAdapter.describe`;
* :attr:`ModelAdapter.float32_only` - why the networks cannot run in reduced precision (``None``: they can).

Everything but the networks is cheap (JSON/YAML only, no torch import), so ``medseg info MODEL`` and
``evaluate --labels MODEL`` never load weights.  The infer stage executes a recipe through the pipeline
registered for its type (``medseg.infer.predictor.PIPELINES``); an exported file is the third adapter
(:mod:`medseg.models.adapters.exported`): it returns one of the existing recipes read from its metadata and
its own network.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from medseg.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

    from medseg.config import InferConfig
    from medseg.data.plan import Plan

__all__ = [
    "Checkpoint",
    "InputChannel",
    "ModelAdapter",
    "OutputDecoding",
    "PlanRecipe",
    "WindowSettings",
    "hash_files",
]

#: Which checkpoint of a trained model to use (nnU-Net: ``checkpoint_final.pth`` / ``checkpoint_best.pth``).
Checkpoint = Literal["final", "best"]


@dataclass(frozen=True)
class InputChannel:
    """One network input channel.

    Attributes:
        name: The channel's name in the model (``CT``, ``T1``, ``FLAIR`` ...).
        modality: ``CT``, ``MR`` or ``other`` (from the normalisation and the name; for compatibility checks).
        normalization: The scheme, as the model calls it (``ct``, ``zscore``, ``CTNormalization`` ...).
    """

    name: str
    modality: str
    normalization: str


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window settings a model decides.

    Attributes:
        patch_size: Window size on the network grid, 3 axes; a 2D network has ``(1, y, x)`` windows.
        tiling: ``monai`` (MONAI's overlap placement and importance map, medseg models) or ``nnunet``
            (nnU-Net's ``compute_steps_for_sliding_window`` placement with ``tile_step_size = 1 - overlap``
            and its float16 Gaussian scaled to 10; a 2D network is run on every slice of axis 0).
        sigma_scale: Gaussian sigma as a fraction of the window size.
        allowed_mirror_axes: Network-grid axes the model may be mirrored along at test time.
        spatial_dims: 3 for a 3D network, 2 for a 2D network applied slice by slice along axis 0.
    """

    patch_size: tuple[int, int, int]
    tiling: Literal["monai", "nnunet"] = "monai"
    sigma_scale: float = 0.125
    allowed_mirror_axes: tuple[int, ...] = (0, 1, 2)
    spatial_dims: int = 3


@dataclass(frozen=True)
class OutputDecoding:
    """How network outputs become labels.

    Attributes:
        labels: ``{label value: name}`` including background 0.
        kind: ``softmax`` (output channel ``k`` is label ``k``; argmax) or ``regions`` (one sigmoid per
            region; label ``regions_class_order[i]`` is written where region ``i`` exceeds 0.5, later
            regions overwriting earlier ones - nnU-Net's region decoding).
        regions: For ``regions``: the label values each output channel stands for (dataset.json order).
        regions_class_order: For ``regions``: the label value written for each output channel.
    """

    labels: dict[int, str]
    kind: Literal["softmax", "regions"] = "softmax"
    regions: tuple[tuple[int, ...], ...] = ()
    regions_class_order: tuple[int, ...] = ()

    @property
    def num_outputs(self) -> int:
        """Network output channels."""
        return len(self.regions) if self.kind == "regions" else len(self.labels)

    @property
    def max_label(self) -> int:
        """Largest label value written."""
        return max([0, *self.labels, *self.regions_class_order])


@dataclass(frozen=True)
class PlanRecipe:
    """Preprocessing recipe of medseg models: the training pipeline of a :class:`~medseg.data.plan.Plan`.

    MONAI orientation + spacing + per-channel normalisation; outputs resampled back as probabilities
    (see :mod:`medseg.infer.predictor`).
    """

    plan: Plan
    extras: dict[str, Any] = field(default_factory=dict)


class ModelAdapter(ABC):
    """A runnable segmentation model (see the module docstring).

    Subclasses set :attr:`kind` and implement the abstract members; :func:`open_model` picks the
    subclass whose :meth:`recognises` accepts the path.
    """

    #: Short name of the model format, shown by ``describe()`` (never used to branch on).
    kind: ClassVar[str] = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._networks: list[nn.Module] | None = None

    # ------------------------------------------------------------------ recognition
    @classmethod
    @abstractmethod
    def recognises(cls, path: Path) -> bool:
        """Whether ``path`` looks like this kind of model (cheap: file names only)."""

    @classmethod
    def open(
        cls, path: Path, *, folds: tuple[str, ...] | None = None, checkpoint: Checkpoint = "final"
    ) -> ModelAdapter:
        """Open ``path``; formats without folds/checkpoints refuse those options."""
        if folds is not None or checkpoint != "final":
            raise ModelError(f"{path}: --folds and --checkpoint apply to nnU-Net model folders only")
        return cls(path)  # type: ignore[call-arg]

    # ------------------------------------------------------------------ what a model decides
    @property
    @abstractmethod
    def channels(self) -> tuple[InputChannel, ...]:
        """Input channels, in order."""

    @property
    @abstractmethod
    def output(self) -> OutputDecoding:
        """Output decoding and label names."""

    @property
    @abstractmethod
    def window(self) -> WindowSettings:
        """Patch size, tiling and mirroring."""

    @property
    @abstractmethod
    def preprocessing(self) -> Any:
        """The recipe (a frozen dataclass the infer stage has a pipeline for)."""

    @property
    @abstractmethod
    def infer_defaults(self) -> InferConfig:
        """Inference settings when the user sets none."""

    @abstractmethod
    def _load_networks(self) -> list[nn.Module]:
        """Build the network(s) and load their weights (CPU, eval mode)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of the model's files (16 hex digits): batch runs redo series when it changes."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Provenance for ``prediction.yaml`` and ``medseg info`` (JSON-serialisable)."""

    @property
    def float32_only(self) -> str | None:
        """Why the networks run in float32 only (the predictor then ignores ``precision: auto``); ``None``: any."""
        return None

    # ------------------------------------------------------------------ shared behaviour
    @property
    def label_names(self) -> dict[int, str]:
        """``{label value: name}`` including background 0."""
        return dict(self.output.labels)

    @property
    def num_channels(self) -> int:
        """Number of input channels."""
        return len(self.channels)

    def load_networks(self) -> list[nn.Module]:
        """The network(s), loaded once (several = folds, averaged)."""
        if self._networks is None:
            self._networks = self._load_networks()
        return self._networks

    def ensemble_key(self) -> dict[str, Any]:
        """What must be equal for two models to be ensembled (averaged logits)."""
        return {"preprocessing": self.preprocessing, "window": self.window, "output": self.output}

    def check_ensemble(self, other: ModelAdapter) -> None:
        """Raise :class:`ModelError` naming the first difference that forbids averaging with ``other``."""
        mine, theirs = self.ensemble_key(), other.ensemble_key()
        for name in mine:
            if mine[name] != theirs.get(name):
                raise ModelError(
                    f"{other.path}: cannot ensemble with {self.path}: models differ in {name} "
                    f"({theirs.get(name)!r} vs {mine[name]!r})"
                )


def hash_files(paths: Iterable[Path], *, extra: Sequence[str] = ()) -> str:
    """SHA-256 (16 hex digits) over the bytes of ``paths`` and the strings ``extra``.

    Raises:
        ModelError: A file cannot be read.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the model ({exc.strerror or exc})") from exc
    for text in extra:
        digest.update(text.encode())
    return digest.hexdigest()[:16]
