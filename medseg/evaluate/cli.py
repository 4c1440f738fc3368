"""``medseg evaluate``: the command-line front end of :func:`medseg.evaluate.evaluate_folders`.

Exit codes: 0 when the report was written (input problems are listed on stderr and in the
report); 1 with ``--strict`` when there was any problem, or when no case could be evaluated at
all; 2 for usage errors (raised as :class:`~medseg.errors.MedsegError`, printed by ``medseg``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_evaluate_parser", "run_evaluate"]


def add_evaluate_parser(subparsers: Any) -> None:
    """Register the ``evaluate`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "evaluate",
        help="Dice, HD95, surface Dice, volumes and lesion-wise metrics per case and class, with an HTML report",
        description=(
            "Compare predicted label volumes with references (matched by case id) and write metrics.csv, "
            "lesions.csv, summary.json, report.md and a self-contained report.html. Bad input (missing cases, "
            "unreadable files, mismatched grids, unexpected labels) is reported and skipped."
        ),
    )
    p.add_argument(
        "--pred",
        required=True,
        help="predicted labels: one file (NIfTI/NRRD/MHA/DICOM SEG), a folder of them, a medseg batch output folder, "
        "or a folder of DICOM mask series / SEGs",
    )
    p.add_argument("--ref", required=True, help="reference labels, in any layout --pred accepts")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument(
        "--labels",
        default=None,
        help="label names: a model (medseg dir, nnU-Net folder), dataset folder or dataset.json",
    )
    p.add_argument(
        "--label-names",
        default=None,
        metavar="V=NAME,...",
        help="label names on the command line, e.g. 1=tumour,2=edema (override --labels for those values)",
    )
    p.add_argument(
        "--regions",
        default=None,
        help="regions merging classes: YAML/JSON file or inline JSON, e.g. '{\"whole_tumour\": [1, 2, 3, 4]}'",
    )
    p.add_argument("--images", default=None, help="images folder (<case>_0000.nii.gz or <case>.nii.gz) for overlays")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26, help="lesion connectivity (default 26)")
    p.add_argument(
        "--lesion-iou",
        type=float,
        default=0.1,
        help="a lesion is detected when its match has IoU above this (default 0.1; 0 = any overlap)",
    )
    p.add_argument(
        "--resample-to-ref",
        action="store_true",
        help="resample predictions on another grid onto the reference grid (nearest neighbour) instead of skipping",
    )
    p.add_argument("--max-overlays", type=int, default=8, help="overlay images of the N worst cases (default 8)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any input problem was found")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``medseg evaluate`` with parsed arguments; returns the exit code."""
    from medseg.evaluate.api import Problem, evaluate_folders
    from medseg.evaluate.inputs import load_label_names, load_regions, parse_label_names

    label_names: dict[int, str] | None = None
    regions: dict[str, list[Any]] = {}
    if args.labels:
        label_names, dataset_regions = load_label_names(args.labels)
        regions.update(dataset_regions)
    if getattr(args, "label_names", None):
        label_names = {**(label_names or {}), **parse_label_names(args.label_names)}
    if args.regions:
        regions.update(load_regions(args.regions))

    def on_problem(problem: Problem) -> None:
        print(f"medseg evaluate: problem [{problem.kind}]: {problem}", file=sys.stderr)

    summary = evaluate_folders(
        args.pred,
        args.ref,
        out_dir=args.out,
        label_names=label_names,
        images=args.images,
        max_overlays=args.max_overlays,
        overwrite=args.overwrite,
        regions=regions or None,
        tolerance_mm=args.tolerance_mm,
        connectivity=args.connectivity,
        match_iou=args.lesion_iou,
        resample_to_ref=args.resample_to_ref,
        on_problem=on_problem,
    )
    for group in ("classes", "regions"):
        for name, stats in (summary.get(group) or {}).items():
            dice = stats["dice"]
            if not dice["n"]:
                continue
            hd95, nsd = stats.get("hd95_mm") or {}, stats.get("nsd") or {}
            suffix = " (region)" if group == "regions" else ""
            print(
                f"{name + suffix:<24} Dice {_f(dice['mean'])}  HD95 {_f(hd95.get('median'), 2)} mm (median)  "
                f"NSD@{args.tolerance_mm:g}mm {_f(nsd.get('mean'))}  (n={dice['n']})"
            )
    report = Path(args.out) / "report.html"
    mean = _f(summary.get("mean_foreground_dice"))
    print(f"mean foreground Dice {mean}; {summary['n_cases']} case(s); report: {report}")
    n_problems = int(summary.get("n_problems", 0))
    if n_problems:
        print(f"medseg evaluate: {n_problems} input problem(s), listed in {report}", file=sys.stderr)
    if summary["n_cases"] == 0:
        print("medseg evaluate: no case could be evaluated", file=sys.stderr)
        return 1
    return 1 if args.strict and n_problems else 0


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"
