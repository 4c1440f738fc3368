"""The ``medseg`` command: one entry point, one subcommand per job.

Errors are printed as one line naming the file and the reason (exit code 2); add
``--debug`` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

__all__ = ["build_parser", "main"]


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from medseg.io import discover_series, load_volume

    path = Path(args.input)
    if path.is_dir():
        series = discover_series(path)
        if not series:
            raise MedsegError(f"{path}: no DICOM image series found")
        for s in series:
            print(f"series {s.uid or '<empty UID>'}  {s.modality}  '{s.description}'  {len(s.files)} file(s)")
        if len(series) > 1:
            return 0
    volume = load_volume(path)
    g = volume.geometry
    array = volume.array
    info: dict[str, Any] = {
        "path": str(path),
        "channels": volume.channels,
        "dtype": str(array.dtype),
        **g.to_dict(),
        "value_range": [float(np.min(array)), float(np.max(array))],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{path}")
    print(f"  shape        {g.shape}  ({volume.channels} channel(s), {array.dtype})")
    print(f"  spacing      {tuple(round(s, 6) for s in g.spacing)} mm")
    print(f"  origin (LPS) {tuple(round(o, 4) for o in g.origin)} mm")
    print("  direction    " + "  ".join("(" + ", ".join(f"{v:+.6f}" for v in row) + ")" for row in g.direction))
    print(f"  orientation  {g.orientation} (RAS+ axis codes)")
    print(f"  value range  [{info['value_range'][0]:g}, {info['value_range'][1]:g}]")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.train.loop import train

    overrides = {"train.iterations": args.iterations} if args.iterations else None
    config = load_config(args.config, overrides=overrides)
    out = train(args.dataset, config=config, out_dir=args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"model written to {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medseg.infer.predictor import Predictor
    from medseg.infer.run import predict_to_folder

    predictor = Predictor(args.model, progress=False)
    records = predict_to_folder(predictor, args.inputs, args.out, overwrite=args.overwrite, progress=not args.quiet)
    for r in records:
        if r["status"] == "done":
            print(f"{r['case']}: {r['output']}  ({r['seconds']:.2f} s)")
        else:
            print(f"{r['case']}: FAILED: {r['error']}", file=sys.stderr)
    failed = sum(r["status"] != "done" for r in records)
    print(f"{len(records) - failed} case(s) written to {args.out}, {failed} failed")
    return 1 if failed else 0


def _label_names(path: str | None) -> dict[int, str] | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and (p / "plan.yaml").is_file():
        from medseg.data.plan import load_plan

        return {k: v for k, v in load_plan(p / "plan.yaml").labels.items() if k}
    from medseg.data.datasets import _parse_labels

    meta_path = p / "dataset.json" if p.is_dir() else p
    try:
        raw = json.loads(meta_path.read_text()).get("labels")
    except (OSError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{meta_path}: cannot read label names ({exc})") from exc
    return {k: v for k, v in _parse_labels(meta_path, raw).items() if k}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluate import evaluate_folders

    summary = evaluate_folders(
        args.pred,
        args.ref,
        out_dir=args.out,
        label_names=_label_names(args.labels),
        images=args.images,
        overwrite=args.overwrite,
    )
    for name, stats in summary.get("classes", {}).items():
        print(f"{name:<16} Dice {stats['dice']['mean']:.4f}  (n={stats['dice']['n']})")
    print(f"mean foreground Dice {summary['mean_foreground_dice']:.4f}; report in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.demo import default_demo_config, run_demo

    config = load_config(args.config) if args.config else default_demo_config()
    if args.iterations:
        config.train.iterations = args.iterations
    result = run_demo(args.out, config=config, data=args.data, overwrite=args.overwrite, progress=not args.quiet)
    return 0 if result["mean_foreground_dice"] == result["mean_foreground_dice"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medseg`` command."""
    parser = argparse.ArgumentParser(prog="medseg", description="3D medical image segmentation with exact geometry.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, predict and evaluate on the embedded phantom data (CPU, minutes)")
    p.add_argument("--out", default="demo_output", help="output folder (default: ./demo_output)")
    p.add_argument("--data", default=None, help="dataset folder with imagesTs/labelsTs (default: sample data)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="geometry and value range of a volume, or the series in a DICOM folder")
    p.add_argument("input")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train a model on an MSD / nnU-Net dataset folder")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="segment volumes / DICOM series with a model directory")
    p.add_argument("inputs", nargs="+", help="files (<case>_0000.nii.gz ...), folders of them, or DICOM folders")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="Dice/IoU/volumes per case and class, with a report")
    p.add_argument("--pred", required=True, help="folder of predicted label volumes or one file")
    p.add_argument("--ref", required=True, help="folder of reference label volumes or one file")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--labels", default=None, help="dataset.json, dataset folder or model directory for label names")
    p.add_argument("--images", default=None, help="images folder for overlays")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MedsegError as exc:
        if args.debug:
            raise
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
