"""Build small real nnU-Net v2 model folders with nnU-Net's own planner and trainer (test fixtures).

Run as a script in a subprocess (the nnU-Net path variables are read at import time, so they are set
only in that process's environment)::

    nnUNet_raw=R nnUNet_preprocessed=P nnUNet_results=O python tests/nnunet_fixtures.py ROOT

``ROOT`` gets ``raw/``, ``preprocessed/``, ``results/`` and ``inputs/<dataset>/`` (held-out images, nnU-Net
file naming).  For every dataset: medseg phantoms written as an nnU-Net raw dataset -> nnU-Net's fingerprint
extractor -> nnU-Net's experiment planner (the default or a ResEnc preset) -> the plans shrunk for speed
(small features, a patch smaller than the images so that windows overlap) -> ``nnUNetTrainer`` initialised
from those plans with a fixed seed, trained for a few steps on patches of nnU-Net-preprocessed cases, its
segmentation heads scaled so that the logits are decisive -> ``trainer.save_checkpoint`` (the real
checkpoint format, pickled by nnU-Net itself).  ``results/<dataset>/<trainer>__<plans>__<config>/`` then
holds ``dataset.json``, ``plans.json`` and ``fold_<f>/checkpoint_final.pth`` (+ ``checkpoint_best.pth``).

nnU-Net's multiprocessing pools are replaced by thread pools (same code path, no ``spawn`` start-up).
"""

from __future__ import annotations

import json
import multiprocessing.dummy
import os
import sys
from pathlib import Path

import numpy as np

SEED = 1234

#: name -> (kind, number of training cases, number of test inputs)
DATASETS: dict[str, tuple[str, int, int]] = {
    "Dataset501_CT": ("ct", 4, 2),
    "Dataset502_MRMasked": ("mr", 4, 1),
    "Dataset503_Aniso": ("aniso", 4, 1),
    "Dataset504_Regions": ("regions", 4, 1),
}


# ------------------------------------------------------------------------------------- raw data
def _phantom_channels(kind: str, case: int) -> tuple[list, object]:
    """Image volumes and label of one case (medseg volumes, tilted grids)."""
    from medseg.io import Geometry, Volume
    from medseg.sample_data import make_phantom

    if kind == "mr":
        phantom = make_phantom(case, modality="MR")
        t1 = phantom.channels[0].array[0].astype(np.float32)
        body = t1 > 120  # skull-stripped style: exact zeros outside the body
        from scipy import ndimage

        body = ndimage.binary_opening(body, iterations=1)
        channels = [Volume(np.where(body, c.array[0], 0).astype(np.int16)[None], c.geometry) for c in phantom.channels]
        return channels, phantom.label
    phantom = make_phantom(case, modality="CT")
    if kind == "aniso":
        # the first ITK axis becomes the thick one: nnU-Net transposes it to the front and resamples
        # that axis separately (spacing ratio > 3)
        g = phantom.channels[0].geometry
        spacing = (4.5 + 0.3 * case, 1.2, 1.1 + 0.05 * case)
        geometry = Geometry.from_itk(shape=g.shape, spacing=spacing, origin=g.origin, direction=g.direction)
        ch = phantom.channels[0]
        return [Volume(ch.array, geometry)], Volume(phantom.label.array, geometry, kind="label")
    return list(phantom.channels), phantom.label


def write_raw_dataset(raw: Path, name: str, inputs: Path) -> None:
    """An nnU-Net raw dataset (imagesTr/labelsTr/dataset.json) plus held-out inputs."""
    from medseg.io import write_volume

    kind, n_train, n_test = DATASETS[name]
    folder = raw / name
    channel_names = {"0": "T1", "1": "T2"} if kind == "mr" else {"0": "CT"}
    labels: dict[str, object] = {"background": 0, "liver": 1, "kidney": 2, "lesion": 3}
    extra: dict[str, object] = {}
    if kind == "regions":
        labels = {"background": 0, "liver_all": [1, 3], "kidney": [2], "lesion": [3]}
        extra["regions_class_order"] = [1, 2, 3]
    for case in range(n_train + n_test):
        channels, label = _phantom_channels(kind, case)
        where, case_id = (folder / "imagesTr", f"case_{case:03d}") if case < n_train else (inputs / name, f"test_{case:03d}")
        for c, volume in enumerate(channels):
            write_volume(volume, where / f"{case_id}_{c:04d}.nii.gz", overwrite=True)
        if case < n_train:
            write_volume(label, folder / "labelsTr" / f"{case_id}.nii.gz", overwrite=True)
    dataset = {"channel_names": channel_names, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz", **extra}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


# ---------------------------------------------------------------------------------------- plans
def _shrink_architecture(config: dict, *, features: int = 4, max_features: int = 16) -> None:
    """Small features, at most 3 stages, and a patch about half the image so that windows overlap."""
    arch = config["architecture"]["arch_kwargs"]
    n = min(3, int(arch["n_stages"]))
    for key in ("kernel_sizes", "strides"):
        arch[key] = arch[key][:n]
    arch["n_stages"] = n
    arch["features_per_stage"] = [min(features * 2**i, max_features) for i in range(n)]
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in arch:
            arch[key] = [min(2, int(v)) for v in arch[key][:n]]
    arch["n_conv_per_stage_decoder"] = [1] * (n - 1)
    divisor = np.prod(np.asarray(arch["strides"]), axis=0)
    median = np.asarray(config["median_image_size_in_voxels"], dtype=float)
    patch = [max(int(d), int(d * round(m * 0.6 / d))) for d, m in zip(divisor, median, strict=True)]
    config["patch_size"] = patch
    config["batch_size"] = 2


def plan(name: str, planner: str) -> tuple[dict, str]:
    """Fingerprint + nnU-Net's planner; returns the shrunk plans and the plans identifier."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncM,
    )
    from nnunetv2.paths import nnUNet_preprocessed

    extractor = fingerprint_extractor.DatasetFingerprintExtractor(name, num_processes=1)
    extractor.num_foreground_voxels_for_intensitystats = 4e5  # default 1e8 samples: seconds per tiny case
    extractor.run(overwrite_existing=True)
    planner_class = {"default": ExperimentPlanner, "ResEncM": nnUNetPlannerResEncM}[planner]
    p = planner_class(name)
    p.plan_experiment()
    plans_path = Path(nnUNet_preprocessed) / name / f"{p.plans_identifier}.json"
    plans = json.loads(plans_path.read_text())
    for cname, config in plans["configurations"].items():
        if "architecture" in config:
            _shrink_architecture(config)
    plans_path.write_text(json.dumps(plans, indent=2))
    return plans, p.plans_identifier


# -------------------------------------------------------------------------------------- training
def _training_batch(trainer, cases: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> dict:
    """Random patches of preprocessed cases (nnU-Net's own preprocessing), labels as the trainer expects."""
    import torch

    patch = trainer.configuration_manager.patch_size
    lm = trainer.label_manager
    data, target = [], []
    for _ in range(int(trainer.configuration_manager.batch_size)):
        image, seg = cases[int(rng.integers(len(cases)))]
        if len(patch) == 2:  # 2d: one slice along the first axis
            z = int(rng.integers(image.shape[1]))
            image, seg = image[:, z], seg[:, z]
        pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, image.shape[1:], strict=True)]
        image = np.pad(image, pad)
        seg = np.pad(seg, pad)
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch, strict=True)]
        window = (slice(None), *(slice(a, a + p) for a, p in zip(start, patch, strict=True)))
        data.append(image[window])
        target.append(np.maximum(seg[window], 0))
    target_t = torch.from_numpy(np.stack(target).astype(np.int64))
    if lm.has_regions:
        regions = lm.foreground_regions
        onehot = torch.stack([torch.isin(target_t[:, 0], torch.as_tensor(r)) for r in [list(np.atleast_1d(r)) for r in regions]], 1)
        target_t = onehot.float()
    return {"data": torch.from_numpy(np.stack(data)).float(), "target": target_t}


def train_fold(name: str, plans: dict, plans_id: str, configuration: str, fold: int, *, steps: int) -> Path:
    """nnUNetTrainer from the plans, a few steps, decisive heads, checkpoint_final/best written by nnU-Net."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(SEED + fold)
    dataset_json = json.loads((Path(nnUNet_raw) / name / "dataset.json").read_text())
    plans = json.loads(json.dumps(plans))
    plans["continue_training"] = False
    trainer = nnUNetTrainer(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.enable_deep_supervision = False
    # initialize() infers the dataset class from the preprocessed folder; we feed batches ourselves
    data_dir = Path(trainer.preprocessed_dataset_folder)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "placeholder.b2nd").touch()
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    pm = PlansManager(trainer.plans_manager.plans)
    cm = pm.get_configuration(configuration)
    pre = DefaultPreprocessor(verbose=False)
    cases = []
    for label in sorted((Path(nnUNet_raw) / name / "labelsTr").glob("*.nii.gz")):
        case_id = label.name[: -len(".nii.gz")]
        images = sorted(str(p) for p in (Path(nnUNet_raw) / name / "imagesTr").glob(f"{case_id}_*.nii.gz"))
        data, seg, _ = pre.run_case(images, str(label), pm, cm, dataset_json)
        cases.append((data, seg))
    rng = np.random.default_rng(SEED + fold)
    trainer.network.train()
    outputs = [trainer.train_step(_training_batch(trainer, cases, rng)) for _ in range(steps)]
    trainer.on_train_epoch_end(outputs)  # logs numpy scalars, as every real checkpoint has them
    out = Path(trainer.output_folder)
    trainer.save_checkpoint(str(out / "checkpoint_best.pth"))
    with torch.no_grad():  # decisive logits: scale the segmentation heads (argmax boundaries stay where they are)
        for layer in trainer.network.decoder.seg_layers:
            layer.weight.mul_(8.0)
            layer.bias.mul_(8.0)
    trainer.save_checkpoint(str(out / "checkpoint_final.pth"))
    folder = out.parent
    (folder / "plans.json").write_text(json.dumps(trainer.plans_manager.plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    fingerprint = Path(nnUNet_preprocessed) / name / "dataset_fingerprint.json"
    (folder / "dataset_fingerprint.json").write_text(fingerprint.read_text())
    return folder


def _thread_pools() -> None:
    """nnU-Net's ``multiprocessing.get_context('spawn').Pool`` -> a thread pool (no interpreter start-up)."""
    import multiprocessing as mp

    class _Context:
        def __init__(self, real):
            self._real = real

        def Pool(self, processes=None, *args, **kwargs):  # noqa: N802 - mirrors multiprocessing's API
            return multiprocessing.dummy.Pool(processes or 1)

        def __getattr__(self, item):
            return getattr(self._real, item)

    real_get_context = mp.get_context
    mp.get_context = lambda method=None: _Context(real_get_context(method))  # type: ignore[assignment]


def build(root: Path) -> dict[str, dict[str, str]]:
    """Every fixture model; returns ``{dataset: {model key: folder}}`` (also written to ``root/models.json``)."""
    _thread_pools()
    inputs = root / "inputs"
    raw = Path(os.environ["nnUNet_raw"])
    models: dict[str, dict[str, str]] = {}
    recipes = {
        "Dataset501_CT": ("default", [("3d_fullres", 0), ("3d_fullres", 1), ("2d", 0)]),
        "Dataset502_MRMasked": ("ResEncM", [("3d_fullres", 0)]),
        "Dataset503_Aniso": ("default", [("3d_fullres", 0)]),
        "Dataset504_Regions": ("default", [("3d_fullres", 0)]),
    }
    for name, (planner, runs) in recipes.items():
        write_raw_dataset(raw, name, inputs)
        plans, plans_id = plan(name, planner)
        for configuration, fold in runs:
            if configuration not in plans["configurations"]:
                continue
            folder = train_fold(name, plans, plans_id, configuration, fold, steps=6)
            models.setdefault(name, {})[configuration] = str(folder)
    (root / "models.json").write_text(json.dumps(models, indent=2))
    return models


if __name__ == "__main__":
    sys.exit(0 if build(Path(sys.argv[1])) else 1)
