"""``medseg batch --engine ray`` on a real two-node Ray cluster (private network namespace, loopback only).

The archive: 20 image series - real DICOM series from ../shared/data (a 512x512 CT with blanked UIDs, a
3-slice GE CT, a tilted MR) and generated phantom CT series written as DICOM - plus a structured report
(a skipped non-image series) and junk files.
Every Ray run is compared with a single-process ``medseg batch`` of the same archive: same states,
same reasons, label volumes bit-equal.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import BasicTextSRStorage
from ray_support import require_ray_cluster, run_cluster
from test_batch import _non_image, assert_exactly_once, assert_no_leftovers, write_series

from medseg.batch.manifest import Manifest
from medseg.batch.runner import BatchOptions, run_batch
from medseg.errors import ConfigError

SERIES = 20  # image series in the archive: phantoms plus the real series found in ../shared/data
OUTPUTS = "nifti,json"


def _archive(root: Path, shared: Path | None) -> Path:
    if shared is not None:
        for name, source in {
            "real/ct-blank-uids": shared / "totalseg-tests" / "example_ct_dicom",
            "real/ct-3slice": shared / "dcmqi-data" / "segmentations" / "ct-3slice",
        }.items():
            if source.is_dir():
                shutil.copytree(source, root / name)
        mr = sorted((shared / "pgbm-brain-tumor-progression" / "PGBM-001").glob("*/11-T1post-*"))
        if mr:
            shutil.copytree(mr[0], root / "real" / "mr-t1post")
    real = len(list((root / "real").iterdir())) if (root / "real").is_dir() else 0
    for case in range(SERIES - real):
        write_series(case, root / f"site{case % 3}" / f"c{case:03d}", slices=12 + case % 5)
    _non_image(root / "objects" / "SR.dcm", BasicTextSRStorage, "SR", "1.2.826.0.1.3680043.8.498.1")
    (root / "notes.txt").write_text("exported by PACS\n")
    (root / "junk").mkdir()
    first = next((root / "site0" / "c000").iterdir())
    (root / "junk" / "truncated.dcm").write_bytes(first.read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import SHARED_DATA

    return _archive(tmp_path_factory.mktemp("ray-archive") / "archive", SHARED_DATA if SHARED_DATA.is_dir() else None)


@pytest.fixture(scope="module")
def baseline(archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-process ``medseg batch`` of the archive."""
    out = tmp_path_factory.mktemp("ray-baseline") / "out"
    run_batch(archive, tiny_model, out, BatchOptions(outputs=tuple(OUTPUTS.split(",")), progress=False))
    return out


def _states(out: Path) -> dict[str, tuple[str, str | None, str | None]]:
    with Manifest(out / "manifest.sqlite") as m:
        return {row["key"]: (row["state"], row["out_dir"], row["error"]) for row in m.rows()}


def _batch_argv(archive: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medseg.batch", str(archive), "--model", str(model), "--out", str(out),
            "--outputs", OUTPUTS, "--engine", "ray", "--quiet", "--json", *extra]  # fmt: skip


def assert_same_outputs(ray_out: Path, local_out: Path, *, except_keys: set[str] = frozenset()) -> int:
    """Same states and reasons as the single-process run; labels and volume reports bit-equal."""
    ray_rows, local_rows = _states(ray_out), _states(local_out)
    assert ray_rows.keys() == local_rows.keys()
    compared = 0
    for key, (state, out_dir, error) in local_rows.items():
        if key in except_keys:
            continue
        assert ray_rows[key][0] == state, (key, ray_rows[key], state, error)
        assert ray_rows[key][2] == error
        if state != "done":
            continue
        assert ray_rows[key][1] == out_dir
        a, b = (
            nib.load(str(ray_out / out_dir / "segmentation.nii.gz")),
            nib.load(str(local_out / out_dir / "segmentation.nii.gz")),
        )
        assert a.get_data_dtype() == b.get_data_dtype() and np.array_equal(a.affine, b.affine)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), key
        report_a = json.loads((ray_out / out_dir / "volumes.json").read_text())
        report_b = json.loads((local_out / out_dir / "volumes.json").read_text())
        assert report_a == report_b
        compared += 1
    return compared


def _summary(stdout: str) -> dict[str, Any]:
    """The ``--json`` summary (failure lines may be printed before it)."""
    return dict(json.loads(stdout[stdout.index("\n{") + 1 :] if not stdout.startswith("{") else stdout))


def _done(out: Path) -> int:
    return sum(state == "done" for state, _, _ in _states(out).values())


def _max_in_flight(out: Path) -> int:
    """Most series claimed and not yet finished at any one time (from the manifest's event log)."""
    with Manifest(out / "manifest.sqlite") as m:
        events = m.events()
    now = peak = 0
    for event in events:
        now += {"claimed": 1, "done": -1, "failed": -1, "skipped": -1, "released": -1}.get(event["event"], 0)
        peak = max(peak, now)
    return peak


def _key_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


# ----------------------------------------------------------------------------- without a cluster
def test_engine_ray_without_ray_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    (tmp_path / "archive").mkdir()
    with pytest.raises(ConfigError, match=r"pip install 'medseg\[ray\]'"):
        run_batch(tmp_path / "archive", tmp_path / "model", tmp_path / "out", BatchOptions(engine="ray"))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="need --engine ray"):
        run_batch(tmp_path / "archive", tmp_path / "model", tmp_path / "out", BatchOptions(address="127.0.0.1:6379"))


def test_write_attempts_are_isolated_and_checked(tmp_path: Path, tiny_model: Path) -> None:
    """Each write-task execution has its own folder; the driver commits the one its result names, nothing else."""
    from medseg.batch.ray_engine import SeriesWork, read_stage, write_stage
    from medseg.batch.runner import _Runner
    from medseg.io.volume import Volume

    archive = tmp_path / "archive"
    write_series(3, archive / "c003", slices=12)
    out = tmp_path / "out"
    run_batch(archive, tiny_model, out, BatchOptions(process=False, progress=False))
    with Manifest(out / "manifest.sqlite") as m:
        claim = m.claim()
        assert claim is not None
        runner = _Runner(archive.resolve(), out.resolve(), tiny_model, BatchOptions(progress=False), m)
        work = SeriesWork(runner.root, runner.model_dir, runner.model_id, tuple(runner.specs), True,
                          dict(runner.label_names), "binary", {})  # fmt: skip

        def write(claim: Any) -> tuple[dict[str, Any], Path, np.ndarray]:
            task = runner.task(claim)
            volume, loaded = read_stage(work, task)
            labels = np.zeros(volume.geometry.shape, dtype=np.uint8)
            labels[5:9, 5:9, 2:4] = 1
            predicted = {"label": Volume(labels, volume.geometry, kind="label"), "timings": {}}
            temp = runner.temp_dir(claim)
            outcome = write_stage(work, task, volume, loaded, predicted, temp, runner.report_fields(claim))
            return outcome, temp, labels

        stale, temp, _ = write(claim)  # the driver made no temp folder for the claim: nothing may be written
        assert "error" in stale and not temp.exists()
        temp.mkdir(parents=True)
        (first, _, _), (second, _, labels) = write(claim), write(claim)
        assert first["attempt"] != second["attempt"]
        (temp / first["attempt"] / "volumes.json").unlink()
        runner.finish(runner.prepare(claim), loaded=second["loaded"], result=second["result"],
                      folder=temp / second["attempt"], seconds=0.1)  # fmt: skip
        row = m.rows()[0]
        assert row["state"] == "done" and m.completion_counts() == {claim.key: 1}
        assert np.array_equal(np.asarray(nib.load(str(out / row["out_dir"] / "segmentation.nii.gz")).dataobj), labels)
        assert (out / row["out_dir"] / "volumes.json").is_file()
        assert_no_leftovers(out)
        # A finished folder missing a file is never committed.
        shutil.rmtree(out / row["out_dir"])  # (else the new claim adopts or keeps the complete folder)
        assert m.reset(claim.key, "again")
        claim = m.claim()
        assert claim is not None
        runner.temp_dir(claim).mkdir(parents=True)
        broken, temp, _ = write(claim)
        (temp / broken["attempt"] / "segmentation.nii.gz").unlink()
        runner.finish(runner.prepare(claim), loaded=broken["loaded"], result=broken["result"],
                      folder=temp / broken["attempt"], seconds=0.1)  # fmt: skip
        row = m.rows()[0]
        assert row["state"] == "failed" and "missing from the finished folder" in row["error"]
        assert_no_leftovers(out)


# ----------------------------------------------------------------------------- on the cluster
def test_ray_equals_single_process_and_a_raising_worker_fails_one_series(
    archive: Path, baseline: Path, tiny_model: Path, tmp_path: Path
) -> None:
    require_ray_cluster()
    out = tmp_path / "ray"
    poisoned = _key_of(archive / "site1" / "c004")
    env = {"MEDSEG_BATCH_RAISE_AT": f"predicted:{poisoned}"}
    (step,) = run_cluster([{"argv": _batch_argv(archive, tiny_model, out), "env": env, "timeout": 600}], tmp_path)
    assert step["returncode"] == 1, step["stderr"]  # exit 1: a series failed
    summary = _summary(step["stdout"])
    run = summary["run"]
    assert run["engine"] == "ray" and run["ray_nodes"] == 2 and run["ray_workers"] == 2
    assert len({where.split(":")[0] for where in run["ray_predictors"]}) == 2  # one predictor per node
    rows = _states(out)
    assert rows[poisoned][0] == "failed"
    assert "injected fault at predicted (MEDSEG_BATCH_RAISE_AT)" in rows[poisoned][2]
    assert 0 < _max_in_flight(out) <= run["ray_in_flight"] == 2 * (2 + 1)  # backpressure: workers x (prefetch + 1)
    compared = assert_same_outputs(out, baseline, except_keys={poisoned})
    assert compared == _done(baseline) - 1 >= SERIES - 4
    local = _states(baseline)
    assert_exactly_once(out / "manifest.sqlite", sum(s == "done" for s, _, _ in local.values()) - 1)
    assert_no_leftovers(out)


@pytest.mark.slow
def test_ray_node_killed_mid_run_loses_nothing(archive: Path, baseline: Path, tiny_model: Path, tmp_path: Path) -> None:
    require_ray_cluster()
    out = tmp_path / "ray"
    kill = {"target": "node2", "manifest": str(out / "manifest.sqlite"), "after_done": 4, "delay": 0.5}
    (step,) = run_cluster([{"argv": _batch_argv(archive, tiny_model, out), "kill": kill, "timeout": 600}], tmp_path)
    assert step["killed"], "the second node's raylet was not killed mid-run"
    assert step["returncode"] in (0, 1), step["stderr"]
    assert assert_same_outputs(out, baseline) == _done(baseline) >= SERIES - 3
    local = _states(baseline)
    assert_exactly_once(out / "manifest.sqlite", sum(s == "done" for s, _, _ in local.values()))
    assert_no_leftovers(out)


@pytest.mark.slow
def test_ray_driver_killed_then_rerun_resumes(archive: Path, baseline: Path, tiny_model: Path, tmp_path: Path) -> None:
    require_ray_cluster()
    out = tmp_path / "ray"
    argv = _batch_argv(archive, tiny_model, out)
    kill = {"target": "driver", "manifest": str(out / "manifest.sqlite"), "after_done": 6, "delay": 0.3}
    first, second = run_cluster(
        [{"argv": argv, "kill": kill, "timeout": 600}, {"argv": argv, "timeout": 600}], tmp_path
    )
    assert first["killed"] and first["returncode"] < 0
    assert second["returncode"] in (0, 1), second["stderr"]
    resumed = _summary(second["stdout"])["run"]
    assert resumed["reclaimed"] >= 1 and resumed["processed"] < len(_states(baseline))
    assert assert_same_outputs(out, baseline) == _done(baseline) >= SERIES - 3
    local = _states(baseline)
    assert_exactly_once(out / "manifest.sqlite", sum(s == "done" for s, _, _ in local.values()))
    assert_no_leftovers(out)


def test_pacs_run_takes_the_engine_options() -> None:
    import argparse

    from medseg.pacs.cli import _run_options, add_pacs_parser
    from medseg.pacs.run import _batch_options

    parser = argparse.ArgumentParser(prog="medseg")
    add_pacs_parser(parser.add_subparsers(dest="command", required=True))
    base = ["pacs", "run", "--profile", "p.yaml", "--model", "m", "--out", "o", "--study-uid", "1.2.3"]
    options = _run_options(parser.parse_args(base), store=False)
    assert options.engine == "local" and options.workers == 1  # unchanged default: one loader thread
    args = parser.parse_args([*base, "--engine", "ray", "--address", "127.0.0.1:6379", "--gpus-per-worker", "0.5"])
    batch = _batch_options(_run_options(args, store=False), None, progress=False)
    batch.validate()
    assert (batch.engine, batch.address, batch.gpus_per_worker, batch.workers) == ("ray", "127.0.0.1:6379", 0.5, None)


@pytest.mark.slow
def test_ray_worker_dying_on_one_series_fails_it_after_max_attempts(
    archive: Path, baseline: Path, tiny_model: Path, tmp_path: Path
) -> None:
    require_ray_cluster()
    out = tmp_path / "ray"
    deadly = _key_of(archive / "site2" / "c005")
    env = {"MEDSEG_BATCH_KILL_AT": f"loaded:{deadly}"}  # SIGKILLs the read task's worker, every attempt
    argv = _batch_argv(archive, tiny_model, out, "--max-attempts", "2")
    (step,) = run_cluster([{"argv": argv, "env": env, "timeout": 600}], tmp_path)
    assert step["returncode"] == 1, step["stderr"]
    rows = _states(out)
    assert rows[deadly][0] == "failed"
    assert "the Ray worker processing this series died 2 time(s)" in rows[deadly][2]
    assert assert_same_outputs(out, baseline, except_keys={deadly}) == _done(baseline) - 1
    assert_exactly_once(out / "manifest.sqlite", _done(baseline) - 1)
    assert_no_leftovers(out)
