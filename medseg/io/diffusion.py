"""Diffusion gradient tables: ``.bval`` / ``.bvec`` files in FSL's (and dcm2niix's) conventions.

DICOM stores each diffusion volume's b-value (s/mm²) and gradient direction as a unit vector in
the patient's LPS axes.  FSL-style ``.bvec`` files hold the direction in the *image's voxel axes*
(one row per axis, one column per volume), with the first component negated when the image's
voxel-to-world matrix has a positive determinant (FSL reads images as if stored radiologically).
dcm2niix writes exactly this for the NIfTI it writes; since medseg writes the same voxels with
another axis order/flips (dcm2niix flips the row axis), the numbers differ from dcm2niix's file
but the direction in world space is the same.  :func:`bvecs_to_world` undoes the convention for
comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.io.images import atomic_paths
from medseg.io.volume import LPS_FROM_RAS, Volume
from medseg.types import PathLike

__all__ = ["bvecs_to_world", "fsl_bvecs", "write_bval_bvec"]


def _directions(affine: np.ndarray) -> np.ndarray:
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return linear / np.linalg.norm(linear, axis=0, keepdims=True)


def fsl_bvecs(gradients_lps: Sequence[Sequence[float]] | np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Gradient directions (LPS, one per volume) as FSL ``bvecs`` for an image with this RAS affine.

    Args:
        gradients_lps: ``(V, 3)`` unit vectors in LPS patient axes (zeros for b = 0 volumes).
        affine: The image's 4x4 voxel-to-RAS affine.

    Returns:
        ``(3, V)`` array: row ``i`` is the component along voxel axis ``i`` (x negated when
        ``det(affine[:3, :3]) > 0``).
    """
    g = np.asarray(gradients_lps, dtype=np.float64).reshape(-1, 3)
    ras = g @ LPS_FROM_RAS.T  # LPS -> RAS (the matrix is its own inverse)
    directions = _directions(affine)
    voxel = ras @ directions  # components along the voxel axes (columns are unit vectors)
    if np.linalg.det(directions) > 0:
        voxel[:, 0] = -voxel[:, 0]
    voxel[np.abs(voxel) < 5e-7] = 0.0
    return voxel.T


def bvecs_to_world(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(3, V)`` FSL ``bvecs`` of an image -> ``(V, 3)`` unit directions in RAS world axes (zeros stay zero)."""
    v = np.asarray(bvecs, dtype=np.float64).reshape(3, -1).T.copy()
    directions = _directions(affine)
    if np.linalg.det(directions) > 0:
        v[:, 0] = -v[:, 0]
    world = v @ directions.T
    norm = np.linalg.norm(world, axis=1, keepdims=True)
    return np.divide(world, norm, out=np.zeros_like(world), where=norm > 0)


def write_bval_bvec(volume: Volume, stem: PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<stem>.bval`` and ``<stem>.bvec`` for a diffusion volume (both or neither).

    Args:
        volume: A multi-volume image with ``meta["b_values"]`` and ``meta["gradients_lps"]``
            (as :func:`medseg.io.dicom_stack.stack_volumes` returns for diffusion series); the
            vectors are expressed in its own voxel axes.
        stem: Output path without suffix.
        overwrite: Replace existing files.

    Returns:
        The two paths.
    """
    stem = Path(stem)
    bvals = [float(b) for b in volume.meta["b_values"]]
    bvecs = fsl_bvecs(volume.meta["gradients_lps"], volume.geometry.affine)
    paths = (stem.with_name(stem.name + ".bval"), stem.with_name(stem.name + ".bvec"))
    with atomic_paths(list(paths), overwrite=overwrite) as (bval_tmp, bvec_tmp):
        bval_tmp.write_text(" ".join(_number(b) for b in bvals) + "\n")
        bvec_tmp.write_text("".join(" ".join(_number(v) for v in row) + "\n" for row in bvecs))
    return paths


def _number(value: float) -> str:
    text = f"{value:.6g}"
    return "0" if text in ("-0", "0") else text
