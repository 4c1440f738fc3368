"""``medseg predict``: segment files and DICOM folders with one model or an ensemble.

Every inference setting of the model's ``config.infer`` can be overridden on the
command line; the settings used are written to ``prediction.yaml`` beside the outputs
together with per-case status and timings.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = [
    "add_inference_arguments",
    "add_model_selection_arguments",
    "add_predict_parser",
    "infer_overrides",
    "run_predict",
]


def _mirror_axes(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        axes = tuple(int(a) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated axes like 0,1,2 or 'none', got {text!r}") from None
    if any(a not in (0, 1, 2) for a in axes):
        raise argparse.ArgumentTypeError(f"mirror axes are 0, 1, 2, got {text!r}")
    return axes


def add_model_selection_arguments(p: argparse.ArgumentParser) -> None:
    """``--folds`` and ``--checkpoint`` (nnU-Net model folders), shared by predict, batch and pacs run."""
    p.add_argument(
        "--folds",
        default=None,
        help="nnU-Net folds to ensemble, e.g. 0,1,2 or all (the fold_all model); default: every fold found",
    )
    p.add_argument(
        "--checkpoint",
        choices=["final", "best"],
        default="final",
        help="nnU-Net checkpoint: checkpoint_final.pth (default) or checkpoint_best.pth",
    )


def _outputs(text: str) -> tuple[str, ...]:
    from medseg.infer.writers import parse_output_list

    try:
        return parse_output_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_inference_arguments(p: argparse.ArgumentParser, *, device_help: str | None = None) -> None:
    """The inference options shared by ``medseg predict`` and ``medseg batch`` (read by :func:`infer_overrides`).

    Sliding window (overlap, blending, windows per pass, mirroring, body crop), device (device,
    precision, threads) and post-processing; unset options keep the model's ``config.infer``.
    """
    g = p.add_argument_group("sliding window (default: the model's config.infer)")
    g.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1) (default: model's, 0.5)")
    g.add_argument("--blend", choices=["gaussian", "constant"], default=None, help="window blending")
    g.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    g.add_argument(
        "--mirror-axes", type=_mirror_axes, default=None, help="test-time mirroring axes, e.g. 0,1,2 or none"
    )
    g.add_argument(
        "--body-crop",
        choices=["windows", "box", "none"],
        default=None,
        help="windows (default): skip windows outside the body box, same result inside; box: crop to the body "
        "box and re-tile it (fewer windows, slightly different tiling); none: run every window. nnU-Net "
        "folders: windows (and box) skip nnU-Net's windows that see only air, same result on the body",
    )
    g = p.add_argument_group("device")
    g.add_argument("--device", default=None, help=device_help or "auto (default), cpu, cuda, cuda:N")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=None,
        help="auto (default): bf16 where native (bf16 weights on CPU, AMP on CUDA), else fp32",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("post-processing (on the input grid, per class)")
    g.add_argument("--largest-component", action="store_true", help="keep only the largest component of each class")
    g.add_argument("--min-component-mm3", type=float, default=None, help="remove components smaller than this (mm³)")
    g.add_argument("--fill-holes", action="store_true", help="fill background cavities enclosed by a class")


def add_predict_parser(subparsers: Any) -> None:
    """Register ``medseg predict`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "predict",
        help="segment volumes / DICOM series with a model (medseg model directory, nnU-Net folder) or an ensemble",
        description=(
            "Segment NIfTI/NRRD/MHA files (<case>_0000.nii.gz ... for multi-channel models), folders of them, "
            "or DICOM series folders. Labels are written on each input's own grid; prediction.yaml records "
            "settings, per-case status and timings. Unset options use the model's config.infer."
        ),
    )
    p.add_argument("inputs", nargs="+", help="files (<case>_0000.nii.gz ...), folders of them, or DICOM folders")
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="medseg model directory or nnU-Net v2 results folder (Dataset*/Trainer__Plans__Config); "
        "repeat to ensemble several models (logits averaged)",
    )
    add_model_selection_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--series",
        default=None,
        metavar="NUMBER|UID",
        help="DICOM folders holding several series: segment this one (SeriesNumber, SeriesInstanceUID or the key"
        " `medseg info FOLDER` shows)",
    )
    p.add_argument(
        "--outputs",
        type=_outputs,
        default=("nifti",),
        help="comma-separated: nifti (<case><suffix>), seg (<case>_seg.dcm, DICOM SEG), rtstruct"
        " (<case>_rtstruct.dcm), json (<case>_volumes.json: mL per class); default nifti. SEG/RTSTRUCT need a DICOM"
        " series input; each output is written independently",
    )
    p.add_argument("--seg-type", choices=("binary", "labelmap"), default="binary", help="DICOM SEG encoding")
    p.add_argument("--suffix", default=".nii.gz", help="label file format: .nii.gz (default), .nii, .nrrd, .mha")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_inference_arguments(p)
    g = p.add_argument_group("probabilities")
    g.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <case>_probabilities.nii.gz (X, Y, Z, K) on the input grid",
    )
    g.add_argument(
        "--probabilities-dtype",
        choices=["uint8", "uint16", "float32"],
        default="uint8",
        help="uint8 (default) / uint16 are scaled with the NIfTI scl_slope so readers see [0, 1]",
    )
    p.set_defaults(func=run_predict)


def infer_overrides(args: argparse.Namespace, *, device: bool = True) -> dict[str, Any]:
    """``InferConfig`` fields set on the command line (:func:`add_inference_arguments`).

    Args:
        args: Parsed arguments.
        device: Include ``--device`` (batch passes it separately, as torchrun ranks pick their GPU).
    """
    values: dict[str, Any] = {
        "overlap": args.overlap,
        "blend": args.blend,
        "sw_batch_size": args.batch_size,
        "mirror_axes": args.mirror_axes,
        "device": args.device if device else None,
        "precision": args.precision,
        "threads": args.threads,
        "min_component_mm3": args.min_component_mm3,
    }
    if args.body_crop:
        values["body_crop"] = args.body_crop
    if args.largest_component:
        values["keep_largest_component"] = True
    if args.fill_holes:
        values["fill_holes"] = True
    return {k: v for k, v in values.items() if v is not None}


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``medseg predict``: exit 0 when every case succeeded, 1 otherwise."""
    from pydantic import ValidationError

    from medseg.config import InferConfig
    from medseg.errors import ConfigError
    from medseg.infer.predictor import Predictor
    from medseg.infer.run import predict_to_folder
    from medseg.io.paths import check_output_dir, refuse_input_overlap
    from medseg.models.adapters import open_model

    refuse_input_overlap([args.out], [*args.inputs, *args.model], what="output folder")  # before any work
    check_output_dir(args.out)
    models = [open_model(m, folds=args.folds, checkpoint=args.checkpoint) for m in args.model]
    try:
        infer = InferConfig.model_validate({**models[0].infer_defaults.model_dump(), **infer_overrides(args)})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"medseg predict options: {problems}") from None
    predictor = Predictor(models, infer=infer, progress=not args.quiet)
    records = predict_to_folder(
        predictor,
        args.inputs,
        args.out,
        overwrite=args.overwrite,
        suffix=args.suffix,
        progress=not args.quiet,
        probabilities=args.probabilities_dtype if args.save_probabilities else None,
        outputs=args.outputs,
        series=args.series,
        seg_type=args.seg_type,
    )
    counts = {"done": 0, "partial": 0, "exists": 0, "failed": 0}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        files = [
            f for entry in (r.get("outputs") or {}).values() if not entry.get("kept") for f in entry.get("files", [])
        ]
        if r["status"] in ("done", "partial"):
            print(f"{r['case']}: {', '.join(files)}  ({r['seconds']:.2f} s)")
        if r["status"] == "partial":
            print(f"{r['case']}: PARTIAL: {r['error']}", file=sys.stderr)
        elif r["status"] == "exists":
            print(f"{r['case']}: skipped: {r['error']}", file=sys.stderr)
        elif r["status"] == "failed":
            print(f"{r['case']}: FAILED: {r['error']}", file=sys.stderr)
    print(
        f"{counts['done'] + counts['partial']} case(s) written to {args.out} ({counts['partial']} with failed outputs),"
        f" {counts['exists']} skipped (outputs exist), {counts['failed']} failed"
    )
    return 1 if counts["failed"] or counts["partial"] or counts["exists"] else 0
