"""``medseg convert``: every series (and volume file, and DICOM SEG) under an input becomes NIfTI + JSON sidecar.

Each output is ``<name>.nii.gz`` plus ``<name>.json``.  For a DICOM series ``<name>`` comes from
the ``pattern`` (:mod:`medseg.io.pattern`; default ``%i/%t/%s_%d``: patient / study date-time /
``<series number>_<description>``); volume files keep their stem at the top of the output
folder.  Names are sanitised, made unique with a short hash of the series key, and checked to
stay inside the output folder.

* The sidecar holds medseg's keys (series UID and key, modality, description, spacing, shape,
  full geometry, slice issues, source files) and the BIDS-style acquisition fields dcm2niix
  writes (:mod:`medseg.io.bids`: PatientID, StudyDate, RepetitionTime/EchoTime in seconds,
  MagneticFieldStrength, FlipAngle, Manufacturer, ...).
* A multi-volume series (fMRI, diffusion, perfusion, multi-echo) is one 4D NIfTI ``(X, Y, Z, V)``;
  a diffusion series also gets ``<name>.bval`` / ``<name>.bvec`` (:mod:`medseg.io.diffusion`).
* A DICOM SEG becomes a label NIfTI on the grid of the series it references when that series is
  under the input (else on the SEG's own frame geometry), with the segment names in the
  sidecar; overlapping segments follow the overlap policy.

Writes are atomic; existing outputs are refused unless ``overwrite``; a series that cannot be
converted is reported and the others are still converted.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError, OutputExistsError
from medseg.io.cli import add_convert_parser
from medseg.io.dicom import DicomSeries, TiltPolicy, load_series, read_dataset, scan_dicom
from medseg.io.images import VOLUME_SUFFIXES, read_image_file, split_suffix, write_json_atomic, write_volume
from medseg.io.paths import check_output_dir, refuse_input_overlap, require_input
from medseg.io.pattern import DEFAULT_PATTERN, check_pattern, expand_pattern, safe_component
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = ["ConvertItem", "add_convert_parser", "convert", "plan_conversion", "run_convert"]


@dataclass
class ConvertItem:
    """One thing to convert: a DICOM series, a volume file or a DICOM SEG.

    Attributes:
        name: Output name (without suffix, ``/`` between sub-folders), unique within the output folder.
        series: The DICOM series, or ``None``.
        path: The volume file or SEG file, or ``None`` for a DICOM series.
        seg: True when ``path`` is a DICOM SEG.
        reference: For a SEG, the series it references when the input holds it.
    """

    name: str
    series: DicomSeries | None = None
    path: Path | None = None
    seg: bool = False
    reference: DicomSeries | None = None

    @property
    def label(self) -> str:
        """What to call the item in messages."""
        if self.series is not None:
            return f"series {self.series.key or '<empty UID>'} ('{self.series.description}')"
        return str(self.path)


def _header(path: Path) -> Any:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read_dataset(path, stop_before_pixels=True, force=True)
    except Exception:
        return {}


def plan_conversion(
    source: PathLike, *, include_localizers: bool = False, pattern: str = DEFAULT_PATTERN
) -> tuple[list[ConvertItem], list[tuple[Path, str]]]:
    """Find what ``source`` holds (headers only) and name the outputs.

    Args:
        source: A folder (searched recursively), a DICOM file or a NIfTI/NRRD/MHA file.
        include_localizers: Also convert LOCALIZER images.
        pattern: Output names of DICOM series and SEGs (:mod:`medseg.io.pattern`).

    Returns:
        ``(items, skipped)``: the items in a stable order, and ``(file, reason)`` for ignored files.

    Raises:
        InputError: ``source`` does not exist.
        ConfigError: Invalid ``pattern``.
    """
    check_pattern(pattern)
    source = require_input(source)
    if source.is_file() and split_suffix(source)[1] in VOLUME_SUFFIXES:
        return [ConvertItem(name=_safe(split_suffix(source)[0]) or "volume", path=source)], []
    scan = scan_dicom(source, include_localizers=include_localizers)
    items = [ConvertItem(name=_series_name(s, pattern), series=s) for s in scan.series]
    by_uid: dict[str, list[DicomSeries]] = {}
    for series in scan.series:
        by_uid.setdefault(series.uid, []).append(series)
    skipped: list[tuple[Path, str]] = []
    for path, reason in scan.skipped:
        stem, suffix = split_suffix(path)
        if suffix in VOLUME_SUFFIXES:
            items.append(ConvertItem(name=_safe(stem) or "volume", path=path))
        elif reason.startswith("segmentation (DICOM SEG)"):
            items.append(_seg_item(path, pattern, by_uid))
        elif not (suffix == ".raw" and path.with_suffix(".mhd").exists()):
            skipped.append((path, reason))
    return _unique_names(items), skipped


def _seg_item(path: Path, pattern: str, by_uid: dict[str, list[DicomSeries]]) -> ConvertItem:
    from medseg.io.dicom_seg import referenced_series_uid

    uid = referenced_series_uid(path)
    found = [s for s in by_uid.get(uid or "", []) if s.num_volumes == 1] if uid else []
    return ConvertItem(
        name=expand_pattern(pattern, _header(path), first_file=path),
        path=path,
        seg=True,
        reference=found[0] if len(found) == 1 else None,
    )


def convert(
    source: PathLike,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    tilt: TiltPolicy = "error",
    include_localizers: bool = False,
    select: list[str] | None = None,
    log: Any = None,
    pattern: str = DEFAULT_PATTERN,
    overlap: str = "smaller",
    reference: PathLike | None = None,
) -> list[dict[str, Any]]:
    """Convert every DICOM series, DICOM SEG and volume file under ``source`` to NIfTI in ``out_dir``.

    Args:
        source: Folder, DICOM file (image or SEG) or NIfTI/NRRD/MHA file.
        out_dir: Output folder (created).
        overwrite: Replace existing outputs.
        tilt: Gantry-tilt policy for DICOM series (``"error"`` or ``"resample"``).
        include_localizers: Also convert LOCALIZER images.
        select: Only these series (UID or key) / file names.
        log: Called with each finished item's record (see Returns), or ``None``.
        pattern: Output names of DICOM series and SEGs (:mod:`medseg.io.pattern`).
        overlap: Overlapping SEG segments: ``smaller`` (default), ``later``, ``error`` or ``separate``.
        reference: Where to look for the series a SEG references when ``source`` does not hold it
            (a folder, searched recursively).

    Returns:
        One record per item: ``name``, ``status`` (``"done"``/``"failed"``), ``output``,
        ``sidecar``, ``error``, ``seconds``, ``series_key``, ``slice_issues`` (and ``bval``/``bvec``
        for diffusion series).

    Raises:
        InputError: ``source`` is missing or holds nothing convertible.
        ConfigError: Invalid ``pattern``.
    """
    out = Path(out_dir)
    refuse_input_overlap([out], [source, reference], what="output folder")  # also: no re-ingesting earlier outputs
    check_output_dir(out)
    items, skipped = plan_conversion(source, include_localizers=include_localizers, pattern=pattern)
    if select:
        wanted = set(select)
        items = [
            i
            for i in items
            if i.name in wanted
            or (i.series is not None and ({i.series.key, i.series.uid} & wanted))
            or (i.path is not None and i.path.name in wanted)
        ]
    if not items:
        reasons = _summarise(skipped)
        raise InputError(
            Path(source), "no DICOM image series or volume files to convert" + (f" ({reasons})" if reasons else "")
        )
    records = []
    for item in items:
        if item.seg:
            record = _convert_seg(item, out, overwrite=overwrite, overlap=overlap, search=reference)
        else:
            record = _convert_one(item, out, overwrite=overwrite, tilt=tilt)
        records.append(record)
        if log is not None:
            log(record)
    return records


def _targets(out: Path, name: str, *suffixes: str) -> list[Path]:
    """``out/<name><suffix>`` for each suffix, refused when it would leave ``out``."""
    root = out.resolve()
    paths = [out / f"{name}{suffix}" for suffix in suffixes]
    for path in paths:
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise MedsegError(f"{path}: output name escapes the output folder {out}")
    return paths


def _convert_one(item: ConvertItem, out: Path, *, overwrite: bool, tilt: TiltPolicy) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": item.name,
        "source": str(item.path) if item.path is not None else None,
        "series_key": item.series.key if item.series is not None else None,
        "status": "failed",
        "output": None,
        "sidecar": None,
        "error": None,
        "slice_issues": [],
        "seconds": 0.0,
    }
    start = time.perf_counter()
    written: list[Path] = []
    try:
        target, sidecar, bval, bvec = _targets(out, item.name, ".nii.gz", ".json", ".bval", ".bvec")
        for path in (target, sidecar):
            if path.exists() and not overwrite:
                raise OutputExistsError(path)
        if item.series is not None:
            volume = load_series(item.series, tilt=tilt, dtype="native")
        else:
            volume = read_image_file(item.path)  # type: ignore[arg-type]
        info = _sidecar(item, volume)
        diffusion = volume.meta.get("b_values") is not None
        compact = Volume(array=_compact(volume.array), geometry=volume.geometry, kind=volume.kind, source=volume.source)
        try:
            if diffusion:
                from medseg.io.diffusion import write_bval_bvec

                written += write_bval_bvec(volume, out / item.name, overwrite=overwrite)
            tr = info.get("RepetitionTime") if volume.meta.get("num_volumes") else None
            write_volume(compact, target, overwrite=overwrite, time_step_s=tr if isinstance(tr, (int, float)) else None)
            written.append(target)
            write_json_atomic(sidecar, info, overwrite=overwrite)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)  # no half-written set
            raise
        record.update(status="done", output=str(target), sidecar=str(sidecar), slice_issues=info["slice_issues"])
        if diffusion:
            record.update(bval=str(bval), bvec=str(bvec))
        record["source"] = info["source"]
    except MedsegError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # one bad series never stops the others
        text = (str(exc).strip().splitlines() or [""])[0]
        record["error"] = f"{item.label}: unexpected {type(exc).__name__}: {text} (please report this)"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _convert_seg(
    item: ConvertItem, out: Path, *, overwrite: bool, overlap: str, search: PathLike | None
) -> dict[str, Any]:
    """A DICOM SEG -> label NIfTI on its referenced series' grid (else its own frames) + sidecar with segments."""
    from medseg.io.annotations import write_label_maps
    from medseg.io.dicom_seg import find_reference, read_dicom_seg

    assert item.path is not None
    record: dict[str, Any] = {
        "name": item.name,
        "source": str(item.path),
        "series_key": None,
        "status": "failed",
        "output": None,
        "sidecar": None,
        "error": None,
        "slice_issues": [],
        "seconds": 0.0,
    }
    start = time.perf_counter()
    try:
        target, sidecar = _targets(out, item.name, ".nii.gz", ".json")
        reference = None
        if item.reference is not None:
            reference = load_series(item.reference, dtype="native")
        elif search is not None:
            reference = find_reference(item.path, search)
        grid = "referenced series" if reference is not None else "SEG frames"
        try:
            labels = read_dicom_seg(item.path, reference=reference, overlap=overlap)
        except InputError:
            if reference is None:
                raise
            labels, grid = read_dicom_seg(item.path, overlap=overlap), "SEG frames (not on the referenced grid)"
        meta = labels.meta
        names = meta.get("label_names") or {int(k): str(v) for k, v in meta.get("segment_labels", {}).items()}
        extra = {
            "source": str(item.path),
            "grid": grid,
            "reference_source": reference.source if reference is not None and grid == "referenced series" else None,
            "seg_series_uid": meta.get("series_uid"),
            "seg_sop_instance_uid": meta.get("sop_instance_uid"),
            "referenced_series_uid": meta.get("referenced_series_uid"),
            "segmentation_type": meta.get("segmentation_type"),
            "segments": meta.get("segments"),
            "overlap_policy": meta.get("overlap_policy") or (overlap if labels.channels > 1 else None),
        }
        if labels.channels > 1:
            extra["channels"] = [names.get(int(n), str(n)) for n in meta.get("segment_labels", {})]
        write_label_maps(labels, target, label_names=names, sidecar=extra, overwrite=overwrite)
        record.update(status="done", output=str(target), sidecar=str(sidecar))
    except MedsegError as exc:
        record["error"] = str(exc)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _sidecar(item: ConvertItem, volume: Volume) -> dict[str, Any]:
    g = volume.geometry
    meta = volume.meta
    data: dict[str, Any] = {
        "source": volume.source,
        "series_uid": meta.get("series_uid"),
        "series_key": meta.get("series_key"),
        "modality": meta.get("modality"),
        "description": meta.get("series_description"),
        "series_number": meta.get("series_number"),
        "study_uid": meta.get("study_uid"),
        "body_part": meta.get("body_part"),
        "image_type": meta.get("image_type"),
        "shape": list(g.shape),
        "spacing": list(g.spacing),
        "origin_lps": list(g.origin),
        "direction_lps": g.direction.tolist(),
        "affine_ras": g.affine.tolist(),
        "orientation": g.orientation,
        "channels": volume.channels,
        "slice_issues": list(meta.get("slice_issues", [])),
        "gantry_tilt_deg": meta.get("gantry_tilt_deg"),
        "num_files": len(item.series.files) if item.series is not None else 1,
        "slice_files": meta.get("slice_files"),
        "sop_instance_uids": meta.get("sop_instance_uids"),
    }
    if item.series is None and "sidecar" in meta:
        data["input_sidecar"] = meta["sidecar"]
    if meta.get("num_volumes"):
        data["num_volumes"] = meta["num_volumes"]
        data["volumes"] = [{k: v for k, v in entry.items() if k != "files"} for entry in meta["volumes"]]
    if item.series is not None:
        from medseg.io.bids import acquisition_fields

        data.update(acquisition_fields(volume))
    from medseg import __version__

    data["converted_by"] = f"medseg {__version__}"
    return data


def _compact(array: np.ndarray) -> np.ndarray:
    """Store integral images (CT in HU, most MR) as int16/uint16/int32 instead of float32."""
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return array
    lo, hi = float(array.min()), float(array.max())
    for dtype in (np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            converted = array.astype(dtype)
            if np.array_equal(converted, array):
                return converted
            return array
    return array


def _series_name(series: DicomSeries, pattern: str) -> str:
    first = series.files[0] if series.files else None
    name = expand_pattern(pattern, _header(first) if first is not None else {}, first_file=first)
    if "#" in series.key:  # sub-series of one UID (other size, orientation, image type, ...)
        name += "_" + (_safe(series.key.split("#", 1)[1]) or "part")
    return name


def _safe(text: str) -> str:
    return safe_component(text)


def _unique_names(items: list[ConvertItem]) -> list[ConvertItem]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.name] = counts.get(item.name, 0) + 1
    for item in items:
        if counts[item.name] > 1:
            ident = item.series.key if item.series is not None else str(item.path)
            item.name = f"{item.name}_{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
    return items


def _summarise(skipped: list[tuple[Path, str]]) -> str:
    counts: dict[str, int] = {}
    for _, reason in skipped:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _format_record(record: dict[str, Any]) -> str:
    if record["status"] == "done":
        issues = record["slice_issues"]
        note = f"  [{len(issues)} slice issue(s): {'; '.join(issues)}]" if issues else ""
        return f"{record['name']}: {record['output']}  ({record['seconds']:.2f} s){note}"
    return f"{record['name']}: FAILED: {record['error']}"


def _print_record(record: dict[str, Any]) -> None:
    print(_format_record(record), file=sys.stdout if record["status"] == "done" else sys.stderr)


def run_convert(args: argparse.Namespace) -> int:
    """Handler of ``medseg convert`` (parser: :func:`medseg.io.cli.add_convert_parser`): exit 1 if any failed."""
    records = convert(
        args.input,
        args.output_dir,
        overwrite=args.overwrite,
        tilt=args.tilt,
        include_localizers=args.include_localizers,
        select=args.series,
        log=_print_record,
        pattern=getattr(args, "pattern", None) or DEFAULT_PATTERN,
        overlap=getattr(args, "overlap_policy", None) or "smaller",
        reference=getattr(args, "reference", None),
    )
    failed = sum(r["status"] != "done" for r in records)
    print(f"{len(records) - failed} converted to {args.output_dir}, {failed} failed")
    return 1 if failed else 0
