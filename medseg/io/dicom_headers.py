"""Real-world header noise in the source of a derived DICOM object (SEG, RTSTRUCT), made valid on a copy.

A DICOM SEG or RTSTRUCT copies the patient and study attributes of the images it was drawn on.
Real archives carry values that the loader (rightly) accepts but that are not valid DICOM, and
highdicom refuses to build a SEG from them ("'' is not a valid SpecificCharacterSet", "'U' is not a
valid PatientSex", a Type 2 attribute that is absent ...).  :func:`clean_identity` returns a copy of
a source header in which exactly those attributes are made valid without inventing anything:

* **SpecificCharacterSet**: empty -> removed (the default repertoire, which is what an empty value
  means); a spelling variant (``ISO IR 100``, ``iso_ir 100``, ``UTF-8``, a multi-valued one whose
  first value is empty) -> its defined term; anything else highdicom does not accept -> ``ISO_IR 192``
  (UTF-8).  Text values are decoded with the *source's* character set (as pydicom reads them) before
  the term changes, so names keep their characters.
* **PatientSex**: ``MALE``/``FEMALE``/``OTHER`` (any case) -> ``M``/``F``/``O``; other values
  (``U``, ``unknown``, ...) -> empty (Type 2: unknown).
* **Dates** (PatientBirthDate, StudyDate): ``YYYY-MM-DD`` / ``YYYY.MM.DD`` / ``YYYY/MM/DD`` ->
  ``YYYYMMDD``; impossible dates (``00000000``, month 13) -> empty.
* **StudyTime**: ``HH:MM:SS`` (ACR-NEMA) -> ``HHMMSS``; more than 6 fraction digits -> 6;
  impossible times -> empty.
* Type 2 patient/study attributes that are absent (PatientID, PatientName, PatientBirthDate,
  PatientSex, StudyDate, StudyTime, ReferringPhysicianName, StudyID, AccessionNumber) -> present
  and empty.

Identifiers are never made up: an empty or invalid value becomes empty, never a placeholder, and
values that are valid are copied as they are (an over-long AccessionNumber stays over-long).  UIDs
are not touched here: a source whose UIDs were blanked cannot be referenced at all and is refused
by the writers.  The caller's datasets are never modified.
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
import warnings
from typing import Any

from pydicom.dataset import Dataset

__all__ = ["TYPE2_IDENTITY", "clean_identity", "clean_specific_character_set"]

#: Type 2 patient/study attributes every derived object carries (empty when unknown).
TYPE2_IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}
_ISO_IR = re.compile(r"^ISO[ _-]?IR[ _-]?(\d+)$")
_ISO_2022 = re.compile(r"^ISO[ _-]?2022[ _-]?IR[ _-]?(\d+)$")
_UTF8 = {"UTF-8", "UTF8", "UTF_8"}
_DATE = re.compile(r"^(\d{4})[-./]?(\d{2})[-./]?(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d+))?)?)?$")


#: Single-valued defined terms without code extensions (accepted by highdicom; checked without importing it).
_PLAIN_TERMS = frozenset(
    {f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 13, 192, 203)} | {"GB18030", "GBK"}
)


def _accepted_by_highdicom(value: str | list[str]) -> bool:
    """Whether highdicom (which builds the SEG) accepts this SpecificCharacterSet value."""
    if isinstance(value, str) and value in _PLAIN_TERMS:
        return True
    try:
        from highdicom.valuerep import _check_specific_character_set
    except ImportError:  # another highdicom layout: its public list of defined terms
        from highdicom.enum import SpecificCharacterSetValues

        terms = {v.value for v in SpecificCharacterSetValues}
        return all(v in terms for v in ([value] if isinstance(value, str) else value))
    try:
        _check_specific_character_set(value)
    except (ValueError, TypeError):
        return False
    return True


def _term(value: str) -> str:
    """One SpecificCharacterSet value -> its defined-term spelling (unchanged when unknown)."""
    text = value.strip().upper()
    if text in _UTF8:
        return "ISO_IR 192"
    if match := _ISO_IR.match(text):
        return f"ISO_IR {match.group(1)}"
    if match := _ISO_2022.match(text):
        return f"ISO 2022 IR {match.group(1)}"
    return text


def clean_specific_character_set(value: Any) -> tuple[str | list[str] | None, str | None]:
    """A SpecificCharacterSet value that highdicom accepts and that encodes the same text.

    Args:
        value: The source's value (a string, a list of strings, or ``None`` when absent).

    Returns:
        ``(value, note)``: ``None`` means "absent" (default repertoire); ``note`` says what changed
        (``None``: the value was kept).
    """
    if value is None:
        return None, None
    values = [str(v) for v in ([value] if isinstance(value, str) else list(value))]
    if not any(v.strip() for v in values):
        return None, f"SpecificCharacterSet {value!r} is empty: the default repertoire (attribute removed)"
    terms = [_term(v) for v in values]
    if len(terms) == 1:
        if terms[0] == "ISO_IR 6":
            return None, f"SpecificCharacterSet {value!r} is the default repertoire (attribute removed)"
        if terms[0].startswith("ISO 2022 IR "):  # one term: code extensions are not needed (highdicom refuses them)
            terms[0] = terms[0].replace("ISO 2022 IR ", "ISO_IR ") if terms[0] != "ISO 2022 IR 6" else ""
            if not terms[0]:
                return None, f"SpecificCharacterSet {value!r} is the default repertoire (attribute removed)"
    elif not terms[0]:
        terms[0] = "ISO 2022 IR 6"  # an empty first value of several is the default repertoire
    candidate: str | list[str] = terms[0] if len(terms) == 1 else terms
    if _accepted_by_highdicom(candidate):
        if candidate == (value if isinstance(value, str) else values):
            return candidate, None
        return candidate, f"SpecificCharacterSet {value!r} written as {candidate!r}"
    return "ISO_IR 192", f"SpecificCharacterSet {value!r} is not a valid value: text written as UTF-8 (ISO_IR 192)"


def _clean_date(text: str) -> str:
    match = _DATE.match(text.strip())
    if not match:
        return ""
    try:
        _dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return ""
    return "".join(match.groups())


def _clean_time(text: str) -> str:
    match = _TIME.match(text.strip())
    if not match:
        return ""
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or (minutes and int(minutes) > 59) or (seconds and int(seconds) > 60):
        return ""
    return hours + (minutes or "") + (seconds or "") + (f".{fraction[:6]}" if fraction else "")


def _decoded_copy(header: Dataset) -> Dataset:
    """A deep copy with every element decoded with the header's own character set."""
    out = copy.deepcopy(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on odd character sets / values
        for _ in _walk(out):
            pass
    return out


def _walk(ds: Dataset) -> Any:
    for tag in list(ds.keys()):
        try:
            element = ds[tag]  # converts a raw element with the dataset's current character set
        except Exception:  # an undecodable private element: left raw, never copied by the writers
            continue
        yield element
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _walk(item)


def clean_identity(header: Dataset) -> tuple[Dataset, list[str]]:
    """The source header a derived object copies patient/study attributes from, made valid.

    See the module docstring for the rules.

    Args:
        header: A source image header (not modified).

    Returns:
        ``(header, notes)``: ``header`` itself when nothing needed a change, else a corrected
        copy; a note per changed attribute (no attribute values that could identify the patient).
    """
    notes: list[str] = []
    changes: dict[str, Any] = {}
    raw_charset = header.get("SpecificCharacterSet")
    charset, note = clean_specific_character_set(raw_charset)
    if note:
        notes.append(note)
    for keyword in TYPE2_IDENTITY:
        if keyword not in header:
            changes[keyword] = ""
            notes.append(f"{keyword} absent: written empty (Type 2)")
    sex = str(header.get("PatientSex", "") or "")
    if sex.strip() and _SEX.get(sex.strip().upper()) != sex:
        changes["PatientSex"] = _SEX.get(sex.strip().upper(), "")
        notes.append(f"PatientSex {sex!r} is not M, F or O: written {changes['PatientSex']!r}")
    for keyword, clean, kind in (
        ("PatientBirthDate", _clean_date, "date"),
        ("StudyDate", _clean_date, "date"),
        ("StudyTime", _clean_time, "time"),
    ):
        value = header.get(keyword)
        text = "" if value is None else str(value)
        if text.strip() and clean(text) != text:
            changes[keyword] = clean(text)
            outcome = f"written as {changes[keyword]!r}" if changes[keyword] else "written empty"
            if keyword == "PatientBirthDate":  # never quote it
                outcome = "normalised" if changes[keyword] else "written empty"
                notes.append(f"{keyword} is not a valid DICOM {kind}: {outcome}")
            else:
                notes.append(f"{keyword} {text!r} is not a valid DICOM {kind}: {outcome}")
    if not notes:
        return header, []
    out = _decoded_copy(header)
    if charset is None:
        if "SpecificCharacterSet" in out:
            del out.SpecificCharacterSet
    elif charset != raw_charset:
        out.SpecificCharacterSet = charset
    for keyword, value in changes.items():
        setattr(out, keyword, value)
    return out, notes
