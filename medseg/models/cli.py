"""``medseg export``: the light parser (the handler imports torch when it runs)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_export_parser", "run_export"]


def add_export_parser(subparsers: Any) -> None:
    """Register ``medseg export`` on an argparse ``subparsers`` object."""
    from medseg.infer.cli import add_model_selection_arguments

    p = subparsers.add_parser(
        "export",
        help="export a model (medseg model directory, nnU-Net folder) to one ONNX or TorchScript file",
        description=(
            "Write the model's network (nnU-Net folds averaged in one graph) with everything inference needs "
            "(channels, normalisation, spacing, patch, labels) as metadata. `medseg predict --model FILE` runs it "
            "(ONNX through ONNX Runtime: pip install 'medseg[onnx]')."
        ),
    )
    p.add_argument(
        "model", help="medseg model directory or nnU-Net v2 results folder (Dataset*/Trainer__Plans__Config)"
    )
    p.add_argument(
        "--format",
        choices=["onnx", "torchscript"],
        default=None,
        help="onnx (file *.onnx) or torchscript (file *.pt / *.ts); default: from the --out suffix",
    )
    p.add_argument("--out", required=True, help="the file to write (.onnx, .pt or .ts)")
    add_model_selection_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``medseg export``: exit 0 once the file is written and checked."""
    from medseg.io.limits import format_bytes
    from medseg.models.export import export_model

    result = export_model(
        args.model, args.out, fmt=args.format, folds=args.folds, checkpoint=args.checkpoint, overwrite=args.overwrite
    )
    folds = f", {result.networks} folds averaged in the graph" if result.networks > 1 else ""
    print(
        f"{result.path}: {result.format} export, {format_bytes(result.bytes)}{folds}; self-check max |logit "
        f"difference| {result.max_abs_diff:.2e} (logits up to {result.max_abs_logit:.3g}), {result.seconds:.1f} s"
    )
    return 0
