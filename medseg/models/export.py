"""``medseg export``: any model medseg runs -> one ONNX or TorchScript file that medseg runs again.

The file holds the plain network forward on one window, ``(n, C, *patch) -> (n, K, *patch)`` with a
dynamic batch dimension and the spatial size fixed to the model's patch (the sliding window always feeds
patch-sized windows: smaller images are padded first), and the metadata document of
:mod:`medseg.models.adapters.exported`.  Everything around the network stays in medseg: preprocessing,
window placement and blending, test-time mirroring (flipped inputs through the same graph), resampling
back and label decoding, so ``medseg predict --model FILE`` gives the source model's labels.

**Folds.** An nnU-Net model with several folds is exported as one graph returning the mean of the fold
networks' logits, :class:`FoldMean`.  That is exact: nnU-Net (and medseg for the folder) averages the fold
predictions, and every step between the network and that average is linear in the logits - per window
the mean over mirrorings, then Gaussian blending (a weighted sum of the windows divided by the summed
weights, the same weights for every fold).  So ``blend(mean_k net_k) = mean_k blend(net_k)``, and medseg
already averages the networks per window (:class:`medseg.infer.sliding_window.WindowPredictor`); the
exported graph only moves that mean inside it (float rounding of the summation order aside).

**ONNX** uses PyTorch's TorchScript-based exporter (``dynamo=False``: fast, offline, no ``onnxscript``),
opset 17; **TorchScript** uses ``torch.jit.trace``.  Before writing, the exported graph is run on a random
two-window batch next to the torch network: a maximum logit difference above :data:`CHECK_RTOL` of the
logits' range is an error (nothing written).
"""

from __future__ import annotations

import copy
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import medseg
from medseg.errors import ModelError, OutputExistsError
from medseg.io.images import atomic_path
from medseg.io.paths import check_output_file, refuse_input_overlap
from medseg.models.adapters import ModelAdapter, open_model
from medseg.models.adapters.exported import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    TORCHSCRIPT_EXTRA,
    ExportFormat,
    export_format,
    first_line,
    metadata_document,
    require_onnx,
)
from medseg.types import PathLike

__all__ = ["CHECK_RTOL", "ExportResult", "FoldMean", "export_model"]

#: Largest tolerated |exported - torch| logit difference in the self-check, relative to max |logit| (>= 1).
CHECK_RTOL = 1e-3
#: ONNX opset of the exported graphs.
OPSET = 17


class FoldMean(nn.Module):
    """The mean of several networks' logits: ``(n, C, *patch) -> (n, K, *patch)`` (see the module docstring).

    Args:
        networks: Networks with the same input and output channels.
    """

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the networks' logits on ``x``."""
        out = self.nets[0](x)
        for net in self.nets[1:]:
            out = out + net(x)
        return out / len(self.nets) if len(self.nets) > 1 else out


@dataclass
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        path: The file.
        format: ``onnx`` or ``torchscript``.
        networks: Networks (folds) averaged in the graph.
        bytes: File size.
        max_abs_diff: Largest |exported - torch| logit difference in the self-check.
        max_abs_logit: Largest |logit| of the torch network in the self-check.
        seconds: Time taken.
    """

    path: Path
    format: ExportFormat
    networks: int
    bytes: int
    max_abs_diff: float
    max_abs_logit: float
    seconds: float


def _resolve_format(out: Path, fmt: str | None) -> ExportFormat:
    by_suffix = export_format(out)
    if fmt is None:
        if by_suffix is None:
            raise ModelError(f"{out}: give --format onnx|torchscript or name the file .onnx / .pt / .ts")
        return by_suffix
    if fmt not in ("onnx", "torchscript"):
        raise ModelError(f"--format must be onnx or torchscript, got {fmt!r}")
    if by_suffix != fmt:
        wanted = ".onnx" if fmt == "onnx" else ".pt or .ts"
        raise ModelError(f"{out}: a {fmt} export must be named *{wanted} (medseg recognises exports by suffix)")
    return fmt  # type: ignore[return-value]


def _graph_module(adapter: ModelAdapter) -> tuple[nn.Module, int]:
    """A frozen float32 CPU copy of the adapter's network(s), folds averaged (:class:`FoldMean`)."""
    networks = [copy.deepcopy(net).float().cpu().eval() for net in adapter.load_networks()]
    module = networks[0] if len(networks) == 1 else FoldMean(networks).eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module, len(networks)


def _example(adapter: ModelAdapter, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, adapter.num_channels, *adapter.window.patch_size), generator=generator)


def _onnx_bytes(module: nn.Module, example: torch.Tensor, document: dict[str, Any], path: Path) -> bytes:
    onnx, _ = require_onnx("medseg export --format onnx")
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript-based exporter writes to file objects
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types for unsupported operators
        raise ModelError(f"{path}: ONNX export of the network failed ({first_line(exc)})") from None
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(document, sort_keys=True)
    model.producer_name = "medseg"
    model.producer_version = medseg.__version__
    model.doc_string = "medseg export: run with `medseg predict --model FILE` (metadata_props['medseg_export'])"
    data: bytes = model.SerializeToString()
    return data


def _torchscript_bytes(module: nn.Module, example: torch.Tensor, document: dict[str, Any], path: Path) -> bytes:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (example,), check_trace=False)
    except Exception as exc:
        raise ModelError(f"{path}: TorchScript tracing of the network failed ({first_line(exc)})") from None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(document, sort_keys=True)})
    return buffer.getvalue()


def _run_exported(tmp: Path, x: torch.Tensor) -> torch.Tensor:
    """The written file's logits on ``x``, through the adapter that ``medseg predict`` uses."""
    from medseg.models.adapters.exported import ExportedModel

    (network,) = ExportedModel(tmp).load_networks()
    with torch.no_grad():
        out: torch.Tensor = network(x)
    return out


def export_model(
    model: PathLike | ModelAdapter,
    out: PathLike,
    *,
    fmt: str | None = None,
    folds: str | None = None,
    checkpoint: str = "final",
    overwrite: bool = False,
) -> ExportResult:
    """Export a model to one ONNX or TorchScript file that ``medseg predict --model FILE`` runs.

    Args:
        model: Anything :func:`~medseg.models.adapters.open_model` opens.
        out: The file (``.onnx`` for ONNX, ``.pt`` / ``.ts`` for TorchScript).
        fmt: ``onnx`` or ``torchscript``; default from the suffix of ``out``.
        folds: nnU-Net folds (as ``medseg predict --folds``), averaged in the graph.
        checkpoint: nnU-Net ``final`` or ``best``.
        overwrite: Replace an existing ``out``.

    Returns:
        What was written, with the self-check's logit difference.

    Raises:
        ModelError: Unknown format, a network the exporter cannot convert, a self-check failure, or a
            missing ``medseg[onnx]`` extra.
        OutputPathError: ``out`` is, or lies inside, the model; or cannot be written.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    out_path = Path(out)
    form = _resolve_format(out_path, fmt)
    source = model.path if isinstance(model, ModelAdapter) else Path(model)
    refuse_input_overlap([out_path], [source], what="output file")  # first: whatever is installed
    if form == "onnx":
        require_onnx("medseg export --format onnx")
    check_output_file(out_path)
    if out_path.exists() and not overwrite:
        raise OutputExistsError(out_path)  # before the (possibly long) export; atomic_path checks again
    adapter = open_model(model, folds=folds, checkpoint=checkpoint)  # type: ignore[arg-type]
    module, networks = _graph_module(adapter)
    exporter = {"medseg": medseg.__version__, "torch": torch.__version__.split("+")[0]}
    document = metadata_document(adapter, fmt=form, networks=networks, exporter=exporter)
    example = _example(adapter, 1, seed=0)
    data = (_onnx_bytes if form == "onnx" else _torchscript_bytes)(module, example, document, out_path)
    check = _example(adapter, 2, seed=1)  # two windows: the batch dimension is dynamic
    with torch.no_grad():
        expected = module(check)
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
        got = _run_exported(tmp, check)
        diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        scale = float(expected.abs().max())
        if not diff <= CHECK_RTOL * max(scale, 1.0):
            raise ModelError(
                f"{out_path}: the exported graph disagrees with the network (max |logit difference| {diff:.3g} "
                f"for logits up to {scale:.3g}; shapes {list(got.shape)} vs {list(expected.shape)}); nothing written"
            )
    return ExportResult(
        path=out_path,
        format=form,
        networks=networks,
        bytes=len(data),
        max_abs_diff=diff,
        max_abs_logit=scale,
        seconds=round(time.perf_counter() - t0, 3),
    )
