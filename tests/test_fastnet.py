"""Inference rewrites of a network (medseg.infer.fastnet) and their use by the window predictor."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet, UNet
from torch import nn

from medseg.infer.fastnet import ChannelsLastNorm, network_dtype, prepare_network
from medseg.infer.sliding_window import WindowPredictor

ROI = (32, 32, 16)


def _unet(out_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=out_channels,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
        norm="instance",
    ).eval()


def _dynunet() -> nn.Module:
    torch.manual_seed(1)
    return DynUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=4,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[8, 16, 32],
        norm_name=("INSTANCE", {"affine": True}),
    ).eval()


def _group_norm_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.PReLU(), nn.Conv3d(8, 2, 3, padding=1)
    ).eval()


@pytest.mark.parametrize(("make", "channels"), [(_unet, 1), (_dynunet, 2), (_group_norm_net, 1)])
def test_channels_last_rewrite_is_exact_in_float32(make: object, channels: int) -> None:
    net = make()  # type: ignore[operator]
    # non-trivial affine parameters, so that a norm that lost them would show
    for module in net.modules():
        if isinstance(module, (nn.InstanceNorm3d, nn.GroupNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, channels, *ROI)
    fast = prepare_network(net, channels_last=True)
    wrapped = [m for m in fast.modules() if isinstance(m, ChannelsLastNorm)]
    assert wrapped, "instance/group norms should be wrapped"
    with torch.inference_mode():
        ref = net(x)
        out = fast(x.contiguous(memory_format=torch.channels_last_3d))
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_prepare_network_leaves_the_original_untouched() -> None:
    net = _unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = prepare_network(net, dtype=torch.bfloat16, channels_last=True)
    assert network_dtype(fast) == torch.bfloat16 and network_dtype(net) == torch.float32
    assert not any(isinstance(m, ChannelsLastNorm) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in fast.parameters())


def test_contiguous_norm_keeps_the_memory_format() -> None:
    norm = ChannelsLastNorm(nn.InstanceNorm3d(4))
    x = torch.randn(1, 4, 8, 8, 8)
    y = norm(x.contiguous(memory_format=torch.channels_last_3d))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(y, nn.functional.instance_norm(x), atol=1e-6)
    assert norm(x).is_contiguous()


def test_bf16_weights_on_cpu_are_close_to_float32_and_agree_on_the_argmax() -> None:
    net = _unet()
    x = torch.randn(2, 1, *ROI)
    with torch.inference_mode():
        ref = net(x)
    cast = WindowPredictor(net, dtype=torch.bfloat16, channels_last=True)
    auto = WindowPredictor(net, dtype=torch.bfloat16, cast_weights=False)
    assert cast.cast_weights and not auto.cast_weights
    assert network_dtype(cast.networks[0]) == torch.bfloat16
    assert network_dtype(auto.networks[0]) == torch.float32
    for wp in (cast, auto):
        out = wp(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        scale = float(ref.abs().max())
        assert float((out - ref).abs().max()) < 0.05 * scale
        # random weights give near-ties everywhere; bf16 must still agree on most voxels
        assert float((out.argmax(1) == ref.argmax(1)).float().mean()) > 0.95


def test_float32_predictor_keeps_float32_weights_and_exact_output() -> None:
    net = _unet()
    x = torch.randn(1, 1, *ROI)
    wp = WindowPredictor(net, mirror_axes=(0, 2))
    assert not wp.cast_weights and network_dtype(wp.networks[0]) == torch.float32
    with torch.inference_mode():
        flips = [(), (2,), (4,), (2, 4)]
        ref = sum(torch.flip(net(torch.flip(x, f) if f else x), f) if f else net(x) for f in flips) / 4
    assert torch.allclose(wp(x), ref, atol=1e-6)


@pytest.mark.parametrize("channels", [16, 4])
def test_channels_last_instance_norm_routes_agree_with_instance_norm(channels: int) -> None:
    """16 channels go through the per-sample batch norm, 4 through a contiguous copy; both exact."""
    torch.manual_seed(3)
    layer = nn.InstanceNorm3d(channels, affine=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    norm = ChannelsLastNorm(layer)
    assert norm._per_channel() is (channels == 16)
    x = 3.0 * torch.randn(2, channels, 12, 10, 8) + 1.0
    with torch.inference_mode():
        y = norm(x.contiguous(memory_format=torch.channels_last_3d))
        ref = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(y, ref, atol=1e-5)
    assert not ChannelsLastNorm(nn.GroupNorm(4, 16))._per_channel()  # true group norm: contiguous copy
    assert ChannelsLastNorm(nn.GroupNorm(16, 16))._per_channel()
