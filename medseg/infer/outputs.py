"""Probability maps on the input grid as multi-channel NIfTI.

NIfTI-1 has no float16 type, so compact probability maps are stored as unsigned
integers with the NIfTI scale factor ``scl_slope = 1 / dtype max`` (``uint8``: steps of
1/255, ``uint16``: steps of 1/65535, about float16's resolution near 1); every reader
that applies ``scl_slope`` (nibabel ``get_fdata``, SimpleITK/ITK, 3D Slicer, ITK-SNAP,
FSL) sees probabilities in ``[0, 1]``.  ``float32`` stores them unscaled.  The grid is
written like :func:`medseg.io.write_volume` does (sform = qform, code 1).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import MedsegError
from medseg.io import Volume, atomic_path, split_suffix
from medseg.types import PathLike

__all__ = ["probability_path", "write_probabilities"]


def probability_path(label_path: PathLike) -> Path:
    """``<case>_probabilities.nii.gz`` beside ``<case><suffix>``."""
    path = Path(label_path)
    stem, _ = split_suffix(path)
    return path.with_name(f"{stem}_probabilities.nii.gz")


def write_probabilities(volume: Volume, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write ``(K, X, Y, Z)`` probabilities as a 4D NIfTI ``(X, Y, Z, K)`` with the volume's grid.

    Args:
        volume: Probabilities as ``uint8``/``uint16`` (scaled: dtype maximum = 1) or ``float32``.
        path: ``.nii.gz`` or ``.nii`` file.
        overwrite: Replace an existing file.

    Returns:
        The written path.
    """
    path = Path(path)
    if split_suffix(path)[1] not in (".nii.gz", ".nii"):
        raise MedsegError(f"{path}: probabilities are written as NIfTI (.nii.gz or .nii)")
    array = volume.array
    data = np.moveaxis(array, 0, -1)
    img = nib.Nifti1Image(data, volume.geometry.affine)
    img.header.set_data_dtype(array.dtype)
    if array.dtype.kind == "u":
        img.header.set_slope_inter(1.0 / float(np.iinfo(array.dtype).max), 0.0)
    img.set_sform(volume.geometry.affine, code=1)
    img.set_qform(volume.geometry.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["intent_name"] = b"probabilities"
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path
