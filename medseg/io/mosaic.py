"""Siemens mosaic images: one DICOM image holding all slices of a volume as tiles.

Siemens EPI/DWI sequences store the slices of one volume side by side in a square grid of
tiles (``ImageType`` contains ``MOSAIC``).  The number of slices is in the CSA image
header (``0029,1010``, ``NumberOfImagesInMosaic``); ``ImagePositionPatient`` is the
position of the *whole mosaic's* first pixel, not of the first slice, so it must be
moved to the first tile's centre, and slices follow the CSA ``SliceNormalVector`` at
``SpacingBetweenSlices``.  This is what dcm2niix and nibabel's ``MosaicWrapper`` do; the
CSA header is parsed with :mod:`nibabel.nicom.csareader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.nicom import csareader

from medseg.errors import InputError

__all__ = ["MosaicLayout", "is_mosaic", "mosaic_diffusion", "mosaic_layout", "untile", "untile_tiles"]


@dataclass(frozen=True)
class MosaicLayout:
    """Where the slices of a mosaic are and how to cut them out.

    Attributes:
        n_slices: Number of real slices (tiles beyond it are empty padding).
        grid: Tiles per row and per column of the mosaic (square grid).
        tile_rows: Rows of one slice.
        tile_cols: Columns of one slice.
        positions: ``(n_slices, 3)`` LPS position (mm) of the first voxel of each slice, in tile order.
    """

    n_slices: int
    grid: int
    tile_rows: int
    tile_cols: int
    positions: np.ndarray


def is_mosaic(ds: Any) -> bool:
    """True if the header says Siemens mosaic (``MOSAIC`` in ImageType)."""
    value = ds.get("ImageType") or []
    image_type = [str(v).upper() for v in ([value] if isinstance(value, str) else value)]
    return "MOSAIC" in image_type


def mosaic_layout(ds: Any, path: Path) -> MosaicLayout:
    """Compute the tile layout and slice positions of a mosaic from its header.

    Args:
        ds: The pydicom dataset (header; must include the CSA image header).
        path: The file, for error messages.

    Returns:
        The :class:`MosaicLayout`.

    Raises:
        InputError: The CSA header or geometry tags needed to un-tile are missing or inconsistent.
    """
    try:
        csa = csareader.get_csa_header(ds, "image")
    except Exception as exc:  # nibabel raises several types for damaged CSA data
        raise InputError(path, f"Siemens mosaic with an unreadable CSA image header ({exc})") from exc
    n_slices = _n_mosaic(ds, csa)
    if n_slices is None or n_slices < 1:
        raise InputError(path, "Siemens mosaic without NumberOfImagesInMosaic; cannot un-tile it")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise InputError(path, f"Siemens mosaic without {tag}; cannot place its slices")
    grid = math.ceil(math.sqrt(n_slices))
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows % grid or cols % grid:
        raise InputError(path, f"mosaic of {rows}x{cols} pixels cannot hold a {grid}x{grid} grid of {n_slices} slices")
    tile_rows, tile_cols = rows // grid, cols // grid
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    # ImagePositionPatient is the centre of the mosaic's first pixel; move it to the
    # centre of the first tile's first pixel (nibabel MosaicWrapper.image_position).
    shift_rows = (rows - tile_rows) / 2.0
    shift_cols = (cols - tile_cols) / 2.0
    first = (
        np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        + col_dir * row_spacing * shift_rows
        + row_dir * col_spacing * shift_cols
    )
    normal = _slice_normal(csa, row_dir, col_dir)
    spacing = _slice_spacing(ds)
    positions = first[None, :] + np.arange(n_slices)[:, None] * spacing * normal[None, :]
    return MosaicLayout(n_slices, grid, tile_rows, tile_cols, positions)


def mosaic_diffusion(ds: Any) -> tuple[float | None, tuple[float, float, float] | None]:
    """``(B_value, DiffusionGradientDirection)`` from the CSA image header (``None`` when absent).

    The gradient is a unit vector in LPS patient axes (as Siemens stores it); a zero or missing
    vector (b = 0 volumes) is ``None``.
    """
    try:
        csa = csareader.get_csa_header(ds, "image")
        b_value = csareader.get_b_value(csa) if csa is not None else None
        vector = csareader.get_g_vector(csa) if csa is not None else None
    except Exception:  # nibabel raises several types for damaged or value-less CSA elements
        return None, None
    b = float(b_value) if b_value is not None and np.isfinite(float(b_value)) else None
    if vector is None or len(vector) != 3:
        return b, None
    g = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(g))
    if not np.isfinite(norm) or norm < 1e-6:
        return b, None
    g = g / norm
    return b, (float(g[0]), float(g[1]), float(g[2]))


def untile(pixels: np.ndarray, layout: MosaicLayout) -> np.ndarray:
    """Cut a mosaic image into its slices.

    Args:
        pixels: ``(rows, cols)`` mosaic pixels as decoded.
        layout: From :func:`mosaic_layout`.

    Returns:
        ``(n_slices, tile_rows, tile_cols)`` array, tiles read row by row.
    """
    return untile_tiles(pixels, tile_rows=layout.tile_rows, tile_cols=layout.tile_cols)[: layout.n_slices]


def untile_tiles(pixels: np.ndarray, *, tile_rows: int, tile_cols: int) -> np.ndarray:
    """Cut a mosaic into all its tiles (including empty padding tiles).

    Args:
        pixels: ``(rows, cols)`` mosaic pixels.
        tile_rows: Rows of one tile.
        tile_cols: Columns of one tile.

    Returns:
        ``(grid * grid, tile_rows, tile_cols)`` array, tiles read row by row.
    """
    rows, cols = pixels.shape
    if rows % tile_rows or cols % tile_cols or rows // tile_rows != cols // tile_cols:
        raise ValueError(f"a {rows}x{cols} mosaic is not a square grid of {tile_rows}x{tile_cols} tiles")
    grid = rows // tile_rows
    return (
        pixels.reshape(grid, tile_rows, grid, tile_cols)
        .transpose(0, 2, 1, 3)
        .reshape(grid * grid, tile_rows, tile_cols)
    )


def _n_mosaic(ds: Any, csa: dict[str, Any] | None) -> int | None:
    if csa is not None:
        try:
            n = csareader.get_n_mosaic(csa)
        except Exception:  # a CSA element with no value
            n = None
        if n:
            return int(n)
    value = ds.get((0x0019, 0x100A))  # SIEMENS MR HEADER NumberOfImagesInMosaic
    if value is not None and value.value not in (None, b"", ""):
        try:
            return int(value.value if not isinstance(value.value, bytes) else int.from_bytes(value.value[:2], "little"))
        except (TypeError, ValueError):
            return None
    return None


def _slice_normal(csa: dict[str, Any] | None, row_dir: np.ndarray, col_dir: np.ndarray) -> np.ndarray:
    normal = np.cross(row_dir, col_dir)
    if csa is None:
        return normal / np.linalg.norm(normal)
    try:
        vector = csareader.get_slice_normal(csa)
    except Exception:
        vector = None
    if vector is None or len(vector) != 3 or not np.all(np.isfinite(np.asarray(vector, dtype=float))):
        return normal / np.linalg.norm(normal)
    csa_normal = np.asarray(vector, dtype=np.float64)
    csa_normal /= np.linalg.norm(csa_normal)
    # The CSA normal may point either way along the cross product: that is the slice order.
    return csa_normal


def _slice_spacing(ds: Any) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        if value not in (None, ""):
            spacing = float(value)
            if spacing > 0:
                return spacing
    return 1.0
