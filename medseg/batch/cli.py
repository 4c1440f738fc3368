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
from medseg.infer.cli import add_model_selection_arguments

__all__ = ["add_batch_parser", "main", "parse_outputs", "print_listing", "print_summary"]


def parse_outputs(text: str) -> tuple[str, ...]:
    """Parse ``--outputs`` (an argparse type): comma-separated output kinds, de-duplicated in order."""
    from medseg.infer.writers import parse_output_list

    try:
        return parse_output_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_root", metavar="INPUT_ROOT", help="archive folder, searched recursively for DICOM")
    p.add_argument("--model", required=True, help="model: medseg model directory or nnU-Net v2 results folder")
    add_model_selection_arguments(p)
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
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="process failed series again, and the failed outputs of partial series (only what is missing)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader threads reading the next series during inference (0 = no prefetch); default: 2 with a GPU,"
        " 0 on CPU (where they slow inference down; see docs/benchmarks.md)",
    )
    p.add_argument("--prefetch", type=int, default=2, help="loaded series queued for inference; default 2")
    p.add_argument("--seg-type", choices=("binary", "labelmap"), default="binary", help="DICOM SEG encoding")
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="mark a series failed after its process died this many times on it (default 3)",
    )
    p.add_argument(
        "--no-compat-check",
        action="store_true",
        help="segment selected series even when they do not fit the model (modality, channels, CT intensities)",
    )
    p.add_argument(
        "--journal-mode",
        choices=("WAL", "DELETE"),
        default=None,
        help="SQLite journal: WAL (default, one host) or DELETE (ranks on several hosts sharing a filesystem)",
    )
    stage = p.add_mutually_exclusive_group()
    stage.add_argument(
        "--discover-only",
        action="store_true",
        help="fill the manifest, list the selected and skipped series with the reasons, and stop",
    )
    stage.add_argument("--no-discovery", action="store_true", help="process what the manifest holds (no re-scan)")
    p.add_argument("--json", action="store_true", help="print the summary (and the --discover-only listing) as JSON")
    p.add_argument(
        "--show-patient-ids",
        action="store_true",
        help="--discover-only listing: show PatientIDs instead of the pseudonyms stored in the manifest"
        " (printed only, never stored)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (otherwise: a bar on a terminal, one plain line per series in logs)",
    )
    from medseg.infer.cli import add_inference_arguments

    add_inference_arguments(
        p, device_help="auto (default: model config), cpu, cuda, cuda:N; cuda:LOCAL_RANK under torchrun"
    )


def print_summary(summary: dict[str, Any], *, as_json: bool = False, file: Any = None) -> None:
    """Print the summary: JSON, or counts per state, the failures and partial series with reasons."""
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
            f"this run: {run.get('processed', 0)} processed ({run.get('done', 0)} done, {run.get('partial', 0)}"
            f" partial, {run.get('failed', 0)} failed, {run.get('skipped', 0)} skipped as not fitting the model)"
            + (f", {rate:.3g} series/s" if rate else "")
            + f", wall {run.get('wall_s', 0):.1f} s",
            file=file,
        )
    for item in summary.get("failed", []):
        print(f"  FAILED {item.get('series', item['key'])}: {item['error']}", file=file)
    for item in summary.get("partial", []):
        for kind, why in item.get("failed_outputs", {}).items():
            print(f"  PARTIAL {item.get('series', item['key'])}: {kind} failed: {why}", file=file)
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


def print_listing(listing: list[dict[str, Any]], *, file: Any = None) -> None:
    """The ``--discover-only`` table: selected series, then skipped ones, with the reasons."""
    file = file or sys.stdout
    selected = [r for r in listing if r["selected"]]
    skipped = [r for r in listing if not r["selected"]]
    header = ("STATE", "PATIENT", "STUDY DATE", "SERIES", "MOD", "DESCRIPTION", "IMAGES", "REASON")
    for title, rows in (("selected", selected), ("skipped", skipped)):
        print(f"{title} ({len(rows)}):", file=file)
        if not rows:
            continue
        table = [header] + [
            (
                r["state"],
                r["patient"] or "-",
                r["study_date"] or "-",
                "-" if r["series_number"] is None else str(r["series_number"]),
                r["modality"] or "-",
                _clip(r["description"] or "-", 36),
                str(r["images"]),
                r["reason"],
            )
            for r in rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [
                str(c).rjust(w) if i in (3, 6) else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row[:-1], widths, strict=True))
            ]
            print("  " + "  ".join(cells) + "  " + str(row[-1]), file=file)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cmd_batch(args: argparse.Namespace) -> int:
    import shlex

    from medseg.batch.runner import BatchOptions, run_batch
    from medseg.infer.cli import infer_overrides

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
        journal_mode=args.journal_mode,
        device=args.device,
        folds=args.folds,
        checkpoint=args.checkpoint,
        infer=infer_overrides(args, device=False),
        compat_check=not args.no_compat_check,
    )
    patient_ids: dict[str, str] = {}
    summary = run_batch(args.input_root, args.model, args.out, options, patient_ids=patient_ids)
    if args.discover_only:
        from medseg.batch.runner import series_listing

        listing = series_listing(args.out, patient_ids=patient_ids if args.show_patient_ids else None)
        if args.json:
            print(json.dumps({"series": listing, "summary": summary}, indent=2, default=str))
        else:
            print_listing(listing)
            print_summary(summary)
        return 0
    print_summary(summary, as_json=args.json)
    if summary.get("run", {}).get("interrupted"):
        words = ["medseg", "batch", str(args.input_root), "--model", str(args.model), "--out", str(args.out)]
        words += ["--outputs", ",".join(args.outputs)] + (["--rules", str(args.rules)] if args.rules else [])
        print(
            "interrupted: finished series are kept and the one in progress went back to pending; resume with the"
            f" same command (and the same other options):\n  {shlex.join(words)}",
            file=sys.stderr,
        )
        return 130
    counts = summary["counts"]
    return 1 if counts.get("failed", 0) or counts.get("partial", 0) else 0


def add_batch_parser(subparsers: Any) -> None:
    """Register ``medseg batch`` on the ``medseg`` command's sub-parsers."""
    p = subparsers.add_parser(
        "batch",
        help="segment every eligible series of a DICOM archive (resumable; DICOM SEG/RTSTRUCT out; torchrun)",
        description=(
            "Discover DICOM series under INPUT_ROOT (headers only), select them with --rules, segment each with"
            " --model and write the outputs under --out. Re-running resumes from OUT/manifest.sqlite; under"
            " torchrun the ranks share the work. Exit code 1 if any series failed or has failed outputs, 130 after"
            " Ctrl-C (re-run the same command to resume). See docs/batch.md."
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
