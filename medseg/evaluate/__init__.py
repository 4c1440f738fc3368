"""Stage 5 — evaluation: per-case overlap and volume metrics, aggregates and reports.

Typical use::

    from medseg.evaluate import evaluate_folders

    summary = evaluate_folders("predictions/", "labelsTs/", out_dir="report/", label_names={1: "spleen"})

See :mod:`medseg.evaluate.metrics` for the metric definitions and the conventions for
empty structures (Metrics Reloaded).
"""

from __future__ import annotations

from medseg.evaluate.api import evaluate_folders, find_label_files
from medseg.evaluate.metrics import (
    CONVENTIONS,
    METRIC_COLUMNS,
    ROW_COLUMNS,
    aggregate,
    case_metrics,
    confusion_counts,
    metrics_from_counts,
)
from medseg.evaluate.report import render_overlay, write_report

__all__ = [
    "CONVENTIONS",
    "METRIC_COLUMNS",
    "ROW_COLUMNS",
    "aggregate",
    "case_metrics",
    "confusion_counts",
    "evaluate_folders",
    "find_label_files",
    "metrics_from_counts",
    "render_overlay",
    "write_report",
]
