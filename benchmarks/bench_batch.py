"""Benchmark ``medseg batch``: series/s with and without prefetch, discovery time, CPU utilisation.

Builds an archive of phantom CT series (80x80x36, one file per slice, as
:func:`medseg.sample_data.write_ct_dicom_series` writes them), trains a small model for a few
iterations, then runs :func:`medseg.batch.run_batch` alternately without prefetch
(``workers=0``: claim, read, predict, write in turn) and with prefetch (``workers=2``,
``prefetch=2``: two loader threads read and decode the next series while the main thread
predicts and writes), each into a fresh output folder, and reports medians.

Run as ``flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_batch.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medseg.batch.manifest import Manifest
from medseg.batch.runner import BatchOptions, run_batch
from medseg.config import load_config
from medseg.io.dicom import scan_dicom
from medseg.sample_data import generate_dataset, make_phantom, write_ct_dicom_series
from medseg.train.loop import train


def build_archive(root: Path, count: int) -> Path:
    if root.is_dir() and len(list(root.glob("*/*/ct"))) == count:
        return root  # reuse (--workdir of an earlier run)
    for case in range(count):
        folder = root / f"patient{case % 7:02d}" / f"study{case:03d}" / "ct"
        write_ct_dicom_series(make_phantom(case).channels[0], folder, case_id=f"b{case:03d}")
    return root


def tiny_model(root: Path) -> Path:
    if (root / "model" / "weights.pt").is_file():
        return root / "model"
    generate_dataset(root, "Dataset001_CTPhantom", num_train=4, num_test=0)
    config = load_config(
        overrides={
            "model.channels": [8, 16, 32],
            "model.strides": [2, 2],
            "preprocess.patch_size": [32, 32, 16],
            "train.iterations": 20,
        }
    )
    return train(root / "Dataset001_CTPhantom", config=config, out_dir=root / "model", progress=False)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(archive: Path, model: Path, out: Path, *, workers: int, outputs: tuple[str, ...]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)  # a fresh output folder: nothing to resume
    cpu0 = cpu_seconds()
    summary = run_batch(archive, model, out, BatchOptions(outputs=outputs, workers=workers, prefetch=2, progress=False))
    run = summary["run"]
    assert summary["counts"]["done"] == run["processed"], summary["counts"]
    cpu = cpu_seconds() - cpu0
    with Manifest(out / "manifest.sqlite") as manifest:
        timings = [json.loads(row["timings"]) for row in manifest.rows("done")]
    return {
        "workers": workers,
        "series": run["processed"],
        "process_s": run["process_s"],
        "series_per_s": run["series_per_s"],
        "discovery_s": run["discovery_s"],
        "wall_s": run["wall_s"],
        "cpu_utilisation": cpu / (run["wall_s"] * (os.cpu_count() or 1)),
        **{f"median_{k}": statistics.median(t[k] for t in timings) for k in ("load_s", "infer_s", "write_s")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--outputs", default="nifti,seg,json")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--workers", default="0,2", help="loader thread counts to compare (0 = no prefetch)")
    args = parser.parse_args()
    outputs = tuple(args.outputs.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_batch_"))
    t0 = time.perf_counter()
    archive = build_archive(work / "archive", args.series)
    print(f"archive: {args.series} series in {time.perf_counter() - t0:.1f} s -> {archive}")
    model = tiny_model(work / "train")
    t0 = time.perf_counter()
    scan = scan_dicom(archive)
    discovery_only = time.perf_counter() - t0
    files = sum(len(s.files) for s in scan.series)
    print(f"discovery (scan_dicom, headers only): {len(scan.series)} series, {files} files in {discovery_only:.2f} s")

    counts = [int(w) for w in args.workers.split(",")]
    results: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    for repeat in range(args.repeats):
        for workers in counts:  # interleaved: baseline and prefetch see the same machine state
            result = one_run(archive, model, work / f"out_w{workers}_r{repeat}", workers=workers, outputs=outputs)
            results[workers].append(result)
            print(json.dumps(result))

    def med(workers: int, key: str) -> float:
        return float(statistics.median(r[key] for r in results[workers]))

    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "series": args.series,
        "files": files,
        "outputs": list(outputs),
        "discovery_s": discovery_only,
    }
    for workers in counts:
        report[f"workers={workers}"] = {
            "series_per_s": med(workers, "series_per_s"),
            "vs_no_prefetch": med(workers, "series_per_s") / med(counts[0], "series_per_s"),
            "cpu_utilisation": med(workers, "cpu_utilisation"),
            "median_load_infer_write_s": [med(workers, f"median_{k}") for k in ("load_s", "infer_s", "write_s")],
        }
    report["runs"] = results
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
