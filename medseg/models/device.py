"""Device and numeric-precision choice, shared by training and inference.

``auto`` means: CUDA when present, else CPU; mixed precision where the hardware runs
it natively — bf16 on CUDA GPUs that support it (fp16 with a gradient scaler
otherwise), bf16 on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from medseg.errors import ConfigError

__all__ = [
    "DeviceUnavailableError",
    "autocast",
    "cpu_supports_bf16",
    "resolve_device",
    "resolve_precision",
    "use_channels_last",
]


class DeviceUnavailableError(ConfigError, ValueError):
    """A device or precision was asked for that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; otherwise the named device.

    Raises:
        DeviceUnavailableError: A CUDA device was asked for but none is available (a ``ValueError``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceUnavailableError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` = plain fp32).

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: Where the network runs.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise DeviceUnavailableError("fp16 autocast is only supported on CUDA; use bf16 or fp32 on CPU")
        return torch.float16
    if precision != "auto":
        raise DeviceUnavailableError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def use_channels_last(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether 3D convolutions should run in the channels-last-3d memory format.

    Only with reduced precision.  On the project CPU (AMX, ``benchmarks/bench_inference.py``,
    MONAI U-Net 16-256, 96³ windows) a bf16 network call takes 42-54 ms channels-last against
    55-57 ms contiguous, once the instance norms run on contiguous copies
    (:class:`medseg.infer.fastnet.ChannelsLastNorm`); whole sliding-window runs measured 1.13x and
    0.97x in two runs.  In fp32 channels-last measured 0.99-1.14x: not worth a layout change.
    On CUDA with AMP it is the tensor-core layout of cuDNN (not measured here, no GPU).
    """
    return dtype is not None and device.type in ("cpu", "cuda")
