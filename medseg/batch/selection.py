"""Series-selection rules in YAML, modelled on MONAI Deploy's ``DICOMSeriesSelectorOperator``.

A rules file holds named *selections*; a series is eligible when it meets every condition
of at least one selection (the first matching selection is recorded).  Conditions are keyed
by DICOM keyword (``Modality``, ``BodyPartExamined``, ``SeriesDescription``, ``ImageType``,
``SliceThickness``, ``Manufacturer``, ... any keyword of the data dictionary) or by one of
the derived attributes:

* ``NumberOfSlices``: distinct slice positions of the series;
* ``Orientation``: ``axial``, ``coronal`` or ``sagittal`` - the patient axis closest to the
  slice normal from ImageOrientationPatient;
* ``ObliquityDeg``: angle in degrees between the slice normal and that axis.

Condition values (MONAI Deploy's shorthands plus explicit operators)::

    Modality: CT                   # string: case-insensitive equality, else regex search
    SeriesDescription: "(?i)^(?!.*scout)"
    ImageType: [ORIGINAL, PRIMARY] # list of strings: all present (multi-valued attribute)
                                   #   or any of them (single-valued attribute)
    SliceThickness: [0.5, 5.0]     # two numbers (either may be null): inclusive range
    SeriesNumber: 3                # number: equality
    BodyPartExamined: {any_of: [ABDOMEN, CHEST], missing: true}
    ImageType: {all_of: [ORIGINAL, PRIMARY], none_of: [LOCALIZER]}
    NumberOfSlices: {min: 20}

Operators: ``equals``, ``regex``, ``not_regex``, ``any_of``, ``all_of``, ``none_of``, ``min``,
``max`` and ``missing`` (``true``: a missing attribute passes this condition; default: it fails).
A ``null`` condition is ignored.  Top level: ``selections`` (required) and ``all_matched``
(default ``true``: every matching series of a study is selected; ``false``: only the first
per study and selection, in SeriesNumber order, as MONAI Deploy does by default).

Values of identifying attributes (PatientName, PatientID, ...) never appear in reasons.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError
from medseg.types import PathLike

__all__ = [
    "DERIVED_ATTRIBUTES",
    "IDENTIFYING",
    "Condition",
    "Decision",
    "Selection",
    "SelectionRules",
    "SeriesInfo",
    "default_rules",
    "load_rules",
    "parse_rules",
    "plane_of",
]

DERIVED_ATTRIBUTES = ("NumberOfSlices", "Orientation", "ObliquityDeg")
_OPERATORS = {"equals", "regex", "not_regex", "any_of", "all_of", "none_of", "min", "max", "missing"}
#: Attributes whose values identify a person: never echoed in a reason.
IDENTIFYING = {
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "OperatorsName",
    "PerformingPhysicianName",
}


def plane_of(orientation: Sequence[float] | None) -> tuple[str, float]:
    """Anatomical plane and obliquity of slices with ImageOrientationPatient ``orientation``.

    Args:
        orientation: The six direction cosines (row direction, column direction), LPS.

    Returns:
        ``("axial" | "coronal" | "sagittal", degrees between the slice normal and that axis)``,
        or ``("", nan)`` when unknown.
    """
    if orientation is None or len(orientation) != 6:
        return "", math.nan
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return "", math.nan
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    angle = float(np.degrees(np.arccos(min(1.0, float(normal[axis])))))
    return ("sagittal", "coronal", "axial")[axis], angle


@dataclass
class SeriesInfo:
    """What the rules see of one series: header attributes by DICOM keyword plus derived ones.

    Attributes:
        key: The series key (for messages).
        attributes: ``{keyword: value}``; multi-valued attributes as lists.
    """

    key: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def get(self, keyword: str) -> Any:
        """The attribute value, ``None`` when absent or empty."""
        value = self.attributes.get(keyword)
        if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
            return None
        if isinstance(value, float) and math.isnan(value):
            return None
        return value


@dataclass(frozen=True)
class Decision:
    """The outcome of the rules for one series."""

    selected: bool
    selection: str | None
    reason: str


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    if _is_number(value):
        return float(value)
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return None


def _show(keyword: str, value: Any) -> str:
    if keyword in IDENTIFYING:
        return "<redacted>"
    if _is_number(value):
        return f"{float(value):.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(str(value))


@dataclass
class Condition:
    """One attribute test; built from a YAML value by :meth:`parse`."""

    keyword: str
    equals: Any = None
    regex: str | None = None
    not_regex: str | None = None
    any_of: list[str] | None = None
    all_of: list[str] | None = None
    none_of: list[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    missing_ok: bool = False

    @classmethod
    def parse(cls, keyword: str, value: Any, *, where: str) -> Condition | None:
        """Build a condition from its YAML form (``None`` for a ``null`` condition).

        Raises:
            ConfigError: Unknown keyword or operator, bad regex, bad range.
        """
        _check_keyword(keyword, where=where)
        if value is None:
            return None
        cond = cls(keyword=keyword)
        if isinstance(value, bool):
            raise ConfigError(f"{where}: condition {keyword}: a boolean is not a valid value")
        if isinstance(value, str):
            cond.regex = value
        elif _is_number(value):
            cond.equals = float(value)
        elif isinstance(value, list):
            cls._parse_list(cond, value, where=where)
        elif isinstance(value, dict):
            cls._parse_operators(cond, value, where=where)
        else:
            raise ConfigError(f"{where}: condition {keyword}: unsupported value {value!r}")
        for pattern in (cond.regex, cond.not_regex):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{where}: condition {keyword}: invalid regex {pattern!r} ({exc})") from exc
        if cond.minimum is not None and cond.maximum is not None and cond.minimum > cond.maximum:
            raise ConfigError(f"{where}: condition {keyword}: min {cond.minimum} > max {cond.maximum}")
        return cond

    @staticmethod
    def _parse_list(cond: Condition, value: list[Any], *, where: str) -> None:
        if len(value) == 2 and all(v is None or _is_number(v) for v in value):
            cond.minimum = None if value[0] is None else float(value[0])
            cond.maximum = None if value[1] is None else float(value[1])
        elif value and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            cond.all_of = [str(v) for v in value]  # becomes any-of for single-valued attributes
        else:
            raise ConfigError(f"{where}: condition {cond.keyword}: a list is [min, max] or a list of strings")

    @staticmethod
    def _parse_operators(cond: Condition, value: dict[str, Any], *, where: str) -> None:
        unknown = set(value) - _OPERATORS
        if unknown:
            raise ConfigError(
                f"{where}: condition {cond.keyword}: unknown operator(s) {sorted(unknown)}"
                f" (allowed: {', '.join(sorted(_OPERATORS))})"
            )
        for name in ("any_of", "all_of", "none_of"):
            if name in value:
                items = value[name]
                if not isinstance(items, list) or not items:
                    raise ConfigError(f"{where}: condition {cond.keyword}: {name} needs a non-empty list")
                setattr(cond, name, [str(v) for v in items])
        for name, attr in (("min", "minimum"), ("max", "maximum")):
            if value.get(name) is not None:
                if not _is_number(value[name]):
                    raise ConfigError(f"{where}: condition {cond.keyword}: {name} must be a number")
                setattr(cond, attr, float(value[name]))
        if "equals" in value:
            cond.equals = value["equals"]
        for name in ("regex", "not_regex"):
            if value.get(name) is not None:
                setattr(cond, name, str(value[name]))
        cond.missing_ok = bool(value.get("missing", False))
        if cond.keyword == "Orientation":
            for items in (cond.any_of, cond.all_of, cond.none_of):
                for item in items or []:
                    _check_plane(item, where=where)

    def check(self, info: SeriesInfo) -> str | None:
        """``None`` when the series passes, else why not (one short sentence)."""
        value = info.get(self.keyword)
        if value is None:
            return None if self.missing_ok else f"{self.keyword} is missing"
        shown = _show(self.keyword, value)
        if self.minimum is not None or self.maximum is not None:
            number = _as_number(value[0] if isinstance(value, (list, tuple)) else value)
            if number is None:
                return f"{self.keyword} {shown} is not a number"
            if self.minimum is not None and number < self.minimum - 1e-9:
                return f"{self.keyword} {shown} < {self.minimum:g}"
            if self.maximum is not None and number > self.maximum + 1e-9:
                return f"{self.keyword} {shown} > {self.maximum:g}"
        multi = isinstance(value, (list, tuple))
        items = [str(v).strip().casefold() for v in (value if multi else [value])]
        if self.equals is not None and not self._equals(value):
            return f"{self.keyword} is {shown}, wants {self.equals!r}"
        if self.regex is not None and not any(_match(self.regex, item) for item in items):
            return f"{self.keyword} {shown} does not match {self.regex!r}"
        if self.not_regex is not None and any(re.search(self.not_regex, i, re.IGNORECASE) for i in items):
            return f"{self.keyword} {shown} matches excluded {self.not_regex!r}"
        if self.all_of is not None:
            wanted = [w.casefold() for w in self.all_of]
            if multi and not all(w in items for w in wanted):
                return f"{self.keyword} {shown} lacks {[w for w in self.all_of if w.casefold() not in items]}"
            if not multi and items[0] not in wanted:
                return f"{self.keyword} {shown} is not one of {self.all_of}"
        if self.any_of is not None and not any(w.casefold() in items for w in self.any_of):
            return f"{self.keyword} {shown} is not one of {self.any_of}"
        if self.none_of is not None:
            bad = [w for w in self.none_of if w.casefold() in items]
            if bad:
                return f"{self.keyword} {shown} contains excluded {bad}"
        return None

    def _equals(self, value: Any) -> bool:
        if _is_number(self.equals):
            number = _as_number(value[0] if isinstance(value, (list, tuple)) else value)
            return number is not None and abs(number - float(self.equals)) <= 1e-6 * max(1.0, abs(number))
        return str(value).strip().casefold() == str(self.equals).strip().casefold()


def _match(pattern: str, item: str) -> bool:
    """MONAI Deploy's string rule: case-insensitive equality, else a case-insensitive regex search."""
    return item == pattern.casefold() or re.search(pattern, item, re.IGNORECASE) is not None


def _check_keyword(keyword: str, *, where: str) -> None:
    from pydicom.datadict import tag_for_keyword

    if keyword in DERIVED_ATTRIBUTES or tag_for_keyword(keyword) is not None:
        return
    raise ConfigError(
        f"{where}: unknown attribute {keyword!r} (a DICOM keyword such as Modality, or one of"
        f" {', '.join(DERIVED_ATTRIBUTES)})"
    )


def _check_plane(value: str, *, where: str) -> None:
    if value.casefold() not in ("axial", "coronal", "sagittal"):
        raise ConfigError(f"{where}: Orientation must be axial, coronal or sagittal, got {value!r}")


@dataclass
class Selection:
    """A named set of conditions that must all hold."""

    name: str
    conditions: list[Condition]

    def check(self, info: SeriesInfo) -> str | None:
        """``None`` when every condition holds, else the first failure."""
        for condition in self.conditions:
            problem = condition.check(info)
            if problem:
                return problem
        return None


@dataclass
class SelectionRules:
    """Parsed rules; :meth:`decide` gives every series a decision with a reason."""

    selections: list[Selection]
    all_matched: bool = True
    source: str = "<default>"

    @property
    def keywords(self) -> set[str]:
        """DICOM keywords the rules read (derived attributes excluded)."""
        return {c.keyword for s in self.selections for c in s.conditions} - set(DERIVED_ATTRIBUTES)

    def decide(self, info: SeriesInfo) -> Decision:
        """Select by the first matching selection, or skip with every selection's first failure."""
        problems = []
        for selection in self.selections:
            problem = selection.check(info)
            if problem is None:
                return Decision(True, selection.name, f"selected by rule '{selection.name}'")
            problems.append(f"'{selection.name}': {problem}")
        return Decision(False, None, "no rule matched: " + "; ".join(problems))

    def decide_all(self, infos: Iterable[SeriesInfo]) -> dict[str, Decision]:
        """Decisions for many series, applying ``all_matched: false`` per study and selection."""
        infos = list(infos)
        decisions = {info.key: self.decide(info) for info in infos}
        if self.all_matched:
            return decisions
        taken: dict[tuple[str, str], str] = {}
        ordered = sorted(infos, key=lambda i: (_as_number(i.get("SeriesNumber")) or math.inf, i.key))
        for info in ordered:
            decision = decisions[info.key]
            if not decision.selected or decision.selection is None:
                continue
            slot = (str(info.get("StudyInstanceUID") or ""), decision.selection)
            if slot in taken:
                decisions[info.key] = Decision(
                    False,
                    None,
                    f"rule '{decision.selection}' already selected series {taken[slot]} of this study"
                    " (all_matched: false)",
                )
            else:
                taken[slot] = info.key
        return decisions


def default_rules() -> SelectionRules:
    """No rules file: every image series except localizers (scouts) is selected."""
    no_localizer = Condition(keyword="ImageType", none_of=["LOCALIZER"], missing_ok=True)
    return SelectionRules(
        selections=[Selection(name="all", conditions=[no_localizer])], source="<default: all but localizers>"
    )


def parse_rules(data: Any, *, source: str) -> SelectionRules:
    """Validate the YAML structure of a rules document.

    Raises:
        ConfigError: The message names the file and the offending key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a rules file is a mapping with a 'selections' list")
    unknown = set(data) - {"selections", "all_matched", "name", "description", "version"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    raw = data.get("selections")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: 'selections' must be a non-empty list")
    selections = []
    for index, item in enumerate(raw):
        where = f"{source}: selections[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: must be a mapping with 'name' and 'conditions'")
        bad = set(item) - {"name", "conditions", "description"}
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {sorted(bad)}")
        name = str(item.get("name") or f"selection {index + 1}")
        conditions = item.get("conditions") or {}
        if not isinstance(conditions, Mapping):
            raise ConfigError(f"{where} ('{name}'): 'conditions' must be a mapping of attribute: value")
        parsed = [Condition.parse(str(k), v, where=f"{where} ('{name}')") for k, v in conditions.items()]
        if "Orientation" in conditions and isinstance(conditions["Orientation"], str):
            _check_plane(conditions["Orientation"], where=where)
        selections.append(Selection(name=name, conditions=[c for c in parsed if c is not None]))
    all_matched = data.get("all_matched", True)
    if not isinstance(all_matched, bool):
        raise ConfigError(f"{source}: all_matched must be true or false")
    return SelectionRules(selections=selections, all_matched=all_matched, source=source)


def load_rules(path: PathLike | None) -> SelectionRules:
    """Read a rules YAML file (``None``: every image series except localizers).

    Raises:
        ConfigError: Unreadable YAML or invalid rules; the message names the file and key.
    """
    if path is None:
        return default_rules()
    from medseg.io.safe_yaml import load_yaml_file

    p = Path(path)
    data = load_yaml_file(p, what="rules file")
    return parse_rules(data, source=str(p))
