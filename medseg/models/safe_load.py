"""Loading tensors from files that may not be what they claim: never pickle, never a hint to unpickle.

``torch.load(weights_only=True)`` refuses arbitrary objects, but its error text recommends re-running
with ``weights_only=False`` - which would execute whatever the file contains.  Here every failure is a
:class:`~medseg.errors.ModelError` naming the file, "not a medseg weights file" for anything that is
not a PyTorch archive of tensors, and no message ever suggests unsafe loading.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError, ModelError

__all__ = ["load_tensor_file", "load_weights", "safe_reason"]


def safe_reason(exc: BaseException) -> str:
    """``Type: first line`` of an exception from ``torch.load``, without torch's advice to load unsafely."""
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if "weights_only" in text or "unpickl" in text.lower():  # torch's text recommends unsafe loading
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_tensor_file(path: Path, *, what: str = "medseg weights file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with typed, safe errors.

    Raises:
        ModelError: Missing or special file, not a PyTorch zip archive, objects other than tensors and
            plain containers, or a corrupt archive.
    """
    import torch

    from medseg.io.paths import require_readable_file

    try:
        require_readable_file(path, what=what)
    except MedsegError as exc:
        raise ModelError(str(exc)) from None
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a {what} (not a PyTorch zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{path}: not a {what} (it holds objects other than tensors; not loaded)") from None
    except MemoryError:
        raise ModelError(f"{path}: not enough memory to load the {what}") from None
    except Exception as exc:  # torch raises many types for corrupt archives
        raise ModelError(f"{path}: not a {what} ({_first_line(exc)})") from None


def load_weights(path: Path) -> dict[str, Any]:
    """A state dict (``{name: tensor}``) from ``weights.pt``.

    Raises:
        ModelError: See :func:`load_tensor_file`; also for anything but a mapping of names to tensors.
    """
    import torch

    state = load_tensor_file(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(f"{path}: not a medseg weights file (expected a state dict of named tensors)")
    return state
