"""Overlap and volume metrics of label volumes, per case and aggregated over cases.

Every metric is computed from the per-class confusion counts (true positives ``TP``,
false positives ``FP``, false negatives ``FN``) of one case:

* Dice ``= 2 TP / (2 TP + FP + FN)``, IoU ``= TP / (TP + FP + FN)``,
  precision ``= TP / (TP + FP)``, recall ``= TP / (TP + FN)``.
* Volumes are voxel counts times the voxel volume of the grid
  (``prod(geometry.spacing)`` mm³, reported in mL = cm³ = 1000 mm³);
  ``volume_diff_ml = pred_volume_ml - ref_volume_ml``.

Empty structures follow the Metrics Reloaded recommendations (Maier-Hein et al.,
*Nature Methods* 2024): a metric whose denominator is zero is *undefined*, not
perfect, and is reported as NaN.

* Reference and prediction both empty: Dice, IoU, precision and recall are NaN.
  Such (case, class) pairs are left out of every aggregate and counted as
  ``n_empty_both``.  (The volumes are still 0 and the volume difference 0.)
* Reference empty, prediction not (a false detection): Dice = IoU = precision = 0,
  recall NaN.
* Prediction empty, reference not (a missed structure): Dice = IoU = recall = 0,
  precision NaN.

Aggregates (:func:`aggregate`) ignore NaN values: every statistic comes with the number
``n`` of values it was computed from.  ``std`` is the sample standard deviation
(``ddof=1``; NaN with fewer than two values) and ``q1``/``q3`` are the 25th/75th
percentiles with linear interpolation (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.io.volume import Volume

__all__ = [
    "CONVENTIONS",
    "METRIC_COLUMNS",
    "ROW_COLUMNS",
    "aggregate",
    "case_metrics",
    "confusion_counts",
    "metrics_from_counts",
    "voxel_volume_ml",
]

#: Columns of one (case, class) row, in the order of ``metrics.csv``.
ROW_COLUMNS: tuple[str, ...] = (
    "case",
    "label",
    "name",
    "dice",
    "iou",
    "precision",
    "recall",
    "ref_volume_ml",
    "pred_volume_ml",
    "volume_diff_ml",
    "ref_voxels",
    "pred_voxels",
)

#: Row values summarised by :func:`aggregate`.
METRIC_COLUMNS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "volume_diff_ml")

#: Human-readable statement of the conventions (copied into reports).
CONVENTIONS = (
    "Metrics follow Metrics Reloaded conventions for empty structures: a metric whose denominator "
    "is zero is undefined (NaN), not perfect. Reference and prediction both empty: Dice, IoU, "
    "precision and recall are NaN and the pair is excluded from all aggregates (counted as "
    "n_empty_both). Reference empty but prediction not: Dice = IoU = precision = 0, recall NaN. "
    "Prediction empty but reference not: Dice = IoU = recall = 0, precision NaN. Volumes are voxel "
    "counts times the voxel volume of the grid (mL); volume_diff_ml = prediction - reference. "
    "Aggregates ignore NaN; std is the sample standard deviation (ddof=1); q1/q3 are the 25th/75th "
    "percentiles; mean_foreground_dice is the mean over classes of the per-class mean Dice."
)

# Direct bincount up to this many distinct values per array (K*K bins); larger label
# values are first mapped onto the requested labels.
_MAX_DIRECT_LABELS = 1024
# Voxels per bincount chunk: bounds the temporary int64 index array to ~64 MB.
_CHUNK = 1 << 23


def confusion_counts(pred: np.ndarray, ref: np.ndarray, *, labels: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Per-label true positive, false positive and false negative voxel counts.

    All labels are counted in a single pass over the voxels: the joint histogram of
    ``ref * K + pred`` (``np.bincount``) is the ``(K, K)`` confusion matrix, without
    building one-hot arrays.

    Args:
        pred: Integer label array of any shape (e.g. ``(X, Y, Z)``), non-negative.
        ref: Integer label array of the same shape as ``pred``.
        labels: Label values to report (any, including 0 or values absent from both).

    Returns:
        ``{label: (TP, FP, FN)}`` for every requested label.

    Raises:
        ValueError: Shapes differ, or an array is not integral or holds negative values.
    """
    pred = _as_label_array(pred, "pred")
    ref = _as_label_array(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    wanted = sorted({int(v) for v in labels})
    if any(v < 0 for v in wanted):
        raise ValueError(f"labels must be non-negative, got {wanted}")
    if pred.size == 0:
        return {v: (0, 0, 0) for v in wanted}
    flat_pred, flat_ref = pred.reshape(-1), ref.reshape(-1)
    top = max(int(flat_pred.max()), int(flat_ref.max()), *wanted, 0)
    if top < _MAX_DIRECT_LABELS:
        k = top + 1
        index = {v: v for v in wanted}
    else:  # map onto the requested labels; everything else shares one extra bin
        k = len(wanted) + 1
        flat_pred, flat_ref = _compact(flat_pred, wanted), _compact(flat_ref, wanted)
        index = {v: i for i, v in enumerate(wanted)}
    matrix = _joint_histogram(flat_ref, flat_pred, k)  # rows: reference, columns: prediction
    pred_totals, ref_totals = matrix.sum(axis=0), matrix.sum(axis=1)
    out: dict[int, tuple[int, int, int]] = {}
    for value in wanted:
        i = index[value]
        tp = int(matrix[i, i])
        out[value] = (tp, int(pred_totals[i]) - tp, int(ref_totals[i]) - tp)
    return out


def _as_label_array(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be an integer label array, got dtype {array.dtype}")
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and int(array.min()) < 0:
        raise ValueError(f"{what} holds negative labels (min {int(array.min())})")
    return array


def _compact(flat: np.ndarray, wanted: list[int]) -> np.ndarray:
    """Map values to their index in ``wanted`` (sorted); others to ``len(wanted)``."""
    table = np.asarray(wanted, dtype=np.int64)
    pos = np.searchsorted(table, flat)
    hit = table[np.minimum(pos, len(table) - 1)] == flat
    return np.where(hit, pos, len(table))


def _joint_histogram(flat_ref: np.ndarray, flat_pred: np.ndarray, k: int) -> np.ndarray:
    """``(k, k)`` int64 matrix of voxel counts per (reference, prediction) value pair."""
    counts = np.zeros(k * k, dtype=np.int64)
    for start in range(0, flat_ref.size, _CHUNK):
        stop = start + _CHUNK
        codes = flat_ref[start:stop].astype(np.int64) * k + flat_pred[start:stop]
        counts += np.bincount(codes, minlength=k * k)
    return counts.reshape(k, k)


def metrics_from_counts(tp: int, fp: int, fn: int, *, voxel_ml: float) -> dict[str, Any]:
    """Overlap metrics and volumes of one class from its confusion counts.

    Args:
        tp: True positive voxels.
        fp: False positive voxels.
        fn: False negative voxels.
        voxel_ml: Volume of one voxel in mL.

    Returns:
        The metric part of a row: ``dice``, ``iou``, ``precision``, ``recall``,
        ``ref_volume_ml``, ``pred_volume_ml``, ``volume_diff_ml``, ``ref_voxels``,
        ``pred_voxels`` (undefined metrics are NaN, see the module docstring).
    """
    ref_voxels, pred_voxels = tp + fn, tp + fp
    union = tp + fp + fn
    nan = math.nan
    return {
        "dice": 2.0 * tp / (2 * tp + fp + fn) if union else nan,
        "iou": tp / union if union else nan,
        "precision": tp / pred_voxels if pred_voxels else nan,
        "recall": tp / ref_voxels if ref_voxels else nan,
        "ref_volume_ml": ref_voxels * voxel_ml,
        "pred_volume_ml": pred_voxels * voxel_ml,
        "volume_diff_ml": (pred_voxels - ref_voxels) * voxel_ml,
        "ref_voxels": ref_voxels,
        "pred_voxels": pred_voxels,
    }


def voxel_volume_ml(volume: Volume) -> float:
    """Volume of one voxel of ``volume``'s grid in mL (``prod(spacing) / 1000``)."""
    return float(np.prod(volume.geometry.spacing)) / 1000.0


def case_metrics(
    pred: Volume,
    ref: Volume,
    *,
    label_names: dict[int, str],
    case_id: str,
    atol: float = 1e-4,
) -> list[dict[str, Any]]:
    """Per-class metrics of one predicted label volume against its reference.

    Args:
        pred: Predicted labels, array ``(1, X, Y, Z)``.
        ref: Reference labels, array ``(1, X, Y, Z)`` on the same grid.
        label_names: ``{label value: class name}``; label 0 (background) is skipped.
        case_id: Case identifier, stored in each row and named in errors.
        atol: Tolerance (mm) of the grid comparison.

    Returns:
        One row per foreground label (ascending), with the keys of :data:`ROW_COLUMNS`.

    Raises:
        GeometryError: The two volumes are not on the same grid.
        ValueError: A volume has more than one channel or non-integer values.
    """
    ref.geometry.require_same(pred.geometry, atol=atol, what=f"prediction and reference for case {case_id}")
    for volume, what in ((pred, "prediction"), (ref, "reference")):
        if volume.channels != 1:
            raise ValueError(f"case {case_id}: {what} must have one channel, got {volume.channels}")
    labels = sorted(v for v in label_names if v != 0)
    counts = confusion_counts(pred.array[0], ref.array[0], labels=labels)
    voxel_ml = voxel_volume_ml(ref)
    rows = []
    for value in labels:
        row: dict[str, Any] = {"case": case_id, "label": value, "name": label_names[value]}
        row.update(metrics_from_counts(*counts[value], voxel_ml=voxel_ml))
        rows.append(row)
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary statistics over cases, per class.

    Args:
        rows: Rows of :func:`case_metrics` (any number of cases).

    Returns:
        ``{"n_cases", "mean_foreground_dice", "classes"}`` where ``classes`` maps each
        class name (ordered by label value) to ``{"label", "n_cases", "n_empty_both",
        <metric>: {"n", "mean", "median", "std", "q1", "q3"}}`` for every metric of
        :data:`METRIC_COLUMNS`.  NaN values are ignored; a statistic over no values is NaN.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (int(r["label"]), str(r["name"]))):
        groups.setdefault(str(row["name"]), []).append(row)
    classes: dict[str, Any] = {}
    for name, group in groups.items():
        entry: dict[str, Any] = {
            "label": int(group[0]["label"]),
            "n_cases": len(group),
            "n_empty_both": sum(1 for r in group if r["ref_voxels"] == 0 and r["pred_voxels"] == 0),
        }
        for column in METRIC_COLUMNS:
            entry[column] = _describe([float(r[column]) for r in group])
        classes[name] = entry
    class_means = [c["dice"]["mean"] for c in classes.values() if not math.isnan(c["dice"]["mean"])]
    return {
        "n_cases": len({str(r["case"]) for r in rows}),
        "mean_foreground_dice": float(np.mean(class_means)) if class_means else math.nan,
        "classes": classes,
    }


def _describe(values: list[float]) -> dict[str, Any]:
    """NaN-ignoring ``n``, mean, median, sample std and quartiles of ``values``."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "std": math.nan, "q1": math.nan, "q3": math.nan}
    q1, median, q3 = (float(q) for q in np.percentile(finite, [25.0, 50.0, 75.0]))
    return {
        "n": n,
        "mean": float(finite.mean()),
        "median": median,
        "std": float(finite.std(ddof=1)) if n > 1 else math.nan,
        "q1": q1,
        "q3": q3,
    }
