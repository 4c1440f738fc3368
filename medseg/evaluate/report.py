"""Evaluation report files.

``metrics.csv`` (one row per case x structure), ``lesions.csv`` (one row per lesion),
``summary.json`` (aggregates, conventions, options, problems: the machine-readable summary),
``report.md``, ``report.html`` (self-contained: plots and overlays embedded) and
``overlays/<case>.png``.

Every file is written atomically (temporary file + rename); if writing the report fails part way,
the files this call already wrote are removed again.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import OutputExistsError
from medseg.evaluate.html import render_html
from medseg.evaluate.lesions import LESION_ROW_COLUMNS
from medseg.evaluate.metrics import CONVENTIONS, ROW_COLUMNS, aggregate
from medseg.evaluate.plots import metric_plots_png
from medseg.io.images import atomic_path, write_json_atomic

__all__ = [
    "LESION_CSV_COLUMNS",
    "OVERLAY_DIR",
    "REPORT_FILES",
    "OverlayImage",
    "json_safe",
    "overlay_name",
    "write_report",
]

#: Sub-folder of the report holding the overlay PNGs.
OVERLAY_DIR = "overlays"

#: Fixed report files (overlays come on top).
REPORT_FILES: tuple[str, ...] = ("metrics.csv", "lesions.csv", "summary.json", "report.md", "report.html")

#: Columns of ``lesions.csv``.
LESION_CSV_COLUMNS: tuple[str, ...] = ("case", "kind", "label", "name", *LESION_ROW_COLUMNS)


@dataclass(frozen=True)
class OverlayImage:
    """A rendered overlay of one case.

    Attributes:
        case: Case id.
        png: PNG file content.
        caption: Text under the image.
        focus_lps_mm: Point the slices go through (LPS mm).
    """

    case: str
    png: bytes
    caption: str
    focus_lps_mm: tuple[float, float, float]


def overlay_name(case_id: str) -> str:
    """File name of a case's overlay (characters unsafe in file names become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id) + ".png"


def write_report(
    rows: list[dict[str, Any]],
    out_dir: Path,
    *,
    label_names: Mapping[int, str],
    lesion_rows: Sequence[dict[str, Any]] = (),
    regions: Mapping[str, Sequence[int]] | None = None,
    overlays: Sequence[OverlayImage] = (),
    problems: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    conventions_note: str = CONVENTIONS,
    html: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the evaluation report of ``rows`` into ``out_dir``.

    Args:
        rows: Rows of :func:`~medseg.evaluate.metrics.evaluate_case` (keys :data:`ROW_COLUMNS`).
        out_dir: Report folder (created if needed).
        label_names: ``{label value: class name}`` of the evaluated classes.
        lesion_rows: Lesion rows (keys :data:`LESION_CSV_COLUMNS`).
        regions: ``{region name: label values}`` of the evaluated regions.
        overlays: Rendered overlays, worst case first.
        problems: Input problems (``case``, ``kind``, ``message``, ``file``), shown first.
        warnings: Further notes.
        options: Metric options (stored in the summary and shown).
        extra: Further JSON-serialisable summary entries (e.g. input paths).
        conventions_note: Text describing the metric conventions.
        html: Also write ``report.html``.
        overwrite: Replace existing report files instead of raising.

    Returns:
        The summary as written to ``summary.json`` (NaN and infinities become ``None``).

    Raises:
        OutputExistsError: A report file exists and ``overwrite`` is false (nothing is written).
    """
    out_dir = Path(out_dir)
    overlay_files = [f"{OVERLAY_DIR}/{overlay_name(o.case)}" for o in overlays]
    if len(set(overlay_files)) != len(overlay_files):
        raise ValueError(f"overlay case ids map to duplicate file names: {overlay_files}")
    names = [n for n in REPORT_FILES if html or n != "report.html"]
    targets = [out_dir / n for n in names] + [out_dir / rel for rel in overlay_files]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OutputExistsError(target)

    summary = aggregate(rows)
    summary.update(
        label_names={str(k): v for k, v in sorted(label_names.items()) if k != 0},
        region_definitions={k: list(v) for k, v in (regions or {}).items()},
        cases=sorted({str(r["case"]) for r in rows}),
        options=dict(options or {}),
        conventions=conventions_note,
        problems=[dict(p) for p in problems],
        warnings=list(warnings),
        files={"metrics": "metrics.csv", "lesions": "lesions.csv", "summary": "summary.json", "report": "report.md"},
        overlays=[
            {"case": o.case, "file": rel, "focus_lps_mm": list(o.focus_lps_mm)}
            for o, rel in zip(overlays, overlay_files, strict=True)
        ],
    )
    if html:
        summary["files"]["html"] = "report.html"
    summary.update(extra or {})
    summary = json_safe(summary)
    with _cleanup_on_error(out_dir) as written:
        for overlay, rel in zip(overlays, overlay_files, strict=True):
            with atomic_path(out_dir / rel, overwrite=overwrite) as tmp:
                tmp.write_bytes(overlay.png)
            written.append(out_dir / rel)
        written.append(_write_csv(rows, ROW_COLUMNS, out_dir / "metrics.csv", overwrite=overwrite))
        written.append(_write_csv(list(lesion_rows), LESION_CSV_COLUMNS, out_dir / "lesions.csv", overwrite=overwrite))
        written.append(write_json_atomic(out_dir / "summary.json", summary, overwrite=overwrite))
        written.append(_write_markdown(rows, summary, out_dir / "report.md", overwrite=overwrite))
        if html:
            structures = [
                (kind, name)
                for kind, group in (("class", "classes"), ("region", "regions"))
                for name, entry in summary[group].items()
                if entry["n_empty_both"] < entry["n_cases"]
            ]
            plots = metric_plots_png(rows, structures=structures) if structures else None
            page = render_html(summary, rows, plots_png=plots, overlays=[(o.case, o.png, o.caption) for o in overlays])
            with atomic_path(out_dir / "report.html", overwrite=overwrite) as tmp:
                tmp.write_text(page, encoding="utf-8")
            written.append(out_dir / "report.html")
    return summary


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _cleanup_on_error(out_dir: Path) -> Iterator[list[Path]]:
    """Yield a list to record written files; on error remove them (and new empty folders)."""
    new_dirs = [d for d in (out_dir / OVERLAY_DIR, out_dir) if not d.exists()]
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for folder in new_dirs:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


def json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars to Python and NaN/inf floats to ``None``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_value(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # full precision; NaN -> "nan", inf -> "inf" (float() reads both back)
    return str(value)


def _sort_key(row: Mapping[str, Any]) -> tuple[str, int, int, str]:
    kind = 0 if row.get("kind", "class") == "class" else 1
    label = row["label"]
    number = int(label) if isinstance(label, (int, np.integer)) else 0
    return (str(row["case"]), kind, number, str(row["name"]))


def _write_csv(rows: list[dict[str, Any]], columns: Sequence[str], path: Path, *, overwrite: bool) -> Path:
    """CSV with header ``columns``; rows sorted by case, then classes (by label) before regions."""
    ordered = sorted(rows, key=_sort_key)  # stable: lesion order within a structure is kept
    with atomic_path(path, overwrite=overwrite) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in ordered:
            writer.writerow([_csv_value(row[column]) for column in columns])
    return path


# ----------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def _all_infinite(stats: Mapping[str, Any] | None) -> bool:
    return bool(stats) and not stats.get("n") and bool(stats.get("n_inf"))  # type: ignore[union-attr]


def _median_iqr(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    if _all_infinite(stats):
        return f"inf ({stats['n_inf']}x)"  # type: ignore[index]
    stats = stats or {}
    return f"{_fmt(stats.get('median'), digits)} [{_fmt(stats.get('q1'), digits)}, {_fmt(stats.get('q3'), digits)}]"


def _pm(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    if _all_infinite(stats):
        return f"inf ({stats['n_inf']}x)"  # type: ignore[index]
    if not stats or stats.get("mean") is None:
        return "n/a"
    if stats.get("std") is None:
        return _fmt(stats["mean"], digits)
    return f"{_fmt(stats['mean'], digits)} ± {_fmt(stats['std'], digits)}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in line) + " |" for line in lines]
    return out


def _structure_table(summary: Mapping[str, Any]) -> list[str]:
    header = [
        "Structure",
        "Label",
        "Cases",
        "Dice mean ± std",
        "Dice median [Q1, Q3]",
        "HD95 (mm) median [Q1, Q3]",
        "ASSD (mm) mean ± std",
        "NSD mean ± std",
        "Volume diff (mL) mean ± std",
        "Lesion sens. / prec. / F1 (pooled)",
        "Both empty",
    ]
    lines = []
    absent = []
    for group in ("classes", "regions"):
        for name, entry in summary[group].items():
            if entry["n_empty_both"] == entry["n_cases"]:
                absent.append(name)
                continue
            dice, hd95 = entry["dice"], entry.get("hd95_mm") or {}
            lesions = entry.get("lesions") or {}
            lines.append(
                [
                    name + (" (region)" if group == "regions" else ""),
                    str(entry["label"]),
                    f"{entry['n_cases']} ({dice['n']} scored)",
                    _pm(dice),
                    f"{_fmt(dice['median'])} [{_fmt(dice['q1'])}, {_fmt(dice['q3'])}]",
                    _median_iqr(hd95, 2),
                    _pm(entry.get("assd_mm"), 2),
                    _pm(entry.get("nsd")),
                    _pm(entry.get("volume_diff_ml"), 2),
                    " / ".join(_fmt(lesions.get(k)) for k in ("sensitivity", "precision", "f1")) if lesions else "n/a",
                    str(entry["n_empty_both"]),
                ]
            )
    note = ["", f"Absent from every reference and prediction (not shown): {', '.join(absent)}."] if absent else []
    return _table(header, lines) + note


def _case_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["Case", "Structure", "Dice", "HD95 (mm)", "ASSD (mm)", "NSD", "Ref (mL)", "Pred (mL)", "Lesions TP/FN/FP"]
    lines = []
    for r in sorted(rows, key=_sort_key):
        if not (r["ref_voxels"] or r["pred_voxels"]):
            continue  # empty in both: in metrics.csv only
        lesions = "/".join(_fmt(r.get(k), 0) for k in ("lesion_tp", "lesion_fn", "lesion_fp"))
        lines.append(
            [
                str(r["case"]),
                str(r["name"]) + (" (region)" if r.get("kind") == "region" else ""),
                _fmt(r["dice"]),
                _fmt(r["hd95_mm"], 2),
                _fmt(r["assd_mm"], 2),
                _fmt(r["nsd"]),
                _fmt(r["ref_volume_ml"], 2),
                _fmt(r["pred_volume_ml"], 2),
                lesions,
            ]
        )
    return _table(header, lines)


def _markdown(rows: list[dict[str, Any]], summary: Mapping[str, Any]) -> str:
    options = summary.get("options") or {}
    parts = [
        "# Segmentation evaluation",
        "",
        f"{summary['n_cases']} case(s), {len(summary['classes'])} class(es), {len(summary['regions'])} region(s). "
        f"Mean foreground Dice (mean over classes of the per-class mean): **{_fmt(summary['mean_foreground_dice'])}**.",
        "",
        "Files: [report.html](report.html), [metrics.csv](metrics.csv) (one row per case and structure), "
        "[lesions.csv](lesions.csv) (one row per lesion), [summary.json](summary.json).",
        "",
    ]
    if options:
        parts += [
            f"NSD tolerance {options.get('tolerance_mm')} mm; lesion connectivity {options.get('connectivity')}; "
            f"lesion match IoU > {options.get('match_iou')}.",
            "",
        ]
    if summary.get("problems"):
        parts += ["## Problems", ""]
        for p in summary["problems"]:
            case = f"**{_cell(p['case'])}**: " if p.get("case") else ""
            parts.append(f"- {case}[{p['kind']}] {_cell(p['message'])}")
        parts.append("")
    parts += ["## Per structure", "", *_structure_table(summary), "", "## Per case", "", *_case_table(rows), ""]
    parts += ["## Conventions", "", str(summary["conventions"]), ""]
    if summary.get("warnings"):
        parts += ["## Notes", "", *(f"- {_cell(w)}" for w in summary["warnings"]), ""]
    if summary.get("overlays"):
        parts += [
            "## Worst cases",
            "",
            "Three orthogonal slices through the largest error; reference contours solid, prediction dashed.",
            "",
        ]
        for item in summary["overlays"]:
            case = _cell(item["case"])
            parts += [f"### [{case}]({item['file']})", "", f"![{case}]({item['file']})", ""]
    return "\n".join(parts)


def _write_markdown(rows: list[dict[str, Any]], summary: Mapping[str, Any], path: Path, *, overwrite: bool) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(_markdown(rows, summary), encoding="utf-8")
    return path
