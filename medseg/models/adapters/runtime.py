"""The networks of exported files: an ONNX Runtime session or a TorchScript module as an ``nn.Module``.

Imported only when an :class:`~medseg.models.adapters.exported.ExportedModel` loads its network (torch).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ModelError
from medseg.models.adapters.exported import (
    ExportMetadata,
    first_line,
    onnx_model_proto,
    read_model_bytes,
    require_onnx,
)

__all__ = ["OnnxNetwork", "OutputCheck", "onnx_network", "torchscript_network"]


class OnnxNetwork(nn.Module):
    """An ONNX Runtime session as a module: ``(n, C, x, y, z)`` tensor -> ``(n, K, x, y, z)`` float32.

    Inputs of any dtype, device or memory format run as contiguous float32 on the CPU; the logits come
    back on the input's device.  Copies share the session (``copy.deepcopy`` returns the module itself: a
    session holds no per-call state and has no parameters to cast), so the predictor's preparation step
    (:func:`medseg.infer.fastnet.prepare_network`) leaves it as it is.

    Args:
        session: An ``onnxruntime.InferenceSession`` with one input and one output.
        input_name: The graph input.
        output_name: The graph output.
    """

    def __init__(self, session: Any, *, input_name: str, output_name: str) -> None:
        super().__init__()
        self.session = session
        self.input_name = input_name
        self.output_name = output_name

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxNetwork:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, x, y, z)`` -> ``(n, K, x, y, z)`` float32 logits on ``x.device``."""
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)


class OutputCheck(nn.Module):
    """A network whose number of output channels is checked against the metadata at every call.

    Args:
        inner: Maps ``(n, C, x, y, z)`` to ``(n, K, x, y, z)``.
        outputs: ``K`` the metadata declares.
        source: The file (named in the error).
    """

    def __init__(self, inner: nn.Module, *, outputs: int, source: str) -> None:
        super().__init__()
        self.inner = inner
        self.outputs = outputs
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner network's logits, or a :class:`ModelError` when their shape is not ``(n, K, ...)``."""
        out = self.inner(x)
        if not isinstance(out, torch.Tensor) or out.ndim != x.ndim or out.shape[1] != self.outputs:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"{self.source}: not a medseg export: the network gives {got}, the metadata declares "
                f"{self.outputs} output channels"
            )
        return out


def onnx_network(path: Path, meta: ExportMetadata) -> OnnxNetwork:
    """An :class:`OnnxNetwork` for the file (CPU, torch's thread count), its graph checked against ``meta``.

    Raises:
        ModelError: ONNX Runtime cannot load the graph, or its input/output shapes differ from ``meta``.
    """
    _, ort = require_onnx(f"{path}: an ONNX model")
    data = read_model_bytes(path)
    onnx_model_proto(path, data)  # external data refused before the runtime sees the bytes
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(
            f"{path}: not a medseg export: ONNX Runtime cannot load the graph ({first_line(exc)})"
        ) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path}: not a medseg export: the graph has {len(inputs)} inputs and {len(outputs)} outputs")
    expected_in = [len(meta.channels), *meta.window.patch_size]
    shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
    if len(shape_in) != 5 or shape_in[1:] != expected_in:
        raise ModelError(
            f"{path}: not a medseg export: the graph takes {shape_in}, the metadata declares [batch, {expected_in}]"
        )
    if len(shape_out) != 5 or shape_out[1] != meta.output.num_outputs:
        raise ModelError(
            f"{path}: not a medseg export: the graph gives {shape_out}, the metadata declares "
            f"{meta.output.num_outputs} output channels"
        )
    return OnnxNetwork(session, input_name=inputs[0].name, output_name=outputs[0].name)


def torchscript_network(path: Path, meta: ExportMetadata) -> OutputCheck:
    """The TorchScript module (CPU, eval, no gradients) wrapped in :class:`OutputCheck`.

    Raises:
        ModelError: ``torch.jit.load`` fails (corrupt or foreign archive).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and others for corrupt archives
        raise ModelError(
            f"{path}: not a medseg export: cannot load the TorchScript archive ({first_line(exc)})"
        ) from None
    for param in net.parameters():
        param.requires_grad_(False)
    net.eval()
    return OutputCheck(net, outputs=meta.output.num_outputs, source=str(path))
