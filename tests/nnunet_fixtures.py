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
import time
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
        where, case_id = (
            (folder / "imagesTr", f"case_{case:03d}") if case < n_train else (inputs / name, f"test_{case:03d}")
        )
        for c, volume in enumerate(channels):
            write_volume(volume, where / f"{case_id}_{c:04d}.nii.gz", overwrite=True)
        if case < n_train:
            write_volume(label, folder / "labelsTr" / f"{case_id}.nii.gz", overwrite=True)
    dataset = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        **extra,
    }
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
    patch = [max(int(d), int(d * round(m * 0.7 / d))) for d, m in zip(divisor, median, strict=True)]
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
    for config in plans["configurations"].values():
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
        onehot = torch.stack(
            [torch.isin(target_t[:, 0], torch.as_tensor(r)) for r in [list(np.atleast_1d(r)) for r in regions]], 1
        )
        target_t = onehot.float()
    return {"data": torch.from_numpy(np.stack(data)).float(), "target": target_t}


_PREPROCESSED: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}


def _preprocessed_cases(
    name: str, plans: dict, configuration: str, dataset_json: dict
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Training cases through nnU-Net's DefaultPreprocessor (once per dataset and configuration)."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    key = (name, configuration)
    if key not in _PREPROCESSED:
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        pre = DefaultPreprocessor(verbose=False)
        cases = []
        for label in sorted((Path(nnUNet_raw) / name / "labelsTr").glob("*.nii.gz")):
            case_id = label.name[: -len(".nii.gz")]
            images = sorted(str(p) for p in (Path(nnUNet_raw) / name / "imagesTr").glob(f"{case_id}_*.nii.gz"))
            data, seg, _ = pre.run_case(images, str(label), pm, cm, dataset_json)
            cases.append((data, seg))
        _PREPROCESSED[key] = cases
    return _PREPROCESSED[key]


def train_fold(
    name: str, plans: dict, plans_id: str, configuration: str, fold: int, *, steps: int, mirror_axes: tuple | None
) -> Path:
    """nnUNetTrainer from the plans, a few steps, decisive heads, checkpoint_final/best written by nnU-Net."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(SEED + fold)
    dataset_json = json.loads((Path(nnUNet_raw) / name / "dataset.json").read_text())
    plans = json.loads(json.dumps(plans))
    plans["continue_training"] = False
    trainer = nnUNetTrainer(
        plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=torch.device("cpu")
    )
    trainer.enable_deep_supervision = False
    # initialize() infers the dataset class from the preprocessed folder; we feed batches ourselves
    data_dir = Path(trainer.preprocessed_dataset_folder)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "placeholder.b2nd").touch()
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    if mirror_axes is not None:  # as trainer variants restricting mirroring do (fewer flips: cheaper tests)
        trainer.inference_allowed_mirroring_axes = mirror_axes
    cases = _preprocessed_cases(name, trainer.plans_manager.plans, configuration, dataset_json)
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


def _log(text: str) -> None:
    print(f"[fixtures] {text}", file=sys.stderr, flush=True)


def _thread_pools() -> None:
    """nnU-Net's ``multiprocessing.get_context('spawn').Pool`` -> a thread pool (no interpreter start-up)."""
    import multiprocessing as mp

    class _Context:
        def __init__(self, real):
            self._real = real

        def Pool(self, processes=None, *args, **kwargs):  # mirrors multiprocessing's API
            return multiprocessing.dummy.Pool(processes or 1)

        def __getattr__(self, item):
            return getattr(self._real, item)

    real_get_context = mp.get_context
    mp.get_context = lambda method=None: _Context(real_get_context(method))  # type: ignore[assignment]


# ----------------------------------------------------------------------------------- references
#: name -> (dataset, configuration, folds, mirroring, test case, plans reader override, probabilities)
SCENARIOS: dict[str, tuple[str, str, tuple[int, ...], bool, str, str | None, bool]] = {
    "ct_2folds": ("Dataset501_CT", "3d_fullres", (0, 1), False, "test_004", None, False),
    "ct_mirror": ("Dataset501_CT", "3d_fullres", (0,), True, "test_005", None, False),
    "ct_2d_mirror": ("Dataset501_CT", "2d", (0,), True, "test_004", None, False),
    "ct_nibabel_reorient": ("Dataset501_CT", "3d_fullres", (0,), False, "test_005", "NibabelIOWithReorient", False),
    "ct_sitk_reorient": ("Dataset501_CT", "3d_fullres", (0,), False, "test_005", "SimpleITKIOWithReorient", False),
    "mr_mask": ("Dataset502_MRMasked", "3d_fullres", (0,), False, "test_004", None, True),
    "aniso": ("Dataset503_Aniso", "3d_fullres", (0,), False, "test_004", None, False),
    "regions": ("Dataset504_Regions", "3d_fullres", (0,), False, "test_004", None, True),
}


def _reader_variant(folder: Path, reader: str, out: Path) -> Path:
    """A copy of a model folder whose plans name another image reader (same weights)."""
    import shutil

    target = out / folder.parent.name / folder.name
    if not target.exists():
        shutil.copytree(folder, target)
        plans = json.loads((target / "plans.json").read_text())
        plans["image_reader_writer"] = reader
        (target / "plans.json").write_text(json.dumps(plans, indent=2))
    return target


def reference(
    folder: Path, files: list[str], folds: tuple[int, ...], mirror: bool, out: Path, probabilities: bool
) -> None:
    """nnUNetPredictor on ``files``: logits on the cropped input grid and labels, float32 accumulation.

    nnU-Net blends windows in float16 buffers; they are made float32 here (``torch.half`` swapped for the
    call) so that the logits can be compared tightly; the stock predictor is used end to end below.
    """
    import torch
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(
        tile_step_size=0.5,
        use_mirroring=mirror,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    p.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    image, props = p.plans_manager.image_reader_writer_class().read_images(files)
    dct = next(
        PreprocessAdapterFromNpy(
            [image],
            [None],
            [props],
            [None],
            p.plans_manager,
            p.dataset_json,
            p.configuration_manager,
            num_threads_in_multithreaded=1,
        )
    )
    half, torch.half = torch.half, torch.float32
    try:
        logits = p.predict_logits_from_preprocessed_data(dct["data"]).cpu()
    finally:
        torch.half = half
    props = dct["data_properties"]
    cm = p.configuration_manager
    spacing_t = [props["spacing"][i] for i in p.plans_manager.transpose_forward]
    current = cm.spacing if len(cm.spacing) == 3 else [spacing_t[0], *cm.spacing]
    back = cm.resampling_fn_probabilities(
        logits, props["shape_after_cropping_and_before_resampling"], current, spacing_t
    )
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", np.asarray(back, dtype=np.float32))
    result = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, p.plans_manager, cm, p.label_manager, props, return_probabilities=probabilities
    )
    seg, probs = result if probabilities else (result, None)
    np.save(out / "seg.npy", np.asarray(seg))
    if probs is not None:
        np.save(out / "probabilities.npy", np.asarray(probs, dtype=np.float32))
    bbox = [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]]
    (out / "meta.json").write_text(json.dumps({"bbox": bbox, "files": files}))


def end_to_end(folder: Path, inputs: Path, out: Path, folds: tuple[int, ...]) -> None:
    """The stock predictor, file to file (``predict_from_files_sequential``: no worker processes)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(
        tile_step_size=0.5,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    p.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    out.mkdir(parents=True, exist_ok=True)
    p.predict_from_files_sequential(str(inputs), str(out), save_probabilities=False, overwrite=True)


def build(root: Path) -> dict[str, dict[str, str]]:
    """Every fixture model and reference; returns ``{dataset: {configuration: folder}}`` (``root/models.json``)."""
    _thread_pools()
    inputs = root / "inputs"
    raw = Path(os.environ["nnUNet_raw"])  # noqa: SIM112 - nnU-Net's own variable name
    models: dict[str, dict[str, str]] = {}
    recipes = {  # (configuration, fold, mirroring axes saved in the checkpoint: None = the trainer's)
        "Dataset501_CT": ("default", [("3d_fullres", 0, (0, 2)), ("3d_fullres", 1, (0, 2)), ("2d", 0, (1,))]),
        "Dataset502_MRMasked": ("ResEncM", [("3d_fullres", 0, None)]),
        "Dataset503_Aniso": ("default", [("3d_fullres", 0, None)]),
        "Dataset504_Regions": ("default", [("3d_fullres", 0, None)]),
    }
    for name, (planner, runs) in recipes.items():
        t0 = time.perf_counter()
        write_raw_dataset(raw, name, inputs)
        t1 = time.perf_counter()
        plans, plans_id = plan(name, planner)
        t2 = time.perf_counter()
        for configuration, fold, axes in runs:
            if configuration not in plans["configurations"]:
                continue
            folder = train_fold(name, plans, plans_id, configuration, fold, steps=3, mirror_axes=axes)
            models.setdefault(name, {})[configuration] = str(folder)
        _log(f"{name}: raw {t1 - t0:.1f} s, plan {t2 - t1:.1f} s, train {time.perf_counter() - t2:.1f} s")
    for name, (dataset, configuration, folds, mirror, case, reader, probs) in SCENARIOS.items():
        folder = Path(models[dataset][configuration])
        if reader is not None:
            folder = _reader_variant(folder, reader, root / "variants" / reader)
        files = sorted(str(f) for f in (inputs / dataset).glob(f"{case}_*.nii.gz"))
        t0 = time.perf_counter()
        reference(folder, files, folds, mirror, root / "reference" / name, probs)
        _log(f"reference {name}: {time.perf_counter() - t0:.1f} s")
        models.setdefault("scenarios", {})[name] = str(folder)  # type: ignore[assignment]
    end_to_end(Path(models["Dataset501_CT"]["3d_fullres"]), inputs / "Dataset501_CT", root / "end_to_end", (0, 1))
    (root / "models.json").write_text(json.dumps(models, indent=2))
    return models


if __name__ == "__main__":
    sys.exit(0 if build(Path(sys.argv[1])) else 1)
