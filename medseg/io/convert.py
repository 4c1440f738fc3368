"""``medseg convert``: every series (and volume file) under an input becomes one NIfTI + JSON sidecar.

Each output is ``<name>.nii.gz`` plus ``<name>.json`` (series UID and key, modality,
description, spacing, shape, full geometry, slice issues, source files).  Names come
from SeriesNumber and SeriesDescription (or the file stem), made unique with a short hash
of the series key.  Writes are atomic; existing outputs are refused unless ``overwrite``;
a series that cannot be converted is reported and the others are still converted.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError, OutputExistsError
from medseg.io.cli import add_convert_parser
from medseg.io.dicom import DicomSeries, TiltPolicy, load_series, scan_dicom
from medseg.io.images import VOLUME_SUFFIXES, read_image_file, split_suffix, write_json_atomic, write_volume
from medseg.io.paths import check_output_dir, refuse_input_overlap, require_input
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = ["ConvertItem", "add_convert_parser", "convert", "plan_conversion", "run_convert"]


@dataclass
class ConvertItem:
    """One thing to convert: a DICOM series or a volume file.

    Attributes:
        name: Output name (without suffix), unique within the output folder.
        series: The DICOM series, or ``None`` for a volume file.
        path: The volume file, or ``None`` for a DICOM series.
    """

    name: str
    series: DicomSeries | None = None
    path: Path | None = None

    @property
    def label(self) -> str:
        """What to call the item in messages."""
        if self.series is not None:
            return f"series {self.series.key or '<empty UID>'} ('{self.series.description}')"
        return str(self.path)


def plan_conversion(
    source: PathLike, *, include_localizers: bool = False
) -> tuple[list[ConvertItem], list[tuple[Path, str]]]:
    """Find what ``source`` holds (headers only) and name the outputs.

    Args:
        source: A folder (searched recursively), a DICOM file or a NIfTI/NRRD/MHA file.
        include_localizers: Also convert LOCALIZER images.

    Returns:
        ``(items, skipped)``: the items in a stable order, and ``(file, reason)`` for ignored files.

    Raises:
        InputError: ``source`` does not exist.
    """
    source = require_input(source)
    if source.is_file() and split_suffix(source)[1] in VOLUME_SUFFIXES:
        return [ConvertItem(name=_safe(split_suffix(source)[0]) or "volume", path=source)], []
    scan = scan_dicom(source, include_localizers=include_localizers)
    items = [ConvertItem(name=_series_name(s), series=s) for s in scan.series]
    skipped: list[tuple[Path, str]] = []
    for path, reason in scan.skipped:
        stem, suffix = split_suffix(path)
        if suffix in VOLUME_SUFFIXES:
            items.append(ConvertItem(name=_safe(stem) or "volume", path=path))
        elif not (suffix == ".raw" and path.with_suffix(".mhd").exists()):
            skipped.append((path, reason))
    return _unique_names(items), skipped


def convert(
    source: PathLike,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    tilt: TiltPolicy = "error",
    include_localizers: bool = False,
    select: list[str] | None = None,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Convert every DICOM series and volume file under ``source`` to NIfTI in ``out_dir``.

    Args:
        source: Folder, DICOM file or NIfTI/NRRD/MHA file.
        out_dir: Output folder (created).
        overwrite: Replace existing outputs.
        tilt: Gantry-tilt policy for DICOM series (``"error"`` or ``"resample"``).
        include_localizers: Also convert LOCALIZER images.
        select: Only these series (UID or key) / file names.
        log: Called with each finished item's record (see Returns), or ``None``.

    Returns:
        One record per item: ``name``, ``status`` (``"done"``/``"failed"``), ``output``,
        ``sidecar``, ``error``, ``seconds``, ``series_key``, ``slice_issues``.

    Raises:
        InputError: ``source`` is missing or holds nothing convertible.
    """
    out = Path(out_dir)
    refuse_input_overlap([out], [source], what="output folder")  # also: no re-ingesting earlier outputs
    check_output_dir(out)
    items, skipped = plan_conversion(source, include_localizers=include_localizers)
    if select:
        wanted = set(select)
        items = [
            i
            for i in items
            if i.name in wanted
            or (i.series is not None and ({i.series.key, i.series.uid} & wanted))
            or (i.path is not None and i.path.name in wanted)
        ]
    if not items:
        reasons = _summarise(skipped)
        raise InputError(
            Path(source), "no DICOM image series or volume files to convert" + (f" ({reasons})" if reasons else "")
        )
    records = []
    for item in items:
        record = _convert_one(item, out, overwrite=overwrite, tilt=tilt)
        records.append(record)
        if log is not None:
            log(record)
    return records


def _convert_one(item: ConvertItem, out: Path, *, overwrite: bool, tilt: TiltPolicy) -> dict[str, Any]:
    target = out / f"{item.name}.nii.gz"
    sidecar = out / f"{item.name}.json"
    record: dict[str, Any] = {
        "name": item.name,
        "source": str(item.path) if item.path is not None else None,
        "series_key": item.series.key if item.series is not None else None,
        "status": "failed",
        "output": None,
        "sidecar": None,
        "error": None,
        "slice_issues": [],
        "seconds": 0.0,
    }
    start = time.perf_counter()
    try:
        for path in (target, sidecar):
            if path.exists() and not overwrite:
                raise OutputExistsError(path)
        if item.series is not None:
            volume = load_series(item.series, tilt=tilt, dtype="native")
        else:
            volume = read_image_file(item.path)  # type: ignore[arg-type]
        info = _sidecar(item, volume)
        volume = Volume(array=_compact(volume.array), geometry=volume.geometry, kind=volume.kind, source=volume.source)
        write_volume(volume, target, overwrite=overwrite)
        try:
            write_json_atomic(sidecar, info, overwrite=overwrite)
        except BaseException:
            target.unlink(missing_ok=True)  # no half-written pair
            raise
        record.update(status="done", output=str(target), sidecar=str(sidecar), slice_issues=info["slice_issues"])
        record["source"] = info["source"]
    except MedsegError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # one bad series never stops the others
        text = (str(exc).strip().splitlines() or [""])[0]
        record["error"] = f"{item.label}: unexpected {type(exc).__name__}: {text} (please report this)"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _sidecar(item: ConvertItem, volume: Volume) -> dict[str, Any]:
    g = volume.geometry
    meta = volume.meta
    data: dict[str, Any] = {
        "source": volume.source,
        "series_uid": meta.get("series_uid"),
        "series_key": meta.get("series_key"),
        "modality": meta.get("modality"),
        "description": meta.get("series_description"),
        "series_number": meta.get("series_number"),
        "study_uid": meta.get("study_uid"),
        "body_part": meta.get("body_part"),
        "image_type": meta.get("image_type"),
        "shape": list(g.shape),
        "spacing": list(g.spacing),
        "origin_lps": list(g.origin),
        "direction_lps": g.direction.tolist(),
        "affine_ras": g.affine.tolist(),
        "orientation": g.orientation,
        "channels": volume.channels,
        "slice_issues": list(meta.get("slice_issues", [])),
        "gantry_tilt_deg": meta.get("gantry_tilt_deg"),
        "num_files": len(item.series.files) if item.series is not None else 1,
        "slice_files": meta.get("slice_files"),
        "sop_instance_uids": meta.get("sop_instance_uids"),
    }
    if item.series is None and "sidecar" in meta:
        data["input_sidecar"] = meta["sidecar"]
    from medseg import __version__

    data["converted_by"] = f"medseg {__version__}"
    return data


def _compact(array: np.ndarray) -> np.ndarray:
    """Store integral images (CT in HU, most MR) as int16/uint16/int32 instead of float32."""
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return array
    lo, hi = float(array.min()), float(array.max())
    for dtype in (np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            converted = array.astype(dtype)
            if np.array_equal(converted, array):
                return converted
            return array
    return array


def _series_name(series: DicomSeries) -> str:
    parts = []
    if series.series_number is not None:
        parts.append(f"{series.series_number:03d}" if series.series_number >= 0 else str(series.series_number))
    description = _safe(series.description) or _safe(series.modality) or "series"
    parts.append(description)
    if "#" in series.key:
        parts.append(_safe(series.key.split("#", 1)[1]))
    return "_".join(p for p in parts if p)


def _safe(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9.+-]+", "_", text.strip()).strip("._")
    return cleaned[:80]


def _unique_names(items: list[ConvertItem]) -> list[ConvertItem]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.name] = counts.get(item.name, 0) + 1
    for item in items:
        if counts[item.name] > 1:
            ident = item.series.key if item.series is not None else str(item.path)
            item.name = f"{item.name}_{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
    return items


def _summarise(skipped: list[tuple[Path, str]]) -> str:
    counts: dict[str, int] = {}
    for _, reason in skipped:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _format_record(record: dict[str, Any]) -> str:
    if record["status"] == "done":
        issues = record["slice_issues"]
        note = f"  [{len(issues)} slice issue(s): {'; '.join(issues)}]" if issues else ""
        return f"{record['name']}: {record['output']}  ({record['seconds']:.2f} s){note}"
    return f"{record['name']}: FAILED: {record['error']}"


def _print_record(record: dict[str, Any]) -> None:
    print(_format_record(record), file=sys.stdout if record["status"] == "done" else sys.stderr)


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``medseg convert`` (parser: :func:`medseg.io.cli.add_convert_parser`): exit 1 if any failed."""
    records = convert(
        args.input,
        args.output_dir,
        overwrite=args.overwrite,
        tilt=args.tilt,
        include_localizers=args.include_localizers,
        select=args.series,
        log=_print_record,
    )
    failed = sum(r["status"] != "done" for r in records)
    print(f"{len(records) - failed} converted to {args.output_dir}, {failed} failed")
    return 1 if failed else 0
