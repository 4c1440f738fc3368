"""Training: dataset -> validation -> plan -> cached MONAI pipeline -> 3D U-Net -> model directory.

Iteration-based (a fixed budget of optimiser steps, like nnU-Net's epochs of 250
iterations), Dice+CE (with deep-supervision weights for DynUNet), AdamW or SGD with a
poly or cosine schedule, gradient clipping, bf16 autocast on CPUs that support it and
AMP on CUDA (``GradScaler`` for fp16).  Validation Dice per class (and per label union,
``train.val_regions``) every ``train.val_every`` iterations; checkpoints ``last`` and
``best`` with exact resume; DDP under ``torchrun``.

Output folder::

  model/
    config.yaml  plan.yaml  splits.json           written at the start
    train_log.csv                                 loss, lr, data wait, validation Dice per row
    checkpoints/last.pt, checkpoints/best.pt      full training state (resume with --resume)
    weights.pt  metrics.json                      the final model (what ``medseg predict`` loads)
"""

from __future__ import annotations

import contextlib
import csv
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from tqdm.auto import tqdm

from medseg.config import Config
from medseg.data.datasets import DatasetInfo, dataset_inputs, load_dataset, validate_dataset
from medseg.data.plan import Plan, load_plan, make_plan, save_plan
from medseg.data.transforms import cache_transforms, preprocess_transforms, random_transforms
from medseg.errors import ConfigError, DatasetError, MedsegError, OutputExistsError
from medseg.io.images import atomic_path, write_json_atomic
from medseg.io.paths import check_output_dir, refuse_input_overlap
from medseg.models.device import autocast, resolve_device, resolve_precision
from medseg.models.networks import build_network, deep_supervision_weights
from medseg.models.package import save_model
from medseg.train import distributed as D
from medseg.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from medseg.train.data import IterationSampler, PatchDataset, cached_dataset
from medseg.train.splits import make_split, split_cases
from medseg.types import PathLike

__all__ = ["TrainingInterrupted", "dice_per_class", "split_cases", "train"]

#: Called after every finished iteration with the iteration number (tests use it to interrupt runs).
on_iteration: Callable[[int], None] | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving ``checkpoints/last.pt``."""


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


def _region_dice(pred: torch.Tensor, ref: torch.Tensor, values: tuple[int, ...]) -> float:
    lut = torch.zeros(int(max(int(pred.max()), int(ref.max()), *values)) + 1, dtype=torch.bool)
    lut[list(values)] = True
    p, r = lut[pred.long()], lut[ref.long()]
    denom = int(p.sum()) + int(r.sum())
    return 2 * int((p & r).sum()) / denom if denom else math.nan


def _lr_lambda(schedule: str, total: int) -> Callable[[int], float]:
    if schedule == "poly":
        return lambda step: (1 - min(step, total - 1) / total) ** 0.9
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return lambda step: 1.0


# ----------------------------------------------------------------- setup helpers
def _check_outputs(out: Path, *, overwrite: bool, resume: bool) -> None:
    last = out / "checkpoints" / "last.pt"
    if resume:
        return
    for existing in (out / "weights.pt", last):
        if existing.exists() and not overwrite:
            raise OutputExistsError(existing)


def _clear_previous_run(out: Path) -> None:
    for name in ("weights.pt", "metrics.json", "train_log.csv", "splits.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("last.pt", "best.pt"):
        (out / "checkpoints" / name).unlink(missing_ok=True)


def _config_differences(a: Config, b: Config) -> list[str]:
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix[:-1]: d}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _plan_and_validate(
    info: DatasetInfo, config: Config, plan: Plan | None, *, progress: bool, log: Callable[[str], None]
) -> Plan:
    report = validate_dataset(
        info,
        seed=config.seed,
        group_pattern=config.train.group_pattern,
        progress=progress,
        expect_channels=[c.name for c in plan.channels] if plan is not None else None,
        expect_labels=dict(plan.labels) if plan is not None else None,
    )
    log(report.format())
    report.raise_for_problems()
    return plan if plan is not None else make_plan(info, config, scans=report.scans)


def _batch_items(config: Config, plan: Plan, world: int) -> tuple[int, int]:
    """(global items per step, global patches per step)."""
    tc = config.train
    batch = (plan.batch_size or 2) if tc.batch_size == "auto" else int(tc.batch_size)
    items = max(1, batch // tc.samples_per_volume)
    if items % world:
        raise ConfigError(
            f"train.batch_size {batch} gives {items} case(s) per step ({tc.samples_per_volume} patches each), "
            f"which cannot be split evenly over {world} processes"
        )
    return items, items * tc.samples_per_volume


def _preprocessing_key(plan: Plan) -> str:
    """Hash of everything the cached (deterministic) transforms depend on; names the disk-cache folder."""
    import hashlib
    import json

    relevant = plan.model_dump(
        mode="json", include={"channels", "labels", "target_spacing", "orientation", "patch_size"}
    )
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """First SIGINT/SIGTERM: stop after the current iteration (checkpoint saved); second SIGINT: abort."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------- validation
@torch.inference_mode()
def _validate(
    network: torch.nn.Module,
    data: Any,
    case_ids: list[str],
    *,
    plan: Plan,
    config: Config,
    device: torch.device,
    dtype: torch.dtype | None,
    dist: D.DistInfo,
) -> dict[str, Any]:
    """Dice per class and region on the network grid; cases sharded over ranks, results gathered."""
    regions = config.train.val_regions
    k = plan.num_classes

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return network(x).float()

    network.eval()
    mine: list[tuple[int, list[float], list[float]]] = []
    for local, index in enumerate(range(dist.rank, len(case_ids), dist.world_size)):
        item = data[local]
        image = torch.as_tensor(item["image"])[None].to(device)
        logits = sliding_window_inference(
            image,
            roi_size=plan.patch_size,
            sw_batch_size=config.infer.sw_batch_size,
            predictor=forward,
            overlap=config.infer.overlap,
            mode=config.infer.blend,
        )
        pred = torch.as_tensor(logits)[0].argmax(0).cpu()
        ref = torch.as_tensor(item["label"])[0].cpu()
        dice = dice_per_class(pred, ref, k)
        region = [_region_dice(pred, ref, tuple(v)) for v in regions.values()]
        mine.append((index, dice, region))
    network.train()
    results = sorted(r for part in D.all_gather_objects(dist, mine) for r in part)
    names = [plan.labels[c] for c in range(1, k)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (a class absent everywhere)
        per_class = np.nanmean(np.asarray([r[1] for r in results], dtype=float).reshape(-1, k - 1), axis=0)
        region_values = np.asarray([r[2] for r in results], dtype=float).reshape(len(results), len(regions))
        per_region = np.nanmean(region_values, axis=0) if regions else np.zeros(0)
        mean = float(np.nanmean(per_class)) if per_class.size else math.nan
    return {
        "val_dice": {n: float(s) for n, s in zip(names, per_class, strict=True)},
        "val_regions": {n: float(s) for n, s in zip(regions, per_region, strict=True)},
        "val_mean_dice": mean,
        "val_case_dice": {case_ids[i]: dict(zip(names, d, strict=True)) for i, d, _ in results},
    }


# ----------------------------------------------------------------- logging
def _log_columns(plan: Plan, config: Config) -> list[str]:
    names = [plan.labels[c] for c in range(1, plan.num_classes)]
    return [
        "iteration",
        "loss",
        "lr",
        "seconds",
        "data_wait",
        "val_mean_dice",
        *[f"val_dice_{n}" for n in names],
        *[f"val_region_{n}" for n in config.train.val_regions],
    ]


def _write_log(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with atomic_path(path, overwrite=True) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


# ----------------------------------------------------------------- the loop
def train(
    dataset: DatasetInfo | PathLike,
    *,
    config: Config | None = None,
    out_dir: PathLike,
    overwrite: bool = False,
    progress: bool = True,
    plan: Plan | PathLike | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a model and write its directory.

    Args:
        dataset: A dataset folder / YAML / CSV (see :func:`~medseg.data.datasets.load_dataset`)
            or its parsed description.
        config: Validated config; saved resolved into the model directory.  With ``resume`` it
            may be None (the checkpoint's config is used) and must otherwise equal it.
        out_dir: The model directory.
        overwrite: Replace an existing model directory's files (else refuse).
        progress: Show progress bars (rank 0).
        plan: A plan (or ``plan.yaml``) to use instead of planning from the dataset.
        resume: Continue from ``out_dir/checkpoints/last.pt`` (exactly, see :mod:`medseg.train.checkpoint`).
        log: Where report lines go (default: print when ``progress``; rank 0 only).

    Returns:
        The model directory.

    Raises:
        DatasetError: The dataset has problems (all listed).
        ConfigError / OutputExistsError / ModelError: Bad config or plan, existing outputs,
            unusable checkpoint.
        TrainingInterrupted: SIGINT/SIGTERM; ``checkpoints/last.pt`` holds the state to resume.
    """
    dist = D.init_distributed()
    try:
        return _train(
            dataset,
            config=config,
            out_dir=Path(out_dir),
            overwrite=overwrite,
            progress=progress and dist.is_main,
            plan=plan,
            resume=resume,
            log=log,
            dist=dist,
        )
    finally:
        D.cleanup(dist)


def _train(
    dataset: DatasetInfo | PathLike,
    *,
    config: Config | None,
    out_dir: Path,
    overwrite: bool,
    progress: bool,
    plan: Plan | PathLike | None,
    resume: bool,
    log: Callable[[str], None] | None,
    dist: D.DistInfo,
) -> Path:
    out = out_dir
    say: Callable[[str], None] = (
        (log or (print if progress else (lambda _msg: None))) if dist.is_main else (lambda _msg: None)
    )
    t_start = time.perf_counter()
    _check_outputs(out, overwrite=overwrite, resume=resume)
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(out / "checkpoints" / "last.pt")
        saved = Config.model_validate(state["config"])
        if config is not None and (diff := _config_differences(config, saved)):
            raise ConfigError(f"{out}: --resume needs the checkpoint's config; these keys differ: {', '.join(diff)}")
        config = saved
    if config is None:
        raise ConfigError("train() needs a config (or resume=True with a checkpoint)")
    tc = config.train
    info = dataset if isinstance(dataset, DatasetInfo) else load_dataset(dataset)
    plan_file = None if isinstance(plan, Plan) or plan is None or resume else plan
    refuse_input_overlap([out], [*dataset_inputs(info), plan_file], what="model folder")  # before any work
    check_output_dir(out, what="model folder")
    given: Plan | None = plan if isinstance(plan, Plan) or plan is None else load_plan(plan)

    # ------------------------------------------------------------ validate, plan, split (rank 0 decides)
    if state is not None:
        the_plan = Plan.model_validate(state["plan"])
        payload: Any = None
    else:
        payload = None
        if dist.is_main:
            try:
                the_plan = _plan_and_validate(info, config, given, progress=progress, log=say)
                payload = ("ok", the_plan.model_dump(mode="json"))
            except Exception as exc:
                payload = ("error", f"{type(exc).__name__}: {exc}")
                if not dist.enabled:
                    raise
                D.broadcast_object(dist, payload)
                raise
        payload = D.broadcast_object(dist, payload)
        if payload[0] == "error":
            raise MedsegError(f"rank 0 failed: {payload[1]}")
        the_plan = Plan.model_validate(payload[1])
    train_cases, val_cases, split = make_split(info, tc, seed=config.seed)
    if state is not None and state.get("split", {}).get("train") != split["train"]:
        raise DatasetError(f"{out}: the dataset's cases differ from the checkpoint's split; cannot resume exactly")
    items, batch = _batch_items(config, the_plan, dist.world_size)
    if dist.is_main and state is None:
        from medseg.config import save_config

        if overwrite:  # only now that the new run is known to be able to start
            _clear_previous_run(out)
        save_config(config, out / "config.yaml")
        save_plan(the_plan, out / "plan.yaml")
        write_json_atomic(out / "splits.json", split)
    say(
        f"training on {len(train_cases)} case(s), validating on {len(val_cases)} ({split['method']}); "
        f"patch {list(the_plan.patch_size)} at {[round(s, 3) for s in the_plan.target_spacing]} mm, "
        f"batch {batch} ({dist.world_size} process(es)), network {the_plan.network.name} "
        f"{list(the_plan.network.channels)}"
    )

    # ------------------------------------------------------------ determinism and data
    set_determinism(seed=config.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cache_dir = out / "cache" / _preprocessing_key(the_plan) if tc.cache == "disk" else None
    train_data = cached_dataset(
        train_cases,
        cache_transforms(the_plan),
        mode=tc.cache,
        cache_dir=cache_dir,
        num_workers=tc.num_workers,
        progress=progress,
    )
    patches = PatchDataset(train_data, random_transforms(the_plan, tc), seed=config.seed)
    val_mine = [c for i, c in enumerate(val_cases) if i % dist.world_size == dist.rank]
    val_data = cached_dataset(
        val_mine, preprocess_transforms(the_plan, with_label=True), mode=tc.cache if tc.cache != "disk" else "memory"
    )
    start = int(state["iteration"]) if state is not None else 0
    sampler = IterationSampler(
        items_per_step=items, start=start, stop=tc.iterations, rank=dist.rank, world_size=dist.world_size
    )
    loader = DataLoader(
        patches,  # type: ignore[arg-type]  # map-style: __getitem__ + __len__
        batch_size=items // dist.world_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        collate_fn=list_data_collate,
        persistent_workers=False,
    )

    # ------------------------------------------------------------ model and optimisation
    try:
        device = dist.device or resolve_device(config.infer.device)
        dtype = resolve_precision(tc.precision, device)
    except ValueError as exc:
        raise ConfigError(f"train.precision / infer.device: {exc}") from None
    torch.manual_seed(config.seed)
    network = build_network(the_plan.network).to(device)
    model: torch.nn.Module = network
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=tc.batch_dice)
    optimiser: torch.optim.Optimizer
    if tc.optimizer == "sgd":
        optimiser = torch.optim.SGD(
            network.parameters(), lr=tc.learning_rate, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay
        )
    else:
        optimiser = torch.optim.AdamW(network.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(tc.lr_schedule, tc.iterations))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    best: dict[str, Any] = {"metric": None, "iteration": None}
    rows: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    elapsed_before = 0.0
    if state is not None:
        network.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        best = dict(state["best"])
        rows = list(state["rows"])
        metrics = dict(state.get("metrics", {}))
        elapsed_before = float(state.get("elapsed", 0.0))
        say(f"resumed from {out / 'checkpoints' / 'last.pt'} at iteration {start}")
    columns = _log_columns(the_plan, config)
    writer = _tensorboard(out) if dist.is_main else None

    def snapshot(iteration: int) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "model": network.state_dict(),
            "optimizer": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": capture_rng(),
            "best": best,
            "rows": rows,
            "metrics": metrics,
            "elapsed": elapsed_before + time.perf_counter() - t_loop,
            "config": config.model_dump(mode="json"),
            "plan": the_plan.model_dump(mode="json"),
            "split": split,
            "world_size": dist.world_size,
        }

    def save(kind: str, iteration: int) -> None:
        if dist.is_main:
            save_checkpoint(out / "checkpoints" / f"{kind}.pt", snapshot(iteration))
            _write_log(out / "train_log.csv", rows, columns)

    # ------------------------------------------------------------ iterate
    ds_weights: list[float] | None = None
    running: float | None = None
    wait_total = 0.0
    t_loop = time.perf_counter()
    bar = tqdm(total=tc.iterations, initial=start, desc="train", disable=not progress, unit="it", dynamic_ncols=True)
    batches = iter(loader)
    step = start
    model.train()
    with _stop_on_signals() as flag:
        for step in range(start + 1, tc.iterations + 1):
            t_wait = time.perf_counter()
            batch_data = next(batches)
            wait = time.perf_counter() - t_wait
            t_compute = time.perf_counter()
            image = batch_data["image"].to(device, non_blocking=True)
            label = batch_data["label"].to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = model(image)
            if logits.ndim == 6:  # deep supervision: (B, heads, K, X, Y, Z)
                ds_weights = ds_weights or deep_supervision_weights(logits.shape[1])
                loss = sum(w * loss_fn(logits[:, i].float(), label) for i, w in enumerate(ds_weights))
            else:
                loss = loss_fn(logits.float(), label)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[union-attr]
            if tc.grad_clip:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(network.parameters(), tc.grad_clip)
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            value = D.mean(dist, float(loss.detach()), device)  # type: ignore[union-attr]
            compute = time.perf_counter() - t_compute
            wait_total += wait
            running = value if running is None else 0.95 * running + 0.05 * value
            lr = scheduler.get_last_lr()[0]
            row: dict[str, Any] = {
                "iteration": step,
                "loss": round(value, 6),
                "lr": lr,
                "seconds": round(elapsed_before + time.perf_counter() - t_loop, 3),
                "data_wait": round(wait / max(wait + compute, 1e-9), 4),
            }
            validate_now = bool(val_cases) and ((tc.val_every and step % tc.val_every == 0) or step == tc.iterations)
            if validate_now:
                result = _validate(
                    network,
                    val_data,
                    [c.case_id for c in val_cases],
                    plan=the_plan,
                    config=config,
                    device=device,
                    dtype=dtype,
                    dist=dist,
                )
                row["val_mean_dice"] = result["val_mean_dice"]
                row.update({f"val_dice_{n}": v for n, v in result["val_dice"].items()})
                row.update({f"val_region_{n}": v for n, v in result["val_regions"].items()})
                metrics = {k: result[k] for k in ("val_dice", "val_regions", "val_mean_dice", "val_case_dice")}
                metrics["val_iteration"] = step
                say(
                    f"iteration {step}: validation mean Dice {result['val_mean_dice']:.4f} "
                    + " ".join(f"{n}={v:.3f}" for n, v in {**result["val_dice"], **result["val_regions"]}.items())
                )
            rows.append(row)
            if validate_now:
                score = row["val_mean_dice"]
                if not math.isnan(score) and (best["metric"] is None or score > best["metric"]):
                    best = {"metric": score, "iteration": step}
                    save("best", step)
            if writer is not None:
                for key, v in row.items():
                    if key != "iteration" and isinstance(v, (int, float)) and not math.isnan(v):
                        writer.add_scalar(key, v, step)
            bar.update(1)
            bar.set_postfix(
                loss=f"{running:.3f}", lr=f"{lr:.1e}", data=f"{100 * wait / max(wait + compute, 1e-9):.0f}%"
            )
            if flag["stop"]:
                save("last", step)
                bar.close()
                say(f"interrupted: state saved at iteration {step}; continue with --resume")
                raise TrainingInterrupted(f"stopped at iteration {step}")
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != tc.iterations:
                save("last", step)
            if on_iteration is not None:
                on_iteration(step)
    bar.close()
    save("last", tc.iterations)
    if writer is not None:
        writer.close()
    train_seconds = elapsed_before + time.perf_counter() - t_loop
    done = max(tc.iterations - start, 1)
    metrics.update(
        {
            "iterations": tc.iterations,
            "final_loss_ema": running,
            "best_val_mean_dice": best["metric"],
            "best_iteration": best["iteration"],
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(elapsed_before + time.perf_counter() - t_start, 1),
            "samples_per_second": round(batch * done / max(time.perf_counter() - t_loop, 1e-9), 3),
            "data_wait_fraction": round(wait_total / max(time.perf_counter() - t_loop, 1e-9), 4),
            "batch_size": batch,
            "world_size": dist.world_size,
            "device": str(device),
            "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
        }
    )
    if dist.is_main:
        save_model(out, config=config, plan=the_plan, state_dict=network.state_dict(), metrics=metrics)
    D.barrier(dist)
    return out
