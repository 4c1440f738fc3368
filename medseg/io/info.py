"""``medseg info``: the series in a folder (headers only), the geometry of one volume, or a model.

For a folder every DICOM image series is listed (key/UID, modality, description, slices,
volumes and b-values of multi-volume series, shape, spacing, orientation code) from headers
alone, with a count of skipped files per reason and the DICOM SEG objects found; when the
folder holds exactly one series its volume is also loaded and described.  For a file (NIfTI,
NRRD, MHA, or a DICOM file) the volume is loaded and its geometry (shape, spacing, origin,
direction, orientation) and value range are shown.  A DICOM SEG file is read onto the grid of
the series it references when that series is found (``reference`` folder, else the SEG's own
folder), else onto its own frames, and its segments are listed.  For a model (a medseg model
directory or an nnU-Net results folder) the model seam's ``describe()`` is shown (channels, labels,
spacing, patch, network, folds; no weights are loaded): the one place the IO stage uses
:mod:`medseg.models`, lazily.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.cli import add_info_parser
from medseg.io.dicom import load_series, read_dataset, scan_dicom
from medseg.io.images import VOLUME_SUFFIXES, read_image_file, split_suffix
from medseg.io.paths import require_input
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = ["add_info_parser", "describe_volume", "format_info", "gather_info", "run_info"]


def gather_info(
    path: PathLike, *, load: bool = True, tilt: str = "error", reference: PathLike | None = None
) -> dict[str, Any]:
    """Collect what ``medseg info`` shows, as JSON-serialisable data.

    Args:
        path: Folder, DICOM file (image or SEG) or volume file.
        load: For a folder with one series, also load it and describe its volume.
        tilt: Gantry-tilt policy when loading DICOM (``"error"`` or ``"resample"``).
        reference: For a DICOM SEG, the folder holding the series it references (default: its folder).

    Returns:
        ``{"path", "kind": "folder" | "file" | "seg" | "model", "series": [...], "skipped": {...},
        "segmentations": [...], "volume": {...} | None}`` (``"segmentation"`` for a SEG file, ``"model"``:
        the description of a model).

    Raises:
        InputError: Missing path, nothing readable, or an unreadable volume file.
    """
    from medseg.io.dicom_seg import is_dicom_seg

    p = require_input(path)
    from medseg.models.adapters import ADAPTERS, open_model  # a model (folder or exported file): the model seam

    if any(adapter.recognises(p) for adapter in ADAPTERS):
        model = open_model(p).describe()
        return {"path": str(p), "kind": "model", "series": [], "skipped": {}, "volume": None, "model": model}
    if p.is_file() and split_suffix(p)[1] in VOLUME_SUFFIXES:
        volume = read_image_file(p)
        return {"path": str(p), "kind": "file", "series": [], "skipped": {}, "volume": describe_volume(volume)}
    if p.is_file() and is_dicom_seg(p):
        return _seg_info(p, reference)
    scan = scan_dicom(p)
    segs = [_seg_summary(f) for f, reason in scan.skipped if reason.startswith("segmentation (DICOM SEG)")]
    if not scan.series:
        if segs:
            skipped = scan.skipped_summary()
            return {
                "path": str(p),
                "kind": "folder",
                "series": [],
                "skipped": skipped,
                "segmentations": segs,
                "volume": None,
            }
        if p.is_file():
            reason = scan.skipped[0][1] if scan.skipped else "no image"
            raise InputError(p, f"not a DICOM image or volume file: {reason}")
        counts = scan.skipped_summary()
        note = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        raise InputError(p, "no DICOM image series found" + (f" ({note})" if note else ""))
    data: dict[str, Any] = {
        "path": str(p),
        "kind": "file" if p.is_file() else "folder",
        "series": [s.to_dict() for s in scan.series],
        "skipped": scan.skipped_summary(),
        "segmentations": segs,
        "volume": None,
    }
    if len(scan.series) == 1 and (load or p.is_file()):
        volume = load_series(scan.series[0], tilt=tilt, source=p, dtype="native")  # type: ignore[arg-type]
        data["volume"] = describe_volume(volume)
    return data


def _seg_summary(path: Path) -> dict[str, Any]:
    """Header facts of a DICOM SEG found in a folder (no pixels decoded)."""
    try:
        ds = read_dataset(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        return {"file": str(path), "error": f"{type(exc).__name__}: {exc}"}
    refs = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence") or []]
    return {
        "file": str(path),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_number": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        "description": str(ds.get("SeriesDescription", "") or ""),
        "segmentation_type": str(ds.get("SegmentationType", "") or ""),
        "referenced_series_uid": refs[0] if refs else None,
        "segments": [str(item.get("SegmentLabel", "")) for item in ds.get("SegmentSequence") or []],
    }


def _seg_info(path: Path, reference: PathLike | None) -> dict[str, Any]:
    from medseg.io.dicom_seg import find_reference, read_dicom_seg

    summary = _seg_summary(path)
    source = find_reference(path, reference)
    grid = "referenced series" if source is not None else "SEG frames"
    try:
        labels = read_dicom_seg(path, reference=source, combine=False)
    except InputError:
        if source is None:
            raise
        labels, grid = read_dicom_seg(path, combine=False), "SEG frames (not on the referenced grid)"
    summary.update(
        grid=grid,
        reference_source=source.source if source is not None and grid == "referenced series" else None,
        segments=labels.meta.get("segments", []),
    )
    volume = describe_volume(labels)
    volume.pop("value_range", None)
    return {"path": str(path), "kind": "seg", "series": [], "skipped": {}, "segmentation": summary, "volume": volume}


def describe_volume(volume: Volume) -> dict[str, Any]:
    """Geometry, dtype, channels, value range and slice issues of a loaded volume."""
    array = volume.array
    finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
    value_range = [float(finite.min()), float(finite.max())] if finite.size else [None, None]
    return {
        "source": volume.source,
        "channels": volume.channels,
        "dtype": str(array.dtype),
        **volume.geometry.to_dict(),
        "value_range": value_range,
        "slice_issues": list(volume.meta.get("slice_issues", [])),
        **_volumes_info(volume),
    }


def _volumes_info(volume: Volume) -> dict[str, Any]:
    if not volume.meta.get("num_volumes"):
        return {}
    out: dict[str, Any] = {"num_volumes": volume.meta["num_volumes"]}
    if volume.meta.get("b_values") is not None:
        out["b_values"] = volume.meta["b_values"]
    return out


def format_info(data: dict[str, Any]) -> str:
    """Human-readable text for :func:`gather_info` output."""
    lines: list[str] = []
    if data.get("model") is not None:
        return _format_model(data["model"])
    series = data["series"]
    if series:
        skipped = data["skipped"]
        skip_note = ""
        if skipped:
            skip_note = f"; skipped {sum(skipped.values())} file(s): " + ", ".join(
                f"{n} {r}" for r, n in sorted(skipped.items())
            )
        lines.append(f"{data['path']}: {len(series)} DICOM series{skip_note}")
        header = [
            "#",
            "key / series UID",
            "modality",
            "description",
            "slices",
            "vols",
            "shape",
            "spacing (mm)",
            "orient",
        ]
        rows = [
            [
                "" if s.get("series_number") is None else str(s["series_number"]),  # what --series NUMBER picks
                s["key"] or "<empty UID>",
                s["modality"],
                repr(s["description"]),
                str(s["num_slices"]),
                str(s.get("num_volumes", 1)),
                "x".join(str(v) for v in s["shape"]),
                "x".join(f"{v:.4g}" for v in s["spacing"]) if s["spacing"] else "?",
                s["orientation_code"] or "?",
            ]
            for s in series
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        for s in series:
            if s.get("b_values"):
                lines.append(f"  {s['key']}: b-values {_b_values(s['b_values'])} s/mm²")
    for seg in data.get("segmentations") or []:
        if "error" in seg:
            lines.append(f"  DICOM SEG {seg['file']}: unreadable ({seg['error']})")
            continue
        lines.append(
            f"  DICOM SEG {seg['file']}: {seg['segmentation_type']}, {len(seg['segments'])} segment(s) "
            f"({', '.join(seg['segments'][:8])}{', ...' if len(seg['segments']) > 8 else ''}), references series "
            f"{seg['referenced_series_uid'] or '?'}"
        )
    if data.get("kind") == "seg":
        lines.extend(_format_seg(data))
    volume = data.get("volume")
    if volume is not None:
        lines.extend(_format_volume(volume, data["path"] if not series and data.get("kind") != "seg" else None))
    return "\n".join(lines)


def _format_model(m: dict[str, Any]) -> str:
    """A model's ``describe()`` as aligned ``key  value`` lines."""
    lines = [f"{m.get('path')}: {m.get('format')}"]
    for key, value in m.items():
        if key in ("path", "format") or value is None:
            continue
        if key == "channels":
            value = ", ".join(f"{c['name']} ({c['modality']}, {c['normalization']})" for c in value)
        elif key == "labels":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        lines.append(f"  {key:<18} {value}")
    return "\n".join(lines)


def _b_values(values: list[float | None]) -> str:
    """``0, 1000 x30, 2000 x30`` style summary of per-volume b-values, in acquisition order."""
    parts: list[str] = []
    previous, count = None, 0
    for value in [*values, object()]:
        if value == previous:
            count += 1
            continue
        if count:
            text = "?" if previous is None else f"{previous:g}"  # type: ignore[str-format]
            parts.append(text if count == 1 else f"{text} x{count}")
        previous, count = value, 1
    return ", ".join(parts)


def _format_seg(data: dict[str, Any]) -> list[str]:
    seg = data["segmentation"]
    lines = [
        f"{data['path']}: DICOM SEG ({seg['segmentation_type']}), series {seg['series_number']} "
        f"'{seg['description']}', references series {seg['referenced_series_uid'] or '?'}",
        f"  grid: {seg['grid']}" + (f" ({seg['reference_source']})" if seg.get("reference_source") else ""),
    ]
    rows = [["segment", "value", "label", "type", "voxels"]]
    for item in seg["segments"]:
        rows.append([str(item["number"]), str(item["value"]), item["label"], item["type"] or "", str(item["voxels"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _format_volume(v: dict[str, Any], title: str | None) -> list[str]:
    lines = [title] if title else ["volume"]
    channels = f"{v['num_volumes']} volumes" if v.get("num_volumes") else f"{v['channels']} channel(s)"
    lines.append(f"  shape        {tuple(v['shape'])}  ({channels}, {v['dtype']})")
    if v.get("b_values"):
        lines.append(f"  b-values     {_b_values(v['b_values'])} s/mm²")
    lines.append(f"  spacing      {tuple(round(s, 6) for s in v['spacing'])} mm")
    lines.append(f"  origin (LPS) {tuple(round(o, 4) for o in v['origin_lps'])} mm")
    lines.append(
        "  direction    " + "  ".join("(" + ", ".join(f"{x:+.6f}" for x in row) + ")" for row in v["direction_lps"])
    )
    lines.append(f"  orientation  {v['orientation']} (RAS+ axis codes)")
    if "value_range" in v:
        lo, hi = v["value_range"]
        lines.append(f"  value range  [{lo:g}, {hi:g}]" if lo is not None else "  value range  (no finite values)")
    for issue in v.get("slice_issues", []):
        lines.append(f"  slice issue  {issue}")
    return lines


def run_info(args: argparse.Namespace) -> int:
    """Handler of ``medseg info`` (parser: :func:`medseg.io.cli.add_info_parser`): print, exit 0."""
    data = gather_info(
        args.input, load=not args.headers_only, tilt=args.tilt, reference=getattr(args, "reference", None)
    )
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_info(data))
    return 0
