"""One seam for every runnable model: :func:`open_model` -> :class:`ModelAdapter`.

Formats (each a :class:`ModelAdapter` subclass in :data:`ADAPTERS`, tried in order):

* :class:`~medseg.models.adapters.medseg_dir.MedsegModelDir` - a ``medseg train`` model directory;
* :class:`~medseg.models.adapters.nnunet.NnUNetFolder` - an nnU-Net v2 results folder
  ``DatasetXXX_Name/Trainer__Plans__Configuration/`` (``dataset.json``, ``plans.json``,
  ``fold_*/checkpoint_{final,best}.pth``);
* :class:`~medseg.models.adapters.exported.ExportedModel` - a ``.onnx`` / ``.pt`` / ``.ts`` file written by
  ``medseg export`` (:mod:`medseg.models.export`).

A new format is a new subclass appended to :data:`ADAPTERS`; nothing outside :mod:`medseg.models` asks
which format a model is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medseg.errors import ModelError
from medseg.models.adapters.base import (
    Checkpoint,
    InputChannel,
    ModelAdapter,
    OutputDecoding,
    PlanRecipe,
    WindowSettings,
)
from medseg.models.adapters.exported import ExportedModel
from medseg.models.adapters.medseg_dir import MedsegModelDir
from medseg.models.adapters.nnunet import NnUNetFolder, NnUNetRecipe
from medseg.types import PathLike

__all__ = [
    "ADAPTERS",
    "Checkpoint",
    "ExportedModel",
    "InputChannel",
    "ModelAdapter",
    "NnUNetRecipe",
    "OutputDecoding",
    "PlanRecipe",
    "WindowSettings",
    "open_model",
    "parse_folds",
]

#: Model formats, in the order they are tried.
ADAPTERS: list[type[ModelAdapter]] = [MedsegModelDir, NnUNetFolder, ExportedModel]


def parse_folds(text: str | Sequence[str | int] | None) -> tuple[str, ...] | None:
    """``"0,1"`` / ``"all"`` / ``[0, 1]`` -> ``("0", "1")`` / ``("all",)``; ``None`` -> every fold found.

    Raises:
        ModelError: An entry that is neither a non-negative integer nor ``all``.
    """
    if text is None:
        return None
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    bad = [s for s in items if not (s.isdigit() or s == "all")]
    if bad or not items:
        raise ModelError(f"--folds: expected fold numbers like 0,1,2 or 'all', got {text!r}")
    return tuple(dict.fromkeys(items))


def open_model(
    path: PathLike | ModelAdapter,
    *,
    folds: str | Sequence[str | int] | None = None,
    checkpoint: Checkpoint = "final",
) -> ModelAdapter:
    """Open any model medseg can run.

    Args:
        path: A medseg model directory, an nnU-Net v2 results folder or a ``medseg export`` file (an adapter
            is returned as is).
        folds: nnU-Net folds to ensemble (``"0,1"``, ``"all"`` = the ``fold_all`` model); default: every
            numbered fold with the checkpoint (``fold_all`` when there is none).
        checkpoint: nnU-Net ``final`` (``checkpoint_final.pth``) or ``best`` (``checkpoint_best.pth``).

    Returns:
        The adapter; networks are loaded on first use (:meth:`ModelAdapter.load_networks`).

    Raises:
        ModelError: Not a model, or a model folder that is incomplete or invalid (the message names the
            file and the reason).
    """
    if isinstance(path, ModelAdapter):
        return path
    p = Path(path)
    if checkpoint not in ("final", "best"):
        raise ModelError(f"--checkpoint must be final or best, got {checkpoint!r}")
    if not p.exists():
        raise ModelError(f"{p}: model not found")
    for adapter in ADAPTERS:
        if adapter.recognises(p):
            return adapter.open(p, folds=parse_folds(folds), checkpoint=checkpoint)
    if p.is_dir() and any((p / name).exists() for name in ("config.yaml", "weights.pt")):
        return MedsegModelDir(p)  # names the missing files
    raise ModelError(
        f"{p}: not a model (expected a medseg model directory with plan.yaml, an nnU-Net v2 results folder "
        "Trainer__Plans__Configuration/ with dataset.json, plans.json and fold_*/checkpoint_final.pth, or a "
        ".onnx/.pt file written by medseg export)"
    )
