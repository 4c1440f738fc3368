"""``medseg batch`` end to end on a messy archive, resume, crash safety (SIGKILL), processes sharing a manifest."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from medseg.batch.cli import main as batch_main
from medseg.batch.manifest import Manifest
from medseg.batch.runner import BatchOptions, run_batch, series_dir_name
from medseg.io import read_dicom_series
from medseg.io.dicom_seg import read_dicom_seg
from medseg.io.volume import Geometry, Volume
from medseg.sample_data import make_phantom, write_ct_dicom_series

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "configs" / "batch_rules.yaml"
ALL_OUTPUTS = "nifti,seg,rtstruct,json"


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


# ----------------------------------------------------------------------------- archive
def small_ct(case: int, *, slices: int = 20) -> Volume:
    """A 40x40xN crop of a CT phantom (fast to segment), geometry kept exact."""
    image = make_phantom(case).channels[0]
    affine = image.geometry.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([20.0, 20.0, 8.0])
    array = image.array[:, 20:60, 20:60, 8 : 8 + slices].copy()
    return Volume(array, Geometry(shape=array.shape[1:], affine=affine))


def write_series(case: int, folder: Path, *, slices: int = 20, **attrs: object) -> Path:
    write_ct_dicom_series(small_ct(case, slices=slices), folder, case_id=f"c{case:03d}")
    if attrs:
        for path in folder.iterdir():
            ds = pydicom.dcmread(path)
            for keyword, value in attrs.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    return folder


def _non_image(path: Path, sop_class: str, modality: str, study_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesDescription, ds.PatientID = modality, f"{modality} object", "MEDSEG-c000"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def build_archive(root: Path) -> dict[str, str]:
    """A messy archive; returns {name: expected state}. Keys of the series are looked up by description."""
    write_series(0, root / "Phantom^c000" / "1")
    # c001: split over two folders, plus an identical copy of one slice somewhere else.
    tmp = write_series(1, root / "tmp-c001")
    files = sorted(tmp.iterdir())
    for index, path in enumerate(files):
        target = root / "b" / ("part1" if index < 10 else "part2") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    tmp.rmdir()
    (root / "dups").mkdir()
    shutil.copy2(root / "b" / "part1" / files[3].name, root / "dups" / "IM0003_copy")
    write_series(2, root / "c" / "d" / "e" / "c002")
    write_series(3, root / "mr" / "c003", Modality="MR")
    write_series(4, root / "loc", slices=1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    missing = write_series(5, root / "MEDSEG-c005" / "s", slices=22)  # folder named after the PatientID
    (missing / "IM0010").unlink()
    write_series(6, root / "anon", StudyInstanceUID="", SeriesInstanceUID="", FrameOfReferenceUID="")
    write_series(7, root / "thin", slices=5)
    study0 = str(pydicom.dcmread(root / "Phantom^c000" / "1" / "IM0000").StudyInstanceUID)
    _non_image(root / "Phantom^c000" / "rt" / "RS.dcm", RTStructureSetStorage, "RTSTRUCT", study0)
    _non_image(root / "Phantom^c000" / "sr" / "SR.dcm", BasicTextSRStorage, "SR", study0)
    (root / "notes.txt").write_text("exported by PACS\n")
    (root / "junk").mkdir()
    (root / "junk" / "truncated.dcm").write_bytes((root / "c" / "d" / "e" / "c002" / "IM0000").read_bytes()[:300])
    return {
        "Phantom CT c000": "done",
        "Phantom CT c001": "done",
        "Phantom CT c002": "done",
        "Phantom CT c003": "skipped",
        "Phantom CT c004": "skipped",
        "Phantom CT c005": "failed",
        "Phantom CT c006": "partial",  # blanked UIDs: NIfTI and volumes written, SEG/RTSTRUCT refused
        "Phantom CT c007": "skipped",
        "RTSTRUCT object": "skipped",
        "SR object": "skipped",
    }


def good_archive(root: Path, cases: range) -> Path:
    for case in cases:
        write_series(case, root / f"p{case % 2}" / f"c{case:03d}")
    return root


def by_description(manifest: Manifest) -> dict[str, dict]:
    return {row["description"]: row for row in manifest.rows()}


# ----------------------------------------------------------------------------- checks
def check_outputs(out: Path, row: dict, source: Path, *, outputs: set[str]) -> np.ndarray:
    """Every output of a done series is valid; DICOM outputs read back to the NIfTI labels."""
    folder = out / row["out_dir"]
    assert folder.is_dir() and folder.resolve().is_relative_to(out.resolve())
    marker = json.loads((folder / ".medseg-series.json").read_text())
    assert marker["key"] == row["key"] and marker["fingerprint"] == row["fingerprint"]
    nifti = nib.load(str(folder / "segmentation.nii.gz"))
    labels = np.asarray(nifti.dataobj)
    image = read_dicom_series(source, series_uid=row["key"])
    assert labels.shape == image.geometry.shape
    assert np.allclose(nifti.affine, image.geometry.affine, atol=1e-4)
    if "seg" in outputs:
        assert dciodvfy_errors(folder / "seg.dcm") == []
        seg = read_dicom_seg(folder / "seg.dcm", reference=image)
        assert np.array_equal(seg.array[0], labels)
        ds = pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True)
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == row["series_uid"]
    if "rtstruct" in outputs:
        from medseg.io.rtstruct import ReferenceSeries, rtstruct_to_labels

        assert dciodvfy_errors(folder / "rtstruct.dcm") == []
        header = pydicom.dcmread(sorted(p for p in Path(image.meta["slice_files"][0]).parent.iterdir())[0])
        reference = ReferenceSeries(source, image, header, str(header.SOPClassUID), str(header.FrameOfReferenceUID))
        back = rtstruct_to_labels(folder / "rtstruct.dcm", reference)
        names = json.loads((folder / "segmentation.json").read_text())["labels"]
        for value, name in back.meta["label_names"].items():
            original = int(next(k for k, v in names.items() if v == name))
            assert np.array_equal(back.array[0] == value, labels == original), name
    if "json" in outputs:
        report = json.loads((folder / "volumes.json").read_text())
        voxel_ml = abs(np.linalg.det(nifti.affine[:3, :3])) / 1000
        for stats in report["classes"].values():
            assert stats["voxels"] == int((labels == stats["label"]).sum())
            assert stats["volume_ml"] == pytest.approx(stats["voxels"] * voxel_ml, abs=1e-3)
    return labels


def assert_no_leftovers(out: Path) -> None:
    tmp = out / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())
    stray = [p for p in out.rglob("*") if ".tmp" in p.name and p.parent != out]
    assert stray == []


def assert_exactly_once(manifest_path: Path, expected_done: int) -> None:
    with Manifest(manifest_path) as m:
        done = [row for row in m.rows() if row["state"] == "done"]
        assert len(done) == expected_done
        assert m.completion_counts() == {row["key"]: 1 for row in done}
        assert m.summary()["counts"]["running"] == 0
    with sqlite3.connect(manifest_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ----------------------------------------------------------------------------- tests
def test_batch_parser_registers_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from medseg.batch.cli import add_batch_parser

    parser = argparse.ArgumentParser(prog="medseg")
    add_batch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["batch", "in", "--model", "m", "--out", "o", "--outputs", "seg,nifti,seg", "--workers", "0"]
    )
    assert args.func.__name__ == "_cmd_batch" and args.outputs == ("seg", "nifti") and args.workers == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "in", "--model", "m", "--out", "o", "--outputs", "nifti,png"])
    assert "unknown output(s) ['png']" in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = batch_main([str(tmp_path / "nope"), "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "nope: no such folder" in capsys.readouterr().err
    (tmp_path / "archive").mkdir()
    model = tmp_path / "model"
    code = batch_main([str(tmp_path / "archive"), "--model", str(model), "--out", str(tmp_path / "archive" / "o")])
    assert code == 2 and "output folder lies inside the input folder" in capsys.readouterr().err
    rules = tmp_path / "rules.yaml"
    rules.write_text("selections: [{name: a, conditions: {Modaliy: CT}}]")
    code = batch_main(
        [str(tmp_path / "archive"), "--model", str(model), "--out", str(tmp_path / "o"), "--rules", str(rules)]
    )
    assert code == 2 and "unknown attribute 'Modaliy'" in capsys.readouterr().err


def test_split_series_errors_name_the_real_files(tmp_path: Path) -> None:
    from medseg.batch.manifest import Claim, fingerprint_files
    from medseg.batch.runner import load_claimed_series
    from medseg.errors import MedsegError

    series = write_series(8, tmp_path / "a" / "one", slices=22)
    (tmp_path / "a" / "two").mkdir()
    for path in sorted(series.iterdir())[11:]:
        shutil.move(path, tmp_path / "a" / "two" / path.name)
    kept = (series / "IM0005").read_bytes()
    (series / "IM0005").unlink()
    (tmp_path / "a" / "two" / "other.txt").write_text("not part of the series")
    files = sorted(p for p in (tmp_path / "a").rglob("IM*"))
    rel, fingerprint = fingerprint_files(tmp_path, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    claim = Claim(uid, "c", rel, fingerprint, uid, "", "CT", "d", 1, 1)
    with pytest.raises(MedsegError) as info:
        load_claimed_series(tmp_path, claim)
    message = str(info.value)
    assert "missing" in message and "medseg-batch-" not in message and str(tmp_path / "a") in message
    (series / "IM0005").write_bytes(kept)  # repaired: loads from its two folders, the text file ignored
    files = sorted(p for p in (tmp_path / "a").rglob("IM*"))
    rel, fingerprint = fingerprint_files(tmp_path, files)
    volume = load_claimed_series(tmp_path, Claim(uid, "c", rel, fingerprint, uid, "", "CT", "d", 1, 1))
    assert volume.geometry.shape == (40, 40, 22)


def test_discover_only_fills_the_manifest(tmp_path: Path, tiny_model: Path) -> None:
    archive = good_archive(tmp_path / "archive", range(3))
    (archive / "README.txt").write_text("not dicom")
    options = BatchOptions(process=False, progress=False)
    summary = run_batch(archive, tiny_model, tmp_path / "out", options)
    assert summary["counts"]["pending"] == 3 and summary["run"]["processed"] == 0
    assert summary["ignored_files"] == {"not DICOM": 1} and not summary["complete"]
    again = run_batch(archive, tiny_model, tmp_path / "out", options)
    assert again["run"]["sync"] == {"new": 0, "unchanged": 3, "changed": 0, "reset": 0, "retried": 0}
    with pytest.raises(Exception, match="--retry-failed needs discovery"):
        run_batch(archive, tiny_model, tmp_path / "out", BatchOptions(discover=False, retry_failed=True))


def test_output_names_cannot_escape(tmp_path: Path) -> None:
    name = series_dir_name(key="1.2.3", study_uid="../../etc", series_number=3, description="../../../root/.ssh x")
    assert ".." not in name.parts and len(name.parts) == 2
    assert name.parts[0] == "etc" and name.parts[1].startswith("0003-root_.ssh_x-")
    assert series_dir_name(key="k", study_uid="", series_number=None, description="/").parts[0] == "no-study-uid"
    assert (tmp_path / name).resolve().is_relative_to(tmp_path)


def test_batch_on_messy_archive_then_resume(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    expected = build_archive(archive)
    out = tmp_path / "out"
    args = [str(archive), "--model", str(tiny_model), "--out", str(out), "--rules", str(RULES)]
    code = batch_main([*args, "--outputs", ALL_OUTPUTS, "--workers", "2", "--quiet"])  # with prefetch
    printed = capsys.readouterr()
    assert code == 1  # a series failed, another one has failed outputs

    with Manifest(out / "manifest.sqlite") as m:
        rows = by_description(m)
        assert {name: rows[name]["state"] for name in expected} == expected
        assert len(rows) == len(expected)
        reasons = {name: rows[name]["reason"] + " " + (rows[name]["error"] or "") for name in rows}
        assert "selected by rule 'abdomen-ct'" in reasons["Phantom CT c000"]
        assert "'abdomen-ct': Modality 'MR' does not match 'CT'" in reasons["Phantom CT c003"]
        assert "contains excluded ['LOCALIZER']" in reasons["Phantom CT c004"]
        assert "NumberOfSlices 5 < 20" in reasons["Phantom CT c007"]
        assert "missing" in reasons["Phantom CT c005"] and "slice" in reasons["Phantom CT c005"]
        assert "seg failed" in reasons["Phantom CT c006"] and "rtstruct failed" in reasons["Phantom CT c006"]
        assert "empty SeriesInstanceUID" in reasons["Phantom CT c006"]
        status = json.loads(rows["Phantom CT c006"]["output_status"])
        assert status["nifti"] == {"files": ["segmentation.nii.gz", "segmentation.json"]}
        assert status["json"] == {"files": ["volumes.json"]} and set(status["seg"]) == {"error"}
        anon = out / rows["Phantom CT c006"]["out_dir"]
        assert sorted(p.name for p in anon.iterdir()) == [
            ".medseg-series.json",
            "segmentation.json",
            "segmentation.nii.gz",
            "volumes.json",
        ]
        assert rows["Phantom CT c006"]["key"].startswith("nouid-")
        assert "not an image series: RT structure set" in reasons["RTSTRUCT object"]
        assert "not an image series: structured report" in reasons["SR object"]
        summary = m.summary()
        assert summary["ignored_files"] == {"not DICOM": 1} or set(summary["ignored_files"]) >= {"not DICOM"}
        assert sum(summary["ignored_files"].values()) == 2  # notes.txt and the truncated file
        # Patient names and IDs never reach the log or the manifest's messages.
        text = printed.out + printed.err + json.dumps(summary) + json.dumps([r["error"] for r in rows.values()])
        assert "MEDSEG-c0" not in text and "Phantom^" not in text
        assert "<redacted>" in rows["Phantom CT c005"]["error"]
        assert "1 partial, 1 failed" in printed.out and "FAILED" in printed.out and "PARTIAL" in printed.out
        done = [rows[f"Phantom CT c00{i}"] for i in range(3)]

    sources = [archive / "Phantom^c000" / "1", archive, archive / "c" / "d" / "e" / "c002"]
    first = {}
    for row, source in zip(done, sources, strict=True):
        first[row["key"]] = check_outputs(out, row, source, outputs=set(ALL_OUTPUTS.split(",")))
    # The NIfTI grid equals SimpleITK's reading of the DICOM series (independent reader).
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(sources[0])))
    ref = reader.Execute()
    grid = Geometry.from_itk(
        shape=ref.GetSize(), spacing=ref.GetSpacing(), origin=ref.GetOrigin(), direction=ref.GetDirection()
    )
    assert np.allclose(nib.load(str(out / done[0]["out_dir"] / "segmentation.nii.gz")).affine, grid.affine, atol=1e-4)
    assert_no_leftovers(out)
    summary_file = json.loads((out / "summary.json").read_text())
    assert summary_file["counts"] == {"pending": 0, "running": 0, "done": 3, "partial": 1, "failed": 1, "skipped": 5}

    # Re-run: nothing is processed again.
    summary = run_batch(
        archive, tiny_model, out, BatchOptions(outputs=tuple(ALL_OUTPUTS.split(",")), rules=RULES, progress=False)
    )
    assert summary["run"]["processed"] == 0 and summary["counts"]["done"] == 3
    # Changed input (touched file) and a deleted output folder: those two series are redone.
    touched = sources[2] / "IM0004"
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    shutil.rmtree(out / done[0]["out_dir"])
    summary = run_batch(
        archive, tiny_model, out, BatchOptions(outputs=("nifti", "seg", "json"), rules=RULES, progress=False)
    )
    assert summary["run"]["processed"] == 2 and summary["run"]["done"] == 2
    assert summary["run"]["outputs_missing"] == 1
    with Manifest(out / "manifest.sqlite") as m:
        counts = m.completion_counts()
        anon_key = by_description(m)["Phantom CT c006"]["key"]  # a partial completion is a completion too
        assert counts == {done[0]["key"]: 2, done[1]["key"]: 1, done[2]["key"]: 2, anon_key: 1}
        assert [e["detail"] for e in m.events(done[2]["key"], "reset")] == ["inputs changed since it was done"]
        assert [e["detail"] for e in m.events(done[0]["key"], "reset")] == ["outputs of a done series are missing"]
        row = by_description(m)["Phantom CT c002"]
    assert np.array_equal(check_outputs(out, row, sources[2], outputs={"seg", "json"}), first[row["key"]])
    # --retry-failed: the failed one is tried again (and fails again, with the same reason); the partial one
    # is not, since the outputs asked for now (nifti, json) exist.
    summary = run_batch(archive, tiny_model, out, BatchOptions(rules=RULES, retry_failed=True, progress=False))
    assert summary["run"]["processed"] == 1 and summary["counts"]["failed"] == 1
    with Manifest(out / "manifest.sqlite") as m:
        rows = by_description(m)
        assert rows["Phantom CT c005"]["attempts"] == 2 and rows["Phantom CT c005"]["state"] == "failed"
        assert rows["Phantom CT c006"]["state"] == "partial"
    assert_no_leftovers(out)


def _run_cli(archive: Path, model: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "medseg.batch", str(archive), "--model", str(model), "--out", str(out)]
    command += ["--outputs", "nifti,seg,json", "--quiet", "--max-attempts", "1000", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done_events(manifest: Path) -> int:
    try:
        with sqlite3.connect(f"file:{manifest}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM events WHERE event = 'done'").fetchone()[0])
    except sqlite3.Error:
        return 0


def _kill_after(
    proc: subprocess.Popen, manifest: Path, *, done_events: int, delay: float, timeout: float = 300
) -> bool:
    """SIGKILL ``proc`` ``delay`` s after the manifest shows ``done_events`` completions; False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and _done_events(manifest) < done_events:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("batch subprocess made no progress")
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_sigkill_at_crash_points_then_resume(tmp_path: Path, tiny_model: Path) -> None:
    """SIGKILL inside the critical windows (after the rename, before the commit), and at a random moment."""
    archive = good_archive(tmp_path / "archive", range(4))
    out = tmp_path / "out"
    manifest = out / "manifest.sqlite"
    # 1. Killed right after the first series' folder was renamed into place, before it was recorded.
    proc = _run_cli(archive, tiny_model, out, "--workers", "2", env={"MEDSEG_BATCH_CRASH_AT": "renamed:1"})
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert _done_events(manifest) == 0
    # 2. Killed at a random moment after the next completion (the first run's claims are reclaimed,
    #    the renamed folder is adopted, not recomputed).
    proc = _run_cli(archive, tiny_model, out, "--workers", "2")
    _kill_after(proc, manifest, done_events=_done_events(manifest) + 1, delay=random.uniform(0, 1.0))
    # 3. The final run completes everything.
    proc = _run_cli(archive, tiny_model, out)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "4 done" in stdout
    assert_exactly_once(manifest, 4)
    with Manifest(manifest) as m:
        assert len(m.events(event="reclaimed")) >= 1  # the killed runs' running rows were taken back
        adopted = [e for e in m.events(event="done") if "adopted" in (e["detail"] or "")]
        assert len(adopted) >= 1  # the folder renamed before the kill was recorded, not recomputed
    assert_no_leftovers(out)
    with Manifest(manifest) as m:
        for row in m.rows():
            source = archive / f"p{int(row['description'][-3:]) % 2}" / row["description"][-4:]
            check_outputs(out, row, source, outputs={"seg", "json"})
        series_dirs = {p.parent for p in out.rglob(".medseg-series.json")}
        assert series_dirs == {(out / row["out_dir"]).resolve() for row in m.rows()}


@pytest.mark.slow
def test_sigkill_random_loop(tmp_path: Path, tiny_model: Path) -> None:
    """Repeated SIGKILLs at random moments (from start-up to mid-series); then a clean finish."""
    archive = good_archive(tmp_path / "archive", range(8))
    out = tmp_path / "out"
    manifest = out / "manifest.sqlite"
    rng = random.Random(7)
    proc = _run_cli(archive, tiny_model, out, env={"MEDSEG_BATCH_CRASH_AT": "outputs_written:2"})
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL and any((out / ".tmp").iterdir())  # a finished temp folder left
    kills = 0
    for attempt in range(8):
        proc = _run_cli(archive, tiny_model, out, "--workers", str(attempt % 3))
        if attempt % 2:  # mid-series: shortly after the next completion
            kills += _kill_after(proc, manifest, done_events=_done_events(manifest) + 1, delay=rng.uniform(0.0, 1.5))
        else:  # at a random moment from start-up on (a run with nothing left to do now exits within ~1 s)
            kills += _kill_after(proc, manifest, done_events=0, delay=rng.uniform(0.5, 6.0))
    assert kills >= 4
    proc = _run_cli(archive, tiny_model, out)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert_exactly_once(manifest, 8)
    assert_no_leftovers(out)
    with Manifest(manifest) as m:
        for row in m.rows():
            source = archive / f"p{int(row['description'][-3:]) % 2}" / row["description"][-4:]
            check_outputs(out, row, source, outputs={"seg", "json"})


def test_two_processes_share_the_manifest(tmp_path: Path, tiny_model: Path) -> None:
    """Two batch processes on one host, one output folder: every series done exactly once (atomic claims)."""
    archive = good_archive(tmp_path / "archive", range(4))
    out = tmp_path / "out"
    procs = [_run_cli(archive, tiny_model, out) for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    assert_exactly_once(out / "manifest.sqlite", 4)
    with Manifest(out / "manifest.sqlite") as m:
        claims = m.events(event="claimed")
        assert len(claims) == 4 and len({e["key"] for e in claims}) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] + summary["counts"]["running"] == 4
