"""Per-case metrics of label volumes (overlap, volume, surface, lesion-wise) and their aggregates.

A **structure** is what gets a row: a class (one label value) or a region (the union of several
label values, e.g. BraTS whole tumour = labels 1-4).  For every case and structure:

* Overlap from the confusion counts (``TP``, ``FP``, ``FN`` voxels): Dice ``= 2 TP / (2 TP + FP + FN)``,
  IoU ``= TP / (TP + FP + FN)``, precision ``= TP / (TP + FP)``, recall ``= TP / (TP + FN)``.
  (:func:`confusion_counts` counts all labels of two arrays at once with one ``np.bincount``.)
* Volumes: voxel counts times the voxel volume of the grid (mL); ``volume_diff_ml = pred - ref``.
* Surface distances in mm on the real spacing: ``hd95_mm``, ``hd_mm``, ``assd_mm`` and ``nsd`` at
  ``nsd_tolerance_mm`` (definitions in :mod:`medseg.evaluate.surface`).
* Lesion-wise metrics on connected components (:mod:`medseg.evaluate.lesions`).

Everything is computed on the bounding box of the structure in either volume (plus one voxel), found
for all labels in one pass over each volume (``scipy.ndimage.find_objects``); counts inside the box
are exact because the structure has no voxel outside it.

Empty structures follow the Metrics Reloaded recommendations (Maier-Hein et al., *Nature Methods*
2024): a metric whose denominator is zero is *undefined* (NaN), never "perfect".

* Reference and prediction both empty: Dice, IoU, precision, recall, HD95, HD, ASSD, NSD are NaN;
  the pair is left out of every aggregate and counted as ``n_empty_both``.
* Reference empty, prediction not (false detection): Dice = IoU = precision = NSD = 0, recall NaN,
  HD95 = HD = ASSD = +inf.
* Prediction empty, reference not (missed structure): Dice = IoU = recall = NSD = 0, precision NaN,
  HD95 = HD = ASSD = +inf.

Aggregates (:func:`aggregate`) are computed over the finite values: NaN (undefined) and +inf
(distance to an empty structure) are left out, and ``n``, ``n_nan`` and ``n_inf`` say how many
values were used and left out — a missed structure is therefore counted in the Dice and NSD
statistics (as 0) and shows up in ``n_inf`` of the distances.  ``std`` is the sample standard
deviation (``ddof=1``; NaN with fewer than two values); ``q1``/``q3`` are the 25th/75th percentiles
(linear interpolation).  Lesion detection is also pooled over cases (sum of TP/FN/FP).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.evaluate.lesions import LESION_COLUMNS, LESION_ROW_COLUMNS, lesion_metrics
from medseg.evaluate.surface import SURFACE_COLUMNS, grow_box, surface_distances
from medseg.io.volume import Volume

__all__ = [
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
    "voxel_volume_ml",
]

#: Columns of one (case, structure) row, in the order of ``metrics.csv``.
ROW_COLUMNS: tuple[str, ...] = (
    "case",
    "kind",
    "label",
    "name",
    "dice",
    "iou",
    "precision",
    "recall",
    *SURFACE_COLUMNS,
    "nsd_tolerance_mm",
    "ref_volume_ml",
    "pred_volume_ml",
    "volume_diff_ml",
    "ref_voxels",
    "pred_voxels",
    *LESION_COLUMNS,
)

#: Row values summarised by :func:`aggregate`.
METRIC_COLUMNS: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "recall",
    *SURFACE_COLUMNS,
    "ref_volume_ml",
    "pred_volume_ml",
    "volume_diff_ml",
    "lesion_sensitivity",
    "lesion_precision",
    "lesion_f1",
    "lesion_dice",
    "pq",
    "sq",
    "rq",
)

#: Human-readable statement of the conventions (copied into reports).
CONVENTIONS = (
    "Empty structures follow Metrics Reloaded: a metric whose denominator is zero is undefined (NaN), "
    "not perfect. Reference and prediction both empty: every metric is NaN and the pair is excluded from "
    "all aggregates (counted as n_empty_both). Reference empty but prediction not: Dice = IoU = precision "
    "= NSD = 0, recall NaN, HD95 = HD = ASSD = +inf. Prediction empty but reference not: Dice = IoU = "
    "recall = NSD = 0, precision NaN, HD95 = HD = ASSD = +inf. "
    "Surfaces are the voxels with a face neighbour outside the structure (as MONAI); distances are "
    "Euclidean between voxel centres in mm on the grid's spacing. HD95 is the larger of the two directed "
    "95th percentiles (linear interpolation), HD the larger directed maximum, ASSD the mean of all "
    "surface distances in both directions, NSD the fraction of surface voxels of both structures within "
    "the tolerance of the other surface. Lesions are connected components (connectivity in summary); "
    "detection matches reference and predicted lesions one-to-one, greedily by decreasing IoU, "
    "requiring IoU above the lesion matching threshold; lesion_dice is the mean Dice over reference "
    "lesions (missed = 0); panoptic quality PQ = SQ x RQ uses matches with IoU > 0.5. "
    "Volumes are voxel counts times the voxel volume (mL); volume_diff_ml = prediction - reference. "
    "Aggregates use finite values only (n; n_nan undefined and n_inf infinite values are counted "
    "separately); std is the sample standard deviation (ddof=1); q1/q3 are the 25th/75th percentiles; "
    "mean_foreground_dice is the mean over classes (not regions) of the per-class mean Dice."
)

# Direct bincount up to this many distinct values per array (K*K bins); larger label
# values are first mapped onto the requested labels.
_MAX_DIRECT_LABELS = 1024
# Voxels per bincount chunk: bounds the temporary int64 index array to ~64 MB.
_CHUNK = 1 << 23


# ------------------------------------------------------------------ structures
@dataclass(frozen=True)
class Structure:
    """A class (one label value) or a region (union of label values) that gets a row per case.

    Attributes:
        name: Display name (unique among the structures of an evaluation).
        labels: Label values whose union is the structure.
        kind: ``"class"`` or ``"region"``.
    """

    name: str
    labels: tuple[int, ...]
    kind: Literal["class", "region"] = "class"

    @property
    def label(self) -> int | str:
        """Row ``label`` value: the class value, or the region's values joined by ``+``."""
        if self.kind == "class":
            return self.labels[0]
        return "+".join(str(v) for v in self.labels)


def make_structures(
    label_names: Mapping[int, str], regions: Mapping[str, Sequence[int | str]] | None = None
) -> list[Structure]:
    """Classes (ascending label value, background 0 skipped) followed by regions (given order).

    Args:
        label_names: ``{label value: class name}``.
        regions: ``{region name: [label values or class names]}``.

    Raises:
        ConfigError: A region is empty, names an unknown class, or reuses a class name.
    """
    classes = [Structure(str(name), (int(value),)) for value, name in sorted(label_names.items()) if int(value) != 0]
    by_name = {s.name: s.labels[0] for s in classes}
    out = list(classes)
    for region, members in (regions or {}).items():
        if region in by_name or any(s.name == region for s in out):
            raise ConfigError(f"region {region!r}: the name is already used by a class or region")
        values: set[int] = set()
        for member in members:
            if isinstance(member, str) and not member.strip().isdigit():
                if member not in by_name:
                    raise ConfigError(f"region {region!r}: unknown class name {member!r} (known: {sorted(by_name)})")
                values.add(by_name[member])
            else:
                values.add(int(member))
        if not values or 0 in values:
            raise ConfigError(f"region {region!r}: needs at least one foreground label value (got {list(members)})")
        out.append(Structure(str(region), tuple(sorted(values)), "region"))
    return out


@dataclass(frozen=True)
class EvalOptions:
    """Options of :func:`evaluate_case`.

    Attributes:
        tolerance_mm: NSD tolerance in mm.
        percentile: Percentile of the robust Hausdorff distance (reported as ``hd95_mm``).
        connectivity: Connectivity of lesions (6, 18 or 26).
        match_iou: Lesion detection needs IoU above this (0 = any overlap).
        surface: Compute surface distances.
        lesions: Compute lesion-wise metrics.
    """

    tolerance_mm: float = 2.0
    percentile: float = 95.0
    connectivity: int = 26
    match_iou: float = 0.1
    surface: bool = True
    lesions: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tolerance_mm) and self.tolerance_mm >= 0):
            raise ConfigError(f"tolerance must be a finite number of mm >= 0, got {self.tolerance_mm}")
        if not 0 <= self.percentile <= 100:
            raise ConfigError(f"percentile must be in [0, 100], got {self.percentile}")
        if self.connectivity not in (6, 18, 26):
            raise ConfigError(f"connectivity must be 6, 18 or 26, got {self.connectivity}")
        if not 0 <= self.match_iou < 1:
            raise ConfigError(f"lesion matching IoU must be in [0, 1), got {self.match_iou}")


@dataclass
class CaseResult:
    """Everything computed for one case.

    Attributes:
        rows: One row per structure (keys :data:`ROW_COLUMNS`).
        lesion_rows: One row per lesion (``case``, ``kind``, ``label``, ``name`` + lesion columns).
        present_ref: Label values present in the reference (0 excluded).
        present_pred: Label values present in the prediction (0 excluded).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    lesion_rows: list[dict[str, Any]] = field(default_factory=list)
    present_ref: set[int] = field(default_factory=set)
    present_pred: set[int] = field(default_factory=set)


# ------------------------------------------------------------------ counting
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
    """Overlap metrics and volumes of one structure from its confusion counts.

    Args:
        tp: True positive voxels.
        fp: False positive voxels.
        fn: False negative voxels.
        voxel_ml: Volume of one voxel in mL.

    Returns:
        ``dice``, ``iou``, ``precision``, ``recall``, ``ref_volume_ml``, ``pred_volume_ml``,
        ``volume_diff_ml``, ``ref_voxels``, ``pred_voxels`` (undefined metrics are NaN).
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


# ------------------------------------------------------------------ one case
def evaluate_case(
    pred: Volume,
    ref: Volume,
    *,
    structures: Sequence[Structure],
    case_id: str,
    options: EvalOptions | None = None,
    atol: float = 1e-4,
) -> CaseResult:
    """All metrics of one predicted label volume against its reference.

    Args:
        pred: Predicted labels, array ``(1, X, Y, Z)``.
        ref: Reference labels, array ``(1, X, Y, Z)`` on the same grid.
        structures: Classes and regions to evaluate (:func:`make_structures`).
        case_id: Case identifier, stored in each row and named in errors.
        options: Metric options (defaults of :class:`EvalOptions`).
        atol: Tolerance (mm) of the grid comparison.

    Returns:
        The :class:`CaseResult` (rows in the order of ``structures``).

    Raises:
        GeometryError: The two volumes are not on the same grid.
        ValueError: A volume has more than one channel or non-integer values.
    """
    options = options or EvalOptions()
    ref.geometry.require_same(pred.geometry, atol=atol, what=f"prediction and reference for case {case_id}")
    for volume, what in ((pred, "prediction"), (ref, "reference")):
        if volume.channels != 1:
            raise ValueError(f"case {case_id}: {what} must have one channel, got {volume.channels}")
    p, r = _as_label_array(pred.array[0], "prediction"), _as_label_array(ref.array[0], "reference")
    boxes_ref, boxes_pred = ndimage.find_objects(r), ndimage.find_objects(p)
    result = CaseResult(
        present_ref={i + 1 for i, b in enumerate(boxes_ref) if b is not None},
        present_pred={i + 1 for i, b in enumerate(boxes_pred) if b is not None},
    )
    voxel_ml = voxel_volume_ml(ref)
    spacing = ref.geometry.spacing
    for structure in structures:
        box = _structure_box(structure.labels, boxes_ref, boxes_pred, r.shape)
        if box is None:  # empty in both
            pred_mask = ref_mask = np.zeros((1, 1, 1), dtype=bool)
            offset: tuple[int, ...] = (0, 0, 0)
        else:
            pred_mask, ref_mask = _mask(p[box], structure.labels), _mask(r[box], structure.labels)
            offset = tuple(int(s.start) for s in box)
        # Counting inside the box is exact: the structure has no voxel outside it in either volume.
        tp = int(np.count_nonzero(pred_mask & ref_mask))
        fp, fn = int(np.count_nonzero(pred_mask)) - tp, int(np.count_nonzero(ref_mask)) - tp
        row: dict[str, Any] = {"case": case_id, "kind": structure.kind, "label": structure.label}
        row["name"] = structure.name
        row.update(metrics_from_counts(tp, fp, fn, voxel_ml=voxel_ml))
        row.update(_surface_part(pred_mask, ref_mask, spacing, options))
        lesion_part, lesion_rows = _lesion_part(pred_mask, ref_mask, voxel_ml, ref, offset, options)
        row.update(lesion_part)
        result.rows.append({column: row[column] for column in ROW_COLUMNS})
        head = {"case": case_id, "kind": structure.kind, "label": structure.label, "name": structure.name}
        result.lesion_rows += [{**head, **{c: lesion[c] for c in LESION_ROW_COLUMNS}} for lesion in lesion_rows]
    return result


def case_metrics(
    pred: Volume,
    ref: Volume,
    *,
    label_names: dict[int, str],
    case_id: str,
    atol: float = 1e-4,
    regions: Mapping[str, Sequence[int | str]] | None = None,
    options: EvalOptions | None = None,
) -> list[dict[str, Any]]:
    """Per-structure metrics of one case (rows of :func:`evaluate_case`).

    Args:
        pred: Predicted labels, array ``(1, X, Y, Z)``.
        ref: Reference labels, array ``(1, X, Y, Z)`` on the same grid.
        label_names: ``{label value: class name}``; label 0 (background) is skipped.
        case_id: Case identifier, stored in each row and named in errors.
        atol: Tolerance (mm) of the grid comparison.
        regions: ``{region name: [label values or class names]}`` evaluated after the classes.
        options: Metric options.

    Returns:
        One row per class (ascending label) then per region, with the keys of :data:`ROW_COLUMNS`.

    Raises:
        GeometryError: The two volumes are not on the same grid.
        ValueError: A volume has more than one channel or non-integer values.
    """
    structures = make_structures(label_names, regions)
    return evaluate_case(pred, ref, structures=structures, case_id=case_id, options=options, atol=atol).rows


def _structure_box(
    labels: Iterable[int],
    boxes_ref: Sequence[tuple[slice, ...] | None],
    boxes_pred: Sequence[tuple[slice, ...] | None],
    shape: tuple[int, ...],
) -> tuple[slice, ...] | None:
    """Union of the bounding boxes of ``labels`` in both volumes, plus one voxel (clipped)."""
    found = [
        boxes[v - 1]
        for v in labels
        for boxes in (boxes_ref, boxes_pred)
        if 0 < v <= len(boxes) and boxes[v - 1] is not None
    ]
    if not found:
        return None
    starts = [min(int(b[a].start) for b in found if b is not None) for a in range(len(shape))]
    stops = [max(int(b[a].stop) for b in found if b is not None) for a in range(len(shape))]
    return grow_box([slice(s, e) for s, e in zip(starts, stops, strict=True)], shape, margin=1)


def _mask(labels: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return labels == values[0] if len(values) == 1 else np.isin(labels, values)


def _surface_part(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], options: EvalOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"nsd_tolerance_mm": options.tolerance_mm}
    if not options.surface:
        out.update(dict.fromkeys(SURFACE_COLUMNS, math.nan))
        return out
    # The masks are already cropped (one voxel of margin), so no second crop.
    distances = surface_distances(pred, ref, spacing=spacing, crop=False)
    out.update(distances.metrics(tolerance_mm=options.tolerance_mm, percentile=options.percentile))
    return out


def _lesion_part(
    pred: np.ndarray,
    ref: np.ndarray,
    voxel_ml: float,
    grid: Volume,
    offset: Sequence[int],
    options: EvalOptions,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not options.lesions:
        return dict.fromkeys(LESION_COLUMNS, math.nan), []
    return lesion_metrics(
        pred,
        ref,
        connectivity=options.connectivity,
        match_iou=options.match_iou,
        voxel_ml=voxel_ml,
        affine=grid.geometry.affine,
        offset=offset,
    )


# ------------------------------------------------------------------ aggregates
def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary statistics over cases, per class and per region.

    Args:
        rows: Rows of :func:`evaluate_case` (any number of cases).

    Returns:
        ``{"n_cases", "mean_foreground_dice", "classes", "regions"}`` where ``classes`` and
        ``regions`` map each name (in row order) to ``{"label", "n_cases", "n_empty_both",
        "lesions": {pooled detection}, <metric>: {"n", "n_nan", "n_inf", "mean", "median", "std",
        "q1", "q3"}}`` for every metric of :data:`METRIC_COLUMNS` present in the rows.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    first_seen: dict[str, int] = {}
    for row in rows:
        first_seen.setdefault(str(row["name"]), len(first_seen))

    def order(row: dict[str, Any]) -> tuple[int, int]:  # classes by label value, regions as given
        if str(row.get("kind", "class")) == "class":
            return (0, int(row["label"]))
        return (1, first_seen[str(row["name"])])

    for row in sorted(rows, key=order):
        groups.setdefault((str(row.get("kind", "class")), str(row["name"])), []).append(row)
    out: dict[str, Any] = {"classes": {}, "regions": {}}
    for (kind, name), group in groups.items():
        entry: dict[str, Any] = {
            "label": group[0]["label"],
            "n_cases": len(group),
            "n_empty_both": sum(1 for r in group if r["ref_voxels"] == 0 and r["pred_voxels"] == 0),
        }
        for column in METRIC_COLUMNS:
            if column in group[0]:
                entry[column] = _describe([float(r[column]) for r in group])
        if "lesion_tp" in group[0]:
            entry["lesions"] = _pooled_lesions(group)
        out["classes" if kind == "class" else "regions"][name] = entry
    class_means = [c["dice"]["mean"] for c in out["classes"].values() if not math.isnan(c["dice"]["mean"])]
    return {
        "n_cases": len({str(r["case"]) for r in rows}),
        "mean_foreground_dice": float(np.mean(class_means)) if class_means else math.nan,
        **out,
    }


def _pooled_lesions(group: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in group if not _isnan(r["lesion_tp"])]
    tp, fn, fp = (sum(int(r[c]) for r in scored) for c in ("lesion_tp", "lesion_fn", "lesion_fp"))
    nan = math.nan
    return {
        "ref": tp + fn,
        "pred": tp + fp,
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
    }


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _describe(values: list[float]) -> dict[str, Any]:
    """Statistics of the finite ``values`` (NaN and inf counted, not used)."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    n = int(finite.size)
    stats: dict[str, Any] = {
        "n": n,
        "n_nan": int(np.count_nonzero(np.isnan(array))),
        "n_inf": int(np.count_nonzero(np.isinf(array))),
    }
    if n == 0:
        stats.update(mean=math.nan, median=math.nan, std=math.nan, q1=math.nan, q3=math.nan)
        return stats
    q1, median, q3 = (float(q) for q in np.percentile(finite, [25.0, 50.0, 75.0]))
    stats.update(
        mean=float(finite.mean()),
        median=median,
        std=float(finite.std(ddof=1)) if n > 1 else math.nan,
        q1=q1,
        q3=q3,
    )
    return stats
