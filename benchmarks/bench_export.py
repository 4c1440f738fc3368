"""Exported models: time per window batch, ONNX Runtime / TorchScript vs the torch network (issue 13).

The model is exported to ONNX and TorchScript (``medseg.models.export.export_model``), then one batch of
windows (the model's patch, ``--batch`` windows, random input) runs through the networks the predictor
would use, interleaved round by round; medians:

* ``torch fp32``: the source network prepared by ``prepare_network`` in float32 (``--precision fp32``);
* ``torch bf16``: bf16 weights, channels-last (medseg's default on CPUs with AVX-512 BF16 / AMX);
* ``torchscript fp32`` / ``torchscript bf16``: the exported TorchScript file, prepared the same way;
* ``onnxruntime fp32``: the exported ONNX file in ONNX Runtime (CPU, torch's thread count).

Usage (one benchmark at a time on the shared machine)::

    flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_export.py --model demo_output/model
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medseg.infer.fastnet import prepare_network
from medseg.models.adapters import open_model
from medseg.models.export import export_model


def _time(net: torch.nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        net(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a medseg model directory or nnU-Net folder")
    parser.add_argument("--batch", type=int, default=2, help="windows per forward pass (default 2)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = open_model(args.model)
    patch = source.window.patch_size
    x = torch.randn((args.batch, source.num_channels, *patch), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        exports = {
            fmt: export_model(source, Path(tmp) / f"m.{suffix}") for fmt, suffix in (("onnx", "onnx"), ("ts", "pt"))
        }
        (onnx_net,) = open_model(exports["onnx"].path).load_networks()
        (script_net,) = open_model(exports["ts"].path).load_networks()
        (torch_net,) = source.load_networks()
        bf16 = dict(dtype=torch.bfloat16, channels_last=True)
        nets = {
            "torch fp32": (prepare_network(torch_net), x),
            "torch bf16": (prepare_network(torch_net, **bf16), x.to(torch.bfloat16)),  # type: ignore[arg-type]
            "torchscript fp32": (prepare_network(script_net), x),
            "torchscript bf16": (prepare_network(script_net, **bf16), x.to(torch.bfloat16)),  # type: ignore[arg-type]
            "onnxruntime fp32": (onnx_net, x),
        }
        for name, (net, inp) in nets.items():  # warm-up
            if "bf16" in name:
                inp = inp.contiguous(memory_format=torch.channels_last_3d)
                nets[name] = (net, inp)
            _time(net, inp)
        times: dict[str, list[float]] = {name: [] for name in nets}
        for _ in range(args.rounds):
            for name, (net, inp) in nets.items():
                times[name].append(_time(net, inp))
    base = statistics.median(times["torch fp32"])
    result = {
        "model": str(Path(args.model).resolve()),
        "patch": list(patch),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": os.getloadavg(),
        "medians_s": {name: round(statistics.median(t), 4) for name, t in times.items()},
    }
    print(json.dumps(result, indent=2))
    print("\n| network | median per batch (s) | ratio to torch fp32 |\n|---|---|---|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m:.4f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
