"""The ``medseg`` command: one entry point, one subcommand per job.

Errors are printed as one line naming the file and the reason (exit code 2); add
``--debug`` for the traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from medseg.errors import run_reporting_errors

__all__ = ["build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.demo import default_demo_config, run_demo
    from medseg.io.paths import refuse_input_overlap

    refuse_input_overlap([args.out], [args.data, args.config], what="output folder")
    config = load_config(args.config) if args.config else default_demo_config()
    if args.iterations:
        config.train.iterations = args.iterations
    result = run_demo(args.out, config=config, data=args.data, overwrite=args.overwrite, progress=not args.quiet)
    return 0 if result["mean_foreground_dice"] == result["mean_foreground_dice"] else 1


def _add_convert(sub: Any) -> None:
    """``convert``: DICOM series / volumes -> NIfTI, plus annotations (RTSTRUCT, polygons, label -> RTSTRUCT)."""
    from medseg.io.cli import add_annotation_arguments, add_convert_parser

    add_convert_parser(sub)
    parser = sub.choices["convert"]
    add_annotation_arguments(parser)
    convert_series = parser.get_default("func")

    def run(args: argparse.Namespace) -> int:
        from medseg.io.annotations import convert_annotation

        code = convert_annotation(args)
        return convert_series(args) if code is None else code

    parser.set_defaults(func=run)


def _register_stage_commands(sub: Any) -> None:
    """Subcommands implemented next to their stage, in the order of the data flow.

    The modules imported here only build parsers; each handler imports its stage (torch, MONAI,
    pydicom, ...) when its subcommand runs, so ``medseg --help`` and ``medseg info`` start fast
    (``tests/test_cli_startup.py`` guards this).
    """
    from medseg.batch.cli import add_batch_parser
    from medseg.evaluate.cli import add_evaluate_parser
    from medseg.infer.cli import add_predict_parser
    from medseg.io.cli import add_info_parser
    from medseg.models.cli import add_export_parser
    from medseg.pacs.cli import add_listen_parser, add_pacs_parser
    from medseg.train.cli import add_plan_parser, add_train_parser

    add_info_parser(sub)
    _add_convert(sub)
    add_plan_parser(sub)
    add_train_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    add_evaluate_parser(sub)
    add_batch_parser(sub)
    add_pacs_parser(sub)
    add_listen_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``medseg`` command."""
    parser = argparse.ArgumentParser(prog="medseg", description="3D medical image segmentation with exact geometry.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--max-input-gb",
        type=float,
        default=None,
        help="largest decoded volume a header may declare (default 16 GiB); larger declarations are refused",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, predict and evaluate on the embedded phantom data (CPU, minutes)")
    p.add_argument("--out", default="demo_output", help="output folder (default: ./demo_output)")
    p.add_argument("--data", default=None, help="dataset folder with imagesTs/labelsTs (default: sample data)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    _register_stage_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_input_gb is not None:
        from medseg.io.limits import set_read_limits

        set_read_limits(max_volume_bytes=int(args.max_input_gb * 1024**3))
    return run_reporting_errors(lambda: args.func(args), command=f"medseg {args.command}", debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
