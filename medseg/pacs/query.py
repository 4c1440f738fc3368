"""Query filters (YAML or command line), their DICOM matching semantics, and the series a query finds.

A filters file is a mapping of DICOM keywords to match values, plus two reserved keys::

    PatientID: "MEDSEG-*"            # wildcards * and ? (string attributes)
    StudyDate: 20250101-20261231     # ranges FROM-TO (either side may be empty) for dates/times
    Modality: [CT, MR]               # a list: any of (sent to the PACS only for UID attributes)
    SeriesDescription: "*ABDOMEN*"
    BodyPartExamined: ABDOMEN
    rules: rules.yaml                # optional: medseg batch selection rules (file or inline mapping)
    limit: 200                       # optional: at most this many series

Study-level keywords (patient, study date, accession, ...) filter studies, everything else
filters series.  Every result is checked again locally with the same semantics
(case-insensitive), because PACS servers differ: some ignore filters on attributes they do not
index, and some (Orthanc 1.10's DICOMweb plugin) do not percent-decode query values, so a
value with a space never matches there.  Characters that would need percent-encoding are
therefore sent as the single-character wildcard ``?`` (broadening the server's match) and
the exact value is enforced locally.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from medseg.errors import ConfigError
from medseg.types import PathLike

__all__ = [
    "SERIES_FIELDS",
    "STUDY_FIELDS",
    "STUDY_LEVEL",
    "QueryFilters",
    "RemoteSeries",
    "dataset_attributes",
    "load_filters",
    "matches",
    "parse_filters",
    "server_value",
    "sort_series",
]

#: Keywords matched at the study level (everything else is a series-level filter).
STUDY_LEVEL = frozenset(
    {
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "StudyDescription",
        "StudyInstanceUID",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "InstitutionName",
    }
)
#: Attributes always requested at each level.
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyDescription", "PatientID", "AccessionNumber")
SERIES_FIELDS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
_RESERVED = {"rules", "limit"}
_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_RANGE_VRS = {"DA", "TM", "DT"}
_URL_SAFE = re.compile(r"[A-Za-z0-9\-._~*?,^:]")


def _vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return dictionary_VR(tag) if tag is not None else ""


def _normalise(keyword: str, value: Any, *, where: str) -> str | list[str]:
    """A YAML/CLI value as a DICOM match string (or a list meaning any-of)."""
    vr = _vr(keyword)
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{where}: {keyword}: expected a string, number, date, range or list")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{where}: {keyword}: an empty list matches nothing")
        items = [_normalise(keyword, v, where=where) for v in value]
        return [str(i) for i in items]
    if isinstance(value, Mapping):
        unknown = set(value) - {"from", "to"}
        if vr not in _RANGE_VRS or unknown:
            raise ConfigError(f"{where}: {keyword}: a mapping is only a {{from:, to:}} range of a date or time")
        low = "" if value.get("from") is None else str(_normalise(keyword, value["from"], where=where))
        high = "" if value.get("to") is None else str(_normalise(keyword, value["to"], where=where))
        return f"{low}-{high}"
    if isinstance(value, (dt.date, dt.datetime)):
        return value.strftime("%Y%m%d" if vr == "DA" or not isinstance(value, dt.datetime) else "%Y%m%d%H%M%S")
    text = str(value).strip()
    if vr == "DA":
        text = re.sub(r"(\d{4})-(\d{2})-(\d{2})", r"\1\2\3", text)  # ISO dates, also inside ranges
        if not re.fullmatch(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}", text):
            raise ConfigError(f"{where}: {keyword}: {text!r} is not a date YYYYMMDD or range FROM-TO")
    if not text:
        raise ConfigError(f"{where}: {keyword}: empty value (leave the key out to match everything)")
    return text


@dataclass
class QueryFilters:
    """What to look for on the PACS.

    Attributes:
        study: Study-level filters ``{keyword: value}`` (a list value means any of).
        series: Series-level filters.
        rules: Selection rules YAML file or inline mapping (medseg batch format), or ``None``.
        limit: At most this many series.
        source: Where the filters came from (for messages).
    """

    study: dict[str, str | list[str]] = field(default_factory=dict)
    series: dict[str, str | list[str]] = field(default_factory=dict)
    rules: Any = None
    limit: int | None = None
    source: str = "<command line>"

    def merged(self, other: QueryFilters) -> QueryFilters:
        """``other``'s filters override these (command-line flags over a file)."""
        return QueryFilters(
            study={**self.study, **other.study},
            series={**self.series, **other.series},
            rules=other.rules if other.rules is not None else self.rules,
            limit=other.limit if other.limit is not None else self.limit,
            source=self.source if not (other.study or other.series) else f"{self.source} + {other.source}",
        )

    def describe(self) -> str:
        """One line for logs (values of identifying attributes hidden)."""
        from medseg.batch.selection import IDENTIFYING

        parts = [f"{k}={'<redacted>' if k in IDENTIFYING else v}" for k, v in {**self.study, **self.series}.items()]
        return ", ".join(parts) or "(no filters: every series)"


def parse_filters(data: Any, *, source: str = "<memory>", base_dir: PathLike | None = None) -> QueryFilters:
    """Validate a filters mapping (see the module docstring).

    Raises:
        ConfigError: Unknown keyword, bad value; the message names the source and the key.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a filters file is a mapping of DICOM keyword: value")
    filters = QueryFilters(source=source)
    for key, value in data.items():
        key = str(key)
        if key == "limit":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{source}: limit must be a positive integer")
            filters.limit = value
            continue
        if key == "rules":
            if isinstance(value, str):
                path = Path(value).expanduser()
                filters.rules = path if path.is_absolute() or base_dir is None else Path(base_dir) / path
            elif isinstance(value, Mapping):
                filters.rules = dict(value)
            elif value is not None:
                raise ConfigError(f"{source}: rules must be a file path or a mapping with 'selections'")
            continue
        if tag_for_keyword(key) is None:
            raise ConfigError(f"{source}: {key!r} is not a DICOM keyword (e.g. PatientID, StudyDate, Modality)")
        target = filters.study if key in STUDY_LEVEL else filters.series
        target[key] = _normalise(key, value, where=source)
    return filters


def load_filters(path: PathLike) -> QueryFilters:
    """Read a filters YAML file.

    Raises:
        ConfigError: Unreadable file, invalid YAML or invalid filters.
    """
    from medseg.io.safe_yaml import load_yaml_file

    p = Path(path).expanduser()
    data = load_yaml_file(p, what="filters file")
    return parse_filters(data, source=str(p), base_dir=p.resolve().parent)


# --------------------------------------------------------------------- matching
def server_value(keyword: str, value: str | list[str], *, url: bool) -> str | None:
    """The match value to send to the server, ``None`` to filter only locally.

    Args:
        keyword: DICOM keyword.
        value: Normalised filter value.
        url: The value goes into a URL query (QIDO-RS) rather than a C-FIND identifier.
    """
    vr = _vr(keyword)
    if isinstance(value, list):
        if vr == "UI":
            return ",".join(value) if url else "\\".join(value)
        return None
    if not url:
        return value
    if all(_URL_SAFE.fullmatch(c) for c in value):
        return value
    if vr in _WILDCARD_VRS:
        return "".join(c if _URL_SAFE.fullmatch(c) else "?" for c in value)
    return None


def _in_range(pattern: str, value: str) -> bool:
    """``value`` within ``FROM-TO`` (compared on the bounds' precision, e.g. HHMM for a time range)."""
    low, _, high = pattern.partition("-")
    if low and value[: len(low)] < low:
        return False
    return not (high and value[: len(high)] > high)


def matches(keyword: str, pattern: str | list[str], value: Any) -> bool:
    """DICOM attribute matching of a returned ``value`` (str, number or list) against a filter.

    Single-value, wildcard (``*``, ``?``), range (dates/times ``FROM-TO``), UID-list and list
    (any of) matching; text is compared case-insensitively; a multi-valued attribute matches
    when any of its values does.  A missing value never matches a non-empty filter.
    """
    if isinstance(pattern, list):
        return any(matches(keyword, p, value) for p in pattern)
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [str(v).strip() for v in values if v is not None and str(v).strip() != ""]
    if not texts:
        return False
    vr = _vr(keyword)
    for text in texts:
        if vr in _RANGE_VRS and "-" in pattern:
            if _in_range(pattern, text):
                return True
        elif vr == "UI":
            if text in pattern.split(","):
                return True
        elif vr == "PN":
            if fnmatch.fnmatchcase(text.casefold().rstrip("^"), pattern.casefold().rstrip("^")):
                return True
        elif vr in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"):
            try:
                if float(text) == float(pattern):
                    return True
            except ValueError:
                pass
        elif fnmatch.fnmatchcase(text.casefold(), pattern.casefold().replace("[", "[[]")):
            return True
    return False


def _plain(value: Any) -> Any:
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return value.strip()
    if value is None or isinstance(value, (int, float)):
        return value  # IS and DSfloat are int / float subclasses
    return str(value).strip()  # PersonName, UID, ...


def dataset_attributes(ds: Dataset) -> dict[str, Any]:
    """Top-level attributes of a query result as ``{keyword: plain value}`` (sequences dropped)."""
    out: dict[str, Any] = {}
    for element in ds:
        keyword = element.keyword
        if not keyword or element.VR == "SQ" or keyword == "QueryRetrieveLevel":
            continue
        out[keyword] = _plain(element.value)
    return out


def filter_results(results: Iterable[Dataset], filters: Mapping[str, str | list[str]]) -> list[Dataset]:
    """The results whose attributes match every filter (local verification)."""
    kept = []
    for ds in results:
        attrs = dataset_attributes(ds)
        if all(matches(k, v, attrs.get(k)) for k, v in filters.items()):
            kept.append(ds)
    return kept


@dataclass
class RemoteSeries:
    """A series found on a PACS.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: Modality.
        description: SeriesDescription.
        series_number: SeriesNumber.
        num_instances: NumberOfSeriesRelatedInstances when the server returned it.
        attributes: Every returned study- and series-level attribute by keyword.
    """

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    series_number: int | None = None
    num_instances: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_datasets(cls, study: Mapping[str, Any], series: Mapping[str, Any]) -> RemoteSeries:
        """Combine a study-level and a series-level result (plain attribute mappings)."""
        attrs = {**dict(study), **dict(series)}
        number = attrs.get("SeriesNumber")
        count = attrs.get("NumberOfSeriesRelatedInstances")
        return cls(
            study_uid=str(attrs.get("StudyInstanceUID") or ""),
            series_uid=str(attrs.get("SeriesInstanceUID") or ""),
            modality=str(attrs.get("Modality") or ""),
            description=str(attrs.get("SeriesDescription") or ""),
            series_number=_int(number),
            num_instances=_int(count),
            attributes=attrs,
        )

    def public(self) -> dict[str, Any]:
        """Non-identifying summary (for listings and JSON output)."""
        attrs = self.attributes
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "study_date": str(attrs.get("StudyDate") or ""),
            "modality": self.modality,
            "series_number": self.series_number,
            "description": self.description,
            "body_part": str(attrs.get("BodyPartExamined") or ""),
            "instances": self.num_instances,
        }


def _int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def sort_series(series: list[RemoteSeries]) -> list[RemoteSeries]:
    """Series in study date, study, series number order."""
    return sorted(
        series,
        key=lambda s: (
            str(s.attributes.get("StudyDate") or ""),
            s.study_uid,
            s.series_number if s.series_number is not None else 1 << 30,
            s.series_uid,
        ),
    )


def requested_fields(level: str, filters: Mapping[str, Any], extra: Iterable[str] = ()) -> list[str]:
    """Attributes to ask the server to return at ``level`` (``"study"`` or ``"series"``)."""
    base = STUDY_FIELDS if level == "study" else SERIES_FIELDS
    wanted = dict.fromkeys([*base, *filters, *extra])
    return [k for k in wanted if tag_for_keyword(k) is not None]
