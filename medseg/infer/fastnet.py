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
  (or, for few channels, very slowly), so :class:`ChannelsLastNorm` computes them as a
  per-sample batch norm (multiples of 16 channels) or on a contiguous copy (the rest).

:func:`prepare_network` applies them; ``benchmarks/bench_inference.py`` measures each.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelsLastNorm", "network_dtype", "prepare_network"]

_LAYOUT_SENSITIVE_NORMS = (nn.InstanceNorm3d, nn.GroupNorm)


class ChannelsLastNorm(nn.Module):
    """Instance/group norm for channels-last inputs, by the fastest exact route PyTorch's CPU kernels offer.

    * Instance norm (or group norm with one channel per group) with a multiple of 16 channels:
      ``batch_norm`` in training mode on each sample.  For one sample its statistics over
      ``(N, X, Y, Z)`` are the instance statistics, and PyTorch's channels-last batch-norm
      kernel is vectorised over the channels (measured 4-10x faster than a layout round trip).
    * Otherwise (few channels, where that kernel is slow, or true group norm): the wrapped layer
      on a contiguous copy, handed back channels-last.

    Args:
        norm: The layer to wrap (``InstanceNorm3d`` or ``GroupNorm``).
    """

    #: Channel counts the channels-last batch-norm kernel handles fast (vector width in bf16).
    CHANNEL_MULTIPLE = 16

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def _per_channel(self) -> bool:
        norm = self.norm
        if isinstance(norm, nn.InstanceNorm3d):
            channels = norm.num_features
            return not norm.track_running_stats and channels % self.CHANNEL_MULTIPLE == 0
        if isinstance(norm, nn.GroupNorm):
            return norm.num_groups == norm.num_channels and norm.num_channels % self.CHANNEL_MULTIPLE == 0
        return False

    def _batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        eps = float(norm.eps)  # type: ignore[arg-type]
        outs = [F.batch_norm(x[i : i + 1], None, None, weight, bias, True, 0.0, eps) for i in range(x.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs).contiguous(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, X, Y, Z)`` in any memory format -> normalised, same shape and memory format."""
        if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
            if self._per_channel():
                return self._batch_norm(x)
            return self.norm(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)
        return self.norm(x)


def _wrap_norms(module: nn.Module) -> nn.Module:
    """Wrap layout-sensitive norms in :class:`ChannelsLastNorm`, in place (recursively)."""
    if isinstance(module, _LAYOUT_SENSITIVE_NORMS):
        return ChannelsLastNorm(module)
    for name, child in module.named_children():
        new = _wrap_norms(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _channels_last_weights(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


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
            norms wrapped in :class:`ChannelsLastNorm`.

    Returns:
        The rewritten copy in eval mode, gradients off.
    """
    net = copy.deepcopy(network)
    if channels_last:
        net = _wrap_norms(net)
    net = net.to(device=torch.device(device), dtype=dtype)
    # channels-last: 3D weights channels-last-3d, 2D ones (a 2D network run on slices) channels-last
    fmt = torch.contiguous_format
    net = net._apply(_channels_last_weights) if channels_last else net.to(memory_format=fmt)  # type: ignore[call-overload]
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
