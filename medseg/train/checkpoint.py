"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the iteration counter, the network, optimiser, LR scheduler and
gradient-scaler states, the RNG states (Python, NumPy, torch CPU and CUDA), the best
validation score so far, the metric rows, and the config/plan/split it belongs to.  The
data order needs no state: sample ``g`` of a run is a pure function of the seed and
``g`` (see :mod:`medseg.train.data`), so resuming at iteration ``k`` draws the same
patches as the uninterrupted run.

Files are written atomically: ``torch.save`` into a temporary file in the same folder,
``fsync``, then ``os.replace`` -- a kill at any moment leaves the previous checkpoint
intact (at worst a stray ``.last.*.tmp.pt`` file).  Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import ModelError
from medseg.io.images import atomic_path
from medseg.types import PathLike

__all__ = ["CHECKPOINT_FORMAT", "capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch, CUDA) in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng`'s result."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    legacy = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    np.random.set_state(legacy)  # noqa: NPY002 - the legacy global generator is what libraries use
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_path(path, overwrite=True) as tmp, tmp.open("wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems do not allow fsync on folders
        pass
    return path


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on CPU).

    Raises:
        ModelError: Missing, truncated/corrupt, or not a medseg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no checkpoint to resume from")
    from medseg.models.safe_load import load_tensor_file

    state = load_tensor_file(path, what="medseg training checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "iteration" not in state:
        raise ModelError(f"{path}: not a medseg training checkpoint")
    return state
