"""Sliding-window inference, streamed slab by slab.

The functional core of medseg's predictor, in the style of MONAI's
:func:`monai.inferers.sliding_window_inference` (window placement with MONAI's
``dense_patch_slices`` and blending weights with MONAI's ``compute_importance_map``, so
the two agree to float rounding), with what whole-volume inference on small machines
needs on top:

* **Streaming stitching.** Windows are visited in order of their start along one
  spatial axis (the *stream axis*).  A blending buffer only one window deep along that
  axis accumulates ``weight * logits`` in float32; as soon as no later window can touch
  a slab, the slab is divided by its summed weights and handed to the caller
  (:func:`iter_logit_slabs`).  Peak memory is ``K x plane x window depth`` instead of
  MONAI's two full-volume float32 buffers.  :func:`sliding_window_predict` collects the
  slabs into one tensor of any dtype (float16 halves the footprint of the result).
* **Test-time mirroring and ensembling per window** (:class:`WindowPredictor`): the mean
  of the logits of every network on every flip of the window (nnU-Net's scheme).
* **Window batching with OOM fallback**: a CUDA out-of-memory error halves the batch and
  retries; at batch size one the networks fall back to the CPU instead of crashing.
* **Stitching device by free memory** (:func:`choose_stitch_device`): on CUDA the
  blending buffer lives on the GPU when it fits in the free memory, else on the CPU.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from torch import nn
from tqdm.auto import tqdm

from medseg.infer.fastnet import prepare_network

__all__ = [
    "BlendMode",
    "LogitSlab",
    "Tiling",
    "WindowPredictor",
    "choose_stitch_device",
    "choose_stream_axis",
    "class_argmax",
    "is_out_of_memory",
    "iter_logit_slabs",
    "mirror_combinations",
    "nnunet_gaussian",
    "nnunet_window_starts",
    "slab_buffer_bytes",
    "sliding_window_predict",
    "window_starts",
    "windows_touching",
]

log = logging.getLogger(__name__)

BlendMode = Literal["gaussian", "constant"]

#: Window placement and blending weights: MONAI's (medseg models) or nnU-Net's (nnU-Net models).
Tiling = Literal["monai", "nnunet"]

#: Share of the free CUDA memory the stitching buffer may take (the rest is for activations).
GPU_STITCH_FRACTION = 0.5


# ----------------------------------------------------------------------------- windows
def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the spatial ``axes`` (the empty one first), as flip dims of a 5D tensor."""
    dims = [a + 2 for a in axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], *, overlap: float) -> list[tuple[int, int, int]]:
    """Start corners of the windows, exactly where MONAI's sliding window puts them.

    Args:
        image_size: ``(X, Y, Z)``, each at least the window size.
        roi_size: Window size ``(x, y, z)``.
        overlap: Fraction of the window shared with its neighbour, in ``[0, 1)``.

    Returns:
        Window corners, the last window along each axis flush with the image end.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    interval = [
        roi if roi == size else max(1, int(roi * (1 - overlap))) for size, roi in zip(image_size, roi_size, strict=True)
    ]
    slices = dense_patch_slices(list(image_size), list(roi_size), interval)
    return [(int(s[0].start), int(s[1].start), int(s[2].start)) for s in slices]


def nnunet_window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], *, step: float, slices: bool = False
) -> list[tuple[int, int, int]]:
    """Start corners of nnU-Net's windows (``compute_steps_for_sliding_window``).

    Along each axis ``ceil((size - roi) / (roi * step)) + 1`` windows, evenly spread with the
    last one flush with the end (starts rounded with ``np.round``, as nnU-Net does).

    Args:
        image_size: ``(X, Y, Z)``, each at least the window size (pad first).
        roi_size: Window size.
        step: nnU-Net's ``tile_step_size`` in ``(0, 1]`` (``1 - overlap``).
        slices: 2D network: one window per index of axis 0 (``roi_size[0] == 1``), nnU-Net's
            placement on axes 1 and 2.

    Returns:
        Window corners in nnU-Net's order (axis 0 outermost).
    """
    import numpy as np

    if not 0 < step <= 1:
        raise ValueError(f"tile step must be in (0, 1], got {step}")
    per_axis: list[list[int]] = []
    for axis, (size, roi) in enumerate(zip(image_size, roi_size, strict=True)):
        if slices and axis == 0:
            per_axis.append(list(range(int(size))))
            continue
        n = int(np.ceil((size - roi) / (roi * step))) + 1
        actual = (size - roi) / (n - 1) if n > 1 else 99999999999
        per_axis.append([int(np.round(actual * i)) for i in range(n)])
    return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def nnunet_gaussian(roi_size: Sequence[int], *, sigma_scale: float = 0.125, spatial_dims: int = 3) -> torch.Tensor:
    """nnU-Net's blending weights (``compute_gaussian``): float16, peak 10, zeros lifted to the minimum.

    Args:
        roi_size: Window size (3 axes; for a 2D network ``(1, y, x)``, the Gaussian is 2D).
        sigma_scale: Sigma as a fraction of the window.
        spatial_dims: 2 for a 2D network.

    Returns:
        ``roi_size`` float32 tensor holding nnU-Net's float16 values.
    """
    import numpy as np
    from scipy.ndimage import gaussian_filter

    tile = tuple(int(r) for r in roi_size)[3 - spatial_dims :]
    tmp = np.zeros(tile)
    tmp[tuple(i // 2 for i in tile)] = 1
    g = gaussian_filter(tmp, [i * sigma_scale for i in tile], 0, mode="constant", cval=0)
    g /= np.max(g) / 10
    weights = torch.from_numpy(g).to(torch.float16)
    mask = weights == 0
    weights[mask] = torch.min(weights[~mask])
    return weights.float().reshape(tuple(int(r) for r in roi_size))


def windows_touching(
    box: Sequence[slice], image_size: Sequence[int], roi_size: Sequence[int], *, overlap: float
) -> tuple[slice, slice, slice]:
    """The box covered by the windows (of the whole image's window grid) that intersect ``box``.

    Tiling this box with :func:`window_starts` gives exactly those windows again, so a
    prediction on the box equals the whole-image prediction inside it: windows that do not
    touch ``box`` are skipped without changing any other window.

    Args:
        box: Three slices (region of interest) on the image.
        image_size: ``(X, Y, Z)``.
        roi_size: Window size.
        overlap: Window overlap, as for :func:`window_starts`.

    Returns:
        Three slices; an axis shorter than the window keeps its full extent.
    """
    out = []
    for axis, (size, roi) in enumerate(zip(image_size, roi_size, strict=True)):
        if size <= roi:
            out.append(slice(0, size))
            continue
        interval = max(1, int(roi * (1 - overlap)))
        starts = [int(s[0].start) for s in dense_patch_slices([size], [roi], [interval])]
        lo, hi = int(box[axis].start), int(box[axis].stop)
        touching = [s for s in starts if s < hi and s + roi > lo] or [min(starts, key=lambda s: abs(s - lo))]
        out.append(slice(min(touching), max(touching) + roi))
    return out[0], out[1], out[2]


def choose_stream_axis(image_size: Sequence[int], roi_size: Sequence[int]) -> int:
    """The spatial axis along which streaming keeps the smallest buffer (largest ``size / roi``)."""
    ratios = [size / roi for size, roi in zip(image_size, roi_size, strict=True)]
    return max(range(len(ratios)), key=lambda a: (ratios[a], a))


def class_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest value along dim 0 (the first one on ties), like ``torch.argmax(logits, 0)``.

    ``torch.max(...).indices`` reduces over the leading dimension several times faster than
    ``torch.argmax`` on CPU (measured in ``benchmarks/bench_inference.py``).

    Args:
        logits: ``(K, ...)`` scores.

    Returns:
        ``(...)`` int64 class indices.
    """
    return torch.max(logits, dim=0).indices


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (and the CPU allocator's equivalent)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def choose_stitch_device(
    compute_device: torch.device,
    *,
    buffer_bytes: int,
    fraction: float = GPU_STITCH_FRACTION,
) -> torch.device:
    """Where the blending buffer lives: on the GPU when it fits in ``fraction`` of the free memory.

    Args:
        compute_device: Where the networks run.
        buffer_bytes: Size of the stitching buffers (logits + weights of one slab).
        fraction: Share of the currently free device memory the buffer may use.

    Returns:
        ``compute_device`` for CUDA with enough free memory, else the CPU.
    """
    if compute_device.type != "cuda":
        return torch.device("cpu")
    free, _total = torch.cuda.mem_get_info(compute_device)
    if buffer_bytes <= fraction * free:
        return compute_device
    log.info("stitching on the CPU: buffer %.2f GiB > %.0f%% of free GPU memory", buffer_bytes / 2**30, fraction * 100)
    return torch.device("cpu")


# ---------------------------------------------------------------------- window predictor
class WindowPredictor:
    """Logits of a batch of windows: networks x mirrorings averaged, reduced precision, OOM fallback.

    Reduced precision runs one of two ways.  With ``cast_weights`` (the default on the CPU) the
    networks are copied with bf16 weights (:func:`medseg.infer.fastnet.prepare_network`) and
    fed bf16 windows: no per-call conversions, measured faster than autocast on AMX / AVX-512
    BF16 CPUs.  Otherwise (the default on CUDA) the float32 networks run under autocast (AMP).

    Args:
        networks: One network (or several, ensembled by averaging logits), each mapping
            ``(n, C, x, y, z)`` to ``(n, K, x, y, z)``.  They are not modified; the predictor
            keeps prepared copies on ``device``.
        device: Where the networks run.
        dtype: ``torch.bfloat16`` / ``torch.float16`` for reduced precision, ``None`` for fp32.
        mirror_axes: Spatial axes (0, 1, 2) to mirror; every subset is averaged.
        channels_last: Run the networks in the channels-last-3d memory format.
        batch_size: Windows per forward pass; halved automatically on out-of-memory.
        cast_weights: Cast the weights to ``dtype`` instead of using autocast; default: on the CPU.
    """

    def __init__(
        self,
        networks: nn.Module | Sequence[nn.Module],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        mirror_axes: Sequence[int] = (),
        channels_last: bool = False,
        batch_size: int = 1,
        cast_weights: bool | None = None,
    ) -> None:
        self.originals = [networks] if isinstance(networks, nn.Module) else list(networks)
        if not self.originals:
            raise ValueError("need at least one network")
        if any(a not in (0, 1, 2) for a in mirror_axes):
            raise ValueError(f"mirror_axes are spatial axes 0, 1, 2, got {tuple(mirror_axes)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.flips = mirror_combinations(sorted(set(mirror_axes)))
        self.channels_last = channels_last
        self.batch_size = batch_size
        self._cast_weights_option = cast_weights
        self.seconds = 0.0  # time spent in forward passes
        self.calls = 0  # windows predicted
        self.networks: list[nn.Module] = []
        self._place_networks()

    @property
    def cast_weights(self) -> bool:
        """Whether the networks hold ``dtype`` weights (else fp32 weights, autocast when ``dtype`` is set)."""
        if self.dtype is None:
            return False
        if self._cast_weights_option is not None:
            return self._cast_weights_option
        return self.device.type == "cpu"

    def _place_networks(self) -> None:
        weights = self.dtype if self.cast_weights and self.dtype is not None else torch.float32
        self.networks = [
            prepare_network(net, device=self.device, dtype=weights, channels_last=self.channels_last)
            for net in self.originals
        ]

    def _run(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return net(x)
        if self.cast_weights:
            return net(x.to(self.dtype))
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            return net(x)

    def _forward_once(self, windows: torch.Tensor) -> torch.Tensor:
        windows = windows.to(self.device, non_blocking=True)
        total: torch.Tensor | None = None
        for net in self.networks:
            for flip in self.flips:
                x = torch.flip(windows, flip) if flip else windows
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                out = self._run(net, x)
                out = torch.flip(out, flip) if flip else out
                out = out.float()
                total = out if total is None else total.add_(out)
        assert total is not None
        n = len(self.networks) * len(self.flips)
        return (total / n if n > 1 else total).contiguous()

    def _fall_back_to_cpu(self) -> None:
        log.warning("out of memory on %s with one window per batch: running the networks on the CPU", self.device)
        self.device = torch.device("cpu")
        if self.dtype is torch.float16:
            self.dtype = None
        self._place_networks()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        """Predict ``(n, C, x, y, z)`` windows (any device) -> ``(n, K, x, y, z)`` float32 on ``self.device``."""
        outputs = []
        start = 0
        while start < windows.shape[0]:
            chunk = windows[start : start + self.batch_size]
            try:
                t0 = time.perf_counter()
                outputs.append(self._forward_once(chunk))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.seconds += time.perf_counter() - t0
                self.calls += int(chunk.shape[0])
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.batch_size > 1:
                    self.batch_size = max(1, self.batch_size // 2)
                    log.warning("out of memory: window batch size reduced to %d", self.batch_size)
                elif self.device.type != "cpu":
                    self._fall_back_to_cpu()
                else:
                    raise
                continue
            start += chunk.shape[0]
        if len(outputs) > 1 and len({o.device for o in outputs}) > 1:
            outputs = [o.to(self.device) for o in outputs]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


# ------------------------------------------------------------------------- stitching
@dataclass
class LogitSlab:
    """A finished slab of blended logits.

    Attributes:
        axis: The spatial stream axis (0, 1 or 2).
        start: First index of the slab along ``axis`` (in the un-padded image).
        stop: One past the last index.
        logits: ``(K, X, Y, Z)`` float32 logits with the ``axis`` extent ``stop - start``: a view
            into the blending buffer, valid until the next slab is requested (copy it to keep it).
    """

    axis: int
    start: int
    stop: int
    logits: torch.Tensor


def _pad_to_window(image: torch.Tensor, roi_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Pad ``(C, X, Y, Z)`` with zeros (centred, like MONAI) to at least the window size."""
    before = []
    pad: list[int] = []
    for size, roi in zip(reversed(image.shape[1:]), reversed(list(roi_size)), strict=True):
        diff = max(roi - size, 0)
        pad += [diff // 2, diff - diff // 2]
    for k in range(3):
        before.append(pad[2 * (2 - k)])
    if any(pad):
        image = F.pad(image[None], pad, mode="constant", value=0.0)[0]
    return image, before


def _window_index(corner: Sequence[int], roi: Sequence[int]) -> tuple[slice, ...]:
    """``(all channels, x, y, z)`` slices of the window at ``corner``."""
    return (slice(None), *(slice(c, c + r) for c, r in zip(corner, roi, strict=True)))


def _shift_down(buffer: torch.Tensor, dim: int, by: int) -> None:
    """Move ``buffer[by:]`` to ``buffer[:-by]`` along ``dim`` in place and zero the tail.

    Copies chunk by chunk from low to high so source and destination never overlap.
    """
    length = buffer.shape[dim]
    if by >= length:
        buffer.zero_()
        return
    pos = 0
    while pos < length - by:
        n = min(by, length - by - pos)
        buffer.narrow(dim, pos, n).copy_(buffer.narrow(dim, pos + by, n))
        pos += n
    buffer.narrow(dim, length - by, by).zero_()


def _allocate(
    num_classes: int,
    shape: Sequence[int],
    roi: Sequence[int],
    mode: BlendMode,
    sigma_scale: float,
    device: torch.device,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blending buffers: accumulator ``(K, *shape)``, window weights ``(1, *roi)``, weight sum ``(1, *shape)``.

    They go to ``device``, or to the CPU if ``device`` runs out of memory.  ``importance`` replaces
    MONAI's importance map (nnU-Net's Gaussian).
    """

    def make(where: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if importance is not None:
            weight = importance.to(where)
        else:
            weight = compute_importance_map(tuple(roi), mode=mode, sigma_scale=sigma_scale).to(where)
        wsum = torch.zeros((1, *shape), dtype=torch.float32, device=where)
        acc = torch.zeros((num_classes, *shape), dtype=torch.float32, device=where)
        return acc, weight.to(torch.float32).reshape(1, *roi), wsum

    try:
        return make(device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc) or device.type == "cpu":
            raise
    log.warning("out of memory for the stitching buffer on %s: stitching on the CPU", device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return make(torch.device("cpu"))


def iter_logit_slabs(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    mode: BlendMode = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    stream_axis: int | None = None,
    stitch_device: torch.device | str = "cpu",
    progress: bool = False,
    tiling: Tiling = "monai",
    spatial_dims: int = 3,
    run_window: Callable[[tuple[slice, slice, slice]], bool] | None = None,
    empty_logits: torch.Tensor | None = None,
) -> Iterator[LogitSlab]:
    """Blend window predictions over a volume and yield finished slabs in order.

    Window placement and blending weights are MONAI's (``dense_patch_slices``,
    ``compute_importance_map``); an image smaller than the window is zero-padded
    (centred) like MONAI and nnU-Net do, and the slabs cover only the original image.

    Args:
        image: ``(C, X, Y, Z)`` preprocessed input (any device; windows are cut from it).
        predictor: Maps ``(n, C, x, y, z)`` windows to ``(n, K, x, y, z)`` logits, e.g. a
            :class:`WindowPredictor`.
        roi_size: Window size ``(x, y, z)``.
        overlap: Fraction of a window shared with its neighbour, ``[0, 1)``.
        mode: ``"gaussian"`` (sigma = ``sigma_scale`` x window, as nnU-Net and MONAI) or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window size.
        sw_batch_size: Windows per call of ``predictor``.
        stream_axis: Spatial axis to stream along; default :func:`choose_stream_axis`.
        stitch_device: Where the float32 blending buffer (``K x plane x window depth``) lives.
        progress: Show a progress bar over windows.
        tiling: ``monai`` (above) or ``nnunet``: nnU-Net's window placement with tile step
            ``1 - overlap`` (:func:`nnunet_window_starts`) and its Gaussian (:func:`nnunet_gaussian`;
            ``mode="constant"``: weights 1), accumulated in float32 (nnU-Net accumulates in float16).
        spatial_dims: 2: a 2D network on ``(1, y, x)`` windows, one per index of axis 0 (``nnunet`` tiling).
        run_window: Called with each window's region in the (un-padded) image, three slices; windows it
            returns ``False`` for are skipped (the placement of the others is unchanged, so every voxel
            covered by run windows only gets exactly the blend of the full tiling).  Needs ``empty_logits``.
        empty_logits: ``(K,)`` logits given to voxels that no run window covers (with ``run_window``).

    Yields:
        :class:`LogitSlab` s covering the image along ``stream_axis``, in increasing order; each
        slab's logits are a view into the blending buffer, valid until the next slab is requested.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    roi = tuple(int(r) for r in roi_size)
    orig_size = tuple(int(s) for s in image.shape[1:])
    padded, before = _pad_to_window(image, roi)
    size = tuple(int(s) for s in padded.shape[1:])
    axis = choose_stream_axis(size, roi) if stream_axis is None else int(stream_axis)
    importance: torch.Tensor | None = None
    if tiling == "nnunet":
        placed = nnunet_window_starts(size, roi, step=1.0 - overlap, slices=spatial_dims == 2)
        if mode == "gaussian":
            importance = nnunet_gaussian(roi, sigma_scale=sigma_scale, spatial_dims=spatial_dims)
        else:
            importance = torch.ones(roi)
    else:
        placed = window_starts(size, roi, overlap=overlap)
    starts = sorted(placed, key=lambda s: (s[axis], s))
    stitch = torch.device(stitch_device)
    depth = roi[axis]
    buf_shape = list(size)
    buf_shape[axis] = depth
    acc = weight = wsum = torch.empty(0)
    lo = 0  # image index of buffer position 0 along the stream axis
    keep = [slice(b, b + n) for b, n in zip(before, orig_size, strict=True)]
    fill: torch.Tensor | None = None
    if run_window is not None:
        if empty_logits is None:
            raise ValueError("run_window needs empty_logits")

        def unpadded(corner: Sequence[int]) -> tuple[slice, slice, slice]:
            bounds = zip(corner, roi, before, orig_size, strict=True)
            parts = [slice(max(0, c - b), min(n, c + r - b)) for c, r, b, n in bounds]
            return parts[0], parts[1], parts[2]

        starts = [c for c in starts if run_window(unpadded(c))]
        # buffers now, not at the first window: the slabs cover the image even if no window runs
        acc, weight, wsum = _allocate(
            int(empty_logits.numel()), buf_shape, roi, mode, sigma_scale, stitch, importance=importance
        )
        stitch = acc.device
        fill = empty_logits.to(device=stitch, dtype=torch.float32).reshape(-1, 1, 1, 1)

    def finish(stop: int) -> Iterator[LogitSlab]:
        """Normalise buffer rows [lo, stop) in place, yield their un-padded part, then shift them out."""
        nonlocal lo
        start_keep, stop_keep = max(lo, keep[axis].start), min(stop, keep[axis].stop)
        if stop_keep > start_keep:
            region = [slice(None), keep[0], keep[1], keep[2]]
            region[axis + 1] = slice(start_keep - lo, stop_keep - lo)
            view = acc[tuple(region)]
            weights = wsum[tuple(region)]
            view.div_(weights)
            if fill is not None:  # voxels only skipped windows cover: 0 / 0 -> the empty logits
                hole = weights == 0
                if bool(hole.any()):
                    view.copy_(torch.where(hole, fill, view))
            yield LogitSlab(axis, start_keep - keep[axis].start, stop_keep - keep[axis].start, view)
        _shift_down(acc, axis + 1, stop - lo)
        _shift_down(wsum, axis + 1, stop - lo)
        lo = stop

    # disable=None: no bar when stderr is not a terminal (no escape codes in log files)
    bar = tqdm(total=len(starts), desc="windows", unit="win", leave=False, disable=None if progress else True)
    for first in range(0, len(starts), sw_batch_size):
        batch = starts[first : first + sw_batch_size]
        windows = torch.stack([padded[_window_index(c, roi)] for c in batch])
        logits = predictor(windows)
        if logits.shape[0] != len(batch) or tuple(logits.shape[2:]) != roi:
            raise ValueError(f"predictor returned {tuple(logits.shape)} for windows {tuple(windows.shape)}")
        if acc.numel() == 0:
            acc, weight, wsum = _allocate(
                int(logits.shape[1]), buf_shape, roi, mode, sigma_scale, stitch, importance=importance
            )
            stitch = acc.device
        logits = logits.to(stitch)
        for corner, out in zip(batch, logits, strict=True):
            while corner[axis] > lo:  # (several steps only after skipped windows)
                yield from finish(min(corner[axis], lo + depth))
            region = [slice(c, c + r) for c, r in zip(corner, roi, strict=True)]
            region[axis] = slice(corner[axis] - lo, corner[axis] - lo + depth)
            index = (slice(None), region[0], region[1], region[2])
            acc[index].addcmul_(out, weight)
            wsum[index].add_(weight)
        bar.update(len(batch))
    bar.close()
    if acc.numel():
        yield from finish(lo + depth)
        while lo < size[axis]:  # rows after the last run window (skipped windows)
            yield from finish(min(lo + depth, size[axis]))


def sliding_window_predict(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    mode: BlendMode = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    stream_axis: int | None = None,
    stitch_device: torch.device | str = "cpu",
    out_dtype: torch.dtype = torch.float32,
    out_device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Sliding-window logits of a batch of volumes (MONAI's ``sliding_window_inference``, streamed).

    With ``out_dtype=torch.float32`` the result equals MONAI's
    ``sliding_window_inference(inputs, roi_size, sw_batch_size, predictor, overlap, mode,
    sigma_scale)`` up to float rounding; the blending itself always runs in float32 on one
    slab at a time, and ``out_dtype=torch.float16`` halves the memory of the result.

    Args:
        inputs: ``(B, C, X, Y, Z)`` images.
        predictor: ``(n, C, x, y, z)`` -> ``(n, K, x, y, z)`` logits (e.g. :class:`WindowPredictor`).
        roi_size: Window size ``(x, y, z)``.
        overlap: Fraction of a window shared with its neighbour.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: Gaussian sigma as a fraction of the window.
        sw_batch_size: Windows per predictor call.
        stream_axis: Spatial axis to stream along (default: the one giving the smallest buffer).
        stitch_device: Device of the one-slab blending buffer.
        out_dtype: Dtype of the returned logits.
        out_device: Device of the returned logits.
        progress: Progress bar over windows.

    Returns:
        ``(B, K, X, Y, Z)`` blended logits.
    """
    if inputs.ndim != 5:
        raise ValueError(f"inputs must be (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
    results = []
    for image in inputs:
        out: torch.Tensor | None = None
        for slab in iter_logit_slabs(
            image,
            predictor,
            roi_size=roi_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            sw_batch_size=sw_batch_size,
            stream_axis=stream_axis,
            stitch_device=stitch_device,
            progress=progress,
        ):
            if out is None:
                out = torch.empty((slab.logits.shape[0], *image.shape[1:]), dtype=out_dtype, device=out_device)
            out.narrow(slab.axis + 1, slab.start, slab.stop - slab.start).copy_(slab.logits)
        assert out is not None
        results.append(out)
    return torch.stack(results) if len(results) > 1 else results[0][None]


def slab_buffer_bytes(image_size: Sequence[int], roi_size: Sequence[int], num_classes: int, axis: int) -> int:
    """Bytes of the float32 stitching buffers (logits + weights) for one slab."""
    shape = [max(s, r) for s, r in zip(image_size, roi_size, strict=True)]
    shape[axis] = int(roi_size[axis])
    return 4 * (num_classes + 1) * math.prod(shape)
