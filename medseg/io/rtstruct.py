"""DICOM RT Structure Sets: contours -> label volumes on the referenced series, and back.

Reading (:func:`rtstruct_to_labels`)
    Each ROI's contours (``ROIContourSequence`` / ``ContourSequence``) are mapped from LPS patient
    coordinates to continuous voxel indices of the referenced image series through its
    :class:`~medseg.io.volume.Geometry` and rasterised per slice with
    :func:`medseg.io.polygons.fill_polygons` (pixel-centre rule, even-odd holes; see that module).

    * ``CLOSED_PLANAR`` contours of one ROI on one plane are filled together by the even-odd rule
      (a contour inside another is a hole); ``OPEN_PLANAR`` / ``OPEN_NONPLANAR`` polylines and
      ``POINT`` contours mark the voxels they pass through.
    * A contour belongs to the slice nearest to its plane: plane position ``z`` (in slice units
      along the normal) goes to slice ``floor(z + 0.5)``, i.e. within half the slice spacing.
      When several planes of one ROI fall on the same slice (contours drawn more densely than
      the slices, or between slices), the plane nearest to the slice centre is used and the others
      are reported in ``meta["warnings"]``.  Slices are never interpolated between contours.
    * A contour whose ``ContourImageSequence`` names an image that is not in the series, or whose
      plane lies outside the series, is an error naming the missing SOP Instance UIDs, unless
      ``missing="skip"`` (rasterise only what lands on slices present; what was skipped is counted
      in ``meta["warnings"]``).
    * ROIs become labels ``1..R`` in the order of ``StructureSetROISequence``; ROI names are the
      label names.  Where ROIs overlap the ``overlap`` policy decides: ``"smaller"`` (default: the
      ROI with fewer voxels wins, so organs stay visible inside BODY), ``"later"``, ``"error"`` or
      ``"separate"`` (one binary channel per ROI, ``(R, X, Y, Z)``).

Writing (:func:`labels_to_rtstruct`, one implementation used by ``medseg convert`` and batch export)
    Label volumes on the grid of the reference series (or on an axis-permuted/flipped copy of that
    grid) are contoured slice by slice with marching squares at level 0.5
    (:func:`medseg.io.polygons.mask_to_polygons`: vertices on voxel-edge mid-points, holes as
    separate contours), mapped to LPS patient coordinates and written as ``CLOSED_PLANAR``
    contours referencing the image of their slice.  Reading the result back with the default
    pixel rule reproduces the labels exactly (overlaps aside).  Patient and study attributes are
    copied from the source images (never invented); the RTSTRUCT gets new SOP Instance and Series
    UIDs.  A source series with empty UIDs (anonymised by blanking them) is refused.
"""

from __future__ import annotations

import datetime as _dt
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from medseg.errors import GeometryError, InputError
from medseg.io.dicom import discover_series, is_dicom_file, read_dataset, read_dicom_series
from medseg.io.dicom_headers import TYPE2_IDENTITY, clean_identity
from medseg.io.images import atomic_path
from medseg.io.polygons import (
    OverlapPolicy,
    PixelRule,
    SliceMask,
    fill_polygons,
    mark_polyline,
    paint_masks,
    stack_to_polygons,
    voxel_to_world,
    world_to_voxel,
)
from medseg.io.volume import Geometry, Volume
from medseg.types import PathLike

__all__ = [
    "RTSTRUCT_SOP_CLASS_UID",
    "Contour",
    "ReferenceSeries",
    "Roi",
    "StructureSet",
    "align_to_grid",
    "build_rtstruct",
    "find_rtstructs",
    "is_rtstruct",
    "labels_to_rtstruct",
    "load_reference_series",
    "read_rtstruct",
    "rtstruct_to_labels",
]

RTSTRUCT_SOP_CLASS_UID = UID("1.2.840.10008.5.1.4.1.1.481.3")
_DETACHED_STUDY_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = Tag(0x3006, 0x0050)
_ROI_CONTOUR_SEQUENCE = Tag(0x3006, 0x0039)
#: A contour whose points spread more than this fraction of the slice spacing along the normal
#: is not parallel to the slices.
_PLANARITY = 0.25
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)
#: Patient / study attributes copied from the source images (Type 2 ones are written empty when absent).
_COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


# ======================================================================= model
@dataclass
class Contour:
    """One contour of an ROI.

    Attributes:
        points: ``(N, 3)`` LPS millimetres.
        geometric_type: ``CLOSED_PLANAR``, ``OPEN_PLANAR``, ``OPEN_NONPLANAR`` or ``POINT``.
        referenced_sop_uids: SOP Instance UIDs of its ``ContourImageSequence`` (may be empty).
    """

    points: np.ndarray
    geometric_type: str
    referenced_sop_uids: tuple[str, ...] = ()


@dataclass
class Roi:
    """One ROI of a structure set.

    Attributes:
        number: ROI Number.
        name: ROI Name.
        contours: Its contours (empty for an ROI without contour data).
        color: ROI Display Color, if given.
        interpreted_type: RT ROI Interpreted Type (``""`` when absent).
        frame_of_reference_uid: Referenced Frame of Reference UID.
    """

    number: int
    name: str
    contours: list[Contour] = field(default_factory=list)
    color: tuple[int, int, int] | None = None
    interpreted_type: str = ""
    frame_of_reference_uid: str = ""


@dataclass
class StructureSet:
    """A parsed RTSTRUCT.

    Attributes:
        source: The file.
        sop_instance_uid: Its SOP Instance UID.
        study_uid: Its Study Instance UID.
        label: Structure Set Label.
        frame_of_reference_uids: Frames of reference it refers to.
        referenced_series_uids: Image series named in ``RTReferencedSeriesSequence``.
        rois: ROIs in ``StructureSetROISequence`` order.
        warnings: Non-fatal problems found while parsing.
    """

    source: Path
    sop_instance_uid: str
    study_uid: str
    label: str
    frame_of_reference_uids: list[str]
    referenced_series_uids: list[str]
    rois: list[Roi]
    warnings: list[str] = field(default_factory=list)

    @property
    def contour_count(self) -> int:
        """Number of contours over all ROIs."""
        return sum(len(r.contours) for r in self.rois)


# ===================================================================== reading
def _dcmread(path: Path, *, stop_before_pixels: bool = True) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid-UI / VR warnings in real files are not errors here
        return read_dataset(path, stop_before_pixels=stop_before_pixels)


def is_rtstruct(path: PathLike) -> bool:
    """True if ``path`` is a DICOM file whose Modality / SOP Class is RT Structure Set."""
    p = Path(path)
    if not p.is_file() or not is_dicom_file(p):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(p, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except Exception:  # a corrupt file is not an RTSTRUCT (pydicom raises many types)
        return False
    return str(ds.get("Modality", "")) == "RTSTRUCT" or str(ds.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS_UID


def find_rtstructs(folder: PathLike) -> list[Path]:
    """RTSTRUCT files under ``folder`` (recursive), sorted."""
    root = Path(folder)
    return [p for p in sorted(root.rglob("*")) if p.is_file() and is_rtstruct(p)]


def read_rtstruct(path: PathLike) -> StructureSet:
    """Parse an RTSTRUCT file (contours, names, colours, references).

    Raises:
        InputError: Not readable, not an RTSTRUCT, or malformed contour data.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    try:
        ds = _dcmread(p)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputError(p, f"cannot read DICOM ({exc})") from exc
    if str(ds.get("Modality", "")) != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS_UID:
        raise InputError(p, f"not an RTSTRUCT (Modality {ds.get('Modality', '?')!s})")
    if "StructureSetROISequence" not in ds:
        raise InputError(p, "RTSTRUCT has no StructureSetROISequence")
    notes: list[str] = []
    rois: dict[int, Roi] = {}
    for item in ds.StructureSetROISequence:
        number = int(item.get("ROINumber", -1))
        if number in rois:
            notes.append(f"duplicate ROI Number {number}; the first definition is kept")
            continue
        rois[number] = Roi(
            number=number,
            name=str(item.get("ROIName", "") or f"ROI {number}"),
            frame_of_reference_uid=str(item.get("ReferencedFrameOfReferenceUID", "")),
        )
    for item in ds.get("RTROIObservationsSequence", []):
        roi = rois.get(int(item.get("ReferencedROINumber", -1)))
        if roi is not None:
            roi.interpreted_type = str(item.get("RTROIInterpretedType", "") or "")
    for item in ds.get("ROIContourSequence", []):
        number = int(item.get("ReferencedROINumber", -1))
        roi = rois.get(number)
        if roi is None:
            notes.append(f"ROIContourSequence refers to ROI Number {number}, which is not defined; ignored")
            continue
        color = item.get("ROIDisplayColor")
        if color is not None and len(color) == 3:
            roi.color = (int(color[0]), int(color[1]), int(color[2]))
        for n, contour in enumerate(item.get("ContourSequence", [])):
            roi.contours.append(_parse_contour(p, roi, n, contour, notes))
    refs = _referenced_series(ds)
    return StructureSet(
        source=p,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        label=str(ds.get("StructureSetLabel", "")),
        frame_of_reference_uids=[
            str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])
        ],
        referenced_series_uids=refs,
        rois=list(rois.values()),
        warnings=notes,
    )


def _parse_contour(path: Path, roi: Roi, n: int, item: Dataset, notes: list[str]) -> Contour:
    kind = str(item.get("ContourGeometricType", "CLOSED_PLANAR") or "CLOSED_PLANAR").upper()
    if kind not in ("CLOSED_PLANAR", "OPEN_PLANAR", "OPEN_NONPLANAR", "POINT"):
        raise InputError(path, f"ROI {roi.name!r} contour {n}: unknown ContourGeometricType {kind!r}")
    try:
        values = _contour_values(item)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"ROI {roi.name!r} contour {n}: ContourData is not numeric ({exc})") from exc
    if values.size == 0 or values.size % 3 or not np.all(np.isfinite(values)):
        raise InputError(
            path, f"ROI {roi.name!r} contour {n}: ContourData must be x,y,z triplets of finite numbers ({values.size})"
        )
    points = values.reshape(-1, 3)
    declared = item.get("NumberOfContourPoints")
    if declared is not None and int(declared) != len(points):
        notes.append(
            f"ROI {roi.name!r} contour {n}: NumberOfContourPoints {int(declared)} != {len(points)} points; data used"
        )
    refs = tuple(
        str(ref.get("ReferencedSOPInstanceUID", ""))
        for ref in item.get("ContourImageSequence", [])
        if ref.get("ReferencedSOPInstanceUID")
    )
    return Contour(points=points, geometric_type=kind, referenced_sop_uids=refs)


def _referenced_series(ds: Dataset) -> list[str]:
    uids = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uid = str(series.get("SeriesInstanceUID", ""))
                if uid and uid not in uids:
                    uids.append(uid)
    return uids


# ============================================================ reference series
@dataclass
class ReferenceSeries:
    """The image series an RTSTRUCT is drawn on (or will reference).

    Attributes:
        folder: Where it was found.
        image: The series as read by :func:`~medseg.io.dicom.read_dicom_series` (geometry, and
            ``meta["sop_instance_uids"]`` in slice order).
        header: Header of its first slice (patient and study attributes).
        sop_class_uid: SOP Class of its images.
        frame_of_reference_uid: Its Frame of Reference UID.
    """

    folder: Path
    image: Volume
    header: Dataset
    sop_class_uid: str
    frame_of_reference_uid: str

    @property
    def geometry(self) -> Geometry:
        """The image grid."""
        return self.image.geometry

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UID of each slice, in slice (third voxel axis) order."""
        return [str(u) for u in self.image.meta.get("sop_instance_uids", [])]

    @property
    def series_uid(self) -> str:
        """Series Instance UID."""
        return str(self.image.meta.get("series_uid", ""))

    @property
    def study_uid(self) -> str:
        """Study Instance UID."""
        return str(self.image.meta.get("study_uid", ""))


def load_reference_series(
    source: PathLike, *, series_uid: str | None = None, image: Volume | None = None
) -> ReferenceSeries:
    """Find and read the image series an RTSTRUCT refers to (or will refer to).

    Args:
        source: A folder holding the series (possibly with other files), or one of its files.
        series_uid: Which series, when ``source`` holds several.
        image: The series already read with :func:`read_dicom_series` (avoids decoding it twice).

    Raises:
        InputError: No (unique) image series, or unreadable headers.
    """
    folder = Path(source)
    if image is None:
        image = read_dicom_series(folder, series_uid=series_uid)
    uid = str(image.meta.get("series_uid", ""))
    candidates = [s for s in discover_series(folder) if s.uid == uid]
    if not candidates:
        raise InputError(folder, f"series {uid or '<empty UID>'} not found")
    files = sorted(candidates[0].files)
    header = _dcmread(files[0])
    sop_class = str(header.get("SOPClassUID", "") or "")
    if not sop_class and getattr(header, "file_meta", None) is not None:
        sop_class = str(header.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return ReferenceSeries(
        folder=folder,
        image=image,
        header=header,
        sop_class_uid=sop_class,
        frame_of_reference_uid=str(header.get("FrameOfReferenceUID", "") or ""),
    )


def _choose_series(folder: Path, structure_set: StructureSet) -> str | None:
    """The series UID to read from ``folder``: the referenced one when the folder holds several."""
    series = discover_series(folder)
    if len(series) <= 1:
        return None
    present = {s.uid for s in series}
    for uid in structure_set.referenced_series_uids:
        if uid in present:
            return uid
    listed = ", ".join(sorted(u or "<empty>" for u in present))
    raise InputError(
        folder,
        f"holds {len(series)} image series ({listed}) and none is the series the RTSTRUCT "
        f"{structure_set.source.name} references ({', '.join(structure_set.referenced_series_uids) or 'none named'})",
    )


# ================================================================ rasterising
@dataclass
class _Placed:
    """A contour placed on the grid."""

    slice_index: int
    plane: float  # continuous slice coordinate of the contour plane
    ij: np.ndarray  # (N, 2) continuous in-plane voxel indices
    ijk: np.ndarray  # (N, 3) continuous voxel indices
    kind: str


def rtstruct_to_labels(
    rtstruct: PathLike | StructureSet,
    reference: PathLike | ReferenceSeries | None = None,
    *,
    rois: Sequence[str] | None = None,
    overlap: OverlapPolicy = "smaller",
    pixel_rule: PixelRule = "centre",
    missing: str = "error",
) -> Volume:
    """Rasterise an RTSTRUCT's ROIs onto the grid of its image series.

    Args:
        rtstruct: The RTSTRUCT file (or a parsed :class:`StructureSet`).
        reference: The image series folder (default: the RTSTRUCT's folder) or a loaded
            :class:`ReferenceSeries`.
        rois: ROI names to keep, in that label order (case-insensitive; default all).
        overlap: ``"smaller"``, ``"later"``, ``"error"`` or ``"separate"`` (module docstring).
        pixel_rule: ``"centre"`` (default) or ``"opencv"`` (see :mod:`medseg.io.polygons`).
        missing: ``"error"``: contours on images absent from the series (or off the grid) are an
            error naming the missing SOP Instance UIDs; ``"skip"``: leave those contours out.

    Returns:
        Label :class:`Volume` ``(1, X, Y, Z)`` on the series grid (``(R, X, Y, Z)`` binary channels
        for ``"separate"``) with ``meta``: ``label_names`` ``{value: ROI name}``, ``rois``
        (number, name, colour, type, contours used), ``warnings`` and the UIDs involved.

    Raises:
        InputError: Unreadable inputs, missing referenced images (``missing="error"``), contours
            not parallel to the slices, unknown ROI names, or overlaps with ``overlap="error"``.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    structure_set = rtstruct if isinstance(rtstruct, StructureSet) else read_rtstruct(rtstruct)
    src = structure_set.source
    if not isinstance(reference, ReferenceSeries):
        folder = Path(reference) if reference is not None else src.parent
        reference = load_reference_series(folder, series_uid=_choose_series(folder, structure_set))
    notes = list(structure_set.warnings)
    _check_referenced_series(structure_set, reference)
    _check_frame_of_reference(structure_set, reference, notes)
    selected = _select_rois(structure_set, rois)
    placed = _place_contours(structure_set, selected, reference, missing=missing, notes=notes)
    geometry = reference.geometry
    names = _unique_names(selected)
    structures = [_rasterise_roi(roi, placed[roi.number], geometry, pixel_rule, notes) for roi in selected]
    array = paint_masks(structures, geometry.shape, names=names, policy=overlap, source=src)
    label_names = {r + 1: name for r, name in enumerate(names)}
    meta: dict[str, Any] = {
        "label_names": label_names,
        "rois": [
            {
                "value": r + 1,
                "name": names[r],
                "roi_number": roi.number,
                "color": list(roi.color) if roi.color else None,
                "interpreted_type": roi.interpreted_type,
                "contours": len(roi.contours),
                "contours_used": len(placed[roi.number]),
                "voxels": int(sum(int(p.mask.sum()) for p in structures[r])),
            }
            for r, roi in enumerate(selected)
        ],
        "warnings": notes,
        "source_rtstruct": str(src),
        "rtstruct_sop_instance_uid": structure_set.sop_instance_uid,
        "series_uid": reference.series_uid,
        "study_uid": reference.study_uid,
        "frame_of_reference_uid": reference.frame_of_reference_uid,
        "overlap_policy": overlap,
        "pixel_rule": pixel_rule,
    }
    if overlap == "separate":
        meta["channels"] = names
        return Volume(array=array, geometry=geometry, kind="label", source=str(src), meta=meta)
    return Volume(array=array[None], geometry=geometry, kind="label", source=str(src), meta=meta)


def _check_referenced_series(structure_set: StructureSet, reference: ReferenceSeries) -> None:
    """An RTSTRUCT drawn on another series is said to be so (not reported as misplaced contours)."""
    named = [u for u in structure_set.referenced_series_uids if u]
    if not named or not reference.series_uid or reference.series_uid in named:
        return
    raise InputError(
        structure_set.source,
        f"the RTSTRUCT references series {', '.join(named)}, but {reference.folder} holds series "
        f"{reference.series_uid}; pass the referenced series as --reference",
    )


def _check_frame_of_reference(structure_set: StructureSet, reference: ReferenceSeries, notes: list[str]) -> None:
    frames = {u for u in structure_set.frame_of_reference_uids if u}
    frames |= {r.frame_of_reference_uid for r in structure_set.rois if r.frame_of_reference_uid}
    if frames and reference.frame_of_reference_uid and reference.frame_of_reference_uid not in frames:
        notes.append(
            f"the RTSTRUCT's frame of reference ({', '.join(sorted(frames))}) differs from the series' "
            f"({reference.frame_of_reference_uid}); contours were placed by their patient coordinates"
        )


def _select_rois(structure_set: StructureSet, names: Sequence[str] | None) -> list[Roi]:
    if names is None:
        return list(structure_set.rois)
    by_name = {r.name.lower(): r for r in structure_set.rois}
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown:
        available = ", ".join(repr(r.name) for r in structure_set.rois)
        raise InputError(structure_set.source, f"no ROI named {', '.join(map(repr, unknown))} (ROIs: {available})")
    return [by_name[n.lower()] for n in names]


def _unique_names(rois: Sequence[Roi]) -> list[str]:
    counts: dict[str, int] = {}
    for roi in rois:
        counts[roi.name] = counts.get(roi.name, 0) + 1
    return [f"{r.name} (ROI {r.number})" if counts[r.name] > 1 else r.name for r in rois]


def _place_contours(
    structure_set: StructureSet,
    rois: Sequence[Roi],
    reference: ReferenceSeries,
    *,
    missing: str,
    notes: list[str],
) -> dict[int, list[_Placed]]:
    """Map every contour to its slice; collect missing references and off-grid contours."""
    src = structure_set.source
    geometry = reference.geometry
    nz = geometry.shape[2]
    spacing_z = geometry.spacing[2]
    sops = reference.sop_instance_uids
    slice_of = {uid: k for k, uid in enumerate(sops) if uid}
    check_refs = len(slice_of) == len(sops) and len(sops) == nz
    if not check_refs:
        notes.append(
            "the series has no SOP instance per slice (empty UIDs, or a Siemens mosaic); contours were matched to"
            " slices by position only"
        )
    missing_uids: dict[str, int] = {}
    off_grid: list[str] = []
    placed: dict[int, list[_Placed]] = {roi.number: [] for roi in rois}
    skipped = 0
    for roi in rois:
        for n, contour in enumerate(roi.contours):
            ijk = world_to_voxel(contour.points, geometry)
            spread = float(np.ptp(ijk[:, 2]))
            if contour.geometric_type != "OPEN_NONPLANAR" and spread > _PLANARITY:
                raise InputError(
                    src,
                    f"ROI {roi.name!r} contour {n} is not parallel to the image slices "
                    f"(spans {spread * spacing_z:.3g} mm along the slice normal)",
                )
            plane = float(np.mean(ijk[:, 2]))
            k = int(np.floor(plane + 0.5))
            absent = [u for u in contour.referenced_sop_uids if check_refs and u not in slice_of]
            outside = not 0 <= k < nz and contour.geometric_type != "OPEN_NONPLANAR"
            if absent or outside:
                skipped += 1
                for uid in absent:
                    missing_uids[uid] = missing_uids.get(uid, 0) + 1
                if outside and not absent:
                    off_grid.append(f"{roi.name!r} at {_normal_mm(contour.points, geometry):.2f} mm")
                continue
            if check_refs and contour.referenced_sop_uids:
                k_ref = slice_of[contour.referenced_sop_uids[0]]
                if k_ref != k and contour.geometric_type != "OPEN_NONPLANAR":
                    notes.append(
                        f"ROI {roi.name!r} contour {n} references slice {k_ref} but lies on slice {k}; "
                        "placed by its coordinates"
                    )
            placed[roi.number].append(
                _Placed(slice_index=k, plane=plane, ij=ijk[:, :2], ijk=ijk, kind=contour.geometric_type)
            )
    if skipped and missing == "error":
        raise InputError(src, _missing_message(missing_uids, off_grid, reference, skipped))
    if skipped:
        notes.append(
            f"{skipped} contour(s) left out: {len(missing_uids)} referenced image(s) missing from the series, "
            f"{len(off_grid)} contour(s) outside it"
        )
    return placed


def _normal_mm(points: np.ndarray, geometry: Geometry) -> float:
    """Mean position of LPS ``points`` along the slice normal (mm, LPS dot normal)."""
    return float(np.mean(np.asarray(points) @ geometry.direction[:, 2]))


def _missing_message(missing_uids: dict[str, int], off_grid: list[str], reference: ReferenceSeries, n: int) -> str:
    parts = []
    if missing_uids:
        shown = ", ".join(list(missing_uids)[:5]) + (
            f" and {len(missing_uids) - 5} more" if len(missing_uids) > 5 else ""
        )
        parts.append(
            f"contours reference {len(missing_uids)} image(s) missing from the series "
            f"{reference.series_uid or '<empty UID>'} in {reference.folder}: SOP Instance UID(s) {shown}"
        )
    if off_grid:
        g = reference.geometry
        lo, hi = sorted(
            (
                _normal_mm(voxel_to_world(np.array([[0, 0, 0]]), g), g),
                _normal_mm(voxel_to_world(np.array([[0, 0, g.shape[2] - 1]]), g), g),
            )
        )
        shown = "; ".join(off_grid[:3]) + (f" and {len(off_grid) - 3} more" if len(off_grid) > 3 else "")
        parts.append(f"{len(off_grid)} contour(s) lie outside the series' slices ({lo:.2f} to {hi:.2f} mm): {shown}")
    return (
        "; ".join(parts)
        + f" ({n} contour(s) affected). Give the complete series, or rasterise only the slices present"
        + " (missing='skip', medseg convert --partial)"
    )


def _rasterise_roi(
    roi: Roi, placed: list[_Placed], geometry: Geometry, pixel_rule: PixelRule, notes: list[str]
) -> list[SliceMask]:
    """Slice masks of one ROI: nearest contour plane per slice, even-odd within the plane."""
    nx, ny, _ = geometry.shape
    by_slice: dict[int, dict[float, list[_Placed]]] = {}
    extra: dict[int, np.ndarray] = {}
    for item in placed:
        if item.kind == "OPEN_NONPLANAR":
            _mark_nonplanar(item.ijk, geometry.shape, extra)
            continue
        planes = by_slice.setdefault(item.slice_index, {})
        planes.setdefault(round(item.plane, 3), []).append(item)
    pieces = []
    ignored = 0
    for k in sorted(set(by_slice) | set(extra)):
        planes = by_slice.get(k, {})
        mask = extra.get(k, np.zeros((nx, ny), dtype=bool))
        if planes:
            plane = min(planes, key=lambda z: (abs(z - k), z))
            ignored += sum(len(v) for z, v in planes.items() if z != plane)
            items = planes[plane]
            closed = [c.ij for c in items if c.kind == "CLOSED_PLANAR"]
            if closed:
                mask = mask | fill_polygons(closed, (nx, ny), pixel_rule=pixel_rule)
            for c in items:
                if c.kind != "CLOSED_PLANAR":
                    mask |= mark_polyline(c.ij, (nx, ny))
        piece = SliceMask.crop(k, mask)
        if piece is not None:
            pieces.append(piece)
    if ignored:
        notes.append(
            f"ROI {roi.name!r}: {ignored} contour(s) on planes farther from a slice centre than another plane "
            "of the same slice were not used (contours denser than slices)"
        )
    return pieces


def _mark_nonplanar(ijk: np.ndarray, shape: tuple[int, int, int], out: dict[int, np.ndarray]) -> None:
    """Voxels an ``OPEN_NONPLANAR`` polyline passes through (sampled every 0.05 voxel)."""
    starts, ends = (ijk[:-1], ijk[1:]) if len(ijk) > 1 else (ijk, ijk)
    counts = np.ceil(np.linalg.norm(ends - starts, axis=1) / 0.05).astype(np.int64) + 1
    edge = np.repeat(np.arange(len(counts)), counts)
    rank = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    t = rank / np.maximum(counts[edge] - 1, 1)
    idx = np.floor(starts[edge] + t[:, None] * (ends[edge] - starts[edge]) + 0.5).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    for i, j, k in idx[ok]:
        out.setdefault(int(k), np.zeros(shape[:2], dtype=bool))[i, j] = True


# ==================================================================== writing
def align_to_grid(volume: Volume, geometry: Geometry, *, atol: float = 1e-3) -> np.ndarray:
    """Re-index a volume onto ``geometry`` when both grids have the same voxel centres.

    Handles axis permutations and flips (e.g. a NIfTI label saved RAS/LAS for an LPS DICOM
    series) exactly, without interpolation.

    Args:
        volume: ``(C, X, Y, Z)`` volume.
        geometry: Target grid.
        atol: Tolerance in voxels on the index mapping.

    Returns:
        ``(C, X', Y', Z')`` array on ``geometry``.

    Raises:
        GeometryError: The grids' voxel centres differ (resample first).
    """
    if volume.geometry.allclose(geometry, atol=1e-4):
        return volume.array
    mapping = np.linalg.inv(geometry.affine) @ volume.geometry.affine  # source index -> target index
    rotation, offset = mapping[:3, :3], mapping[:3, 3]
    perm = np.rint(rotation)
    ok = (
        np.allclose(rotation, perm, atol=atol)
        and np.allclose(offset, np.rint(offset), atol=atol)
        and all(np.count_nonzero(perm[:, c]) == 1 for c in range(3))
        and all(np.count_nonzero(perm[r]) == 1 for r in range(3))
    )
    if ok:
        axes = [int(np.flatnonzero(perm[r])[0]) for r in range(3)]  # target axis r <- source axis axes[r]
        array = np.transpose(volume.array, (0, *(a + 1 for a in axes)))
        for r in range(3):
            if perm[r, axes[r]] < 0:
                array = np.flip(array, axis=r + 1)
        corner = mapping @ np.array([0.0, 0.0, 0.0, 1.0])
        start = [int(np.rint(corner[r])) - (array.shape[r + 1] - 1 if perm[r, axes[r]] < 0 else 0) for r in range(3)]
        if tuple(array.shape[1:]) == geometry.shape and start == [0, 0, 0]:
            return np.ascontiguousarray(array)
    raise GeometryError(
        f"label volume is not on the reference series grid: {volume.geometry.describe()} vs {geometry.describe()}"
    )


def _require_uids(reference: ReferenceSeries) -> None:
    empty = [
        name
        for name, value in (
            ("StudyInstanceUID", reference.study_uid),
            ("SeriesInstanceUID", reference.series_uid),
            ("FrameOfReferenceUID", reference.frame_of_reference_uid),
            ("SOPClassUID", reference.sop_class_uid),
        )
        if not value
    ]
    sops = reference.sop_instance_uids
    blank = sum(1 for u in sops if not u)
    if blank or len(sops) != reference.geometry.shape[2]:
        empty.append(f"SOPInstanceUID of {blank or reference.geometry.shape[2]} slice(s)")
    if empty:
        raise InputError(
            reference.folder,
            "refusing to write an RTSTRUCT: the reference series has empty " + ", ".join(empty) + " (anonymised by "
            "blanking its UIDs); an RTSTRUCT must reference the images it is drawn on, so it would be invalid",
        )


def _contour_values(item: Dataset) -> np.ndarray:
    """ContourData of a contour item as float64, parsing the raw bytes when still unconverted."""
    raw = item.get_item(_CONTOUR_DATA) if _CONTOUR_DATA in item else None
    if raw is None:
        return np.zeros(0)
    value = raw.value
    if isinstance(value, bytes):
        parts = value.decode("ascii", errors="replace").replace("\x00", " ").split("\\")
        return np.asarray([float(v) for v in parts if v.strip()], dtype=np.float64)
    if value is None:
        return np.zeros(0)
    values = [value] if isinstance(value, (int, float, str)) else list(value)
    return np.asarray([float(v) for v in values], dtype=np.float64)


def _contour_texts(points: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """ContourData values (DS text, explicit VR little endian, padded) of every contour at once.

    Values are written with 0.1 µm precision (at most 16 characters each): ``f"{v:.4f}"`` with
    trailing zeros, a trailing point and the sign of zero removed.  All values of all contours
    are formatted in one string operation; per-value Python work (and pydicom's per-value DS
    objects) dominated the cost of noisy labels.

    Args:
        points: ``(P, 3)`` LPS points of all contours, one after the other.
        offsets: ``(N + 1,)`` start of contour ``n`` in ``points``.

    Returns:
        ``N`` encoded values.
    """
    flat = np.asarray(points, dtype=np.float64).ravel().tolist()
    if not flat:
        return [b""] * (len(offsets) - 1)
    text = ("%.4f\n" * len(flat)) % tuple(flat)
    text = _TRAILING_ZEROS.sub("", text)
    text = _TRAILING_POINT.sub("", text)
    text = _NEGATIVE_ZERO.sub("0", text)
    tokens = text.split("\n")
    out = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        raw = "\\".join(tokens[3 * start : 3 * end]).encode("ascii")
        out.append(raw + b" " if len(raw) % 2 else raw)
    return out


_TRAILING_ZEROS = re.compile(r"0+(?=\n)")
_TRAILING_POINT = re.compile(r"\.(?=\n)")
_NEGATIVE_ZERO = re.compile(r"(?<![^\n])-0(?=\n)")
#: Explicit VR little endian: VRs with a 4-byte length field.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One data element, explicit VR little endian, defined length (``value`` already padded).

    A value too long for a 2-byte length is written with VR UN, as pydicom does (PS3.5 6.2.2).
    """
    group, number = tag >> 16, tag & 0xFFFF
    if vr not in _LONG_VRS and len(value) > 0xFFFF:
        vr = b"UN"
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    """A sequence item of defined length."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _image_sequence(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """ContourImageSequence (3006,0016) naming one image."""
    ref = _element(0x00081150, b"UI", _uid(sop_class_uid)) + _element(0x00081155, b"UI", _uid(sop_instance_uid))
    return _element(0x30060016, b"SQ", _item(ref))


@dataclass(frozen=True)
class _Contours:
    """The contours of one label: LPS points of all contours, offsets and slice of each."""

    points: np.ndarray
    offsets: np.ndarray
    slices: np.ndarray


def _roi_contour_sequence(
    values: Sequence[int],
    colours: Sequence[tuple[int, int, int]],
    contours: dict[int, _Contours],
    image_sequences: Sequence[bytes],
) -> RawDataElement:
    """ROIContourSequence (3006,0039), already encoded (explicit VR little endian, defined lengths).

    Byte for byte what pydicom writes for the same Datasets (tested), built without one pydicom
    Dataset per contour: on noisy labels (tens of thousands of contours) building and writing
    those datasets took most of the time.

    Args:
        values: ROI numbers (label values), in ROI order.
        colours: ROI display colour of each.
        contours: Contours of the labels that have any.
        image_sequences: Encoded ContourImageSequence per slice (``b""``: the contour names no image).
    """
    closed = _element(0x30060042, b"CS", _text("CLOSED_PLANAR"))
    items = []
    for value, colour in zip(values, colours, strict=True):
        body = _element(0x3006002A, b"IS", _text("\\".join(str(int(c)) for c in colour)))
        found = contours.get(value)
        if found is not None and len(found.slices):
            counts = np.diff(found.offsets).tolist()
            texts = _contour_texts(found.points, found.offsets)
            parts = [
                _item(
                    image_sequences[k]
                    + closed
                    + _element(0x30060046, b"IS", _text(str(count)))
                    + _element(0x30060048, b"IS", _text(str(number)))
                    + _element(0x30060050, b"DS", data)
                )
                for number, (k, count, data) in enumerate(zip(found.slices.tolist(), counts, texts, strict=True), 1)
            ]
            body += _element(0x30060040, b"SQ", b"".join(parts))
        body += _element(0x30060084, b"IS", _text(str(int(value))))
        items.append(_item(body))
    value_bytes = b"".join(items)
    return RawDataElement(Tag(0x3006, 0x0039), "SQ", len(value_bytes), value_bytes, 0, False, True)


def _contours_by_label(array: np.ndarray, values: Sequence[int], geometry: Geometry) -> dict[int, _Contours]:
    """The contours of every label value, traced slice by slice (:func:`stack_to_polygons`), in LPS."""
    out: dict[int, _Contours] = {}
    if array.shape[0] == 1:
        labels = array[0]
        boxes = ndimage.find_objects(labels.astype(np.intp, copy=False))
        channel_masks = None
    else:
        labels = None
        boxes = []
        channel_masks = array
    for v in values:
        if labels is not None:
            box = boxes[v - 1] if v - 1 < len(boxes) else None
            if box is None:
                continue
            sub = labels[box] == v
        else:
            assert channel_masks is not None
            found = ndimage.find_objects((channel_masks[v - 1] > 0).astype(np.int8))
            if not found or found[0] is None:
                continue
            box = found[0]
            sub = channel_masks[v - 1][box] > 0
        traced = stack_to_polygons(sub)
        if not len(traced):
            continue
        slices = traced.slices + box[2].start
        counts = np.diff(traced.offsets)
        ijk = np.column_stack(
            [
                traced.points[:, 0] + box[0].start,
                traced.points[:, 1] + box[1].start,
                np.repeat(slices, counts).astype(np.float64),
            ]
        )
        out[v] = _Contours(voxel_to_world(ijk, geometry), traced.offsets, slices)
    return out


def build_rtstruct(
    labels: Volume,
    reference: ReferenceSeries,
    *,
    label_names: dict[int, str] | None = None,
    colors: dict[int, tuple[int, int, int]] | None = None,
    structure_set_label: str = "medseg",
    series_description: str = "medseg segmentation",
    roi_generation_algorithm: str = "AUTOMATIC",
    interpreted_type: str = "ORGAN",
    include_empty: bool = False,
    series_number: int | None = None,
) -> Dataset:
    """Build (not write) an RTSTRUCT dataset from a label volume on the reference series.

    Args:
        labels: ``(1, X, Y, Z)`` label map, or ``(C, X, Y, Z)`` binary channels (channel ``c`` is
            label ``c + 1``), on the series grid or an axis-permuted/flipped copy of it.
        reference: The series the contours are drawn on.
        label_names: ``{value: ROI name}``; default: the labels' sidecar names or ``label_<v>``.
        colors: ``{value: (r, g, b)}``; default: a fixed palette.
        structure_set_label: Structure Set Label (at most 16 characters).
        series_description: Series Description of the new RTSTRUCT series.
        roi_generation_algorithm: ``AUTOMATIC``, ``SEMIAUTOMATIC`` or ``MANUAL``.
        interpreted_type: RT ROI Interpreted Type of every ROI (e.g. ``ORGAN``).
        include_empty: Also write named labels that have no voxels (ROIs without contours).
        series_number: Series Number of the new RTSTRUCT series (left empty by default).

    Returns:
        The dataset (with file meta), new SOP Instance and Series UIDs.

    Raises:
        InputError: The reference series has empty UIDs.
        GeometryError: The labels are not on the series grid.
    """
    _require_uids(reference)
    geometry = reference.geometry
    array = align_to_grid(labels, geometry)
    names = dict(label_names) if label_names is not None else _names_from_meta(labels)
    if array.shape[0] == 1:
        present = {int(v) for v in np.unique(array) if v != 0}
    else:
        present = {c + 1 for c in range(array.shape[0]) if array[c].any()}
    values = sorted(present | (set(names) if include_empty else set()))
    contours = _contours_by_label(array, [v for v in values if v in present], geometry)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    header, _ = clean_identity(reference.header)  # real-world noise in the copied patient/study attributes
    ds.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 192") or "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in _COPIED:
        if keyword in header:
            setattr(ds, keyword, header[keyword].value)
        elif keyword in TYPE2_IDENTITY:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = reference.study_uid
    ds.FrameOfReferenceUID = reference.frame_of_reference_uid
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "") or ""
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = "" if series_number is None else int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = "medseg"
    ds.SoftwareVersions = _version()
    ds.StructureSetLabel = structure_set_label[:16]
    ds.StructureSetDate, ds.StructureSetTime = date, time

    uids = reference.sop_instance_uids
    # A Siemens mosaic holds every slice in one image: the series lists that image once and the
    # contours name no image (their coordinates place them), since none is in their plane.
    own_images = len(set(uids)) == len(uids)
    image_refs = [_image_ref(reference.sop_class_uid, uid) for uid in dict.fromkeys(uids)]
    series_item = Dataset()
    series_item.SeriesInstanceUID = reference.series_uid
    series_item.ContourImageSequence = DicomSequence(image_refs)
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = _DETACHED_STUDY_SOP_CLASS_UID
    study_item.ReferencedSOPInstanceUID = reference.study_uid
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = reference.frame_of_reference_uid
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

    roi_items, observation_items = [], []
    colours: list[tuple[int, int, int]] = []
    for n, value in enumerate(values):
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = reference.frame_of_reference_uid
        roi.ROIName = names.get(value, f"label_{value}")[:64]
        roi.ROIGenerationAlgorithm = roi_generation_algorithm
        roi_items.append(roi)
        colours.append((colors or {}).get(value, _PALETTE[n % len(_PALETTE)]))
        observation = Dataset()
        observation.ObservationNumber = value
        observation.ReferencedROINumber = value
        observation.RTROIInterpretedType = interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    image_sequences = [_image_sequence(reference.sop_class_uid, uid) if own_images else b"" for uid in uids]
    ds[_ROI_CONTOUR_SEQUENCE] = _roi_contour_sequence(values, colours, contours, image_sequences)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    # Declare the encoding the raw ROIContourSequence already has, so pydicom writes it as it is.
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


def _image_ref(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class_uid
    ref.ReferencedSOPInstanceUID = sop_instance_uid
    return ref


def _names_from_meta(labels: Volume) -> dict[int, str]:
    names = labels.meta.get("label_names")
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    sidecar = labels.meta.get("sidecar", {})
    raw = sidecar.get("labels") if isinstance(sidecar, dict) else None
    if isinstance(raw, dict):
        out = {}
        for key, value in raw.items():
            try:
                out[int(key)] = str(value)
            except ValueError:  # {"name": value} layout (dataset.json style)
                if isinstance(value, int):
                    out[value] = str(key)
        return {k: v for k, v in out.items() if k != 0}
    return {}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medseg")
    except Exception:  # not installed as a distribution
        return "unknown"


def labels_to_rtstruct(
    labels: Volume,
    reference: PathLike | ReferenceSeries,
    out_path: PathLike,
    *,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write a label volume as an RTSTRUCT referencing the series it was segmented on.

    Args:
        labels: Label volume on the series grid (see :func:`build_rtstruct`).
        reference: The series folder or a loaded :class:`ReferenceSeries`.
        out_path: The ``.dcm`` file to write (atomically).
        overwrite: Replace an existing file.
        **options: Passed to :func:`build_rtstruct` (``label_names``, ``colors``, ...).

    Returns:
        The written path.

    Raises:
        InputError: Empty UIDs in the reference series.
        GeometryError: Labels not on the series grid.
        OutputExistsError: ``out_path`` exists and ``overwrite`` is false.
    """
    if not isinstance(reference, ReferenceSeries):
        reference = load_reference_series(reference)
    out = Path(out_path)
    ds = build_rtstruct(labels, reference, **options)
    with atomic_path(out, overwrite=overwrite) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return out
