"""DICOM series discovery (headers only) and loading with exact geometry.

Discovery (:func:`scan_dicom`, :func:`discover_series`) walks a folder recursively, reads
only headers (``stop_before_pixels`` plus ``specific_tags``) and turns every image into
*frames*: a single-frame file is one frame, an enhanced multi-frame file one frame per
``PerFrameFunctionalGroupsSequence`` item, a Siemens mosaic one frame per tile.  Frames are
grouped by SeriesInstanceUID and split further by orientation, image size, pixel spacing
and echo, and - only when that yields several full volumes - by acquisition, temporal
position or image type.  Non-image objects (SR, RTSTRUCT, SEG, presentation states,
DICOMDIR, ...), localizers and files without pixel data are skipped with a reason.

Loading (:func:`read_dicom_series`, :func:`load_series`) is in :mod:`medseg.io.dicom_stack`:
frames are sorted by position along the slice normal (never by InstanceNumber), the slice
spacing is measured from those positions, and pixel data is decoded by pydicom's decoders
straight from the byte offset recorded during discovery (no second header parse).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import os
import re
import struct
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from medseg.errors import InputError
from medseg.io.volume import LPS_FROM_RAS, Volume
from medseg.types import PathLike

__all__ = [
    "DicomFrame",
    "DicomScan",
    "DicomSeries",
    "OutputDtype",
    "PixelLayout",
    "TiltPolicy",
    "discover_series",
    "is_dicom_file",
    "load_series",
    "read_dicom_series",
    "scan_dicom",
]

TiltPolicy = Literal["error", "resample"]
OutputDtype = Literal["float32", "native"]

_VOLUME_SUFFIX = re.compile(r"#vol=(\d+)$")  # one volume of a multi-volume series, 1-based
_ORIENTATION_TOLERANCE = 1e-3  # max difference of direction cosines within one stack
_HEADER_CHUNK = 65536  # bytes read at once per file during discovery (most headers are far smaller)

#: Header elements read during discovery (everything else is skipped unparsed).
_HEADER_TAGS: list[Any] = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PatientID",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "Manufacturer",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "BodyPartExamined",
    "ImageType",
    "InstanceNumber",
    "AcquisitionNumber",
    "TemporalPositionIdentifier",
    "EchoNumbers",
    "EchoTime",
    "GantryDetectorTilt",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DiffusionBValue",
    "DiffusionGradientOrientation",
    (0x0019, 0x0010),  # private creator of the Siemens MR header block
    (0x0019, 0x100C),  # SIEMENS MR HEADER B_value
    (0x0019, 0x100E),  # SIEMENS MR HEADER DiffusionGradientDirection
]

#: SOP classes that are not image volumes even when they carry pixel data.
_NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "DICOMDIR (media directory)",
    "1.2.840.10008.5.1.4.1.1.88": "structured report",
    "1.2.840.10008.5.1.4.1.1.11": "presentation state",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation (DICOM SEG)",
    "1.2.840.10008.5.1.4.1.1.66.7": "segmentation (DICOM SEG)",  # label map segmentation
    "1.2.840.10008.5.1.4.1.1.66": "raw data, registration, fiducials or surface",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set (RTSTRUCT)",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose",
    "1.2.840.10008.5.1.4.1.1.481": "RT image, plan or treatment record",
    "1.2.840.10008.5.1.4.1.1.104": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9": "waveform",
    "1.2.840.10008.5.1.4.1.1.77.1.6": "whole-slide microscopy (not a volume)",
}

_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV"}


# ----------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class PixelLayout:
    """How to decode one file's pixel data without parsing its header again.

    Attributes:
        transfer_syntax: Transfer Syntax UID of the file.
        value_offset: Byte offset of the PixelData element's value (``None``: re-read with pydicom).
        value_length: Length of that value in bytes (``None`` for encapsulated / undefined length).
        options: Decoder options for :meth:`pydicom.pixels.decoders.base.Decoder.as_array`
            (rows, columns, bits, photometric interpretation, number of frames, ...).
    """

    transfer_syntax: str
    value_offset: int | None
    value_length: int | None
    options: dict[str, Any]


@dataclass(frozen=True, eq=False)
class DicomFrame:
    """One 2D image placed in patient space (headers only).

    Attributes:
        path: The file holding the frame.
        frame: Index of the frame in a multi-frame file (0 for single-frame files).
        tile: Index of the tile in a Siemens mosaic, else ``None``.
        rows: Rows of the frame (of the tile for mosaics).
        cols: Columns of the frame.
        position: ImagePositionPatient (LPS mm) of the frame's first pixel, or ``None``.
        orientation: ImageOrientationPatient (row then column direction cosines), or ``None``.
        pixel_spacing: PixelSpacing ``(between rows, between columns)`` in mm, or ``None``.
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        sop_uid: SOPInstanceUID of the file.
        instance: InstanceNumber (only for messages and tie-breaks).
        echo: Echo number / effective echo time (splits series).
        acquisition: AcquisitionNumber (splits series only into full volumes).
        temporal: Temporal position (splits series only into full volumes).
        image_type: ImageType / FrameType values.
        stack: Enhanced multi-frame StackID.
        volume: Index of the volume (time point, diffusion direction, echo) the frame belongs to
            in a multi-volume series (0 otherwise; set when the series is grouped).
        b_value: Diffusion b-value in s/mm², if the header has one.
        gradient: Diffusion gradient direction (unit vector, LPS patient axes), if any.
    """

    path: Path
    frame: int
    tile: int | None
    rows: int
    cols: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slope: float = 1.0
    intercept: float = 0.0
    sop_uid: str = ""
    instance: int | None = None
    echo: str = ""
    acquisition: str = ""
    temporal: str = ""
    image_type: tuple[str, ...] = ()
    stack: str = ""
    volume: int = 0
    b_value: float | None = None
    gradient: tuple[float, float, float] | None = None


@dataclass
class DicomSeries:
    """One image series (or split sub-series) found on disk, from headers only.

    Attributes:
        uid: SeriesInstanceUID (may be empty in anonymised data).
        files: The files holding the frames, sorted by path.
        modality: Modality (``CT``, ``MR``, ...).
        description: SeriesDescription.
        key: Stable identifier: the UID, plus ``#name=value`` parts when the UID was split
            (``1.2.3#echo=2``), or ``nouid-<hash>`` for an empty UID.
        frames: The 2D frames of the series (unsorted).
        study_uid: StudyInstanceUID.
        series_number: SeriesNumber, if any.
        body_part: BodyPartExamined.
        image_type: ImageType of the first frame.
        patient_id: PatientID.
        study_date: StudyDate.
        manufacturer: Manufacturer.
        sop_class_uid: SOP Class UID.
        frame_of_reference_uid: FrameOfReferenceUID.
        slice_thickness: SliceThickness in mm, if given.
        gantry_tilt: GantryDetectorTilt in degrees, if given.
        layouts: Per file, how to decode its pixels.
        mosaic: True when the frames are tiles of Siemens mosaics.
        multiframe: True when the frames come from enhanced / multi-frame files.
    """

    uid: str
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    description: str = ""
    key: str = ""
    frames: list[DicomFrame] = field(default_factory=list)
    study_uid: str = ""
    series_number: int | None = None
    body_part: str = ""
    image_type: tuple[str, ...] = ()
    patient_id: str = ""
    study_date: str = ""
    manufacturer: str = ""
    sop_class_uid: str = ""
    frame_of_reference_uid: str = ""
    slice_thickness: float | None = None
    gantry_tilt: float | None = None
    layouts: dict[Path, PixelLayout] = field(default_factory=dict, repr=False)
    mosaic: bool = False
    multiframe: bool = False

    # ---------------------------------------------------------------- derived
    @property
    def num_slices(self) -> int:
        """Number of distinct slice positions (frames without a position count one each)."""
        along = self._along_normal()
        if along is None:
            return len(self.frames)
        return len(_unique_sorted(along))

    @property
    def num_volumes(self) -> int:
        """Number of volumes (time points, diffusion directions, echoes) of a multi-volume series; 1 for 3D."""
        return 1 + max((f.volume for f in self.frames), default=0)

    @property
    def volume_b_values(self) -> list[float | None]:
        """Diffusion b-value of each volume (``None`` where the headers have none)."""
        out: list[float | None] = [None] * self.num_volumes
        for frame in self.frames:
            if out[frame.volume] is None:
                out[frame.volume] = frame.b_value
        return out

    @property
    def volume_gradients(self) -> list[tuple[float, float, float] | None]:
        """Diffusion gradient direction of each volume (unit vector, LPS; ``None`` for b = 0 / none)."""
        out: list[tuple[float, float, float] | None] = [None] * self.num_volumes
        for frame in self.frames:
            if out[frame.volume] is None:
                out[frame.volume] = frame.gradient
        return out

    @property
    def rows(self) -> int:
        """Rows of each slice."""
        return self.frames[0].rows if self.frames else 0

    @property
    def cols(self) -> int:
        """Columns of each slice."""
        return self.frames[0].cols if self.frames else 0

    @property
    def orientation(self) -> tuple[float, ...] | None:
        """ImageOrientationPatient (6 direction cosines) shared by the frames."""
        return self.frames[0].orientation if self.frames else None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape ``(X=columns, Y=rows, Z=slices)`` the series loads to."""
        return (self.cols, self.rows, self.num_slices)

    @property
    def slice_spacing(self) -> float | None:
        """Median distance between consecutive slice positions (mm), or ``None`` with < 2 positions."""
        along = self._along_normal()
        if along is None:
            return None
        unique = _unique_sorted(along)
        if len(unique) < 2:
            return None
        return float(np.median(np.diff(unique)))

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """Voxel size ``(X, Y, Z)`` in mm from headers, or ``None`` without pixel spacing."""
        ps = self.frames[0].pixel_spacing if self.frames else None
        if ps is None:
            return None
        z = self.slice_spacing
        if z is None:
            z = self.slice_thickness or 1.0
        return (ps[1], ps[0], float(z))

    @property
    def orientation_code(self) -> str:
        """Three-letter RAS+ axis code of the volume this series loads to (``""`` if unknown)."""
        iop = self.orientation
        if iop is None:
            return ""
        import nibabel as nib

        row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
        normal = np.cross(row, col)
        affine = np.eye(4)
        affine[:3, :3] = LPS_FROM_RAS @ np.stack([row, col, normal], axis=1)
        try:
            return "".join(str(c) for c in nib.aff2axcodes(affine))
        except Exception:
            return ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (what ``medseg info`` prints)."""
        spacing = self.spacing
        return {
            "key": self.key,
            "series_uid": self.uid,
            "study_uid": self.study_uid,
            "series_number": self.series_number,
            "modality": self.modality,
            "description": self.description,
            "body_part": self.body_part,
            "image_type": list(self.image_type),
            "patient_id": self.patient_id,
            "study_date": self.study_date,
            "manufacturer": self.manufacturer,
            "sop_class_uid": self.sop_class_uid,
            "num_files": len(self.files),
            "num_frames": len(self.frames),
            "num_slices": self.num_slices,
            "num_volumes": self.num_volumes,
            "b_values": self.volume_b_values if any(b is not None for b in self.volume_b_values) else None,
            "rows": self.rows,
            "cols": self.cols,
            "shape": list(self.shape),
            "spacing": list(spacing) if spacing else None,
            "slice_thickness": self.slice_thickness,
            "orientation": list(self.orientation) if self.orientation else None,
            "orientation_code": self.orientation_code,
            "gantry_tilt": self.gantry_tilt,
            "mosaic": self.mosaic,
            "multiframe": self.multiframe,
        }

    def select_volume(self, number: int) -> DicomSeries:
        """The series of one volume of a multi-volume series, keyed ``<key>#vol=<number>``.

        Args:
            number: 1-based volume number (as ``medseg info`` counts them).

        Raises:
            InputError: No such volume.
        """
        if not 1 <= number <= self.num_volumes:
            raise InputError(
                self.files[0] if self.files else self.key,
                f"series {self.key} has {self.num_volumes} volume(s); there is no volume {number}",
            )
        frames = [dataclasses.replace(f, volume=0) for f in self.frames if f.volume == number - 1]
        files = sorted({f.path for f in frames})
        return dataclasses.replace(
            self,
            key=f"{self.key}#vol={number}",
            frames=frames,
            files=files,
            layouts={p: self.layouts[p] for p in files if p in self.layouts},
        )

    def _along_normal(self) -> np.ndarray | None:
        if not self.frames or any(f.position is None or f.orientation is None for f in self.frames):
            return None
        iop = np.asarray(self.frames[0].orientation, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        return np.array([f.position for f in self.frames], dtype=np.float64) @ normal


@dataclass
class DicomScan:
    """Result of :func:`scan_dicom`: the series found and the files skipped (with reasons).

    Attributes:
        root: What was scanned.
        series: The image series, sorted by patient, study, series number and key.
        skipped: ``(file, reason)`` for every file that is not part of an image series.
    """

    root: Path
    series: list[DicomSeries]
    skipped: list[tuple[Path, str]]

    def skipped_summary(self) -> dict[str, int]:
        """Count of skipped files per reason (reasons without the per-file detail)."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))


# ----------------------------------------------------------------------------- discovery
def is_dicom_file(path: Path) -> bool:
    """True if ``path`` looks like DICOM: ``DICM`` at byte 128, or a preamble-less dataset."""
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    return _looks_like_raw_dataset(head)


def _looks_like_raw_dataset(head: bytes) -> bool:
    """Preamble-less (ACR-NEMA style) datasets start with a group 0x0008 element in little endian."""
    if len(head) < 8 or head[0:2] != b"\x08\x00":
        return False
    element = int.from_bytes(head[2:4], "little")
    if element > 0x0100:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR
    length = int.from_bytes(head[4:8], "little")
    return length < 1024  # implicit VR with a plausible length


def scan_dicom(root: PathLike, *, include_localizers: bool = False) -> DicomScan:
    """Find every DICOM image series under ``root`` (a folder, recursively, or one file), headers only.

    Args:
        root: Folder or file.
        include_localizers: Keep images whose ImageType says LOCALIZER (scouts/topograms).

    Returns:
        The :class:`DicomScan` (series and skipped files with reasons).

    Raises:
        InputError: ``root`` does not exist or cannot be listed.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    skipped: list[tuple[Path, str]] = []
    headers: list[_FileHeader] = []
    for path in _walk(root, skipped):
        result = _read_header(path, include_localizers=include_localizers)
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            headers.append(result)
    return DicomScan(root=root, series=_group(headers), skipped=skipped)


def discover_series(root: PathLike, *, include_localizers: bool = False) -> list[DicomSeries]:
    """Group the image files under ``root`` (a folder, recursive, or one file) into series.

    Only headers are read.  Files that are not DICOM, DICOM objects that are not images
    (SR, RTSTRUCT, SEG, presentation states, DICOMDIR, ...), localizers and files without
    pixel data are ignored (see :func:`scan_dicom` for the reasons).
    """
    return scan_dicom(root, include_localizers=include_localizers).series


def _walk(root: Path, skipped: list[tuple[Path, str]]) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(root, "permission denied")

    def onerror(exc: OSError) -> None:
        skipped.append((Path(exc.filename or root), f"unreadable: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                yield path


_BINARY_FORMATS = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FD": "d", "FL": "f"}
_TEXT_FAST_VRS = {"DS", "IS", "CS", "UI", "DA", "TM", "AS"}
_TAGS: dict[str, BaseTag] = {}


class _FastHeader:
    """Read-only view of a header with cheap value conversion.

    pydicom's attribute access converts every value through its full machinery (keyword
    lookup, validation, ``DSfloat``/``MultiValue`` objects), which costs several times the
    parse itself during discovery.  Numbers (DS, IS, US, ...), code strings and UIDs are
    converted here directly from the raw bytes (pure ASCII by definition); person names,
    descriptions and sequences still go through pydicom (character sets, nesting).
    """

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.file_meta = ds.file_meta

    def __contains__(self, keyword: str) -> bool:
        return self.get(keyword) is not None

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_") or tag_for_keyword(keyword) is None:
            return getattr(self.ds, keyword)
        value = self.get(keyword)
        if value is None:
            raise AttributeError(keyword)
        return value

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _TAGS.get(keyword)
        if tag is None:
            tag = _TAGS[keyword] = Tag(keyword)
        elem = self.ds.get_item(tag)
        if elem is None:
            return default
        if not isinstance(elem, RawDataElement):
            value = elem.value
        else:
            vr = elem.VR or dictionary_VR(tag)
            value = _convert_raw(elem, vr) if vr in _BINARY_FORMATS or vr in _TEXT_FAST_VRS else self.ds[tag].value
        return default if value is None or value == "" else value


def _convert_raw(elem: RawDataElement, vr: str) -> Any:
    raw = elem.value
    if not raw:
        return None
    if vr in _BINARY_FORMATS:
        fmt = _BINARY_FORMATS[vr]
        size = struct.calcsize(fmt)
        count = len(raw) // size
        values = struct.unpack(("<" if elem.is_little_endian else ">") + f"{count}{fmt}", raw[: count * size])
        return values[0] if count == 1 else list(values)
    parts = [p.strip(" \x00") for p in raw.decode("latin-1").split("\\")]
    try:
        if vr == "DS":
            out: list[Any] = [float(p) if p else None for p in parts]
        elif vr == "IS":
            out = [int(float(p)) if p else None for p in parts]
        else:
            out = parts
    except ValueError:
        return None
    return out[0] if len(out) == 1 else out


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


@dataclass
class _FileHeader:
    path: Path
    uid: str
    group_fallback: str
    attrs: dict[str, Any]
    layout: PixelLayout
    frames: list[DicomFrame]
    mosaic: bool
    multiframe: bool


def _read_header(path: Path, *, include_localizers: bool) -> _FileHeader | str:
    """Read one file's header; return the parsed header or the reason it is skipped."""
    if path.name.upper() == "DICOMDIR":
        return "DICOMDIR (media directory)"
    try:
        with path.open("rb") as fh:
            chunk = fh.read(_HEADER_CHUNK)
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    if chunk[128:132] != b"DICM" and not _looks_like_raw_dataset(chunk[:132]):
        return "not DICOM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds: Any
            ds, pixel_pos, pixel_head = _parse_header(path, chunk)
            if "TransferSyntaxUID" not in ds.file_meta and "SOPClassUID" not in ds:
                return "not DICOM"
            sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
            reason = _non_image_reason(sop_class)
            if reason:
                return reason
            if "Rows" not in ds or "Columns" not in ds:
                return "no image (no Rows/Columns)"
            if not _is_pixel_tag(pixel_head):
                return "no pixel data"
            image_type = tuple(str(v).upper() for v in _as_list(ds.get("ImageType")))
            if "LOCALIZER" in image_type and not include_localizers:
                return "localizer"
            mosaic = _is_mosaic_header(ds)
            if mosaic:
                with path.open("rb") as fh:  # the CSA header is needed: read the full header once more
                    ds = _FastHeader(pydicom.dcmread(fh, stop_before_pixels=True, force=True))
            layout = _pixel_layout(ds, pixel_pos, pixel_head)
            frames, multiframe = _frames(path, ds, mosaic=mosaic, include_localizers=include_localizers)
    except InputError as exc:
        return f"unusable: {exc.reason}"
    except (InvalidDicomError, OSError, EOFError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        return f"malformed header: {type(exc).__name__}: {exc}"
    if not frames:
        return "localizer"
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    attrs = {
        "modality": str(ds.get("Modality", "") or ""),
        "description": str(ds.get("SeriesDescription", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "body_part": str(ds.get("BodyPartExamined", "") or ""),
        "image_type": image_type,
        "patient_id": str(ds.get("PatientID", "") or ""),
        "study_date": str(ds.get("StudyDate", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "sop_class_uid": sop_class,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "slice_thickness": _float_or_none(ds.get("SliceThickness")) or _shared_slice_thickness(ds),
        "gantry_tilt": _float_or_none(ds.get("GantryDetectorTilt")),
    }
    fallback = "|".join(
        str(v)
        for v in (
            attrs["study_uid"],
            attrs["frame_of_reference_uid"],
            attrs["series_number"],
            attrs["modality"],
            attrs["description"],
        )
    )
    return _FileHeader(path, uid, fallback, attrs, layout, frames, mosaic, multiframe)


def _parse_header(path: Path, chunk: bytes) -> tuple[_FastHeader, int, bytes]:
    """Parse the header up to the pixel data; return it, the pixel element's offset and its first 12 bytes.

    The first :data:`_HEADER_CHUNK` bytes are parsed from memory (much faster than through a
    buffered file); a header that does not end inside them is parsed again from the file.
    """
    buffer = io.BytesIO(chunk)
    try:
        ds = pydicom.dcmread(buffer, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        pixel_pos = buffer.tell()
        pixel_head = chunk[pixel_pos : pixel_pos + 12]
        if (len(pixel_head) == 12 and _is_pixel_tag(pixel_head)) or len(chunk) < _HEADER_CHUNK:
            return _FastHeader(ds), pixel_pos, pixel_head
    except (EOFError, ValueError, OSError, InvalidDicomError):
        if len(chunk) < _HEADER_CHUNK:
            raise
    with path.open("rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        pixel_pos = fh.tell()
        pixel_head = fh.read(12)
    return _FastHeader(ds), pixel_pos, pixel_head


def _non_image_reason(sop_class: str) -> str:
    """Why a SOP class is not an image volume (``""`` if it may be one); the most specific entry wins."""
    for prefix, reason in _NON_IMAGE_SOP_CLASSES.items():
        if sop_class == prefix or sop_class.startswith(prefix + "."):
            return reason
    return ""


def _is_pixel_tag(head: bytes) -> bool:
    if len(head) < 4:
        return False
    le = (int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little"))
    be = (int.from_bytes(head[0:2], "big"), int.from_bytes(head[2:4], "big"))
    return le in _PIXEL_TAGS or be in _PIXEL_TAGS


def _is_mosaic_header(ds: Any) -> bool:
    from medseg.io.mosaic import is_mosaic

    return is_mosaic(ds) and int(ds.get("NumberOfFrames", 1) or 1) == 1


def _pixel_layout(ds: Any, pixel_pos: int, pixel_head: bytes) -> PixelLayout:
    ts = ds.file_meta.get("TransferSyntaxUID")
    ts = pydicom.uid.UID(str(ts)) if ts is not None else _syntax_from_encoding(ds)
    options: dict[str, Any] = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated),
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        "number_of_frames": int(ds.get("NumberOfFrames", 1) or 1),
        "pixel_keyword": "PixelData",
    }
    if options["samples_per_pixel"] > 1:
        options["planar_configuration"] = int(ds.get("PlanarConfiguration", 0) or 0)
    if ts == pydicom.uid.DeflatedExplicitVRLittleEndian or not ts.is_transfer_syntax:
        return PixelLayout(str(ts), None, None, options)
    little = ts.is_little_endian
    order: Literal["little", "big"] = "little" if little else "big"
    tag = (int.from_bytes(pixel_head[0:2], order), int.from_bytes(pixel_head[2:4], order))
    if tag != (0x7FE0, 0x0010):  # float / double pixel data: leave it to pydicom
        return PixelLayout(str(ts), None, None, options)
    if ts.is_implicit_VR:
        offset, length = pixel_pos + 8, int.from_bytes(pixel_head[4:8], order)
    elif pixel_head[4:6] in _LONG_VRS:
        offset, length = pixel_pos + 12, int.from_bytes(pixel_head[8:12], order)
    else:
        offset, length = pixel_pos + 8, int.from_bytes(pixel_head[6:8], order)
    return PixelLayout(str(ts), offset, None if length == 0xFFFFFFFF else length, options)


def _syntax_from_encoding(ds: Any) -> pydicom.uid.UID:
    """Transfer syntax of a dataset without file meta (preamble-less files), from how pydicom read it."""
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit or implicit is None:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


# ----------------------------------------------------------------------------- frames
def _frames(path: Path, ds: Any, *, mosaic: bool, include_localizers: bool) -> tuple[list[DicomFrame], bool]:
    """The 2D frames of one file and whether it is a multi-frame object."""
    common: dict[str, Any] = {
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "instance": _int_or_none(ds.get("InstanceNumber")),
        "echo": _str(ds.get("EchoNumbers")),
        "acquisition": _str(ds.get("AcquisitionNumber")),
        "temporal": _str(ds.get("TemporalPositionIdentifier")),
        "image_type": tuple(str(v).upper() for v in _as_list(ds.get("ImageType"))),
    }
    common["b_value"], common["gradient"] = _diffusion(ds)
    if mosaic:
        from medseg.io.mosaic import mosaic_diffusion, mosaic_layout

        raw = ds.ds if isinstance(ds, _FastHeader) else ds
        layout = mosaic_layout(raw, path)
        if common["b_value"] is None:
            common["b_value"], common["gradient"] = mosaic_diffusion(raw)
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        spacing = _floats(ds.get("PixelSpacing"), 2)
        slope, intercept = _rescale(ds)
        return [
            DicomFrame(
                path=path,
                frame=0,
                tile=k,
                rows=layout.tile_rows,
                cols=layout.tile_cols,
                position=(float(p[0]), float(p[1]), float(p[2])),
                orientation=iop,
                pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
                slope=slope,
                intercept=intercept,
                **common,
            )
            for k, p in enumerate(layout.positions)
        ], False
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and n_frames == 1:
        slope, intercept = _rescale(ds)
        spacing = _floats(ds.get("PixelSpacing"), 2)
        position = _floats(ds.get("ImagePositionPatient"), 3)
        return [
            DicomFrame(
                path=path,
                frame=0,
                tile=None,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                position=(position[0], position[1], position[2]) if position else None,
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
                slope=slope,
                intercept=intercept,
                **common,
            )
        ], False
    return _enhanced_frames(path, ds, n_frames, common, include_localizers=include_localizers), True


def _enhanced_frames(
    path: Path, ds: Any, n_frames: int, common: dict[str, Any], *, include_localizers: bool
) -> list[DicomFrame]:
    """Frames of an enhanced (or legacy converted) multi-frame image from its functional groups."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n_frames:
        raise InputError(path, f"{len(per_frame)} per-frame functional group items for {n_frames} frames")
    top_position = _floats(ds.get("ImagePositionPatient"), 3)
    frames: list[DicomFrame] = []
    for index in range(n_frames):
        item = per_frame[index] if per_frame else None

        def group(keyword: str, item: Any = item) -> Any:
            for source in (item, shared):
                if source is not None and keyword in source and len(source[keyword].value):
                    return source[keyword].value[0]
            return None

        pos_item = group("PlanePositionSequence")
        ori_item = group("PlaneOrientationSequence")
        measures = group("PixelMeasuresSequence")
        transform = group("PixelValueTransformationSequence")
        content = group("FrameContentSequence")
        frame_type_item = group("CTImageFrameTypeSequence") or group("MRImageFrameTypeSequence")
        echo_item = group("MREchoSequence")
        diffusion_item = group("MRDiffusionSequence")
        position = _floats(pos_item.get("ImagePositionPatient"), 3) if pos_item is not None else None
        if position is None and n_frames == 1:
            position = top_position
        orientation = _floats(ori_item.get("ImageOrientationPatient"), 6) if ori_item is not None else None
        if orientation is None:
            orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        spacing = _floats(measures.get("PixelSpacing"), 2) if measures is not None else None
        if spacing is None:
            spacing = _floats(ds.get("PixelSpacing"), 2)
        slope, intercept = _rescale(transform if transform is not None else ds)
        frame_type = (
            tuple(str(v).upper() for v in (frame_type_item.get("FrameType") or []))
            if frame_type_item is not None
            else common["image_type"]
        )
        if "LOCALIZER" in frame_type and not include_localizers:
            continue
        fields = dict(common)
        fields["image_type"] = frame_type
        if echo_item is not None and echo_item.get("EffectiveEchoTime") is not None:
            fields["echo"] = f"{float(echo_item.EffectiveEchoTime):g}ms"
        if diffusion_item is not None:
            fields["b_value"], fields["gradient"] = _diffusion(diffusion_item)
        if content is not None:
            fields["temporal"] = _str(content.get("TemporalPositionIndex")) or fields["temporal"]
            stack = _str(content.get("StackID"))
        else:
            stack = ""
        frames.append(
            DicomFrame(
                path=path,
                frame=index,
                tile=None,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                position=(position[0], position[1], position[2]) if position else None,
                orientation=orientation,
                pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
                slope=slope,
                intercept=intercept,
                stack=stack,
                **{k: v for k, v in fields.items()},
            )
        )
    return frames


def _rescale(source: Any) -> tuple[float, float]:
    slope = _float_or_none(source.get("RescaleSlope"))
    intercept = _float_or_none(source.get("RescaleIntercept"))
    return (slope if slope not in (None, 0.0) else 1.0), (intercept if intercept is not None else 0.0)  # type: ignore[return-value]


def _diffusion(ds: Any) -> tuple[float | None, tuple[float, float, float] | None]:
    """``(b-value, gradient direction)`` from a header or an MRDiffusionSequence item.

    Standard attributes first (DiffusionBValue, DiffusionGradientOrientation, directly or in a
    DiffusionGradientDirectionSequence), then the Siemens MR header (0019,100C / 0019,100E).
    A zero or missing gradient is ``None``; directions are normalised to unit length.
    """
    b_value = _float_or_none(ds.get("DiffusionBValue"))
    gradient = _floats(ds.get("DiffusionGradientOrientation"), 3)
    if gradient is None and "DiffusionGradientDirectionSequence" in ds:
        items = ds.get("DiffusionGradientDirectionSequence") or []
        if len(items):
            gradient = _floats(items[0].get("DiffusionGradientOrientation"), 3)
    if b_value is None and _siemens_creator(ds):
        raw = ds.ds if isinstance(ds, _FastHeader) else ds
        b_value = _private_number(raw.get((0x0019, 0x100C)))
        if gradient is None:
            gradient = _private_vector(raw.get((0x0019, 0x100E)))
    return b_value, _unit(gradient)


def _siemens_creator(ds: Any) -> bool:
    raw = ds.ds if isinstance(ds, _FastHeader) else ds
    try:
        creator = raw.get((0x0019, 0x0010))
    except Exception:
        return False
    value = getattr(creator, "value", None)
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    return str(value or "").strip(" \x00").upper() == "SIEMENS MR HEADER"


def _private_number(elem: Any) -> float | None:
    value = getattr(elem, "value", None)
    if isinstance(value, bytes):  # implicit VR / UN: the IS text
        value = value.decode("latin-1", "replace").strip(" \x00")
    return _float_or_none(value)


def _private_vector(elem: Any) -> tuple[float, ...] | None:
    value = getattr(elem, "value", None)
    if isinstance(value, bytes):  # implicit VR / UN: three little-endian doubles
        if len(value) != 24:
            return None
        value = list(struct.unpack("<3d", value))
    return _floats(value, 3)


def _unit(vector: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    if vector is None:
        return None
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        return None
    return (vector[0] / norm, vector[1] / norm, vector[2] / norm)


def _shared_slice_thickness(ds: Any) -> float | None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0] and len(shared[0].PixelMeasuresSequence):
        return _float_or_none(shared[0].PixelMeasuresSequence[0].get("SliceThickness"))
    return None


# ----------------------------------------------------------------------------- grouping
def _group(headers: list[_FileHeader]) -> list[DicomSeries]:
    by_uid: dict[str, list[_FileHeader]] = defaultdict(list)
    for header in headers:
        base = header.uid or "nouid-" + hashlib.sha1(header.group_fallback.encode()).hexdigest()[:12]
        by_uid[base].append(header)
    series: list[DicomSeries] = []
    for base, group in by_uid.items():
        frames = [f for h in group for f in h.frames]
        parts = _split(frames)
        keyed = _name_parts(base, parts)
        lookup = {h.path: h for h in group}
        for key, part_frames in keyed:
            series.append(_make_series(key, part_frames, lookup))
    series.sort(key=lambda s: (s.patient_id, s.study_date, s.study_uid, s.series_number or 0, _natural_key(s.key)))
    return series


def _split(frames: list[DicomFrame]) -> list[tuple[dict[str, str], list[DicomFrame]]]:
    """Split a UID's frames into stacks that can each form one (3D or 4D) volume.

    Always split by orientation, image size, pixel spacing and stack ID.  A stack with repeated
    slice positions is a multi-volume series when echo, temporal position, acquisition number
    and/or diffusion b-value/direction divide it into volumes on one set of positions: it stays
    one series and its frames get their volume index (:func:`_volumes`).  Parts on different
    positions become separate series; image type (magnitude/phase, derived maps) always
    separates.  Echoes without repeated positions are separate series.
    """
    hard: dict[tuple[Any, ...], list[DicomFrame]] = defaultdict(list)
    orientations: list[np.ndarray] = []
    for frame in frames:
        hard[
            (
                _orientation_index(frame, orientations),
                frame.rows,
                frame.cols,
                _spacing_key(frame),
                frame.stack,
            )
        ].append(frame)
    parts: list[tuple[dict[str, str], list[DicomFrame]]] = []
    for (orient, rows, cols, spacing, stack), stack_frames in sorted(hard.items(), key=lambda kv: str(kv[0])):
        base = {"orient": str(orient), "size": f"{cols}x{rows}", "spacing": spacing, "stack": stack}
        for extra, sub in _split_repeated(stack_frames):
            parts.append(({**base, **extra}, sub))
    return parts


#: Attributes that tell the volumes of a multi-volume stack apart, in the order volumes are sorted by.
_VOLUME_KEYS: dict[str, Any] = {
    "echo": lambda f: f.echo,
    "time": lambda f: f.temporal,
    "acq": lambda f: f.acquisition,
    "dwi": lambda f: "" if f.b_value is None else f"b{f.b_value:g}" + _gradient_text(f.gradient),
}


def _gradient_text(gradient: tuple[float, float, float] | None) -> str:
    return "" if gradient is None else "g" + ",".join(f"{v:.4f}" for v in gradient)


def _split_repeated(frames: list[DicomFrame]) -> list[tuple[dict[str, str], list[DicomFrame]]]:
    echoes = {f.echo for f in frames}
    if not _has_repeated_positions(frames):
        if len(echoes) > 1:  # echoes on different positions: one series per echo
            groups = _group_by(frames, _VOLUME_KEYS["echo"])
            return [({"echo": value}, groups[value]) for value in sorted(groups, key=_natural_key)]
        return [({}, frames)]
    types = _group_by(frames, lambda f: "\\".join(f.image_type))
    if len(types) > 1 and all(len(g) >= 2 for g in types.values()):
        return [
            ({"type": value, **extra}, sub)
            for value in sorted(types, key=_natural_key)
            for extra, sub in _split_repeated(types[value])
        ]
    varying = [name for name, getter in _VOLUME_KEYS.items() if len({getter(f) for f in frames}) > 1]
    for size in range(len(varying), 0, -1):
        for names in itertools.combinations(varying, size):
            groups = _group_by(frames, functools.partial(_volume_key, names=names))
            if any(_has_repeated_positions(g) for g in groups.values()):
                continue
            ordered = sorted(groups.values(), key=functools.partial(_volume_order, names=names))
            if _same_positions(ordered):
                return [({}, _numbered(ordered))]
            if all(len(g) >= 2 for g in ordered):
                return [({n: _VOLUME_KEYS[n](g[0]) or "-" for n in names}, g) for g in ordered]
    by_instance = _volumes_by_instance(frames, varying)
    if by_instance is not None:
        return [({}, _numbered(by_instance))]
    return [({}, frames)]


def _volumes_by_instance(frames: list[DicomFrame], varying: list[str]) -> list[list[DicomFrame]] | None:
    """Volumes as the k-th frame by InstanceNumber at every position (as dcm2niix orders them).

    Used when the volume attributes vary but repeat (two b = 0 volumes of a diffusion series
    with one AcquisitionNumber): every position must hold the same number of frames with
    distinct instance numbers, and each resulting volume must be constant in the attributes
    that vary.  Plain duplicates (nothing varies) stay duplicates.
    """
    if not varying or any(f.instance is None for f in frames):
        return None
    iop = np.asarray(frames[0].orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    along = np.array([f.position for f in frames], dtype=np.float64) @ normal
    order = np.argsort(along, kind="stable")
    positions: list[list[DicomFrame]] = []
    last = None
    for index in order:
        if last is None or along[index] - last >= 1e-3:
            positions.append([])
        positions[-1].append(frames[index])
        last = along[index]
    count = len(positions[0])
    if count < 2 or any(len(p) != count or len({f.instance for f in p}) != count for p in positions):
        return None
    volumes: list[list[DicomFrame]] = [[] for _ in range(count)]
    for at_position in positions:
        for rank, frame in enumerate(sorted(at_position, key=lambda f: f.instance or 0)):
            volumes[rank].append(frame)
    for volume in volumes:
        if any(len({_VOLUME_KEYS[n](f) for f in volume}) > 1 for n in varying):
            return None
    return volumes


def _volume_key(frame: DicomFrame, *, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_VOLUME_KEYS[n](frame) for n in names)


def _group_by(frames: list[DicomFrame], key: Any) -> dict[Any, list[DicomFrame]]:
    groups: dict[Any, list[DicomFrame]] = defaultdict(list)
    for frame in frames:
        groups[key(frame)].append(frame)
    return groups


def _volume_order(frames: list[DicomFrame], *, names: tuple[str, ...]) -> tuple[Any, ...]:
    """Numeric order of volumes: echo, temporal position, acquisition, first instance number, diffusion."""
    head = [_natural_key(_VOLUME_KEYS[n](frames[0])) for n in ("echo", "time", "acq") if n in names]
    first = min((f.instance for f in frames if f.instance is not None), default=0)
    return (*head, first, _natural_key(_VOLUME_KEYS["dwi"](frames[0])))


def _same_positions(groups: list[list[DicomFrame]]) -> bool:
    """True if every group has the same slice positions along the normal (1e-3 mm): the volumes share a grid."""
    iop = np.asarray(groups[0][0].orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    reference = None
    for group in groups:
        along = np.sort(np.array([f.position for f in group], dtype=np.float64) @ normal)
        if reference is None:
            reference = along
        elif along.shape != reference.shape or not np.allclose(along, reference, atol=1e-3, rtol=0):
            return False
    return True


def _has_repeated_positions(frames: list[DicomFrame]) -> bool:
    if len(frames) < 2 or any(f.position is None or f.orientation is None for f in frames):
        return False
    iop = np.asarray(frames[0].orientation, dtype=np.float64)
    along = np.array([f.position for f in frames], dtype=np.float64) @ np.cross(iop[:3], iop[3:])
    along.sort()
    return bool(np.any(np.diff(along) < 1e-3))


def _numbered(groups: list[list[DicomFrame]]) -> list[DicomFrame]:
    """The frames of all volumes, each carrying its volume index."""
    return [dataclasses.replace(f, volume=index) for index, group in enumerate(groups) for f in group]


def _orientation_index(frame: DicomFrame, known: list[np.ndarray]) -> int:
    if frame.orientation is None:
        return -1
    iop = np.asarray(frame.orientation, dtype=np.float64)
    for index, other in enumerate(known):
        if np.max(np.abs(iop - other)) <= _ORIENTATION_TOLERANCE:
            return index
    known.append(iop)
    return len(known) - 1


def _spacing_key(frame: DicomFrame) -> str:
    if frame.pixel_spacing is None:
        return ""
    return "x".join(f"{v:.4g}" for v in frame.pixel_spacing)


def _name_parts(base: str, parts: list[tuple[dict[str, str], list[DicomFrame]]]) -> list[tuple[str, list[DicomFrame]]]:
    """Stable keys: the base UID plus the split attributes that differ between the parts."""
    if len(parts) == 1:
        return [(base, parts[0][1])]
    names = sorted({name for attrs, _ in parts for name in attrs})
    varying = [n for n in names if len({attrs.get(n, "") for attrs, _ in parts}) > 1]
    keyed: list[tuple[str, list[DicomFrame]]] = []
    used: Counter[str] = Counter()
    for attrs, frames in parts:
        suffix = ",".join(f"{n}={attrs.get(n, '') or '-'}" for n in varying)
        key = f"{base}#{suffix}" if suffix else base
        used[key] += 1
        keyed.append((key if used[key] == 1 else f"{key}.{used[key]}", frames))
    return keyed


def _make_series(key: str, frames: list[DicomFrame], lookup: dict[Path, _FileHeader]) -> DicomSeries:
    files = sorted({f.path for f in frames})
    first = lookup[files[0]]
    attrs = first.attrs
    return DicomSeries(
        uid=first.uid,
        files=files,
        modality=attrs["modality"],
        description=attrs["description"],
        key=key,
        frames=frames,
        study_uid=attrs["study_uid"],
        series_number=attrs["series_number"],
        body_part=attrs["body_part"],
        image_type=frames[0].image_type or attrs["image_type"],
        patient_id=attrs["patient_id"],
        study_date=attrs["study_date"],
        manufacturer=attrs["manufacturer"],
        sop_class_uid=attrs["sop_class_uid"],
        frame_of_reference_uid=attrs["frame_of_reference_uid"],
        slice_thickness=attrs["slice_thickness"],
        gantry_tilt=attrs["gantry_tilt"],
        layouts={p: lookup[p].layout for p in files},
        mosaic=any(lookup[p].mosaic for p in files),
        multiframe=any(lookup[p].multiframe for p in files),
    )


# ----------------------------------------------------------------------------- loading
def read_dicom_series(
    source: PathLike,
    *,
    series_uid: str | None = None,
    tilt: TiltPolicy = "error",
    include_localizers: bool = False,
    dtype: OutputDtype = "float32",
) -> Volume:
    """Read one DICOM image series into a volume in HU / rescaled units.

    Args:
        source: A folder holding the series (searched recursively) or a single file
            (one slice, a multi-frame image or a Siemens mosaic).
        series_uid: Which series to read when the folder holds several: a SeriesInstanceUID
            or a :attr:`DicomSeries.key` (needed when one UID was split into sub-series); a
            ``#vol=<n>`` suffix reads only volume ``n`` (1-based) of a multi-volume series.
        tilt: ``"error"`` (default) rejects gantry-tilted (sheared) stacks; ``"resample"``
            shifts each slice in-plane onto an orthogonal grid (linear interpolation).
        include_localizers: Also consider LOCALIZER images.
        dtype: ``"float32"`` (default) or ``"native"`` (int16/uint16/int32 when the rescale is
            integral, as SimpleITK and dcm2niix return CT; half the memory).

    Returns:
        ``Volume`` with array ``(1, X, Y, Z)`` float32 (rescale slope/intercept applied),
        X along the rows' direction (``ImageOrientationPatient[:3]``), Z along the slice
        normal; ``meta`` has the UIDs, the slice files in Z order and ``slice_issues``.  A
        multi-volume series (fMRI, diffusion, perfusion, multi-echo) gives ``(V, X, Y, Z)``,
        one channel per volume (:func:`medseg.io.dicom_stack.stack_volumes`).

    Raises:
        InputError: Nothing readable, no or several series, missing geometry tags,
            undecodable pixels, conflicting duplicate or missing slices, non-uniform
            spacing, mixed slice sizes, or gantry tilt with ``tilt="error"``.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such file or folder")
    scan = scan_dicom(source, include_localizers=include_localizers)
    candidates = scan.series
    volume: int | None = None
    if series_uid is not None:
        match = _VOLUME_SUFFIX.search(series_uid)
        if match is not None:
            volume, series_uid = int(match.group(1)), series_uid[: match.start()]
        exact = [s for s in candidates if s.key == series_uid]
        candidates = exact or [s for s in candidates if s.uid == series_uid]
        if not candidates and series_uid.strip().isdigit():  # a SeriesNumber
            candidates = [s for s in scan.series if s.series_number == int(series_uid)]
    if not candidates:
        if source.is_file() and scan.skipped:
            raise InputError(source, f"not a DICOM image: {scan.skipped[0][1]}")
        wanted = f" with number, UID or key {series_uid}" if series_uid is not None else ""
        hint = f" (`medseg info {source}` lists the series)" if series_uid is not None and scan.series else ""
        raise InputError(source, f"no DICOM image series found{wanted}{_skip_note(scan)}{hint}")
    if len(candidates) > 1:
        raise InputError(source, _several_series(source, candidates))
    series = candidates[0]
    if volume is not None:
        series = series.select_volume(volume)
    return load_series(series, tilt=tilt, source=source, dtype=dtype)


def _several_series(source: Path, candidates: list[DicomSeries], *, shown: int = 3) -> str:
    """A short "several series" message: a few of them and where to see all (not a 5 KB listing)."""

    def one(s: DicomSeries) -> str:
        number = f"#{s.series_number} " if s.series_number is not None else ""
        return f"{number}{s.modality} '{s.description}' ({s.num_slices} slices)"

    listed = "; ".join(one(s) for s in candidates[:shown])
    more = f"; and {len(candidates) - shown} more" if len(candidates) > shown else ""
    return (
        f"contains {len(candidates)} series ({listed}{more}): choose one with --series NUMBER|UID"
        f" (series_uid= in Python); `medseg info {source}` lists them with their numbers and UIDs"
    )


def load_series(
    series: DicomSeries,
    *,
    tilt: TiltPolicy = "error",
    source: PathLike | None = None,
    dtype: OutputDtype = "float32",
) -> Volume:
    """Load a discovered series (see :func:`read_dicom_series` for the options, result and errors)."""
    from medseg.io.dicom_stack import stack_series

    return stack_series(series, tilt=tilt, source=Path(source) if source is not None else None, dtype=dtype)


def _skip_note(scan: DicomScan) -> str:
    if not scan.skipped:
        return ""
    counts = scan.skipped_summary()
    return " (skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) + ")"


# ----------------------------------------------------------------------------- value helpers
def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        values = tuple(float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value]))
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(np.isfinite(values)):
        return None
    return values


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _natural_key(value: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", value))


def _unique_sorted(along: np.ndarray) -> np.ndarray:
    values = np.sort(along)
    if len(values) < 2:
        return values
    keep = np.concatenate([[True], np.diff(values) >= 1e-3])
    return values[keep]
