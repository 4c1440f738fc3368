"""From network-grid logits to labels (and probabilities) on the input's own grid.

Never materialises full-resolution float probabilities for all classes: the target grid
is processed in chunks along its first axis; for each chunk only the block of network
logits it samples from is converted to probabilities (softmax), interpolated trilinearly
(``torch.nn.functional.grid_sample``, voxel centres aligned, border padding — the same
as MONAI's ``SpatialResample(mode="bilinear", padding_mode="border")``) and reduced to the
argmax.  When the target grid *is* the network grid up to axis permutations, flips and
an integer shift (the usual case when the plan's spacing equals the image's), no
interpolation is needed at all and the labels are re-indexed (:class:`IndexMap`).

The network-grid logits may cover only a box of the network grid (the body's bounding
box, ``offset`` = its corner); outside it the probabilities are background (class 0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.infer.sliding_window import class_argmax
from medseg.io import Geometry, label_dtype
from medseg.io.grid import signed_permutation

__all__ = ["IndexMap", "index_map", "resample_image", "resample_to_grid"]

#: Budget for one chunk's float32 temporaries (probabilities, sampling grid, logits block).
CHUNK_BYTES = 192 * 2**20

#: Above this share of target voxels between network voxels of different classes, a chunk is
#: interpolated in full (``grid_sample``) instead of voxel by voxel.
DENSE_MIXED_FRACTION = 0.2


@dataclass(frozen=True)
class IndexMap:
    """Target voxel ``i`` lies exactly on network voxel ``sign * i + offset`` (per target axis).

    Attributes:
        axes: For each target axis, the network axis it runs along.
        signs: ``+1`` or ``-1`` per target axis.
        offsets: Integer shift per target axis.
    """

    axes: tuple[int, int, int]
    signs: tuple[int, int, int]
    offsets: tuple[int, int, int]

    def apply(self, net: np.ndarray, target_shape: tuple[int, int, int]) -> np.ndarray:
        """Re-index a network-grid ``(X', Y', Z')`` array onto the target grid ``target_shape``.

        Indices outside the network grid are clamped (border), as interpolation would.
        """
        moved = np.transpose(net, self.axes)
        index = [
            _axis_index(self.signs[t], self.offsets[t], size, moved.shape[t]) for t, size in enumerate(target_shape)
        ]
        if all(isinstance(i, slice) for i in index):  # views, one copy at the end
            return np.ascontiguousarray(moved[tuple(index)])
        arrays = [np.arange(moved.shape[t])[i] if isinstance(i, slice) else i for t, i in enumerate(index)]
        return np.ascontiguousarray(moved[np.ix_(*arrays)])


def _axis_index(sign: int, offset: int, size: int, n: int) -> slice | np.ndarray:
    """Network indices ``sign * i + offset`` for ``i < size``: a slice when inside ``[0, n)``, else clamped."""
    first, last = offset, sign * (size - 1) + offset
    if min(first, last) >= 0 and max(first, last) < n:
        if sign > 0:
            return slice(first, last + 1)
        return slice(first, last - 1 if last > 0 else None, -1)
    return np.clip(sign * np.arange(size) + offset, 0, n - 1)


def _voxel_map(target: Geometry, net_affine: np.ndarray) -> np.ndarray:
    """``(4, 4)`` map from target voxel indices to network voxel indices."""
    return np.linalg.inv(np.asarray(net_affine, dtype=np.float64)) @ np.asarray(target.affine, dtype=np.float64)


def index_map(target: Geometry, net_affine: np.ndarray, *, atol: float = 1e-4) -> IndexMap | None:
    """The exact re-indexing from the network grid to ``target``, or ``None`` if interpolation is needed.

    Args:
        target: The input's grid.
        net_affine: ``(4, 4)`` RAS affine of the network grid.
        atol: Tolerance in voxels.
    """
    m = _voxel_map(target, net_affine)
    perm = signed_permutation(m[:3, :3], atol=atol)
    shift = m[:3, 3]
    if perm is None or not np.allclose(shift, np.rint(shift), atol=atol):
        return None
    axes, signs = perm
    offsets = tuple(int(np.rint(shift[axes[t]])) for t in range(3))
    return IndexMap(axes=axes, signs=signs, offsets=offsets)  # type: ignore[arg-type]


def _probability_block(
    logits: torch.Tensor,
    offset: tuple[int, int, int],
    lo: np.ndarray,
    hi: np.ndarray,
) -> torch.Tensor:
    """Softmax probabilities ``(K, *(hi - lo))`` on network voxels ``[lo, hi)``; background outside ``logits``."""
    k = int(logits.shape[0])
    block = torch.zeros((k, *(int(v) for v in hi - lo)), dtype=torch.float32)
    block[0] = 1.0
    box_lo = np.maximum(lo, offset)
    box_hi = np.minimum(hi, np.asarray(offset) + np.asarray(logits.shape[1:]))
    if np.all(box_hi > box_lo):
        src = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(box_lo, box_hi, offset, strict=True))
        dst = tuple(slice(int(a - b0), int(b - b0)) for a, b, b0 in zip(box_lo, box_hi, lo, strict=True))
        all_classes = slice(None)
        block[(all_classes, dst[0], dst[1], dst[2])] = torch.softmax(
            logits[(all_classes, src[0], src[1], src[2])].float(), dim=0
        )
    return block


def _scale_probabilities(probs: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        top = float(np.iinfo(dtype).max)
        return torch.round(probs * top).numpy().astype(dtype)
    return probs.numpy().astype(dtype)


def _separable_axes(voxel_map: np.ndarray, *, atol: float = 1e-9) -> tuple[int, int, int] | None:
    """For each target axis the one source axis it moves along, if the map has no rotation/shear."""
    linear = voxel_map[:3, :3]
    nonzero = np.abs(linear) > atol
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    a = [int(np.flatnonzero(nonzero[:, t])[0]) for t in range(3)]
    return a[0], a[1], a[2]


def _sample_chunks(
    block_fn: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    *,
    voxel_map: np.ndarray,
    source_shape: Sequence[int],
    target_shape: Sequence[int],
    bytes_per_voxel: int,
    chunk_bytes: int,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Trilinear samples of a source volume at every target voxel, chunk by chunk along the first axis.

    Args:
        block_fn: ``(lo, hi) -> (C, *(hi - lo))`` float32 block of the source volume.
        voxel_map: ``(4, 4)`` target voxel index -> source voxel index.
        source_shape: Spatial shape of the source volume.
        target_shape: Spatial shape of the target grid.
        bytes_per_voxel: Float32 temporaries per target voxel (to size the chunks).
        chunk_bytes: Budget per chunk.

    Yields:
        ``(x0, x1, samples)`` with ``samples`` ``(C, x1 - x0, Y, Z)``; source positions outside
        the source volume take the nearest border value (``padding_mode="border"``).
    """
    m = voxel_map
    plane = int(target_shape[1]) * int(target_shape[2])
    step = max(1, min(int(target_shape[0]), chunk_bytes // max(1, (bytes_per_voxel + 8 * 3) * plane)))
    size = np.asarray(source_shape, dtype=np.float64)
    jj, kk = np.meshgrid(
        np.arange(target_shape[1], dtype=np.float64), np.arange(target_shape[2], dtype=np.float64), indexing="ij"
    )
    for x0 in range(0, int(target_shape[0]), step):
        x1 = min(int(target_shape[0]), x0 + step)
        ii = np.arange(x0, x1, dtype=np.float64)[:, None, None]
        coords = [np.clip(m[a, 0] * ii + m[a, 1] * jj + m[a, 2] * kk + m[a, 3], 0, size[a] - 1) for a in range(3)]
        lo = np.array([math.floor(float(c.min())) for c in coords], dtype=np.int64)
        hi = np.array([min(int(n), math.floor(float(c.max())) + 2) for c, n in zip(coords, size, strict=True)])
        block = block_fn(lo, hi)
        grid = []
        for a in (2, 1, 0):  # grid_sample wants (x=W, y=H, z=D) = our (Z, Y, X) source axes
            extent = int(hi[a] - lo[a])
            rel = coords[a] - lo[a]
            grid.append(2.0 * rel / (extent - 1) - 1.0 if extent > 1 else np.zeros_like(rel))
        del coords
        grid_t = torch.from_numpy(np.stack(grid, axis=-1).astype(np.float32))[None]
        del grid
        yield x0, x1, F.grid_sample(block[None], grid_t, mode="bilinear", padding_mode="border", align_corners=True)[0]


def resample_image(
    image: torch.Tensor,
    *,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Trilinear resampling of ``(C, X, Y, Z)`` onto another grid without a full-size sampling grid.

    Equivalent to MONAI's ``SpatialResample(mode="bilinear", padding_mode="border")`` (voxel
    centres aligned), computed in float32 chunk by chunk.

    Args:
        image: ``(C, X, Y, Z)`` float tensor on ``source_affine``.
        source_affine: ``(4, 4)`` RAS affine of ``image``.
        target_affine: ``(4, 4)`` RAS affine of the output grid.
        target_shape: ``(X', Y', Z')`` of the output grid.
        chunk_bytes: Budget for one chunk's temporaries.

    Returns:
        ``(C, X', Y', Z')`` float32.
    """
    c = int(image.shape[0])
    out = torch.empty((c, *(int(s) for s in target_shape)), dtype=torch.float32)
    voxel_map = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.asarray(target_affine, np.float64)
    # Chunk along the target axis that runs along the source's slowest memory axis, so that each
    # chunk reads a compact slab of the source (DICOM/NIfTI arrays are Fortran-ordered).
    slowest = max(range(3), key=lambda a: image.stride(a + 1))
    first = int(np.argmax(np.abs(voxel_map[slowest, :3])))
    order = [first, *(t for t in range(3) if t != first)]
    perm_map = voxel_map.copy()
    perm_map[:, :3] = voxel_map[:, order]
    out_view = out.permute(0, *(1 + t for t in order))

    def block(lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
        return image[:, int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1]), int(lo[2]) : int(hi[2])].float()

    axes = _separable_axes(perm_map)
    if axes is not None and _separable_pays(perm_map, axes, tuple(image.shape[1:]), tuple(out_view.shape[1:])):
        _resample_separable(
            block, out_view, voxel_map=perm_map, axes=axes, source_shape=tuple(image.shape[1:]), chunk_bytes=chunk_bytes
        )
        return out
    for x0, x1, samples in _sample_chunks(
        block,
        voxel_map=perm_map,
        source_shape=tuple(image.shape[1:]),
        target_shape=tuple(int(target_shape[t]) for t in order),
        bytes_per_voxel=4 * (2 * c + 3),
        chunk_bytes=chunk_bytes,
    ):
        out_view[:, x0:x1] = samples
    return out


def _axis_coords(
    voxel_map: np.ndarray, axes: tuple[int, int, int], source_shape: Sequence[int], target_shape: Sequence[int]
) -> list[np.ndarray]:
    """Source position of every target index, per target axis, for a map without rotation (border-clamped)."""
    return [
        np.clip(
            voxel_map[axes[t], t] * np.arange(target_shape[t]) + voxel_map[axes[t], 3], 0, source_shape[axes[t]] - 1
        )
        for t in range(3)
    ]


def _chunk_bounds(
    coords: Sequence[np.ndarray], axes: tuple[int, int, int], source_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Source block ``[lo, hi)`` (source axis order) holding every linear-interpolation neighbour of ``coords``."""
    lo = np.zeros(3, dtype=np.int64)
    hi = np.zeros(3, dtype=np.int64)
    for t in range(3):
        lo[axes[t]] = math.floor(float(coords[t].min()))
        hi[axes[t]] = min(int(source_shape[axes[t]]), math.floor(float(coords[t].max())) + 2)
    return lo, hi


def _pass_order(extents: Sequence[int], target_shape: Sequence[int]) -> list[int]:
    """Target axes in the order of the 1D passes: axis 0 (the chunk axis) first, then the shrinking axes."""
    return [0, *sorted(range(1, 3), key=lambda t: target_shape[t] / extents[t])]


#: Measured cost ratio (``benchmarks/bench_inference.py e2e``, 2-core CPU): a trilinear
#: ``grid_sample`` output voxel costs about as much as this many elements of a 1D linear pass.
GRID_SAMPLE_COST = 6.0


def _separable_pays(
    voxel_map: np.ndarray, axes: tuple[int, int, int], source_shape: Sequence[int], target_shape: Sequence[int]
) -> bool:
    """Whether three 1D passes touch fewer elements than ``GRID_SAMPLE_COST`` x the target voxels.

    The passes run in :func:`_pass_order`; an axis whose target voxels are source voxels in the
    same order costs nothing (:func:`_linear_along` returns a view).
    """
    shape = [int(source_shape[axes[t]]) for t in range(3)]  # current extent per target axis
    work = 0
    for t in _pass_order(shape, target_shape):
        scale, shift = voxel_map[axes[t], t], voxel_map[axes[t], 3]
        identity = abs(scale - 1.0) < 1e-9 and abs(shift - round(shift)) < 1e-9
        shape[t] = int(target_shape[t])
        if not identity:
            work += math.prod(shape)
    return work < GRID_SAMPLE_COST * math.prod(int(n) for n in target_shape)


def _take(values: torch.Tensor, dim: int, index: np.ndarray) -> torch.Tensor:
    """``values.index_select(dim, index)``, by numpy's take when ``dim`` is innermost in memory (faster)."""
    if values.stride(dim) == 1 and values.dtype == torch.float32:
        return torch.from_numpy(np.take(values.numpy(), index, axis=dim))
    return values.index_select(dim, torch.from_numpy(index))


def _linear_along(values: torch.Tensor, dim: int, coords: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``values`` along ``dim`` at block-relative positions ``coords`` (clamped ends)."""
    extent = int(values.shape[dim])
    i0 = np.clip(np.floor(coords), 0, extent - 1).astype(np.int64)
    frac = (coords - i0).astype(np.float32)
    if not frac.any() and np.array_equal(i0, np.arange(i0[0], i0[0] + len(i0))):
        return values.narrow(dim, int(i0[0]), len(i0))  # target voxels are source voxels: no copy
    i1 = np.minimum(i0 + 1, extent - 1)
    left = _take(values, dim, i0)
    if not frac.any():
        return left
    right = _take(values, dim, i1)
    shape = [1] * values.ndim
    shape[dim] = -1
    return torch.lerp(left, right, torch.from_numpy(frac).reshape(shape))


def _resample_separable(
    block_fn: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    out: torch.Tensor,
    *,
    voxel_map: np.ndarray,
    axes: tuple[int, int, int],
    source_shape: Sequence[int],
    chunk_bytes: int,
) -> None:
    """Trilinear resampling without rotation as three 1D linear passes, chunk by chunk along target axis 0.

    Trilinear interpolation is the tensor product of 1D linear interpolations, so for maps
    without rotation or shear (target axis ``t`` runs along source axis ``axes[t]``) it is
    computed axis by axis, shrinking axes first; an axis whose samples fall on the source
    voxels is not interpolated at all.  Equal to ``grid_sample(..., align_corners=True,
    padding_mode="border")`` up to float rounding.

    Args:
        block_fn: ``(lo, hi) -> (C, *(hi - lo))`` float32 block of the source (source axis order).
        out: ``(C, X', Y', Z')`` output (a view in target axis order) to fill.
        voxel_map: ``(4, 4)`` target voxel index -> source voxel index.
        axes: Source axis of each target axis.
        source_shape: Spatial shape of the source.
        chunk_bytes: Budget for one chunk's temporaries.
    """
    size = [int(n) for n in source_shape]
    target_shape = tuple(int(n) for n in out.shape[1:])
    coords = _axis_coords(voxel_map, axes, size, target_shape)
    c = int(out.shape[0])
    plane = max(target_shape[1] * target_shape[2], int(size[axes[1]] * size[axes[2]]))
    scale = max(1.0, float(size[axes[0]]) / max(1, target_shape[0]))  # source planes per target plane
    step = max(1, min(target_shape[0], int(chunk_bytes // max(1.0, 4 * c * 3 * plane * scale))))
    order = _pass_order([size[a] for a in axes], target_shape)
    for x0 in range(0, target_shape[0], step):
        x1 = min(target_shape[0], x0 + step)
        chunk_coords = [coords[0][x0:x1], coords[1], coords[2]]
        lo, hi = _chunk_bounds(chunk_coords, axes, size)
        values = block_fn(lo, hi).permute(0, 1 + axes[0], 1 + axes[1], 1 + axes[2])  # target axis order
        for t in order:
            values = _linear_along(values, t + 1, chunk_coords[t] - lo[axes[t]])
        out[:, x0:x1] = values


def resample_to_grid(
    logits: torch.Tensor,
    *,
    net_affine: np.ndarray,
    net_shape: tuple[int, int, int],
    target: Geometry,
    offset: tuple[int, int, int] = (0, 0, 0),
    probabilities: np.dtype | type | str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and optionally probabilities) on ``target`` from network-grid logits, chunk by chunk.

    Args:
        logits: ``(K, x, y, z)`` logits (any float dtype, CPU) on the box of the network grid
            starting at ``offset``; outside the box the network grid is background.
        net_affine: ``(4, 4)`` RAS affine of the network grid.
        net_shape: ``(X', Y', Z')`` of the network grid.
        target: The grid to produce (the input's).
        offset: Network-grid corner of ``logits``.
        probabilities: ``None``, or the dtype of the returned probabilities: ``float32``, or
            ``uint8`` / ``uint16`` scaled so that the dtype's maximum means 1.
        chunk_bytes: Budget for the float32 temporaries of one chunk.

    Returns:
        ``labels`` ``(X, Y, Z)`` (smallest unsigned dtype) and ``probabilities``
        ``(K, X, Y, Z)`` or ``None``.
    """
    k = int(logits.shape[0])
    shape = target.shape
    voxel_map = _voxel_map(target, net_affine)
    axes = _separable_axes(voxel_map)
    if probabilities is None and axes is not None:
        return _labels_separable(logits, offset, voxel_map, axes, net_shape, shape, chunk_bytes), None
    labels = np.zeros(shape, dtype=label_dtype(k - 1))
    prob_dtype = None if probabilities is None else np.dtype(probabilities)
    probs_out = None if prob_dtype is None else np.zeros((k, *shape), dtype=prob_dtype)
    for x0, x1, sampled in _sample_chunks(
        lambda lo, hi: _probability_block(logits, offset, lo, hi),
        voxel_map=voxel_map,
        source_shape=net_shape,
        target_shape=shape,
        bytes_per_voxel=4 * (2 * k + 3),
        chunk_bytes=chunk_bytes,
    ):
        labels[x0:x1] = torch.max(sampled, dim=0).indices.numpy().astype(labels.dtype, copy=False)
        if probs_out is not None and prob_dtype is not None:
            probs_out[:, x0:x1] = _scale_probabilities(sampled, prob_dtype)
    return labels, probs_out


def _logit_block(logits: torch.Tensor, offset: tuple[int, int, int], lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
    """Logits ``(K, *(hi - lo))`` on network voxels ``[lo, hi)``; outside ``logits`` background (0 vs -1e4)."""
    start = np.asarray(lo) - np.asarray(offset)
    stop = np.asarray(hi) - np.asarray(offset)
    if np.all(start >= 0) and np.all(stop <= np.asarray(logits.shape[1:])):
        return logits[:, start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]].contiguous()
    block = torch.full((int(logits.shape[0]), *(int(v) for v in np.asarray(hi) - np.asarray(lo))), -1e4)
    block[0] = 0.0
    box_lo = np.maximum(lo, offset)
    box_hi = np.minimum(hi, np.asarray(offset) + np.asarray(logits.shape[1:]))
    if np.all(box_hi > box_lo):
        src = [slice(int(a - o), int(b - o)) for a, b, o in zip(box_lo, box_hi, offset, strict=True)]
        dst = [slice(int(a - b0), int(b - b0)) for a, b, b0 in zip(box_lo, box_hi, lo, strict=True)]
        block[:, dst[0], dst[1], dst[2]] = logits[:, src[0], src[1], src[2]].float()
    return block


def _separable_grid(
    coords: Sequence[np.ndarray], axes: tuple[int, int, int], lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """``grid_sample`` grid ``(1, *shape, 3)`` from per-target-axis source coordinates (no rotation)."""
    parts: list[torch.Tensor] = [torch.empty(0)] * 3
    for t in range(3):
        a = axes[t]
        extent = int(hi[a] - lo[a])
        rel = coords[t] - lo[a]
        norm = 2.0 * rel / (extent - 1) - 1.0 if extent > 1 else np.zeros_like(rel)
        view = [1, 1, 1]
        view[t] = -1
        parts[a] = torch.from_numpy(norm.astype(np.float32)).reshape(view).expand(shape)
    return torch.stack([parts[2], parts[1], parts[0]], dim=-1)[None]  # (x=W, y=H, z=D) = network (Z, Y, X)


def _mixed_code(k: int) -> int:
    """Cell code of :func:`_cell_labels` for cells whose corners disagree (never a class index)."""
    return 255 if k < 255 else -1


def _cell_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per network cell ``[i, i+1]^3``: the class of its 8 corner voxels if they agree, else :func:`_mixed_code`.

    Args:
        labels: ``(X, Y, Z)`` int64 class indices on the network grid (a block of it).
        k: Number of classes.

    Returns:
        ``(X, Y, Z)`` uint8 (``k < 255``) or int32 codes; the cell of the last voxel along an
        axis repeats that voxel (border padding, as the interpolation clamps there).
    """
    dtype = torch.uint8 if k < 255 else torch.int32
    codes = labels.to(dtype)
    top = low = codes
    for dim in range(3):  # separable 2-voxel max and min, the last voxel repeated (border)
        n = int(codes.shape[dim])
        top = torch.cat([top, top.narrow(dim, n - 1, 1)], dim=dim)
        low = torch.cat([low, low.narrow(dim, n - 1, 1)], dim=dim)
        top = torch.maximum(top.narrow(dim, 0, n), top.narrow(dim, 1, n))
        low = torch.minimum(low.narrow(dim, 0, n), low.narrow(dim, 1, n))
    codes = codes.clone()
    codes[top != low] = _mixed_code(k)
    return codes


def _labels_separable(
    logits: torch.Tensor,
    offset: tuple[int, int, int],
    voxel_map: np.ndarray,
    axes: tuple[int, int, int],
    net_shape: Sequence[int],
    target_shape: tuple[int, int, int],
    chunk_bytes: int,
) -> np.ndarray:
    """Labels of :func:`resample_to_grid` for maps without rotation, interpolating only where needed.

    A target voxel whose eight surrounding network voxels share one argmax class gets that
    class: a convex combination of probability vectors that all peak at class ``c`` peaks
    at ``c``.  Only the other voxels (near class boundaries) get the full interpolation of
    the softmax probabilities.
    """
    k = int(logits.shape[0])
    labels = np.zeros(target_shape, dtype=label_dtype(k - 1))
    per_axis = _axis_coords(voxel_map, axes, net_shape, target_shape)
    plane = target_shape[1] * target_shape[2]
    step = max(1, min(target_shape[0], chunk_bytes // max(1, (4 * k + 16) * plane)))
    for x0 in range(0, target_shape[0], step):
        x1 = min(target_shape[0], x0 + step)
        coords = [per_axis[0][x0:x1], per_axis[1], per_axis[2]]  # target axis t runs along network axis axes[t]
        lo, hi = _chunk_bounds(coords, axes, net_shape)
        block = _logit_block(logits, offset, lo, hi)  # (K, network axes), contiguous
        left, right, frac = [], [], []
        for t in range(3):
            extent = int(hi[axes[t]] - lo[axes[t]])
            rel = coords[t] - lo[axes[t]]
            i0 = np.clip(np.floor(rel), 0, extent - 1).astype(np.int64)
            left.append(torch.from_numpy(i0))
            right.append(torch.from_numpy(np.minimum(i0 + 1, extent - 1)))
            frac.append(torch.from_numpy((rel - i0).astype(np.float32)))
        # label of every network cell whose 8 corners agree, else MIXED; then one gather per axis
        cells = _cell_labels(class_argmax(block), k).permute(axes[0], axes[1], axes[2])  # target axis order
        gathered = cells.contiguous().numpy()
        for t in range(3):  # numpy's take is several times faster than index_select along the last axis
            gathered = np.take(gathered, left[t].numpy(), axis=t)
        chunk = torch.from_numpy(gathered)
        mixed = chunk == _mixed_code(k)
        if mixed.float().mean() > DENSE_MIXED_FRACTION:  # class boundaries everywhere: interpolate all voxels
            probs = torch.softmax(block.float(), dim=0)[None]
            grid = _separable_grid(coords, axes, lo, hi, tuple(chunk.shape))
            sampled = F.grid_sample(probs, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
            labels[x0:x1] = class_argmax(sampled).numpy().astype(labels.dtype, copy=False)
            continue
        where = mixed.nonzero()
        if where.numel():
            flat_block = block.reshape(k, -1)
            spatial = block.shape[1:]
            strides = [spatial[1] * spatial[2], spatial[2], 1]  # of the network axes in the block
            ends = [(left[t][where[:, t]], right[t][where[:, t]], frac[t][where[:, t]]) for t in range(3)]
            total = torch.zeros((k, where.shape[0]), dtype=torch.float32)
            for bits in itertools.product((0, 1), repeat=3):
                flat = torch.zeros(where.shape[0], dtype=torch.int64)
                weight = torch.ones(where.shape[0], dtype=torch.float32)
                for t, bit in enumerate(bits):
                    i0, i1, f = ends[t]
                    flat += (i1 if bit else i0) * strides[axes[t]]
                    weight *= f if bit else 1 - f
                corner = torch.softmax(flat_block.index_select(1, flat).float(), dim=0)
                total.addcmul_(corner, weight[None])
            chunk[where[:, 0], where[:, 1], where[:, 2]] = class_argmax(total).to(chunk.dtype)
        labels[x0:x1] = chunk.numpy()
    return labels
