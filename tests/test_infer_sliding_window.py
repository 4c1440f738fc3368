"""The sliding-window core: agreement with MONAI, mirroring, streaming, ensembling, OOM/GPU decisions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from torch import nn

from medseg.infer import sliding_window as sw
from medseg.infer.sliding_window import (
    WindowPredictor,
    choose_stitch_device,
    iter_logit_slabs,
    slab_buffer_bytes,
    sliding_window_predict,
    window_starts,
)

ROI = (16, 16, 8)


def _net(seed: int, in_channels: int = 2, out_channels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(3, in_channels, out_channels, channels=(4, 8), strides=(2,), num_res_units=1).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny networks: one thread avoids OpenMP spin-waiting on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return _net(0)


@pytest.mark.parametrize("size", [(37, 29, 21), (16, 16, 8), (10, 40, 5), (33, 17, 30)])
@pytest.mark.parametrize(("mode", "overlap"), [("gaussian", 0.5), ("constant", 0.25), ("gaussian", 0.0)])
def test_matches_monai_sliding_window(net: nn.Module, size: tuple[int, int, int], mode: str, overlap: float) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 2, *size)
    with torch.inference_mode():
        ref = sliding_window_inference(x, ROI, 3, net, overlap=overlap, mode=mode)
        ours = sliding_window_predict(
            x, WindowPredictor(net, batch_size=3), roi_size=ROI, overlap=overlap, mode=mode, sw_batch_size=3
        )
    assert ours.shape == ref.shape == (1, 3, *size)
    assert torch.allclose(ours, torch.as_tensor(ref), atol=2e-5, rtol=0)


def test_window_positions_are_monais() -> None:
    starts = window_starts((160, 160, 160), (96, 96, 96), overlap=0.5)
    assert len(starts) == 27
    assert sorted({s[0] for s in starts}) == [0, 48, 64]  # the last window is flush with the end


def test_streaming_along_any_axis_equals_the_in_memory_result(net: nn.Module) -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 2, 45, 23, 19)
    with torch.inference_mode():
        ref = torch.as_tensor(sliding_window_inference(x, ROI, 4, net, overlap=0.5, mode="gaussian"))
        wp = WindowPredictor(net, batch_size=4)
        for axis in (0, 1, 2):
            slabs = [
                (s.start, s.stop, s.logits.clone())  # a slab is a view into the buffer: copy it
                for s in iter_logit_slabs(x[0], wp, roi_size=ROI, overlap=0.5, sw_batch_size=4, stream_axis=axis)
            ]
            # many slabs, in order, tiling the axis
            assert len(slabs) > 1
            assert [s[0] for s in slabs] == [0] + [s[1] for s in slabs[:-1]]
            assert slabs[-1][1] == x.shape[2 + axis]
            streamed = torch.cat([s[2] for s in slabs], dim=axis + 1)
            assert torch.allclose(streamed, ref[0], atol=2e-5, rtol=0)
        half = sliding_window_predict(x, wp, roi_size=ROI, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), ref, atol=5e-3, rtol=1e-3)


def test_stitching_buffer_is_one_window_deep() -> None:
    # 512x512x600 with 14 classes and 96^3 windows: streaming along z keeps one 96-deep slab
    assert slab_buffer_bytes((512, 512, 600), (96, 96, 96), 14, axis=2) == 4 * 15 * 512 * 512 * 96
    assert sw.choose_stream_axis((512, 512, 600), (96, 96, 96)) == 2


def test_mirroring_makes_the_prediction_flip_equivariant() -> None:
    torch.manual_seed(3)
    net = _net(4, in_channels=1)
    x = torch.randn(1, 1, 40, 24, 16)  # window starts are symmetric: 0,8,16,24 / 0,8 / 0,8
    axes = (0, 1, 2)
    mirrored = WindowPredictor(net, mirror_axes=axes, batch_size=2)
    plain = WindowPredictor(net, batch_size=2)
    with torch.inference_mode():
        base = sliding_window_predict(x, mirrored, roi_size=ROI)
        base_plain = sliding_window_predict(x, plain, roi_size=ROI)
        for dims in [(2,), (3,), (4,), (2, 3, 4)]:
            flipped = sliding_window_predict(torch.flip(x, dims), mirrored, roi_size=ROI)
            assert torch.allclose(torch.flip(flipped, dims), base, atol=1e-5, rtol=0)
            flipped_plain = sliding_window_predict(torch.flip(x, dims), plain, roi_size=ROI)
            assert not torch.allclose(torch.flip(flipped_plain, dims), base_plain, atol=1e-3)


def test_mirroring_averages_the_flipped_predictions() -> None:
    net = _net(5, in_channels=1)
    x = torch.randn(2, 1, *ROI)
    with torch.inference_mode():
        expected = (net(x) + torch.flip(net(torch.flip(x, (3,))), (3,))) / 2
        got = WindowPredictor(net, mirror_axes=(1,))(x)
    assert torch.allclose(got, expected, atol=1e-6)


def test_ensemble_is_the_mean_of_the_members(net: nn.Module) -> None:
    other = _net(7)
    x = torch.randn(1, 2, 30, 20, 12)
    with torch.inference_mode():
        a = sliding_window_predict(x, WindowPredictor(net), roi_size=ROI)
        b = sliding_window_predict(x, WindowPredictor(other), roi_size=ROI)
        both = sliding_window_predict(x, WindowPredictor([net, other], batch_size=2), roi_size=ROI, sw_batch_size=2)
    assert torch.allclose(both, (a + b) / 2, atol=1e-5)


class _OomAboveOne(nn.Module):
    """A network that pretends to run out of memory on batches of more than one window."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_window_batch(net: nn.Module) -> None:
    flaky = _OomAboveOne(net)
    x = torch.randn(1, 2, 30, 20, 12)
    wp = WindowPredictor(flaky, batch_size=4)
    with torch.inference_mode():
        got = sliding_window_predict(x, wp, roi_size=ROI, sw_batch_size=4)
        ref = sliding_window_predict(x, WindowPredictor(net), roi_size=ROI)
    assert wp.batch_size == 1
    assert wp.networks[0].batches[:3] == [4, 2, 1]  # the predictor's prepared copy of ``flaky``
    assert torch.allclose(got, ref, atol=1e-6)


def test_other_errors_are_not_swallowed(net: nn.Module) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        WindowPredictor(Broken(), batch_size=2)(torch.zeros(2, 1, *ROI))


def test_gpu_out_of_memory_at_batch_one_falls_back_to_cpu(net: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    wp = WindowPredictor(net, batch_size=2)
    placed: list[str] = []
    monkeypatch.setattr(wp, "_place_networks", lambda: placed.append(wp.device.type))
    real_forward = wp._forward_once

    def forward(windows: torch.Tensor) -> torch.Tensor:
        if wp.device.type == "cuda":  # every GPU attempt runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_forward(windows)

    monkeypatch.setattr(wp, "_forward_once", forward)
    wp.device = torch.device("cuda")
    wp.dtype = torch.float16
    x = torch.randn(3, 2, *ROI)
    out = wp(x)
    assert wp.batch_size == 1 and wp.device.type == "cpu" and placed == ["cpu"]
    assert wp.dtype is None  # fp16 autocast does not exist on the CPU
    with torch.inference_mode():
        assert torch.allclose(out, net(x), atol=1e-6)


@pytest.mark.parametrize(("free_gib", "expected"), [(24.0, "cuda"), (1.0, "cpu")])
def test_stitching_buffer_goes_to_the_gpu_only_when_it_fits(
    monkeypatch: pytest.MonkeyPatch, free_gib: float, expected: str
) -> None:
    calls = []

    def mem_get_info(device: torch.device | None = None) -> tuple[int, int]:
        calls.append(device)
        return int(free_gib * 2**30), 32 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    need = slab_buffer_bytes((512, 512, 600), (96, 96, 96), 14, axis=2)  # 1.4 GiB
    assert choose_stitch_device(torch.device("cuda:0"), buffer_bytes=need).type == expected
    assert calls == [torch.device("cuda:0")]
    assert choose_stitch_device(torch.device("cpu"), buffer_bytes=need).type == "cpu"


def test_stitching_buffer_falls_back_to_cpu_when_allocation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real_zeros = torch.zeros

    def zeros(*args, **kwargs):
        on_meta = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta"
        if on_meta and len(args[0]) == 4 and args[0][0] > 1:  # the K-channel accumulator does not fit
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    acc, weight, wsum = sw._allocate(3, (16, 16, 8), (16, 16, 8), "gaussian", 0.125, torch.device("meta"))
    assert acc.device.type == weight.device.type == wsum.device.type == "cpu"
    assert acc.shape == (3, 16, 16, 8) and wsum.shape == (1, 16, 16, 8) and float(wsum.sum()) == 0


def test_window_predictor_validates_its_options(net: nn.Module) -> None:
    with pytest.raises(ValueError, match="mirror_axes"):
        WindowPredictor(net, mirror_axes=(3,))
    with pytest.raises(ValueError, match="batch_size"):
        WindowPredictor(net, batch_size=0)
    with pytest.raises(ValueError, match="overlap"):
        window_starts((32, 32, 32), ROI, overlap=1.0)


@pytest.mark.parametrize("tiling", ["nnunet", "monai"])
@pytest.mark.parametrize("axis", [0, 2])
def test_skipped_windows_leave_the_others_exact(net: nn.Module, tiling: str, axis: int) -> None:
    """Windows ``run_window`` rejects are not run; voxels only run windows cover keep the full blend bit for bit."""
    torch.manual_seed(3)
    x = torch.randn(2, 70, 23, 30)
    empty = torch.tensor([5.0, -1.0, -2.0])
    wp = WindowPredictor(net, batch_size=2)
    seen: list[tuple[slice, slice, slice]] = []

    def runs(region: tuple[slice, slice, slice]) -> bool:
        return not (20 <= region[0].start < 45)  # a gap deeper than a window along axis 0

    def skip_middle(region: tuple[slice, slice, slice]) -> bool:
        seen.append(region)
        return runs(region)

    def collect(**options: object) -> torch.Tensor:
        slabs = [
            (s.start, s.stop, s.logits.clone())
            for s in iter_logit_slabs(
                x, wp, roi_size=ROI, overlap=0.5, sw_batch_size=2, stream_axis=axis, tiling=tiling, **options
            )
        ]
        assert [s[0] for s in slabs] == [0] + [s[1] for s in slabs[:-1]] and slabs[-1][1] == x.shape[axis + 1]
        return torch.cat([s[2] for s in slabs], dim=axis + 1)

    with torch.inference_mode():
        full = collect()
        calls = wp.calls
        part = collect(run_window=skip_middle, empty_logits=empty)
    run = [r for r in seen if runs(r)]
    assert 0 < wp.calls - calls == len(run) < len(seen)  # the rejected windows never ran
    run_cover = torch.zeros(x.shape[1:], dtype=torch.bool)
    skip_cover = torch.zeros(x.shape[1:], dtype=torch.bool)
    for region in seen:
        (run_cover if runs(region) else skip_cover)[region] = True
    only_run = run_cover & ~skip_cover
    assert only_run.any() and (~run_cover).any()
    assert torch.equal(part[:, only_run], full[:, only_run])
    assert torch.equal(part[:, ~run_cover], empty[:, None].expand(3, int((~run_cover).sum())))
    assert torch.isfinite(part).all()


def test_no_window_run_still_covers_the_image(net: nn.Module) -> None:
    x = torch.randn(2, 40, 20, 9)
    empty = torch.tensor([0.0, -30.0, -30.0])
    wp = WindowPredictor(net)
    with torch.inference_mode():
        slabs = [
            (s.start, s.stop, s.logits.clone())
            for s in iter_logit_slabs(
                x, wp, roi_size=ROI, tiling="nnunet", run_window=lambda r: False, empty_logits=empty
            )
        ]
    assert wp.calls == 0
    assert slabs[0][0] == 0 and slabs[-1][1] == 40
    logits = torch.cat([s[2] for s in slabs], dim=1)
    assert logits.shape == (3, 40, 20, 9) and torch.equal(logits, empty[:, None, None, None].expand_as(logits))
    with pytest.raises(ValueError, match="empty_logits"):
        next(iter(iter_logit_slabs(x, wp, roi_size=ROI, run_window=lambda r: True)))
