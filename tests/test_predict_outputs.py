"""``medseg predict`` parity with batch: --series, --outputs (the shared writers), the shared inference options,
short several-series errors, and prediction.yaml keeping the provenance of outputs a run did not write."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from test_batch import dciodvfy_errors, small_ct, write_series

from medseg.cli import main
from medseg.io import load_volume, read_dicom_series, write_volume
from medseg.io.dicom_seg import read_dicom_seg


@pytest.fixture
def two_series(tmp_path: Path) -> Path:
    """One folder holding two phantom CT series (numbers 7 and 8), as a PACS export would."""
    folder = tmp_path / "export"
    for case, number in ((0, 7), (1, 8)):
        write_series(case, tmp_path / f"s{case}", SeriesNumber=number)
        for path in (tmp_path / f"s{case}").iterdir():
            folder.mkdir(exist_ok=True)
            shutil.move(path, folder / f"{case}-{path.name}")
    return folder


def test_several_series_error_is_short_and_series_picks_one(
    two_series: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_model), "--out", str(out), "--quiet", str(two_series)]) == 1
    err = capsys.readouterr().err
    message = next(line for line in err.splitlines() if "FAILED" in line)
    assert "contains 2 series (#7 CT 'Phantom CT c000'" in message and "--series NUMBER|UID" in message
    assert f"medseg info {two_series}" in message and len(message) < 600
    for extra in range(3):  # many series: a few are listed, not all
        write_series(10 + extra, tmp_path / "more" / str(extra), SeriesNumber=20 + extra)
    with pytest.raises(Exception, match=r"contains 5 series .*; and 2 more\): choose one") as info:
        read_dicom_series(tmp_path / "more" / "..")
    assert len(str(info.value)) < 700
    # --series by number and by UID
    assert (
        main(["predict", "--model", str(tiny_model), "--out", str(out), "--quiet", "--series", "8", str(two_series)])
        == 0
    )
    label = load_volume(out / "export.nii.gz", kind="label")
    image = read_dicom_series(two_series, series_uid="8")
    assert image.meta["series_description"] == "Phantom CT c001" and label.geometry.allclose(image.geometry)
    uid = read_dicom_series(two_series, series_uid="7").meta["series_uid"]
    assert read_dicom_series(two_series, series_uid=uid).meta["series_number"] == 7
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_model),
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
                "--series",
                "9",
                str(two_series),
            ]
        )
        == 1
    )
    assert "no DICOM image series found with number, UID or key 9" in capsys.readouterr().err


def test_predict_writes_dicom_seg_rtstruct_and_volumes(tiny_model: Path, tmp_path: Path) -> None:
    series = write_series(3, tmp_path / "ct" / "case3")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(tiny_model), "--out", str(out), "--quiet", str(series)]
    assert main([*argv, "--outputs", "nifti,seg,rtstruct,json", "--overlap", "0.25"]) == 0
    labels = np.asarray(nib.load(str(out / "case3.nii.gz")).dataobj)
    image = read_dicom_series(series)
    assert dciodvfy_errors(out / "case3_seg.dcm") == [] and dciodvfy_errors(out / "case3_rtstruct.dcm") == []
    assert np.array_equal(read_dicom_seg(out / "case3_seg.dcm", reference=image).array[0], labels)
    ds = pydicom.dcmread(out / "case3_seg.dcm", stop_before_pixels=True)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == image.meta["series_uid"]
    from medseg.io.rtstruct import ReferenceSeries, rtstruct_to_labels

    header = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True)
    back = rtstruct_to_labels(
        out / "case3_rtstruct.dcm",
        ReferenceSeries(series, image, header, str(header.SOPClassUID), str(header.FrameOfReferenceUID)),
    )
    names = {v: k for k, v in json.loads((out / "case3.json").read_text())["labels"].items()}
    for value, name in back.meta["label_names"].items():
        assert np.array_equal(back.array[0] == value, labels == int(names[name])), name
    volumes = json.loads((out / "case3_volumes.json").read_text())
    for stats in volumes["classes"].values():
        assert stats["voxels"] == int((labels == stats["label"]).sum())
    record = yaml.safe_load((out / "prediction.yaml").read_text())
    case = record["cases"][0]
    assert case["status"] == "done" and set(case["outputs"]) == {"nifti", "seg", "rtstruct", "json"}
    # evaluate on that folder: one case (the SEG and RTSTRUCT beside case3.nii.gz are the same prediction)
    from medseg.evaluate import evaluate_folders

    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy2(out / "case3.nii.gz", refs / "case3.nii.gz")
    summary = evaluate_folders(out, refs, out_dir=tmp_path / "report")
    assert summary["n_cases"] == 1 and summary["problems"] == []
    assert case["outputs"]["seg"] == {"files": ["case3_seg.dcm"], "run": 1} and record["infer"]["overlap"] == 0.25


def test_outputs_are_independent_for_a_nifti_input(tiny_model: Path, tmp_path: Path, capsys) -> None:
    image = write_volume(small_ct(4), tmp_path / "in" / "ct_004_0000.nii.gz")
    out = tmp_path / "out"
    code = main(
        ["predict", "--model", str(tiny_model), "--out", str(out), "--quiet", "--outputs", "nifti,seg,json", str(image)]
    )
    printed = capsys.readouterr()
    assert code == 1 and "PARTIAL" in printed.err and "needs a DICOM series as input" in printed.err
    assert sorted(p.name for p in out.iterdir()) == [
        "ct_004.json",
        "ct_004.nii.gz",
        "ct_004_volumes.json",
        "prediction.yaml",
    ]
    case = yaml.safe_load((out / "prediction.yaml").read_text())["cases"][0]
    assert case["status"] == "partial" and "error" in case["outputs"]["seg"] and "files" in case["outputs"]["nifti"]


def test_failed_reruns_keep_the_provenance_of_existing_outputs(tiny_model: Path, tmp_path: Path) -> None:
    source = write_volume(small_ct(4), tmp_path / "src" / "ct_004_0000.nii.gz")
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = inputs / "ct_004_0000.nii.gz"
    shutil.copy2(source, image)
    out = tmp_path / "out"
    base = ["predict", "--model", str(tiny_model), "--out", str(out), "--quiet"]
    assert main([*base, "--overlap", "0.5", str(image)]) == 0
    made = (out / "ct_004.nii.gz").read_bytes()
    # Re-run with other settings, no --overwrite: refused, and the record still says how the file was made.
    assert main([*base, "--overlap", "0.25", str(image)]) == 1
    record = yaml.safe_load((out / "prediction.yaml").read_text())
    case = record["cases"][0]
    assert case["status"] == "done" and case["run"] == 1 and case["outputs"]["nifti"]["run"] == 1
    assert record["runs"][1]["infer"]["overlap"] == 0.5 and record["run"] == 2
    # Re-run with --overwrite on an input that is now broken: fails, the output and its record stay.
    image.write_bytes(source.read_bytes()[:2000])
    assert main([*base, "--overwrite", "--overlap", "0.25", str(image)]) == 1
    assert (out / "ct_004.nii.gz").read_bytes() == made
    record = yaml.safe_load((out / "prediction.yaml").read_text())
    case = record["cases"][0]
    assert (
        case["status"] == "done"
        and case["outputs"]["nifti"]["run"] == 1
        and record["runs"][1]["infer"]["overlap"] == 0.5
    )
    assert "ct_004_0000.nii.gz" in case["last_error"] and case["last_error_run"] == 3
    # A good re-run with --overwrite replaces both, with the new settings.
    shutil.copy2(source, image)
    assert main([*base, "--overwrite", "--overlap", "0.25", str(image)]) == 0
    record = yaml.safe_load((out / "prediction.yaml").read_text())
    case = record["cases"][0]
    assert case["run"] == 4 and case["outputs"]["nifti"]["run"] == 4 and "last_error" not in case
    assert record["runs"][4]["infer"]["overlap"] == 0.25 and set(record["runs"]) == {4}


def test_predict_and_batch_share_the_inference_options() -> None:
    from medseg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def options(name: str) -> set[str]:
        return {o for a in sub.choices[name]._actions for o in a.option_strings}

    shared = {"--overlap", "--blend", "--batch-size", "--mirror-axes", "--body-crop", "--device", "--precision"}
    shared |= {"--threads", "--largest-component", "--min-component-mm3", "--fill-holes"}
    assert shared <= options("predict") and shared <= options("batch")
    assert {"--outputs", "--series", "--seg-type"} <= options("predict")
    args = parser.parse_args(
        ["batch", "in", "--model", "m", "--out", "o", "--overlap", "0.25", "--fill-holes", "--device", "cpu"]
    )
    from medseg.infer.cli import infer_overrides

    assert infer_overrides(args, device=False) == {"overlap": 0.25, "fill_holes": True}
    assert args.device == "cpu"


def test_batch_applies_the_inference_options(tiny_model: Path, tmp_path: Path) -> None:
    from medseg.batch.runner import BatchOptions, run_batch
    from medseg.errors import ConfigError

    series = write_series(2, tmp_path / "archive" / "c2")
    with pytest.raises(ConfigError, match="overlap"):
        run_batch(series.parent, tiny_model, tmp_path / "bad", BatchOptions(infer={"overlap": 1.5}, progress=False))
    summary = run_batch(
        series.parent,
        tiny_model,
        tmp_path / "out",
        BatchOptions(infer={"body_crop": "none", "overlap": 0.25}, progress=False),
    )
    assert summary["counts"]["done"] == 1
    out_dir = tmp_path / "out" / summary["outputs"][0]["out_dir"]
    from medseg.config import InferConfig
    from medseg.infer.predictor import Predictor
    from medseg.models.package import load_model

    model = load_model(tiny_model)
    expected = Predictor(
        model,
        infer=InferConfig.model_validate({**model.config.infer.model_dump(), "body_crop": "none", "overlap": 0.25}),
    ).predict([read_dicom_series(series)])
    assert np.array_equal(load_volume(out_dir / "segmentation.nii.gz", kind="label").array, expected.array)
    timings = json.loads((out_dir / ".medseg-series.json").read_text())["timings"]
    assert timings["windows"] == 8  # every window ran (no body crop) at overlap 0.25
