"""``medseg info`` and ``medseg convert``: the argument parsers of the IO stage.

Only the parsers live here, and this module imports nothing heavy: the handlers import
:mod:`medseg.io.info`, :mod:`medseg.io.convert` and :mod:`medseg.io.annotations` (numpy, pydicom,
nibabel, SimpleITK, scipy) when the subcommand runs, so ``medseg --help`` starts fast.  The
functions are also importable from those modules, where they used to live.
"""

from __future__ import annotations

import argparse
from typing import Any

from medseg.types import OVERLAP_POLICIES, PIXEL_RULES

__all__ = ["ANNOTATION_TARGETS", "add_annotation_arguments", "add_convert_parser", "add_info_parser"]

#: Values of ``--to``: label map formats for annotations, or ``rtstruct`` for label -> RTSTRUCT.
ANNOTATION_TARGETS = ("nifti", "nrrd", "rtstruct")


def add_info_parser(subparsers: Any) -> None:
    """Register ``medseg info INPUT [--json]`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "info",
        help="series in a DICOM folder (headers only), or the geometry and value range of a volume or DICOM SEG",
        description="For a folder: every DICOM image series (key/UID, modality, description, slices, volumes and "
        "b-values of multi-volume series, shape, spacing, orientation) from headers only; for a file "
        "(NIfTI/NRRD/MHA/DICOM): shape, spacing, origin, direction, orientation and value range; for a DICOM SEG: "
        "its segments (label, coded type, voxels) on the grid of the series it references when found.",
    )
    p.add_argument("input", help="folder, DICOM file or volume file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--headers-only", action="store_true", help="never decode pixels (folders with one series)")
    p.add_argument("--tilt", choices=("error", "resample"), default="error", help="gantry-tilt policy when loading")
    p.add_argument(
        "--reference",
        default=None,
        help="for a DICOM SEG: folder holding the series it references (default: the SEG's own folder)",
    )
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from medseg.io.info import run_info

    return run_info(args)


def add_convert_parser(subparsers: Any) -> None:
    """Register ``medseg convert INPUT OUTPUT_DIR`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "convert",
        help="convert every DICOM series, DICOM SEG (or NIfTI/NRRD/MHA file) under INPUT to NIfTI + JSON sidecar",
        description="Every DICOM series found under INPUT (recursively; a single file works too) becomes "
        "OUTPUT_DIR/<pattern>.nii.gz plus .json (series UID, geometry, slice issues and the BIDS-style acquisition "
        "fields dcm2niix writes); multi-volume series (fMRI, diffusion, perfusion, multi-echo) become one 4D NIfTI "
        "(+ .bval/.bvec for diffusion); every DICOM SEG becomes a label NIfTI on the grid of the series it "
        "references (segment names in the sidecar); NIfTI/NRRD/MHA files keep their names. Pattern placeholders "
        "(dcm2niix letters): %i patient ID, %t study date+time, %D study date, %s series number (%3s zero-padded), "
        "%d description, %p protocol, %M modality, %B body part, %m/%v manufacturer, %x study ID, %g accession, "
        "%u acquisition, %e echo, %z sequence name, %j/%k series/study UID, %f folder, %b file name, %r instance.",
    )
    p.add_argument("input", help="folder, DICOM file or volume file")
    p.add_argument("output_dir", help="output folder (created)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--tilt",
        choices=("error", "resample"),
        default="error",
        help="gantry-tilted series: refuse (default) or resample slices in-plane onto an orthogonal grid",
    )
    p.add_argument(
        "--series", action="append", default=None, metavar="UID_OR_KEY", help="only this series (repeatable)"
    )
    p.add_argument("--include-localizers", action="store_true", help="also convert LOCALIZER (scout) images")
    p.add_argument(
        "--pattern",
        default=None,
        metavar="PATTERN",
        help="output names of DICOM series and SEGs, '/' for sub-folders (default: %%i/%%t/%%s_%%d = "
        "patient/study/<series number>_<description>; see the placeholders above)",
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from medseg.io.convert import run_convert

    return run_convert(args)


def add_annotation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the annotation options to the ``medseg convert`` sub-parser.

    Adds ``--reference``, ``--to``, ``--instances``, ``--panoptic``, ``--connectivity``,
    ``--overlap-policy``, ``--pixel-rule``, ``--partial`` and ``--rois``.  The sub-parser must
    provide positional ``input`` and ``output`` (or ``output_dir``) and a ``--overwrite`` flag.
    The handler is :func:`medseg.io.annotations.convert_annotation`.
    """
    group = parser.add_argument_group("annotations (RTSTRUCT, polygon JSON, label -> RTSTRUCT)")
    group.add_argument(
        "--reference",
        default=None,
        help="image grid of the annotation: DICOM series folder (RTSTRUCT, --to rtstruct) or image file/folder "
        "(polygon JSON); default for an RTSTRUCT: its own folder",
    )
    group.add_argument(
        "--to",
        choices=ANNOTATION_TARGETS,
        default=None,
        help="label map format for annotations (nifti, default; nrrd), or 'rtstruct' to turn a label volume into "
        "an RTSTRUCT referencing --reference",
    )
    group.add_argument(
        "--instances",
        action="store_true",
        help="also write an instance map (polygons: one per object_id; RTSTRUCT: connected components per ROI)",
    )
    group.add_argument("--panoptic", action="store_true", help="with --instances: also write class*1000+instance")
    group.add_argument(
        "--connectivity",
        type=int,
        choices=(6, 18, 26),
        default=26,
        help="neighbourhood of RTSTRUCT connected components for --instances (default 26)",
    )
    group.add_argument(
        "--overlap-policy",
        choices=OVERLAP_POLICIES,
        default="smaller",
        help="where structures overlap: smaller (default: fewer voxels wins), later (listed later wins), "
        "error, or separate (one binary channel per structure, 4D output)",
    )
    group.add_argument(
        "--pixel-rule",
        choices=PIXEL_RULES,
        default="centre",
        help="centre (default: voxels whose centre is inside, even-odd) or opencv (rounded vertices, outline "
        "included, as DicomRTTool / rt-utils make masks)",
    )
    group.add_argument(
        "--partial",
        action="store_true",
        help="RTSTRUCT: rasterise only contours on images present in the series (default: error naming the "
        "missing SOP Instance UIDs)",
    )
    group.add_argument("--rois", default=None, help="RTSTRUCT: comma-separated ROI names to convert (default all)")
