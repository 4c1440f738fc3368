"""Benchmark ``medseg batch --engine ray`` against plain ``medseg batch`` on the same archive.

Builds an archive of realistic-size CT series (default 8 series of 512x512x100, one DICOM file
per slice: a phantom resampled to 0.7 x 0.7 x 1.5 mm), trains a small model for a few iterations
(its plan grid is coarse, so reading, resampling back to 512x512x100 and writing weigh as much as
the network - the stages Ray moves around), then runs, each into a fresh output folder:

1. ``local``: ``medseg batch`` in one process (the baseline);
2. ``ray-1node serial``: ``--engine ray --prefetch 0`` on a one-node Ray cluster with 2 CPUs: one
   series in flight, read -> predict -> write in turn as in the local run, so the difference is
   what Ray itself costs per series (scheduling, object store, transfers between processes);
3. ``ray-1node``: ``--engine ray`` (default ``--prefetch 2``: reading and writing overlap inference);
4. ``ray-2nodes``: ``--engine ray`` on two nodes of 1 CPU each (the same 2 cores, split).

The Ray clusters run in a private network/PID namespace (tests/ray_support.py), as in the tests.
For each run it reports the wall time of the processing phase, series/s, and the steady-state
seconds per series (time between the second and the last completion in the manifest's ``done``
events, per series: the start-up of Ray workers and of the model is excluded and reported
separately), plus the medians of the per-stage times the workers recorded (load, infer, write).

Ray's overhead per series = steady-state s/series of ``ray-1node serial`` / ``local`` - 1 (same
cores, same sequence of work); the pipelined runs show what the stages overlapping buys.

Finally a **projection** (not a measurement) for N GPU nodes: each node reads/writes on
``--cores-per-node`` cores at the CPU cost per series measured in the serial run, and predicts on
``--gpus-per-node`` GPUs at ``measured CPU infer_s / --gpu-speedup``; the driver's own cost per
series (claim + rename + done transaction, measured here on the manifest) caps the cluster.

Run as ``flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_ray.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_archive(root: Path, count: int, *, size: int, slices: int) -> Path:
    from scipy.ndimage import zoom

    from medseg.io.volume import Geometry, Volume
    from medseg.sample_data import make_phantom, write_ct_dicom_series

    if root.is_dir() and len(list(root.glob("*/ct"))) == count:
        return root  # reuse (--workdir of an earlier run)
    shutil.rmtree(root, ignore_errors=True)
    for case in range(count):
        image = make_phantom(case).channels[0]
        factors = (size / image.array.shape[1], size / image.array.shape[2], slices / image.array.shape[3])
        array = zoom(image.array[0].astype(np.float32), factors, order=1).round().astype(np.int16)
        affine = image.geometry.affine.copy()
        affine[:3, :3] = affine[:3, :3] / np.array(factors)
        big = Volume(array, Geometry(shape=array.shape, affine=affine))
        write_ct_dicom_series(big, root / f"study{case:03d}" / "ct", case_id=f"r{case:03d}")
    return root


def tiny_model(root: Path) -> Path:
    from medseg.config import load_config
    from medseg.sample_data import generate_dataset
    from medseg.train.loop import train

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


def batch_argv(archive: Path, model: Path, out: Path, outputs: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medseg.batch", str(archive), "--model", str(model), "--out", str(out),
            "--outputs", outputs, "--quiet", "--json", *extra]  # fmt: skip


def summary_of(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout[stdout.index("{") :]))


def measured(out: Path, summary: dict[str, Any], *, label: str) -> dict[str, Any]:
    """Wall, series/s, steady-state s/series and stage medians of one run (from its summary and manifest)."""
    with sqlite3.connect(out / "manifest.sqlite") as db:
        done = sorted(t for (t,) in db.execute("SELECT at FROM events WHERE event = 'done'"))
        timings = [json.loads(t) for (t,) in db.execute("SELECT timings FROM series WHERE state = 'done'")]
    run = summary["run"]
    steady = (done[-1] - done[1]) / (len(done) - 2) if len(done) > 2 else float("nan")
    stages = {k: statistics.median(t[k] for t in timings if k in t) for k in ("load_s", "infer_s", "write_s")}
    return {
        "run": label,
        "series": len(done),
        "failed": run.get("failed", 0),
        "process_s": run["process_s"],
        "series_per_s": round(len(done) / run["process_s"], 4),
        "first_done_after_s": round(done[0] - (done[-1] - run["process_s"]), 2) if done else None,
        "steady_s_per_series": round(steady, 3),
        "steady_series_per_s": round(1 / steady, 4) if steady == steady and steady > 0 else None,
        **{f"median_{k}": round(v, 3) for k, v in stages.items()},
        "predictors": run.get("ray_predictors", "in-process"),
    }


def driver_cost_per_series(tmp: Path, count: int = 300) -> float:
    """Seconds the driver spends per series on the manifest: claim + (empty) rename + done transaction."""
    from medseg.batch.manifest import Manifest, SeriesRecord

    with Manifest(tmp / "m.sqlite") as m:
        m.sync(
            [
                SeriesRecord(key=f"k{i:05d}", files=[f"f{i}"], fingerprint="x", decision=True, reason="")
                for i in range(count)
            ],
            model_id="m",
            outputs=["nifti"],
        )
        t0 = time.perf_counter()
        while (claim := m.claim()) is not None:
            folder = tmp / "tmp" / claim.claim_id
            folder.mkdir(parents=True)
            m.complete(claim, out_dir=claim.key, outputs=["nifti"], model_id="m",
                       commit=lambda f=folder, k=claim.key: os.replace(f, tmp / k))  # fmt: skip
        return (time.perf_counter() - t0) / count


def projection(stages: dict[str, float], driver_s: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    cpu_s = stages["median_load_s"] + stages["median_write_s"]
    gpu_s = stages["median_infer_s"] / args.gpu_speedup
    rows = []
    for nodes in (1, 2, 4, 8, 16, 32):
        per_node = min(args.cores_per_node / cpu_s, args.gpus_per_node / gpu_s)
        rate = min(nodes * per_node, 1 / driver_s)
        bound = (
            "driver"
            if rate < nodes * per_node
            else ("CPU" if args.cores_per_node / cpu_s < args.gpus_per_node / gpu_s else "GPU")
        )
        rows.append({"nodes": nodes, "series_per_s": round(rate, 2), "bound_by": bound})
    return rows


def main() -> None:
    from ray_support import cluster_unavailable, run_cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each series")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--outputs", default="nifti,json")
    parser.add_argument("--workdir", default=None, help="keep the archive and model here (reused by later runs)")
    parser.add_argument("--cores-per-node", type=int, default=16, help="projection: CPU cores per GPU node")
    parser.add_argument("--gpus-per-node", type=int, default=4, help="projection: GPUs per node")
    parser.add_argument("--gpu-speedup", type=float, default=20.0, help="projection: GPU vs this CPU, inference")
    args = parser.parse_args()
    reason = cluster_unavailable()
    if reason is not None:
        raise SystemExit(f"cannot start a namespaced Ray cluster: {reason}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="medseg-bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    archive = build_archive(work / "archive", args.series, size=args.size, slices=args.slices)
    model = tiny_model(work)
    print(f"archive + model ready in {time.perf_counter() - t0:.0f} s ({args.series} series of "
          f"{args.size}x{args.size}x{args.slices})", flush=True)  # fmt: skip
    results = []
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    out = runs / "local"
    proc = subprocess.run(batch_argv(archive, model, out, args.outputs), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"local run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    results.append(measured(out, summary_of(proc.stdout), label="local (1 process, 2 cores)"))
    print(json.dumps(results[-1]), flush=True)
    clusters = {
        "ray-1node": (1, 2, [("ray-1node serial (1 x 2 CPUs, --prefetch 0)", ("--prefetch", "0")),
                             ("ray-1node (1 x 2 CPUs)", ())]),
        "ray-2nodes": (2, 1, [("ray-2nodes (2 x 1 CPU)", ())]),
    }  # fmt: skip
    for name, (nodes, cpus, configs) in clusters.items():
        steps = [
            {"argv": batch_argv(archive, model, runs / f"{name}-{i}", args.outputs, "--engine", "ray", *extra),
             "timeout": 3600}
            for i, (_, extra) in enumerate(configs)
        ]  # fmt: skip
        outcomes = run_cluster(steps, runs / f"{name}-cluster", nodes=nodes, cpus=cpus, timeout=3600)
        for i, ((label, _), step) in enumerate(zip(configs, outcomes, strict=True)):
            if step["returncode"] != 0:
                raise SystemExit(f"{label} failed:\n{step['stderr'][-3000:]}")
            results.append(measured(runs / f"{name}-{i}", summary_of(step["stdout"]), label=label))
            print(json.dumps(results[-1]), flush=True)
    local, serial, ray1, ray2 = results
    driver_s = driver_cost_per_series(Path(tempfile.mkdtemp(prefix="medseg-bench-driver-")))
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "archive": {"series": args.series, "shape": [args.size, args.size, args.slices], "outputs": args.outputs},
        "runs": results,
        "ray_overhead_steady": round(serial["steady_s_per_series"] / local["steady_s_per_series"] - 1, 4),
        "ray_overhead_wall": round(serial["process_s"] / local["process_s"] - 1, 4),
        "pipelined_vs_local": round(local["steady_s_per_series"] / ray1["steady_s_per_series"], 3),
        "two_nodes_vs_one": round(ray2["steady_series_per_s"] / ray1["steady_series_per_s"], 3),
        "driver_s_per_series": round(driver_s, 5),
        "projection": {
            "note": "PROJECTION, not a measurement: per-stage medians of the serial Ray run; GPU inference assumed"
            f" {args.gpu_speedup:g}x faster than this CPU; {args.cores_per_node} cores and {args.gpus_per_node}"
            " GPUs per node; capped by the driver's measured manifest cost per series",
            "cpu_s_per_series": round(serial["median_load_s"] + serial["median_write_s"], 3),
            "gpu_infer_s_per_series": round(serial["median_infer_s"] / args.gpu_speedup, 4),
            "rows": projection(serial, driver_s, args),
        },
    }
    print(json.dumps(report, indent=2))
    print(
        f"\nsteady state: local {local['steady_s_per_series']:.2f} s/series,"
        f" ray 1 node serial {serial['steady_s_per_series']:.2f}, pipelined {ray1['steady_s_per_series']:.2f},"
        f" ray 2 nodes {ray2['steady_s_per_series']:.2f}; Ray overhead {100 * report['ray_overhead_steady']:+.1f} %"
        f" (wall incl. start-up {100 * report['ray_overhead_wall']:+.1f} %)"
    )


if __name__ == "__main__":
    main()
