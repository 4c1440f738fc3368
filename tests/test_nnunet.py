"""nnU-Net v2 model folders through the model seam: parity with nnUNetPredictor, bad input, security.

The fixtures (``tests/nnunet_fixtures.py``, run once per session in a subprocess with its own nnU-Net
paths) are real nnU-Net folders: medseg phantoms planned by nnU-Net's planner (default and ResEnc M),
networks from ``nnUNetTrainer`` (a few steps, heads scaled for decisive logits) saved by the trainer
itself, and nnUNetPredictor's outputs for each scenario.

Tolerances (fp32 on both sides): nnU-Net blends windows in float16 buffers, which changes its logits
by up to ~1 % of their magnitude near window borders; the reference runs with those buffers in float32,
and then medseg's logits on the cropped input grid agree to ``LOGIT_ATOL`` (max abs, float32 rounding
of the separable resampling and of the blending order) and the labels on >= 99.9 % of voxels (they are
identical in practice).  The stock predictor (float16 buffers) is compared end to end through the CLI.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.config import InferConfig
from medseg.errors import MedsegError, ModelError
from medseg.infer.crop import CT_BODY_HU
from medseg.infer.predictor import Predictor
from medseg.io import Geometry, Volume, load_volume
from medseg.models.adapters import NnUNetRecipe, open_model

pytest.importorskip("nnunetv2", reason="nnunetv2 (test extra) builds the reference folders")
pytest.importorskip("dynamic_network_architectures")


#: Max |logit difference| on the cropped input grid (logits reach ~100 in magnitude).
LOGIT_ATOL = 1e-3
#: Share of voxels with the same label.
LABEL_AGREEMENT = 0.999


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny networks: one thread avoids OpenMP spin-waiting on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scenario(nnunet_root: Path, models: dict, name: str) -> tuple[Path, Path, list[Path]]:
    ref = nnunet_root / "reference" / name
    meta = json.loads((ref / "meta.json").read_text())
    return Path(models["scenarios"][name]), ref, [Path(f) for f in meta["files"]]


# ------------------------------------------------------------------------------------- parity
SCENARIOS = {
    # name: (folds, mirroring)
    "ct_2folds": ("0,1", False),  # CT normalisation, 2 folds ensembled
    "ct_mirror": ("0", True),  # mirroring on (the checkpoint allows axes 0 and 2)
    "ct_2d_mirror": ("0", True),  # 2d configuration, mirroring on its axis 1
    "ct_nibabel_reorient": ("0", False),  # NibabelIOWithReorient reader, flipped + tilted input
    "ct_sitk_reorient": ("0", False),  # SimpleITKIOWithReorient reader
    "mr_mask": ("0", False),  # two MR channels, z-score with use_mask_for_norm, crop to non-zero, ResEnc M
    "aniso": ("0", False),  # anisotropic: transposed plan, separate-z resampling
    "regions": ("0", False),  # region-based: sigmoid + regions_class_order
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_logits_and_labels_match_nnunet_predictor(nnunet_root: Path, models: dict, name: str) -> None:
    folder, ref, files = _scenario(nnunet_root, models, name)
    folds, mirror = SCENARIOS[name]
    adapter = open_model(folder, folds=folds)
    axes = adapter.window.allowed_mirror_axes if mirror else ()
    settings = InferConfig(precision="fp32", logits_dtype="float32", mirror_axes=axes, body_crop="none")
    predictor = Predictor(adapter, infer=settings)
    channels = [load_volume(f) for f in files]
    logits, prepared = predictor.pipeline.logits(channels)
    expected = np.load(ref / "logits.npy")
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= LOGIT_ATOL
    bbox = json.loads((ref / "meta.json").read_text())["bbox"]
    assert [[s.start, s.stop] for s in prepared.box] == bbox

    with_probs = (ref / "probabilities.npy").is_file()
    result = predictor.predict_case(channels, probabilities="float32" if with_probs else None)
    labels = result.labels.array[0]
    ref_seg = np.load(ref / "seg.npy")  # nnU-Net's output array for its reader (before writing)
    recipe = adapter.preprocessing
    assert isinstance(recipe, NnUNetRecipe)
    from medseg.infer.nnunet import reader_axes

    mapping = reader_axes(recipe.reader, channels[0].geometry)
    expected_labels = np.asarray(mapping.backward(ref_seg))
    assert labels.shape == expected_labels.shape == channels[0].geometry.shape
    assert np.mean(labels == expected_labels) >= LABEL_AGREEMENT
    assert result.labels.geometry == channels[0].geometry
    assert len(np.unique(labels)) > 1  # the networks are decisive: a meaningful comparison
    if with_probs:
        probs = np.load(ref / "probabilities.npy")  # (K, *nnU-Net array)
        mine = result.probabilities.array
        assert mine.shape == (probs.shape[0], *labels.shape)
        assert np.abs(mine - np.asarray(mapping.backward(probs))).max() <= 1e-4


def _with_air(volume: Volume, pad: tuple[tuple[int, int], ...]) -> Volume:
    """The volume inside a larger field of view of air (-1024 HU), same spacing and direction."""
    array = np.pad(volume.array, ((0, 0), *pad), constant_values=-1024)
    g = volume.geometry
    origin = np.asarray(g.affine)[:3, :3] @ -np.array([p[0] for p in pad], dtype=float) + np.asarray(g.affine)[:3, 3]
    affine = np.asarray(g.affine).copy()
    affine[:3, 3] = origin
    return Volume(array=array, geometry=Geometry(affine=affine, shape=array.shape[1:]), source=volume.source)


@pytest.mark.parametrize("name", ["ct_2folds", "ct_2d_mirror", "aniso", "regions"])
def test_air_windows_are_skipped_without_changing_body_voxels(nnunet_root: Path, models: dict, name: str) -> None:
    """Default ``body_crop=windows``: windows that see only air are skipped; logits of body voxels are unchanged."""
    folder, _, files = _scenario(nnunet_root, models, name)
    adapter = open_model(folder, folds="0")
    image = _with_air(load_volume(files[0]), ((30, 4), (0, 50), (16, 0)))
    body = image.array[0] > CT_BODY_HU
    assert adapter.infer_defaults.body_crop == "windows"
    results = {}
    for mode in ("none", "windows"):
        settings = InferConfig(precision="fp32", logits_dtype="float32", body_crop=mode)
        predictor = Predictor(adapter, infer=settings)
        logits, prepared = predictor.pipeline.logits([image])
        case = predictor.predict_case([image])
        results[mode] = (logits, prepared, case.labels.array[0], case.timings)
    logits_all, prepared, labels_all, timings_all = results["none"]
    logits_skip, prepared_skip, labels_skip, timings_skip = results["windows"]
    assert timings_all["windows_skipped"] == 0
    assert timings_skip["windows_skipped"] > 0
    assert timings_skip["windows"] + timings_skip["windows_skipped"] == timings_all["windows"]
    assert prepared_skip.box == prepared.box  # nnU-Net's crop and grid: the same windows where they run
    recipe = adapter.preprocessing
    assert isinstance(recipe, NnUNetRecipe)
    # body voxels on nnU-Net's cropped input grid (the logits' grid): exactly the full tiling's logits
    mapping = prepared.axes
    body_t = mapping.forward(body[None])[0].transpose(*recipe.transpose_forward)[prepared.box]
    assert body_t.shape == logits_all.shape[1:] and body_t.any()
    assert np.array_equal(logits_skip[:, body_t], logits_all[:, body_t])
    assert np.isfinite(logits_skip).all()
    # labels on the input grid: different only in air
    assert np.array_equal(labels_skip[body], labels_all[body])
    assert len(np.unique(labels_all[body])) > 1
    differ = labels_skip != labels_all
    assert not (differ & body).any()


def test_cli_predict_equals_stock_nnunet_end_to_end(nnunet_root: Path, models: dict, tmp_path: Path) -> None:
    """``medseg predict --model FOLDER --folds 0,1`` vs nnUNetPredictor.predict_from_files (float16 blending)."""
    from medseg.cli import main

    folder = models["Dataset501_CT"]["3d_fullres"]
    inputs = nnunet_root / "inputs" / "Dataset501_CT"
    out = tmp_path / "out"
    args = ["--model", folder, "--folds", "0,1", "--precision", "fp32", "--mirror-axes", "none", "--quiet"]
    code = main(["predict", *args, str(inputs), "--out", str(out)])
    assert code == 0
    for case in ("test_004", "test_005"):
        mine = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        theirs = sitk.ReadImage(str(nnunet_root / "end_to_end" / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
        a, b = sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(theirs)
        assert np.mean(a == b) >= LABEL_AGREEMENT
        for img in (mine, theirs):
            assert img.GetSize() == image.GetSize()
            assert np.allclose(img.GetSpacing(), image.GetSpacing(), atol=1e-6)
            assert np.allclose(img.GetOrigin(), image.GetOrigin(), atol=1e-4)
            assert np.allclose(img.GetDirection(), image.GetDirection(), atol=1e-6)
    names = json.loads((out / "test_004.json").read_text())
    assert names["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "lesion"}
    record = (out / "prediction.yaml").read_text()
    assert "nnU-Net v2 results folder" in record and "fold" in record


def test_default_precision_agrees_with_fp32(nnunet_root: Path, models: dict) -> None:
    """The fast default (bf16 channels-last where the CPU has it) gives nearly the same labels."""
    folder, ref, files = _scenario(nnunet_root, models, "ct_2folds")
    channels = [load_volume(f) for f in files]
    adapter = open_model(folder, folds="0,1")
    defaults = adapter.infer_defaults.model_copy(update={"mirror_axes": ()})  # the reference ran without
    fast = Predictor(adapter, infer=defaults).predict(channels).array[0]
    ref_seg = np.asarray(np.load(ref / "seg.npy")).transpose(2, 1, 0)
    assert np.mean(fast == ref_seg) >= 0.99


# ------------------------------------------------------------------------------- the seam itself
def test_open_model_describes_without_loading_networks(models: dict) -> None:
    adapter = open_model(models["Dataset504_Regions"]["3d_fullres"])
    info = adapter.describe()
    assert info["format"] == "nnU-Net v2 results folder"
    assert info["configuration"] == "3d_fullres" and info["folds"] == ["0"]
    assert info["labels"] == {0: "background", 1: "liver_all", 2: "kidney", 3: "lesion"}
    assert info["regions_class_order"] == [1, 2, 3]
    assert adapter._networks is None
    assert [c.modality for c in open_model(models["Dataset502_MRMasked"]["3d_fullres"]).channels] == ["MR", "MR"]
    recipe = adapter.preprocessing
    assert NnUNetRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_checkpoint_best_and_fingerprint(models: dict) -> None:
    folder = models["Dataset501_CT"]["3d_fullres"]
    final, best = open_model(folder, folds="0"), open_model(folder, folds="0", checkpoint="best")
    assert best.describe()["checkpoint"] == "checkpoint_best.pth"
    assert final.fingerprint() != best.fingerprint()
    assert open_model(folder).describe()["folds"] == ["0", "1"]
    w_final = final.load_networks()[0].state_dict()
    w_best = best.load_networks()[0].state_dict()
    assert any(not torch.equal(w_final[k], w_best[k]) for k in w_final)


def test_info_and_evaluate_labels_use_the_seam(models: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.cli import main
    from medseg.evaluate.inputs import load_label_names

    folder = models["Dataset504_Regions"]["3d_fullres"]
    assert main(["info", folder]) == 0
    text = capsys.readouterr().out
    assert "nnU-Net v2 results folder" in text and "3d_fullres" in text and "liver_all" in text
    names, _ = load_label_names(folder)
    assert names == {1: "liver_all", 2: "kidney", 3: "lesion"}


# ------------------------------------------------------------------------------------ bad input
def _copy(folder: str, tmp_path: Path) -> Path:
    target = tmp_path / Path(folder).name
    shutil.copytree(folder, target)
    return target


def _edit_plans(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans)
    (folder / "plans.json").write_text(json.dumps(plans))


def test_missing_plans_is_a_clear_error(models: dict, tmp_path: Path) -> None:
    folder = _copy(models["Dataset501_CT"]["3d_fullres"], tmp_path)
    (folder / "plans.json").unlink()
    with pytest.raises(ModelError, match=r"plans\.json: missing"):
        open_model(folder)


def test_missing_fold_is_a_clear_error(models: dict, tmp_path: Path) -> None:
    folder = models["Dataset501_CT"]["3d_fullres"]
    with pytest.raises(ModelError, match=r"missing fold_3/checkpoint_final\.pth"):
        open_model(folder, folds="0,3")
    empty = _copy(folder, tmp_path)
    for fold in empty.glob("fold_*"):
        shutil.rmtree(fold)
    with pytest.raises(ModelError, match=r"no fold_\*/checkpoint_final\.pth"):
        open_model(empty)
    with pytest.raises(ModelError, match="--folds"):
        open_model(folder, folds="zero")


def test_weights_that_do_not_match_the_plans(models: dict, tmp_path: Path) -> None:
    folder = _copy(models["Dataset501_CT"]["3d_fullres"], tmp_path)

    def wider(plans: dict) -> None:
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [2 * f for f in arch["features_per_stage"]]

    _edit_plans(folder, wider)
    with pytest.raises(ModelError, match=r"fold_0/checkpoint_final\.pth: weights do not match the network"):
        Predictor(open_model(folder))


def test_unknown_network_class_is_named(models: dict, tmp_path: Path) -> None:
    folder = _copy(models["Dataset501_CT"]["3d_fullres"], tmp_path)

    def exotic(plans: dict) -> None:
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "mypackage.nets.SwinUNETRv9"

    _edit_plans(folder, exotic)
    with pytest.raises(ModelError, match=r"network class 'mypackage\.nets\.SwinUNETRv9' is not supported"):
        open_model(folder)


def test_wrong_number_of_channels_fails_without_output(models: dict, nnunet_root: Path, tmp_path: Path) -> None:
    from medseg.cli import main

    folder = models["Dataset502_MRMasked"]["3d_fullres"]
    image = nnunet_root / "inputs" / "Dataset501_CT" / "test_004_0000.nii.gz"
    with pytest.raises(ModelError, match=r"model expects 2 channel\(s\) \(T1, T2\), got 1"):
        Predictor(open_model(folder)).predict(load_volume(image))
    out = tmp_path / "out"
    assert main(["predict", "--model", folder, "--quiet", str(image), "--out", str(out)]) == 2
    assert not out.exists() or not list(out.glob("*.nii.gz"))


class _Payload:
    """Pickles to a call that creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(models: dict, tmp_path: Path) -> None:
    from medseg.cli import main

    folder = _copy(models["Dataset501_CT"]["3d_fullres"], tmp_path)
    marker = tmp_path / "payload-ran"
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    real = torch.load(checkpoint, map_location="cpu", weights_only=False)
    real["logging"] = _Payload(marker)
    torch.save(real, checkpoint)
    with pytest.raises(ModelError, match=r"checkpoint_final\.pth: refused: the checkpoint contains objects"):
        Predictor(open_model(folder, folds="0"))
    assert not marker.exists()
    out = tmp_path / "out"
    inputs = Path(models["Dataset501_CT"]["3d_fullres"]).parents[2] / "inputs" / "Dataset501_CT"
    assert main(["predict", "--model", str(folder), "--folds", "0", "--quiet", str(inputs), "--out", str(out)]) == 2
    assert not marker.exists()
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "random.txt").write_text("x")
    with pytest.raises(MedsegError, match="not a model"):
        open_model(tmp_path)
    with pytest.raises(ModelError, match="model not found"):
        open_model(tmp_path / "nope")
