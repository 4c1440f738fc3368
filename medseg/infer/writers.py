"""The label outputs of one segmented series, shared by ``medseg predict`` and ``medseg batch``.

One prediction can be written as any of four *outputs*:

========  =============================================  =============================================
kind      batch file (in the series folder)              predict file (in ``--out``)
========  =============================================  =============================================
nifti     ``segmentation.nii.gz`` + ``segmentation.json`` ``<case><suffix>`` + ``<case>.json``
seg       ``seg.dcm`` (DICOM SEG)                        ``<case>_seg.dcm``
rtstruct  ``rtstruct.dcm`` (RTSTRUCT)                    ``<case>_rtstruct.dcm``
json      ``volumes.json`` (voxels and mL per class)     ``<case>_volumes.json``
========  =============================================  =============================================

Outputs are **independent**: :func:`write_outputs` writes each one atomically in its own
``try`` and returns an :class:`OutputResult` per kind, so a SEG that highdicom refuses does not
cost the NIfTI, the volumes or the RTSTRUCT of the same series.  The DICOM outputs need the
headers of the source slices (:func:`source_headers`); for a source that is not a DICOM series,
or whose UIDs were blanked by anonymisation, they fail with that reason and the others are written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import MedsegError
from medseg.io.images import write_json_atomic, write_volume
from medseg.io.volume import Volume

__all__ = [
    "DICOM_OUTPUTS",
    "OUTPUTS",
    "OutputNames",
    "OutputResult",
    "parse_output_list",
    "source_headers",
    "volumes_ml",
    "write_outputs",
]

#: Every output kind, in the order they are written.
OUTPUTS = ("nifti", "seg", "rtstruct", "json")
#: Outputs that reference the source DICOM instances.
DICOM_OUTPUTS = frozenset({"seg", "rtstruct"})


def parse_output_list(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"nifti,seg"`` (or an iterable) -> de-duplicated kinds in the given order.

    Raises:
        ValueError: Unknown kinds or an empty list (the message lists the valid ones).
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    items = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    bad = [p for p in items if p not in OUTPUTS]
    if bad or not items:
        raise ValueError(f"unknown output(s) {bad or '(none)'}; choose from {','.join(OUTPUTS)}")
    return items


@dataclass(frozen=True)
class OutputNames:
    """File names of the outputs inside one folder.

    Attributes:
        nifti: The label volume (its suffix picks the format; the label-name sidecar is ``<stem>.json``).
        seg: DICOM SEG file.
        rtstruct: RTSTRUCT file.
        json: Volumes per class.
    """

    nifti: str = "segmentation.nii.gz"
    seg: str = "seg.dcm"
    rtstruct: str = "rtstruct.dcm"
    json: str = "volumes.json"

    @classmethod
    def for_case(cls, case_id: str, *, suffix: str = ".nii.gz") -> OutputNames:
        """``predict``'s names: ``<case><suffix>``, ``<case>_seg.dcm``, ``_rtstruct.dcm``, ``_volumes.json``."""
        return cls(f"{case_id}{suffix}", f"{case_id}_seg.dcm", f"{case_id}_rtstruct.dcm", f"{case_id}_volumes.json")

    def files(self, kind: str) -> list[str]:
        """The files one output kind consists of (the NIfTI has its label-name sidecar)."""
        if kind == "nifti":
            from medseg.io import split_suffix

            stem, _ = split_suffix(Path(self.nifti))
            return [self.nifti, f"{stem}.json"]
        return [str(getattr(self, kind))]


@dataclass
class OutputResult:
    """What happened to one output kind.

    Attributes:
        kind: ``nifti``, ``seg``, ``rtstruct`` or ``json``.
        files: Files written (names relative to the folder); empty when it failed.
        error: Why it failed (``None``: written).
        seconds: Time spent writing it.
    """

    kind: str
    files: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """The output was written."""
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """``{"files": [...]}`` or ``{"error": "..."}`` (the manifest's ``output_status`` entry)."""
        return {"files": list(self.files)} if self.ok else {"error": str(self.error)}


def volumes_ml(label: Volume, names: Mapping[int, str]) -> dict[str, dict[str, Any]]:
    """Voxels and millilitres per class (background excluded), keyed by class name.

    Args:
        label: ``(1, X, Y, Z)`` label volume.
        names: ``{label value: name}``; values without a name are called ``label <v>``.
    """
    voxel_ml = abs(float(np.linalg.det(label.geometry.affine[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(label.array).ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    out: dict[str, dict[str, Any]] = {}
    for value in range(1, len(counts)):
        name = names.get(value, f"label {value}")
        out[name] = {
            "label": value,
            "voxels": int(counts[value]),
            "volume_ml": round(float(counts[value]) * voxel_ml, 4),
        }
    return out


def dicom_source_problem(image: Volume | None) -> str | None:
    """Why DICOM outputs cannot reference ``image`` (``None``: they can)."""
    if image is None:
        return "no source image"
    meta = image.meta
    if not meta.get("slice_files"):
        return f"needs a DICOM series as input ({image.source or 'the input'} is not one)"
    if not (meta.get("series_uid") and meta.get("study_uid")):
        return (
            "the source series has an empty SeriesInstanceUID/StudyInstanceUID (anonymised by blanking UIDs?); a DICOM"
            " SEG/RTSTRUCT must reference its source by UID - use the nifti/json outputs for this series"
        )
    volumes = int(meta.get("num_volumes", 1) or 1)
    if volumes > 1:
        return (
            f"the source is a multi-volume series ({volumes} volumes); a DICOM SEG/RTSTRUCT references the one volume"
            " it was segmented from: segment one volume ('<UID>#vol=<n>')"
        )
    return None


def source_headers(image: Volume) -> list[Any]:
    """Headers (no pixels) of the DICOM slices ``image`` was stacked from, one per SOP instance, in slice order.

    Args:
        image: A volume read from a DICOM series (``meta["slice_files"]`` and ``meta["sop_instance_uids"]``).

    Raises:
        MedsegError: The volume does not come from DICOM files, or a file cannot be read again.
    """
    from medseg.io.dicom import read_dataset

    files = [str(f) for f in image.meta.get("slice_files", []) if f]
    if not files:
        raise MedsegError(f"{image.source}: not read from DICOM files; no source headers for SEG/RTSTRUCT")
    wanted = {str(u) for u in image.meta.get("sop_instance_uids", []) if u}
    headers: dict[str, Any] = {}
    for path in dict.fromkeys(files):  # a multi-frame file or a mosaic holds several slices
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except Exception as exc:
            raise MedsegError(f"{path}: cannot re-read the source header ({type(exc).__name__}: {exc})") from exc
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if (not wanted or uid in wanted) and uid not in headers:
            headers[uid] = ds
    return list(headers.values())


def _write_rtstruct(
    label: Volume,
    image: Volume,
    sources: Sequence[Any],
    path: Path,
    names: Mapping[int, str],
    description: str,
    *,
    overwrite: bool,
    series_name: str | None = None,
) -> None:
    """RTSTRUCT through :func:`medseg.io.rtstruct.labels_to_rtstruct`, referencing the loaded series.

    Refusals (blanked UIDs, a label off the series grid) raise :class:`~medseg.errors.ExportError` naming
    the series, like the SEG writer's.
    """
    from medseg.errors import ExportError, GeometryError, InputError
    from medseg.io.dicom_seg import series_label
    from medseg.io.rtstruct import ReferenceSeries, labels_to_rtstruct

    if not sources:
        raise MedsegError(f"{path.name}: no source headers to reference")
    header = sources[0]
    sop_class = str(header.get("SOPClassUID", "") or "")
    if not sop_class and getattr(header, "file_meta", None) is not None:
        sop_class = str(header.file_meta.get("MediaStorageSOPClassUID", "") or "")
    reference = ReferenceSeries(
        folder=Path(str(getattr(header, "filename", "") or ".")).parent,
        image=image,
        header=header,
        sop_class_uid=sop_class,
        frame_of_reference_uid=str(header.get("FrameOfReferenceUID", "") or ""),
    )
    try:
        labels_to_rtstruct(
            label,
            reference,
            path,
            label_names={k: v for k, v in names.items() if k != 0},
            series_description=description,
            include_empty=True,  # every class, in model order, even without contours (an empty set is invalid DICOM)
            overwrite=overwrite,
        )
    except (InputError, GeometryError) as exc:
        reason = exc.reason if isinstance(exc, InputError) else str(exc)
        raise ExportError(series_name or series_label(header), "RTSTRUCT", reason) from exc


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory ({exc})"
    return f"unexpected {type(exc).__name__}: {exc}"


def write_outputs(
    label: Volume,
    folder: Path,
    *,
    outputs: Iterable[str],
    names: OutputNames | None = None,
    label_names: Mapping[int, str],
    image: Volume | None = None,
    sources: Sequence[Any] | None = None,
    seg_type: Literal["binary", "labelmap"] = "binary",
    description: str = "",
    report: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    series_name: str | None = None,
) -> dict[str, OutputResult]:
    """Write the requested outputs of one segmented series, each independently and atomically.

    Args:
        label: ``(1, X, Y, Z)`` label volume on the input grid.
        folder: Output folder (exists).
        outputs: Kinds to write (any of :data:`OUTPUTS`; written in that order).
        names: File names (default: the batch names, :class:`OutputNames`).
        label_names: ``{value: name}`` of the model's classes (0 = background).
        image: The input volume (RTSTRUCT geometry; DICOM provenance in ``meta``).
        sources: Source slice headers for SEG/RTSTRUCT (default: read with :func:`source_headers`
            when a DICOM output is asked for).
        seg_type: DICOM SEG encoding.
        description: Source SeriesDescription (the new series are called ``medseg SEG <description>`` ...).
        report: Extra fields of ``volumes.json`` (series identity, model).
        overwrite: Replace existing files (otherwise an existing file fails that output).
        series_name: How errors name the source series (batch: its pseudonymised label; default: the
            SEG writer's own label from the source header).

    Returns:
        ``{kind: OutputResult}`` for every requested kind; a failed kind leaves no file behind.
    """
    import time

    names = names or OutputNames()
    wanted = [kind for kind in OUTPUTS if kind in set(outputs)]
    label_names = {int(k): str(v) for k, v in label_names.items()}
    results: dict[str, OutputResult] = {}
    dicom_problem: str | None = None
    if DICOM_OUTPUTS & set(wanted) and sources is None:
        dicom_problem = dicom_source_problem(image)
        if dicom_problem is None and image is not None:
            try:
                sources = source_headers(image)
            except MedsegError as exc:
                dicom_problem = str(exc)
    for kind in wanted:
        t0 = time.perf_counter()
        target = folder / str(getattr(names, kind))
        try:
            if kind in DICOM_OUTPUTS and dicom_problem is not None:
                raise MedsegError(dicom_problem)
            if kind == "nifti":
                write_volume(label, target, label_names=label_names, overwrite=overwrite)
            elif kind == "seg":
                from medseg.io.dicom_seg import write_dicom_seg

                write_dicom_seg(
                    label,
                    list(sources or []),
                    target,
                    label_names=label_names,
                    segmentation_type=seg_type,
                    series_description=f"medseg SEG {description}".strip()[:64],
                    overwrite=overwrite,
                    series=series_name,
                )
            elif kind == "rtstruct":
                if image is None:
                    raise MedsegError("RTSTRUCT needs the source image")
                rt_description = f"medseg RTSTRUCT {description}".strip()[:64]
                _write_rtstruct(
                    label,
                    image,
                    list(sources or []),
                    target,
                    label_names,
                    rt_description,
                    overwrite=overwrite,
                    series_name=series_name,
                )
            else:
                data = {
                    **(report or {}),
                    "geometry": label.geometry.to_dict(),
                    "voxel_volume_ml": abs(float(np.linalg.det(label.geometry.affine[:3, :3]))) / 1000.0,
                    "classes": volumes_ml(label, label_names),
                }
                write_json_atomic(target, data, overwrite=overwrite)
        except Exception as exc:  # one output failing never costs the others
            results[kind] = OutputResult(kind, error=_describe_failure(exc), seconds=time.perf_counter() - t0)
            continue
        results[kind] = OutputResult(kind, files=names.files(kind), seconds=time.perf_counter() - t0)
    return results
