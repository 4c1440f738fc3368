"""Evaluation report: ``metrics.csv``, ``summary.json``, ``report.md`` and overlay PNGs.

Every file is written atomically (temporary file + rename); if writing the report fails
part way, the files this call already wrote are removed again.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from medseg.errors import OutputExistsError
from medseg.evaluate.metrics import CONVENTIONS, ROW_COLUMNS, aggregate
from medseg.io.images import atomic_path, write_json_atomic
from medseg.io.volume import Geometry, Volume

__all__ = ["OVERLAY_DIR", "best_slice", "overlay_name", "render_overlay", "write_report"]

#: Sub-folder of the report holding the overlay PNGs.
OVERLAY_DIR = "overlays"

#: ``(case_id, image or None, reference, prediction)``.
Overlay: TypeAlias = tuple[str, Volume | None, Volume, Volume]


def write_report(
    rows: list[dict[str, Any]],
    out_dir: Path,
    *,
    label_names: dict[int, str],
    overlays: Sequence[Overlay] = (),
    conventions_note: str = CONVENTIONS,
    warnings: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the evaluation report of ``rows`` into ``out_dir``.

    Files: ``metrics.csv`` (one row per case and class, columns of
    :data:`~medseg.evaluate.metrics.ROW_COLUMNS`), ``summary.json`` (the
    :func:`~medseg.evaluate.metrics.aggregate` plus conventions and warnings),
    ``report.md`` and ``overlays/<case>.png`` for each overlay.

    Args:
        rows: Rows of :func:`~medseg.evaluate.metrics.case_metrics`.
        out_dir: Report folder (created if needed).
        label_names: ``{label value: class name}`` of the evaluated classes.
        overlays: ``(case_id, image or None, reference, prediction)`` tuples; the volumes
            have arrays ``(C, X, Y, Z)`` on one grid (the image's first channel is shown).
        conventions_note: Text describing the metric conventions (stored and shown).
        warnings: Messages to record in the summary and the report.
        extra: Further JSON-serialisable entries for the summary (e.g. input paths).
        overwrite: Replace existing report files instead of raising.

    Returns:
        The summary as written to ``summary.json`` (undefined values, NaN, become ``None``).

    Raises:
        OutputExistsError: A report file exists and ``overwrite`` is false (nothing is written).
        GeometryError: An overlay's volumes are not on one grid.
    """
    out_dir = Path(out_dir)
    overlay_files = _overlay_files(overlays)
    targets = [out_dir / name for name in ("metrics.csv", "summary.json", "report.md")]
    targets += [out_dir / rel for rel in overlay_files]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OutputExistsError(target)

    summary = aggregate(rows)
    summary.update(
        label_names={str(k): v for k, v in sorted(label_names.items()) if k != 0},
        cases=sorted({str(r["case"]) for r in rows}),
        conventions=conventions_note,
        warnings=list(warnings),
        files={"metrics": "metrics.csv", "summary": "summary.json", "report": "report.md"},
        overlays=[],
    )
    summary.update(extra or {})
    with _cleanup_on_error(out_dir) as written:
        for (case_id, image, ref, pred), rel in zip(overlays, overlay_files, strict=True):
            dice = {int(r["label"]): float(r["dice"]) for r in rows if str(r["case"]) == case_id}
            position = render_overlay(
                out_dir / rel,
                case_id=case_id,
                image=image,
                ref=ref,
                pred=pred,
                label_names=label_names,
                dice=dice,
                overwrite=overwrite,
            )
            written.append(out_dir / rel)
            summary["overlays"].append({"case": case_id, "file": rel, "slice_z_mm": position})
        summary = _json_safe(summary)
        written.append(_write_csv(rows, out_dir / "metrics.csv", overwrite=overwrite))
        written.append(write_json_atomic(out_dir / "summary.json", summary, overwrite=overwrite))
        written.append(_write_markdown(rows, summary, out_dir / "report.md", overwrite=overwrite))
    return summary


# ------------------------------------------------------------------ helpers
def overlay_name(case_id: str) -> str:
    """File name of a case's overlay (characters unsafe in file names become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id) + ".png"


def _overlay_files(overlays: Sequence[Overlay]) -> list[str]:
    files = [f"{OVERLAY_DIR}/{overlay_name(case_id)}" for case_id, *_ in overlays]
    if len(set(files)) != len(files):
        raise ValueError(f"overlay case ids map to duplicate file names: {files}")
    return files


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


def _json_safe(value: Any) -> Any:
    """Recursively convert numpy scalars to Python and NaN/inf floats to ``None``."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_value(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # full precision; NaN -> "nan" (float() reads it back)
    return str(value)


def _write_csv(rows: list[dict[str, Any]], path: Path, *, overwrite: bool) -> Path:
    """``metrics.csv``: header :data:`ROW_COLUMNS`, rows sorted by case then label."""
    ordered = sorted(rows, key=lambda r: (str(r["case"]), int(r["label"])))
    with atomic_path(path, overwrite=overwrite) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(ROW_COLUMNS)
        for row in ordered:
            writer.writerow([_csv_value(row[column]) for column in ROW_COLUMNS])
    return path


# ----------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def _pm(stats: dict[str, Any], digits: int = 3) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return _fmt(stats["mean"], digits)
    return f"{_fmt(stats['mean'], digits)} ± {_fmt(stats['std'], digits)}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in line) + " |" for line in lines]
    return out


def _class_table(summary: dict[str, Any]) -> list[str]:
    header = [
        "Class",
        "Label",
        "Cases",
        "Dice mean ± std",
        "Dice median [Q1, Q3]",
        "IoU mean ± std",
        "Precision mean ± std",
        "Recall mean ± std",
        "Volume diff (mL) mean ± std",
        "Both empty",
    ]
    lines = []
    for name, entry in summary["classes"].items():
        dice = entry["dice"]
        lines.append(
            [
                name,
                str(entry["label"]),
                f"{entry['n_cases']} ({dice['n']} scored)",
                _pm(dice),
                f"{_fmt(dice['median'])} [{_fmt(dice['q1'])}, {_fmt(dice['q3'])}]",
                _pm(entry["iou"]),
                _pm(entry["precision"]),
                _pm(entry["recall"]),
                _pm(entry["volume_diff_ml"], 2),
                str(entry["n_empty_both"]),
            ]
        )
    return _table(header, lines)


def _case_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["Case", "Class", "Dice", "IoU", "Precision", "Recall", "Ref (mL)", "Pred (mL)", "Diff (mL)"]
    lines = [
        [
            str(r["case"]),
            str(r["name"]),
            _fmt(r["dice"]),
            _fmt(r["iou"]),
            _fmt(r["precision"]),
            _fmt(r["recall"]),
            _fmt(r["ref_volume_ml"], 2),
            _fmt(r["pred_volume_ml"], 2),
            _fmt(r["volume_diff_ml"], 2),
        ]
        for r in sorted(rows, key=lambda r: (str(r["case"]), int(r["label"])))
    ]
    return _table(header, lines)


def _markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    n_classes = len(summary["classes"])
    parts = [
        "# Segmentation evaluation",
        "",
        f"{summary['n_cases']} case(s), {n_classes} foreground class(es). "
        f"Mean foreground Dice (mean over classes of the per-class mean): **{_fmt(summary['mean_foreground_dice'])}**.",
        "",
        "Files: [metrics.csv](metrics.csv) (one row per case and class), [summary.json](summary.json).",
        "",
        "## Per class",
        "",
        *_class_table(summary),
        "",
        "## Per case",
        "",
        *_case_table(rows),
        "",
        "## Conventions",
        "",
        summary["conventions"],
        "",
    ]
    if summary["warnings"]:
        parts += ["## Warnings", "", *(f"- {_cell(w)}" for w in summary["warnings"]), ""]
    if summary["overlays"]:
        parts += [
            "## Overlays",
            "",
            "Axial slice with the most reference foreground; reference contours solid, prediction contours dashed.",
            "",
        ]
        for item in summary["overlays"]:
            case = _cell(item["case"])
            parts += [f"### [{case}]({item['file']})", "", f"![{case}]({item['file']})", ""]
    return "\n".join(parts)


def _write_markdown(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path, *, overwrite: bool) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(_markdown(rows, summary), encoding="utf-8")
    return path


# ----------------------------------------------------------------- overlays
def best_slice(ref: np.ndarray, pred: np.ndarray | None = None) -> int:
    """Index along the third axis of ``(X, Y, Z)`` label arrays with the most foreground.

    The reference decides; if it is empty, the prediction; if both are, the middle slice.
    """
    for labels in (ref, pred):
        if labels is None:
            continue
        per_slice = np.count_nonzero(labels, axis=(0, 1))
        if per_slice.any():
            return int(np.argmax(per_slice))
    return ref.shape[2] // 2


def _display_flips(geometry: Geometry) -> tuple[bool, bool]:
    """Flips of voxel axes 0 and 1 giving the radiological view (patient right on the left, anterior up)."""
    direction = geometry.direction_ras
    flip_x = flip_y = False
    if int(np.argmax(np.abs(direction[:, 0]))) == 0:
        flip_x = bool(direction[0, 0] > 0)  # axis 0 runs towards the patient's right
    if int(np.argmax(np.abs(direction[:, 1]))) == 1:
        flip_y = bool(direction[1, 1] > 0)  # axis 1 runs towards anterior: put it at the top
    return flip_x, flip_y


def _screen(plane: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """``(X, Y)`` plane -> ``(rows, cols)`` image for ``imshow(origin="upper")``."""
    if flips[0]:
        plane = plane[::-1, :]
    if flips[1]:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane.T)


def _window(image: Volume) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(image.array[0], [1.0, 99.0]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def render_overlay(
    path: Path,
    *,
    case_id: str,
    image: Volume | None,
    ref: Volume,
    pred: Volume,
    label_names: dict[int, str],
    dice: dict[int, float] | None = None,
    overwrite: bool = False,
) -> float:
    """Write a PNG of the axial slice with most reference foreground, with contours.

    The image (if any, first channel, windowed to its 1st-99th percentiles) is shown in
    gray in radiological orientation; each class has its own colours, reference contours
    solid and prediction contours dashed.

    Args:
        path: Output PNG.
        case_id: Case named in the title.
        image: Image volume ``(C, X, Y, Z)`` on the reference grid, or ``None``.
        ref: Reference labels ``(1, X, Y, Z)``.
        pred: Predicted labels ``(1, X, Y, Z)`` on the same grid.
        label_names: ``{label value: class name}``; 0 is skipped.
        dice: ``{label value: Dice}`` of this case, shown in the title.
        overwrite: Replace an existing file.

    Returns:
        Superior coordinate (RAS/LPS z, mm) of the centre of the shown slice.

    Raises:
        GeometryError: The volumes are not on one grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    geometry = ref.geometry
    geometry.require_same(pred.geometry, what=f"overlay prediction and reference for case {case_id}")
    if image is not None:
        geometry.require_same(image.geometry, what=f"overlay image and reference for case {case_id}")
    k = best_slice(ref.array[0], pred.array[0])
    flips = _display_flips(geometry)
    sx, sy, _ = geometry.spacing
    labels = sorted(v for v in label_names if v != 0)

    fig = Figure(figsize=(7.0, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if image is not None:
        lo, hi = _window(image)
        ax.imshow(_screen(image.array[0, :, :, k], flips), cmap="gray", vmin=lo, vmax=hi, aspect=sy / sx)
    else:
        ax.imshow(np.zeros(geometry.shape[1::-1]), cmap="gray", vmin=0.0, vmax=1.0, aspect=sy / sx)
    cmap = _class_colours()
    handles = []
    for i, value in enumerate(labels):
        ref_colour, pred_colour = cmap((2 * i) % 20), cmap((2 * i + 1) % 20)
        for volume, colour, style in ((ref, ref_colour, "solid"), (pred, pred_colour, "dashed")):
            mask = _screen(volume.array[0, :, :, k] == value, flips)
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.4, linestyles=style)
        name = label_names[value]
        handles.append(Line2D([], [], color=ref_colour, linestyle="solid", label=f"{name} reference"))
        handles.append(Line2D([], [], color=pred_colour, linestyle="dashed", label=f"{name} prediction"))
    n_cols, n_rows = geometry.shape[0], geometry.shape[1]
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    z_mm = float((geometry.affine @ np.array([0.0, 0.0, float(k), 1.0]))[2])
    ax.set_title(_overlay_title(case_id, labels, label_names, dice or {}, z_mm), fontsize=10)
    ax.set_axis_off()
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    return z_mm


def _class_colours() -> Any:
    from matplotlib import colormaps

    return colormaps["tab20"]


def _overlay_title(
    case_id: str, labels: list[int], label_names: dict[int, str], dice: dict[int, float], z_mm: float
) -> str:
    scores = [f"{label_names[v]} Dice {_fmt(dice.get(v, math.nan))}" for v in labels]
    lines = [f"{case_id} — axial slice at S {z_mm:.1f} mm"]
    lines += [", ".join(scores[i : i + 3]) for i in range(0, len(scores), 3)]
    return "\n".join(lines)
