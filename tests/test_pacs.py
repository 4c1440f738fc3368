"""The PACS layer against a real Orthanc server (Debian packages ``orthanc`` + ``orthanc-dicomweb``).

One Orthanc per session on free loopback ports, storage in a temporary folder, HTTP basic auth,
the DICOMweb plugin enabled and two DICOM modalities registered for medseg (the listener and a
C-MOVE destination).  The tests start and stop it by its process id and skip cleanly when the
binary or the plugin is missing.  Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")
pytest.importorskip("requests")

import requests

from medseg.pacs.errors import PacsAuthError, PacsConnectionError, PacsNotFoundError
from medseg.pacs.profile import PacsProfile, parse_profile
from medseg.pacs.query import parse_filters

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PASSWORD = "medseg-test-password"
LOCALHOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


class Orthanc:
    """An Orthanc process with a temporary storage folder (restartable on the same ports)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.http_port, self.dicom_port = _free_port(), _free_port()
        self.listen_port, self.move_port = _free_port(), _free_port()
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "medseg-test",
                    "StorageDirectory": str(root / "storage"),
                    "IndexDirectory": str(root / "storage"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": "ORTHANC",
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": True,
                    "RegisteredUsers": {"medseg": PASSWORD},
                    "Plugins": [str(PLUGIN)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
                    "DicomModalities": {
                        "medseg": {"AET": "MEDSEG", "Host": LOCALHOST, "Port": self.listen_port},
                        "medsegmove": {"AET": "MEDSEGMOVE", "Host": LOCALHOST, "Port": self.move_port},
                    },
                    "DicomCheckCalledAet": False,
                    "DicomScuTimeout": 10,
                    "SaveJobs": False,
                    "ConcurrentJobs": 2,
                    "HttpsVerifyPeers": False,
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.auth = ("medseg", PASSWORD)
        self.http.trust_env = False

    @property
    def base(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    def start(self) -> None:
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.root / 'orthanc.log'}")
            with contextlib.suppress(requests.ConnectionError):
                if self.http.get(f"{self.base}/system", timeout=2).ok:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            self.start()

    # REST helpers (independent of medseg's clients)
    def upload(self, folder: Path) -> str:
        """POST every file of a folder; returns the Orthanc series id."""
        series = ""
        for path in sorted(folder.iterdir()):
            answer = self.http.post(f"{self.base}/instances", data=path.read_bytes(), timeout=30)
            answer.raise_for_status()
            series = answer.json()["ParentSeries"]
        return series

    def find_series(self, **query: str) -> list[dict[str, Any]]:
        body = {"Level": "Series", "Query": query, "Expand": True}
        answer = self.http.post(f"{self.base}/tools/find", json=body, timeout=30)
        answer.raise_for_status()
        return list(answer.json())

    def seg_instances(self, study_uid: str) -> list[str]:
        """Orthanc ids of the SEG instances in a study."""
        ids = []
        for series in self.find_series(StudyInstanceUID=study_uid, Modality="SEG"):
            ids += series["Instances"]
        return ids

    def series_id(self, series_uid: str) -> str:
        answer = self.http.post(f"{self.base}/tools/lookup", data=series_uid, timeout=30)
        answer.raise_for_status()
        return next(item["ID"] for item in answer.json() if item["Type"] == "Series")

    def instance_file(self, instance_id: str, path: Path) -> Path:
        answer = self.http.get(f"{self.base}/instances/{instance_id}/file", timeout=30)
        answer.raise_for_status()
        path.write_bytes(answer.content)
        return path


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not (os.access(ORTHANC, os.X_OK) and PLUGIN.is_file()):
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs(orthanc: Orthanc) -> Orthanc:
    orthanc.ensure_running()  # a test that stopped it and failed must not break the next one
    return orthanc


# ----------------------------------------------------------------- data
N_SLICES = 18
CASES = ("run_1", "run_2", "run_scout", "run_bad", "run_gone", "out_1", "out_2", "lis_1", "dim_1")


def _set(folder: Path, **attrs: Any) -> None:
    import pydicom

    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(path)


def _crop(volume: Any, start: tuple[int, int, int] = (16, 16, 9), size: tuple[int, int, int] = (48, 48, 18)) -> Any:
    """The central part of a phantom (fewer windows to infer, fewer instances to move), same world grid."""
    from medseg.io.volume import Geometry, Volume

    index = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
    affine = volume.geometry.affine.copy()
    affine[:3, 3] = (affine @ np.array([*start, 1.0]))[:3]
    return Volume(np.ascontiguousarray(volume.array[(slice(None), *index)]), Geometry(size, affine), kind="image")


@pytest.fixture(scope="session")
def phantom_series(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Phantom CT series (two anatomies, UIDs from the case id) uploaded to Orthanc; one is malformed."""
    import pydicom

    from medseg.sample_data import make_phantom, write_ct_dicom_series

    root = tmp_path_factory.mktemp("pacs_series")
    volumes = [_crop(make_phantom(case, modality="CT").channels[0]) for case in (1, 2)]
    out: dict[str, Path] = {}
    for index, case in enumerate(CASES):
        folder = write_ct_dicom_series(volumes[index % 2], root / case, case_id=case)
        _set(folder, BodyPartExamined="ABDOMEN" if index % 2 == 0 else "HEAD")
        if case == "run_bad":  # a malformed instance: pixel data shorter than Rows x Columns
            victim = sorted(folder.iterdir())[5]
            ds = pydicom.dcmread(victim)
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
            ds.save_as(victim)
        orthanc.upload(folder)
        out[case] = folder
    return out


def _profile(orthanc: Orthanc, tmp_path: Path, **overrides: Any) -> PacsProfile:
    secret = tmp_path / "orthanc.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    data: dict[str, Any] = {
        "name": "test-orthanc",
        "dicomweb": {
            "url": f"{orthanc.base}/dicom-web",
            "auth": {"type": "basic", "username": "medseg", "password_file": str(secret)},
            "retries": 1,
            "backoff_s": 0.05,
            "connect_timeout_s": 5,
            "read_timeout_s": 60,
        },
        "dimse": {
            "host": LOCALHOST,
            "port": orthanc.dicom_port,
            "called_aet": "ORTHANC",
            "calling_aet": "MEDSEG",
            "move_aet": "MEDSEGMOVE",
            "move_port": orthanc.move_port,
            "retries": 1,
            "backoff_s": 0.05,
            "dimse_timeout_s": 60,
        },
        "listener": {"aet": "MEDSEG", "bind": LOCALHOST, "port": orthanc.listen_port, "quiet_s": 1, "poll_s": 0.2},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_profile(data, source=str(tmp_path / "profile.yaml"), base_dir=tmp_path)


def _uids(folder: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _same_volume(a: Any, b: Any) -> None:
    assert a.geometry.shape == b.geometry.shape
    np.testing.assert_allclose(a.geometry.affine, b.geometry.affine, atol=1e-6)
    np.testing.assert_array_equal(a.array, b.array)


# ----------------------------------------------------------------- DICOMweb
def test_qido_filters_wado_geometry_and_cli(
    pacs: Orthanc, phantom_series: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg.io import read_dicom_series
    from medseg.pacs.dicomweb import DicomWebClient
    from medseg.pacs.run import retrieve_into

    profile = _profile(pacs, tmp_path)
    with DicomWebClient(profile) as client:
        client.ping()

        def found(**filters: Any) -> set[str]:
            return {s.description for s in client.query(parse_filters(filters))}

        every = {f"Phantom CT {c}" for c in CASES}
        assert found(PatientID="MEDSEG-*", Modality="CT") == every  # other tests add SEG/RTSTRUCT series
        assert found(PatientID="MEDSEG-run_?", Modality="CT") == {"Phantom CT run_1", "Phantom CT run_2"}
        # a space needs percent-encoding, which Orthanc 1.10 does not decode: broadened and checked locally
        assert found(SeriesDescription="Phantom CT run_*") == {f"Phantom CT {c}" for c in CASES if c[:4] == "run_"}
        assert found(SeriesDescription="phantom ct out_1") == {"Phantom CT out_1"}
        assert found(StudyDate={"from": "2025-06-01", "to": "2026-01-01"}, Modality="CT") == every
        assert found(StudyDate="20200101-20201231") == set()
        assert found(PatientID="MEDSEG-out_*", Modality="CT", BodyPartExamined="HEAD") == {"Phantom CT out_1"}
        assert found(Modality=["MR", "CT"], PatientID="MEDSEG-dim_1") == {"Phantom CT dim_1"}
        assert len(client.query(parse_filters({"PatientID": "MEDSEG-*", "limit": 2}))) == 2

        # WADO-RS into the output area: complete folder renamed into place, loader sees the same volume
        (series,) = client.query(parse_filters({"SeriesDescription": "Phantom CT dim_1"}))
        assert series.num_instances == N_SLICES and series.study_uid == _uids(phantom_series["dim_1"])[0]
        folder, count = retrieve_into(client, series, tmp_path / "out")
        assert count == N_SLICES and folder == tmp_path / "out" / "inputs" / series.study_uid / series.series_uid
        assert not any((tmp_path / "out" / ".pacs-tmp").iterdir())
        _same_volume(read_dicom_series(folder), read_dicom_series(phantom_series["dim_1"]))

    from medseg.pacs.cli import main

    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(
        f"name: cli\ndicomweb:\n  url: {pacs.base}/dicom-web\n  auth: {{type: basic, username: medseg,"
        f" password_file: orthanc.password}}\n"
    )
    assert (
        main(["query", "--profile", str(profile_file), "--patient-id", "MEDSEG-out_*", "--modality", "CT", "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["description"] for r in rows) == ["Phantom CT out_1", "Phantom CT out_2"]
    assert all("PatientID" not in r and "patient" not in json.dumps(r).lower() for r in rows)


def test_auth_and_connection_failures_are_clear(pacs: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.pacs.dicomweb import DicomWebClient

    monkeypatch.setenv("MEDSEG_TEST_BAD_PASSWORD", "wrong-password-xyz")
    monkeypatch.setenv("MEDSEG_TEST_TOKEN", "token-abc-123")
    cases = [
        {"auth": {"type": "none"}},
        {"auth": {"type": "basic", "username": "medseg", "password_env": "MEDSEG_TEST_BAD_PASSWORD"}},
        {"auth": {"type": "bearer", "token_env": "MEDSEG_TEST_TOKEN"}},
    ]
    for dicomweb in cases:
        profile = _profile(pacs, tmp_path, dicomweb=dicomweb)
        with pytest.raises(PacsAuthError) as err, DicomWebClient(profile) as client:
            client.query(parse_filters({"PatientID": "MEDSEG-*"}))
        message = str(err.value)
        assert "HTTP 401" in message and "test-orthanc" in message and "credentials" in message
        assert "wrong-password" not in message and "token-abc" not in message and "MEDSEG-" not in message
    dead = _profile(pacs, tmp_path, dicomweb={"url": f"http://{LOCALHOST}:{_free_port()}/dicom-web"})
    t0 = time.monotonic()
    with pytest.raises(PacsConnectionError, match="connection refused while searching studies"):
        DicomWebClient(dead).query(parse_filters({"PatientID": "MEDSEG-*"}))
    assert time.monotonic() - t0 < 10  # one retry with a short backoff, not the library's default minutes


# ----------------------------------------------------------------- DIMSE
def test_dimse_find_get_move_store(pacs: Orthanc, phantom_series: dict[str, Path], tmp_path: Path) -> None:
    from medseg.io import read_dicom_series
    from medseg.io.dicom_seg import write_dicom_seg
    from medseg.io.volume import Volume
    from medseg.pacs.dimse import DimseClient

    profile = _profile(pacs, tmp_path, protocol="dimse")
    client = DimseClient(profile)
    client.echo()
    found = client.query(parse_filters({"PatientID": "MEDSEG-dim*", "SeriesDescription": "Phantom CT*"}))
    assert [s.description for s in found] == ["Phantom CT dim_1"] and found[0].num_instances == N_SLICES
    original = read_dicom_series(phantom_series["dim_1"])
    for method in ("get", "move"):
        dest = tmp_path / method
        assert client.retrieve_series(found[0].study_uid, found[0].series_uid, dest, method=method) == N_SLICES
        _same_volume(read_dicom_series(dest), original)
    with pytest.raises(PacsNotFoundError, match="no instances of this series"):
        client.retrieve_series(found[0].study_uid, "1.2.3.4.5", tmp_path / "none")

    labels = Volume((original.array > 0).astype(np.uint8), original.geometry, kind="label", meta=dict(original.meta))
    seg = write_dicom_seg(labels, phantom_series["dim_1"], tmp_path / "seg.dcm", label_names={1: "body"})
    import pydicom

    header = pydicom.dcmread(seg, stop_before_pixels=True)
    assert not client.has_instance(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
    assert client.store([seg]) == 1
    assert client.has_instance(header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
    assert len(pacs.seg_instances(str(header.StudyInstanceUID))) == 1


# ----------------------------------------------------------------- pacs run
def _dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        return []
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_pacs_run_segments_stores_and_resumes_without_duplicates(
    pacs: Orthanc, phantom_series: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    from medseg.batch.manifest import Manifest
    from medseg.io import load_volume, read_dicom_series
    from medseg.io.dicom_seg import read_dicom_seg
    from medseg.pacs.run import PacsRunOptions, pacs_run, store_results
    from medseg.pacs.state import PacsState

    profile = _profile(pacs, tmp_path)
    filters_file = tmp_path / "filters.yaml"
    filters_file.write_text(
        "PatientID: MEDSEG-run_*\n"
        "StudyDate: {from: 2025-06-01, to: 2026-12-31}\n"
        "SeriesDescription: Phantom CT*\n"
        "rules:\n"
        "  selections:\n"
        "    - name: ct-no-scout\n"
        "      conditions: {Modality: CT, SeriesDescription: {not_regex: scout}, NumberOfSlices: {min: 10}}\n"
    )
    from medseg.pacs.query import load_filters

    filters = load_filters(filters_file)
    gone_uid = _uids(phantom_series["run_gone"])[1]

    def delete_gone_series(event: str, info: dict[str, Any]) -> None:  # disappears between query and retrieve
        if event == "queried" and info["series_uid"] == gone_uid:
            pacs.http.delete(f"{pacs.base}/series/{pacs.series_id(gone_uid)}", timeout=30).raise_for_status()

    out = tmp_path / "out"
    options = PacsRunOptions(outputs=("seg", "rtstruct", "nifti"), store=True, progress=False, workers=0)
    summary = pacs_run(profile, tiny_model, filters, out, options, on_event=delete_gone_series)
    run = summary["run"]
    assert (run["queried"], run["selected"], run["retrieved"], run["gone"]) == (5, 4, 3, 1)
    assert (run["segmented"], run["segment_failed"], run["store_stored"], run["store_failed"]) == (2, 1, 4, 0)

    with PacsState(out / "manifest.sqlite") as state:
        rows = {r["description"]: r for r in state.rows()}
        assert rows["Phantom CT run_scout"]["state"] == "skipped"
        assert "at query time" in rows["Phantom CT run_scout"]["reason"]
        assert "scout" in rows["Phantom CT run_scout"]["reason"]
        assert rows["Phantom CT run_gone"]["state"] == "gone"
        assert "not on the server" in rows["Phantom CT run_gone"]["error"]
    with Manifest(out / "manifest.sqlite") as manifest:
        failed = manifest.rows("failed")
        done = {r["series_uid"]: r for r in manifest.rows("done")}
    assert len(failed) == 1 and failed[0]["description"] == "Phantom CT run_bad" and failed[0]["error"]
    assert not (out / ".pacs-tmp").exists() or not any((out / ".pacs-tmp").iterdir())
    assert not (out / "inputs" / _uids(phantom_series["run_scout"])[0]).exists()

    for case in ("run_1", "run_2"):
        study_uid, series_uid = _uids(phantom_series[case])
        (seg_id,) = pacs.seg_instances(study_uid)  # exactly one SEG, in the source's study
        seg_file = pacs.instance_file(seg_id, tmp_path / f"{case}-seg.dcm")
        assert _dciodvfy_errors(seg_file) == []
        source = read_dicom_series(out / "inputs" / study_uid / series_uid)
        decoded = read_dicom_seg(seg_file, reference=source)
        local = load_volume(out / done[series_uid]["out_dir"] / "segmentation.nii.gz", kind="label")
        assert local.geometry.allclose(source.geometry)
        np.testing.assert_array_equal(decoded.array[0], local.array[0])
        assert decoded.array.max() > 0
        (rtstruct,) = pacs.find_series(StudyInstanceUID=study_uid, Modality="RTSTRUCT")
        assert len(rtstruct["Instances"]) == 1
    assert pacs.seg_instances(_uids(phantom_series["run_bad"])[0]) == []

    # re-run: nothing retrieved, segmented or stored again
    again = pacs_run(profile, tiny_model, filters, out, options)["run"]
    assert (again["retrieved"], again["up_to_date"], again["segmented"], again["store_stored"]) == (0, 3, 0, 0)
    for case in ("run_1", "run_2"):
        assert len(pacs.seg_instances(_uids(phantom_series[case])[0])) == 1
    with PacsState(out / "manifest.sqlite") as state:
        assert len(state.events(event="stored")) == 4

    # a run killed between the upload and its record: the destination is asked first, nothing is sent twice
    with sqlite3.connect(out / "manifest.sqlite") as db:
        db.execute("DELETE FROM pacs_stored")
    assert store_results(profile, out) == {"stored": 0, "present": 4, "failed": 0, "left": 0}
    for case in ("run_1", "run_2"):
        assert len(pacs.seg_instances(_uids(phantom_series[case])[0])) == 1


def test_pacs_outage_mid_run_then_resume(
    pacs: Orthanc, phantom_series: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    from medseg.pacs.run import PacsRunOptions, pacs_run

    profile = _profile(pacs, tmp_path)
    filters = parse_filters({"PatientID": "MEDSEG-out_*"})
    stopped: list[str] = []

    def stop_after_first_retrieval(event: str, info: dict[str, Any]) -> None:
        if event == "retrieved" and not stopped:
            pacs.stop()
            stopped.append(info["series_uid"])

    out = tmp_path / "out"
    options = PacsRunOptions(outputs=("seg",), store=True, progress=False, workers=0)
    first = pacs_run(profile, tiny_model, filters, out, options, on_event=stop_after_first_retrieval)
    run = first["run"]
    assert (run["retrieved"], run["retrieve_failed"], run["segmented"]) == (1, 1, 1)
    assert run["store_stored"] == 0 and run["store_failed"] + run["store_left"] == 1
    failures = first["pacs"]["transfer_failures"] + first["pacs"]["store_failures"]
    assert all("connection refused" in f["error"] for f in failures) and len(failures) == 2

    with pytest.raises(PacsConnectionError, match=r"test-orthanc .* connection refused"):
        pacs_run(profile, tiny_model, filters, out, options)  # still down: the query fails cleanly

    pacs.start()
    second = pacs_run(profile, tiny_model, filters, out, options)["run"]
    assert (second["retrieved"], second["segmented"], second["store_stored"]) == (1, 1, 2)
    for case in ("out_1", "out_2"):
        assert len(pacs.seg_instances(_uids(phantom_series[case])[0])) == 1


@pytest.mark.slow
def test_cli_pacs_run_killed_mid_batch_resumes_without_duplicates(
    pacs: Orthanc, phantom_series: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    import sys

    profile = _profile(pacs, tmp_path)
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(json.dumps(profile.model_dump(exclude_none=True)))  # JSON is YAML
    filters = tmp_path / "filters.yaml"
    filters.write_text("PatientID: KILL-*\n")
    for case in ("kill_1", "kill_2"):  # fresh series: this test must not see other tests' SEGs
        folder = tmp_path / "series" / case
        shutil.copytree(phantom_series["run_1" if case == "kill_1" else "run_2"], folder)
        from pydicom.uid import generate_uid

        _set(folder, PatientID=f"KILL-{case}", StudyInstanceUID=generate_uid(entropy_srcs=[case, "study"]),
             SeriesInstanceUID=generate_uid(entropy_srcs=[case, "series"]))  # fmt: skip
        _renew_sop_uids(folder, case)
        pacs.upload(folder)
    command = [sys.executable, "-m", "medseg.pacs", "run", "--profile", str(profile_file), "--model",
               str(tiny_model), "--filters", str(filters), "--out", str(tmp_path / "out"), "--store", "--quiet",
               "--workers", "0"]  # fmt: skip
    env = {**os.environ, "MEDSEG_BATCH_CRASH_AT": "committed"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    env.pop("MEDSEG_BATCH_CRASH_AT")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "segmented: 1 done" in resumed.stdout and "stored: 2 new" in resumed.stdout
    for case in ("kill_1", "kill_2"):
        study_uid = _uids(tmp_path / "series" / case)[0]
        assert len(pacs.seg_instances(study_uid)) == 1


def _renew_sop_uids(folder: Path, case: str) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[case, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path)


# ----------------------------------------------------------------- listener
def _listen_in_thread(profile: PacsProfile, model: Path, out: Path, **kwargs: Any) -> tuple[threading.Thread, dict]:
    from medseg.pacs.run import PacsRunOptions, listen

    ready = threading.Event()
    result: dict[str, Any] = {}
    options = PacsRunOptions(outputs=("seg",), store=True, progress=False, workers=0, quiet_s=kwargs.pop("quiet_s"))

    def target() -> None:
        try:
            result["summary"] = listen(profile, model, out, options, on_ready=ready.set, **kwargs)
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(60), "listener did not start"
    assert "error" not in result, result.get("error")
    return thread, result


def _c_move(orthanc: Orthanc, study_uid: str, series_uid: str, destination: str) -> int:
    """Ask Orthanc (C-MOVE, raw pynetdicom) to send a series to an AE title; final status."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel  # type: ignore

    ae = AE(ae_title="MEDSEG")
    ae.add_requested_context(MoveModel)
    ae.dimse_timeout = 60
    assoc = ae.associate(LOCALHOST, orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
    status = None
    for status, _ in assoc.send_c_move(query, destination, MoveModel):
        if status and int(status.Status) != 0xFF00:
            break
    assoc.release()
    assert status is not None
    return int(status.Status)


def test_listener_push_restart_segment_store_and_no_duplicate(
    pacs: Orthanc, phantom_series: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    from medseg.batch.manifest import Manifest

    profile = _profile(pacs, tmp_path, store={"protocol": "dimse"})
    out = tmp_path / "out"
    study_uid, series_uid = _uids(phantom_series["lis_1"])

    # 1. Orthanc pushes the series (REST -> C-STORE); the listener is stopped before the quiet period ends
    stop = threading.Event()
    thread, result = _listen_in_thread(profile, tiny_model, out, quiet_s=600, stop=stop, max_runtime_s=60)
    answer = pacs.http.post(f"{pacs.base}/modalities/medseg/store", data=pacs.series_id(series_uid), timeout=60)
    answer.raise_for_status()  # synchronous: every C-STORE was answered, i.e. written and recorded
    stop.set()
    thread.join(30)
    assert not thread.is_alive() and result["summary"]["listener"]["received"] == N_SLICES
    assert len(list((out / "incoming" / series_uid).glob("*.dcm"))) == N_SLICES
    assert not (out / "inputs" / study_uid).exists()
    assert pacs.seg_instances(study_uid) == []

    # 2. restart: the received files are recovered, the series completes, is segmented and its SEG C-STOREd
    thread, result = _listen_in_thread(profile, tiny_model, out, quiet_s=0.5, max_series=1, max_runtime_s=120)
    thread.join(130)
    info = result["summary"]["listener"]
    assert info["received"] == 0 and info["completed"] == 1  # state and files survived the restart
    assert info["segmented"] == 1 and info["stored"] == 1
    assert len(pacs.seg_instances(study_uid)) == 1
    assert not list((out / "incoming").glob("*/*.dcm"))

    # 3. the PACS C-MOVEs the same series to the listener again: identical data, nothing new is stored
    events: list[str] = []
    stop = threading.Event()

    def on_event(name: str, info: dict[str, Any]) -> None:
        events.append(name)
        if name == "segmented" and "complete" in events:  # the cycle after the series completed again
            stop.set()

    thread, result = _listen_in_thread(
        profile, tiny_model, out, quiet_s=0.5, stop=stop, max_runtime_s=60, on_event=on_event
    )
    assert _c_move(pacs, study_uid, series_uid, "MEDSEG") == 0x0000
    thread.join(70)
    assert not thread.is_alive()
    info = result["summary"]["listener"]
    assert info["received"] == N_SLICES and info["completed"] == 1 and info["segmented"] == 0 and info["stored"] == 0
    assert len(pacs.seg_instances(study_uid)) == 1
    with Manifest(out / "manifest.sqlite") as manifest:
        assert list(manifest.completion_counts().values()) == [1]


def test_listen_cli_starts_and_stops(pacs: Orthanc, tiny_model: Path, tmp_path: Path, capsys: Any) -> None:
    from medseg.pacs.cli import main

    port = _free_port()
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"dimse: {{host: {LOCALHOST}, port: {pacs.dicom_port}}}\nlistener: {{quiet_s: 1}}\n")
    args = ["--profile", str(profile), "--model", str(tiny_model), "--out", str(tmp_path / "out")]
    assert main(["listen", *args, "--port", str(port), "--max-runtime", "0.5", "--no-store"]) == 0
    printed = capsys.readouterr().out
    assert f"listening as MEDSEG on 127.0.0.1:{port}" in printed and "listener stopped: 0 instance(s)" in printed
    assert (tmp_path / "out" / "listen_summary.json").is_file()


def test_pacs_run_and_listen_take_batch_inference_options_and_no_compat_check(
    pacs: Orthanc,
    phantom_series: dict[str, Path],
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """A series that does not fit the model is skipped unless --no-compat-check; inference flags reach the model."""
    import medseg.pacs.run as pacs_run_module
    from medseg.batch.manifest import Manifest
    from medseg.infer.predictor import Predictor
    from medseg.pacs.cli import main

    profile = _profile(pacs, tmp_path)
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(json.dumps(profile.model_dump(exclude_none=True)))  # JSON is YAML
    folder = tmp_path / "series" / "cmp_1"  # the CT phantom labelled MR: the CT model's compat check refuses it
    shutil.copytree(phantom_series["run_1"], folder)
    from pydicom.uid import generate_uid

    _set(folder, PatientID="CMP-cmp_1", Modality="MR", StudyInstanceUID=generate_uid(entropy_srcs=["cmp", "study"]),
         SeriesInstanceUID=generate_uid(entropy_srcs=["cmp", "series"]))  # fmt: skip
    _renew_sop_uids(folder, "cmp")
    pacs.upload(folder)

    made: list[Any] = []  # the inference settings of every predictor built
    real_init = Predictor.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self.infer)

    monkeypatch.setattr(Predictor, "__init__", spy)
    common = ["run", "--profile", str(profile_file), "--model", str(tiny_model), "--patient-id", "CMP-*",
              "--outputs", "nifti,json", "--workers", "0", "--quiet", "--json"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "checked")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run"]["segmented"] == 0 and made == []
    with Manifest(tmp_path / "checked" / "manifest.sqlite") as manifest:
        (row,) = manifest.rows("skipped")
    assert "does not fit the model" in row["reason"] and "modality MR" in row["reason"]

    options = ["--no-compat-check", "--overlap", "0.25", "--mirror-axes", "none", "--largest-component"]
    assert main([*common, "--out", str(tmp_path / "unchecked"), *options]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run"]["segmented"] == 1
    (infer,) = made
    assert (infer.overlap, tuple(infer.mirror_axes), infer.keep_largest_component) == (0.25, (), True)
    with Manifest(tmp_path / "unchecked" / "manifest.sqlite") as manifest:
        assert len(manifest.rows("done")) == 1

    # listen: the same flags, into the same options
    seen: list[Any] = []
    real_listen = pacs_run_module.listen

    def listen_spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[3])
        return real_listen(*args, **kwargs)

    monkeypatch.setattr(pacs_run_module, "listen", listen_spy)
    argv = ["listen", "--profile", str(profile_file), "--model", str(tiny_model), "--out", str(tmp_path / "lis"),
            "--port", str(_free_port()), "--max-runtime", "0.2", "--no-store", "--quiet", *options,
            "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    (listen_options,) = seen
    assert listen_options.compat_check is False and listen_options.device == "cpu"
    assert dict(listen_options.infer) == {
        "overlap": 0.25,
        "mirror_axes": (),
        "keep_largest_component": True,
        "precision": "fp32",
    }


# ----------------------------------------------------------------- real data
def test_real_series_stow_qido_wado_roundtrip(pacs: Orthanc, shared_data: Path, tmp_path: Path) -> None:
    from medseg.io import read_dicom_series
    from medseg.pacs.dicomweb import DicomWebClient
    from medseg.pacs.run import retrieve_into

    folders = [
        shared_data / "dcmqi-data" / "segmentations" / "ct-3slice",
        next((shared_data / "pgbm-brain-tumor-progression" / "PGBM-001").glob("*/11-T1post-*")),
    ]
    profile = _profile(pacs, tmp_path)
    with DicomWebClient(profile) as client:
        for folder in folders:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            assert client.store(files) == len(files)  # STOW-RS
            study_uid, series_uid = _uids(folder)
            (series,) = client.query(parse_filters({"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}))
            assert series.num_instances == len(files)
            target, count = retrieve_into(client, series, tmp_path / "out")
            assert count == len(files)
            _same_volume(read_dicom_series(target), read_dicom_series(folder))
