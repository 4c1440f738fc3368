"""Read limits: sizes declared in headers are checked before anything is allocated.

A header can declare any size (a 348-byte NIfTI header may claim 30000³ voxels, a DICOM header
65535 x 65535 pixels); the readers compare the declaration with the bytes actually present and
with a ceiling before allocating, so a lying header gives a clear :class:`~medseg.errors.InputError`
instead of a ``MemoryError``, an "Unable to allocate 48 GiB" or a machine swapping to death.

* **Uncompressed data** must be present in full: ``offset + declared bytes <= file size``.
* **Compressed data** (``.nii.gz``, gzip NRRD/MHA, JPEG/RLE DICOM) cannot be measured without
  decompressing it, so the declaration is bounded by what the compressed bytes could possibly expand
  to (deflate expands at most :data:`DEFLATE_MAX_RATIO` times) and by the ceiling, and the data are read
  in chunks into memory that is only touched as bytes arrive (a truncated stream is an error).
* **The ceiling** (:attr:`ReadLimits.max_volume_bytes`, default 16 GiB of decoded voxel data per
  volume) is configurable: ``medseg --max-input-gb N ...`` or :func:`read_limits` /
  :func:`set_read_limits` in Python.
* **YAML** files are bounded too (:attr:`ReadLimits.max_yaml_bytes`, :attr:`ReadLimits.max_yaml_nodes`;
  see :mod:`medseg.io.safe_yaml`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputError

__all__ = [
    "DEFLATE_MAX_RATIO",
    "ReadLimits",
    "check_declared_size",
    "format_bytes",
    "get_read_limits",
    "read_limits",
    "set_read_limits",
]

#: Largest expansion of deflate (zlib/gzip) data: 1032:1 (RFC 1951 worst case), plus header slack.
DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class ReadLimits:
    """Ceilings applied by every reader.

    Attributes:
        max_volume_bytes: Decoded voxel data of one volume / series (bytes).
        max_yaml_bytes: Size of a YAML file (configs, plans, rules, profiles, dataset descriptions).
        max_yaml_nodes: Nodes of a YAML document after expanding aliases (a "billion laughs" document has
            few bytes and billions of nodes).
        max_yaml_depth: Nesting depth of a YAML document.
        max_model_bytes: Size of an exported model file (ONNX / TorchScript), read whole into memory.
    """

    max_volume_bytes: int = 16 * 1024**3
    max_yaml_bytes: int = 8 * 1024**2
    max_yaml_nodes: int = 1_000_000
    max_yaml_depth: int = 64
    max_model_bytes: int = 4 * 1024**3


_LIMITS = ReadLimits()


def get_read_limits() -> ReadLimits:
    """The limits in force."""
    return _LIMITS


def set_read_limits(**changes: int) -> ReadLimits:
    """Change limits for the rest of the process (``set_read_limits(max_volume_bytes=...)``); returns the old ones."""
    global _LIMITS
    old = _LIMITS
    _LIMITS = dataclasses.replace(_LIMITS, **changes)
    return old


@contextlib.contextmanager
def read_limits(**changes: int) -> Iterator[ReadLimits]:
    """Change limits inside a ``with`` block (restored on exit).

    Example: ``with read_limits(max_volume_bytes=2**30): load_volume(path)``.
    """
    old = set_read_limits(**changes)
    try:
        yield _LIMITS
    finally:
        set_read_limits(**dataclasses.asdict(old))


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover


def check_declared_size(
    path: str | Path,
    declared: int,
    *,
    what: str,
    present: int | None = None,
    compressed: int | None = None,
) -> None:
    """Refuse a declared data size above the ceiling or above what the file can hold.

    Args:
        path: The file (named in the error).
        declared: Bytes the header declares (decoded).
        what: What declares it, e.g. ``"the header (512x512x300 int16)"``.
        present: Bytes actually present for uncompressed data (``None``: not known).
        compressed: Size of the compressed data the declaration must come from (``None``: not compressed).

    Raises:
        InputError: The declaration exceeds the ceiling, the bytes present, or what the compressed data can hold.
    """
    limit = _LIMITS.max_volume_bytes
    if declared > limit:
        raise InputError(
            path,
            f"{what} declares {format_bytes(declared)} of voxel data, more than the read limit of "
            f"{format_bytes(limit)} (raise it with medseg --max-input-gb if the file is genuine)",
        )
    if present is not None and declared > present:
        raise InputError(path, f"truncated: {max(present, 0)} bytes of voxel data for {declared} declared by {what}")
    if compressed is not None and declared > compressed * DEFLATE_MAX_RATIO + 65536:
        raise InputError(
            path,
            f"{what} declares {format_bytes(declared)} of voxel data, more than {format_bytes(compressed)} of "
            "compressed data can hold: the header is wrong",
        )
