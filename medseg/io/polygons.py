"""Planar polygons <-> voxel masks, and the medseg polygon-annotation JSON format.

This module holds the one rasteriser and the one contour extractor that both the RTSTRUCT
reader/writer (:mod:`medseg.io.rtstruct`) and the polygon-annotation reader use.

Pixel rule (how a polygon becomes voxels), ``pixel_rule="centre"`` (the default):

* Coordinates are continuous voxel indices ``(i, j)`` on one slice: voxel ``(i, j)`` has its
  centre at the integer point ``(i, j)`` and covers ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]``
  (ITK's continuous index).
* A voxel belongs to the region when its **centre** lies inside the polygons under the
  **even-odd rule** (a point is inside when a ray from it crosses the polygon edges an odd number
  of times), so a polygon drawn inside another is a hole, and an island inside the hole is filled
  again.  All polygons passed together (one structure on one slice) take part in the rule.
* A centre lying **on** an edge or a vertex (to within :data:`ON_CONTOUR_TOLERANCE` voxel) is
  inside: the region is closed.  Contours traced through voxel centres (as OpenCV-based tools
  write them) therefore keep their boundary voxels.

This rule is area-unbiased (the voxel count matches the polygon's area up to discretisation) and
is the exact inverse of :func:`mask_to_polygons`, whose marching-squares contours run through the
mid-points between inside and outside voxel centres: ``fill_polygons(mask_to_polygons(m)) == m``.

``pixel_rule="opencv"`` reproduces tools built on OpenCV's ``fillPoly`` (DicomRTTool, rt-utils'
reader): vertices are first rounded to the nearest voxel centre (halves up, like ITK's
``TransformPhysicalPointToIndex``), then the polygon is filled *including every voxel its outline
passes through*.  Such masks are larger by about half a voxel all round; use this rule only to
reproduce labels made by those tools.

Open polylines and single points (RTSTRUCT ``OPEN_PLANAR`` / ``POINT``) mark the voxels whose
square the line passes through (the point's nearest voxel).

The JSON annotation format read by :func:`read_polygon_annotations` is described in
``docs/annotations.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import InputError
from medseg.io.volume import LPS_FROM_RAS, Geometry, Volume, label_dtype
from medseg.types import OVERLAP_POLICIES, PIXEL_RULES, OverlapPolicy, PathLike, PixelRule

__all__ = [
    "ON_CONTOUR_TOLERANCE",
    "OVERLAP_POLICIES",
    "PIXEL_RULES",
    "POLYGON_FORMAT",
    "AnnotationLabels",
    "PolygonAnnotations",
    "SliceMask",
    "TracedPolygons",
    "fill_polygons",
    "mask_to_polygons",
    "mark_polyline",
    "paint_masks",
    "polygons_to_labels",
    "rasterise_polygons",
    "read_polygon_annotations",
    "stack_to_polygons",
    "voxel_to_world",
    "world_to_voxel",
]

#: A voxel centre closer than this (in voxels) to a contour counts as on it (and so inside).
ON_CONTOUR_TOLERANCE = 0.01
#: Step (in voxels) at which open polylines / outlines are sampled to find the voxels they touch.
_OUTLINE_STEP = 0.05
#: Upper bound on candidate voxels examined at once by the on-contour test (memory guard).
_CHUNK = 2_000_000

#: Value of the ``format`` key that identifies a medseg polygon-annotation file.
POLYGON_FORMAT = "medseg-polygons"


# ------------------------------------------------------------------ geometry
def world_to_voxel(points_lps: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map LPS patient coordinates (DICOM) to continuous voxel indices of ``geometry``.

    Args:
        points_lps: ``(N, 3)`` points in LPS millimetres.
        geometry: The grid.

    Returns:
        ``(N, 3)`` float64 continuous indices ``(i, j, k)`` (voxel centres are integers).
    """
    ras = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3) @ LPS_FROM_RAS.T
    inverse = np.linalg.inv(geometry.affine)
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def voxel_to_world(indices: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map continuous voxel indices ``(N, 3)`` of ``geometry`` to LPS millimetres ``(N, 3)``."""
    ijk = np.asarray(indices, dtype=np.float64).reshape(-1, 3)
    ras = ijk @ geometry.affine[:3, :3].T + geometry.affine[:3, 3]
    return ras @ LPS_FROM_RAS.T


# ---------------------------------------------------------------- rasterising
def _edges(polygons: Sequence[np.ndarray], *, closed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Start and end points ``(E, 2)`` of every edge of the polygons (closing edge included)."""
    starts, ends = [], []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(p) > 1 and closed and np.array_equal(p[0], p[-1]):
            p = p[:-1]
        if len(p) == 0:
            continue
        if closed:
            starts.append(p)
            ends.append(np.roll(p, -1, axis=0))
        elif len(p) == 1:
            starts.append(p)
            ends.append(p)
        else:
            starts.append(p[:-1])
            ends.append(p[1:])
    if not starts:
        empty = np.zeros((0, 2))
        return empty, empty
    return np.concatenate(starts), np.concatenate(ends)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``counts[e]`` items per edge: the edge of each item and its rank within the edge."""
    total = int(counts.sum())
    edge = np.repeat(np.arange(len(counts)), counts)
    rank = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return edge, rank


def _fill_interior(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """Even-odd scan-line fill of voxel centres (rows ``j``, crossings half-open in ``y``)."""
    nx, ny = mask.shape
    x0, y0 = starts[:, 0], starts[:, 1]
    x1, y1 = ends[:, 0], ends[:, 1]
    keep = y0 != y1  # horizontal edges never cross a row under the half-open rule
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Row j crosses an edge when ylo <= j < yhi: rows ceil(ylo) .. ceil(yhi) - 1.
    jlo = np.clip(np.ceil(ylo), 0, ny).astype(np.int64)
    jhi = np.clip(np.ceil(yhi) - 1, -1, ny - 1).astype(np.int64)
    counts = np.maximum(jhi - jlo + 1, 0)
    if counts.sum() == 0:
        return
    edge, rank = _expand(counts)
    j = jlo[edge] + rank
    x = x0[edge] + (j - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((x, j))
    j, x = j[order], x[order]
    # Every closed polygon crosses a row an even number of times, so consecutive crossings pair up.
    rows, xa, xb = j[0::2], x[0::2], x[1::2]
    ia = np.clip(np.ceil(xa), 0, nx).astype(np.int64)
    ib = np.clip(np.floor(xb), -1, nx - 1).astype(np.int64)
    ok = ia <= ib
    diff = np.zeros((ny, nx + 1), dtype=np.int32)
    np.add.at(diff, (rows[ok], ia[ok]), 1)
    np.add.at(diff, (rows[ok], ib[ok] + 1), -1)
    mask |= (np.cumsum(diff[:, :nx], axis=1) > 0).T


def _mark_near_edges(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray, tolerance: float) -> None:
    """Set voxels whose centre lies within ``tolerance`` of an edge (closed-region rule)."""
    nx, ny = mask.shape
    lo = np.minimum(starts, ends) - tolerance
    hi = np.maximum(starts, ends) + tolerance
    ilo = np.clip(np.ceil(lo[:, 0]), 0, nx).astype(np.int64)
    ihi = np.clip(np.floor(hi[:, 0]), -1, nx - 1).astype(np.int64)
    jlo = np.clip(np.ceil(lo[:, 1]), 0, ny).astype(np.int64)
    jhi = np.clip(np.floor(hi[:, 1]), -1, ny - 1).astype(np.int64)
    ni = np.maximum(ihi - ilo + 1, 0)
    nj = np.maximum(jhi - jlo + 1, 0)
    counts = ni * nj
    bounds = np.searchsorted(np.cumsum(counts), np.arange(_CHUNK, int(counts.sum()), _CHUNK))
    for part in np.split(np.arange(len(counts)), np.unique(bounds)):
        if len(part) == 0 or counts[part].sum() == 0:
            continue
        edge, rank = _expand(counts[part])
        edge = part[edge]
        i = ilo[edge] + rank % ni[edge]
        j = jlo[edge] + rank // ni[edge]
        p0, d = starts[edge], ends[edge] - starts[edge]
        length2 = np.einsum("ij,ij->i", d, d)
        rel = np.stack([i, j], axis=1) - p0
        t = np.divide(np.einsum("ij,ij->i", rel, d), length2, out=np.zeros(len(edge)), where=length2 > 0)
        t = np.clip(t, 0.0, 1.0)
        gap = rel - t[:, None] * d
        hit = np.einsum("ij,ij->i", gap, gap) <= tolerance * tolerance
        mask[i[hit], j[hit]] = True


def _mark_touched(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """Set the voxels whose square an edge passes through (sampled every ``_OUTLINE_STEP``)."""
    nx, ny = mask.shape
    lengths = np.linalg.norm(ends - starts, axis=1)
    counts = np.ceil(lengths / _OUTLINE_STEP).astype(np.int64) + 1
    edge, rank = _expand(counts)
    t = rank / np.maximum(counts[edge] - 1, 1)
    points = starts[edge] + t[:, None] * (ends[edge] - starts[edge])
    idx = np.floor(points + 0.5).astype(np.int64)
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < nx) & (idx[:, 1] >= 0) & (idx[:, 1] < ny)
    mask[idx[ok, 0], idx[ok, 1]] = True


def fill_polygons(
    polygons: Sequence[np.ndarray],
    shape: tuple[int, int],
    *,
    pixel_rule: PixelRule = "centre",
    tolerance: float = ON_CONTOUR_TOLERANCE,
) -> np.ndarray:
    """Rasterise closed polygons on one slice with the even-odd rule.

    Args:
        polygons: Polygons, each ``(N, 2)`` continuous voxel indices ``(i, j)`` (a repeated closing
            vertex is allowed); together they define one region (holes by nesting).
        shape: ``(nx, ny)`` of the slice.
        pixel_rule: ``"centre"`` or ``"opencv"`` (see the module docstring).
        tolerance: Distance in voxels within which a centre counts as on a contour.

    Returns:
        ``(nx, ny)`` boolean mask.
    """
    mask = np.zeros(shape, dtype=bool)
    if pixel_rule == "opencv":
        polygons = [np.floor(np.asarray(p, dtype=np.float64).reshape(-1, 2) + 0.5) for p in polygons]
    elif pixel_rule != "centre":
        raise ValueError(f"pixel_rule must be one of {PIXEL_RULES}, got {pixel_rule!r}")
    starts, ends = _edges(polygons, closed=True)
    if len(starts) == 0:
        return mask
    # Work on the polygons' bounding box only (the region outside it is empty).
    lo = np.maximum(np.floor(starts.min(axis=0) - 1), 0).astype(np.int64)
    hi = np.minimum(np.ceil(starts.max(axis=0) + 1), np.asarray(shape) - 1).astype(np.int64)
    if np.any(hi < lo):
        return mask
    window = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1]
    starts, ends = starts - lo, ends - lo
    _fill_interior(window, starts, ends)
    _mark_near_edges(window, starts, ends, tolerance)
    if pixel_rule == "opencv":
        _mark_touched(window, starts, ends)
    return mask


def mark_polyline(points: np.ndarray, shape: tuple[int, int], *, closed: bool = False) -> np.ndarray:
    """Voxels an open polyline (or a single point) passes through on one slice.

    Args:
        points: ``(N, 2)`` continuous voxel indices; one point marks its nearest voxel.
        shape: ``(nx, ny)`` of the slice.
        closed: Also draw the edge from the last point back to the first.

    Returns:
        ``(nx, ny)`` boolean mask.
    """
    mask = np.zeros(shape, dtype=bool)
    starts, ends = _edges([points], closed=closed)
    if len(starts):
        _mark_touched(mask, starts, ends)
    return mask


# --------------------------------------------------------------- contouring
def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines of a binary slice: marching squares at level 0.5 (``contourpy``).

    The slice is padded with background, so every outline is closed, including those of regions
    touching the border.  Outer boundaries and hole boundaries are returned alike; filling all of
    them with the even-odd rule (:func:`fill_polygons`, ``pixel_rule="centre"``) gives back
    ``mask`` exactly.  Collinear vertices are dropped.

    Args:
        mask: ``(nx, ny)`` boolean (or 0/1) slice.

    Returns:
        Closed polygons, each ``(N, 2)`` float64 voxel indices ``(i, j)`` with vertices on voxel
        edge mid-points (no repeated closing vertex), in a deterministic order.
    """
    binary = np.asarray(mask).astype(bool)
    traced = stack_to_polygons(binary[:, :, None])
    return [traced.polygon(n) for n in range(len(traced))]


@dataclass(frozen=True)
class TracedPolygons:
    """The outlines of every slice of a mask stack, in one array (see :func:`stack_to_polygons`).

    Attributes:
        points: ``(P, 2)`` float64 vertices ``(i, j)`` of all polygons, one after the other.
        offsets: ``(N + 1,)`` start of polygon ``n`` in ``points`` (``offsets[N] == P``).
        slices: ``(N,)`` slice index ``k`` of polygon ``n``, ascending.
    """

    points: np.ndarray
    offsets: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)

    def polygon(self, n: int) -> np.ndarray:
        """Vertices ``(N_n, 2)`` of polygon ``n``."""
        return self.points[self.offsets[n] : self.offsets[n + 1]]


#: Pixels traced per contourpy call by :func:`stack_to_polygons` (memory bound on the tiled image).
_TRACE_PIXELS = 4_000_000


def stack_to_polygons(masks: np.ndarray) -> TracedPolygons:
    """:func:`mask_to_polygons` of every slice ``masks[:, :, k]``, traced together.

    Equals calling :func:`mask_to_polygons` on each slice in turn (same polygons, same vertices,
    same order; tested) without its per-slice and per-polygon cost, which dominated on noisy
    labels (tens of thousands of one-voxel islands):

    * each non-empty slice is *compressed*: every run of background rows (columns) becomes a single
      background row (column).  Marching squares at 0.5 sees the same 2x2 neighbourhoods, so the
      outlines are the same, and their vertices map back exactly (a vertex sits on a row that has
      foreground, or half-way between such a row and its neighbour);
    * the compressed slices are laid out one above the other and traced by one contourpy call per
      block of at most :data:`_TRACE_PIXELS` pixels;
    * closing vertices and collinear vertices are dropped for all polygons at once.

    Args:
        masks: ``(nx, ny, nz)`` boolean (or 0/1) stack.

    Returns:
        The polygons, ordered by slice, then as :func:`mask_to_polygons` orders them.
    """
    binary = np.asarray(masks).astype(bool, copy=False)
    tiles = [(int(k), *_compressed_axes(binary[:, :, k])) for k in np.flatnonzero(binary.any(axis=(0, 1)))]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    block: list[tuple[int, np.ndarray, np.ndarray]] = []
    rows = width = 0
    for tile in tiles:
        height, tile_width = len(tile[2]), len(tile[1])
        if block and (rows + height) * max(width, tile_width) > _TRACE_PIXELS:
            parts.append(_trace_block(binary, block))
            block, rows, width = [], 0, 0
        block.append(tile)
        rows, width = rows + height, max(width, tile_width)
    if block:
        parts.append(_trace_block(binary, block))
    points = [p for p, _, _ in parts]
    counts = [c for _, c, _ in parts]
    slices = [s for _, _, s in parts]
    lengths = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    return TracedPolygons(
        points=np.concatenate(points) if points else np.zeros((0, 2)),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        slices=np.concatenate(slices).astype(np.int64) if slices else np.zeros(0, dtype=np.int64),
    )


def _compressed_axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original indices of the compressed first and second axes of a slice (``-1``: background).

    Every axis keeps its indices that hold foreground, with one background entry before the
    first, after the last and in place of every run of background indices between them.
    """
    return _compress(np.flatnonzero(mask.any(axis=1))), _compress(np.flatnonzero(mask.any(axis=0)))


def _compress(kept: np.ndarray) -> np.ndarray:
    gap = np.diff(kept) > 1
    out = np.full(len(kept) + int(gap.sum()) + 2, -1, dtype=np.int64)
    out[1 + np.arange(len(kept)) + np.concatenate([[0], np.cumsum(gap)])] = kept
    return out


def _map_back(coords: np.ndarray, table: np.ndarray, base: np.ndarray | int = 0) -> np.ndarray:
    """Compressed coordinates (integers or halves) -> original ones.

    ``table[base + c]`` is the original index of compressed index ``c`` (``-1``: background).  A
    vertex half-way between two compressed indices lies next to the one that has foreground.
    """
    low = np.floor(coords).astype(np.int64)
    at = table[base + low]
    after = table[np.minimum(base + low + 1, len(table) - 1)]
    value = np.where(at >= 0, at + 0.5, after - 0.5)
    return np.where(coords == low, at, value).astype(np.float64)


def _trace_block(
    binary: np.ndarray, block: list[tuple[int, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trace compressed slices stacked along the second axis: ``(points, polygon lengths, slice of each)``."""
    import contourpy

    width = max(len(i_map) for _, i_map, _ in block)
    starts = np.concatenate([[0], np.cumsum([len(j_map) for _, _, j_map in block])]).astype(np.int64)
    z = np.zeros((int(starts[-1]), width), dtype=np.float64)  # contourpy wants z[y, x]: y = j, x = i
    i_maps = np.full((len(block), width), -1, dtype=np.int64)
    for t, (k, i_map, j_map) in enumerate(block):
        i_real, j_real = np.flatnonzero(i_map >= 0), np.flatnonzero(j_map >= 0)
        z[starts[t] + j_real[:, None], i_real[None, :]] = binary[i_map[i_real][:, None], j_map[j_real][None, :], k].T
        i_maps[t, : len(i_map)] = i_map
    j_table = np.concatenate([j_map for _, _, j_map in block])
    generator = contourpy.contour_generator(z=z, name="serial", line_type=contourpy.LineType.ChunkCombinedOffset)
    chunk_points, chunk_offsets = generator.lines(0.5)  # type: ignore[misc]
    if not chunk_points or chunk_points[0] is None:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    points, offsets = _tidy_lines(
        np.asarray(chunk_points[0], dtype=np.float64), np.asarray(chunk_offsets[0], dtype=np.int64)
    )
    lengths = np.diff(offsets)
    tile = np.searchsorted(starts, points[offsets[:-1], 1], side="right") - 1
    per_point = np.repeat(tile, lengths)
    i_coords = _map_back(points[:, 0], i_maps.ravel(), per_point * width)
    out = np.column_stack([i_coords, _map_back(points[:, 1], j_table)])
    return out, lengths, np.asarray([block[t][0] for t in tile], dtype=np.int64)


def _tidy_lines(points: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop closing vertices and collinear vertices of concatenated lines; drop lines under 3 vertices.

    Vectorised form of the per-polygon rules of :func:`mask_to_polygons`: a line whose last
    vertex repeats its first loses it; a polygon of at least 4 vertices loses the vertices lying
    on the straight line through their neighbours unless fewer than 3 would remain.
    """
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    closing = (lengths > 1) & np.all(points[starts] == points[np.maximum(ends - 1, starts)], axis=1)
    keep = np.ones(len(points), dtype=bool)
    keep[ends[closing] - 1] = False
    lengths = lengths - closing
    points = points[keep]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    line = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(points)) - starts[line]
    n = lengths[line]
    prev = points[starts[line] + (position - 1) % np.maximum(n, 1)] - points
    nxt = points[starts[line] + (position + 1) % np.maximum(n, 1)] - points
    cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
    straight = np.abs(cross) > 1e-12
    corners = np.bincount(line, weights=straight, minlength=len(lengths)).astype(np.int64)
    drop_collinear = (lengths >= 4) & (corners >= 3)
    keep = straight | ~drop_collinear[line]
    points = points[keep]
    lengths = np.bincount(line[keep], minlength=len(lengths)).astype(np.int64)
    valid = lengths >= 3
    line = np.repeat(np.arange(len(lengths)), lengths)
    points = points[valid[line]]
    lengths = lengths[valid]
    return points, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


# ------------------------------------------------------------- combining ROIs
@dataclass
class SliceMask:
    """A structure's mask on one slice, cropped to its bounding box.

    Attributes:
        k: Slice index (third voxel axis).
        i0: First voxel index of the crop along the first axis.
        j0: First voxel index of the crop along the second axis.
        mask: ``(ni, nj)`` boolean crop.
    """

    k: int
    i0: int
    j0: int
    mask: np.ndarray

    @classmethod
    def crop(cls, k: int, mask: np.ndarray) -> SliceMask | None:
        """Crop a full ``(nx, ny)`` slice mask to its bounding box (``None`` when empty)."""
        rows = np.flatnonzero(mask.any(axis=1))
        if len(rows) == 0:
            return None
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
        i0, j0 = int(rows[0]), int(cols[0])
        return cls(k=k, i0=i0, j0=j0, mask=mask[i0 : int(rows[-1]) + 1, j0 : int(cols[-1]) + 1].copy())

    def view(self, volume: np.ndarray) -> np.ndarray:
        """The ``(ni, nj)`` region of ``volume[..., X, Y, Z]`` this crop covers (a view)."""
        ni, nj = self.mask.shape
        return volume[..., self.i0 : self.i0 + ni, self.j0 : self.j0 + nj, self.k]


def paint_masks(
    structures: Sequence[Sequence[SliceMask]],
    shape: tuple[int, int, int],
    *,
    names: Sequence[str],
    policy: OverlapPolicy = "smaller",
    source: PathLike = "",
) -> np.ndarray:
    """Combine per-structure masks into one label map (or one channel per structure).

    Structure ``r`` gets label value ``r + 1``.

    Args:
        structures: For each structure, its non-empty slice masks.
        shape: ``(X, Y, Z)`` of the grid.
        names: Structure names (for error messages), one per structure.
        policy: ``"smaller"`` (fewer voxels wins; ties: the later one), ``"later"`` (the later
            structure wins), ``"error"`` (overlap raises) or ``"separate"`` (binary channels).
        source: File named in errors.

    Returns:
        ``(X, Y, Z)`` label array (smallest unsigned dtype), or ``(R, X, Y, Z)`` uint8 for
        ``"separate"``.

    Raises:
        InputError: ``policy="error"`` and two structures overlap.
        ValueError: Unknown policy.
    """
    if policy not in OVERLAP_POLICIES:
        raise ValueError(f"overlap policy must be one of {OVERLAP_POLICIES}, got {policy!r}")
    if policy == "separate":
        channels = np.zeros((len(structures), *shape), dtype=np.uint8)
        for r, slices in enumerate(structures):
            for piece in slices:
                piece.view(channels[r])[piece.mask] = 1
        return channels
    labels = np.zeros(shape, dtype=label_dtype(len(structures)))
    order = list(range(len(structures)))
    if policy == "smaller":
        sizes = [sum(int(p.mask.sum()) for p in slices) for slices in structures]
        order.sort(key=lambda r: (-sizes[r], r))  # largest first, so smaller ones are painted on top
    for r in order:
        for piece in structures[r]:
            region = piece.view(labels)
            if policy == "error":
                clash = region[piece.mask]
                clash = clash[clash != 0]
                if clash.size:
                    other = names[int(clash[0]) - 1]
                    raise InputError(
                        str(source),
                        f"structures {other!r} and {names[r]!r} overlap on slice {piece.k} "
                        f"({clash.size} voxels); choose an overlap policy other than 'error'",
                    )
            region[piece.mask] = r + 1
    return labels


# ---------------------------------------------------------- polygon JSON file
class _PolygonItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | int
    object_id: str | int | None = None
    slice: int | None = None
    points: list[list[float]] = Field(min_length=3)

    @field_validator("points")
    @classmethod
    def _finite(cls, points: list[list[float]]) -> list[list[float]]:
        lengths = {len(p) for p in points}
        if len(lengths) != 1 or lengths.pop() not in (2, 3):
            raise ValueError("every point must have 2 (voxel) or 3 (world) coordinates, all alike")
        if not np.all(np.isfinite(np.asarray(points, dtype=np.float64))):
            raise ValueError("points must be finite numbers")
        return points

    @field_validator("label")
    @classmethod
    def _label(cls, label: str | int) -> str | int:
        if isinstance(label, int) and label < 1:
            raise ValueError("a numeric label must be >= 1 (0 is background)")
        if isinstance(label, str) and not label.strip():
            raise ValueError("a label name must not be empty")
        return label


class _PolygonFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["medseg-polygons"]
    version: Literal[1] = 1
    coordinates: Literal["voxel", "world"]
    pixel_origin: Literal["centre", "corner"] = "centre"
    image_shape: list[int] | None = Field(default=None, min_length=3, max_length=3)
    labels: dict[str, int] | None = None
    polygons: list[_PolygonItem]

    @model_validator(mode="after")
    def _consistent(self) -> _PolygonFile:
        for n, item in enumerate(self.polygons):
            dims = len(item.points[0])
            if self.coordinates == "voxel" and (dims != 2 or item.slice is None):
                raise ValueError(f"polygons.{n}: voxel coordinates need 'slice' and 2D points [i, j]")
            if self.coordinates == "world" and (dims != 3 or item.slice is not None):
                raise ValueError(f"polygons.{n}: world coordinates need 3D points [x, y, z] (LPS mm), no 'slice'")
        if self.labels is not None:
            values = list(self.labels.values())
            if any(v < 1 for v in values) or len(set(values)) != len(values):
                raise ValueError("labels: values must be distinct integers >= 1")
        return self


@dataclass
class PolygonAnnotations:
    """A parsed polygon-annotation file (see ``docs/annotations.md``).

    Attributes:
        source: The file.
        coordinates: ``"voxel"`` (``slice`` + 2D points) or ``"world"`` (LPS mm).
        pixel_origin: ``"centre"`` (integer coordinates are voxel centres) or ``"corner"``.
        image_shape: Declared ``(X, Y, Z)`` of the annotated image, if given.
        label_values: ``{label name: value}``.
        polygons: Per polygon: ``label`` value, ``object`` key, ``slice`` (voxel only), ``points``.
    """

    source: Path
    coordinates: str
    pixel_origin: str
    image_shape: tuple[int, int, int] | None
    label_values: dict[str, int]
    polygons: list[dict[str, Any]] = field(default_factory=list)


def read_polygon_annotations(path: PathLike) -> PolygonAnnotations:
    """Read and validate a medseg polygon-annotation JSON file.

    Label names without a value in ``labels`` are numbered after the declared ones, in order of
    first appearance; numeric labels are used as they are.  Polygons without ``object_id`` are each
    their own object.

    Raises:
        InputError: Unreadable file, invalid JSON or a file that does not follow the format (the
            message names the offending key).
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(p, f"cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(p, f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != POLYGON_FORMAT:
        raise InputError(p, f'not a polygon-annotation file (expected "format": "{POLYGON_FORMAT}")')
    try:
        parsed = _PolygonFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise InputError(p, f"invalid polygon annotations at {where}: {first['msg']}") from exc
    values = dict(parsed.labels or {})
    used = set(values.values())
    polygons = []
    for n, item in enumerate(parsed.polygons):
        if isinstance(item.label, int):
            value, name = item.label, next((k for k, v in values.items() if v == item.label), None)
            if name is None:
                values[str(item.label)] = value
                used.add(value)
        else:
            if item.label not in values:
                values[item.label] = max(used, default=0) + 1
                used.add(values[item.label])
            value = values[item.label]
        obj = ("object", str(item.object_id)) if item.object_id is not None else ("polygon", str(n))
        polygons.append({"label": value, "object": obj, "slice": item.slice, "points": np.asarray(item.points)})
    shape = tuple(parsed.image_shape) if parsed.image_shape else None
    return PolygonAnnotations(
        source=p,
        coordinates=parsed.coordinates,
        pixel_origin=parsed.pixel_origin,
        image_shape=shape,  # type: ignore[arg-type]
        label_values=values,
        polygons=polygons,
    )


@dataclass
class AnnotationLabels:
    """Label volumes made from annotations, on the reference grid.

    Attributes:
        semantic: ``(1, X, Y, Z)`` class map (``meta["label_names"]``), or ``(C, X, Y, Z)`` binary
            channels for the ``separate`` overlap policy.
        instances: ``(1, X, Y, Z)`` instance ids ``1..N`` (0 = background), or ``None``.
        instance_table: ``{instance id: {"class": value, "class_name": ..., "object_id": ...}}``.
    """

    semantic: Volume
    instances: Volume | None = None
    instance_table: dict[int, dict[str, Any]] = field(default_factory=dict)


def rasterise_polygons(
    annotations: PolygonAnnotations,
    geometry: Geometry,
    *,
    instances: bool = False,
    overlap: OverlapPolicy = "smaller",
    pixel_rule: PixelRule = "centre",
) -> AnnotationLabels:
    """Rasterise polygon annotations onto a grid as semantic (and instance) labels.

    Polygons of one object on one slice combine by the even-odd rule (holes); objects are unions
    over their slices.  With ``instances``, every object becomes one instance and the class map is
    derived from the instance map, so both agree voxel by voxel; overlapping objects are resolved
    by ``overlap`` among objects.  Without it, objects of one label are merged and ``overlap``
    resolves between labels.

    Args:
        annotations: From :func:`read_polygon_annotations`.
        geometry: The reference image grid (world coordinates are mapped through it).
        instances: Also produce the instance map (by ``object_id``).
        overlap: Overlap policy (``"separate"`` gives one channel per label, semantic only).
        pixel_rule: ``"centre"`` or ``"opencv"``.

    Returns:
        :class:`AnnotationLabels`.

    Raises:
        InputError: Polygons off the grid, not parallel to the slices, a declared image shape
            that differs from the grid, or an object id used with two labels.
    """
    src = annotations.source
    if annotations.image_shape is not None and tuple(annotations.image_shape) != geometry.shape:
        raise InputError(
            src, f"annotations were made on an image of shape {annotations.image_shape}, reference is {geometry.shape}"
        )
    if instances and overlap == "separate":
        raise InputError(src, "the 'separate' overlap policy gives binary channels and cannot be used with instances")
    nx, ny, _ = geometry.shape
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for n, poly in enumerate(annotations.polygons):
        k, ij = _polygon_slice(annotations, poly, n, geometry)
        obj = objects.setdefault(poly["object"], {"label": poly["label"], "slices": {}})
        if obj["label"] != poly["label"]:
            raise InputError(src, f"object_id {poly['object'][1]!r} is used with two labels (polygon {n})")
        obj["slices"].setdefault(k, []).append(ij)
    names_by_value = {v: k for k, v in annotations.label_values.items()}
    object_masks = [
        [
            piece
            for k, polys in sorted(obj["slices"].items())
            if (piece := SliceMask.crop(k, fill_polygons(polys, (nx, ny), pixel_rule=pixel_rule))) is not None
        ]
        for obj in objects.values()
    ]
    label_names = {v: names_by_value[v] for v in sorted(names_by_value)}
    meta: dict[str, Any] = {"label_names": label_names, "source_annotations": str(src)}
    if instances:
        object_names = [f"{names_by_value[o['label']]} (object {key[1]})" for key, o in objects.items()]
        ids = paint_masks(object_masks, geometry.shape, names=object_names, policy=overlap, source=src)
        table = {
            r + 1: {"class": o["label"], "class_name": names_by_value[o["label"]], "object_id": key[1]}
            for r, (key, o) in enumerate(objects.items())
        }
        lut = np.zeros(len(objects) + 1, dtype=np.int64)
        for inst, row in table.items():
            lut[inst] = row["class"]
        classes = lut[ids].astype(label_dtype(max(label_names, default=0)))
        semantic = Volume(array=classes[None], geometry=geometry, kind="label", source=str(src), meta=meta)
        inst_volume = Volume(
            array=ids[None], geometry=geometry, kind="label", source=str(src), meta={"instances": table}
        )
        return AnnotationLabels(semantic=semantic, instances=inst_volume, instance_table=table)
    values = sorted(label_names)
    per_label: list[list[SliceMask]] = [[] for _ in values]
    for obj, masks in zip(objects.values(), object_masks, strict=True):
        per_label[values.index(obj["label"])].extend(masks)
    combined = paint_masks(
        [_union(m, (nx, ny)) for m in per_label],
        geometry.shape,
        names=[label_names[v] for v in values],
        policy=overlap,
        source=src,
    )
    if overlap == "separate":
        meta["channels"] = [label_names[v] for v in values]
        return AnnotationLabels(semantic=Volume(array=combined, geometry=geometry, kind="label", meta=meta))
    lut = np.array([0, *values], dtype=np.int64)
    array = lut[combined].astype(label_dtype(max(values, default=0)))
    return AnnotationLabels(
        semantic=Volume(array=array[None], geometry=geometry, kind="label", source=str(src), meta=meta)
    )


def _union(pieces: list[SliceMask], shape: tuple[int, int]) -> list[SliceMask]:
    """Merge slice masks that share a slice (objects of one label) into one per slice."""
    by_slice: dict[int, list[SliceMask]] = {}
    for piece in pieces:
        by_slice.setdefault(piece.k, []).append(piece)
    merged = []
    for k, group in sorted(by_slice.items()):
        if len(group) == 1:
            merged.append(group[0])
            continue
        full = np.zeros(shape, dtype=bool)
        for piece in group:
            ni, nj = piece.mask.shape
            full[piece.i0 : piece.i0 + ni, piece.j0 : piece.j0 + nj] |= piece.mask
        crop = SliceMask.crop(k, full)
        if crop is not None:
            merged.append(crop)
    return merged


def _polygon_slice(
    annotations: PolygonAnnotations, poly: dict[str, Any], n: int, geometry: Geometry
) -> tuple[int, np.ndarray]:
    """Slice index and in-plane continuous voxel indices ``(N, 2)`` of one polygon."""
    src = annotations.source
    nz = geometry.shape[2]
    points = poly["points"]
    if annotations.coordinates == "voxel":
        k = int(poly["slice"])
        ij = points - (0.5 if annotations.pixel_origin == "corner" else 0.0)
    else:
        ijk = world_to_voxel(points, geometry)
        spread = float(np.ptp(ijk[:, 2])) * geometry.spacing[2]
        if spread > 0.25 * geometry.spacing[2]:
            raise InputError(
                src, f"polygon {n} is not parallel to the image slices (spans {spread:.3g} mm along the slice normal)"
            )
        k_float = float(np.mean(ijk[:, 2]))
        k = int(np.floor(k_float + 0.5))
        ij = ijk[:, :2]
    if not 0 <= k < nz:
        raise InputError(src, f"polygon {n} lies on slice {k}, outside the reference grid (0..{nz - 1})")
    return k, ij


def polygons_to_labels(
    path: PathLike,
    reference: Volume | Geometry,
    *,
    instances: bool = False,
    overlap: OverlapPolicy = "smaller",
    pixel_rule: PixelRule = "centre",
) -> AnnotationLabels:
    """Read a polygon-annotation JSON and rasterise it on the reference grid.

    Args:
        path: The JSON file (format in ``docs/annotations.md``).
        reference: The image (or its grid) the annotations belong to.
        instances: Also produce the instance map (by ``object_id``).
        overlap: Overlap policy.
        pixel_rule: ``"centre"`` or ``"opencv"``.

    Returns:
        :class:`AnnotationLabels` on the reference grid.
    """
    geometry = reference.geometry if isinstance(reference, Volume) else reference
    return rasterise_polygons(
        read_polygon_annotations(path), geometry, instances=instances, overlap=overlap, pixel_rule=pixel_rule
    )
