"""BIDS-style acquisition fields for ``medseg convert`` sidecars, as dcm2niix writes them.

:func:`acquisition_fields` reads the first header of a series (and, for Siemens mosaics, its
CSA header) and returns the fields below with dcm2niix's names and units; fields the headers
do not have are left out.  Times are in **seconds** (DICOM stores ms), as BIDS and dcm2niix.

* identification: ``PatientID``, ``StudyDate``, ``StudyTime``, ``StudyInstanceUID``,
  ``SeriesInstanceUID``, ``StudyDescription``, ``SeriesDescription``, ``ProtocolName``,
  ``SeriesNumber``, ``AcquisitionNumber``, ``AcquisitionTime`` (``hh:mm:ss.ffffff``);
* scanner: ``Modality``, ``Manufacturer`` (``Siemens``, ``GE``, ``Philips``, ``Canon``,
  ``Toshiba``, ``UIH``, ``Hitachi``, ``Bruker``, else as stored), ``ManufacturersModelName``,
  ``SoftwareVersions``, ``MagneticFieldStrength`` (T), ``ImagingFrequency`` (MHz),
  ``BodyPart``, ``PatientPosition``;
* MR sequence: ``ScanningSequence``, ``SequenceVariant``, ``ScanOptions``, ``SequenceName``,
  ``MRAcquisitionType``, ``ImageType``, ``SliceThickness``, ``SpacingBetweenSlices``,
  ``EchoTime``, ``RepetitionTime``, ``InversionTime`` (s), ``FlipAngle`` (degrees),
  ``EchoTrainLength``, ``PixelBandwidth``, ``EchoNumber``, ``SliceTiming`` (s, Siemens mosaics,
  in the written slice order);
* CT: ``ConvolutionKernel``, ``KVP``, ``XRayTubeCurrent`` (mA), ``XRayExposure`` (mAs),
  ``ExposureTime`` (s);
* multi-volume series: ``NumberOfVolumes``; ``EchoTime`` becomes a list (one per volume) when
  the volumes are echoes; ``DiffusionBValue`` (s/mm², one per volume) for diffusion series,
  whose gradient directions go to the ``.bvec`` file.

Patient names, birth dates and institution names are not copied.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medseg.io.volume import Volume

__all__ = ["acquisition_fields", "manufacturer_name", "read_first_header"]

_TEXT = (
    "PatientID",
    "StudyDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "Modality",
    "ManufacturerModelName",
    "SoftwareVersions",
    "BodyPartExamined",
    "PatientPosition",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "SequenceName",
    "MRAcquisitionType",
    "ConvolutionKernel",
)
_RENAMED = {"ManufacturerModelName": "ManufacturersModelName", "BodyPartExamined": "BodyPart"}
_NUMBERS = (
    "MagneticFieldStrength",
    "ImagingFrequency",
    "SliceThickness",
    "SpacingBetweenSlices",
    "FlipAngle",
    "PixelBandwidth",
    "KVP",
    "XRayTubeCurrent",
    "XRayExposure",
)
_INTEGERS = ("SeriesNumber", "AcquisitionNumber", "EchoTrainLength", "EchoNumbers")
_MILLISECONDS = ("EchoTime", "RepetitionTime", "InversionTime", "ExposureTime")
_VENDORS = (
    ("SIEMENS", "Siemens"),
    ("GE ", "GE"),
    ("GE_", "GE"),
    ("PHILIPS", "Philips"),
    ("CANON", "Canon"),
    ("TOSHIBA", "Toshiba"),
    ("UIH", "UIH"),
    ("UNITED IMAGING", "UIH"),
    ("HITACHI", "Hitachi"),
    ("BRUKER", "Bruker"),
)


def manufacturer_name(value: str) -> str:
    """dcm2niix's short manufacturer name (``"SIEMENS"`` -> ``"Siemens"``); other values unchanged."""
    upper = value.strip().upper() + " "
    if upper.strip() == "GE":
        return "GE"
    return next((name for key, name in _VENDORS if upper.startswith(key) or key in upper), value.strip())


def _number(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _clean(value: float) -> float | int:
    """Numbers as dcm2niix prints them: integral values as ints, others rounded to 6 significant digits."""
    rounded = float(f"{value:.6g}")
    return int(rounded) if rounded.is_integer() else rounded


def _time(value: str) -> str:
    digits = value.strip()
    if len(digits) >= 6 and digits[:6].isdigit():
        rest = digits[6:]
        return f"{digits[0:2]}:{digits[2:4]}:{digits[4:6]}" + (rest if rest.startswith(".") else "")
    return digits


def read_first_header(volume: Volume) -> Any | None:
    """The full header (no pixels) of the first file the volume was built from, or ``None``."""
    files = volume.meta.get("slice_files") or []
    if not files:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(Path(files[0]), stop_before_pixels=True, force=True)
    except Exception:
        return None


def acquisition_fields(volume: Volume, header: Any | None = None) -> dict[str, Any]:
    """The BIDS-style fields (see the module docstring) of a volume read from DICOM.

    Args:
        volume: From :func:`medseg.io.read_dicom_series` (``meta["slice_files"]``, and for
            multi-volume series ``meta["volumes"]``).
        header: Its first header (default: read from ``meta["slice_files"][0]``).

    Returns:
        ``{field: value}`` in dcm2niix's units; empty when no header is available.
    """
    ds = header if header is not None else read_first_header(volume)
    if ds is None:
        return {}
    out: dict[str, Any] = {}
    for keyword in _TEXT:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v).strip() for v in value)  # multi-valued codes as dcm2niix writes them (SK\\SP)
        out[_RENAMED.get(keyword, keyword)] = str(value).strip()
    manufacturer = str(ds.get("Manufacturer", "") or "")
    if manufacturer.strip():
        out["Manufacturer"] = manufacturer_name(manufacturer)
    if ds.get("StudyTime"):
        out["StudyTime"] = _time(str(ds.StudyTime))
    if ds.get("AcquisitionTime"):
        out["AcquisitionTime"] = _time(str(ds.AcquisitionTime))
    image_type = ds.get("ImageType")
    if image_type:
        out["ImageType"] = [str(v) for v in (image_type if not isinstance(image_type, str) else [image_type])]
    for keyword in _NUMBERS:
        number = _number(ds.get(keyword))
        if number is not None:  # 6 significant digits as dcm2niix prints them; the frequency in full
            out[keyword] = _clean(number) if keyword != "ImagingFrequency" else number
    for keyword in _INTEGERS:
        number = _number(ds.get(keyword))
        if number is not None:
            out["EchoNumber" if keyword == "EchoNumbers" else keyword] = int(number)
    for keyword in _MILLISECONDS:
        number = _number(ds.get(keyword))
        if number is not None:
            out[keyword] = _clean(number / 1000.0)
    timing = _mosaic_slice_timing(ds)
    if timing is not None:
        out["SliceTiming"] = timing
    _add_volumes(out, volume)
    return out


def _add_volumes(out: dict[str, Any], volume: Volume) -> None:
    volumes = volume.meta.get("volumes")
    if not volumes:
        return
    out["NumberOfVolumes"] = len(volumes)
    echoes = [v.get("echo") for v in volumes]
    if len(set(echoes)) > 1:
        times = [_echo_time(v) for v in volumes]
        if all(t is not None for t in times):
            out["EchoTime"] = times
        out["EchoNumber"] = [_echo_number(e) for e in echoes]
    if volume.meta.get("b_values") is not None:
        out["DiffusionBValue"] = [_clean(float(b)) for b in volume.meta["b_values"]]


def _echo_number(echo: Any) -> int | str | None:
    text = str(echo or "")
    return int(text) if text.isdigit() else (text or None)


def _echo_time(entry: dict[str, Any]) -> float | None:
    """Echo time (s) of one volume: from its ``"12.5ms"`` key or its first file's header."""
    echo = str(entry.get("echo") or "")
    match = re.fullmatch(r"([0-9.]+)ms", echo)
    if match:
        return _clean(float(match.group(1)) / 1000.0)
    files = entry.get("files") or []
    if not files:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["EchoTime"], force=True)
    except Exception:
        return None
    number = _number(ds.get("EchoTime"))
    return None if number is None else _clean(number / 1000.0)


def _mosaic_slice_timing(ds: Any) -> list[float] | None:
    """Siemens mosaic ``MosaicRefAcqTimes`` (ms, tile order) -> seconds in the order slices are stacked."""
    from medseg.io.mosaic import is_mosaic

    if not is_mosaic(ds):
        return None
    try:
        from nibabel.nicom import csareader

        from medseg.io.mosaic import mosaic_layout

        csa = csareader.get_csa_header(ds, "image")
        times = csa["tags"]["MosaicRefAcqTimes"]["items"] if csa is not None else None
        layout = mosaic_layout(ds, Path(str(getattr(ds, "filename", "") or "mosaic")))
    except Exception:
        return None
    if not times or len(times) < layout.n_slices:
        return None
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    along = layout.positions @ np.cross(iop[:3], iop[3:])
    order = np.argsort(along, kind="stable")  # the loader stacks tiles along row x column
    return [_clean(float(times[int(t)]) / 1000.0) for t in order]
