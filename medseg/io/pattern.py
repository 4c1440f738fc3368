"""Output names from DICOM attributes: ``medseg convert --pattern`` (dcm2niix-style placeholders).

A pattern is text with ``%`` placeholders; ``/`` separates sub-folders.  The letters are
dcm2niix's (``-f``) where dcm2niix has them; ``D``, ``M`` and ``B`` are medseg's:

====  ===============================================================
``%b``  file name of the series' first file (without suffix)
``%d``  SeriesDescription
``%e``  EchoNumbers
``%f``  name of the folder holding the first file
``%g``  AccessionNumber
``%i``  PatientID
``%j``  SeriesInstanceUID
``%k``  StudyInstanceUID
``%m``  manufacturer, short (``GE``, ``Ph``, ``Si``, ``To``, ``UI``, ``NA``)
``%p``  ProtocolName (SequenceName when empty)
``%r``  InstanceNumber of the first file
``%s``  SeriesNumber
``%t``  StudyDate and StudyTime, ``YYYYMMDDhhmmss``
``%u``  AcquisitionNumber
``%v``  Manufacturer
``%x``  StudyID
``%z``  SequenceName
``%D``  StudyDate, ``YYYYMMDD``
``%M``  Modality
``%B``  BodyPartExamined
``%%``  a literal ``%``
====  ===============================================================

A width before a number placeholder zero-pads it (``%3s`` -> ``007``).  Patient names are not
offered.  Every value is sanitised to ``[A-Za-z0-9.+-]`` (other runs become ``_``), an empty
path component becomes ``unknown``, and the result can never leave the output folder (no
absolute patterns, no ``..``).  The default, :data:`DEFAULT_PATTERN` = ``%i/%t/%s_%d``, gives
patient / study / ``<series number>_<description>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError

__all__ = ["DEFAULT_PATTERN", "PATTERN_FIELDS", "check_pattern", "expand_pattern", "safe_component"]

DEFAULT_PATTERN = "%i/%t/%s_%d"

#: Placeholder letter -> what it stands for (``medseg convert --help`` and the docs list these).
PATTERN_FIELDS: dict[str, str] = {
    "b": "file name of the first file",
    "d": "SeriesDescription",
    "e": "EchoNumbers",
    "f": "folder of the first file",
    "g": "AccessionNumber",
    "i": "PatientID",
    "j": "SeriesInstanceUID",
    "k": "StudyInstanceUID",
    "m": "manufacturer (short)",
    "p": "ProtocolName",
    "r": "InstanceNumber",
    "s": "SeriesNumber",
    "t": "StudyDate+StudyTime",
    "u": "AcquisitionNumber",
    "v": "Manufacturer",
    "x": "StudyID",
    "z": "SequenceName",
    "D": "StudyDate",
    "M": "Modality",
    "B": "BodyPartExamined",
}
_NUMBERS = {"e", "r", "s", "u"}
_TOKEN = re.compile(r"%(\d*)(.)")
_SHORT = (("GE", "GE"), ("PHILIPS", "Ph"), ("SIEMENS", "Si"), ("TOSHIBA", "To"), ("CANON", "To"), ("UIH", "UI"))


def check_pattern(pattern: str) -> str:
    """Validate a pattern (unknown placeholders, absolute paths, ``..``, backslashes).

    Returns:
        The pattern.

    Raises:
        ConfigError: Naming the problem.
    """
    if not pattern.strip():
        raise ConfigError("--pattern is empty")
    if pattern.startswith("/") or "\\" in pattern:
        raise ConfigError(f"--pattern {pattern!r}: must be a relative path with '/' between folders")
    if any(part.strip() in ("..", ".") for part in pattern.split("/")):
        raise ConfigError(f"--pattern {pattern!r}: '.' and '..' components are not allowed")
    for match in _TOKEN.finditer(pattern):
        letter = match.group(2)
        if letter == "%" and not match.group(1):
            continue
        if letter not in PATTERN_FIELDS:
            known = ", ".join(f"%{k}" for k in PATTERN_FIELDS)
            raise ConfigError(f"--pattern {pattern!r}: unknown placeholder %{match.group(1)}{letter} (known: {known})")
        if match.group(1) and letter not in _NUMBERS:
            raise ConfigError(f"--pattern {pattern!r}: a width only applies to %e, %r, %s and %u")
    return pattern


def safe_component(text: str) -> str:
    """One path component from arbitrary text: ``[A-Za-z0-9.+-]`` runs, others ``_``; never starts with a dot."""
    cleaned = re.sub(r"[^A-Za-z0-9.+-]+", "_", text.strip()).strip("._")
    return cleaned[:80]


def _text(header: Mapping[str, Any] | Any, keyword: str) -> str:
    value = header.get(keyword, "") if hasattr(header, "get") else ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "_".join(str(v) for v in value)
    return str(value).strip()


def _value(letter: str, header: Any, first_file: Path | None) -> str:
    if letter == "b":
        return first_file.name.split(".")[0] if first_file is not None else ""
    if letter == "f":
        return first_file.parent.name if first_file is not None else ""
    if letter == "m":
        vendor = _text(header, "Manufacturer").upper()
        return next((short for key, short in _SHORT if key in vendor), "NA")
    if letter == "p":
        return _text(header, "ProtocolName") or _text(header, "SequenceName")
    if letter == "t":
        date, time = _text(header, "StudyDate"), _text(header, "StudyTime").split(".")[0]
        return date + time[:6]
    keyword = {
        "d": "SeriesDescription",
        "e": "EchoNumbers",
        "g": "AccessionNumber",
        "i": "PatientID",
        "j": "SeriesInstanceUID",
        "k": "StudyInstanceUID",
        "r": "InstanceNumber",
        "s": "SeriesNumber",
        "u": "AcquisitionNumber",
        "v": "Manufacturer",
        "x": "StudyID",
        "z": "SequenceName",
        "D": "StudyDate",
        "M": "Modality",
        "B": "BodyPartExamined",
    }[letter]
    return _text(header, keyword)


def expand_pattern(pattern: str, header: Any, *, first_file: Path | None = None) -> str:
    """The relative output name (no suffix) for one series.

    Args:
        pattern: A pattern accepted by :func:`check_pattern`.
        header: The series' first header (a pydicom dataset or a mapping of DICOM keywords).
        first_file: The series' first file (``%b``, ``%f``).

    Returns:
        ``folder/.../name`` with every component sanitised and non-empty.
    """
    check_pattern(pattern)
    components = []
    for part in pattern.split("/"):

        def substitute(match: re.Match[str]) -> str:
            width, letter = match.group(1), match.group(2)
            if letter == "%":
                return "%"
            value = safe_component(_value(letter, header, first_file))
            if width and value.isdigit():
                value = value.zfill(int(width))
            return value

        text = safe_component(_TOKEN.sub(substitute, part))
        components.append(text or "unknown")
    return "/".join(components)
