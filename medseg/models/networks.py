"""Network factory: MONAI 3D U-Nets built from a plan."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn

from medseg.data.plan import NetworkPlan

__all__ = ["build_network"]


def build_network(plan: NetworkPlan) -> nn.Module:
    """Build the network a plan describes.

    Args:
        plan: ``plan.network`` (channels, strides, residual units, in/out channels).

    Returns:
        A module mapping ``(B, in_channels, X, Y, Z)`` to logits ``(B, out_channels, X, Y, Z)``;
        spatial sizes must be divisible by the product of the strides.
    """
    if plan.name != "unet":  # pragma: no cover - the config validator allows only "unet" today
        raise ValueError(f"unknown network {plan.name!r}")
    return UNet(
        spatial_dims=3,
        in_channels=plan.in_channels,
        out_channels=plan.out_channels,
        channels=plan.channels,
        strides=plan.strides,
        num_res_units=plan.num_res_units,
        dropout=plan.dropout,
        norm="instance",
    )
