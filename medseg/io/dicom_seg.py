"""DICOM Segmentation (SEG) objects: write a label volume over its source series, read SEGs back.

Writing goes through `highdicom <https://highdicom.readthedocs.io>`_, which builds the
Segmentation IOD (multi-frame functional groups, plane positions, source references,
patient/study modules copied from the source).  What medseg adds:

* the label grid is matched to the *source slices* (sorted along the slice normal, the way
  :func:`medseg.io.read_dicom_series` stacks them); a label volume stored in another axis
  order or with flipped axes is reoriented exactly (axis permutation / flip only, no
  resampling), anything else is refused with a :class:`~medseg.errors.GeometryError`;
* sources whose UIDs were blanked by anonymisation are refused with a clear message, since
  a SEG must reference its source instances, study and frame of reference by UID;
* segment labels and coded categories come from the model's label names (see
  :func:`coded_property`);
* within-tolerance orientation / pixel-spacing jitter between the source slices (which the
  loader accepts, e.g. ImageOrientationPatient differing by 1e-7 in TCIA exports) is
  normalised on copies of the headers before highdicom, which requires exact equality, sees
  it (:func:`normalise_source_headers`, tolerances shared with :mod:`medseg.io.dicom_stack`),
  and so is the other header noise highdicom refuses (an empty SpecificCharacterSet, PatientSex
  ``U``, malformed dates, absent Type 2 attributes or SliceThickness; see
  :mod:`medseg.io.dicom_headers`);
* a Siemens mosaic (one image holding every slice of a volume) gets a SEG in its slices' own
  plane positions that references the mosaic image (:func:`mosaic_geometry`); the mosaics of
  several volumes are refused (a SEG references the one volume it was segmented from);
* failures are :class:`~medseg.errors.ExportError` / :class:`~medseg.errors.GeometryError`
  naming the *series* (patient, study date, series number, description), never the output
  path, which may be a temporary file;
* pixel data is compressed losslessly by default: JPEG 2000 for BINARY (the only encapsulated
  syntax highdicom offers for 1-bit frames; passes ``dciodvfy``), JPEG-LS for LABELMAP;
  ``compression="none"``/``"deflate"``/``"rle"``/``"jpeg2000"`` choose otherwise (sizes and
  times: ``docs/benchmarks.md``, "DICOM SEG size");
* the file is written atomically (:func:`medseg.io.atomic_path`).

Segmentation type: ``"binary"`` (default) or ``"labelmap"``.  LABELMAP (Label Map
Segmentation Storage, DICOM 2024) is supported by the installed highdicom, but the Debian
``dicom3tools`` ``dciodvfy`` (2022 build) does not know that SOP class yet and reports
"Information Object Not found", so BINARY is the default: it passes ``dciodvfy`` without
errors and every viewer reads it.

Segment numbers are ``1..N`` in ascending label value order; when the label values are not
``1..N`` the original value is recorded in each segment's SegmentDescription as
``"medseg label value <v>"`` and :func:`read_dicom_seg` maps it back.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from medseg.errors import ExportError, GeometryError, InputError, MedsegError
from medseg.io.dicom import is_dicom_file, read_dataset
from medseg.io.dicom_stack import (
    ORIENTATION_ATOL,
    PIXEL_SPACING_ATOL,
    PIXEL_SPACING_RTOL,
    SLICE_GRID_TOLERANCE,
)
from medseg.io.images import atomic_path
from medseg.io.volume import Geometry, Volume, label_dtype
from medseg.types import PathLike

__all__ = [
    "SEG_COMPRESSIONS",
    "SegCompression",
    "SegmentationType",
    "coded_property",
    "find_reference",
    "is_dicom_seg",
    "mosaic_geometry",
    "normalise_source_headers",
    "read_dicom_seg",
    "referenced_series_uid",
    "series_label",
    "source_geometry",
    "write_dicom_seg",
]

SegmentationType = Literal["binary", "labelmap"]
SegCompression = Literal["auto", "none", "deflate", "rle", "jpegls", "jpeg2000"]
#: Values of ``compression`` / ``--seg-compression``.
SEG_COMPRESSIONS: tuple[str, ...] = ("auto", "none", "deflate", "rle", "jpegls", "jpeg2000")

_LABEL_VALUE_RE = re.compile(r"medseg label value (\d+)")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
_LATERALITY = {"left", "right", "l", "r", "lt", "rt", "bilateral"}
_SYNONYMS = {"tumor": "Neoplasm", "tumour": "Neoplasm", "mass": "Mass", "gtv": "Neoplasm"}
#: Distinct display colours (RGB) cycled over segments.
_PALETTE = (
    (221, 130, 101),
    (185, 102, 83),
    (144, 238, 144),
    (230, 220, 70),
    (0, 151, 206),
    (216, 101, 79),
    (183, 156, 220),
    (241, 214, 145),
)


# ------------------------------------------------------------------ coding
def _keyword_candidates(name: str) -> list[str]:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    if not words:
        return []
    lowered = name.strip().lower()
    out = [_SYNONYMS[lowered]] if lowered in _SYNONYMS else []
    variants = [words]
    if len(words) > 1:  # "kidney_left" -> "LeftKidney"
        variants.append([words[-1], *words[:-1]])
    plain = [w for w in words if w.lower() not in _LATERALITY]
    if plain and plain != words:  # "left kidney" -> "Kidney" (laterality stays in the segment label)
        variants.append(plain)
    for variant in variants:
        out.append("".join(w[:1].upper() + w[1:].lower() for w in variant))
    return out


def coded_property(name: str) -> tuple[Any, Any]:
    """SNOMED CT segmented property ``(category, type)`` for a class name.

    The name is looked up (CamelCased, e.g. ``"adrenal gland"`` -> ``AdrenalGland``; laterality
    words are dropped for the lookup, so ``"kidney_left"`` codes as *Kidney*, and the segment label
    keeps the full name) in the DICOM context groups shipped with pydicom:

    * CID 7159 (lesion segmentation types: lesion, neoplasm, cyst, oedema, ...) -> category
      *Morphologically Abnormal Structure* (SCT 49755003);
    * CID 7166 (tissue segmentation types: fat, muscle, ...) -> category *Tissue* (SCT 85756007);
    * CID 7151 (segmentation property types, mostly anatomy: liver, kidney, brain, ...) ->
      category *Anatomical Structure* (SCT 91723000);
    * otherwise category and type are both the generic *Tissue* (SCT 85756007) and only the
      segment label carries the name.

    Returns:
        ``(category, type)`` as :class:`pydicom.sr.coding.Code`.
    """
    from pydicom.sr.codedict import codes

    for keyword in _keyword_candidates(name):
        for cid, category in (
            (7159, "MorphologicallyAbnormalStructure"),
            (7166, "Tissue"),
            (7151, "AnatomicalStructure"),
        ):
            group = getattr(codes, f"cid{cid}")
            if keyword in group.dir():
                return getattr(codes.SCT, category), getattr(group, keyword)
    return codes.SCT.Tissue, codes.SCT.Tissue


# ----------------------------------------------------------------- sources
def _read_header(path: Path) -> Dataset:
    try:
        return read_dataset(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"cannot read DICOM header ({exc})") from exc


def _load_sources(source: PathLike | Sequence[PathLike] | Sequence[Dataset], series_uid: str | None) -> list[Dataset]:
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.exists():
            raise InputError(root, "no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and is_dicom_file(p))
        datasets = [_read_header(p) for p in files]
        datasets = [ds for ds in datasets if "Rows" in ds]
        if series_uid:
            datasets = [ds for ds in datasets if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not datasets:
            raise InputError(root, "no DICOM image slices found to reference")
        return datasets
    items: list[Any] = list(source)  # type: ignore[arg-type]
    if not items:
        raise MedsegError("write_dicom_seg: no source slices given")
    return [item if isinstance(item, Dataset) else _read_header(Path(item)) for item in items]


def _name(ds: Dataset) -> str:
    return str(getattr(ds, "filename", "") or f"source instance {ds.get('SOPInstanceUID', '?')}")


def _check_references(datasets: Sequence[Dataset]) -> None:
    """Refuse sources that a DICOM SEG / RTSTRUCT cannot reference (blanked UIDs, mixed series)."""
    for ds in datasets:
        sop_class = str(
            ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
        )
        missing = [k for k in _REQUIRED_UIDS if not str(ds.get(k, "") or "").strip()]
        if not sop_class:
            missing.append("SOPClassUID")
        if missing:
            raise InputError(
                _name(ds),
                f"empty {', '.join(missing)}: a DICOM SEG must reference its source by UID, and this source has"
                " none (anonymised by blanking UIDs?); write NIfTI instead or re-identify the UIDs",
            )
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(_name(ds), "multi-frame sources are not supported by write_dicom_seg")
    for key in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(key)) for ds in datasets}
        if len(values) > 1:
            raise InputError(_name(datasets[0]), f"source slices belong to {len(values)} different {key}s")


def series_label(ds: Dataset | Mapping[str, Any]) -> str:
    """How messages name a source series: patient, study date, series number and description.

    Args:
        ds: A header of the series, or a mapping with the same DICOM keywords.

    Returns:
        E.g. ``"patient PGBM-001, study 19911119, series 11 'T1post'"`` (parts that are
        missing are left out; the series UID when nothing else is known).
    """

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    parts = []
    if text("PatientID"):
        parts.append(f"patient {text('PatientID')}")
    if text("StudyDate"):
        parts.append(f"study {text('StudyDate')}")
    number, description = text("SeriesNumber"), text("SeriesDescription")
    if number or description:
        parts.append(" ".join(p for p in ("series", number, repr(description) if description else "") if p))
    if not parts:
        parts.append(f"series {text('SeriesInstanceUID') or '<no UID>'}")
    return ", ".join(parts)


def source_geometry(datasets: Sequence[Dataset]) -> tuple[list[Dataset], Geometry]:
    """Sort single-frame slices along their normal and return them with the grid they span.

    The rules and tolerances are the loader's (:mod:`medseg.io.dicom_stack`): orientations
    within :data:`~medseg.io.dicom_stack.ORIENTATION_ATOL` and pixel spacings within
    ``PIXEL_SPACING_RTOL``/``ATOL`` are one stack; positions closer than 1e-3 mm along the
    normal are duplicates; slices may be off a uniform grid by 1 % of a step.  The grid is
    spanned by the first slice along the normal, as :func:`medseg.io.read_dicom_series` does.

    Args:
        datasets: Slice headers with ImagePositionPatient / ImageOrientationPatient / PixelSpacing.

    Returns:
        The slices in ascending position along ``row x column`` direction, and the
        ``(columns, rows, slices)`` grid (the grid :func:`medseg.io.read_dicom_series` returns).

    Raises:
        InputError: Missing geometry tags, mixed orientations or sizes, duplicate or uneven positions.
    """
    for ds in datasets:
        for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
            if tag not in ds:
                raise InputError(_name(ds), f"missing {tag}; cannot place the slice in patient space")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    first = datasets[order[0]]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    for ds in datasets:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=ORIENTATION_ATOL):
            raise InputError(_name(ds), "source slices mix orientations")
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise InputError(_name(ds), "source slices mix sizes")
        other = np.asarray(ds.PixelSpacing, dtype=np.float64)
        if not np.allclose(other, spacing, rtol=PIXEL_SPACING_RTOL, atol=PIXEL_SPACING_ATOL):
            raise InputError(_name(ds), f"source slices mix pixel spacings {list(spacing)} and {list(other)}")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    along = positions[order] @ normal
    steps = np.diff(along)
    if len(steps) and np.min(steps) < 1e-3:
        raise InputError(
            _name(datasets[order[int(np.argmin(steps)) + 1]]),
            "duplicate slice position in the source (several volumes of a multi-volume series? a DICOM SEG references"
            " the one volume it was segmented from: give only its slices, e.g. read with series_uid='<UID>#vol=<n>')",
        )
    n = len(along)
    dz = float(along[-1] - along[0]) / (n - 1) if n > 1 else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    if n > 2 and np.max(np.abs(along - (along[0] + dz * np.arange(n)))) > SLICE_GRID_TOLERANCE * dz:
        raise InputError(_name(first), "source slices are unevenly spaced (missing slices?)")
    row_spacing, col_spacing = (float(v) for v in spacing)
    geometry = Geometry.from_itk(
        shape=(int(first.Columns), int(first.Rows), len(datasets)),
        spacing=(col_spacing, row_spacing, dz),
        origin=tuple(positions[order[0]]),
        direction=np.stack([row_dir, col_dir, normal], axis=1),
    )
    return [datasets[i] for i in order], geometry


def _is_mosaic_source(datasets: Sequence[Dataset]) -> bool:
    """Whether the sources are Siemens mosaics (refuses a mix of mosaics and plain slices)."""
    from medseg.io.mosaic import is_mosaic

    flags = [is_mosaic(ds) for ds in datasets]
    if any(flags) and not all(flags):
        raise InputError(_name(datasets[0]), "the source mixes Siemens mosaics and single slices")
    return bool(flags) and all(flags)


def mosaic_geometry(datasets: Sequence[Dataset]) -> tuple[list[Dataset], Geometry]:
    """The slice grid of one Siemens mosaic (one volume of its series), as the loader un-tiles it.

    A mosaic is one image holding every slice of a volume as tiles, so a SEG's frames cannot lie
    on its pixel matrix; the SEG gets the slices' own plane positions instead and references the
    mosaic image (:func:`write_dicom_seg`).

    Args:
        datasets: The header of the mosaic the label was segmented from (one volume).

    Returns:
        ``([header], grid)``: the grid ``(tile columns, tile rows, slices)`` with slices ascending
        along ``row x column`` direction, as :func:`medseg.io.read_dicom_series` returns it.

    Raises:
        InputError: Several mosaics (several volumes of a 4D series: give the one that was segmented,
            e.g. :func:`medseg.infer.writers.source_headers` of a volume read with ``'<UID>#vol=<n>'``),
            or a mosaic whose CSA header cannot be un-tiled.
    """
    from medseg.io.mosaic import mosaic_layout

    if len(datasets) != 1:
        raise InputError(
            _name(datasets[0]),
            f"the source holds {len(datasets)} Siemens mosaics, i.e. {len(datasets)} volumes of a multi-volume"
            " series; a DICOM SEG references the one volume it was segmented from: give only that mosaic (read"
            " the volume with series_uid='<UID>#vol=<n>'; medseg info lists the volumes)",
        )
    ds = datasets[0]
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in ds:
            raise InputError(_name(ds), f"missing {tag}; cannot place the slices in patient space")
    layout = mosaic_layout(ds, Path(_name(ds)))
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    along = layout.positions @ normal
    order = np.argsort(along, kind="stable")
    n = layout.n_slices
    dz = float(along[order[-1]] - along[order[0]]) / (n - 1) if n > 1 else float(ds.get("SliceThickness", 1) or 1)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    geometry = Geometry.from_itk(
        shape=(layout.tile_cols, layout.tile_rows, n),
        spacing=(col_spacing, row_spacing, dz),
        origin=tuple(layout.positions[order[0]]),
        direction=np.stack([row_dir, col_dir, normal], axis=1),
    )
    return [ds], geometry


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))


def normalise_source_headers(
    ordered: Sequence[Dataset], *, slice_spacing: float | None = None
) -> tuple[list[Dataset], list[str]]:
    """Copies of the slice headers with the real-world noise highdicom refuses (but the loader accepts) removed.

    * **Orientation / pixel-spacing jitter.** Real exports (e.g. TCIA MR series) carry
      ImageOrientationPatient values that differ by ~1e-7 between slices of one series; the loader
      accepts them (same tolerances as :func:`source_geometry`), but highdicom requires the source
      images to share one orientation exactly.  Every copy gets the first slice's
      ImageOrientationPatient and PixelSpacing (the values the loaded volume's grid is built from);
      positions and UIDs are untouched, so the SEG still references the source instances exactly.
    * **SOPClassUID only in the file meta** (seen in real exports): copied into the dataset.
    * **SliceThickness absent, empty or not a number** (Type 2 in the source, but the SEG's pixel
      measures need it): the slice spacing of the grid.
    * **Patient/study attributes of the first slice** (the ones highdicom copies into the SEG):
      empty or misspelled SpecificCharacterSet, PatientSex outside M/F/O, malformed dates and times,
      absent Type 2 attributes (:func:`medseg.io.dicom_headers.clean_identity`; nothing invented).

    The caller's datasets are not modified.

    Args:
        ordered: Headers sorted along the slice normal (from :func:`source_geometry`), already
            checked to be within tolerance.
        slice_spacing: Spacing of the slices (mm), for a missing SliceThickness.

    Returns:
        ``(headers, notes)``: the headers to give highdicom (the originals when nothing differs) and
        a note per normalised attribute.
    """
    from medseg.io.dicom_headers import clean_identity

    first = ordered[0]
    notes: list[str] = []
    out = list(ordered)

    def own(index: int) -> Dataset:  # copy on first change (pydicom's shallow copy shares the element table)
        if out[index] is ordered[index]:
            out[index] = copy.deepcopy(ordered[index])
        return out[index]

    for keyword in ("ImageOrientationPatient", "PixelSpacing"):
        reference = [float(v) for v in first[keyword].value]
        deviation = 0.0
        for index, ds in enumerate(ordered):
            values = [float(v) for v in ds[keyword].value]
            if values == reference:
                continue
            deviation = max(deviation, max(abs(a - b) for a, b in zip(values, reference, strict=True)))
            own(index)[keyword] = copy.deepcopy(first[keyword])
        if deviation:
            notes.append(f"{keyword} of the source slices differed by up to {deviation:.2g}; normalised")
    thin = 0
    for index, ds in enumerate(ordered):
        if "SOPClassUID" not in ds:
            own(index).SOPClassUID = _sop_class(ds)
        try:
            thickness = float(ds.get("SliceThickness", "") or "nan")
        except (TypeError, ValueError):
            thickness = float("nan")
        if not np.isfinite(thickness) and slice_spacing is not None:
            own(index).SliceThickness = f"{slice_spacing:.6g}"
            thin += 1
    if thin:
        notes.append(f"SliceThickness absent or invalid in {thin} source slice(s): the slice spacing used")
    cleaned, identity = clean_identity(out[0])
    if identity:
        out[0] = cleaned
        notes.extend(identity)
    return out, notes


def _onto_grid(array: np.ndarray, geometry: Geometry, target: Geometry, *, atol: float) -> np.ndarray:
    """Reorient ``(X, Y, Z)`` ``array`` onto ``target`` by axis permutation/flip only (exact)."""
    if geometry.allclose(target, atol=atol):
        return array
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(geometry.affine), nib.orientations.io_orientation(target.affine)
    )
    moved = nib.orientations.apply_orientation(array, transform)
    affine = geometry.affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    candidate = Geometry(shape=moved.shape, affine=affine)
    if not candidate.allclose(target, atol=atol):
        raise GeometryError(
            f"the label volume is not on the source series' grid: {geometry.describe()} vs source {target.describe()}"
        )
    return np.ascontiguousarray(moved)


# ----------------------------------------------------------------- writing
def _transfer_syntax(compression: str, segmentation_type: str) -> tuple[str, bool]:
    """``(transfer syntax UID given to highdicom, deflate the file when saving)``."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

    if compression == "auto":
        compression = _DEFAULT_COMPRESSION[segmentation_type]
    if compression == "deflate":
        return ExplicitVRLittleEndian, True
    syntax = {
        "none": ExplicitVRLittleEndian,
        "rle": RLELossless,
        "jpegls": JPEGLSLossless,
        "jpeg2000": JPEG2000Lossless,
    }.get(compression)
    if syntax is None:
        raise MedsegError(f"unknown SEG compression {compression!r} (choose from {', '.join(SEG_COMPRESSIONS)})")
    if segmentation_type == "binary" and compression in ("rle", "jpegls"):
        raise MedsegError(
            f"SEG compression {compression!r} is not available for BINARY segmentations (highdicom encodes 1-bit "
            "frames only as JPEG 2000); use deflate, jpeg2000 or --seg-type labelmap"
        )
    return syntax, False


#: Default lossless encoding per segmentation type (see ``docs/benchmarks.md``, "DICOM SEG size").
_DEFAULT_COMPRESSION: dict[str, str] = {"binary": "jpeg2000", "labelmap": "jpegls"}


def write_dicom_seg(
    label: Volume,
    source: PathLike | Sequence[PathLike] | Sequence[Dataset],
    path: PathLike,
    *,
    label_names: Mapping[int, str] | None = None,
    segmentation_type: SegmentationType = "binary",
    compression: SegCompression = "auto",
    series_description: str = "medseg segmentation",
    series_number: int = 901,
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
    overwrite: bool = False,
    atol: float = 1e-3,
    series: str | None = None,
) -> Path:
    """Write a label volume as a DICOM SEG that references its source series.

    Within-tolerance orientation / pixel-spacing jitter between source slices (accepted by the
    loader) and other header noise highdicom refuses are normalised on copies before highdicom
    sees them (:func:`normalise_source_headers`).  A Siemens mosaic source (one volume) gets frames
    in its slices' own plane positions (:func:`mosaic_geometry`).

    Args:
        label: ``(1, X, Y, Z)`` integer label volume on the source series' grid (as returned by
            ``Predictor.predict`` on a volume from :func:`~medseg.io.read_dicom_series`).
        source: The source series: a folder (filtered by ``label.meta["series_uid"]`` when set),
            its files, or its headers as pydicom datasets.
        path: Output file (``.dcm``).
        label_names: ``{label value: name}``; background ``0`` is ignored. Defaults to
            ``label.meta["label_names"]``, else ``"label <v>"``.
        segmentation_type: ``"binary"`` (default, one bit plane per segment) or ``"labelmap"``.
        compression: Lossless pixel encoding: ``"auto"`` (default: JPEG 2000 lossless for BINARY,
            JPEG-LS lossless for LABELMAP), ``"none"`` (explicit VR little endian), ``"deflate"``
            (deflated explicit VR little endian: smallest, but the 2022 ``dciodvfy`` cannot read
            it), ``"jpeg2000"``, or, for LABELMAP only, ``"rle"`` / ``"jpegls"``.
        series_description: SeriesDescription of the new series.
        series_number: SeriesNumber of the new series.
        algorithm_name: Algorithm name recorded per segment.
        algorithm_version: Algorithm version (default: medseg's version).
        overwrite: Replace an existing file.
        atol: Tolerance in mm when matching the label grid to the source slices.
        series: How errors name the source series (default: :func:`series_label` of its first
            header: patient, study date, series number and description). Error messages never
            contain ``path``, which may be a temporary file.

    Returns:
        The written path.

    Raises:
        InputError: Unreadable source, source UIDs blanked / inconsistent, or the mosaics of several
            volumes (names the source file).
        GeometryError: The label is not on the source grid.
        ExportError: Label values without a name, non-integer or negative labels, a source SOP class
            that is not a standard image class, or highdicom refused the object (names the series).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medseg

    path = Path(path)
    syntax, deflate = _transfer_syntax(compression, segmentation_type)
    datasets = _load_sources(source, str(label.meta.get("series_uid") or "") or None)
    what = series or series_label(datasets[0])

    def fail(reason: str) -> ExportError:
        return ExportError(what, "DICOM SEG", reason)

    if label.channels != 1:
        raise fail(f"a DICOM SEG needs a one-channel label volume, got {label.channels} channels")
    _check_references(datasets)
    unique: dict[str, Dataset] = {}
    for ds in datasets:  # copies of one instance (same SOPInstanceUID) are one source image
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    mosaic = _is_mosaic_source(list(unique.values()))
    if mosaic:
        ordered, grid = mosaic_geometry(list(unique.values()))
    else:
        ordered, grid = source_geometry(list(unique.values()))
    ordered, _ = normalise_source_headers(ordered, slice_spacing=grid.spacing[2])
    rows, columns = (grid.shape[1], grid.shape[0])
    if compression == "auto" and syntax == JPEG2000Lossless and min(rows, columns) < 32:
        syntax = ExplicitVRLittleEndian  # openjpeg cannot encode frames under 32 pixels; tiny anyway
    try:
        array = _onto_grid(np.asarray(label.array[0]), label.geometry, grid, atol=atol)
    except GeometryError as exc:
        raise GeometryError(f"{what}: DICOM SEG not written: {exc}") from exc
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.rint(array)):
        raise fail("label volume has non-integer values")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise fail("label volume has negative values")

    names = dict(label_names if label_names is not None else label.meta.get("label_names") or {})
    present = {int(v) for v in np.unique(array)} - {0}
    values = sorted({int(k) for k in names if int(k) != 0} | present)
    unnamed = [v for v in values if v not in names]
    if unnamed and names:
        raise fail(f"label value(s) {unnamed} have no name in label_names")
    if not values:
        raise fail("nothing to encode (no label names and an empty label volume)")
    lookup = np.zeros(max(values) + 1, dtype=label_dtype(len(values)))
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    consecutive = values == list(range(1, len(values) + 1))

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version or medseg.__version__,
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = str(names.get(value, f"label {value}"))
        category, prop_type = coded_property(name)
        item = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(number - 1) % len(_PALETTE)]),
        )
        if not consecutive:
            item.SegmentDescription = f"medseg label value {value}"
        descriptions.append(item)

    # Frames in source order: pixel_array[k] is source slice k as (rows, columns).
    frames: Any = np.ascontiguousarray(lookup[array].transpose(2, 1, 0))
    empty = not frames.any()
    if mosaic:  # the frames carry their own plane positions: they are not the source's pixel matrix
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.affine  # (column, row, slice) index -> LPS
        frames = hd.Volume(
            array=frames,
            affine=lps[:, [2, 1, 0, 3]],
            coordinate_system="PATIENT",
            frame_of_reference_uid=str(ordered[0].FrameOfReferenceUID),
        )
    seg_type = hd.seg.SegmentationTypeValues[segmentation_type.upper()]
    try:
        with warnings.catch_warnings():
            # highdicom warns about single-component patient names quoting the name: keep it out of logs.
            warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=ordered,
                pixel_array=frames,
                segmentation_type=seg_type,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=algorithm_name,
                software_versions=medseg.__version__,
                device_serial_number="0",
                series_description=series_description,
                content_label="SEGMENTATION",
                content_description=series_description[:64],
                omit_empty_frames=not empty,
                transfer_syntax_uid=syntax,
            )
    except KeyError as exc:
        if exc.args and str(exc.args[0]) == _sop_class(ordered[0]):
            raise fail(
                f"the source's SOP class {_sop_class(ordered[0])} is not a standard image storage class, so a SEG"
                " cannot be derived from it (highdicom knows no IOD for it)"
            ) from exc
        raise fail(f"highdicom refused the segmentation ({exc})") from exc
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise fail(f"highdicom refused the segmentation ({exc})") from exc
    if deflate:
        from pydicom.uid import DeflatedExplicitVRLittleEndian

        seg.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            seg.save_as(tmp, enforce_file_format=True)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise fail(f"cannot encode the segmentation ({exc})") from exc
    return path


# ----------------------------------------------------------------- reading
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def is_dicom_seg(path: PathLike) -> bool:
    """True if ``path`` is a DICOM Segmentation (BINARY/FRACTIONAL or LABELMAP), from its header."""
    path = Path(path)
    if not path.is_file() or not is_dicom_file(path):
        return False
    try:
        ds = read_dataset(path, stop_before_pixels=True, specific_tags=["SOPClassUID"], force=True)
    except Exception:
        return False
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    return sop_class in SEG_SOP_CLASSES


def referenced_series_uid(path: PathLike) -> str | None:
    """SeriesInstanceUID of the image series a SEG references (the first ReferencedSeriesSequence item)."""
    try:
        ds = read_dataset(Path(path), stop_before_pixels=True, force=True)
    except Exception:
        return None
    for item in ds.get("ReferencedSeriesSequence") or []:
        uid = str(item.get("SeriesInstanceUID", "") or "")
        if uid:
            return uid
    return None


def find_reference(path: PathLike, search: PathLike | None = None) -> Volume | None:
    """Load the image series a SEG references, if it is under ``search`` (default: the SEG's folder).

    Returns:
        The series as :func:`medseg.io.read_dicom_series` reads it (``dtype="native"``), or
        ``None`` when the referenced series is not found there or cannot be loaded.
    """
    from medseg.io.dicom import load_series, scan_dicom

    uid = referenced_series_uid(path)
    if not uid:
        return None
    root = Path(search) if search is not None else Path(path).parent
    try:
        candidates = [s for s in scan_dicom(root).series if s.uid == uid and s.num_volumes == 1]
        return load_series(candidates[0], dtype="native") if len(candidates) == 1 else None
    except MedsegError:
        return None


def _value_map(seg: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        match = _LABEL_VALUE_RE.search(str(item.get("SegmentDescription", "")))
        out[number] = int(match.group(1)) if match else number
    return out


def _code(item: Any, keyword: str) -> str | None:
    seq = item.get(keyword) or []
    return str(seq[0].get("CodeMeaning", "")) if len(seq) else None


def _segments(seg: Any, numbers: Sequence[int], masks: np.ndarray) -> list[dict[str, Any]]:
    """One row per segment: number, medseg label value, label, coded category/type, voxel count."""
    value_map = _value_map(seg)
    by_number = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    rows = []
    for index, number in enumerate(numbers):
        item = by_number.get(number)
        rows.append(
            {
                "number": number,
                "value": value_map.get(number, number),
                "label": str(item.SegmentLabel) if item is not None else f"segment {number}",
                "category": _code(item, "SegmentedPropertyCategoryCodeSequence") if item is not None else None,
                "type": _code(item, "SegmentedPropertyTypeCodeSequence") if item is not None else None,
                "voxels": int(masks[index].sum()) if index < len(masks) else 0,
            }
        )
    return rows


def _masks_to_volume(
    masks: np.ndarray,
    numbers: Sequence[int],
    geometry: Geometry,
    seg: Any,
    path: Path,
    *,
    combine: bool,
    overlap: str = "error",
) -> Volume:
    """``masks`` ``(S, X, Y, Z)`` bool per segment number -> label or multi-channel volume."""
    from medseg.io.polygons import SliceMask, paint_masks

    value_map = _value_map(seg)
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    meta: dict[str, Any] = {
        "series_uid": str(seg.SeriesInstanceUID),
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "segmentation_type": str(seg.SegmentationType),
        "study_uid": str(seg.get("StudyInstanceUID", "") or ""),
        "referenced_series_uid": referenced_series_uid(path),
        "segments": _segments(seg, numbers, masks),
    }
    if not combine or overlap == "separate":
        meta["segment_labels"] = {n: labels.get(n, f"segment {n}") for n in numbers}
        return Volume(masks.astype(np.uint8), geometry, kind="image", source=str(path), meta=meta)
    values = [value_map.get(n, n) for n in numbers]
    overlapping = masks.shape[0] > 1 and int(np.max(masks.sum(axis=0, dtype=np.int32))) > 1
    if overlapping and overlap == "error":
        raise InputError(
            path,
            "segments overlap, so they do not fit one label volume; read with combine=False or choose an overlap "
            "policy (smaller, later, separate)",
        )
    if overlapping:
        pieces = [
            [p for k in range(mask.shape[2]) if (p := SliceMask.crop(k, mask[:, :, k])) is not None] for mask in masks
        ]
        order = paint_masks(
            pieces,
            geometry.shape,
            names=[labels.get(n, str(n)) for n in numbers],
            policy=overlap,  # type: ignore[arg-type]
            source=path,
        )
        lookup = np.array([0, *values], dtype=np.int64)
        out = lookup[order].astype(label_dtype(max(values, default=0)))
        meta["overlap_policy"] = overlap
    else:
        out = np.zeros(geometry.shape, dtype=label_dtype(max(values, default=0)))
        for value, mask in zip(values, masks, strict=True):
            out[mask] = value
    meta["label_names"] = {value_map.get(n, n): labels.get(n, f"segment {n}") for n in numbers}
    return Volume(out[None], geometry, kind="label", source=str(path), meta=meta)


def read_dicom_seg(
    path: PathLike,
    *,
    reference: Volume | None = None,
    combine: bool = True,
    overlap: str = "error",
    fractional_threshold: float = 0.5,
) -> Volume:
    """Read a DICOM SEG into a label volume (or one binary channel per segment).

    Args:
        path: The SEG file.
        reference: The source series as read by :func:`~medseg.io.read_dicom_series`; when given
            (with ``meta["sop_instance_uids"]``) the result is on exactly its grid, frames located
            by referenced SOP instance (omitted frames are empty). Otherwise the grid is the SEG's
            own plane positions, slice axis along ``row x column`` direction.
        combine: One label volume (values = label values, see the module docstring); with
            ``False`` a ``(S, X, Y, Z)`` uint8 volume, channel ``i`` = ``i``-th segment.
        overlap: With ``combine``, where segments overlap: ``"error"`` (default), ``"smaller"``
            (the segment with fewer voxels wins), ``"later"`` (the higher segment number wins) or
            ``"separate"`` (same as ``combine=False``) -- the policies of ``medseg convert``.
        fractional_threshold: FRACTIONAL segments become masks where the value is at least this.

    Returns:
        A :class:`Volume` with ``meta["label_names"]`` (combine) or ``meta["segment_labels"]``,
        and ``meta["segments"]`` (number, label value, label, coded category/type, voxels),
        ``meta["referenced_series_uid"]``.

    Raises:
        InputError: Not a readable DICOM SEG, overlapping segments with ``overlap="error"``, or
            frames that do not form a regular volume.
    """
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a readable DICOM SEG ({exc})") from exc
    numbers = [n for n in seg.segment_numbers if n != 0]
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    masks: np.ndarray | None = None
    try:
        if reference is not None and reference.meta.get("sop_instance_uids"):
            uids = [str(u) for u in reference.meta["sop_instance_uids"]]
            try:  # (slices, rows, columns, segments) in the reference's slice order
                stack = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=False
                )
                masks = np.moveaxis(np.asarray(stack), -1, 0).transpose(0, 3, 2, 1)
                geometry = reference.geometry
            except (RuntimeError, KeyError, ValueError):
                masks = None  # no per-frame source references (or locations not preserved): place by position
        if masks is None:
            volume = seg.get_volume(segment_numbers=numbers, combine_segments=False)
            masks, geometry = _hd_volume_to_masks(volume)
            if reference is not None:
                from medseg.io.grid import place_into

                own = Volume(masks.astype(np.uint8), geometry)
                try:
                    masks, geometry = place_into(own, reference.geometry).array, reference.geometry
                except GeometryError as exc:
                    raise InputError(path, f"the SEG's frames are not on the reference series' grid ({exc})") from exc
    except (ValueError, RuntimeError, KeyError, IndexError, AttributeError) as exc:
        raise InputError(path, f"cannot place the SEG frames on a volume ({exc})") from exc
    masks = masks >= fractional_threshold if fractional else masks > 0
    return _masks_to_volume(masks, numbers, geometry, seg, path, combine=combine, overlap=overlap)


def _hd_volume_to_masks(volume: Any) -> tuple[np.ndarray, Geometry]:
    """Highdicom Volume (slices, rows, columns, segments; LPS affine) -> ``(S, X, Y, Z)`` + RAS grid."""
    array = np.asarray(volume.array)
    if array.ndim == 3:
        array = array[..., None]
    masks = array.transpose(3, 2, 1, 0)  # (S, columns, rows, slices)
    lps = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    if float(normal @ lps[:3, 2]) < 0:  # frames stored descending: flip to ascending along the normal
        masks = masks[..., ::-1]
        affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (masks.shape[-1] - 1)
        affine[:3, 2] = -affine[:3, 2]
    geometry = Geometry(shape=masks.shape[1:], affine=affine)  # type: ignore[arg-type]
    return np.ascontiguousarray(masks), geometry
