"""Stage 1 — loading and writing volumes with exact geometry."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError
from medseg.io.dicom import DicomSeries, discover_series, is_dicom_file, read_dicom_series
from medseg.io.images import (
    VOLUME_SUFFIXES,
    atomic_path,
    read_image_file,
    split_suffix,
    write_json_atomic,
    write_volume,
)
from medseg.io.volume import Geometry, Volume, label_dtype
from medseg.types import PathLike, VolumeKind

__all__ = [
    "VOLUME_SUFFIXES",
    "DicomSeries",
    "Geometry",
    "Volume",
    "atomic_path",
    "discover_series",
    "is_dicom_file",
    "label_dtype",
    "load_volume",
    "read_dicom_series",
    "read_image_file",
    "split_suffix",
    "write_json_atomic",
    "write_volume",
]


def load_volume(path: PathLike, *, kind: VolumeKind = "image") -> Volume:
    """Load a volume from a NIfTI/NRRD/MHA file, a DICOM file or a DICOM series folder.

    Args:
        path: File or folder.
        kind: ``"image"`` or ``"label"``.

    Returns:
        The :class:`Volume` (array ``(C, X, Y, Z)``, RAS affine).

    Raises:
        InputError: Missing, unreadable or unsupported input; the message names it.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if p.is_dir():
        return read_dicom_series(p)
    _, suffix = split_suffix(p)
    if suffix in VOLUME_SUFFIXES:
        return read_image_file(p, kind=kind)
    if is_dicom_file(p):
        return read_dicom_series(p)
    raise InputError(p, f"not a supported volume (suffix {suffix or 'none'}; not DICOM)")
