"""Stage 1 — loading and writing volumes with exact geometry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medseg._lazy import lazy_attributes
from medseg.errors import InputError

if TYPE_CHECKING:
    from medseg.io.dicom import (
        DicomScan,
        DicomSeries,
        TiltPolicy,
        discover_series,
        is_dicom_file,
        load_series,
        read_dicom_series,
        scan_dicom,
    )
    from medseg.io.grid import axis_mapping, reindex_to
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
    "DicomScan",
    "DicomSeries",
    "Geometry",
    "Volume",
    "atomic_path",
    "axis_mapping",
    "discover_series",
    "is_dicom_file",
    "label_dtype",
    "load_series",
    "load_volume",
    "read_dicom_series",
    "read_image_file",
    "reindex_to",
    "scan_dicom",
    "split_suffix",
    "write_json_atomic",
    "write_volume",
]

_EXPORTS = {
    **dict.fromkeys(
        (
            "DicomScan",
            "DicomSeries",
            "TiltPolicy",
            "discover_series",
            "is_dicom_file",
            "load_series",
            "read_dicom_series",
            "scan_dicom",
        ),
        "medseg.io.dicom",
    ),
    **dict.fromkeys(("axis_mapping", "reindex_to"), "medseg.io.grid"),
    **dict.fromkeys(
        ("VOLUME_SUFFIXES", "atomic_path", "read_image_file", "split_suffix", "write_json_atomic", "write_volume"),
        "medseg.io.images",
    ),
    **dict.fromkeys(("Geometry", "Volume", "label_dtype"), "medseg.io.volume"),
    **dict.fromkeys(("PathLike", "VolumeKind"), "medseg.types"),
}
# Imported on first use (pydicom, nibabel and SimpleITK take ~1 s), so `medseg --help` stays fast.
if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name stays an error
    __getattr__ = lazy_attributes(__name__, _EXPORTS)


def load_volume(
    path: PathLike,
    *,
    kind: VolumeKind = "image",
    allow_4d: bool = True,
    tilt: TiltPolicy = "error",
) -> Volume:
    """Load a volume from a NIfTI/NRRD/MHA file, a DICOM file or a DICOM series folder.

    Args:
        path: File or folder.
        kind: ``"image"`` or ``"label"`` (labels are checked to be non-negative integers and
            stored in the smallest unsigned dtype, for DICOM series too).
        allow_4d: Accept a 4th axis of a NIfTI/ITK file, or the volumes of a multi-volume DICOM
            series, as channels; ``False`` requires 3D.
        tilt: Gantry-tilted DICOM series: ``"error"`` or ``"resample"`` (see :func:`read_dicom_series`).

    Returns:
        The :class:`Volume` (array ``(C, X, Y, Z)``, RAS affine).

    Raises:
        InputError: Missing, unreadable or unsupported input; the message names it.
    """
    from medseg.io.dicom import is_dicom_file, read_dicom_series
    from medseg.io.images import VOLUME_SUFFIXES, _as_labels, read_image_file, split_suffix
    from medseg.io.volume import Volume

    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    _, suffix = split_suffix(p)
    if p.is_file() and suffix in VOLUME_SUFFIXES:
        return read_image_file(p, kind=kind, allow_4d=allow_4d)
    if p.is_file() and not is_dicom_file(p):
        raise InputError(p, f"not a supported volume (suffix {suffix or 'none'}; not DICOM)")
    volume = read_dicom_series(p, tilt=tilt)
    if volume.channels > 1 and (not allow_4d or kind == "label"):
        raise InputError(
            p,
            f"a multi-volume DICOM series ({volume.channels} volumes: time points, diffusion directions or echoes) "
            "where one 3D volume is expected; read one volume with series_uid='<UID>#vol=<n>'",
        )
    if kind == "label":
        volume = Volume(
            array=_as_labels(p, volume.array),
            geometry=volume.geometry,
            kind="label",
            source=volume.source,
            meta=volume.meta,
        )
    return volume
