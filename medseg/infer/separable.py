"""Separable resampling on a regular grid, reproducing SciPy / scikit-image / torch resizing exactly.

scikit-image's ``resize`` (``scipy.ndimage.zoom`` with ``grid_mode=True``), ``scipy.ndimage.map_coordinates``
on an axis-aligned grid and ``torch.nn.functional.interpolate`` are all *separable*: the result is the
input multiplied along each axis by a fixed ``(n_out, n_in)`` matrix (spline prefilter + interpolation
weights + the border rule).  This module builds that matrix once per axis by running the reference
function itself on an identity matrix (:func:`zoom_operator`, :func:`coordinates_operator`,
:func:`torch_operator` - so coordinate conventions, rounding of nearest neighbours and border
handling are the library's by construction) and applies it as a banded matrix product
(:func:`resample_chunks`), chunk by chunk along the first output axis, in float32.

Against the reference (float64, whole volume) the only differences are float32 rounding and the
truncation of matrix entries below ``1e-10`` (the cubic prefilter decays by 0.27 per voxel); the
tests measure them.  Cost: about ``(taps + block) x voxels`` multiply-adds per axis instead of SciPy's
float64 3D spline evaluation, and no full-volume float64 copy.

Nonlinear steps of the reference are reproduced where they are (:class:`Stage`): scikit-image clips a
spline result (order > 1) to the input's range, per call - per channel for a volume, per slice when
nnU-Net resizes slice by slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

__all__ = [
    "AxisOperator",
    "ResamplePlan",
    "Stage",
    "coordinates_operator",
    "resample",
    "resample_chunks",
    "torch_operator",
    "zoom_operator",
]

#: Matrix entries below this are dropped (the cubic spline prefilter decays geometrically).
TRUNCATE = 1e-10

#: Output rows per block of the banded product.
BLOCK = 64


@dataclass(frozen=True)
class AxisOperator:
    """A ``(n_out, n_in)`` resampling matrix with its band structure.

    Attributes:
        matrix: float64 weights.
        blocks: ``(o0, o1, lo, hi)``: output rows ``[o0, o1)`` read input rows ``[lo, hi)`` only.
    """

    matrix: np.ndarray
    blocks: tuple[tuple[int, int, int, int], ...]

    @property
    def n_out(self) -> int:
        """Output length."""
        return int(self.matrix.shape[0])

    @property
    def n_in(self) -> int:
        """Input length."""
        return int(self.matrix.shape[1])

    def support(self, o0: int, o1: int) -> tuple[int, int]:
        """Input rows ``[lo, hi)`` that output rows ``[o0, o1)`` read."""
        nz = np.flatnonzero(np.any(self.matrix[o0:o1] != 0, axis=0))
        if nz.size == 0:
            return o0 if o0 < self.n_in else self.n_in - 1, (o0 if o0 < self.n_in else self.n_in - 1) + 1
        return int(nz[0]), int(nz[-1]) + 1

    @property
    def is_identity(self) -> bool:
        """True for the identity (no work)."""
        return self.n_in == self.n_out and bool(np.array_equal(self.matrix, np.eye(self.n_in)))


def _operator(matrix: np.ndarray) -> AxisOperator:
    m = np.where(np.abs(matrix) < TRUNCATE, 0.0, matrix)
    blocks = []
    for o0 in range(0, m.shape[0], BLOCK):
        o1 = min(m.shape[0], o0 + BLOCK)
        nz = np.flatnonzero(np.any(m[o0:o1] != 0, axis=0))
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)
        blocks.append((o0, o1, lo, hi))
    return AxisOperator(matrix=m, blocks=tuple(blocks))


@lru_cache(maxsize=128)
def zoom_operator(n_in: int, n_out: int, order: int) -> AxisOperator:
    """``scipy.ndimage.zoom(x, n_out / n_in, order=order, mode="nearest", grid_mode=True)`` along one axis.

    This is scikit-image's ``resize(..., order, mode="edge", anti_aliasing=False)`` per axis (before
    its clipping), as nnU-Net's ``resample_data_or_seg`` calls it.
    """
    from scipy import ndimage

    if n_in == n_out:
        return _operator(np.eye(n_in))
    eye = np.eye(n_in)
    out = ndimage.zoom(eye, (n_out / n_in, 1.0), order=order, mode="nearest", grid_mode=True)
    if out.shape[0] != n_out:  # pragma: no cover - zoom rounds n_in * (n_out / n_in) back to n_out
        raise ValueError(f"zoom produced {out.shape[0]} rows for {n_out}")
    return _operator(out)


@lru_cache(maxsize=128)
def coordinates_operator(n_in: int, n_out: int, order: int) -> AxisOperator:
    """``scipy.ndimage.map_coordinates(..., order, mode="nearest")`` at ``n_in / n_out * (i + 0.5) - 0.5``.

    nnU-Net's out-of-plane step for anisotropic data (``order_z``), coordinates computed as it does.
    """
    from scipy import ndimage

    if n_in == n_out:
        return _operator(np.eye(n_in))
    scale = float(n_in) / n_out
    rows = scale * (np.arange(n_out, dtype=np.int64)[:, None] + 0.5) - 0.5
    rows = np.broadcast_to(rows, (n_out, n_in))
    cols = np.broadcast_to(np.arange(n_in, dtype=np.float64)[None, :], (n_out, n_in))
    out = ndimage.map_coordinates(np.eye(n_in), [rows, cols], order=order, mode="nearest")
    return _operator(out)


@lru_cache(maxsize=128)
def torch_operator(n_in: int, n_out: int, mode: str) -> AxisOperator:
    """``torch.nn.functional.interpolate(x, size, mode)`` along one axis (``linear`` or ``nearest-exact``).

    ``trilinear`` / ``bilinear`` are products of per-axis ``linear`` interpolations with the same
    source-index rule (``align_corners=False``).
    """
    import torch.nn.functional as F

    if n_in == n_out:
        return _operator(np.eye(n_in))
    eye = torch.eye(n_in, dtype=torch.float32)[None]  # (1, C=n_in, L=n_in): channel j is the j-th unit vector
    out = F.interpolate(eye, size=n_out, mode=mode)
    return _operator(out[0].T.double().numpy())


@dataclass(frozen=True)
class Stage:
    """Operators applied together, then an optional clip to the input's range.

    Attributes:
        ops: ``{spatial axis: operator}``.
        clip: ``volume``: clip each channel to its min/max over the whole input (scikit-image on a
            volume); ``slice``: to its min/max over each input slice along ``clip_axis`` (scikit-image
            slice by slice); ``None``: no clip.
        clip_axis: Spatial axis of the slices for ``clip="slice"``.
    """

    ops: dict[int, AxisOperator]
    clip: Literal["volume", "slice"] | None = None
    clip_axis: int = 0


@dataclass(frozen=True)
class ResamplePlan:
    """Stages that map a ``(C, *in_shape)`` volume to ``(C, *out_shape)``.

    Each spatial axis has an operator in at most one stage; an axis without one keeps its size.
    """

    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    @property
    def is_identity(self) -> bool:
        """No resampling at all (the reference returns its input unchanged)."""
        return all(op.is_identity for s in self.stages for op in s.ops.values()) or not self.stages


def _apply_axis(
    x: torch.Tensor, matrix: torch.Tensor, blocks: Sequence[tuple[int, int, int, int]], dim: int
) -> torch.Tensor:
    """Multiply ``x`` along ``dim`` by a banded ``(n_out, n_in)`` matrix (float32)."""
    x = x.contiguous()
    shape = list(x.shape)
    pre, n_in, post = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])
    n_out = int(matrix.shape[0])
    x3 = x.view(pre, n_in, post)
    out = torch.empty((pre, n_out, post), dtype=x.dtype)
    if post == 1:
        x2, out2 = x3[:, :, 0], out[:, :, 0]
        for o0, o1, lo, hi in blocks:
            out2[:, o0:o1] = x2[:, lo:hi] @ matrix[o0:o1, lo:hi].T
    else:
        for o0, o1, lo, hi in blocks:
            out[:, o0:o1, :] = torch.matmul(matrix[o0:o1, lo:hi], x3[:, lo:hi, :])
    shape[dim] = n_out
    return out.view(shape)


def _clip_bounds(source: torch.Tensor, stage: Stage) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (``volume``) or per-channel-and-slice (``slice``) min/max of the input."""
    if stage.clip is None:
        return None
    c = int(source.shape[0])
    if stage.clip == "volume":
        flat = source.reshape(c, -1)
        return flat.amin(dim=1).float(), flat.amax(dim=1).float()
    axis = stage.clip_axis + 1
    moved = source.movedim(axis, 1).reshape(c, source.shape[axis], -1)
    return moved.amin(dim=2).float(), moved.amax(dim=2).float()


def _convex(stage: Stage) -> bool:
    """Every operator of the stage takes convex combinations (non-negative weights, rows summing to 1)."""
    return all(
        bool((op.matrix >= 0).all()) and bool(np.allclose(op.matrix.sum(axis=1), 1.0, atol=1e-6))
        for op in stage.ops.values()
    )


def resample_chunks(
    plan: ResamplePlan,
    source: torch.Tensor,
    *,
    chunk_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Resample ``source`` chunk by chunk along the first output axis.

    Args:
        plan: The operators (:func:`plan_from_nnunet` builds nnU-Net's).
        source: ``(C, *plan.in_shape)`` tensor of any float dtype (e.g. a float16 logit store).
        chunk_bytes: Budget for one chunk's float32 temporaries.
        dtype: Computation dtype (float32; float64 for reference checks).

    Yields:
        ``(o0, o1, block)`` with ``block`` ``(C, o1 - o0, *plan.out_shape[1:])``.
    """
    c = int(source.shape[0])
    out0 = plan.out_shape[0]
    op0 = next((s.ops[0] for s in plan.stages if 0 in s.ops), None)
    # a stage of convex operators (non-negative rows summing to 1: linear, nearest) stays within the
    # input's range by construction, so its clip would only move values by float rounding: skipped
    bounds = [None if _convex(s) else _clip_bounds(source, s) for s in plan.stages]
    mats = [{a: torch.from_numpy(op.matrix).to(dtype) for a, op in s.ops.items()} for s in plan.stages]
    plane = max(plan.in_shape[1], plan.out_shape[1]) * max(plan.in_shape[2], plan.out_shape[2])
    scale0 = max(1.0, plan.in_shape[0] / max(1, out0))
    rows = max(1, int(chunk_bytes // max(1, 3 * 4 * c * plane * scale0)))
    for o0 in range(0, out0, rows):
        o1 = min(out0, o0 + rows)
        lo, hi = op0.support(o0, o1) if op0 is not None else (o0, o1)
        x = source[:, lo:hi].to(dtype)
        for stage, mat, bound in zip(plan.stages, mats, bounds, strict=True):
            for axis, op in stage.ops.items():
                if axis == 0:
                    sub = mat[0][o0:o1, lo:hi]
                    x = _apply_axis(x, sub, [(0, o1 - o0, 0, hi - lo)], 1)
                else:
                    x = _apply_axis(x, mat[axis], op.blocks, axis + 1)
            if bound is not None:
                lo_b, hi_b = bound
                if stage.clip == "volume":
                    shape = (c, 1, 1, 1)
                    x = torch.maximum(torch.minimum(x, hi_b.view(shape).to(dtype)), lo_b.view(shape).to(dtype))
                else:
                    axis = stage.clip_axis
                    rows_lo, rows_hi = (
                        (lo_b[:, lo:hi], hi_b[:, lo:hi]) if axis == 0 and 0 not in stage.ops else (lo_b, hi_b)
                    )
                    dims = [c, 1, 1, 1]
                    dims[axis + 1] = int(rows_lo.shape[1])
                    x = torch.maximum(
                        torch.minimum(x, rows_hi.reshape(dims).to(dtype)), rows_lo.reshape(dims).to(dtype)
                    )
        yield o0, o1, x


def resample(plan: ResamplePlan, source: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole resampled volume ``(C, *plan.out_shape)`` (see :func:`resample_chunks`)."""
    if plan.is_identity:
        return source.to(dtype)
    out = torch.empty((int(source.shape[0]), *plan.out_shape), dtype=dtype)
    for o0, o1, block in resample_chunks(plan, source, dtype=dtype):
        out[:, o0:o1] = block
    return out
