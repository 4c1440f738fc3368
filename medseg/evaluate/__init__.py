"""Stage 5 — evaluation: overlap, volume, surface-distance and lesion-wise metrics, aggregates, reports.

Typical use::

    from medseg.evaluate import evaluate_folders

    summary = evaluate_folders("predictions/", "labelsTs/", out_dir="report/", label_names={1: "spleen"})

Definitions and the conventions for empty structures (Metrics Reloaded) are in
:mod:`medseg.evaluate.metrics`, :mod:`medseg.evaluate.surface` and :mod:`medseg.evaluate.lesions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from medseg.evaluate.api import Problem, evaluate_folders, find_label_files, present_labels
    from medseg.evaluate.inputs import load_label_names, load_regions, read_label_volume, resample_to_reference
    from medseg.evaluate.lesions import LESION_COLUMNS, LESION_ROW_COLUMNS, lesion_metrics
    from medseg.evaluate.metrics import (
        CONVENTIONS,
        METRIC_COLUMNS,
        ROW_COLUMNS,
        CaseResult,
        EvalOptions,
        Structure,
        aggregate,
        case_metrics,
        confusion_counts,
        evaluate_case,
        make_structures,
        metrics_from_counts,
    )
    from medseg.evaluate.overlays import error_focus, render_overlay_png
    from medseg.evaluate.report import write_report
    from medseg.evaluate.surface import SURFACE_COLUMNS, SurfaceDistances, surface_distances, surface_metrics

__all__ = [
    "CONVENTIONS",
    "LESION_COLUMNS",
    "LESION_ROW_COLUMNS",
    "METRIC_COLUMNS",
    "ROW_COLUMNS",
    "SURFACE_COLUMNS",
    "CaseResult",
    "EvalOptions",
    "Problem",
    "Structure",
    "SurfaceDistances",
    "aggregate",
    "case_metrics",
    "confusion_counts",
    "error_focus",
    "evaluate_case",
    "evaluate_folders",
    "find_label_files",
    "lesion_metrics",
    "load_label_names",
    "load_regions",
    "make_structures",
    "metrics_from_counts",
    "present_labels",
    "read_label_volume",
    "render_overlay_png",
    "resample_to_reference",
    "surface_distances",
    "surface_metrics",
    "write_report",
]

_EXPORTS = {
    **dict.fromkeys(("Problem", "evaluate_folders", "find_label_files", "present_labels"), "medseg.evaluate.api"),
    **dict.fromkeys(
        ("load_label_names", "load_regions", "read_label_volume", "resample_to_reference"), "medseg.evaluate.inputs"
    ),
    **dict.fromkeys(("LESION_COLUMNS", "LESION_ROW_COLUMNS", "lesion_metrics"), "medseg.evaluate.lesions"),
    **dict.fromkeys(
        (
            "CONVENTIONS",
            "METRIC_COLUMNS",
            "ROW_COLUMNS",
            "CaseResult",
            "EvalOptions",
            "Structure",
            "aggregate",
            "case_metrics",
            "confusion_counts",
            "evaluate_case",
            "make_structures",
            "metrics_from_counts",
        ),
        "medseg.evaluate.metrics",
    ),
    **dict.fromkeys(("error_focus", "render_overlay_png"), "medseg.evaluate.overlays"),
    **dict.fromkeys(("write_report",), "medseg.evaluate.report"),
    **dict.fromkeys(
        ("SURFACE_COLUMNS", "SurfaceDistances", "surface_distances", "surface_metrics"), "medseg.evaluate.surface"
    ),
}
# Imported on first use, so that `medseg --help` does not load scipy and matplotlib.
if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name stays an error
    __getattr__ = lazy_attributes(__name__, _EXPORTS)
