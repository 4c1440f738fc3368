"""PACS layer without a server: profiles and secrets, filters and their DICOM matching, log redaction."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")

from medseg.errors import ConfigError
from medseg.pacs.profile import load_profile, parse_profile, read_secret
from medseg.pacs.query import matches, parse_filters, server_value

REPO = Path(__file__).resolve().parents[1]


def _profile(**dicomweb: object) -> dict[str, object]:
    return {"name": "t", "dicomweb": {"url": "https://pacs.invalid/dicom-web", **dicomweb}}


def test_example_profile_is_valid() -> None:
    profile = load_profile(REPO / "configs" / "pacs_profile.example.yaml")
    assert profile.dicomweb is not None and profile.dicomweb.verify_tls is True
    assert profile.dimse is not None and profile.query_protocol == "dicomweb"


def test_inline_secrets_are_refused_without_echoing_them() -> None:
    data = _profile(auth={"type": "basic", "username": "u", "password": "hunter2-secret"})
    with pytest.raises(ConfigError) as err:
        parse_profile(data, source="p.yaml")
    assert "dicomweb.auth.password" in str(err.value) and "password_env" in str(err.value)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("dicomweb", "needle"),
    [
        ({"url": "https://user:pw@pacs.invalid/dicom-web"}, "must not contain credentials"),
        ({"url": "ftp://pacs.invalid"}, "http:// or https://"),
        ({"auth": {"type": "basic", "username": "u"}}, "password_env or password_file"),
        ({"auth": {"type": "bearer", "token_env": "A", "token_file": "b"}}, "exactly one of token_env"),
        ({"retries": -1}, "retries"),
    ],
)
def test_invalid_profiles_name_the_key(dicomweb: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_profile(_profile(**dicomweb), source="p.yaml")


def test_profile_needs_an_endpoint_and_consistent_protocols() -> None:
    with pytest.raises(ConfigError, match="needs a dicomweb or a dimse section"):
        parse_profile({"name": "x"})
    with pytest.raises(ConfigError, match="no dimse section"):
        parse_profile({**_profile(), "store": {"protocol": "dimse"}})
    with pytest.raises(ConfigError, match="move_port"):
        parse_profile({"dimse": {"host": "127.0.0.1", "port": 104, "retrieve": "move"}})
    with pytest.raises(ConfigError, match="AE title"):
        parse_profile({"dimse": {"host": "127.0.0.1", "port": 104, "calling_aet": "MUCH-TOO-LONG-AE-TITLE"}})


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "token"
    secret.write_text("tok-123\n")
    secret.chmod(0o600)
    profile = parse_profile(_profile(auth={"type": "bearer", "token_file": "token"}), base_dir=tmp_path)
    assert read_secret(profile, env=None, file="token", what="w") == "tok-123"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible to other users"):
        read_secret(profile, env=None, file="token", what="w")
    monkeypatch.delenv("MEDSEG_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="MEDSEG_TEST_UNSET is not set"):
        read_secret(profile, env="MEDSEG_TEST_UNSET", file=None, what="w")
    monkeypatch.setenv("MEDSEG_TEST_TOKEN", "  ")
    with pytest.raises(ConfigError, match="empty"):
        read_secret(profile, env="MEDSEG_TEST_TOKEN", file=None, what="w")


def test_bearer_token_file_is_reread_and_never_shown(tmp_path: Path) -> None:
    import requests

    from medseg.pacs.dicomweb import make_session

    token = tmp_path / "token"
    token.write_text("first-token")
    token.chmod(0o600)
    profile = parse_profile(_profile(auth={"type": "bearer", "token_file": str(token)}), base_dir=tmp_path)
    session = make_session(profile)
    request = session.prepare_request(requests.Request("GET", "https://pacs.invalid/dicom-web/studies"))
    assert request.headers["Authorization"] == "Bearer first-token"
    token.write_text("second-token-longer")
    os.utime(token, ns=(token.stat().st_mtime_ns + 10**9,) * 2)
    request = session.prepare_request(requests.Request("GET", "https://pacs.invalid/dicom-web/studies"))
    assert request.headers["Authorization"] == "Bearer second-token-longer"
    assert "token" not in repr(session.auth).lower().replace("bearerauth", "")
    assert session.verify is True and session.trust_env is False
    adapter = session.get_adapter("https://pacs.invalid")
    assert adapter.max_retries.total == profile.dicomweb.retries
    assert 503 in adapter.max_retries.status_forcelist


def test_library_logs_lose_query_strings_and_authorization(caplog: pytest.LogCaptureFixture) -> None:
    import medseg.pacs.dicomweb  # noqa: F401  (installs the filters)

    logger = logging.getLogger("urllib3.connectionpool")
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        logger.warning("Retrying after error: /dicom-web/studies?PatientID=DOE%5EJOHN&limit=5")
        logger.warning("headers {'Authorization': 'Bearer abc.def'}")
    text = caplog.text
    assert "DOE" not in text and "abc.def" not in text and "<redacted>" in text


def test_filters_parse_dates_ranges_lists_and_levels(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("selections: [{name: all, conditions: {}}]\n")
    filters = parse_filters(
        {
            "PatientID": "MEDSEG-*",
            "StudyDate": {"from": dt.date(2025, 1, 2), "to": "2026-12-31"},
            "Modality": ["CT", "MR"],
            "SeriesDescription": "Phantom CT*",
            "rules": "rules.yaml",
            "limit": 3,
        },
        source="f.yaml",
        base_dir=tmp_path,
    )
    assert filters.study == {"PatientID": "MEDSEG-*", "StudyDate": "20250102-20261231"}
    assert filters.series == {"Modality": ["CT", "MR"], "SeriesDescription": "Phantom CT*"}
    assert filters.rules == tmp_path / "rules.yaml" and filters.limit == 3
    assert "PatientID=<redacted>" in filters.describe()
    with pytest.raises(ConfigError, match="'PatientNam' is not a DICOM keyword"):
        parse_filters({"PatientNam": "x"}, source="f.yaml")
    with pytest.raises(ConfigError, match="not a date"):
        parse_filters({"StudyDate": "last week"}, source="f.yaml")
    with pytest.raises(ConfigError, match="limit"):
        parse_filters({"limit": 0}, source="f.yaml")


@pytest.mark.parametrize(
    ("keyword", "pattern", "value", "expected"),
    [
        ("PatientID", "MEDSEG-*", "MEDSEG-ct_001", True),
        ("PatientID", "MEDSEG-?", "MEDSEG-12", False),
        ("SeriesDescription", "phantom ct*", "Phantom CT ct_001", True),
        ("SeriesDescription", "Phantom CT*", None, False),
        ("StudyDate", "20250101-20251231", "20250615", True),
        ("StudyDate", "20250101-", "20241231", False),
        ("StudyDate", "-20250101", "20241231", True),
        ("StudyTime", "0800-1200", "093012.5", True),
        ("ModalitiesInStudy", "SEG", ["CT", "SEG"], True),
        ("StudyInstanceUID", "1.2.3,1.2.4", "1.2.4", True),
        ("StudyInstanceUID", "1.2.3", "1.2.33", False),
        ("PatientName", "doe^j*", "DOE^JOHN", True),
        ("SeriesNumber", "3", 3, True),
        ("Modality", ["CT", "MR"], "MR", True),
        ("SeriesDescription", "[x]*", "[x] brackets", True),
    ],
)
def test_matching_semantics(keyword: str, pattern: str | list[str], value: object, expected: bool) -> None:
    assert matches(keyword, pattern, value) is expected


def test_values_needing_percent_encoding_are_broadened_for_the_server() -> None:
    assert server_value("SeriesDescription", "Phantom CT*", url=True) == "Phantom?CT*"
    assert server_value("SeriesDescription", "Phantom CT*", url=False) == "Phantom CT*"
    assert server_value("PatientID", "MEDSEG-*", url=True) == "MEDSEG-*"
    assert server_value("StudyInstanceUID", ["1.2", "1.3"], url=True) == "1.2,1.3"
    assert server_value("StudyInstanceUID", ["1.2", "1.3"], url=False) == "1.2\\1.3"
    assert server_value("Modality", ["CT", "MR"], url=True) is None  # any-of only locally
    assert server_value("SeriesNumber", "1 2", url=True) is None  # no wildcard for IS: local only


def test_cli_refuses_unfiltered_runs_and_inline_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.pacs.cli import main

    profile = tmp_path / "p.yaml"
    profile.write_text("dicomweb: {url: 'https://pacs.invalid/dicom-web'}\n")
    args = ["--profile", str(profile), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "no filters" in err and "--all" in err
    assert not (tmp_path / "out").exists()
    profile.write_text("dicomweb: {url: 'https://pacs.invalid', auth: {type: bearer, token: abc-secret}}\n")
    assert main(["query", "--profile", str(profile), "--modality", "CT"]) == 2
    err = capsys.readouterr().err
    assert "secrets must not be written" in err and "abc-secret" not in err
