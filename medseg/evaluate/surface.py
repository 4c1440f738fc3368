"""Surface distances in millimetres: Hausdorff (max and 95th percentile), ASSD, normalised surface Dice.

Definitions (chosen to agree with MONAI's ``compute_hausdorff_distance``,
``compute_average_surface_distance`` and ``compute_surface_dice`` with ``use_subvoxels=False``,
which is what they compute by default):

* The **surface** of a mask is the set of its voxels that have at least one of their 6 face
  neighbours outside the mask (voxels beyond the array border count as outside):
  ``mask & ~binary_erosion(mask)`` with scipy's default face-connected structuring element.
  Points are voxel centres; ``spacing`` (mm per voxel axis) scales the axes, which are assumed
  orthogonal (true for every non-sheared grid, whatever its direction cosines).
* ``d(p -> r)``: for every predicted surface voxel, the Euclidean distance (mm) to the nearest
  reference surface voxel; ``d(r -> p)`` the other way round.
* **HD** (``hd_mm``) ``= max(max d(p -> r), max d(r -> p))``.
* **HD95** (``hd95_mm``) ``= max(P95 d(p -> r), P95 d(r -> p))``: the larger of the two *directed*
  95th percentiles (not the percentile of the pooled distances), each with linear interpolation
  between order statistics (numpy's and ``torch.quantile``'s default).
* **ASSD** (``assd_mm``) ``= (sum d(p -> r) + sum d(r -> p)) / (|S_p| + |S_r|)``, the mean of the
  pooled distances (MONAI's ``symmetric=True``).
* **NSD** at tolerance ``tau`` mm ``= (#{d(p -> r) <= tau} + #{d(r -> p) <= tau}) / (|S_p| + |S_r|)``
  (Nikolov et al. 2021, counting surface voxels rather than surfel areas).

Empty structures (Metrics Reloaded: undefined is not perfect):

* Both masks empty: every surface metric is NaN (undefined; excluded from aggregates).
* Exactly one mask empty: HD, HD95 and ASSD are ``+inf`` (the distance to an empty set; MONAI
  returns the same) and NSD is 0 (no boundary element lies within tolerance).

Speed: only the bounding box of the union of both masks (plus one voxel of margin) is processed,
and nearest neighbours are found with a k-d tree over the surface voxels
(:class:`scipy.spatial.cKDTree`), which on CPU is several times faster than a distance transform
of the box; voxels on both surfaces have distance 0 and are not queried.  A Euclidean distance
transform (:func:`scipy.ndimage.distance_transform_edt` with ``sampling=spacing``) gives the same
numbers (``method="edt"``) and is kept as a cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "SURFACE_COLUMNS",
    "SurfaceDistances",
    "bounding_box",
    "farthest_surface_point",
    "surface_distances",
    "surface_metrics",
    "surface_voxels",
]

#: Keys of :func:`surface_metrics` (and row columns).
SURFACE_COLUMNS: tuple[str, ...] = ("hd95_mm", "hd_mm", "assd_mm", "nsd")

DistanceMethod = Literal["kdtree", "edt"]


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the array counts as outside).

    Args:
        mask: Boolean array of any dimension (e.g. ``(X, Y, Z)``).

    Returns:
        Boolean array shaped like ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def bounding_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of the union of same-shaped masks, grown by ``margin`` voxels (clipped).

    Returns:
        One slice per axis, or ``None`` when every mask is empty.
    """
    union = np.zeros(masks[0].shape, dtype=bool)
    for mask in masks:
        union |= mask
    boxes = ndimage.find_objects(union.view(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    return grow_box(boxes[0], union.shape, margin=margin)


def grow_box(box: Sequence[slice], shape: Sequence[int], *, margin: int = 1) -> tuple[slice, ...]:
    """``box`` widened by ``margin`` voxels on every side, clipped to ``shape``."""
    return tuple(
        slice(max(int(s.start) - margin, 0), min(int(s.stop) + margin, int(n))) for s, n in zip(box, shape, strict=True)
    )


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed surface distances of one prediction/reference pair.

    Attributes:
        pred_to_ref: ``(N_p,)`` float64 mm, one per predicted surface voxel (``inf`` when the
            reference is empty).
        ref_to_pred: ``(N_r,)`` float64 mm, one per reference surface voxel (``inf`` when the
            prediction is empty).
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray

    @property
    def empty(self) -> bool:
        """Both surfaces are empty (both masks empty)."""
        return self.pred_to_ref.size == 0 and self.ref_to_pred.size == 0

    def hausdorff(self, percentile: float = 100.0) -> float:
        """Max over both directions of the directed ``percentile`` (100 = classic Hausdorff), in mm."""
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if self.empty:
            return math.nan
        if self.pred_to_ref.size == 0 or self.ref_to_pred.size == 0:
            return math.inf
        values = [
            float(d.max()) if percentile == 100.0 else float(np.percentile(d, percentile))
            for d in (self.pred_to_ref, self.ref_to_pred)
        ]
        return max(values)

    def assd(self) -> float:
        """Average symmetric surface distance (mean of the pooled directed distances), in mm."""
        if self.empty:
            return math.nan
        if self.pred_to_ref.size == 0 or self.ref_to_pred.size == 0:
            return math.inf
        total = float(self.pred_to_ref.sum()) + float(self.ref_to_pred.sum())
        return total / (self.pred_to_ref.size + self.ref_to_pred.size)

    def nsd(self, tolerance_mm: float) -> float:
        """Normalised surface Dice: fraction of both surfaces within ``tolerance_mm`` of the other."""
        if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
            raise ValueError(f"tolerance must be a finite non-negative number of mm, got {tolerance_mm}")
        if self.empty:
            return math.nan
        within = int(np.count_nonzero(self.pred_to_ref <= tolerance_mm))
        within += int(np.count_nonzero(self.ref_to_pred <= tolerance_mm))
        return within / (self.pred_to_ref.size + self.ref_to_pred.size)

    def metrics(self, *, tolerance_mm: float, percentile: float = 95.0) -> dict[str, float]:
        """``{"hd95_mm", "hd_mm", "assd_mm", "nsd"}`` (see the module docstring for the conventions)."""
        return {
            "hd95_mm": self.hausdorff(percentile),
            "hd_mm": self.hausdorff(100.0),
            "assd_mm": self.assd(),
            "nsd": self.nsd(tolerance_mm),
        }


def surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing: Sequence[float],
    crop: bool = True,
    method: DistanceMethod = "kdtree",
) -> SurfaceDistances:
    """Directed distances between the surfaces of two masks, in mm.

    Args:
        pred: Predicted mask, boolean ``(X, Y, Z)`` (or any dimension matching ``spacing``).
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm along each axis.
        crop: Work on the bounding box of ``pred | ref`` plus one voxel (same result, faster).
        method: ``"kdtree"`` (default) or ``"edt"`` (distance transform; same numbers, slower).

    Returns:
        The :class:`SurfaceDistances`.

    Raises:
        ValueError: Shapes differ, or ``spacing`` does not have one positive value per axis.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    scale = np.asarray(spacing, dtype=np.float64)
    if scale.shape != (pred.ndim,) or not np.all(scale > 0):
        raise ValueError(f"spacing must have {pred.ndim} positive values, got {tuple(spacing)}")
    if crop:
        box = bounding_box(pred, ref)
        if box is None:
            empty = np.zeros(0, dtype=np.float64)
            return SurfaceDistances(empty, empty)
        pred, ref = pred[box], ref[box]
    surf_pred, surf_ref = surface_voxels(pred), surface_voxels(ref)
    if method == "edt":
        return SurfaceDistances(_edt_distances(surf_pred, surf_ref, scale), _edt_distances(surf_ref, surf_pred, scale))
    if method != "kdtree":
        raise ValueError(f"unknown distance method {method!r} (kdtree or edt)")
    return SurfaceDistances(_tree_distances(surf_pred, surf_ref, scale), _tree_distances(surf_ref, surf_pred, scale))


def farthest_surface_point(
    pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float]
) -> tuple[tuple[int, ...], float] | None:
    """Where the Hausdorff distance is attained: the surface voxel farthest from the other surface.

    Args:
        pred: Predicted mask, boolean ``(X, Y, Z)``.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm along each axis.

    Returns:
        ``(voxel index, distance in mm)``, or ``None`` unless both masks are non-empty.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    box = bounding_box(pred, ref)
    if box is None or not pred.any() or not ref.any():
        return None
    distances = surface_distances(pred[box], ref[box], spacing=spacing, crop=False)
    best: tuple[tuple[int, ...], float] | None = None
    for mask, values in ((pred[box], distances.pred_to_ref), (ref[box], distances.ref_to_pred)):
        k = int(np.argmax(values))
        if best is None or values[k] > best[1]:
            index = np.argwhere(surface_voxels(mask))[k]
            best = (tuple(int(i + s.start) for i, s in zip(index, box, strict=True)), float(values[k]))
    return best


def _tree_distances(source: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance of each ``source`` voxel (raster order) to the nearest ``target`` voxel."""
    n_source = int(np.count_nonzero(source))
    if not target.any():
        return np.full(n_source, np.inf)
    out = np.zeros(n_source, dtype=np.float64)
    shared = target[source]  # source voxels that are also target voxels: distance 0
    if shared.all():
        return out
    queries = np.argwhere(source & ~target) * scale
    tree = cKDTree(np.argwhere(target) * scale, leafsize=32, balanced_tree=False, compact_nodes=False)
    out[~shared] = tree.query(queries, k=1)[0]
    return out


def _edt_distances(source: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Same as :func:`_tree_distances`, from a Euclidean distance transform of ``~target``."""
    if not target.any():
        return np.full(int(np.count_nonzero(source)), np.inf)
    distance = ndimage.distance_transform_edt(~target, sampling=scale)
    return np.asarray(distance[source], dtype=np.float64)


def surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    percentile: float = 95.0,
) -> dict[str, float]:
    """HD95, HD, ASSD (mm) and NSD of two masks; see the module docstring for definitions.

    Args:
        pred: Predicted mask, boolean ``(X, Y, Z)``.
        ref: Reference mask of the same shape.
        spacing: Voxel size in mm along each axis.
        tolerance_mm: NSD tolerance in mm.
        percentile: Percentile of the robust Hausdorff distance (reported as ``hd95_mm``).

    Returns:
        ``{"hd95_mm", "hd_mm", "assd_mm", "nsd"}``.
    """
    distances = surface_distances(pred, ref, spacing=spacing)
    return distances.metrics(tolerance_mm=tolerance_mm, percentile=percentile)
