"""Stack the frames of a discovered DICOM series into a volume with exact geometry.

Rules (each failure is an :class:`~medseg.errors.InputError` naming a file):

* Every frame needs ImagePositionPatient, ImageOrientationPatient and PixelSpacing; all
  frames share orientation, size and pixel spacing.
* Frames are sorted by their position along the slice normal ``row x col`` (never by
  InstanceNumber).  Frames at the same position are *duplicates*: identical pixels are
  dropped (recorded in ``meta["slice_issues"]``), different pixels are an error.
* The slice spacing is ``(last - first) / (n - 1)`` along the normal.  If a slice is more
  than 1 % of a slice step off that uniform grid the series is rejected: gaps that are
  whole multiples of the smallest step are reported as missing slices, anything else as
  non-uniform spacing.  Smaller deviations (rounded positions) are tolerated and recorded.
* Slices whose origins drift in-plane along the stack (gantry tilt, sheared stacks) are
  rejected by default; ``tilt="resample"`` shifts every slice in-plane onto the
  orthogonal grid through the first slice with linear interpolation (as dcm2niix does),
  filling voxels from outside the field of view with the series minimum; shifts within
  1e-3 pixel of a whole pixel are snapped to it (header rounding), so integer shears are exact.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medseg.errors import InputError
from medseg.io.dicom import DicomFrame, DicomSeries, OutputDtype, PixelLayout, TiltPolicy
from medseg.io.volume import Geometry, Volume

__all__ = [
    "ORIENTATION_ATOL",
    "PIXEL_SPACING_ATOL",
    "PIXEL_SPACING_RTOL",
    "SLICE_GRID_TOLERANCE",
    "decode_file",
    "stack_series",
    "stack_volumes",
]

#: Frames whose direction cosines / pixel spacings differ by less than this are one stack (the
#: DICOM SEG writer normalises such jitter with the same tolerances before highdicom sees it).
ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-4
PIXEL_SPACING_ATOL = 1e-5

_DUPLICATE_MM = 1e-3  # positions closer than this along the normal are the same slice
_GRID_TOLERANCE = 0.01  # fraction of a slice step a slice may be off the uniform grid
_SILENT_MM = 1e-3  # deviations below this are rounding, not worth a slice issue
_THREADED_MIN_FILES = 16  # read uncompressed series of at least this many files with threads
_TILT_FRACTION = 0.01  # in-plane drift per slice, as a fraction of the pixel size, that is tilt
SLICE_GRID_TOLERANCE = _GRID_TOLERANCE


def stack_series(
    series: DicomSeries,
    *,
    tilt: TiltPolicy = "error",
    source: Path | None = None,
    dtype: OutputDtype = "float32",
) -> Volume:
    """Decode and stack a series (see the module docstring for the rules).

    Args:
        series: From :func:`medseg.io.dicom.discover_series`.
        tilt: ``"error"`` or ``"resample"`` for gantry-tilted stacks.
        source: Path recorded as the volume's source (default: the series' common folder).
        dtype: ``"float32"`` (default), or ``"native"``: int16/uint16/int32 when every slice has
            RescaleSlope 1 and an integral intercept (CT in HU, most MR; what SimpleITK and
            dcm2niix return), float32 otherwise.

    Returns:
        ``Volume`` with a ``(1, X, Y, Z)`` array, or ``(V, X, Y, Z)`` for a multi-volume series
        (:func:`stack_volumes`).
    """
    if not series.frames:
        raise InputError(source or series.key, "series has no image frames")
    if series.num_volumes > 1:
        return stack_volumes(series, tilt=tilt, source=source, dtype=dtype)
    label = series.key or "<empty UID>"
    frames = series.frames
    _check_geometry_tags(frames)
    _check_consistent(frames, label)
    iop = np.asarray(frames[0].orientation, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise InputError(frames[0].path, f"ImageOrientationPatient {tuple(iop)} is not two orthogonal unit vectors")
    normal = normal / norm
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = sorted(
        range(len(frames)),
        key=lambda i: (
            round(float(along[i]), 3),
            frames[i].instance or 0,
            str(frames[i].path),
            frames[i].frame,
            frames[i].tile or 0,
        ),
    )
    frames = [frames[i] for i in order]
    positions, along = positions[order], along[order]

    out_dtype = _output_dtype(series, frames) if dtype == "native" else np.dtype(np.float32)
    pixels = _decode_frames(series, frames, out_dtype)  # (n, rows, cols), rescaled
    issues: list[str] = []
    keep = _drop_duplicates(frames, along, pixels, label, issues)
    if len(keep) < len(frames):  # (copying the pixels only when something was dropped)
        frames = [frames[i] for i in keep]
        positions, along, pixels = positions[keep], along[keep], pixels[keep]

    row_spacing, col_spacing = frames[0].pixel_spacing  # type: ignore[misc]
    slice_spacing = _slice_spacing(series, frames, along, label, issues)
    offsets = _in_plane_offsets(positions, normal)
    max_offset = float(np.max(np.linalg.norm(offsets, axis=1))) if len(offsets) else 0.0
    tilt_deg = 0.0
    if max_offset > _TILT_FRACTION * min(row_spacing, col_spacing):
        tilt_deg = _tilt_angle(offsets, along)
        where = f"{frames[0].path} .. {frames[-1].path}"
        if tilt == "error":
            raise InputError(
                where,
                f"series {label} has gantry tilt / sheared slices ({tilt_deg:.2f} degrees, slice origins drift "
                f"{max_offset:.2f} mm in-plane); load it with tilt='resample' (medseg convert --tilt resample) "
                "to resample onto an orthogonal grid",
            )
        pixels = _resample_tilt(pixels, offsets, row_dir, col_dir, row_spacing, col_spacing)
        issues.append(
            f"gantry tilt of {tilt_deg:.2f} degrees corrected: slices shifted in-plane by up to {max_offset:.2f} mm "
            "(linear interpolation; voxels from outside the field of view set to the series minimum)"
        )
    geometry = Geometry.from_itk(
        shape=(frames[0].cols, frames[0].rows, len(frames)),
        spacing=(col_spacing, row_spacing, slice_spacing),
        origin=tuple(positions[0]),  # type: ignore[arg-type]
        direction=np.stack([row_dir, col_dir, normal], axis=1),
    )
    array = pixels.transpose(2, 1, 0)[None]  # (1, X=columns, Y=rows, Z) view, Fortran-contiguous
    meta: dict[str, Any] = {
        "series_uid": series.uid,
        "series_key": series.key,
        "modality": series.modality,
        "series_description": series.description,
        "series_number": series.series_number,
        "study_uid": series.study_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "body_part": series.body_part,
        "image_type": list(series.image_type),
        "sop_class_uid": series.sop_class_uid,
        "sop_instance_uids": [f.sop_uid for f in frames],
        "frame_numbers": [f.frame + 1 if series.multiframe else None for f in frames],
        "slice_files": [str(f.path) for f in frames],
        "slice_issues": issues,
        "gantry_tilt_deg": tilt_deg,
    }
    src = source if source is not None else _common_folder(series.files)
    return Volume(array=array, geometry=geometry, kind="image", source=str(src), meta=meta)


def stack_volumes(
    series: DicomSeries,
    *,
    tilt: TiltPolicy = "error",
    source: Path | None = None,
    dtype: OutputDtype = "float32",
) -> Volume:
    """Stack a multi-volume series (fMRI, diffusion, perfusion, multi-echo) into one 4D volume.

    Each volume (the frames with one :attr:`DicomFrame.volume` index, numbered in discovery's
    numeric order: echo, temporal position, acquisition, instance number) is stacked with the
    rules of :func:`stack_series`; all volumes must land on the same grid (1e-3 mm).

    Returns:
        ``Volume`` with a ``(V, X, Y, Z)`` array: channel ``v`` is volume ``v``. ``meta`` is the
        first volume's (its ``sop_instance_uids``/``slice_files`` in Z order) plus
        ``num_volumes``, ``volumes`` (per volume: ``index``, ``acquisition``, ``temporal``, ``echo``,
        ``b_value``, ``gradient_lps``, ``files``) and, for diffusion, ``b_values`` and
        ``gradients_lps`` (unit vectors in LPS patient axes; ``[0, 0, 0]`` where none).
    """
    by_volume: dict[int, list[DicomFrame]] = defaultdict(list)
    for frame in series.frames:
        by_volume[frame.volume].append(frame)
    label = series.key or "<empty UID>"
    out: np.ndarray | None = None
    first: Volume | None = None
    volumes: list[dict[str, Any]] = []
    issues: list[str] = []
    for index in range(series.num_volumes):
        frames = by_volume.get(index)
        if not frames:
            raise InputError(source or label, f"series {label}: volume {index + 1} has no frames")
        part = dataclasses.replace(
            series, frames=[dataclasses.replace(f, volume=0) for f in frames], files=sorted({f.path for f in frames})
        )
        volume = stack_series(part, tilt=tilt, source=source, dtype=dtype)
        if first is None:
            first = volume
            out = _volumes_array(series.num_volumes, volume.geometry.shape, volume.array.dtype)
        elif not volume.geometry.allclose(first.geometry, atol=1e-3):
            raise InputError(
                frames[0].path,
                f"series {label}: volume {index + 1} is on another grid ({volume.geometry.describe()}) than "
                f"volume 1 ({first.geometry.describe()})",
            )
        assert out is not None
        if volume.array.dtype != out.dtype:  # e.g. another rescale intercept: widen once
            wider = _volumes_array(series.num_volumes, first.geometry.shape, np.result_type(out.dtype, np.float32))
            wider[:index] = out[:index]
            out = wider
        out[index] = volume.array[0]
        issues += [f"volume {index + 1}: {issue}" for issue in volume.meta.get("slice_issues", [])]
        head = frames[0]
        volumes.append(
            {
                "index": index,
                "acquisition": head.acquisition or None,
                "temporal": head.temporal or None,
                "echo": head.echo or None,
                "b_value": head.b_value,
                "gradient_lps": list(head.gradient) if head.gradient is not None else None,
                "files": [str(p) for p in part.files],
            }
        )
    assert first is not None and out is not None
    meta = dict(first.meta)
    meta["slice_issues"] = issues
    meta["num_volumes"] = series.num_volumes
    meta["volumes"] = volumes
    if any(v["b_value"] is not None for v in volumes):
        meta["b_values"] = [float(v["b_value"] or 0.0) for v in volumes]
        meta["gradients_lps"] = [v["gradient_lps"] or [0.0, 0.0, 0.0] for v in volumes]
    src = source if source is not None else _common_folder(series.files)
    return Volume(array=out, geometry=first.geometry, kind="image", source=str(src), meta=meta)


def _volumes_array(count: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``(V, X, Y, Z)`` view of an ``(X, Y, Z, V)`` Fortran array: each volume contiguous, X fastest (NIfTI order)."""
    return np.moveaxis(np.empty((*shape, count), dtype=dtype, order="F"), -1, 0)


# ----------------------------------------------------------------------------- checks
def _check_geometry_tags(frames: list[DicomFrame]) -> None:
    for frame in frames:
        for name, value in (
            ("ImagePositionPatient", frame.position),
            ("ImageOrientationPatient", frame.orientation),
            ("PixelSpacing", frame.pixel_spacing),
        ):
            if value is None:
                where = f" (frame {frame.frame + 1})" if frame.frame else ""
                raise InputError(
                    frame.path, f"missing or invalid {name}{where}; cannot place the image in patient space"
                )
        if min(frame.pixel_spacing) <= 0:  # type: ignore[arg-type]
            raise InputError(frame.path, f"PixelSpacing {frame.pixel_spacing} is not positive")


def _check_consistent(frames: list[DicomFrame], label: str) -> None:
    first = frames[0]
    iop = np.asarray(first.orientation)
    for frame in frames[1:]:
        if (frame.rows, frame.cols) != (first.rows, first.cols):
            raise InputError(
                frame.path,
                f"series {label} mixes slice sizes {first.rows}x{first.cols} ({first.path.name}) and "
                f"{frame.rows}x{frame.cols}",
            )
        if not np.allclose(np.asarray(frame.orientation), iop, atol=ORIENTATION_ATOL):
            raise InputError(frame.path, f"series {label} mixes slice orientations")
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=PIXEL_SPACING_ATOL):  # type: ignore[arg-type]
            raise InputError(
                frame.path, f"series {label} mixes pixel spacings {first.pixel_spacing} and {frame.pixel_spacing}"
            )


def _drop_duplicates(
    frames: list[DicomFrame], along: np.ndarray, pixels: np.ndarray, label: str, issues: list[str]
) -> list[int]:
    keep = [0]
    dropped: dict[tuple[Path, Path], list[float]] = defaultdict(list)
    for i in range(1, len(frames)):
        j = keep[-1]
        if along[i] - along[j] >= _DUPLICATE_MM:
            keep.append(i)
            continue
        if not np.array_equal(pixels[i], pixels[j]):
            raise InputError(
                frames[i].path,
                f"duplicate slice position {along[i]:.3f} mm in series {label} with different pixels "
                f"(also in {_frame_name(frames[j])}); the series mixes acquisitions",
            )
        dropped[(frames[i].path, frames[j].path)].append(float(along[i]))
    for (dup, kept), where in dropped.items():
        if len(where) == 1:
            issues.append(f"duplicate slice at {where[0]:.3f} mm: {dup} is identical to {kept} and was dropped")
        else:
            issues.append(
                f"{len(where)} duplicate slices ({where[0]:.3f} to {where[-1]:.3f} mm): the frames of {dup} are "
                f"identical to those of {kept} and were dropped"
            )
    return keep


def _slice_spacing(
    series: DicomSeries, frames: list[DicomFrame], along: np.ndarray, label: str, issues: list[str]
) -> float:
    n = len(along)
    if n == 1:
        spacing = series.slice_thickness or 1.0
        issues.append(f"single slice: slice spacing {spacing:g} mm taken from SliceThickness")
        return float(spacing)
    step = float(along[-1] - along[0]) / (n - 1)
    grid = along[0] + step * np.arange(n)
    deviation = float(np.max(np.abs(along - grid)))
    if deviation <= _GRID_TOLERANCE * step:
        if deviation > _SILENT_MM:
            issues.append(
                f"slice positions deviate up to {deviation:.4f} mm from a uniform {step:.4f} mm grid (tolerated)"
            )
        return step
    steps = np.diff(along)
    smallest = float(np.min(steps))
    ratios = steps / smallest
    gaps = np.flatnonzero(np.round(ratios) >= 2)
    if len(gaps) and np.all(np.abs(ratios - np.round(ratios)) < 0.05):
        missing = int(np.sum(np.round(ratios[gaps]) - 1))
        first_gap = int(gaps[0])
        raise InputError(
            frames[first_gap + 1].path,
            f"series {label} has {missing} missing slice(s) (non-uniform slice spacing): a gap of "
            f"{steps[first_gap]:.3f} mm after {_frame_name(frames[first_gap])} where {smallest:.3f} mm is expected",
        )
    raise InputError(
        _common_folder([f.path for f in frames]),
        f"series {label} has non-uniform slice spacing ({smallest:.3f}-{float(np.max(steps)):.3f} mm between "
        "slices): missing slices or variable spacing",
    )


def _in_plane_offsets(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """``(n, 3)`` displacement of each slice origin from the normal line through the first."""
    delta = positions - positions[0]
    return delta - np.outer(delta @ normal, normal)


def _tilt_angle(offsets: np.ndarray, along: np.ndarray) -> float:
    dz = float(along[-1] - along[0])
    if dz <= 0:
        return 90.0
    return float(np.degrees(np.arctan2(float(np.linalg.norm(offsets[-1])), dz)))


def _resample_tilt(
    pixels: np.ndarray,
    offsets: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    row_spacing: float,
    col_spacing: float,
) -> np.ndarray:
    """Shift each ``(rows, cols)`` slice so its origin lies on the normal through the first slice."""
    from scipy import ndimage

    fill = float(pixels.min())
    out = np.empty_like(pixels)
    for k in range(pixels.shape[0]):
        shift_cols = _snap(float(offsets[k] @ row_dir) / col_spacing)
        shift_rows = _snap(float(offsets[k] @ col_dir) / row_spacing)
        out[k] = ndimage.shift(
            pixels[k], (shift_rows, shift_cols), order=1, mode="constant", cval=fill, prefilter=False
        )
    return out


def _snap(shift: float) -> float:
    """Whole-pixel shifts written with rounded header values stay whole (no needless interpolation)."""
    nearest = round(shift)
    return float(nearest) if abs(shift - nearest) < 1e-3 else shift


# ----------------------------------------------------------------------------- pixels
def _output_dtype(series: DicomSeries, frames: list[DicomFrame]) -> np.dtype:
    """Smallest integer dtype holding every rescaled value the headers allow, else float32."""
    if any(f.slope != 1.0 or f.intercept != int(f.intercept) for f in frames):
        return np.dtype(np.float32)
    lo, hi = np.inf, -np.inf
    for path in {f.path for f in frames}:
        layout = series.layouts.get(path)
        options = layout.options if layout is not None else {}
        if "bits_stored" not in options:
            return np.dtype(np.float32)
        bits, signed = int(options["bits_stored"]), bool(options["pixel_representation"])
        lo = min(lo, -(2 ** (bits - 1)) if signed else 0)
        hi = max(hi, 2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    intercepts = [f.intercept for f in frames]
    lo, hi = lo + min(intercepts), hi + max(intercepts)
    for candidate in (np.int16, np.uint16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def _decode_frames(series: DicomSeries, frames: list[DicomFrame], dtype: np.dtype) -> np.ndarray:
    """``(n, rows, cols)`` rescaled pixels of ``frames`` in the given order, as ``dtype``; each file decoded once.

    Uncompressed files are read by a few threads (file reads and numpy copies release the
    GIL); compressed files are decoded one after the other (their decoders gain nothing).
    """
    by_file: dict[Path, list[int]] = defaultdict(list)
    for index, frame in enumerate(frames):
        by_file[frame.path].append(index)
    out = np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=dtype)
    integral = np.issubdtype(dtype, np.integer)

    def fill(item: tuple[Path, list[int]]) -> None:
        path, indices = item
        data = decode_file(path, series.layouts.get(path))  # (frames, rows, cols)
        if frames[indices[0]].tile is not None:
            from medseg.io.mosaic import untile_tiles

            data = untile_tiles(data[0], tile_rows=frames[indices[0]].rows, tile_cols=frames[indices[0]].cols)
        for index in indices:
            frame = frames[index]
            plane = data[frame.tile if frame.tile is not None else frame.frame]
            if plane.shape != (frame.rows, frame.cols):
                raise InputError(path, f"decoded frame has shape {plane.shape}, header says {frame.rows}x{frame.cols}")
            target = out[index]
            if integral:  # slope 1, integral intercept, range checked in _output_dtype
                np.copyto(target, plane, casting="unsafe")
                if frame.intercept:
                    target += int(frame.intercept)
            else:
                np.copyto(target, plane, casting="unsafe")  # stored -> float32, no float64 temporaries
                if frame.slope != 1.0:
                    target *= np.float32(frame.slope)
                if frame.intercept:
                    target += np.float32(frame.intercept)

    items = list(by_file.items())
    if len(items) >= _THREADED_MIN_FILES and all(_is_native(series.layouts.get(p)) for p, _ in items):
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for _ in pool.map(fill, items):
                pass
    else:
        for item in items:
            fill(item)
    return out


def _is_native(layout: PixelLayout | None) -> bool:
    if layout is None or layout.value_offset is None or not layout.transfer_syntax:
        return False
    return not pydicom.uid.UID(layout.transfer_syntax).is_compressed


def decode_file(path: Path, layout: PixelLayout | None) -> np.ndarray:
    """Decode all frames of one DICOM file.

    Reads the pixel data straight from the byte offset found during discovery and hands
    it to pydicom's decoder for the file's transfer syntax (native, RLE, JPEG, JPEG-LS,
    JPEG 2000 through the installed plugins); falls back to a full ``dcmread`` when the
    offset is unknown.

    Returns:
        ``(frames, rows, cols)`` array in the stored dtype (rescale not applied).

    Raises:
        InputError: Truncated or undecodable pixel data, or colour images.
    """
    try:
        if layout is not None and layout.value_offset is not None:
            array = _decode_at_offset(path, layout)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
            if "PixelData" not in ds:
                raise InputError(path, "DICOM without pixel data")
            array = ds.pixel_array
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            if samples > 1:
                raise InputError(path, f"colour images ({samples} samples per pixel) are not supported")
            if frames == 1:
                array = array[None]
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types for bad pixel data
        syntax = _syntax_name(layout)
        raise InputError(path, f"cannot decode pixel data{syntax}: {type(exc).__name__}: {exc}") from exc
    return array


def _decode_at_offset(path: Path, layout: PixelLayout) -> np.ndarray:
    from pydicom.pixels import get_decoder

    options = dict(layout.options)
    if options.get("samples_per_pixel", 1) > 1:
        raise InputError(path, f"colour images ({options['samples_per_pixel']} samples per pixel) are not supported")
    ts = pydicom.uid.UID(layout.transfer_syntax)
    size = path.stat().st_size
    assert layout.value_offset is not None
    if layout.value_length is not None:
        expected = _native_length(options)
        if ts.is_compressed:
            expected = 0
        if layout.value_length < expected or layout.value_offset + layout.value_length > size:
            available = max(0, min(layout.value_length, size - layout.value_offset))
            raise InputError(
                path, f"truncated pixel data: {available} bytes for {expected or layout.value_length} expected"
            )
    with path.open("rb") as fh:
        fh.seek(layout.value_offset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array, _ = get_decoder(ts).as_array(fh, **options)
    n_frames = int(options.get("number_of_frames", 1))
    return array[None] if n_frames == 1 else array


def _native_length(options: dict[str, Any]) -> int:
    bits = int(options["bits_allocated"])
    count = int(options["rows"]) * int(options["columns"]) * int(options.get("number_of_frames", 1))
    count *= int(options.get("samples_per_pixel", 1))
    return (count * bits + 7) // 8


def _syntax_name(layout: PixelLayout | None) -> str:
    if layout is None or not layout.transfer_syntax:
        return ""
    try:
        return f" ({pydicom.uid.UID(layout.transfer_syntax).name})"
    except Exception:
        return f" ({layout.transfer_syntax})"


def _frame_name(frame: DicomFrame) -> str:
    if frame.tile is not None:
        return f"{frame.path} (mosaic tile {frame.tile + 1})"
    if frame.frame:
        return f"{frame.path} (frame {frame.frame + 1})"
    return str(frame.path)


def _common_folder(paths: list[Path]) -> Path:
    if not paths:
        return Path(".")
    if len(paths) == 1:
        return paths[0]
    import os

    return Path(os.path.commonpath([str(p) for p in paths]))
