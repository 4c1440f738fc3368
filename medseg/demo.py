"""``medseg demo``: the whole pipeline on the embedded phantom dataset, on CPU.

sample data -> plan -> MONAI transforms -> train a small 3D U-Net -> sliding-window
inference on the held-out cases -> label volumes on each input's own grid -> Dice
report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medseg.config import Config, load_config
from medseg.data.datasets import read_dataset
from medseg.errors import DatasetError
from medseg.evaluate import evaluate_folders
from medseg.infer.predictor import Predictor
from medseg.infer.run import predict_to_folder
from medseg.io.paths import refuse_input_overlap
from medseg.sample_data import generate_dataset
from medseg.train.loop import train
from medseg.types import PathLike

__all__ = ["DEMO_DATASET", "default_demo_config", "locate_sample_dataset", "run_demo"]

DEMO_DATASET = "Dataset001_CTPhantom"
_REPO = Path(__file__).resolve().parents[1]


def locate_sample_dataset() -> Path | None:
    """The committed sample dataset of a source checkout, if present."""
    for root in (Path.cwd(), _REPO):
        candidate = root / "sample_data" / DEMO_DATASET
        if (candidate / "dataset.json").is_file():
            return candidate
    return None


def default_demo_config() -> Config:
    """``configs/demo.yaml`` of the checkout, else the built-in defaults."""
    path = _REPO / "configs" / "demo.yaml"
    return load_config(path if path.is_file() else None)


def run_demo(
    out_dir: PathLike,
    *,
    config: Config | None = None,
    data: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the demo end to end and return its summary.

    Args:
        out_dir: Where the model, predictions and report go.
        config: Config (default: ``configs/demo.yaml``).
        data: A dataset folder with ``imagesTs``/``labelsTs``; default: the committed sample
            dataset, or a freshly generated one in ``out_dir/data``.
        overwrite: Replace outputs of a previous run in ``out_dir``.
        progress: Progress bars.
        log: Where progress lines go.

    Returns:
        Paths, timings and the evaluation summary (``mean_foreground_dice``).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    config = config or default_demo_config()
    dataset = Path(data) if data is not None else locate_sample_dataset()
    refuse_input_overlap([out], [dataset], what="output folder")
    if dataset is None:
        dataset = out / "data" / DEMO_DATASET
        if not (dataset / "dataset.json").is_file():
            log(f"generating the sample dataset in {dataset.parent} ...")
            generate_dataset(out / "data", DEMO_DATASET, overwrite=True)
    info = read_dataset(dataset)
    held_out = [c for c in info.test if c.label is not None]
    if not held_out:
        raise DatasetError(f"{dataset}: the demo needs held-out cases with references (imagesTs/ + labelsTs/)")
    log(f"dataset: {dataset} ({len(info.training)} training, {len(held_out)} held-out cases)")
    model_dir = train(info, config=config, out_dir=out / "model", overwrite=overwrite, progress=progress)
    t_train = time.perf_counter() - t0
    log(f"model: {model_dir}")
    predictor = Predictor(model_dir, progress=False)
    predictions = out / "predictions"
    inputs = [p for case in held_out for p in case.images]
    records = predict_to_folder(predictor, inputs, predictions, overwrite=overwrite, progress=progress)
    failed = [r for r in records if r["status"] != "done"]
    if failed:
        raise DatasetError("prediction failed for: " + "; ".join(f"{r['case']}: {r['error']}" for r in failed))
    log(f"predictions: {predictions}")
    report = out / "report"
    summary = evaluate_folders(
        predictions,
        dataset / "labelsTs",
        out_dir=report,
        label_names={k: v for k, v in info.label_names.items() if k != 0},
        images=dataset / "imagesTs",
        overwrite=overwrite,
    )
    wall = time.perf_counter() - t0
    log(f"report: {report / 'report.md'}")
    for name, stats in summary.get("classes", {}).items():
        dice = stats.get("dice", {}) if isinstance(stats, dict) else {}
        if isinstance(dice, dict) and "mean" in dice:
            log(f"  {name:<12} Dice {dice['mean']:.3f}")
    log(f"mean foreground Dice: {summary['mean_foreground_dice']:.4f}  (wall time {wall:.0f} s)")
    return {
        "dataset": str(dataset),
        "model": str(model_dir),
        "predictions": str(predictions),
        "report": str(report),
        "mean_foreground_dice": summary["mean_foreground_dice"],
        "train_seconds": round(t_train, 1),
        "wall_seconds": round(wall, 1),
        "summary": summary,
    }
