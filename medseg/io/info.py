"""``medseg info``: the series in a folder (headers only), the geometry of one volume, or a model.

For a folder every DICOM image series is listed (key/UID, modality, description, slices,
shape, spacing, orientation code) from headers alone, with a count of skipped files per
reason; when the folder holds exactly one series its volume is also loaded and
described.  For a file (NIfTI, NRRD, MHA, or a DICOM file) the volume is loaded and its
geometry (shape, spacing, origin, direction, orientation) and value range are shown.  For a model
(a medseg model directory or an nnU-Net results folder) the model seam's ``describe()`` is shown
(channels, labels, spacing, patch, network, folds; no weights are loaded): the one place the IO stage
uses :mod:`medseg.models`, lazily.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.cli import add_info_parser
from medseg.io.dicom import load_series, scan_dicom
from medseg.io.images import VOLUME_SUFFIXES, read_image_file, split_suffix
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = ["add_info_parser", "describe_volume", "format_info", "gather_info", "run_info"]


def gather_info(path: PathLike, *, load: bool = True, tilt: str = "error") -> dict[str, Any]:
    """Collect what ``medseg info`` shows, as JSON-serialisable data.

    Args:
        path: Folder, DICOM file or volume file.
        load: For a folder with one series, also load it and describe its volume.
        tilt: Gantry-tilt policy when loading DICOM (``"error"`` or ``"resample"``).

    Returns:
        ``{"path", "kind": "folder" | "file" | "model", "series": [...], "skipped": {...}, "volume": {...} | None}``
        (a model also has ``"model"``: its description).

    Raises:
        InputError: Missing path, nothing readable, or an unreadable volume file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if p.is_dir():
        from medseg.models.adapters import ADAPTERS, open_model  # a model folder: the model seam describes it

        if any(adapter.recognises(p) for adapter in ADAPTERS):
            model = open_model(p).describe()
            return {"path": str(p), "kind": "model", "series": [], "skipped": {}, "volume": None, "model": model}
    if p.is_file() and split_suffix(p)[1] in VOLUME_SUFFIXES:
        volume = read_image_file(p)
        return {"path": str(p), "kind": "file", "series": [], "skipped": {}, "volume": describe_volume(volume)}
    scan = scan_dicom(p)
    if not scan.series:
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
        "volume": None,
    }
    if len(scan.series) == 1 and (load or p.is_file()):
        volume = load_series(scan.series[0], tilt=tilt, source=p, dtype="native")  # type: ignore[arg-type]
        data["volume"] = describe_volume(volume)
    return data


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
    }


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
        header = ["key / series UID", "modality", "description", "slices", "shape", "spacing (mm)", "orient"]
        rows = [
            [
                s["key"] or "<empty UID>",
                s["modality"],
                repr(s["description"]),
                str(s["num_slices"]),
                "x".join(str(v) for v in s["shape"]),
                "x".join(f"{v:.4g}" for v in s["spacing"]) if s["spacing"] else "?",
                s["orientation_code"] or "?",
            ]
            for s in series
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    volume = data.get("volume")
    if volume is not None:
        lines.extend(_format_volume(volume, data["path"] if not series else None))
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


def _format_volume(v: dict[str, Any], title: str | None) -> list[str]:
    lines = [title] if title else ["volume"]
    lines.append(f"  shape        {tuple(v['shape'])}  ({v['channels']} channel(s), {v['dtype']})")
    lines.append(f"  spacing      {tuple(round(s, 6) for s in v['spacing'])} mm")
    lines.append(f"  origin (LPS) {tuple(round(o, 4) for o in v['origin_lps'])} mm")
    lines.append(
        "  direction    " + "  ".join("(" + ", ".join(f"{x:+.6f}" for x in row) + ")" for row in v["direction_lps"])
    )
    lines.append(f"  orientation  {v['orientation']} (RAS+ axis codes)")
    lo, hi = v["value_range"]
    lines.append(f"  value range  [{lo:g}, {hi:g}]" if lo is not None else "  value range  (no finite values)")
    for issue in v.get("slice_issues", []):
        lines.append(f"  slice issue  {issue}")
    return lines


def run_info(args: argparse.Namespace) -> int:
    """Handler of ``medseg info`` (parser: :func:`medseg.io.cli.add_info_parser`): print, exit 0."""
    data = gather_info(args.input, load=not args.headers_only, tilt=args.tilt)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_info(data))
    return 0
