"""Exact (interpolation-free) re-indexing between grids that share their voxel centres.

Two files can describe the *same* voxels with different index orders: dcm2niix flips the
row axis of DICOM images, TotalSegmentator writes its outputs in the orientation of its
input NIfTI, ITK writers keep DICOM's.  :func:`axis_mapping` recognises that case (a
signed permutation of the axes with whole-voxel offsets) and :func:`reindex_to` moves the
array onto the other grid without touching a single value.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from medseg.errors import GeometryError
from medseg.io.volume import Geometry, Volume

__all__ = ["AxisMapping", "axis_mapping", "place_into", "reindex_to", "signed_permutation"]


@dataclass(frozen=True)
class AxisMapping:
    """How to turn an array on grid ``src`` into the same voxels on grid ``dst``.

    Attributes:
        axes: For each ``dst`` axis, the ``src`` axis it comes from.
        flip: For each ``dst`` axis, whether the index runs backwards.
        max_error_mm: Largest distance between a ``src`` grid corner and the ``dst`` voxel it maps to.
    """

    axes: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    max_error_mm: float

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Re-index a ``(C, X, Y, Z)`` array (returns a view where possible)."""
        out = np.transpose(array, (0, *(a + 1 for a in self.axes)))
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out = np.flip(out, axis=axis + 1)
        return out


def signed_permutation(linear: np.ndarray, *, atol: float = 1e-9) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Read a ``(3, 3)`` voxel-index map as a signed permutation of the axes, if it is one.

    Args:
        linear: The linear part of an index map (``inv(A) @ B`` of two grid affines).
        atol: Largest allowed deviation of an entry from -1, 0 or 1.

    Returns:
        ``(rows, signs)``: for each column ``t`` the row holding its single non-zero entry and that
        entry's sign; ``None`` if the map scales, rotates or shears.
    """
    rounded = np.rint(linear)
    if not np.allclose(linear, rounded, atol=atol):
        return None
    magnitude = np.abs(rounded)
    if not (np.array_equal(magnitude.sum(axis=0), np.ones(3)) and np.array_equal(magnitude.sum(axis=1), np.ones(3))):
        return None
    rows = tuple(int(np.flatnonzero(rounded[:, t])[0]) for t in range(3))
    signs = tuple(int(rounded[rows[t], t]) for t in range(3))
    return rows, signs


def axis_mapping(src: Geometry, dst: Geometry, *, atol: float = 1e-3) -> AxisMapping | None:
    """The mapping that puts ``src``'s voxels onto ``dst``, if both grids hold the same voxel centres.

    Args:
        src: Grid of the array to move.
        dst: Target grid.
        atol: Largest allowed distance (mm) between corresponding voxel centres.

    Returns:
        The :class:`AxisMapping`, or ``None`` when the grids are not a re-indexing of each other.
    """
    m = np.linalg.inv(dst.affine) @ src.affine  # src index -> dst index
    perm = signed_permutation(m[:3, :3], atol=0.5)  # closeness is checked in mm at the corners below
    if perm is None:
        return None
    rows, signs = perm
    rot = np.zeros((3, 3))
    shift = np.round(m[:3, 3])
    axes = [0, 0, 0]
    flip = [False, False, False]
    for src_axis in range(3):
        dst_axis = rows[src_axis]
        rot[dst_axis, src_axis] = signs[src_axis]
        axes[dst_axis] = src_axis
        if src.shape[src_axis] != dst.shape[dst_axis]:
            return None
        expected = 0 if signs[src_axis] > 0 else dst.shape[dst_axis] - 1
        if shift[dst_axis] != expected:
            return None
        flip[dst_axis] = signs[src_axis] < 0
    exact = np.eye(4)
    exact[:3, :3] = rot
    exact[:3, 3] = shift
    corners = np.array([[*c, 1.0] for c in product(*[(0, n - 1) for n in src.shape])]).T
    error = float(np.max(np.linalg.norm((src.affine @ corners - dst.affine @ exact @ corners)[:3], axis=0)))
    if error > atol:
        return None
    return AxisMapping(axes=(axes[0], axes[1], axes[2]), flip=(flip[0], flip[1], flip[2]), max_error_mm=error)


def reindex_to(volume: Volume, geometry: Geometry, *, atol: float = 1e-3) -> Volume:
    """Put ``volume`` on ``geometry`` by permuting/flipping axes only (values are copied, never interpolated).

    Args:
        volume: The volume to move.
        geometry: Target grid, holding the same voxel centres in another index order.
        atol: Tolerance (mm) on voxel centre positions.

    Returns:
        A new :class:`Volume` whose geometry **is** ``geometry``.

    Raises:
        GeometryError: The grids do not hold the same voxel centres.
    """
    mapping = axis_mapping(volume.geometry, geometry, atol=atol)
    if mapping is None:
        raise GeometryError(
            f"grids do not hold the same voxels (not a re-indexing within {atol} mm): "
            f"{volume.geometry.describe()} vs {geometry.describe()}"
        )
    array = np.ascontiguousarray(mapping.apply(volume.array))
    return Volume(array=array, geometry=geometry, kind=volume.kind, source=volume.source, meta=dict(volume.meta))


def place_into(volume: Volume, geometry: Geometry, *, atol: float = 1e-3) -> Volume:
    """Put ``volume`` into a larger grid holding its voxel centres (a sub-block), zeros elsewhere.

    Like :func:`reindex_to` (signed axis permutation, no interpolation) but ``volume`` may cover
    only part of ``geometry``, e.g. a DICOM SEG that stores only its non-empty frames.

    Raises:
        GeometryError: Some voxel centre of ``volume`` is not a voxel centre of ``geometry``
            (within ``atol`` mm) or falls outside it.
    """
    m = np.linalg.inv(geometry.affine) @ volume.geometry.affine  # volume index -> geometry index
    perm = signed_permutation(m[:3, :3], atol=1e-3)
    shift = np.round(m[:3, 3])
    ok = perm is not None
    if ok:
        assert perm is not None
        rows, signs = perm
        exact = np.eye(4)
        exact[:3, :3] = 0
        for src_axis in range(3):
            exact[rows[src_axis], src_axis] = signs[src_axis]
        exact[:3, 3] = shift
        corners = np.array([[*c, 1.0] for c in product(*[(0, n - 1) for n in volume.geometry.shape])]).T
        mapped = exact @ corners
        error = float(np.max(np.linalg.norm((volume.geometry.affine @ corners - geometry.affine @ mapped)[:3], axis=0)))
        inside = bool(np.all(mapped[:3].min(axis=1) >= 0) and np.all(mapped[:3].max(axis=1) < np.array(geometry.shape)))
        ok = error <= atol and inside
    if not ok:
        raise GeometryError(
            f"the volume's voxels are not voxels of the target grid (within {atol} mm): "
            f"{volume.geometry.describe()} vs {geometry.describe()}"
        )
    assert perm is not None
    rows, signs = perm
    moved = volume.array
    axes = [0, 0, 0]
    for src_axis in range(3):
        axes[rows[src_axis]] = src_axis
    moved = np.transpose(moved, (0, *(a + 1 for a in axes)))
    starts = []
    for dst_axis in range(3):
        src_axis = axes[dst_axis]
        if signs[src_axis] < 0:
            moved = np.flip(moved, axis=dst_axis + 1)
            starts.append(int(shift[dst_axis]) - volume.geometry.shape[src_axis] + 1)
        else:
            starts.append(int(shift[dst_axis]))
    out = np.zeros((volume.channels, *geometry.shape), dtype=volume.array.dtype)
    index = (slice(None), *(slice(a, a + n) for a, n in zip(starts, moved.shape[1:], strict=True)))
    out[index] = moved
    return Volume(array=out, geometry=geometry, kind=volume.kind, source=volume.source, meta=dict(volume.meta))
