"""Time `medseg demo` end to end and print its Dice (the row in docs/benchmarks.md).

Usage: .venv/bin/python benchmarks/bench_demo.py [--out /tmp/medseg-demo-bench] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from medseg.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/medseg-demo-bench"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):
        shutil.rmtree(args.out, ignore_errors=True)
        t0 = time.perf_counter()
        result = run_demo(args.out, progress=False, log=lambda *_: None)
        wall = time.perf_counter() - t0
        per_class = {n: round(s["dice"]["mean"], 4) for n, s in result["summary"]["classes"].items()}
        rows.append(
            {
                "wall_s": round(wall, 1),
                "train_s": result["train_seconds"],
                "mean_dice": round(result["mean_foreground_dice"], 4),
                **per_class,
            }
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"machine": machine, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
