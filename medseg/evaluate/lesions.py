"""Lesion-wise (instance) metrics: detection, per-lesion Dice and volume, panoptic quality.

Instances are the connected components of one class (or region) mask, from
:func:`medseg.data.instances.connected_instances` (6, 18 or 26 connectivity; 26 by default).

**Detection matching.** Every (reference lesion, predicted lesion) pair that overlaps gets its IoU;
pairs are matched one-to-one greedily in order of decreasing IoU (ties: lower reference id, then
lower predicted id), accepting only pairs with ``IoU > match_iou`` (default 0.1; ``0`` means "any
overlap").  Matched reference lesions are true positives (TP), unmatched reference lesions false
negatives (FN, missed), unmatched predicted lesions false positives (FP).  A reference lesion split
into two predicted pieces is one TP plus one FP; two reference lesions merged into one prediction
are one TP plus one FN.

* ``lesion_sensitivity = TP / n_ref`` (NaN without reference lesions),
  ``lesion_precision = TP / n_pred`` (NaN without predicted lesions),
  ``lesion_f1 = 2 TP / (2 TP + FP + FN)`` (NaN when both are lesion-free).
* ``lesion_dice``: mean over *reference* lesions of the Dice with the matched prediction, a missed
  lesion counting 0 (NaN without reference lesions).

**Panoptic quality** (Kirillov et al., CVPR 2019) uses its own matching: pairs with IoU > 0.5,
which is unique without any assignment step.  ``SQ`` = mean IoU of those pairs (NaN without any),
``RQ = TP / (TP + FP/2 + FN/2)``, ``PQ = SQ * RQ`` (0 when there is no match); all NaN when both
sides are lesion-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.data.instances import connected_instances
from medseg.io.volume import LPS_FROM_RAS

__all__ = ["LESION_COLUMNS", "LESION_ROW_COLUMNS", "PQ_IOU", "lesion_metrics"]

#: Per case x structure summary columns added to ``metrics.csv``.
LESION_COLUMNS: tuple[str, ...] = (
    "ref_lesions",
    "pred_lesions",
    "lesion_tp",
    "lesion_fn",
    "lesion_fp",
    "lesion_sensitivity",
    "lesion_precision",
    "lesion_f1",
    "lesion_dice",
    "pq",
    "sq",
    "rq",
)

#: Columns of ``lesions.csv`` (one row per reference lesion and per unmatched predicted lesion),
#: after the ``case``, ``label``, ``name`` columns.  Centres are in LPS millimetres (DICOM/ITK
#: patient coordinates) of the reference lesion (TP, FN) or of the predicted lesion (FP).
LESION_ROW_COLUMNS: tuple[str, ...] = (
    "status",
    "ref_id",
    "pred_id",
    "ref_voxels",
    "pred_voxels",
    "ref_volume_ml",
    "pred_volume_ml",
    "iou",
    "dice",
    "centre_x_mm",
    "centre_y_mm",
    "centre_z_mm",
)

#: IoU above which a pair counts for panoptic quality.
PQ_IOU = 0.5


def lesion_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    connectivity: int = 26,
    match_iou: float = 0.1,
    voxel_ml: float = 1.0,
    affine: np.ndarray | None = None,
    offset: Sequence[int] = (0, 0, 0),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Lesion detection, per-lesion overlap and panoptic quality of two masks.

    Args:
        pred: Predicted mask, boolean ``(X, Y, Z)`` (may be a crop of the full grid).
        ref: Reference mask, same shape.
        connectivity: Neighbourhood defining a lesion (6, 18 or 26).
        match_iou: A detection needs ``IoU > match_iou`` (0 = any overlap).
        voxel_ml: Volume of one voxel in mL.
        affine: ``(4, 4)`` voxel-index -> RAS affine of the *full* grid, for lesion centres in mm
            (``None``: centres are NaN).
        offset: Index of the crop's first voxel in the full grid.

    Returns:
        ``(summary, rows)``: the :data:`LESION_COLUMNS` values, and one dict per lesion with the
        :data:`LESION_ROW_COLUMNS` (reference lesions in id order, then unmatched predictions).
    """
    if not 0.0 <= match_iou < 1.0:
        raise ValueError(f"match_iou must be in [0, 1), got {match_iou}")
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    ref_inst, ref_classes = connected_instances(ref.view(np.uint8), connectivity=connectivity)
    pred_inst, pred_classes = connected_instances(pred.view(np.uint8), connectivity=connectivity)
    n_ref, n_pred = len(ref_classes), len(pred_classes)
    ref_sizes = np.bincount(ref_inst.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_inst.ravel(), minlength=n_pred + 1)

    both = (ref_inst > 0) & (pred_inst > 0)
    codes = ref_inst[both].astype(np.int64) * (n_pred + 1) + pred_inst[both]
    pair_codes, inter = np.unique(codes, return_counts=True)
    pair_ref, pair_pred = pair_codes // (n_pred + 1), pair_codes % (n_pred + 1)
    iou = inter / (ref_sizes[pair_ref] + pred_sizes[pair_pred] - inter)

    match = _greedy_match(pair_ref, pair_pred, iou, threshold=match_iou)
    tp = len(match)
    fn, fp = n_ref - tp, n_pred - tp
    pq_pairs = iou > PQ_IOU
    summary = _summary(n_ref, n_pred, tp, fn, fp, inter, pair_ref, pair_pred, ref_sizes, pred_sizes, match)
    summary.update(_panoptic(n_ref, n_pred, iou[pq_pairs]))

    ref_centres = _centres(ref_inst, n_ref, affine, offset)
    pred_centres = _centres(pred_inst, n_pred, affine, offset)
    by_pair = {(int(r), int(p)): (int(i), float(j)) for r, p, i, j in zip(pair_ref, pair_pred, inter, iou, strict=True)}
    rows = []
    for r in range(1, n_ref + 1):
        p = match.get(r)
        row = _row("TP" if p else "FN", r, p, ref_sizes[r], pred_sizes[p] if p else 0, voxel_ml, ref_centres[r - 1])
        if p:
            intersection, pair_iou = by_pair[r, p]
            row["iou"] = pair_iou
            row["dice"] = 2.0 * intersection / (ref_sizes[r] + pred_sizes[p])
        rows.append(row)
    matched_pred = set(match.values())
    for p in range(1, n_pred + 1):
        if p not in matched_pred:
            rows.append(_row("FP", None, p, 0, pred_sizes[p], voxel_ml, pred_centres[p - 1]))
    return summary, rows


def _greedy_match(pair_ref: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, *, threshold: float) -> dict[int, int]:
    """One-to-one matching, highest IoU first; ``{ref id: pred id}``."""
    order = np.lexsort((pair_pred, pair_ref, -iou))
    used_ref: dict[int, int] = {}
    used_pred: set[int] = set()
    for k in order:
        if iou[k] <= threshold:
            break
        r, p = int(pair_ref[k]), int(pair_pred[k])
        if r not in used_ref and p not in used_pred:
            used_ref[r] = p
            used_pred.add(p)
    return used_ref


def _summary(
    n_ref: int,
    n_pred: int,
    tp: int,
    fn: int,
    fp: int,
    inter: np.ndarray,
    pair_ref: np.ndarray,
    pair_pred: np.ndarray,
    ref_sizes: np.ndarray,
    pred_sizes: np.ndarray,
    match: dict[int, int],
) -> dict[str, Any]:
    nan = math.nan
    dice_sum = 0.0
    lookup = {(int(r), int(p)): int(i) for r, p, i in zip(pair_ref, pair_pred, inter, strict=True)}
    for r, p in match.items():
        dice_sum += 2.0 * lookup[r, p] / (int(ref_sizes[r]) + int(pred_sizes[p]))
    return {
        "ref_lesions": n_ref,
        "pred_lesions": n_pred,
        "lesion_tp": tp,
        "lesion_fn": fn,
        "lesion_fp": fp,
        "lesion_sensitivity": tp / n_ref if n_ref else nan,
        "lesion_precision": tp / n_pred if n_pred else nan,
        "lesion_f1": 2.0 * tp / (2 * tp + fp + fn) if (n_ref or n_pred) else nan,
        "lesion_dice": dice_sum / n_ref if n_ref else nan,
    }


def _panoptic(n_ref: int, n_pred: int, matched_iou: np.ndarray) -> dict[str, float]:
    """PQ, SQ, RQ from the IoUs of the pairs with IoU > 0.5."""
    if n_ref == 0 and n_pred == 0:
        return {"pq": math.nan, "sq": math.nan, "rq": math.nan}
    tp = int(matched_iou.size)
    fp, fn = n_pred - tp, n_ref - tp
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(matched_iou.mean()) if tp else math.nan
    pq = float(matched_iou.sum()) / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": pq, "sq": sq, "rq": rq}


def _centres(instances: np.ndarray, count: int, affine: np.ndarray | None, offset: Sequence[int]) -> list[np.ndarray]:
    """LPS mm centre of mass of instances ``1..count`` (NaN without an affine)."""
    if count == 0:
        return []
    if affine is None:
        return [np.full(3, np.nan)] * count
    index = np.nonzero(instances)
    ids = instances[index]
    sizes = np.bincount(ids, minlength=count + 1)[1:].astype(np.float64)
    ijk = np.stack(
        [np.bincount(ids, weights=axis, minlength=count + 1)[1:] / sizes for axis in index], axis=1
    ) + np.asarray(offset, dtype=np.float64)
    ras = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return list(ras @ LPS_FROM_RAS.T)


def _row(
    status: str,
    ref_id: int | None,
    pred_id: int | None,
    ref_voxels: int,
    pred_voxels: int,
    voxel_ml: float,
    centre: np.ndarray,
) -> dict[str, Any]:
    return {
        "status": status,
        "ref_id": ref_id if ref_id else "",
        "pred_id": pred_id if pred_id else "",
        "ref_voxels": int(ref_voxels),
        "pred_voxels": int(pred_voxels),
        "ref_volume_ml": int(ref_voxels) * voxel_ml,
        "pred_volume_ml": int(pred_voxels) * voxel_ml,
        "iou": 0.0,
        "dice": 0.0,
        "centre_x_mm": float(centre[0]),
        "centre_y_mm": float(centre[1]),
        "centre_z_mm": float(centre[2]),
    }
