"""NIfTI / NRRD / MHA reading and writing with exact geometry and atomic writes.

NIfTI goes through nibabel (which resolves sform/qform the way the NIfTI standard
asks); NRRD and MHA/MHD through SimpleITK.  LPS<->RAS conversion happens here and
nowhere else (see :mod:`medseg.io.volume`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError, MedsegError, OutputExistsError, OutputPathError
from medseg.io.limits import check_declared_size
from medseg.io.paths import check_output_file, refuse_input_overlap, require_readable_file
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
#: Largest label value accepted (uint32): instance and panoptic maps fit, a stray 1e30 does not.
MAX_LABEL = 2**32 - 1
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
    p = require_readable_file(path)
    _, suffix = split_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        array, geometry = _read_nifti(p)
    elif suffix in ITK_SUFFIXES:
        array, geometry = _read_itk(p)
    else:
        raise InputError(p, f"unknown volume format {suffix!r} (expected one of {', '.join(VOLUME_SUFFIXES)})")
    if array.ndim != 4 or (array.shape[0] > 1 and not allow_4d):
        raise InputError(p, f"expected a 3D volume, got array shape {array.shape[1:]} with {array.shape[0]} channels")
    if array.dtype.kind not in "biuf":
        raise InputError(p, f"unsupported voxel type {array.dtype} (expected integers or real numbers)")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(p, "contains NaN or infinite values")
    if kind == "label":
        array = _as_labels(p, array)
    return Volume(array=array, geometry=geometry, kind=kind, source=str(p), meta=_read_sidecar(p))


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    """Header first (declared size vs bytes present and the read limit), then the voxels."""
    try:
        try:
            zooms = _raw_nifti_header(path)  # (nibabel silently turns a zero pixdim into 1 when it reads the header)
        except InputError as exc:
            raise InputError(path, f"cannot read NIfTI header ({exc.reason})") from None
        img: Any = nib.load(str(path))  # reads the header only; the data stay in the file
        header = img.header
        shape = tuple(int(d) for d in img.dataobj.shape)
        dtype = np.dtype(img.dataobj.dtype)
        offset = int(img.dataobj.offset)  # (vox_offset 0 in a single file means "right after the header")
        affine = np.asarray(img.affine, dtype=np.float64)
        sform_code = int(header["sform_code"])
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, OverflowError, zlib.error, ...
        raise InputError(path, f"cannot read NIfTI header ({_nifti_header_problem(path) or _reason(exc)})") from exc
    _check_nifti_header(path, shape, dtype, offset, zooms, sform_code)
    try:
        if split_suffix(path)[1] == ".nii.gz":
            raw = _read_gzip_voxels(path, offset, shape, dtype)
            data = _apply_nifti_scaling(raw, img.dataobj.slope, img.dataobj.inter)
        else:
            data = np.asanyarray(img.dataobj)  # memory-mapped; the size was checked against the file
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI voxel data ({_reason(exc)})") from exc
    if len(shape) > 3:
        extra = shape[3:]
        data = data.reshape(shape[:3]) if int(np.prod(extra)) == 1 else data.reshape(*shape[:3], -1)
    array = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return np.ascontiguousarray(array), _geometry(path, shape[:3], affine)


def _raw_nifti_header(path: Path) -> np.ndarray:
    """``pixdim[1:4]`` as stored in the file (NIfTI-1 or NIfTI-2, either byte order); extensions checked.

    nibabel replaces a zero pixdim by 1 when it reads the header, and reads each extension with one
    ``read(esize)``, which allocates ``esize`` bytes first: an extension size mutated to 2 GiB in a small
    file costs 2 GiB.  Here the extension chain is walked without reading it: every extension must fit
    before the voxel data and inside the file.
    """
    gz = split_suffix(path)[1] == ".nii.gz"
    opener: Any = gzip.open if gz else open
    with opener(path, "rb") as fh:
        head = fh.read(544)
        if len(head) < 348:
            raise InputError(path, f"the file holds {len(head)} bytes, less than a 348-byte NIfTI header")
        for order in ("<", ">"):
            (size,) = struct.unpack_from(f"{order}i", head, 0)
            if size == 348:
                zooms = struct.unpack_from(f"{order}8f", head, 76)[1:4]
                vox_offset = float(struct.unpack_from(f"{order}f", head, 108)[0])
                break
            if size == 540 and len(head) >= 544:
                zooms = struct.unpack_from(f"{order}8d", head, 104)[1:4]
                vox_offset = float(struct.unpack_from(f"{order}q", head, 168)[0])
                break
        else:
            raise InputError(path, "not a NIfTI header (sizeof_hdr is neither 348 nor 540)")
        if len(head) >= size + 4 and head[size] != 0:
            file_size = None if gz else os.fstat(fh.fileno()).st_size
            _walk_nifti_extensions(path, fh, order, start=size + 4, vox_offset=vox_offset, file_size=file_size)
    return np.asarray(zooms, dtype=np.float64)


def _walk_nifti_extensions(
    path: Path, fh: Any, order: str, *, start: int, vox_offset: float, file_size: int | None
) -> None:
    position = start
    end = int(vox_offset) if math.isfinite(vox_offset) and vox_offset > start else None  # None: up to the end
    while end is None or end - position >= 16:
        fh.seek(position)
        raw = fh.read(8)
        if len(raw) < 8:
            if end is None:
                return
            raise InputError(path, "truncated: the file ends inside a NIfTI extension header")
        esize, _code = struct.unpack(f"{order}2i", raw)
        if esize < 8:
            raise InputError(path, f"invalid NIfTI extension size {esize}")
        target = position + esize
        if end is not None and target > end:
            raise InputError(path, f"a NIfTI extension of {esize} bytes runs past the voxel data offset {end}")
        reached = fh.seek(target)
        if (file_size is not None and target > file_size) or reached < target:
            raise InputError(path, f"truncated: a NIfTI extension of {esize} bytes runs past the end of the file")
        position = target


def _nifti_header_problem(path: Path) -> str | None:
    """A plain reason when the header bytes themselves are missing or not decompressible."""
    try:
        opener: Any = gzip.open if split_suffix(path)[1] == ".nii.gz" else open
        with opener(path, "rb") as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        return f"corrupt compressed data: {_reason(exc)}"
    if len(head) < 348:
        return f"the file holds {len(head)} bytes, less than a 348-byte NIfTI header"
    return None


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (library messages can span many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _geometry(path: Path, shape: Sequence[int], affine: np.ndarray) -> Geometry:
    """The grid, or an :class:`InputError` naming the file (singular / non-finite affine, zero sizes)."""
    try:
        return Geometry(shape=tuple(int(v) for v in shape), affine=affine)  # type: ignore[arg-type]
    except MedsegError as exc:
        raise InputError(path, f"invalid geometry in the header: {exc}") from None


def _check_nifti_header(
    path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int, zooms: np.ndarray, sform_code: int
) -> None:
    if len(shape) < 3:
        raise InputError(path, f"expected a 3D volume, got {len(shape)}D data of shape {shape}")
    if min(shape) <= 0:
        raise InputError(path, f"the header declares a zero or negative dimension (shape {shape})")
    if sform_code <= 0 and not (np.all(np.isfinite(zooms)) and np.all(zooms > 0)):
        # nibabel (and ITK) would silently use 1 mm for a zero pixdim; the true spacing is unknown.
        raise InputError(path, f"voxel size (pixdim) {tuple(float(z) for z in zooms)} is not positive and finite")
    if offset < 0:
        raise InputError(path, f"negative voxel data offset {offset}")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    size = path.stat().st_size
    what = f"the header ({'x'.join(map(str, shape))} {dtype.name})"
    if split_suffix(path)[1] == ".nii.gz":
        check_declared_size(path, declared, what=what, compressed=size)
    else:
        check_declared_size(path, declared, what=what, present=size - offset)


_GZIP_CHUNK = 64 * 1024 * 1024


def _read_gzip_voxels(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Stream the voxels of a ``.nii.gz`` into an array whose pages are only touched as data arrive.

    nibabel allocates (and zeroes) the size the header declares before reading; a lying header
    then costs that much memory before the short read is noticed.
    """
    declared = math.prod(shape) * dtype.itemsize
    buffer = np.empty(declared, dtype=np.uint8)
    view = buffer.data  # (a memoryview of the array)
    filled = 0
    with gzip.open(path, "rb") as fh:
        try:
            if fh.seek(offset) < offset:  # (seeks forward by decompressing in chunks: nothing big allocated)
                raise InputError(path, f"truncated: the file ends before the voxel data offset {offset}")
            while filled < declared:
                n = fh.readinto(view[filled : filled + _GZIP_CHUNK])
                if not n:
                    break
                filled += n
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            reason = f"truncated or corrupt compressed data after {filled} of {declared} bytes of voxels"
            raise InputError(path, f"{reason} ({_reason(exc)})") from exc
    if filled < declared:
        what = f"the header ({'x'.join(map(str, shape))} {dtype.name})"
        raise InputError(path, f"truncated: {filled} bytes of voxel data for {declared} declared by {what}")
    return buffer.view(dtype).reshape(shape, order="F")


def _apply_nifti_scaling(raw: np.ndarray, slope: Any, inter: Any) -> np.ndarray:
    """``scl_slope``/``scl_inter`` exactly as nibabel's ``ArrayProxy`` applies them."""
    from nibabel.volumeutils import apply_read_scaling

    scl_slope, scl_inter = np.asanyarray(slope), np.asanyarray(inter)
    if np.can_cast(scl_inter, scl_slope.dtype):
        scl_inter = scl_inter.astype(scl_slope.dtype)
    return apply_read_scaling(raw, scl_slope, scl_inter)


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
    """Header first (SimpleITK ``ReadImageInformation``; size vs bytes present and the read limit), then pixels."""
    data_file = _detached_data_file(path)
    if data_file is not None:
        if not data_file.is_file():
            raise InputError(path, f"its data file {data_file.name} ({data_file}) does not exist")
        require_readable_file(data_file, what="data file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        dimension = reader.GetDimension()
        size = tuple(int(v) for v in reader.GetSize())
        components = int(reader.GetNumberOfComponents())
        itemsize = _itk_itemsize(reader.GetPixelID(), dimension, components)
        spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read image ({_itk_reason(exc)})") from exc
    if dimension != 3:
        raise InputError(path, f"expected a 3D volume, got {dimension}D")
    if min(size) <= 0:
        raise InputError(path, f"the header declares a zero dimension (size {size})")
    if not (np.all(np.isfinite(spacing)) and min(spacing) > 0):
        raise InputError(path, f"voxel spacing {tuple(spacing)} is not positive and finite")
    if not (np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))):
        raise InputError(path, "origin or direction is not finite")
    declared = int(np.prod(size, dtype=object)) * components * itemsize
    present, compressed = _itk_data_extent(path, data_file)
    what = f"the header ({'x'.join(map(str, size))} x {components} x {itemsize} bytes)"
    check_declared_size(path, declared, what=what, present=present, compressed=compressed)
    try:
        image = sitk.ReadImage(str(path))
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read image ({_itk_reason(exc)})") from exc
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    vector = image.GetNumberOfComponentsPerPixel() > 1
    array = data.transpose(3, 2, 1, 0) if vector else data.transpose(2, 1, 0)[None]
    try:
        geometry = Geometry.from_itk(
            shape=image.GetSize(),  # type: ignore[arg-type]
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
        )
    except MedsegError as exc:
        raise InputError(path, f"invalid geometry in the header: {exc}") from None
    return np.ascontiguousarray(array), geometry


def _itk_reason(exc: BaseException) -> str:
    """The informative line of an ITK exception (the last non-empty one, without source locations)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("/", "sitk::ERROR")) and "ITK-" not in line] or lines
    return lines[-1] if lines else type(exc).__name__


def _itk_itemsize(pixel_id: int, dimension: int, components: int) -> int:
    try:
        probe = sitk.Image([1] * max(dimension, 2), pixel_id, max(components, 1))
        dtype = sitk.GetArrayViewFromImage(probe).dtype
    except Exception:
        return 8
    return int(dtype.itemsize)


def _itk_data_extent(path: Path, data_file: Path | None) -> tuple[int | None, int | None]:
    """``(bytes of raw voxel data present, bytes of compressed voxel data)`` of an NRRD/MetaImage file.

    Parsed from the text header (where the data start, whether they are compressed); ``(None, None)``
    when the layout is not one of the plain cases (text encodings, file lists, ...): then only the
    read limit applies.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 20)
    except OSError:
        return None, None
    suffix = split_suffix(path)[1]
    if suffix in (".mha", ".mhd"):
        fields, end = _meta_header(head)
        compressed = fields.get("compresseddata", "false").lower() == "true"
        local = fields.get("elementdatafile", "").upper() == "LOCAL"
    else:
        fields, end = _nrrd_header(head)
        encoding = fields.get("encoding", "raw").lower()
        if encoding not in ("raw", "gzip", "gz", "bzip2", "bz2"):
            return None, None
        compressed = encoding != "raw"
        local = data_file is None and "data file" not in fields and "datafile" not in fields
        if fields.get("byte skip", "0").strip() not in ("0", ""):
            return None, None
    if local:
        if end is None:
            return None, None
        available = path.stat().st_size - end
    elif data_file is not None:
        available = data_file.stat().st_size
    else:
        return None, None
    return (None, available) if compressed else (available, None)


def _meta_header(head: bytes) -> tuple[dict[str, str], int | None]:
    fields: dict[str, str] = {}
    position = 0
    for line in head.split(b"\n"):
        position += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                return fields, position
    return fields, None


def _nrrd_header(head: bytes) -> tuple[dict[str, str], int | None]:
    fields: dict[str, str] = {}
    position = 0
    for line in head.split(b"\n"):
        position += len(line) + 1
        text = line.decode("latin-1").rstrip("\r")
        if not text:
            return fields, position
        key, sep, value = text.partition(":")
        if sep and not text.startswith("#"):
            fields[key.strip().lower()] = value.lstrip("=").strip()
    return fields, None


def _as_labels(path: Path, array: np.ndarray) -> np.ndarray:
    if array.shape[0] != 1:
        raise InputError(path, f"a label volume must have one channel, got {array.shape[0]}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(path, "label volume contains NaN or infinite values")
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise InputError(path, "label volume contains non-integer values")
        array = rounded
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise InputError(path, f"label volume has unsupported voxel type {array.dtype}")
    if array.size and array.min() < 0:
        raise InputError(path, f"label volume contains negative values (min {array.min()})")
    max_label = array.max() if array.size else 0
    if max_label > MAX_LABEL:  # a value like 1e30 must never be cast to some class
        raise InputError(path, f"label value {max_label:g} is outside the label range 0..{MAX_LABEL}")
    return array.astype(label_dtype(int(max_label)), copy=False)


def _sidecar_path(path: Path) -> Path:
    stem, _ = split_suffix(path)
    return path.with_name(stem + ".json")


def _read_sidecar(path: Path) -> dict[str, Any]:
    from medseg.io.safe_yaml import load_json_file

    sidecar = _sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        data = load_json_file(sidecar, what="JSON sidecar")
    except MedsegError:  # an unreadable sidecar is ignored, as a missing one
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
    time_step_s: float | None = None,
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
        time_step_s: Interval between the volumes of a multi-volume series (the repetition time of fMRI,
            in seconds), stored as a 4D NIfTI's ``pixdim[4]`` as dcm2niix does (ignored otherwise).

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
            _write_nifti(array, volume.geometry, tmps[0], time_step_s=time_step_s)
        elif suffix in ITK_SUFFIXES:
            _write_itk(array, volume.geometry, tmps[0], label_names=label_names if suffix.endswith("nrrd") else None)
        else:
            raise MedsegError(f"{path}: unknown output format {suffix!r}")
        if label_names is not None:
            labels = {str(k): v for k, v in sorted(label_names.items())}
            _write_json(tmps[1], {"labels": labels, "geometry": volume.geometry.to_dict()})
    return path


def _write_nifti(array: np.ndarray, geometry: Geometry, path: Path, *, time_step_s: float | None = None) -> None:
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, geometry.affine, header=header)
    if data.ndim == 4 and time_step_s is not None and np.isfinite(time_step_s) and time_step_s > 0:
        img.header.set_zooms((*img.header.get_zooms()[:3], float(time_step_s)))
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
