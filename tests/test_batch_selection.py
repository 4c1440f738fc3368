from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medseg.batch.selection import SeriesInfo, load_rules, parse_rules, plane_of
from medseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _iop(rotation: np.ndarray) -> list[float]:
    return [*rotation[:, 0], *rotation[:, 1]]


def test_plane_of_classifies_by_slice_normal() -> None:
    assert plane_of([1, 0, 0, 0, 1, 0]) == ("axial", 0.0)
    assert plane_of([1, 0, 0, 0, 0, -1])[0] == "coronal"
    assert plane_of([0, 1, 0, 0, 0, -1])[0] == "sagittal"
    tilted = Rotation.from_euler("x", 15, degrees=True).as_matrix()
    plane, angle = plane_of(_iop(tilted))
    assert plane == "axial"
    assert angle == pytest.approx(15.0, abs=1e-6)
    plane, angle = plane_of(None)
    assert plane == "" and math.isnan(angle)


def _info(**attrs: object) -> SeriesInfo:
    base: dict[str, object] = {
        "Modality": "CT",
        "SeriesDescription": "Abdomen 3mm",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "BodyPartExamined": "ABDOMEN",
        "NumberOfSlices": 120,
        "SliceThickness": 3.0,
        "Orientation": "axial",
        "ObliquityDeg": 0.0,
        "StudyInstanceUID": "1.2.3",
        "SeriesNumber": 2,
        "PatientID": "SECRET-ID-42",
    }
    base.update(attrs)
    return SeriesInfo(key=str(attrs.get("key", "k")), attributes=base)


def test_sample_rules_file_selects_and_explains() -> None:
    rules = load_rules(REPO / "configs" / "batch_rules.yaml")
    assert [s.name for s in rules.selections] == ["abdomen-ct", "abdomen-mr-t1"]
    good = rules.decide(_info())
    assert good.selected and good.selection == "abdomen-ct"
    cases = {
        "localizer": (_info(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "contains excluded ['LOCALIZER']"),
        "derived": (_info(ImageType=["DERIVED", "SECONDARY"]), "lacks ['ORIGINAL', 'PRIMARY']"),
        "few slices": (_info(NumberOfSlices=3), "NumberOfSlices 3 < 20"),
        "thick": (_info(SliceThickness=10.0), "SliceThickness 10 > 5"),
        "coronal": (_info(Orientation="coronal"), "Orientation 'coronal' does not match 'axial'"),
        "scout": (_info(SeriesDescription="Scout AP"), "matches excluded"),
        "oblique": (_info(ObliquityDeg=35.0), "ObliquityDeg 35 > 20"),
        "head": (_info(BodyPartExamined="HEAD"), "BodyPartExamined 'HEAD' is not one of"),
    }
    for name, (info, expected) in cases.items():
        decision = rules.decide(info)
        assert not decision.selected, name
        assert expected in decision.reason, (name, decision.reason)
        assert decision.reason.startswith("no rule matched: 'abdomen-ct': ")
        assert "'abdomen-mr-t1': Modality is" in decision.reason or "'abdomen-mr-t1': Modality" in decision.reason
    # Body part may be absent (missing: true); thickness missing fails the condition.
    assert rules.decide(_info(BodyPartExamined=None)).selected
    assert "SliceThickness is missing" in rules.decide(_info(SliceThickness=None)).reason
    mr = rules.decide(_info(Modality="MR", SeriesDescription="t1_vibe_fs"))
    assert mr.selected and mr.selection == "abdomen-mr-t1"


def test_monai_deploy_string_semantics_and_lists() -> None:
    rules = parse_rules(
        {
            "selections": [
                {
                    "name": "ct",
                    "conditions": {
                        "Modality": "(?i)ct",
                        "SeriesDescription": "abdomen",  # regex search, case-insensitive
                        "ImageType": ["primary", "ORIGINAL"],  # all present, any case
                        "SeriesNumber": 2,
                        "SliceThickness": [None, 3.0],
                        "BodyPartExamined": None,  # ignored
                    },
                }
            ]
        },
        source="inline",
    )
    assert rules.decide(_info()).selected
    assert not rules.decide(_info(SeriesNumber=3)).selected
    assert "wants 2" in rules.decide(_info(SeriesNumber=3)).reason
    assert not rules.decide(_info(ImageType=["ORIGINAL"])).selected
    # A list of strings on a single-valued attribute means "one of".
    modality = parse_rules({"selections": [{"name": "m", "conditions": {"Modality": ["CT", "MR"]}}]}, source="x")
    assert modality.decide(_info(Modality="mr")).selected
    assert "not one of ['CT', 'MR']" in modality.decide(_info(Modality="PT")).reason


def test_identifying_values_never_appear_in_reasons() -> None:
    rules = parse_rules({"selections": [{"name": "p", "conditions": {"PatientID": "^ANON"}}]}, source="x")
    decision = rules.decide(_info())
    assert not decision.selected
    assert "SECRET" not in decision.reason and "<redacted>" in decision.reason


def test_all_matched_false_takes_first_series_per_study() -> None:
    rules = parse_rules(
        {"all_matched": False, "selections": [{"name": "ct", "conditions": {"Modality": "CT"}}]}, source="x"
    )
    infos = [
        _info(key="b", SeriesNumber=5),
        _info(key="a", SeriesNumber=3),
        _info(key="c", SeriesNumber=1, StudyInstanceUID="9.9"),
    ]
    decisions = rules.decide_all(infos)
    assert decisions["a"].selected and decisions["c"].selected
    assert not decisions["b"].selected and "already selected series a" in decisions["b"].reason


def test_default_rules_skip_localizers_only() -> None:
    rules = load_rules(None)
    assert rules.decide(_info(Modality="MR", NumberOfSlices=2)).selected
    assert rules.decide(_info(ImageType=None)).selected
    assert "LOCALIZER" in rules.decide(_info(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])).reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("selections: []", "non-empty list"),
        ("selections:\n  - name: a\n    conditions: {Modaliy: CT}", "unknown attribute 'Modaliy'"),
        ("selections:\n  - name: a\n    conditions: {SeriesDescription: '(unclosed'}", "invalid regex"),
        ("selections:\n  - name: a\n    conditions: {Modality: {startswith: C}}", "unknown operator"),
        ("selections:\n  - name: a\n    conditions: {SliceThickness: [5, 1]}", "min 5.0 > max 1.0"),
        ("selections:\n  - name: a\n    conditions: {Orientation: axail}", "axial, coronal or sagittal"),
        ("selection: []", "unknown top-level key"),
        ("selections: [{name: a, conditions: {Modality: CT}, extra: 1}]", "unknown key(s) ['extra']"),
        ("selections: [\n", "invalid YAML"),
    ],
)
def test_bad_rules_files_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
