"""Training: plan -> cached MONAI pipeline -> 3D U-Net with Dice+CE -> model directory.

Iteration-based (a fixed budget of optimiser steps, like nnU-Net's epochs of 250
iterations), with a poly or cosine learning-rate schedule, gradient clipping, bf16
autocast on CPUs that support it and AMP on CUDA.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from tqdm.auto import tqdm

from medseg.config import Config
from medseg.data.datasets import Case, DatasetInfo, read_dataset
from medseg.data.plan import make_plan
from medseg.data.transforms import preprocess_transforms, train_transforms
from medseg.errors import OutputExistsError, reraise_medseg
from medseg.models.device import autocast, resolve_device, resolve_precision
from medseg.models.networks import build_network
from medseg.models.package import LoadedModel, save_model
from medseg.types import PathLike

__all__ = ["dice_per_class", "split_cases", "train"]


def split_cases(cases: list[Case], *, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Random train/validation split (at least one training case)."""
    if val_fraction <= 0 or len(cases) < 2:
        return list(cases), []
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of classes ``1..num_classes-1`` (NaN where both are empty).

    Args:
        pred: Integer labels, any shape.
        ref: Integer labels, same shape.
        num_classes: Number of classes including background.
    """
    k = num_classes
    counts = torch.bincount((ref.long() * k + pred.long()).ravel(), minlength=k * k).reshape(k, k)
    out = []
    for c in range(1, k):
        tp = counts[c, c].item()
        denom = counts[c, :].sum().item() + counts[:, c].sum().item()
        out.append(2 * tp / denom if denom else math.nan)
    return out


def _lr_lambda(schedule: str, total: int) -> Any:
    if schedule == "poly":
        return lambda step: (1 - min(step, total - 1) / total) ** 0.9
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return lambda step: 1.0


def _infinite(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def _validate(model: LoadedModel, cases: list[Case], *, progress: bool) -> dict[str, Any]:
    """Mean Dice per class on the network grid of the validation cases."""
    from medseg.infer.predictor import Predictor

    predictor = Predictor(model, progress=False)
    pre = preprocess_transforms(model.plan, with_label=True)
    per_case = []
    for case in tqdm(cases, desc="validate", disable=not progress, leave=False):
        with reraise_medseg():
            item = pre(case.to_dict())
        logits = predictor.predict_logits(item["image"][None])[0]
        per_case.append(dice_per_class(logits.argmax(0), torch.as_tensor(item["label"][0]), model.plan.num_classes))
    scores = np.nanmean(np.asarray(per_case, dtype=float), axis=0) if per_case else np.array([])
    names = [model.plan.labels[c] for c in range(1, model.plan.num_classes)]
    return {
        "val_dice": {n: float(s) for n, s in zip(names, scores, strict=True)},
        "val_mean_dice": float(np.nanmean(scores)) if len(scores) else math.nan,
    }


def train(
    dataset: DatasetInfo | PathLike,
    *,
    config: Config,
    out_dir: PathLike,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train a model and write its directory.

    Args:
        dataset: A dataset folder (MSD / nnU-Net layout) or its parsed description.
        config: Validated config; saved resolved into the model directory.
        out_dir: The model directory to create.
        overwrite: Replace an existing model directory's files.
        progress: Show progress bars.

    Returns:
        The model directory (``config.yaml``, ``plan.yaml``, ``weights.pt``, ``metrics.json``,
        ``train_log.csv``).
    """
    out = Path(out_dir)
    if (out / "weights.pt").exists() and not overwrite:
        raise OutputExistsError(out / "weights.pt")
    info = dataset if isinstance(dataset, DatasetInfo) else read_dataset(dataset)
    set_determinism(seed=config.seed)
    t_start = time.perf_counter()
    plan = make_plan(info, config)
    train_cases, val_cases = split_cases(info.training, val_fraction=config.train.val_fraction, seed=config.seed)
    tc = config.train
    with reraise_medseg():
        data = CacheDataset(
            [c.to_dict() for c in train_cases],
            transform=train_transforms(plan, tc),
            cache_rate=1.0,
            num_workers=0,
            progress=False,
        )
    loader = DataLoader(
        data,
        batch_size=max(1, tc.batch_size // tc.samples_per_volume),
        shuffle=True,
        num_workers=tc.num_workers,
        collate_fn=list_data_collate,
        drop_last=False,
    )
    device = resolve_device(config.infer.device)
    dtype = resolve_precision(tc.precision, device)
    network = build_network(plan.network).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimiser = torch.optim.AdamW(network.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(tc.lr_schedule, tc.iterations))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    log_rows: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    batches = _infinite(loader)
    running = None
    bar = tqdm(range(1, tc.iterations + 1), desc="train", disable=not progress, unit="it")
    network.train()
    for step in bar:
        batch = next(batches)
        image, label = batch["image"].to(device), batch["label"].to(device)
        with autocast(device, dtype):
            logits = network(image)
        loss = loss_fn(logits.float(), label)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip:
            scaler.unscale_(optimiser)
            torch.nn.utils.clip_grad_norm_(network.parameters(), tc.grad_clip)
        scaler.step(optimiser)
        scaler.update()
        scheduler.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        row: dict[str, Any] = {"iteration": step, "loss": value, "lr": scheduler.get_last_lr()[0]}
        if val_cases and tc.val_every and (step % tc.val_every == 0 or step == tc.iterations):
            network.eval()
            row.update(_validate(LoadedModel(out, config, plan, network), val_cases, progress=progress))
            network.train()
            metrics = {k: row[k] for k in ("val_dice", "val_mean_dice")}
        log_rows.append(row)
    network.eval()
    metrics.update(
        {
            "iterations": tc.iterations,
            "final_loss_ema": running,
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
            "train_seconds": round(time.perf_counter() - t_start, 1),
            "device": str(device),
            "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
        }
    )
    _write_log(out / "train_log.csv", log_rows)
    save_model(out, config=config, plan=plan, state_dict=network.state_dict(), metrics=metrics)
    return out


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    from medseg.io.images import atomic_path

    with atomic_path(path, overwrite=True) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["iteration", "loss", "lr", "val_mean_dice"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
