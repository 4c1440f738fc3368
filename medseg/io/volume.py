"""The data contract: a voxel array plus the exact geometry of its grid.

World convention (written down once, here):

* **Inside medseg** a grid is a 4x4 ``affine`` that maps a voxel index ``(i, j, k, 1)``
  to millimetres in **RAS+** world coordinates (x to the patient's Right->Left is
  *negative*, i.e. +x = Right... precisely: +x = Right, +y = Anterior, +z = Superior),
  as NIfTI, nibabel and MONAI's :class:`~monai.data.MetaTensor` do.
* DICOM and ITK (SimpleITK, NRRD, MHA) use **LPS+**.  Conversion happens only in the
  readers and writers, through :meth:`Geometry.from_itk` and :meth:`Geometry.to_itk`
  (``LPS = diag(-1, -1, 1) @ RAS``).
* Arrays are indexed ``(C, X, Y, Z)``: channel first, then voxel axes in the order of
  the affine's columns (the order of NIfTI and of ITK's index, *not* numpy's
  ``GetArrayFromImage`` order, which readers transpose).

A :class:`Volume` is what every reader returns and every writer takes.  At the MONAI
boundary it becomes a :class:`~monai.data.MetaTensor` (``to_metatensor``) so MONAI
transforms keep and invert geometry; ``meta`` keeps what a writer needs to reproduce
the input grid (source path, original geometry, label names, DICOM UIDs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import GeometryError
from medseg.types import Shape3D, VolumeKind

if TYPE_CHECKING:  # imported where used: loading and writing volumes needs neither torch nor MONAI
    import torch
    from monai.data import MetaTensor

__all__ = ["LPS_FROM_RAS", "Geometry", "Volume", "label_dtype"]

#: Multiplying a RAS point by this matrix gives the LPS point (and vice versa).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _frozen(array: np.ndarray) -> np.ndarray:
    out = np.array(array, dtype=np.float64, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Geometry:
    """A 3D voxel grid: its shape and its index-to-RAS affine.

    Attributes:
        shape: Number of voxels along the three voxel axes ``(X, Y, Z)``.
        affine: ``(4, 4)`` float64 matrix, voxel index -> RAS+ millimetres.
    """

    shape: Shape3D
    affine: np.ndarray

    def __post_init__(self) -> None:
        affine = _frozen(self.affine)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(f"affine must be a finite 4x4 matrix, got {affine!r}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise GeometryError(f"affine is singular (a zero spacing or collinear axes): {affine!r}")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise GeometryError(f"shape must be three positive sizes, got {self.shape!r}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", shape)

    # ----------------------------------------------------------------- derived
    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each voxel axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def direction_ras(self) -> np.ndarray:
        """``(3, 3)`` unit axis directions in RAS (columns = voxel axes)."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` ITK/DICOM direction matrix in LPS (columns = voxel axes)."""
        return LPS_FROM_RAS @ self.direction_ras

    @property
    def origin(self) -> tuple[float, float, float]:
        """Centre of voxel ``(0, 0, 0)`` in LPS mm, as ITK and DICOM report it."""
        o = LPS_FROM_RAS @ self.affine[:3, 3]
        return (float(o[0]), float(o[1]), float(o[2]))

    @property
    def orientation(self) -> str:
        """Three-letter RAS orientation code of the voxel axes (e.g. ``"LPS"``)."""
        import nibabel as nib

        return "".join(c or "?" for c in nib.aff2axcodes(self.affine))  # "?": an axis along no RAS direction

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_itk(
        cls,
        *,
        shape: Shape3D,
        spacing: tuple[float, ...],
        origin: tuple[float, ...],
        direction: np.ndarray | tuple[float, ...],
    ) -> Geometry:
        """Build a grid from ITK/DICOM (LPS) parameters.

        Args:
            shape: Voxel counts ``(X, Y, Z)`` (ITK's ``GetSize()`` order).
            spacing: Voxel size in mm per axis.
            origin: Position of voxel ``(0, 0, 0)`` in LPS mm.
            direction: ``(3, 3)`` matrix or its 9 row-major values (``GetDirection()``).
        """
        direction_lps = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = LPS_FROM_RAS @ direction_lps @ np.diag(np.asarray(spacing, dtype=np.float64))
        affine[:3, 3] = LPS_FROM_RAS @ np.asarray(origin, dtype=np.float64)
        return cls(shape=shape, affine=affine)

    def to_itk(self) -> dict[str, Any]:
        """ITK parameters: ``spacing``, ``origin`` (LPS) and row-major ``direction``."""
        return {
            "spacing": self.spacing,
            "origin": self.origin,
            "direction": tuple(float(v) for v in self.direction.ravel()),
        }

    # -------------------------------------------------------------- comparison
    def allclose(self, other: Geometry, *, atol: float = 1e-4) -> bool:
        """Same shape and affine entries equal within ``atol`` (mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, rtol=0, atol=atol))

    def require_same(self, other: Geometry, *, atol: float = 1e-4, what: str = "volumes") -> None:
        """Raise :class:`GeometryError` describing the difference unless grids match."""
        if self.allclose(other, atol=atol):
            return
        raise GeometryError(f"{what} are not on the same grid: {self.describe()} vs {other.describe()}")

    def describe(self) -> str:
        """One-line human description (shape, spacing, LPS origin, orientation)."""
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        og = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"shape {self.shape}, spacing ({sp}) mm, origin LPS ({og}) mm, orientation {self.orientation}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (affine in RAS, ITK parameters in LPS)."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin_lps": list(self.origin),
            "direction_lps": self.direction.tolist(),
            "affine_ras": self.affine.tolist(),
            "orientation": self.orientation,
        }


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds labels ``0..max_label``."""
    if max_label < 0:
        raise ValueError(f"labels must be non-negative, got max {max_label}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass
class Volume:
    """A channel-first voxel array on an exact grid.

    Attributes:
        array: ``(C, X, Y, Z)`` numpy array (``C == 1`` for labels).
        geometry: The grid of the three spatial axes.
        kind: ``"image"`` (interpolated linearly) or ``"label"`` (nearest neighbour).
        source: Where it was read from, if anywhere.
        meta: Anything a writer needs to reproduce the input (label names, series UID, ...).
    """

    array: np.ndarray
    geometry: Geometry
    kind: VolumeKind = "image"
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim == 3:
            self.array = self.array[None]
        if self.array.ndim != 4:
            raise GeometryError(f"a volume array must be (C, X, Y, Z), got shape {self.array.shape}")
        if tuple(self.array.shape[1:]) != self.geometry.shape:
            raise GeometryError(
                f"array spatial shape {tuple(self.array.shape[1:])} does not match geometry shape {self.geometry.shape}"
            )
        if self.kind not in ("image", "label"):
            raise ValueError(f"kind must be 'image' or 'label', got {self.kind!r}")

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.array.shape[0])

    def to_metatensor(self) -> MetaTensor:
        """The array as a MONAI ``MetaTensor`` with the RAS affine and writer metadata."""
        import torch
        from monai.data import MetaTensor

        meta: dict[str, Any] = {
            "original_affine": torch.tensor(np.array(self.geometry.affine), dtype=torch.float64),
            "spatial_shape": np.asarray(self.geometry.shape),
            "original_channel_dim": 0,
            "filename_or_obj": self.source or "",
            "medseg_kind": self.kind,
        }
        return MetaTensor(
            torch.from_numpy(_dense_array(self.array)),
            affine=torch.tensor(np.array(self.geometry.affine), dtype=torch.float64),
            meta=meta,
        )

    @classmethod
    def from_metatensor(cls, tensor: torch.Tensor, *, kind: VolumeKind = "image", **meta: Any) -> Volume:
        """Wrap a ``(C, X, Y, Z)`` MetaTensor (its current affine becomes the geometry)."""
        from monai.data import MetaTensor

        if not isinstance(tensor, MetaTensor):
            raise TypeError("from_metatensor needs a MetaTensor carrying an affine")
        array = tensor.detach().cpu().numpy()
        geometry = Geometry(shape=tuple(array.shape[1:]), affine=tensor.affine.detach().cpu().numpy())  # type: ignore[arg-type]
        source = str(tensor.meta.get("filename_or_obj", "")) or None
        return cls(array=array, geometry=geometry, kind=kind, source=source, meta=dict(meta))


def _dense_array(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is C- or Fortran-contiguous and writeable, else a C-contiguous copy.

    DICOM and NIfTI readers hand out ``(C, X, Y, Z)`` arrays in Fortran order (their memory
    runs along X fastest); forcing C order here would transpose hundreds of MB for nothing,
    since torch and MONAI work on any strides.  Only negative or gapped strides (flipped or
    sliced views) and read-only buffers need a copy for ``torch.from_numpy``; a read-only dense
    array is copied in its own memory order, so that everything downstream (chunk order of the
    resampling, hence float rounding) is the same as for a writeable one.
    """
    dense = array.flags.c_contiguous or array.flags.f_contiguous
    if dense and all(s >= 0 for s in array.strides):
        return array if array.flags.writeable else array.copy(order="K")
    return np.ascontiguousarray(array)
