from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medseg.batch.manifest import Manifest, Owner, SeriesRecord, fingerprint_files, key_hash


def _record(key: str, *, fingerprint: str = "f1", selected: bool = True) -> SeriesRecord:
    return SeriesRecord(
        key=key,
        files=[f"{key}/a.dcm"],
        fingerprint=fingerprint,
        decision=selected,
        reason="selected by rule 'x'" if selected else "no rule matched: 'x': Modality 'MR' does not match 'CT'",
        selection="x" if selected else None,
        series_uid=key,
    )


def _states(manifest: Manifest) -> dict[str, str]:
    return {row["key"]: row["state"] for row in manifest.rows()}


def test_sync_resume_rules(tmp_path: Path) -> None:
    with Manifest(tmp_path / "m.sqlite") as m:
        assert m.journal_mode == "WAL"
        stats = m.sync([_record("a"), _record("b"), _record("c", selected=False)], model_id="m1", outputs=["nifti"])
        assert stats.new == 3
        assert _states(m) == {"a": "pending", "b": "pending", "c": "skipped"}
        for _ in range(2):
            claim = m.claim()
            assert claim is not None
            if claim.key == "a":
                assert m.complete(claim, out_dir="x/a", outputs=["nifti", "json"], model_id="m1")
            else:
                assert m.fail(claim, "InputError: broken")
        assert m.claim() is None
        assert _states(m) == {"a": "done", "b": "failed", "c": "skipped"}

        # Same inputs, same model, subset of outputs: nothing to do; failed stays failed.
        m.sync([_record("a"), _record("b"), _record("c", selected=False)], model_id="m1", outputs=["nifti"])
        assert _states(m) == {"a": "done", "b": "failed", "c": "skipped"}
        # --retry-failed.
        m.sync([_record("b")], model_id="m1", outputs=["nifti"], retry_failed=True)
        assert _states(m)["b"] == "pending"
        # Changed inputs send a done series back; so do a new model and a new output type.
        m.sync([_record("a", fingerprint="f2")], model_id="m1", outputs=["nifti"])
        assert _states(m)["a"] == "pending"
        claim = m.claim()
        assert claim is not None and claim.key == "a"
        assert m.complete(claim, out_dir="x/a", outputs=["nifti"], model_id="m1")
        m.sync([_record("a", fingerprint="f2")], model_id="m2", outputs=["nifti"])
        assert _states(m)["a"] == "pending"
        reasons = [e["detail"] for e in m.events("a", "reset")]
        assert reasons == ["inputs changed since it was done", "another model than the one that produced the outputs"]
        # Rules that now skip a pending series; rules that now select a skipped one.
        m.sync([_record("b", selected=False), _record("c")], model_id="m1", outputs=["nifti"])
        assert _states(m)["b"] == "skipped" and _states(m)["c"] == "pending"
        assert sum(m.completion_counts().values()) == 2
        summary = m.summary()
        assert summary["counts"]["pending"] == 2 and summary["series"] == 3 and not summary["complete"]


def test_lost_claim_cannot_complete_or_fail(tmp_path: Path) -> None:
    with Manifest(tmp_path / "m.sqlite") as m:
        m.sync([_record("a")], model_id="m", outputs=["nifti"])
        claim = m.claim()
        assert claim is not None
        # Another process takes it over after the lease expired.
        with sqlite3.connect(tmp_path / "m.sqlite") as db:
            db.execute("UPDATE series SET owner = 'elsewhere|1:1', lease_until = 0")
        assert m.reclaim() == ["a"]
        called = []
        assert not m.complete(claim, out_dir="x", outputs=["nifti"], model_id="m", commit=lambda: called.append(1))
        assert called == []  # the output rename never happens for a lost claim
        assert not m.fail(claim, "late")
        assert _states(m) == {"a": "pending"}


def test_reclaim_dead_owner_counts_crashes(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = Owner(Owner.current().host, dead.pid, "1")  # exited process (start time cannot match)
    with Manifest(tmp_path / "m.sqlite", owner=ghost) as m:
        m.sync([_record("a"), _record("b")], model_id="m", outputs=["nifti"])
        for _ in range(2):
            claim = m.claim(lease_s=3600)
            assert claim is not None
            m.set_stage(claim, "infer" if claim.key == "a" else "queued")
    with Manifest(tmp_path / "m.sqlite") as m:
        assert sorted(m.reclaim(max_attempts=2)) == ["a", "b"]
        rows = {r["key"]: r for r in m.rows()}
        assert rows["a"]["crashes"] == 1 and rows["b"]["crashes"] == 0  # dying while queued is not the series' fault
        claim = m.claim()
        assert claim is not None and claim.key == "a"
        assert m.reclaim() == []  # our own live claim is left alone
    # Second death during inference: "a" is now failed with a clear reason.
    with sqlite3.connect(tmp_path / "m.sqlite") as db:
        db.execute("UPDATE series SET owner = ?, stage = 'infer' WHERE key = 'a'", (str(ghost),))
    with Manifest(tmp_path / "m.sqlite") as m:
        assert m.reclaim(max_attempts=2) == ["a"]
        row = next(r for r in m.rows() if r["key"] == "a")
        assert row["state"] == "failed" and "died 2 time(s)" in row["error"] and "infer" in row["error"]


def _claimer(path: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    with Manifest(path) as m:
        keys = []
        while (claim := m.claim()) is not None:
            keys.append(claim.key)
            m.complete(claim, out_dir="x", outputs=["nifti"], model_id="m")
        out.put(keys)


def test_concurrent_processes_claim_each_series_once(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    with Manifest(path) as m:
        m.sync([_record(f"s{i:03d}") for i in range(60)], model_id="m", outputs=["nifti"])
    ctx = mp.get_context("fork")  # real processes, without re-importing torch in each
    results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_claimer, args=(str(path), results)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    flat = [k for keys in claimed for k in keys]
    assert sorted(flat) == [f"s{i:03d}" for i in range(60)]
    with Manifest(path) as m:
        assert set(m.completion_counts().values()) == {1}
        assert m.summary()["counts"]["done"] == 60


def test_key_hash_is_stable(tmp_path: Path) -> None:
    keys = [f"1.2.826.0.1.{i}" for i in range(200)]
    assert [key_hash(k) for k in keys] == [key_hash(k) for k in keys]
    assert all(0 <= key_hash(k) < 2**31 for k in keys) and len({key_hash(k) for k in keys}) == len(keys)
    with Manifest(tmp_path / "m.sqlite") as m:
        m.sync([_record(k) for k in keys], model_id="m", outputs=["nifti"])
        assert {row["key_hash"] for row in m.rows()} == {key_hash(k) for k in keys}


def test_fingerprint_changes_with_size_or_mtime(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    a, b = tmp_path / "s" / "a", tmp_path / "s" / "b"
    a.write_bytes(b"1234")
    b.write_bytes(b"x")
    files, fp = fingerprint_files(tmp_path, [b, a])
    assert files == ["s/a", "s/b"]
    assert fingerprint_files(tmp_path, [a, b])[1] == fp
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fingerprint_files(tmp_path, [a, b])[1] != fp


def test_owner_liveness() -> None:
    me = Owner.current()
    assert Owner.parse(str(me)) == me
    assert me.alive() is True
    assert Owner("some-other-host", 1, "5").alive() is None
    assert Owner(me.host, me.pid, "not-my-start-time").alive() is False


def test_unreadable_manifest_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(Exception) as info:
        Manifest(path)
    assert str(path) in str(info.value) and "manifest" in str(info.value)
