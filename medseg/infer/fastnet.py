"""Rewrite a trained network for fast inference: reduced-precision weights and channels-last layout.

What PyTorch's eager CPU kernels (oneDNN underneath) do slowly for a 3D U-Net, and what this
module changes (the layout rewrite is exact; bf16 changes the logits by bf16 rounding, and the
argmax agreement with the float32 network is measured in ``benchmarks/bench_inference.py``):

* **bf16 weights instead of autocast.** Autocast converts every activation and weight to bf16
  at every call; casting the weights once and feeding bf16 windows removes those copies.  The
  normalisation layers still accumulate their statistics in float32 inside PyTorch's kernels.
* **Channels-last 3D.** oneDNN's bf16 convolutions (AMX / AVX-512 BF16) are faster in the
  ``NDHWC`` layout, most of all for the few-channel layers at full resolution (the class
  logits).  PyTorch's instance norm and group norm, however, handle that layout by copying
  (or, for few channels, very slowly), so :class:`ContiguousNorm` runs them on a contiguous
  copy and hands the result back channels-last.

:func:`prepare_network` applies them; ``benchmarks/bench_inference.py`` measures each.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ContiguousNorm", "network_dtype", "prepare_network"]

_LAYOUT_SENSITIVE_NORMS = (nn.InstanceNorm3d, nn.GroupNorm)


class ContiguousNorm(nn.Module):
    """Run a normalisation layer on a contiguous tensor and return the input's memory format.

    Args:
        norm: The layer to wrap (instance or group norm: the statistics are per sample).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` in any memory format -> normalised, same shape and memory format."""
        if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
            return self.norm(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)
        return self.norm(x)


def _wrap_norms(module: nn.Module) -> nn.Module:
    """Wrap layout-sensitive norms in :class:`ContiguousNorm`, in place (recursively)."""
    if isinstance(module, _LAYOUT_SENSITIVE_NORMS):
        return ContiguousNorm(module)
    for name, child in module.named_children():
        new = _wrap_norms(child)
        if new is not child:
            setattr(module, name, new)
    return module


def prepare_network(
    network: nn.Module,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> nn.Module:
    """A copy of ``network`` set up for inference; the original is not modified.

    Args:
        network: Maps ``(N, C, X, Y, Z)`` to ``(N, K, X, Y, Z)``.
        device: Where the copy lives.
        dtype: Dtype of its parameters and buffers (``torch.bfloat16`` for bf16 inference
            without autocast; the input must then be bf16 too, see :func:`network_dtype`).
        channels_last: Put it in the channels-last-3d memory format, with layout-sensitive
            norms wrapped in :class:`ContiguousNorm`.

    Returns:
        The rewritten copy in eval mode, gradients off.
    """
    net = copy.deepcopy(network)
    if channels_last:
        net = _wrap_norms(net)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(device=torch.device(device), dtype=dtype)
    net = net.to(memory_format=fmt)  # type: ignore[call-overload]
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def network_dtype(network: nn.Module) -> torch.dtype:
    """Dtype of the first floating-point parameter (float32 for a network without parameters)."""
    for param in network.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
