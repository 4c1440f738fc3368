"""Predictor: body cropping, resampling onto the input grid, probabilities, ensembles, CLI, bad input."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing, SpatialResample
from torch import nn

from medseg.config import Config, InferConfig
from medseg.data.plan import ChannelNorm, NetworkPlan, Plan
from medseg.errors import ConfigError, MedsegError, ModelError
from medseg.infer.cli import add_predict_parser
from medseg.infer.crop import body_box
from medseg.infer.predictor import Predictor
from medseg.infer.resample import index_map, resample_to_grid
from medseg.infer.run import predict_to_folder
from medseg.io import Geometry, Volume, load_volume, write_volume
from medseg.models.networks import build_network
from medseg.models.package import LoadedModel, save_model
from medseg.sample_data import make_phantom

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}
PATCH = (32, 32, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny networks: one thread avoids OpenMP spin-waiting on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plan(*, spacing: tuple[float, float, float] = (2.0, 2.0, 3.0), channels: int = 1) -> Plan:
    norms = [ChannelNorm(name="CT", scheme="ct", clip=(-200.0, 300.0), mean=50.0, std=80.0)]
    norms += [ChannelNorm(name=f"MR{i}", scheme="zscore") for i in range(1, channels)]
    return Plan(
        channels=norms,
        labels=LABELS,
        target_spacing=spacing,
        patch_size=PATCH,
        network=NetworkPlan(name="unet", channels=(4, 8), strides=(2,), in_channels=channels, out_channels=4),
    )


def _model_dir(path: Path, *, seed: int, plan: Plan | None = None) -> Path:
    plan = plan or _plan()
    torch.manual_seed(seed)
    network = build_network(plan.network)
    return save_model(path, config=Config(), plan=plan, state_dict=network.state_dict())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("infer") / "model", seed=0)


@pytest.fixture(scope="module")
def phantom_ct() -> Volume:
    """Oblique, anisotropic CT phantom with air around the body."""
    return make_phantom(1).channels[0]


class Threshold(nn.Module):
    """Voxel-wise 'network': class 1 where the normalised CT is above -1 (about -30 HU), else background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 4.0 * (x[:, :1] + 1.0)
        return torch.cat([torch.zeros_like(fg), fg, fg - 8.0, fg - 9.0], dim=1)


def _threshold_model(plan: Plan | None = None) -> LoadedModel:
    return LoadedModel(path=Path("threshold"), config=Config(), plan=plan or _plan(), network=Threshold())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


# ------------------------------------------------------------------- body crop
@pytest.fixture(scope="module")
def padded_ct(phantom_ct: Volume) -> Volume:
    """The phantom with 48 voxels of air added on both sides of x and y (windows far from the body)."""
    array = np.pad(phantom_ct.array, ((0, 0), (48, 48), (48, 48), (0, 0)), constant_values=-1000)
    shift = np.eye(4)
    shift[:3, 3] = (-48, -48, 0)
    return Volume(array, Geometry(shape=array.shape[1:], affine=phantom_ct.geometry.affine @ shift), source="pad")


def test_skipped_windows_leave_the_body_prediction_unchanged(model_dir: Path, padded_ct: Volume) -> None:
    everything = Predictor(model_dir, infer=InferConfig(body_crop="none", precision="fp32"))
    skipping = Predictor(model_dir, infer=InferConfig(body_crop="windows", precision="fp32"))
    a = everything.predict(padded_ct).array[0]
    b = skipping.predict(padded_ct).array[0]
    assert skipping.last_timings["windows"] < 0.75 * everything.last_timings["windows"]
    # Every window touching the body box runs with its original position; skipped windows do not
    # touch the box, so inside it (less a voxel for interpolation) the blend and the labels are the same.
    lo, hi = body_box(padded_ct, _plan())
    inner = tuple(slice(int(a0) + 1, int(b0) - 1) for a0, b0 in zip(lo, hi, strict=True))
    assert np.array_equal(a[inner], b[inner])
    assert np.mean(a[inner] > 0) > 0.3
    outside = np.ones_like(a, dtype=bool)
    outside[inner] = False
    # the random network "segments" air; where its windows were skipped the result is background
    assert np.mean(b[outside] == 0) > np.mean(a[outside] == 0) + 0.3


def test_body_crop_modes_agree_when_the_air_is_background(padded_ct: Volume) -> None:
    model = _threshold_model()
    runs = {}
    for mode in ("none", "windows", "box"):
        predictor = Predictor(model, infer=InferConfig(body_crop=mode, precision="fp32"))
        runs[mode] = (predictor.predict(padded_ct).array, predictor.last_timings["windows"])
    assert runs["box"][1] < runs["windows"][1] < runs["none"][1]
    assert np.array_equal(runs["windows"][0], runs["none"][0])
    assert np.array_equal(runs["box"][0], runs["none"][0])
    assert 0.05 < np.mean(runs["none"][0] == 1) < 0.5


def test_air_only_image_is_background_without_running_the_network(phantom_ct: Volume) -> None:
    air = Volume(np.full_like(phantom_ct.array, -1000), phantom_ct.geometry, source="air.nii.gz")
    predictor = Predictor(_threshold_model(), infer=InferConfig(precision="fp32"))
    result = predictor.predict_case(air, probabilities="uint8")
    assert predictor.last_timings["windows"] == 0
    assert result.labels.array.max() == 0 and result.labels.geometry is air.geometry
    assert result.probabilities is not None
    assert np.all(result.probabilities.array[0] == 255) and not result.probabilities.array[1:].any()


def test_volume_smaller_than_the_window_is_padded_and_keeps_its_grid(model_dir: Path) -> None:
    geometry = Geometry.from_itk(shape=(7, 9, 3), spacing=(2.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0), direction=np.eye(3))
    image = Volume(np.full((1, 7, 9, 3), 40, dtype=np.int16), geometry, source="tiny.nii.gz")
    label = Predictor(model_dir, infer=InferConfig(precision="fp32")).predict(image)
    assert label.geometry is geometry and label.array.shape == (1, 7, 9, 3)


# ------------------------------------------------------------------ resampling
def _smooth_logits(shape: tuple[int, ...], k: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, k, *(max(2, s // 6) for s in shape)), generator=g) * 3
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


def _lps_volume(like: Volume) -> Volume:
    """``like``'s voxels on an axis-aligned LPS grid (no rotation: the separable code path)."""
    geometry = Geometry.from_itk(
        shape=like.geometry.shape, spacing=(2.1, 2.1, 3.6), origin=(5, -3, 7), direction=np.eye(3)
    )
    return Volume(like.array, geometry, source="lps.nii.gz")


@pytest.mark.parametrize(
    ("grid", "classes"), [("oblique", "smooth"), ("axis-aligned", "smooth"), ("axis-aligned", "noisy")]
)
def test_chunked_resampling_matches_monai_spatial_resample(phantom_ct: Volume, grid: str, classes: str) -> None:
    """RAS network grid at another spacing: our chunks == MONAI's whole-volume resample (labels and probabilities)."""
    volume = phantom_ct if grid == "oblique" else _lps_volume(phantom_ct)
    mt = volume.to_metatensor().float()
    net_grid = Spacing(pixdim=(1.6, 1.7, 2.5), mode="bilinear")(Orientation(axcodes="RAS")(mt))
    shape = tuple(net_grid.shape[1:])
    # noisy: class boundaries everywhere, so chunks are interpolated in full rather than voxel by voxel
    logits = (
        _smooth_logits(shape)
        if classes == "smooth"
        else torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))
    )
    net_affine = np.asarray(net_grid.affine, dtype=np.float64)
    probs = MetaTensor(torch.softmax(logits, 0), affine=torch.as_tensor(net_affine))
    ref = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
        probs, dst_affine=torch.as_tensor(np.array(volume.geometry.affine)), spatial_size=volume.geometry.shape
    )
    ref_labels = np.argmax(np.asarray(ref), axis=0)
    kwargs = {"net_affine": net_affine, "net_shape": tuple(net_grid.shape[1:]), "target": volume.geometry}
    labels, ours = resample_to_grid(logits, probabilities="float32", chunk_bytes=2**20, **kwargs)  # many chunks
    assert ours is not None and ours.shape == (4, *volume.geometry.shape)
    assert np.abs(ours - np.asarray(ref)).max() < 1e-4
    assert np.mean(labels == ref_labels) > 0.9999
    # labels only: without rotation, only voxels between network voxels of different classes are interpolated
    fast, none = resample_to_grid(logits, chunk_bytes=2**20, **kwargs)
    assert none is None and np.mean(fast == ref_labels) > 0.9999 and len(np.unique(fast)) == 4


@pytest.mark.parametrize("grid", ["oblique", "axis-aligned"])
def test_logits_of_a_box_equal_full_logits_with_background_outside(phantom_ct: Volume, grid: str) -> None:
    volume = phantom_ct if grid == "oblique" else _lps_volume(phantom_ct)
    mt = volume.to_metatensor().float()
    net_grid = Spacing(pixdim=(2.5, 2.5, 3.0), mode="bilinear")(Orientation(axcodes="RAS")(mt))
    shape = tuple(net_grid.shape[1:])
    full = _smooth_logits(shape)
    box = (slice(10, 50), slice(5, 40), slice(3, 30))
    full_bg = torch.full_like(full, -30.0)
    full_bg[0] = 30.0
    full_bg[(slice(None), *box)] = full[(slice(None), *box)]
    kwargs = {"net_affine": np.asarray(net_grid.affine), "net_shape": shape, "target": volume.geometry}
    ref, ref_p = resample_to_grid(full_bg, probabilities="float32", **kwargs)
    inner = full[(slice(None), *box)].clone()
    got, got_p = resample_to_grid(inner, offset=(10, 5, 3), probabilities="float32", **kwargs)
    assert np.array_equal(got, ref)
    assert ref_p is not None and got_p is not None and np.abs(got_p - ref_p).max() < 1e-5
    fast, _ = resample_to_grid(inner.half(), offset=(10, 5, 3), chunk_bytes=2**20, **kwargs)  # labels only
    assert np.mean(fast == ref) > 0.9999 and 0.1 < np.mean(fast == 0) < 0.9


def test_same_voxels_in_another_axis_order_are_reindexed_not_interpolated(model_dir: Path) -> None:
    """LPS-stored input with the plan's spacing: the RAS network grid holds the same voxels."""
    ct = make_phantom(0).channels[0]
    geometry = Geometry.from_itk(
        shape=ct.geometry.shape, spacing=(2.0, 2.0, 3.0), origin=(5, -3, 7), direction=np.eye(3)
    )
    image = Volume(ct.array, geometry, source="lps.nii.gz")
    predictor = Predictor(model_dir, infer=InferConfig(precision="fp32", logits_dtype="float32", body_crop="none"))
    net_affine = np.asarray(predictor.preprocess(image).affine)
    mapping = index_map(geometry, net_affine)
    assert mapping is not None and mapping.signs == (-1, -1, 1)
    fast = predictor.predict(image).array
    interpolated = predictor.predict_case(image, probabilities="float32").labels.array
    assert fast.shape == (1, *geometry.shape)
    assert np.mean(fast == interpolated) > 0.9999
    logits = predictor.predict_logits(predictor.preprocess(image)[None])[0]
    direct = torch.argmax(logits, 0).numpy()[::-1, ::-1, :]  # RAS network grid -> LPS input grid
    assert np.array_equal(fast[0], direct)


def test_probabilities_are_on_the_input_grid_and_agree_with_labels(model_dir: Path, phantom_ct: Volume) -> None:
    predictor = Predictor(model_dir, infer=InferConfig(precision="fp32"))
    result = predictor.predict_case(phantom_ct, probabilities="uint16")
    probs = result.probabilities
    assert probs is not None and probs.geometry is phantom_ct.geometry and probs.array.dtype == np.uint16
    total = probs.array.astype(np.float64).sum(axis=0) / 65535
    assert np.allclose(total, 1.0, atol=1e-3)
    assert np.mean(np.argmax(probs.array, axis=0) == result.labels.array[0]) > 0.999


# --------------------------------------------------------------- ensembles, bad input
def test_ensemble_of_two_models_averages_their_logits(model_dir: Path, tmp_path: Path, phantom_ct: Volume) -> None:
    other = _model_dir(tmp_path / "m2", seed=1)
    settings = InferConfig(precision="fp32", body_crop="none")
    one, two = Predictor(model_dir, infer=settings), Predictor(other, infer=settings)
    both = Predictor([model_dir, other], infer=settings)
    image = both.preprocess(phantom_ct)[None]
    mean = (one.predict_logits(image) + two.predict_logits(image)) / 2
    assert torch.allclose(both.predict_logits(image), mean, atol=1e-5)


def test_models_with_different_plans_cannot_be_ensembled(model_dir: Path, tmp_path: Path) -> None:
    other = _model_dir(tmp_path / "m3", seed=1, plan=_plan(spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(ModelError, match="target_spacing"):
        Predictor([model_dir, other])


def test_wrong_channel_count_names_the_file(tmp_path: Path, phantom_ct: Volume) -> None:
    two_channel = _model_dir(tmp_path / "mr", seed=0, plan=_plan(channels=2))
    image = Volume(phantom_ct.array, phantom_ct.geometry, source="/data/ct_001_0000.nii.gz")
    with pytest.raises(ModelError, match=r"ct_001_0000\.nii\.gz: model expects 2 channel\(s\) \(CT, MR1\), got 1"):
        Predictor(two_channel).predict(image)


def test_missing_gpu_is_a_clear_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda' requested but CUDA is not available"):
        Predictor(model_dir, infer=InferConfig(device="cuda"))


@pytest.mark.parametrize(("free_mib", "expected"), [(1024, "cuda"), (100, "cpu")])
def test_predictor_stitches_on_the_gpu_only_when_the_buffer_fits(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, free_mib: int, expected: str
) -> None:
    predictor = Predictor(model_dir)
    predictor.windows.device = torch.device("cuda", 0)  # as if the networks ran on a GPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_mib * 2**20, 8 * 2**30))
    # 512x512x600 on the network grid, 32x32x16 windows, 4 classes: streaming along z needs 80 MiB
    assert predictor._stitch_device((512, 512, 600)).type == expected


def test_corrupt_input_is_recorded_and_leaves_no_output(model_dir: Path, phantom_ct: Volume, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    good = write_volume(phantom_ct, inputs / "good_0000.nii.gz")
    bad = inputs / "bad_0000.nii.gz"
    bad.write_bytes(good.read_bytes()[:3000])  # truncated gzip
    out = tmp_path / "out"
    records = predict_to_folder(Predictor(model_dir), [inputs], out, progress=False, probabilities="uint8")
    status = {r["case"]: r for r in records}
    assert status["good"]["status"] == "done" and status["bad"]["status"] == "failed"
    assert "bad_0000.nii.gz" in status["bad"]["error"]
    assert sorted(p.name for p in out.iterdir()) == [
        "good.json",
        "good.nii.gz",
        "good_probabilities.nii.gz",
        "prediction.yaml",
    ]
    for key in ("read_s", "preprocess_s", "network_s", "forward_s", "resample_s", "write_s", "seconds"):
        assert status["good"][key] >= 0


# ------------------------------------------------------------------------- CLI
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medseg")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_predict_with_ensemble_mirroring_postprocessing_and_probabilities(
    model_dir: Path, tmp_path: Path, phantom_ct: Volume
) -> None:
    other = _model_dir(tmp_path / "m2", seed=1)
    image = write_volume(phantom_ct, tmp_path / "in" / "case_0000.nii.gz")
    out = tmp_path / "out"
    argv = ["predict", str(image), "--model", str(model_dir), "--model", str(other), "--out", str(out), "--quiet"]
    argv += ["--mirror-axes", "0,1", "--overlap", "0.25", "--precision", "fp32", "--largest-component"]
    argv += ["--min-component-mm3", "50", "--fill-holes", "--save-probabilities", "--probabilities-dtype", "uint8"]
    args = _parse(argv)
    assert args.func(args) == 0
    labels, probs = out / "case.nii.gz", out / "case_probabilities.nii.gz"
    # geometry checked with SimpleITK and nibabel, independently of medseg
    ref = sitk.ReadImage(str(image))
    for path in (labels, probs):
        img = sitk.ReadImage(str(path))
        assert img.GetSize()[:3] == ref.GetSize()
        assert np.allclose(img.GetSpacing()[:3], ref.GetSpacing(), atol=1e-6)
        assert np.allclose(img.GetOrigin()[:3], ref.GetOrigin(), atol=1e-5)
        assert np.allclose(
            np.array(img.GetDirection()).reshape(img.GetDimension(), -1)[:3, :3].ravel(), ref.GetDirection(), atol=1e-6
        )
    p = nib.load(str(probs))
    assert p.shape == (*phantom_ct.geometry.shape, 4)
    assert np.allclose(p.affine, phantom_ct.geometry.affine, atol=1e-5)
    values = p.get_fdata(dtype=np.float32)
    assert values.min() >= 0 and values.max() <= 1.0 + 1e-6 and np.allclose(values.sum(-1), 1, atol=0.02)
    record = yaml.safe_load((out / "prediction.yaml").read_text())
    assert len(record["model"]) == 2
    assert record["infer"]["mirror_axes"] == [0, 1] and record["infer"]["overlap"] == 0.25
    assert record["infer"]["keep_largest_component"] and record["infer"]["fill_holes"]
    label = load_volume(labels, kind="label").array[0]
    from scipy import ndimage

    for value in range(1, 4):  # one component per class after post-processing
        assert ndimage.label(label == value)[1] <= 1


def test_cli_rejects_bad_options(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _parse(["predict", "x.nii.gz", "--model", str(model_dir), "--out", str(tmp_path), "--mirror-axes", "0,5"])
    args = _parse(["predict", "x.nii.gz", "--model", str(model_dir), "--out", str(tmp_path), "--overlap", "1.5"])
    with pytest.raises(MedsegError, match="overlap"):
        args.func(args)


def test_chunked_preprocessing_equals_the_training_pipeline(phantom_ct: Volume) -> None:
    """Same grid (MONAI's own) and the same values as MONAI's float64 Spacingd, in small chunks."""
    from medseg.data.transforms import preprocess_transforms
    from medseg.infer.preprocess import inference_preprocess

    plan = _plan(spacing=(1.7, 1.6, 2.6))
    ref = preprocess_transforms(plan, with_label=False)({"image": [phantom_ct]})["image"]
    ours = inference_preprocess(plan, chunk_bytes=2**20)({"image": [phantom_ct]})["image"]
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert np.allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-9)
    assert torch.allclose(ours.as_tensor(), ref.as_tensor(), atol=1e-4)


def test_fortran_ordered_input_is_preprocessed_without_a_transpose_and_identically(phantom_ct: Volume) -> None:
    """DICOM/NIfTI readers give Fortran-ordered arrays; the result must not depend on the memory order."""
    from medseg.infer.preprocess import inference_preprocess

    plan = _plan(spacing=(1.7, 1.6, 2.6))
    c_order = Volume(np.ascontiguousarray(phantom_ct.array), phantom_ct.geometry, source="c")
    f_order = Volume(np.asfortranarray(phantom_ct.array), phantom_ct.geometry, source="f")
    assert f_order.to_metatensor().as_tensor().stride()[1] == 1  # no copy into C order
    steps = inference_preprocess(plan, chunk_bytes=2**20)
    a = steps({"image": [c_order]})["image"]
    b = steps({"image": [f_order]})["image"]
    # chunks run along another axis (the source's slowest in memory): float32 grid rounding only
    assert torch.allclose(a.as_tensor(), b.as_tensor(), atol=1e-4)
    assert np.array_equal(np.asarray(f_order.array), np.asarray(phantom_ct.array))  # input untouched


def test_read_only_input_gives_bit_identical_labels(shared_data: Path, tmp_path: Path) -> None:
    """A read-only array (zero-copy from Ray's object store, a memory map) is copied in its own memory order.

    A C-order copy of the Fortran-ordered real MR changed the chunk order of the resampling and, through
    float rounding, 17 labels of this oblique, anisotropic series.
    """
    series = sorted((shared_data / "pgbm-brain-tumor-progression" / "PGBM-001").glob("*/*T1post*"))
    if not series:
        pytest.skip("PGBM T1post series not available")
    plan = _plan(spacing=(1.0, 1.0, 3.0))
    plan.channels = [ChannelNorm(name="T1", scheme="zscore")]
    predictor = Predictor(_model_dir(tmp_path / "model", seed=0, plan=plan))
    volume = load_volume(series[0])
    writable = volume.array.copy(order="K")
    frozen = volume.array.copy(order="K")
    frozen.setflags(write=False)
    a = predictor.predict([Volume(writable, volume.geometry)]).array
    b = predictor.predict([Volume(frozen, volume.geometry)]).array
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("target_spacing", "target_shape"),
    [((1.5, 1.5, 1.5), (64, 53, 60)), ((0.5, 0.6, 1.5), (190, 130, 60)), ((1.5, 1.5, 3.0), (64, 53, 30))],
)
def test_axis_aligned_resampling_matches_monai(
    target_spacing: tuple[float, ...], target_shape: tuple[int, ...]
) -> None:
    """No rotation: the separable (axis by axis) path where it pays, ``grid_sample`` otherwise; both equal MONAI."""
    from monai.transforms import SpatialResample

    from medseg.infer.resample import _separable_axes, _separable_pays, resample_image

    torch.manual_seed(0)
    source = torch.randn(2, 120, 100, 60)
    source_affine = np.diag([0.8, -0.8, 1.5, 1.0])
    source_affine[:3, 3] = (3.0, 40.0, -7.0)
    target_affine = np.diag([*target_spacing, 1.0])
    target_affine[:3, 3] = (3.2, -40.3, -7.0)
    ref = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)(
        MetaTensor(source.double(), affine=torch.as_tensor(source_affine)),
        dst_affine=torch.as_tensor(target_affine),
        spatial_size=target_shape,
    )
    for layout in (source, torch.from_numpy(np.asfortranarray(source.numpy()))):
        ours = resample_image(
            layout,
            source_affine=source_affine,
            target_affine=target_affine,
            target_shape=target_shape,
            chunk_bytes=2**19,
        )
        assert torch.allclose(ours.double(), ref.as_tensor().double(), atol=1e-4)
    voxel_map = np.linalg.inv(source_affine) @ target_affine
    axes = _separable_axes(voxel_map)
    assert axes is not None
    if target_spacing == (1.5, 1.5, 1.5):  # z on the source voxels: two passes instead of 8 taps per voxel
        assert _separable_pays(voxel_map, axes, source.shape[1:], target_shape)
