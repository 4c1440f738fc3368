"""Batch: per-output isolation and --retry-failed of the missing outputs only, the model compatibility
check, the v1 -> v2 manifest migration, Ctrl-C, plain progress lines in logs, and a mixed real archive."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_batch import REPO, RULES, _done_events, dciodvfy_errors, good_archive

from medseg.batch.cli import main as batch_main
from medseg.batch.manifest import Claim, Manifest
from medseg.batch.runner import BatchOptions, run_batch
from medseg.errors import MedsegError
from medseg.infer.compat import ChannelSpec, channel_specs, check_header, check_intensities, expected_modality
from medseg.io import load_volume, read_dicom_series
from medseg.io.dicom_seg import read_dicom_seg
from medseg.io.volume import Volume


def _mixed_archive_module():
    spec = importlib.util.spec_from_file_location("batch_mixed_archive", REPO / "benchmarks" / "batch_mixed_archive.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ compatibility check
def test_channel_specs_and_header_check(tiny_model: Path) -> None:
    from medseg.data.plan import load_plan

    specs = channel_specs(load_plan(tiny_model / "plan.yaml"))
    assert specs == [ChannelSpec("CT", "CT", "ct")]
    assert check_header(specs, modality="CT") is None
    assert check_header(specs, modality="MR") == "modality MR does not fit the model's channel 'CT' (CT)"
    two = [ChannelSpec("T1", "MR", "zscore"), ChannelSpec("T2", "MR", "zscore")]
    assert "needs 2 input channel(s) (T1, T2); a series provides 1" in str(check_header(two, modality="MR"))
    assert [expected_modality(n) for n in ("T1c", "FLAIR", "adc", "PET", "image", "channel0")] == [
        "MR",
        "MR",
        "MR",
        "PT",
        None,
        None,
    ]
    assert check_header([ChannelSpec("image")], modality="US") is None  # unknown channel: any modality


def test_intensity_check_on_real_ct_and_mr(shared_data: Path) -> None:
    ct = read_dicom_series(shared_data / "totalseg-tests" / "example_ct_dicom")
    spec = [ChannelSpec("CT", "CT", "ct")]
    assert check_intensities(spec, ct) is None
    raw = Volume(ct.array + 1024.0, ct.geometry)  # as if the rescale intercept had been lost
    assert check_intensities(spec, raw) is None  # still "mostly" in range: plausible values
    scaled = Volume(ct.array * 20.0, ct.geometry)  # raw detector-like values
    assert "not rescaled CT values" in str(check_intensities(spec, scaled))
    mask_dir = next((shared_data / "pgbm-brain-tumor-progression").glob("PGBM-001/*/*MaskTumor*"))
    mask = read_dicom_series(mask_dir)
    reason = check_intensities([ChannelSpec("T1", "MR", "zscore")], mask)
    assert reason is not None and "a mask or a blank image" in reason
    t1 = read_dicom_series(next((shared_data / "pgbm-brain-tumor-progression").glob("PGBM-001/*/*T1post*")))
    assert check_intensities([ChannelSpec("T1", "MR", "zscore")], t1) is None


# ------------------------------------------------------------------ per-output isolation
def test_failed_output_keeps_the_others_and_retry_writes_only_it(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.infer.predictor as predictor_module
    import medseg.io.dicom_seg as dicom_seg

    archive = good_archive(tmp_path / "archive", range(2))
    out = tmp_path / "out"
    real_writer = dicom_seg.write_dicom_seg

    def refuse(*args: object, **kwargs: object) -> None:
        raise MedsegError(f"{kwargs.get('series_description')}: injected refusal (Source images must have ...)")

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", refuse)
    options = BatchOptions(outputs=("nifti", "seg", "json"), progress=False)
    summary = run_batch(archive, tiny_model, out, options)
    assert summary["counts"]["partial"] == 2 and summary["run"]["partial"] == 2
    assert {p["series"].split(", series")[0][:9] for p in summary["partial"]} == {"patient P"}
    for item in summary["partial"]:
        assert set(item["failed_outputs"]) == {"seg"} and "injected refusal" in item["failed_outputs"]["seg"]
        assert ".tmp" not in json.dumps(item)
        assert set(item["files"]) == {"nifti", "json"}
        for paths in item["files"].values():
            assert all((out / p).is_file() for p in paths)
    written = json.loads((out / "summary.json").read_text())
    assert {o["key"] for o in written["outputs"]} == {p["key"] for p in summary["partial"]}
    nifti = {o["key"]: out / o["files"]["nifti"][0] for o in written["outputs"]}
    stats = {key: path.stat() for key, path in nifti.items()}

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", real_writer)
    calls: list[int] = []
    real_predict = predictor_module.Predictor.predict
    monkeypatch.setattr(predictor_module.Predictor, "predict", lambda self, c: calls.append(1) or real_predict(self, c))
    again = run_batch(archive, tiny_model, out, options)  # without --retry-failed: partial stays partial
    assert again["run"]["processed"] == 0 and again["counts"]["partial"] == 2
    retried = run_batch(
        archive, tiny_model, out, BatchOptions(outputs=("nifti", "seg", "json"), progress=False, retry_failed=True)
    )
    assert retried["run"]["processed"] == 2 and retried["counts"]["done"] == 2
    assert retried["run"]["reused_labels"] == 2 and calls == []  # the labels came from the NIfTI: no prediction
    with Manifest(out / "manifest.sqlite") as m:
        for row in m.rows():
            status = json.loads(row["output_status"])
            assert set(status) == {"nifti", "seg", "json"} and all("files" in e for e in status.values())
            folder = out / row["out_dir"]
            path = nifti[row["key"]]
            assert path.stat().st_ino == stats[row["key"]].st_ino  # kept (hard link), not rewritten
            assert path.stat().st_mtime_ns == stats[row["key"]].st_mtime_ns
            labels = np.asarray(load_volume(path, kind="label").array[0])
            source = archive / f"p{int(row['description'][-3:]) % 2}" / row["description"][-4:]
            image = read_dicom_series(source)
            assert np.array_equal(read_dicom_seg(folder / "seg.dcm", reference=image).array[0], labels)
            assert dciodvfy_errors(folder / "seg.dcm") == []
            assert json.loads((folder / ".medseg-series.json").read_text())["output_status"] == status
    final = json.loads((out / "summary.json").read_text())
    assert all(set(o["files"]) == {"nifti", "seg", "json"} for o in final["outputs"])


# ------------------------------------------------------------------ manifest migration
V1_SERIES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE series (
    key TEXT PRIMARY KEY, key_hash INTEGER NOT NULL, series_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '', modality TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '',
    series_number INTEGER, num_files INTEGER NOT NULL DEFAULT 0, files TEXT NOT NULL DEFAULT '[]',
    fingerprint TEXT NOT NULL DEFAULT '', decision TEXT NOT NULL CHECK (decision IN ('selected', 'skipped')),
    selection TEXT, reason TEXT NOT NULL DEFAULT '', notes TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed', 'skipped')),
    stage TEXT, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0, owner TEXT, claim_id TEXT,
    lease_until REAL, out_dir TEXT, outputs TEXT, model_id TEXT, done_fingerprint TEXT, error TEXT, timings TEXT,
    discovered_at REAL, last_seen REAL, started_at REAL, finished_at REAL, updated_at REAL
);
CREATE INDEX series_state ON series (state, key_hash);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, event TEXT NOT NULL, at REAL NOT NULL,
    owner TEXT, detail TEXT);
CREATE INDEX events_key ON events (key, event);
CREATE TABLE ignored (path TEXT PRIMARY KEY, reason TEXT NOT NULL, seen_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO series (key, key_hash, description, series_number, files, fingerprint, decision, state, out_dir, outputs,
    model_id, done_fingerprint) VALUES ('1.2.3', 5, 'done one', 3, '["a/1.dcm"]', 'f1', 'selected', 'done',
    'study/0003-done_one-x', '["json", "nifti"]', 'm1', 'f1');
INSERT INTO series (key, key_hash, description, files, fingerprint, decision, state, error)
    VALUES ('1.2.4', 6, 'failed one', '["b/1.dcm"]', 'f2', 'selected', 'failed', 'b/1.dcm: broken');
INSERT INTO events (key, event, at) VALUES ('1.2.3', 'done', 1.0);
"""


def test_v1_manifest_is_migrated_and_newer_ones_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SERIES)
    with Manifest(path) as m:
        assert m.get_meta("schema") == "2"
        rows = {r["key"]: r for r in m.rows()}
        assert rows["1.2.3"]["state"] == "done" and rows["1.2.4"]["error"] == "b/1.dcm: broken"
        assert json.loads(rows["1.2.3"]["output_status"]) == {
            "json": {"files": ["volumes.json"]},
            "nifti": {"files": ["segmentation.nii.gz", "segmentation.json"]},
        }
        assert m.completion_counts() == {"1.2.3": 1} and [e["detail"] for e in m.events(event="migrated")] == [
            "schema 1 -> 2"
        ]
        # the new state is accepted: a claimed series with a failed output becomes partial
        m.reset("1.2.4", "test")
        claim = m.claim()
        assert isinstance(claim, Claim) and claim.key == "1.2.4"
        assert m.complete(
            claim,
            out_dir="x",
            outputs=["nifti"],
            model_id="m1",
            output_status={"nifti": {"files": ["segmentation.nii.gz"]}, "seg": {"error": "refused"}},
        )
        assert m.row("1.2.4")["state"] == "partial" and m.row("1.2.4")["error"] == "seg failed: refused"
        assert m.summary()["partial"][0]["failed_outputs"] == {"seg": "refused"}
    with Manifest(path) as m:  # reopening a migrated manifest changes nothing
        assert m.count() == 2 and m.get_meta("schema") == "2"
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '7' WHERE key = 'schema'")
    with pytest.raises(MedsegError, match=r"schema 7 is not supported by this medseg \(it reads 2 and migrates 1\)"):
        Manifest(path)


# ------------------------------------------------------------------ Ctrl-C and logs
def test_sigint_finishes_a_series_being_written_and_releases_one_being_predicted() -> None:
    from medseg.batch.runner import _Runner

    runner = _Runner.__new__(_Runner)
    import threading

    runner._stop, runner.interrupted = threading.Event(), False
    runner.stage = "writing"
    runner._on_sigint(signal.SIGINT, None)  # first Ctrl-C while writing: no exception, stop claiming
    assert runner._stop.is_set() and runner.interrupted
    with pytest.raises(KeyboardInterrupt):  # a second one aborts
        runner._on_sigint(signal.SIGINT, None)
    runner._stop, runner.interrupted, runner.stage = threading.Event(), False, "infer"
    with pytest.raises(KeyboardInterrupt):  # while predicting: released at once
        runner._on_sigint(signal.SIGINT, None)
    assert runner._stop.is_set()


def test_ctrl_c_then_resume_with_plain_log_lines(tmp_path: Path, tiny_model: Path) -> None:
    # 8 small series: a quiet machine finishes one in a fraction of a second, so the Ctrl-C must come
    # while several are left (3 were once all done before the test saw the first one).
    count = 8
    archive = good_archive(tmp_path / "archive", range(count))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medseg.batch", str(archive), "--model", str(tiny_model), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and _done_events(out / "manifest.sqlite") < 1:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "resume with the same command" in stderr and f"--out {out}" in stderr
    # stderr is not a terminal: one plain line per series, no bar, no escape codes
    assert "\x1b[" not in stderr and "\r" not in stderr
    assert f"medseg batch [1/{count}] done: patient P" in stderr
    with Manifest(out / "manifest.sqlite") as m:
        counts = m.summary()["counts"]
        assert counts["running"] == 0 and 1 <= counts["done"] < count and counts["pending"] == count - counts["done"]
        released = m.events(event="released")
        assert all(e["detail"] == "interrupted (Ctrl-C)" for e in released)
    resumed = run_batch(archive, tiny_model, out, BatchOptions(progress=False))  # resume: the rest, once each
    assert resumed["counts"]["done"] == count and resumed["complete"]
    with Manifest(out / "manifest.sqlite") as m:
        assert m.completion_counts() == {row["key"]: 1 for row in m.rows()}  # nothing done twice


# ------------------------------------------------------------------ real archive
def test_mixed_real_archive(tmp_path: Path, tiny_model: Path, shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    mixed = _mixed_archive_module()
    archive = mixed.build_mixed_archive(tmp_path / "archive", shared_data, small=True)
    mr_model = mixed.mr_variant(tiny_model, tmp_path / "model-mr")
    out = tmp_path / "out"

    # 1. What a CT model would run on: --discover-only --json, pseudonyms only.
    code = batch_main(
        [str(archive), "--model", str(tiny_model), "--out", str(tmp_path / "d"), "--discover-only", "--json"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    listing = {(r["description"], r["modality"]): r for r in json.loads(printed)["series"]}
    assert "PGBM-001" not in printed  # the PatientID is never printed unless asked for
    t1 = listing[("T1post", "MR")]
    assert not t1["selected"] and "modality MR does not fit the model's channel 'CT'" in t1["reason"]
    assert t1["study_date"] == "1992-04-02" and t1["series_number"] == 11 and t1["patient"].startswith("P")
    assert listing[("CT Body 3.0", "CT")]["selected"] and listing[("Phantom CT mx000", "CT")]["selected"]
    assert "not an image series: segmentation" in listing[("Liver Segmentation", "SEG")]["reason"]
    code = batch_main(
        [
            str(archive),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "d"),
            "--discover-only",
            "--show-patient-ids",
        ]
    )
    table = capsys.readouterr().out
    assert "PGBM-001" in table and "selected (" in table and "skipped (" in table and "1992-04-02" in table
    # The example rules select abdominal series only: no brain MR, whatever the model.
    run_batch(archive, mr_model, tmp_path / "r", BatchOptions(rules=RULES, process=False, progress=False))
    with Manifest(tmp_path / "r" / "manifest.sqlite") as m:
        assert not [r for r in m.rows() if r["modality"] == "MR" and r["state"] != "skipped"]

    # 2. An MR model on the archive: brain series segmented, the mask and the CTs skipped with reasons.
    summary = run_batch(archive, mr_model, out, BatchOptions(outputs=("nifti", "seg", "json"), progress=False))
    with Manifest(out / "manifest.sqlite") as m:
        rows = {(r["description"], r["modality"]): r for r in m.rows()}
    assert rows[("FLAIR_reg", "MR")]["state"] == "done"
    assert rows[("Mask_Tumor", "MR")]["state"] == "skipped" and "a mask" in rows[("Mask_Tumor", "MR")]["reason"]
    assert rows[("CT Body 3.0", "CT")]["state"] == "skipped" and "modality CT" in rows[("CT Body 3.0", "CT")]["reason"]
    perturbed = rows[("T1post", "MR")]  # ImageOrientationPatient jitter of 1e-7 on every other slice
    status = json.loads(perturbed["output_status"])
    assert perturbed["state"] in ("done", "partial") and "files" in status["nifti"] and "files" in status["json"]
    if perturbed["state"] == "partial":  # until the SEG writer normalises the jitter: only the SEG is lost
        assert set(k for k, v in status.items() if "error" in v) == {"seg"}
        assert ".tmp" not in perturbed["error"] and "PGBM-001" not in perturbed["error"]
    source = read_dicom_series(next(archive.glob("mr/*/*/*T1post*")))
    nifti = load_volume(out / perturbed["out_dir"] / "segmentation.nii.gz", kind="label")
    assert nifti.geometry.allclose(source.geometry, atol=1e-4)
    assert summary["counts"]["failed"] == 0 and "PGBM-001" not in json.dumps(summary)
    listed = {o["key"]: o for o in json.loads((out / "summary.json").read_text())["outputs"]}
    assert listed[perturbed["key"]]["files"]["nifti"] == [f"{perturbed['out_dir']}/segmentation.nii.gz",
                                                        f"{perturbed['out_dir']}/segmentation.json"]  # fmt: skip

    # 3. The CT model on the anonymised real CT (UIDs blanked): NIfTI + volumes, SEG refused with the reason.
    ct = run_batch(
        archive / "ct" / "anonymised-ct",
        tiny_model,
        tmp_path / "ct",
        BatchOptions(outputs=("nifti", "seg", "json"), progress=False),
    )
    assert ct["counts"]["partial"] == 1
    item = ct["partial"][0]
    assert set(item["files"]) == {"nifti", "json"} and "empty SeriesInstanceUID" in item["failed_outputs"]["seg"]
    assert (
        item["series"].startswith("patient ")
        and "study 2022-12-08" in item["series"]
        and "'CT Body 3.0'" in item["series"]
    )


def test_progress_bar_names_the_series_on_a_terminal(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    archive = good_archive(tmp_path / "archive", range(1))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_batch(archive, tiny_model, tmp_path / "out", BatchOptions(progress=True))
    text = terminal.getvalue()
    assert " 2026-01-01 #1 Phantom CT c000: 100%" in text and "\r" in text  # a live bar naming the series
    assert "MEDSEG-c000" not in text  # the PatientID never
