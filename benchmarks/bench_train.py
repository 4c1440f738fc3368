"""Training throughput on the shared BraTS 2013 cases: iterations/s, samples/s and time waiting on data.

Compares, in one process and interleaved in blocks (medians reported):

* ``cached``   -- the training pipeline as ``medseg train`` runs it: preprocessed cases in a
  MONAI ``CacheDataset`` (decoded, normalised and resampled once), per step only patch
  sampling and augmentation;
* ``uncached`` -- the baseline: the same transforms from the files at every step (MONAI
  ``Dataset``), i.e. decoding the NIfTI files and resampling every time;

both with the data loaded in the training process (``num_workers=0``) so the wait is fully
visible; then ``cached`` with one ``DataLoader`` worker (``num_workers=1``, the config's
setting) to show whether loading still stalls the model.

Run: ``flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_train.py [--steps 30]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, list_data_collate
from monai.losses import DiceCELoss

from medseg.config import load_config
from medseg.data.datasets import load_dataset
from medseg.data.plan import make_plan
from medseg.data.transforms import cache_transforms, random_transforms
from medseg.models.device import autocast, resolve_precision
from medseg.models.networks import build_network, deep_supervision_weights
from medseg.train.data import IterationSampler, PatchDataset, cached_dataset

REPO = Path(__file__).resolve().parents[1]


def _loader(data: Any, plan: Any, config: Any, *, start: int, stop: int, workers: int) -> Any:
    patches = PatchDataset(data, random_transforms(plan, config.train), seed=config.seed)
    sampler = IterationSampler(items_per_step=2, start=start, stop=stop)
    return iter(DataLoader(patches, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=list_data_collate))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="measured steps per mode")
    parser.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    args = parser.parse_args()
    config = load_config(REPO / "configs" / "brats2013.yaml")
    info = load_dataset(REPO / "configs" / "datasets" / "brats2013.yaml")
    plan = make_plan(info, config)
    print(
        f"patch {list(plan.patch_size)} at {plan.target_spacing} mm, batch 2, {plan.network.name} "
        f"{list(plan.network.channels)}, threads {torch.get_num_threads()}"
    )
    t0 = time.perf_counter()
    cached = cached_dataset(info.training, cache_transforms(plan), mode="memory")
    print(f"caching {len(info.training)} cases: {time.perf_counter() - t0:.1f} s (once per run)")
    uncached = cached_dataset(info.training, cache_transforms(plan), mode="none")
    device = torch.device("cpu")
    dtype = resolve_precision("auto", device)
    torch.manual_seed(0)
    network = build_network(plan.network).train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def step(batch: dict[str, torch.Tensor]) -> None:
        with autocast(device, dtype):
            out = network(batch["image"])
        weights = deep_supervision_weights(out.shape[1]) if out.ndim == 6 else [1.0]
        heads = [out[:, i] for i in range(out.shape[1])] if out.ndim == 6 else [out]
        loss = sum(w * loss_fn(h.float(), batch["label"]) for w, h in zip(weights, heads, strict=True))
        optimiser.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimiser.step()

    total = args.steps + args.block  # one warm-up block per mode
    loaders = {
        "cached": _loader(cached, plan, config, start=0, stop=total, workers=0),
        "uncached": _loader(uncached, plan, config, start=0, stop=total, workers=0),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in loaders}

    def run(name: str, it: Any, n: int, record: bool) -> None:
        for _ in range(n):
            t_a = time.perf_counter()
            batch = next(it)
            t_b = time.perf_counter()
            step(batch)
            t_c = time.perf_counter()
            if record:
                times.setdefault(name, []).append((t_b - t_a, t_c - t_b))

    for name, it in loaders.items():  # warm-up (oneDNN kernels, first decode)
        run(name, it, args.block, record=False)
    for _ in range(args.steps // args.block):
        for name, it in loaders.items():
            run(name, it, args.block, record=True)
    worker_it = _loader(cached, plan, config, start=0, stop=args.steps + args.block, workers=1)
    run("cached+1 worker", worker_it, args.block, record=False)
    run("cached+1 worker", worker_it, args.steps, record=True)

    print(f"{'mode':<18}{'s/step':>9}{'steps/s':>9}{'samples/s':>11}{'data wait':>11}")
    medians = {}
    for name, rows in times.items():
        per_step = statistics.median(w + c for w, c in rows)
        wait = sum(w for w, _ in rows) / sum(w + c for w, c in rows)
        medians[name] = per_step
        print(f"{name:<18}{per_step:>9.3f}{1 / per_step:>9.3f}{2 / per_step:>11.3f}{100 * wait:>10.1f}%")
    print(f"cached vs uncached (same process, interleaved): {medians['uncached'] / medians['cached']:.2f}x faster")


if __name__ == "__main__":
    main()
