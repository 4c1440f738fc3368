"""The body's bounding box: where windows are worth running.

Air around the patient (CT below -500 HU) and the zero background of skull-stripped or
masked MR images carry no anatomy; windows that see only them are skipped by cropping
the network-grid image to the body's box first (nnU-Net crops to the non-zero box the
same way).  Outside the box the prediction is background.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from medseg.data.plan import Plan
from medseg.io import Volume

__all__ = ["CT_BODY_HU", "body_box", "box_on_grid"]

#: CT voxels above this (HU) count as body; air is about -1000 HU, lung about -850 to -500.
CT_BODY_HU = -500.0

#: Extra network-grid voxels kept around the mapped body box.
MARGIN = 2


def body_box(source: Volume, plan: Plan) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxel box ``[lo, hi)`` on the source grid that holds every body voxel of any channel.

    Args:
        source: ``(C, X, Y, Z)`` image with raw intensities, channels in plan order.
        plan: The model's plan: CT channels use the HU threshold; channels normalised over
            their foreground use "above the image minimum"; others the non-zero mask.

    Returns:
        ``(lo, hi)`` integer arrays, or ``None`` when no voxel belongs to the body
        (e.g. an empty or constant air image).
    """
    lo = np.array(source.geometry.shape)
    hi = np.zeros(3, dtype=np.int64)
    found = False
    for c, norm in enumerate(plan.channels):
        values = source.array[c]
        if norm.scheme == "ct":
            mask = values > CT_BODY_HU
        elif getattr(norm, "region", "image") == "foreground":
            mask = values > values.min()  # the plan treats the image minimum as background
        else:
            mask = values != 0
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            hits = np.flatnonzero(mask.any(axis=others))
            if hits.size == 0:
                break
            found = True
            lo[axis] = min(lo[axis], hits[0])
            hi[axis] = max(hi[axis], hits[-1] + 1)
    return (lo, hi) if found else None


def box_on_grid(
    box: tuple[np.ndarray, np.ndarray],
    *,
    source_affine: np.ndarray,
    grid_affine: np.ndarray,
    grid_shape: Sequence[int],
    min_size: Sequence[int],
    margin: int = MARGIN,
) -> tuple[slice, slice, slice]:
    """The source-grid box mapped onto another grid, grown by ``margin`` and to at least ``min_size``.

    The eight corners of the box (voxel centres ± half a voxel) are mapped through the
    affines; the result is their axis-aligned bounding box in the other grid (exact for
    axis-aligned grids, conservative for oblique ones), clipped to it.

    Args:
        box: ``(lo, hi)`` voxel box on the source grid.
        source_affine: ``(4, 4)`` RAS affine of the source grid.
        grid_affine: ``(4, 4)`` RAS affine of the target grid.
        grid_shape: Shape of the target grid.
        min_size: Smallest box per axis (the window size), if the grid allows.
        margin: Voxels added on each side.

    Returns:
        Three slices on the target grid.
    """
    lo, hi = box
    corners = np.array(list(itertools.product(*[(lo[a] - 0.5, hi[a] - 0.5) for a in range(3)])), dtype=np.float64)
    homogeneous = np.c_[corners, np.ones(len(corners))]
    to_grid = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64)) @ np.asarray(source_affine, dtype=np.float64)
    mapped = (to_grid @ homogeneous.T)[:3]
    slices = []
    for axis in range(3):
        size = int(grid_shape[axis])
        start = max(0, math.floor(mapped[axis].min() + 0.5) - margin)
        stop = min(size, math.floor(mapped[axis].max() + 0.5) + 1 + margin)
        want = min(size, int(min_size[axis]))
        if stop - start < want:
            extra = want - (stop - start)
            start = max(0, start - extra // 2)
            stop = min(size, start + want)
            start = max(0, stop - want)
        slices.append(slice(start, stop))
    return slices[0], slices[1], slices[2]
