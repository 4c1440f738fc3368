"""Device/precision choice, including the CUDA branches, tested on CPU by patching availability."""

from __future__ import annotations

import pytest
import torch

from medseg.models import device as dev


def test_auto_device_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        dev.resolve_device("cuda:0")


def test_auto_device_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "cuda"


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_autocast_dtype(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert dev.resolve_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, torch.bfloat16), (False, None)])
def test_cpu_autocast_dtype(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool, expected: torch.dtype | None) -> None:
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: bf16_ok)
    assert dev.resolve_precision("auto", torch.device("cpu")) == expected
    assert dev.resolve_precision("fp32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="CUDA"):
        dev.resolve_precision("fp16", torch.device("cpu"))


def test_autocast_context_runs_bf16_on_cpu() -> None:
    layer = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5, 5)
    with dev.autocast(torch.device("cpu"), torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with dev.autocast(torch.device("cpu"), None):
        assert layer(x).dtype == torch.float32
