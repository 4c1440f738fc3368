"""End to end: train -> predict (files and DICOM) -> outputs on the input grid -> evaluate; plus bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from medseg.cli import main
from medseg.errors import ModelError
from medseg.infer.predictor import Predictor
from medseg.io import load_volume
from medseg.models.package import load_model
from medseg.sample_data import make_phantom


def _sitk_geometry(path: Path):
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    return img.GetSize(), np.array(img.GetSpacing()), np.array(img.GetOrigin()), np.array(img.GetDirection())


def _assert_same_grid(a: Path, b: Path) -> None:
    size_a, sp_a, or_a, dir_a = _sitk_geometry(a)
    size_b, sp_b, or_b, dir_b = _sitk_geometry(b)
    assert size_a == size_b
    assert np.allclose(sp_a, sp_b, atol=1e-5)
    assert np.allclose(or_a, or_b, atol=1e-4)
    assert np.allclose(dir_a, dir_b, atol=1e-6)


def test_model_directory_is_self_contained(tiny_model: Path) -> None:
    assert {"config.yaml", "metrics.json", "plan.yaml", "weights.pt"} <= {p.name for p in tiny_model.iterdir()}
    plan = yaml.safe_load((tiny_model / "plan.yaml").read_text())
    assert plan["labels"] == {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}
    assert plan["channels"][0]["scheme"] == "ct" and plan["channels"][0]["std"] > 0
    # weights are a plain state dict loadable with weights_only=True
    state = torch.load(tiny_model / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert load_model(tiny_model).plan.num_classes == 4


def test_train_predict_evaluate_cli(tiny_model: Path, sample_root: Path, tmp_path: Path) -> None:
    ds = sample_root / "Dataset001_CTPhantom"
    pred_dir = tmp_path / "pred"
    inputs = sorted((ds / "imagesTs").glob("*.nii.gz"))
    assert main(["predict", "--model", str(tiny_model), "--out", str(pred_dir), "--quiet", *map(str, inputs)]) == 0
    for image in inputs:
        case = image.name.replace("_0000.nii.gz", "")
        out = pred_dir / f"{case}.nii.gz"
        _assert_same_grid(out, image)  # SimpleITK, independently of medseg
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        assert label.dtype == np.uint8 and label.max() <= 3
    record = yaml.safe_load((pred_dir / "prediction.yaml").read_text())
    assert [c["status"] for c in record["cases"]] == ["done", "done"]
    report = tmp_path / "report"
    rc = main(
        ["evaluate", "--pred", str(pred_dir), "--ref", str(ds / "labelsTs"), "--out", str(report), "--labels", str(ds)]
    )
    assert rc == 0
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    assert len(rows) == 2 * 3
    summary = json.loads((report / "summary.json").read_text())
    assert 0.0 <= summary["mean_foreground_dice"] <= 1.0


def test_predict_dicom_series_writes_on_dicom_grid(tiny_model: Path, sample_root: Path, tmp_path: Path) -> None:
    series = sample_root / "dicom" / "ct_004"
    assert main(["predict", "--model", str(tiny_model), "--out", str(tmp_path), "--quiet", str(series)]) == 0
    _assert_same_grid(tmp_path / "ct_004.nii.gz", series)
    # and (up to the 1e-6 mm rounding of DICOM position strings) the prediction of the NIfTI copy of that case
    nifti_pred = Predictor(tiny_model).predict_paths([sample_root / "Dataset001_CTPhantom/imagesTs/ct_004_0000.nii.gz"])
    dicom_pred = load_volume(tmp_path / "ct_004.nii.gz", kind="label")
    assert np.mean(nifti_pred.array == dicom_pred.array) > 0.995


def test_bad_case_is_reported_and_others_continue(tiny_model: Path, sample_root: Path, tmp_path: Path) -> None:
    good = sample_root / "Dataset001_CTPhantom" / "imagesTs" / "ct_004_0000.nii.gz"
    bad = tmp_path / "in" / "broken_0000.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:2000])  # truncated gzip
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_model), "--out", str(out), "--quiet", str(good), str(bad)]) == 1
    assert (out / "ct_004.nii.gz").is_file()
    assert not any(p.name.startswith("broken") or ".tmp" in p.name for p in out.iterdir())
    record = yaml.safe_load((out / "prediction.yaml").read_text())
    failed = [c for c in record["cases"] if c["status"] == "failed"]
    assert len(failed) == 1 and "broken_0000.nii.gz" in failed[0]["error"]


def test_missing_model_files_are_a_clear_error(tiny_model: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "weights.pt").unlink()
    with pytest.raises(ModelError, match=r"missing weights\.pt"):
        load_model(broken)
    rc = main(["predict", "--model", str(broken), "--out", str(tmp_path / "o"), "--quiet", str(tmp_path / "in")])
    assert rc == 2
    assert "missing weights.pt" in capsys.readouterr().err


def test_resampling_back_to_input_grid_recovers_labels() -> None:
    """Labels taken to the network grid (RAS, other spacing) as probabilities come back onto the input grid."""
    phantom = make_phantom(1)  # oblique, flipped axes, anisotropic
    label = phantom.label
    onehot = np.eye(4, dtype=np.float32)[label.array[0]].transpose(3, 0, 1, 2)
    mt = MetaTensor(torch.from_numpy(onehot), affine=torch.tensor(np.array(label.geometry.affine)))
    net_grid = Spacing(pixdim=(1.6, 1.6, 2.5), mode="bilinear")(Orientation(axcodes="RAS")(mt))
    logits = torch.log(torch.as_tensor(net_grid).clamp_min(1e-6))
    back = Predictor._to_input_grid(logits, net_grid.affine, label)
    assert back.shape == label.geometry.shape
    for c in (1, 2, 3):
        a, b = back == c, label.array[0] == c
        assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.95
