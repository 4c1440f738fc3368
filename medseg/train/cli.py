"""``medseg plan`` and ``medseg train`` sub-commands.

``medseg`` registers them with :func:`add_plan_parser` / :func:`add_train_parser`; this
module also runs stand-alone (``python -m medseg.train.cli train ...``), e.g. under
``torchrun --nproc_per_node=2 -m medseg.train.cli train DATASET --out model``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError, OutputExistsError

__all__ = ["add_plan_parser", "add_train_parser", "main"]

_DATASET_HELP = "dataset folder (dataset.json + imagesTr/labelsTr), dataset .yaml (files or DICOM series) or .csv"


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.data.datasets import dataset_inputs, load_dataset, validate_dataset
    from medseg.data.plan import make_plan, save_plan
    from medseg.io.paths import check_output_file, refuse_input_overlap

    out = Path(args.out)
    refuse_input_overlap([out], [args.dataset, args.config], what="plan file")
    check_output_file(out, what="plan file")
    if out.exists() and not args.overwrite:
        raise OutputExistsError(out)
    config = load_config(args.config)
    info = load_dataset(args.dataset)
    refuse_input_overlap([out], dataset_inputs(info), what="plan file")
    report = validate_dataset(info, seed=config.seed, group_pattern=config.train.group_pattern, progress=not args.quiet)
    report.raise_for_problems()
    print(report.format())
    plan = make_plan(info, config, scans=report.scans)
    save_plan(plan, out, overwrite=args.overwrite)
    net = plan.network
    norms = ", ".join(
        f"{c.name}: {c.scheme}" + (f" ({c.region})" if c.scheme == "zscore" else "") for c in plan.channels
    )
    print(f"target spacing {[round(s, 4) for s in plan.target_spacing]} mm ({plan.orientation})")
    print(f"normalisation  {norms}")
    print(f"patch {list(plan.patch_size)}, batch {plan.batch_size}")
    print(f"network {net.name}: channels {list(net.channels)}, strides {[_short(s) for s in net.strides]}")
    print(f"plan written to {out}")
    return 0


def _short(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.iterations:
        overrides["train.iterations"] = args.iterations
    if args.fold is not None:
        overrides["train.fold"] = args.fold
    if args.folds is not None:
        overrides["train.folds"] = args.folds
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.io.paths import refuse_input_overlap
    from medseg.train.loop import train

    overrides = _overrides(args)
    out = Path(args.out)
    refuse_input_overlap([out], [args.dataset, *([] if args.resume else [args.config, args.plan])], what="model folder")
    if args.resume:
        base = args.config or (out / "config.yaml")
        config = load_config(base, overrides=overrides) if (args.config or overrides) else None
    else:
        config = load_config(args.config, overrides=overrides)
    model = train(
        args.dataset,
        config=config,
        out_dir=out,
        plan=args.plan,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if _is_main_rank():
        import json

        metrics = json.loads((model / "metrics.json").read_text())
        if metrics.get("val_mean_dice") is not None:
            dice = ", ".join(f"{k} {v:.4f}" for k, v in {**metrics["val_dice"], **metrics["val_regions"]}.items())
            print(f"validation mean Dice {metrics['val_mean_dice']:.4f} ({dice})")
        print(f"model written to {model} ({metrics['train_seconds']:.0f} s training)")
    return 0


def add_plan_parser(subparsers: Any) -> None:
    """Register ``medseg plan DATASET -o plan.yaml``."""
    p = subparsers.add_parser(
        "plan", help="validate a dataset and write its training plan (spacing, normalisation, patch, network)"
    )
    p.add_argument("dataset", help=_DATASET_HELP)
    p.add_argument("-o", "--out", required=True, help="plan YAML to write")
    p.add_argument("--config", default=None, help="YAML config (preprocess/model sections guide the plan)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_plan)


def add_train_parser(subparsers: Any) -> None:
    """Register ``medseg train DATASET --out MODEL``."""
    p = subparsers.add_parser(
        "train",
        help="validate, plan and train a model (resumable; under torchrun: distributed)",
        description="Train a 3D U-Net. Run under `torchrun --nproc_per_node=N -m medseg.cli train ...` for DDP.",
    )
    p.add_argument("dataset", help=_DATASET_HELP)
    p.add_argument("--out", required=True, help="model directory to create (or to resume)")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--plan", default=None, help="plan YAML from `medseg plan` (possibly edited) instead of planning")
    p.add_argument("--fold", type=int, default=None, help="cross-validation fold to hold out (0-based)")
    p.add_argument("--folds", type=int, default=None, help="number of cross-validation folds (default 5)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory's files")
    p.add_argument("--quiet", action="store_true", help="no progress bars or reports")
    p.set_defaults(func=_cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point with just ``plan`` and ``train``."""
    parser = argparse.ArgumentParser(prog="medseg", description="medseg planning and training")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_plan_parser(sub)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MedsegError as exc:
        if args.debug:
            raise
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
