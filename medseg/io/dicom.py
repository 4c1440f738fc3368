"""DICOM series discovery (headers only) and loading with exact geometry.

Pixel decoding goes through pydicom and its pixel plugins (``pylibjpeg`` for JPEG,
JPEG-LS and JPEG 2000; RLE and raw syntaxes natively).  Slices are sorted by their
position along the slice normal (never by InstanceNumber) and the spacing between
slices is measured from those positions, not taken from SliceThickness.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import InputError
from medseg.io.volume import Geometry, Volume
from medseg.types import PathLike

__all__ = ["DicomSeries", "discover_series", "is_dicom_file", "read_dicom_series"]

_SPACING_TOLERANCE = 1e-3  # relative; beyond it the series has non-uniform spacing


@dataclass
class DicomSeries:
    """One image series found on disk (headers only).

    Attributes:
        uid: SeriesInstanceUID (may be empty in anonymised data).
        files: The slice files, unsorted.
        modality: Modality of the first slice.
        description: SeriesDescription of the first slice.
    """

    uid: str
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    description: str = ""


def is_dicom_file(path: Path) -> bool:
    """True if ``path`` has the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def discover_series(root: PathLike) -> list[DicomSeries]:
    """Group the image files under ``root`` (a folder, recursive, or one file) into series.

    Only headers are read.  Files that are not DICOM, or DICOM without pixel data
    (structured reports, RTSTRUCT, DICOMDIR, ...), are ignored.
    """
    root = Path(root)
    candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[str, DicomSeries] = defaultdict(lambda: DicomSeries(uid=""))
    for path in candidates:
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "PixelData" not in ds and "Rows" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        series = groups[uid]
        if not series.files:
            series.uid = uid
            series.modality = str(ds.get("Modality", ""))
            series.description = str(ds.get("SeriesDescription", ""))
        series.files.append(path)
    return list(groups.values())


def read_dicom_series(source: PathLike, *, series_uid: str | None = None) -> Volume:
    """Read one single-frame DICOM image series into a volume in HU / stored units.

    Args:
        source: A folder containing the series (searched recursively) or one of its files.
        series_uid: Which series to read when the folder holds several.

    Returns:
        ``Volume`` with array ``(1, X, Y, Z)`` as float32 (rescale slope/intercept applied),
        X along the rows' direction (``ImageOrientationPatient[:3]``), Z along the slice normal.

    Raises:
        InputError: No series, several series without ``series_uid``, missing geometry
            tags, duplicate or missing slices, non-uniform spacing or differing slice sizes.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such file or folder")
    all_series = discover_series(source)
    if series_uid is not None:
        all_series = [s for s in all_series if s.uid == series_uid]
    if not all_series:
        raise InputError(source, "no DICOM image series found" + (f" with UID {series_uid}" if series_uid else ""))
    if len(all_series) > 1:
        uids = ", ".join(s.uid or "<empty>" for s in all_series)
        raise InputError(source, f"contains {len(all_series)} series ({uids}); choose one with series_uid")
    series = all_series[0]
    datasets = [_read_slice(path) for path in series.files]
    return _stack(source, series, datasets)


def _read_slice(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"cannot read DICOM ({exc})") from exc


def _stack(source: Path, series: DicomSeries, datasets: list[pydicom.Dataset]) -> Volume:
    first = datasets[0]
    for ds, path in zip(datasets, series.files, strict=True):
        for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if tag not in ds:
                raise InputError(path, f"missing {tag}; cannot place the slice in patient space")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(path, "multi-frame DICOM is not supported by this reader yet")
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise InputError(source, f"series {series.uid} mixes slice sizes {sorted(sizes)}")
    for ds, path in zip(datasets, series.files, strict=True):
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise InputError(path, f"series {series.uid} mixes slice orientations")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    if len(steps) and np.min(steps) < 1e-4:
        dup = np.argmin(steps)
        raise InputError(
            series.files[order[dup + 1]],
            f"duplicate slice position {along[dup]:.3f} mm in series {series.uid}",
        )
    if len(steps) > 1 and (np.max(steps) - np.min(steps)) > _SPACING_TOLERANCE * np.median(steps) + 1e-3:
        raise InputError(
            source,
            f"series {series.uid} has non-uniform slice spacing ({np.min(steps):.3f}-{np.max(steps):.3f} mm):"
            " missing slices or variable spacing",
        )
    slice_spacing = float(np.median(steps)) if len(steps) else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    slice_dir = (positions[order[-1]] - positions[order[0]]) if len(steps) else normal
    slice_dir = slice_dir / np.linalg.norm(slice_dir)
    if abs(float(slice_dir @ normal)) < 1 - 1e-4:
        tilt = np.degrees(np.arccos(min(1.0, abs(float(slice_dir @ normal)))))
        raise InputError(source, f"series {series.uid} has gantry tilt / sheared slices ({tilt:.2f} degrees)")
    arrays = []
    for index in order:
        ds = datasets[index]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises many types for undecodable pixel data
            raise InputError(series.files[index], f"cannot decode pixel data ({exc})") from exc
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        arrays.append(pixels * slope + intercept)
    # pixel_array is (rows, columns): rows advance along col_dir, columns along row_dir.
    volume = np.stack(arrays, axis=-1).transpose(1, 0, 2)  # (X=columns, Y=rows, Z)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    geometry = Geometry.from_itk(
        shape=volume.shape,  # type: ignore[arg-type]
        spacing=(col_spacing, row_spacing, slice_spacing),
        origin=tuple(positions[order[0]]),
        direction=direction,
    )
    meta = {
        "series_uid": series.uid,
        "modality": series.modality,
        "series_description": series.description,
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "sop_instance_uids": [str(datasets[i].get("SOPInstanceUID", "")) for i in order],
    }
    return Volume(array=volume[None], geometry=geometry, kind="image", source=str(source), meta=meta)
