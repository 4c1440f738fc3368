"""Network factory: MONAI 3D U-Nets built from a plan.

* ``unet``: :class:`monai.networks.nets.UNet` (residual units, strided convolutions,
  3x3x3 kernels; per-axis strides allowed).
* ``dynunet``: :class:`monai.networks.nets.DynUNet`, the nnU-Net architecture (two
  conv-norm-LeakyReLU per level, per-level anisotropic kernels and strides, optional deep
  supervision).  With deep supervision the training-mode output is ``(B, 1 + heads, K, X, Y, Z)``
  (every head upsampled to the input size); in eval mode it is the plain ``(B, K, X, Y, Z)``.
"""

from __future__ import annotations

from monai.networks.nets import DynUNet, UNet
from torch import nn

from medseg.data.plan import NetworkPlan, axis_strides

__all__ = ["build_network", "deep_supervision_weights"]


def _compact(values: list[tuple[int, int, int]]) -> list[int | tuple[int, int, int]]:
    return [v[0] if len(set(v)) == 1 else v for v in values]


def build_network(plan: NetworkPlan) -> nn.Module:
    """Build the network a plan describes.

    Args:
        plan: ``plan.network`` (name, channels, strides, kernel sizes, in/out channels).

    Returns:
        A module mapping ``(B, in_channels, X, Y, Z)`` to logits ``(B, out_channels, X, Y, Z)``;
        spatial sizes must be divisible by the product of the strides per axis.
    """
    assert plan.channels != "auto" and plan.strides != "auto"
    strides = axis_strides(plan.strides)
    if plan.name == "unet":
        return UNet(
            spatial_dims=3,
            in_channels=plan.in_channels,
            out_channels=plan.out_channels,
            channels=plan.channels,
            strides=_compact(strides),  # type: ignore[arg-type]  # MONAI accepts per-axis strides
            num_res_units=plan.num_res_units,
            dropout=plan.dropout,
            norm="instance",
        )
    if plan.name == "dynunet":
        assert plan.kernel_sizes != "auto"
        kernels = axis_strides(plan.kernel_sizes)
        heads = min(plan.deep_supervision_heads, max(1, len(strides) - 1))
        return DynUNet(
            spatial_dims=3,
            in_channels=plan.in_channels,
            out_channels=plan.out_channels,
            kernel_size=_compact(kernels),
            strides=[1, *_compact(strides)],
            upsample_kernel_size=_compact(strides),
            filters=list(plan.channels),
            dropout=plan.dropout or None,
            norm_name=("INSTANCE", {"affine": True}),
            deep_supervision=plan.deep_supervision and len(strides) >= 2,
            deep_supr_num=heads,
            res_block=plan.num_res_units > 0,
        )
    raise ValueError(f"unknown network {plan.name!r}")  # pragma: no cover - the config validator prevents it


def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net's loss weights for the full-resolution output and its auxiliary heads (1, 1/2, 1/4 ... normalised)."""
    raw = [0.5**i for i in range(outputs)]
    total = sum(raw)
    return [w / total for w in raw]
