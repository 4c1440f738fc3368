"""NIfTI / NRRD / MHA reading and writing with exact geometry and atomic writes.

NIfTI goes through nibabel (which resolves sform/qform the way the NIfTI standard
asks); NRRD and MHA/MHD through SimpleITK.  LPS<->RAS conversion happens here and
nowhere else (see :mod:`medseg.io.volume`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError, MedsegError, OutputExistsError, OutputPathError
from medseg.io.paths import check_output_file, refuse_input_overlap
from medseg.io.volume import Geometry, Volume, label_dtype
from medseg.types import PathLike, VolumeKind

__all__ = [
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "atomic_path",
    "atomic_paths",
    "read_image_file",
    "split_suffix",
    "write_json_atomic",
    "write_volume",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".seg.nrrd", ".mha", ".mhd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def split_suffix(path: PathLike) -> tuple[str, str]:
    """Split a file name into stem and volume suffix (``case.nii.gz`` -> ``case``, ``.nii.gz``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return Path(name).stem, Path(name).suffix.lower()


# --------------------------------------------------------------------- reading
def read_image_file(path: PathLike, *, kind: VolumeKind = "image", allow_4d: bool = True) -> Volume:
    """Read a NIfTI, NRRD or MHA/MHD volume.

    Args:
        path: The file.
        kind: ``"label"`` casts to an unsigned integer type and requires integral values.
        allow_4d: Accept a 4th axis as channels (NIfTI's 4th/5th dim, ITK vector pixels).

    Returns:
        A :class:`Volume` with array ``(C, X, Y, Z)``.

    Raises:
        InputError: Unreadable, corrupt, not 3D, or containing NaN/inf values.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file" if not p.exists() else "not a regular file")
    if not os.access(p, os.R_OK):
        raise InputError(p, "permission denied")
    _, suffix = split_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        array, geometry = _read_nifti(p)
    elif suffix in ITK_SUFFIXES:
        array, geometry = _read_itk(p)
    else:
        raise InputError(p, f"unknown volume format {suffix!r} (expected one of {', '.join(VOLUME_SUFFIXES)})")
    if array.ndim != 4 or (array.shape[0] > 1 and not allow_4d):
        raise InputError(p, f"expected a 3D volume, got array shape {array.shape[1:]} with {array.shape[0]} channels")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(p, "contains NaN or infinite values")
    if kind == "label":
        array = _as_labels(p, array)
    return Volume(array=array, geometry=geometry, kind=kind, source=str(p), meta=_read_sidecar(p))


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        img: Any = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError) as exc:
        raise InputError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim < 3:
        raise InputError(path, f"expected a 3D volume, got {data.ndim}D data of shape {data.shape}")
    if data.ndim > 3:
        extra = data.shape[3:]
        data = data.reshape(data.shape[:3]) if int(np.prod(extra)) == 1 else data.reshape(*data.shape[:3], -1)
    array = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return np.ascontiguousarray(array), Geometry(shape=data.shape[:3], affine=img.affine)


def _detached_data_file(path: Path) -> Path | None:
    """The data file a detached header (``.mhd`` ElementDataFile, ``.nhdr`` data file) names, if any."""
    keys = {".mhd": ("elementdatafile",), ".nhdr": ("data file", "datafile")}.get(split_suffix(path)[1])
    if keys is None:
        return None
    try:
        with path.open("r", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition("=" if split_suffix(path)[1] == ".mhd" else ":")
                value = value.strip()
                if sep and key.strip().lower() in keys and value and value.upper() not in ("LOCAL", "LIST"):
                    if "%" in value or " " in value:  # file patterns / lists: let the reader resolve them
                        return None
                    return (path.parent / value) if not Path(value).is_absolute() else Path(value)
    except OSError:
        return None
    return None


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    data_file = _detached_data_file(path)
    if data_file is not None and not data_file.is_file():
        raise InputError(path, f"its data file {data_file.name} ({data_file}) does not exist")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(path, f"cannot read image ({reason})") from exc
    if image.GetDimension() != 3:
        raise InputError(path, f"expected a 3D volume, got {image.GetDimension()}D")
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    vector = image.GetNumberOfComponentsPerPixel() > 1
    array = data.transpose(3, 2, 1, 0) if vector else data.transpose(2, 1, 0)[None]
    geometry = Geometry.from_itk(
        shape=image.GetSize(),  # type: ignore[arg-type]
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=image.GetDirection(),
    )
    return np.ascontiguousarray(array), geometry


def _as_labels(path: Path, array: np.ndarray) -> np.ndarray:
    if array.shape[0] != 1:
        raise InputError(path, f"a label volume must have one channel, got {array.shape[0]}")
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise InputError(path, "label volume contains non-integer values")
        array = rounded
    if array.size and array.min() < 0:
        raise InputError(path, f"label volume contains negative values (min {array.min()})")
    max_label = int(array.max()) if array.size else 0
    return array.astype(label_dtype(max_label), copy=False)


def _sidecar_path(path: Path) -> Path:
    stem, _ = split_suffix(path)
    return path.with_name(stem + ".json")


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = _sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {"sidecar": data} if isinstance(data, dict) else {}


# --------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_path(target: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary file keeps the target's suffix (writers choose the format from it)
    and lives in the same folder, so the final ``os.replace`` is atomic.  On any error
    the temporary file is removed and ``target`` is untouched.

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is false.
    """
    with atomic_paths([target], overwrite=overwrite) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(targets: Sequence[PathLike], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together (a volume and its sidecar).

    Yields one temporary path per target (same folder, same suffix).  Only when the block
    succeeds are they renamed onto the targets, one ``os.replace`` each, after every target has
    been checked; on any error all temporary files are removed and no target is touched.

    Raises:
        OutputExistsError: One of ``targets`` exists and ``overwrite`` is false (checked before the
            block runs and again before the first rename); nothing is written.
    """
    paths = [Path(t) for t in targets]
    _refuse_existing(paths, overwrite=overwrite)
    tmps: list[Path] = []
    try:
        for target in paths:
            tmps.append(_temporary_beside(target))
        yield tmps
        _refuse_existing(paths, overwrite=overwrite)
        for tmp, target in zip(tmps, paths, strict=True):
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise OutputPathError(target, f"cannot write ({exc.strerror or exc})") from exc
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _refuse_existing(targets: list[Path], *, overwrite: bool) -> None:
    for target in targets:
        if target.is_dir():
            raise OutputPathError(target, "output file is a folder")
        if not overwrite and target.exists():
            raise OutputExistsError(target)


def _temporary_beside(target: Path) -> Path:
    """An empty file ``.<stem>.<random>.tmp<suffix>`` in ``target``'s folder (created), mode 0666 & ~umask."""
    check_output_file(target)  # a file in the way of its folder, no write permission: say so
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stem, suffix = split_suffix(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as exc:
        raise OutputPathError(target, f"cannot create the output file ({exc.strerror or exc})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give outputs the usual permissions
    return tmp


def write_json_atomic(path: PathLike, data: Any, *, overwrite: bool = True) -> Path:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        _write_json(tmp, data)
    return Path(path)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_volume(
    volume: Volume,
    path: PathLike,
    *,
    overwrite: bool = False,
    label_names: dict[int, str] | None = None,
) -> Path:
    """Write a volume to NIfTI (``.nii``/``.nii.gz``), NRRD or MHA with its exact grid.

    Labels are written with the smallest unsigned integer dtype that holds them and,
    when ``label_names`` is given, a ``<stem>.json`` sidecar (and NRRD key/value
    metadata in the 3D Slicer ``Segment<N>_*`` style for ``.nrrd``).  The volume and its
    sidecar are written together (:func:`atomic_paths`): both or neither.

    Args:
        volume: The volume; a multi-channel image becomes a 4D NIfTI / vector ITK image.
        path: Output file; the format follows the suffix.
        overwrite: Replace an existing file (and sidecar).
        label_names: ``{label value: name}`` for label volumes.

    Returns:
        The written path.

    Raises:
        OutputExistsError: The volume or the sidecar exists and ``overwrite`` is false; nothing is written.
        MedsegError: Unsupported output suffix.
    """
    path = Path(path)
    _, suffix = split_suffix(path)
    if volume.source and os.path.exists(volume.source):
        refuse_input_overlap([path], [volume.source], what="output file")  # never over (or into) its own source
    array = volume.array
    if volume.kind == "label":
        max_label = int(array.max()) if array.size else 0
        array = array.astype(label_dtype(max_label), copy=False)
    if suffix == ".mhd":
        raise MedsegError(f"{path}: writing .mhd (two-file format) is not supported atomically; use .mha")
    targets = [path] if label_names is None else [path, _sidecar_path(path)]
    with atomic_paths(targets, overwrite=overwrite) as tmps:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(array, volume.geometry, tmps[0])
        elif suffix in ITK_SUFFIXES:
            _write_itk(array, volume.geometry, tmps[0], label_names=label_names if suffix.endswith("nrrd") else None)
        else:
            raise MedsegError(f"{path}: unknown output format {suffix!r}")
        if label_names is not None:
            labels = {str(k): v for k, v in sorted(label_names.items())}
            _write_json(tmps[1], {"labels": labels, "geometry": volume.geometry.to_dict()})
    return path


def _write_nifti(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, geometry.affine, header=header)
    # Both forms carry the grid: readers that prefer qform (some ITK builds) and
    # readers that prefer sform (nibabel, FSL) see the same geometry.
    img.set_sform(geometry.affine, code=1)
    img.set_qform(geometry.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _write_itk(array: np.ndarray, geometry: Geometry, path: Path, *, label_names: dict[int, str] | None) -> None:
    if array.shape[0] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[0].transpose(2, 1, 0)))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(3, 2, 1, 0)), isVector=True)
    params = geometry.to_itk()
    image.SetSpacing(params["spacing"])
    image.SetOrigin(params["origin"])
    image.SetDirection(params["direction"])
    segments = [(value, name) for value, name in sorted((label_names or {}).items()) if value != 0]
    for index, (value, name) in enumerate(segments):
        image.SetMetaData(f"Segment{index}_ID", f"Segment_{value}")
        image.SetMetaData(f"Segment{index}_Name", name)
        image.SetMetaData(f"Segment{index}_LabelValue", str(value))
        image.SetMetaData(f"Segment{index}_Layer", "0")
    sitk.WriteImage(image, str(path), useCompression=True)
