"""Annotation conversions for ``medseg convert``, and writers for label / instance / panoptic maps.

``medseg convert`` hands its arguments to :func:`convert_annotation` first; it returns ``None``
when the input is not an annotation, so the generic image converter proceeds.  Annotations are:

* an RTSTRUCT file (``--reference SERIES_DIR``, default: the RTSTRUCT's folder), or a folder
  holding image series and RTSTRUCT(s) -> label NIfTI/NRRD + JSON sidecar of label names;
* a polygon-annotation JSON (``docs/annotations.md``, ``--reference IMAGE``) -> the same;
* a label volume with ``--to rtstruct --reference SERIES_DIR`` -> an RTSTRUCT.

With ``--instances`` the semantic class map is accompanied by an **instance map** (ids ``1..N``,
from ``object_id`` for polygons, from connected components for RTSTRUCT ROIs) and, with
``--panoptic``, by the panoptic map ``class * 1000 + k`` (:mod:`medseg.data.instances`).  Every map
is written on the reference grid with a JSON sidecar (:func:`write_label_maps`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError, OutputExistsError
from medseg.io.cli import ANNOTATION_TARGETS, add_annotation_arguments
from medseg.io.images import split_suffix, write_json_atomic, write_volume
from medseg.io.polygons import POLYGON_FORMAT, polygons_to_labels
from medseg.io.rtstruct import find_rtstructs, is_rtstruct, labels_to_rtstruct, rtstruct_to_labels
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = [
    "ANNOTATION_TARGETS",
    "add_annotation_arguments",
    "convert_annotation",
    "write_label_maps",
]

_SUFFIX = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


# ===================================================================== writers
def write_label_maps(
    semantic: Volume,
    path: PathLike,
    *,
    label_names: Mapping[int, str],
    instances: Volume | None = None,
    instance_table: Mapping[int, Any] | None = None,
    panoptic: bool = False,
    sidecar: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a class map and, optionally, its instance map and panoptic map, with JSON sidecars.

    Files (``path`` = ``<dir>/<stem><suffix>``, suffix ``.nii.gz``/``.nii``/``.nrrd``):

    * ``<stem><suffix>`` + ``<stem>.json``: class map; sidecar ``{"labels": {value: name},
      "geometry": ..., **sidecar}`` (``"channels"`` for a multi-channel ``separate`` volume).
    * ``<stem>_instances<suffix>`` + ``.json``: instance ids; sidecar ``{"instances": {id: {"class",
      "class_name", ...}}, "labels", "geometry"}``.
    * ``<stem>_panoptic<suffix>`` + ``.json``: ``class * 1000 + k``; sidecar ``{"divisor": 1000,
      "segments": {code: {"class", "class_name", "instance"}}, "labels", "geometry"}``.

    All maps share ``semantic``'s grid.  Nothing is written unless every target is free (or
    ``overwrite``); files written by a call that then fails are removed.

    Args:
        semantic: ``(1, X, Y, Z)`` class map or ``(C, X, Y, Z)`` binary channels.
        path: Class map file.
        label_names: ``{class value: name}``.
        instances: ``(1, X, Y, Z)`` instance ids on the same grid.
        instance_table: ``{instance id: class}`` or ``{instance id: {"class": ..., ...}}``.
        panoptic: Also write the panoptic map (needs ``instances``).
        sidecar: Extra keys for the class map's sidecar.
        overwrite: Replace existing files.

    Returns:
        The volume files written.

    Raises:
        OutputExistsError: A target exists and ``overwrite`` is false.
        GeometryError: ``instances`` is on another grid.
        MedsegError: More than 999 instances of one class for the panoptic map.
    """
    from medseg.data.instances import PANOPTIC_DIVISOR, to_panoptic

    path = Path(path)
    stem, suffix = split_suffix(path)
    names = {int(k): str(v) for k, v in label_names.items()}
    labels_json = {str(k): v for k, v in sorted(names.items())}
    geometry = semantic.geometry.to_dict()
    jobs: list[tuple[Volume, Path, dict[str, Any], dict[int, str] | None]] = []
    main = {"labels": labels_json, "geometry": geometry, **dict(sidecar or {})}
    jobs.append((semantic, path, main, names if semantic.channels == 1 else None))
    if instances is not None:
        instances.geometry.require_same(semantic.geometry, what="instance and class maps")
        rows = _instance_rows(instance_table or {}, names)
        jobs.append(
            (
                instances,
                path.with_name(f"{stem}_instances{suffix}"),
                {"instances": {str(k): v for k, v in rows.items()}, "labels": labels_json, "geometry": geometry},
                None,
            )
        )
        if panoptic:
            classes = {k: int(v["class"]) for k, v in rows.items()}
            ids = instances.array[0].astype(np.int64)
            try:
                codes = to_panoptic(ids, classes)
            except ValueError as exc:
                raise MedsegError(f"{path}: cannot write the panoptic map ({exc})") from exc
            segments = _panoptic_segments(codes, ids, rows, PANOPTIC_DIVISOR)
            jobs.append(
                (
                    Volume(array=codes[None], geometry=semantic.geometry, kind="label"),
                    path.with_name(f"{stem}_panoptic{suffix}"),
                    {"divisor": PANOPTIC_DIVISOR, "segments": segments, "labels": labels_json, "geometry": geometry},
                    None,
                )
            )
    elif panoptic:
        raise MedsegError(f"{path}: a panoptic map needs instances")
    for _, target, _, _ in jobs:
        for p in (target, target.with_name(split_suffix(target)[0] + ".json")):
            if p.exists() and not overwrite:
                raise OutputExistsError(p)
    written: list[Path] = []
    try:
        for volume, target, meta, nrrd_names in jobs:
            write_volume(volume, target, overwrite=overwrite, label_names=nrrd_names)
            written.append(target)
            side = target.with_name(split_suffix(target)[0] + ".json")
            write_json_atomic(side, meta, overwrite=True)
            written.append(side)
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return [p for p in written if p.suffix != ".json"]


def _instance_rows(table: Mapping[int, Any], names: Mapping[int, str]) -> dict[int, dict[str, Any]]:
    rows = {}
    for inst, row in sorted(table.items()):
        entry = dict(row) if isinstance(row, Mapping) else {"class": int(row)}
        entry.setdefault("class_name", names.get(int(entry["class"]), f"label_{entry['class']}"))
        rows[int(inst)] = entry
    return rows


def _panoptic_segments(
    codes: np.ndarray, ids: np.ndarray, rows: Mapping[int, dict[str, Any]], divisor: int
) -> dict[str, dict[str, Any]]:
    pairs = np.unique(np.stack([codes.ravel(), ids.ravel()]), axis=1)
    segments = {}
    for code, inst in pairs.T:
        if code == 0:
            continue
        row = rows.get(int(inst), {})
        segments[str(int(code))] = {
            "class": int(code) // divisor,
            "class_name": row.get("class_name"),
            "instance": int(inst),
            **{k: v for k, v in row.items() if k not in ("class", "class_name")},
        }
    return segments


# ======================================================================== CLI
def convert_annotation(args: argparse.Namespace) -> int | None:
    """Run ``medseg convert`` for an annotation input; ``None`` if the input is not one.

    Reads ``args.input``, ``args.output`` (or ``args.output_dir``), ``args.overwrite`` and the options
    added by :func:`add_annotation_arguments`.

    Returns:
        Exit code (0 success, 1 when some RTSTRUCTs of a folder failed), or ``None`` when the
        input is neither an RTSTRUCT, a folder containing one, nor a polygon JSON, and
        ``--to rtstruct`` was not asked for.

    Raises:
        MedsegError: Invalid input or options (the message names the file and the reason).
    """
    source = Path(args.input)
    target = getattr(args, "to", None)
    from medseg.io.paths import refuse_input_overlap

    refuse_input_overlap([_output(args)], [source, getattr(args, "reference", None)], what="output")
    if target == "rtstruct":
        return _labels_to_rtstruct(args, source)
    if source.is_file() and source.name.lower().endswith(".json"):
        return _polygons_to_labels(args, source)
    if source.is_file() and is_rtstruct(source):
        return _rtstructs_to_labels(args, [source], Path(args.reference) if args.reference else source.parent)
    if source.is_dir():
        found = find_rtstructs(source)
        if found:
            return _rtstructs_to_labels(args, found, Path(args.reference) if args.reference else source)
    return None


def _output(args: argparse.Namespace) -> Path:
    """The output positional (``output`` or ``output_dir``, whichever the convert parser defines)."""
    value = getattr(args, "output", None) or getattr(args, "output_dir", None)
    if value is None:
        raise MedsegError("medseg convert: no output given")
    return Path(value)


def _output_file(args: argparse.Namespace, stem: str, *, several: bool = False) -> Path:
    """The label map path: ``OUTPUT`` itself if it names a volume file, else ``OUTPUT/<stem><suffix>``."""
    output = _output(args)
    fmt = getattr(args, "to", None) or "nifti"
    _, suffix = split_suffix(output)
    if suffix in (".nii.gz", ".nii", ".nrrd") and not several:
        return output
    return output / f"{_safe(stem)}{_SUFFIX[fmt]}"


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned or "labels"


def _check_instance_options(args: argparse.Namespace) -> None:
    if getattr(args, "panoptic", False) and not getattr(args, "instances", False):
        raise MedsegError("--panoptic needs --instances")
    if getattr(args, "instances", False) and args.overlap_policy == "separate":
        raise MedsegError("--instances cannot be combined with --overlap-policy separate")


def _rtstructs_to_labels(args: argparse.Namespace, files: list[Path], reference: Path) -> int:
    from medseg.io.paths import refuse_input_overlap

    refuse_input_overlap([_output(args)], [reference], what="output")  # the default reference is a folder
    _check_instance_options(args)
    rois = [r.strip() for r in args.rois.split(",") if r.strip()] if getattr(args, "rois", None) else None
    failures = 0
    for path in files:
        try:
            _one_rtstruct(args, path, reference, rois=rois, several=len(files) > 1)
        except MedsegError as exc:
            if len(files) == 1:
                raise
            failures += 1
            print(f"{path}: FAILED: {exc}", file=sys.stderr)
    if failures:
        print(f"{len(files) - failures} of {len(files)} RTSTRUCT(s) converted, {failures} failed", file=sys.stderr)
    return 1 if failures else 0


def _one_rtstruct(
    args: argparse.Namespace, path: Path, reference: Path, *, rois: list[str] | None, several: bool
) -> None:
    volume = rtstruct_to_labels(
        path,
        reference,
        rois=rois,
        overlap=args.overlap_policy,
        pixel_rule=args.pixel_rule,
        missing="skip" if getattr(args, "partial", False) else "error",
    )
    meta = volume.meta
    names: dict[int, str] = meta["label_names"]
    sidecar: dict[str, Any] = {
        key: meta[key]
        for key in (
            "channels",
            "rois",
            "source_rtstruct",
            "rtstruct_sop_instance_uid",
            "series_uid",
            "study_uid",
            "frame_of_reference_uid",
            "overlap_policy",
            "pixel_rule",
            "warnings",
        )
        if key in meta
    }
    out = _output_file(args, split_suffix(path)[0], several=several)
    instances = table = None
    if getattr(args, "instances", False):
        from medseg.data.instances import connected_instances

        ids, classes = connected_instances(volume.array[0], connectivity=args.connectivity)
        instances = Volume(array=ids[None], geometry=volume.geometry, kind="label")
        table = classes
        sidecar["connectivity"] = args.connectivity
    written = write_label_maps(
        volume,
        out,
        label_names=names,
        instances=instances,
        instance_table=table,
        panoptic=getattr(args, "panoptic", False),
        sidecar=sidecar,
        overwrite=getattr(args, "overwrite", False),
    )
    for note in meta.get("warnings", []):
        print(f"{path.name}: warning: {note}", file=sys.stderr)
    summary = ", ".join(f"{r['name']} ({r['voxels']} voxels)" for r in meta["rois"])
    print(f"{path}: {len(names)} ROI(s) -> {', '.join(str(p) for p in written)}: {summary}")


def _polygons_to_labels(args: argparse.Namespace, path: Path) -> int:
    from medseg.io import load_volume

    _check_instance_options(args)
    if not args.reference:
        raise InputError(path, "polygon annotations need --reference IMAGE (the image they were drawn on)")
    try:
        import json

        head = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read JSON ({exc})") from exc
    if not isinstance(head, dict) or head.get("format") != POLYGON_FORMAT:
        raise InputError(path, f'not a polygon-annotation file (expected "format": "{POLYGON_FORMAT}")')
    reference = load_volume(args.reference)
    result = polygons_to_labels(
        path,
        reference,
        instances=getattr(args, "instances", False),
        overlap=args.overlap_policy,
        pixel_rule=args.pixel_rule,
    )
    names = result.semantic.meta["label_names"]
    sidecar: dict[str, Any] = {"source_annotations": str(path), "reference": str(args.reference)}
    if "channels" in result.semantic.meta:
        sidecar["channels"] = result.semantic.meta["channels"]
    written = write_label_maps(
        result.semantic,
        _output_file(args, split_suffix(path)[0]),
        label_names=names,
        instances=result.instances,
        instance_table=result.instance_table,
        panoptic=getattr(args, "panoptic", False),
        sidecar=sidecar,
        overwrite=getattr(args, "overwrite", False),
    )
    print(f"{path}: {len(names)} label(s), {len(result.instance_table)} object(s) -> {', '.join(map(str, written))}")
    return 0


def _labels_to_rtstruct(args: argparse.Namespace, path: Path) -> int:
    from medseg.io import load_volume

    if not args.reference:
        raise InputError(path, "--to rtstruct needs --reference SERIES_DIR (the DICOM series the labels belong to)")
    labels = load_volume(path, kind="label")
    output = _output(args)
    if output.suffix.lower() != ".dcm":
        output = output / f"{_safe(split_suffix(path)[0])}_rtstruct.dcm"
    labels_to_rtstruct(labels, Path(args.reference), output, overwrite=getattr(args, "overwrite", False))
    print(f"{path} -> {output}")
    return 0
