"""``medseg batch``: the command-line front end of :func:`medseg.batch.runner.run_batch`.

``add_batch_parser(subparsers)`` registers the subcommand on the ``medseg`` parser;
``python -m medseg.batch ...`` runs it standalone (same arguments, without ``batch``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from medseg.errors import run_reporting_errors

__all__ = ["add_batch_parser", "add_engine_arguments", "engine_options", "main", "parse_outputs", "print_summary"]


def parse_outputs(text: str) -> tuple[str, ...]:
    """Parse ``--outputs`` (an argparse type): comma-separated batch output kinds, de-duplicated in order."""
    from medseg.batch.runner import OUTPUTS

    items = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    bad = [p for p in items if p not in OUTPUTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown output(s) {bad or '(none)'}; choose from {','.join(OUTPUTS)}")
    return items


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray options (shared by ``medseg batch`` and ``medseg pacs run``)."""
    ray = p.add_argument_group("Ray cluster (--engine ray; pip install 'medseg[ray]')")
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: read/predict/write on a Ray cluster, this process keeps the"
        " manifest (see docs/batch.md)",
    )
    ray.add_argument(
        "--address",
        default=None,
        help="Ray cluster address, e.g. 10.0.0.1:6379 (default: RAY_ADDRESS, a cluster started here with `ray start`,"
        " else a new local instance)",
    )
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per predictor actor (default: 1 if the cluster has GPUs, else 0); --workers sets the number of"
        " actors (default: one per GPU, or one per node without GPUs)",
    )
    ray.add_argument("--cpus-per-reader", type=float, default=1.0, help="CPUs per read/write task (default 1)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~medseg.batch.runner.BatchOptions` fields set by :func:`add_engine_arguments`."""
    return {
        "engine": args.engine,
        "address": args.address,
        "gpus_per_worker": args.gpus_per_worker,
        "cpus_per_reader": args.cpus_per_reader,
    }


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_root", metavar="INPUT_ROOT", help="archive folder, searched recursively for DICOM")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output folder (manifest, one folder per series, summary.json)")
    p.add_argument(
        "--rules", default=None, help="series-selection rules YAML (default: every image series except localizers)"
    )
    p.add_argument(
        "--outputs",
        type=parse_outputs,
        default=("nifti", "json"),
        help="comma-separated: nifti, seg (DICOM SEG), rtstruct, json (volumes per class); default nifti,json",
    )
    p.add_argument("--retry-failed", action="store_true", help="process series that failed before again")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader threads reading the next series during inference (0 = no prefetch); default: 2 with a GPU,"
        " 0 on CPU (where they slow inference down; see docs/benchmarks.md); with --engine ray: predictor actors"
        " (default: one per GPU, or one per node without GPUs)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=2,
        help="loaded series queued for inference; default 2 (with --engine ray: series in flight per predictor"
        " beyond the one it segments)",
    )
    p.add_argument("--seg-type", choices=("binary", "labelmap"), default="binary", help="DICOM SEG encoding")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="mark a series failed after its process died this many times on it (default 3)",
    )
    p.add_argument("--device", default=None, help="inference device (default: model config)")
    add_engine_arguments(p)
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--discover-only", action="store_true", help="fill the manifest and stop")
    stage.add_argument("--no-discovery", action="store_true", help="process what the manifest holds (no re-scan)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def print_summary(summary: dict[str, Any], *, as_json: bool = False, file: Any = None) -> None:
    """Print the summary: JSON, or counts per state and the failures with reasons."""
    file = file or sys.stdout
    if as_json:
        print(json.dumps(summary, indent=2, default=str), file=file)
        return
    counts = summary["counts"]
    run = summary.get("run", {})
    print(
        f"{summary['series']} series: " + ", ".join(f"{n} {state}" for state, n in counts.items()),
        file=file,
    )
    if run:
        rate = run.get("series_per_s")
        print(
            f"this run: {run.get('processed', 0)} processed ({run.get('done', 0)} done, {run.get('failed', 0)} failed)"
            + (f", {rate:.3g} series/s" if rate else "")
            + f", wall {run.get('wall_s', 0):.1f} s",
            file=file,
        )
    for item in summary.get("failed", []):
        print(f"  FAILED {item['key']}: {item['error']}", file=file)
    if summary.get("skipped_reasons"):
        print("skipped:", file=file)
        for reason, n in summary["skipped_reasons"].items():
            print(f"  {n:5d}  {reason}", file=file)
    if summary.get("ignored_files"):
        print("ignored files: " + ", ".join(f"{n} {r}" for r, n in summary["ignored_files"].items()), file=file)
    out = run.get("out")
    if out:
        print(
            f"manifest: {out}/manifest.sqlite" + ("; summary.json written" if summary.get("complete") else ""),
            file=file,
        )


def _cmd_batch(args: argparse.Namespace) -> int:
    from medseg.batch.runner import BatchOptions, run_batch

    options = BatchOptions(
        outputs=tuple(args.outputs),
        rules=args.rules,
        retry_failed=args.retry_failed,
        workers=args.workers,
        prefetch=args.prefetch,
        seg_type=args.seg_type,
        max_attempts=args.max_attempts,
        progress=not args.quiet,
        discover=not args.no_discovery,
        process=not args.discover_only,
        device=args.device,
        **engine_options(args),
    )
    summary = run_batch(args.input_root, args.model, args.out, options)
    print_summary(summary, as_json=args.json)
    return 1 if summary["counts"].get("failed", 0) else 0


def add_batch_parser(subparsers: Any) -> None:
    """Register ``medseg batch`` on the ``medseg`` command's sub-parsers."""
    p = subparsers.add_parser(
        "batch",
        help="segment every eligible series of a DICOM archive (resumable; DICOM SEG/RTSTRUCT out; Ray cluster)",
        description=(
            "Discover DICOM series under INPUT_ROOT (headers only), select them with --rules, segment each with"
            " --model and write the outputs under --out. Re-running resumes from OUT/manifest.sqlite; with"
            " --engine ray the series are processed on a Ray cluster. Exit code 1 if any series failed."
        ),
    )
    _add_arguments(p)
    p.set_defaults(func=_cmd_batch)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medseg.batch INPUT_ROOT --model DIR --out OUT_DIR ...``."""
    parser = argparse.ArgumentParser(prog="python -m medseg.batch", description="medseg batch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: _cmd_batch(args), command="medseg batch", debug=args.debug)
