"""Inputs are read-only under every flag: outputs that are, contain or lie inside an input are refused.

Every command that writes (predict, export, convert, evaluate, batch, pacs, plan, train, demo, and the
``write_volume`` API) is run against its own inputs; each run must exit 2 with a one-line
message naming the conflict, and leave every input byte-identical with no new file beside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.errors import OutputPathError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "Dataset001_CTPhantom"
SAMPLE_DICOM = REPO / "sample_data" / "dicom"


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (or of ``root`` itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A copy of two sample cases in nnU-Net layout (imagesTr/labelsTr/imagesTs/labelsTs)."""
    if not SAMPLE.is_dir():
        pytest.skip("sample_data missing")
    root = tmp_path / "Dataset001_CTPhantom"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    for name in ("ct_000", "ct_001"):
        shutil.copy(SAMPLE / "imagesTr" / f"{name}_0000.nii.gz", root / "imagesTr")
        shutil.copy(SAMPLE / "labelsTr" / f"{name}.nii.gz", root / "labelsTr")
    shutil.copy(SAMPLE / "imagesTs" / "ct_010_0000.nii.gz", root / "imagesTs")
    if (SAMPLE / "labelsTs" / "ct_010.nii.gz").exists():
        shutil.copy(SAMPLE / "labelsTs" / "ct_010.nii.gz", root / "labelsTs")
    shutil.copy(SAMPLE / "dataset.json", root)
    return root


@pytest.fixture()
def dicom_dir(tmp_path: Path) -> Path:
    if not SAMPLE_DICOM.is_dir():
        pytest.skip("sample_data/dicom missing")
    series = next(p for p in sorted(SAMPLE_DICOM.iterdir()) if p.is_dir())
    return Path(shutil.copytree(series, tmp_path / "dicom_in"))


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- predict
def test_predict_over_its_own_input_file_is_refused_even_with_overwrite(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = dataset / "imagesTr"
    before = _snapshot(images)
    case = images / "ct_000_0000.nii.gz"
    # The output folder contains the input: the label would replace nothing here (other name),
    # but prediction.yaml would land in the input folder; with a suffix-less case name it would
    # overwrite the input. Refused before the model is even loaded (the model path does not exist).
    _refused(
        capsys,
        ["predict", "--model", str(dataset / "no-model"), "--out", str(images), str(case), "--overwrite"],
        "output folder contains the input file",
    )
    assert _snapshot(images) == before


def test_predict_out_inside_input_folder_or_model_is_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = dataset / "imagesTs"
    _refused(
        capsys,
        ["predict", "--model", str(dataset / "m"), "--out", str(images / "preds"), str(images)],
        "lies inside the input folder",
    )
    assert not (images / "preds").exists()
    model = dataset.parent / "model"
    model.mkdir()
    _refused(
        capsys,
        ["predict", "--model", str(model), "--out", str(model), str(images)],
        "output folder is the input folder",
    )
    assert list(model.iterdir()) == []


def test_predict_out_through_symlink_is_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = dataset.parent / "link_to_images"
    link.symlink_to(dataset / "imagesTs", target_is_directory=True)
    before = _snapshot(dataset / "imagesTs")
    _refused(
        capsys,
        [
            "predict",
            "--model",
            str(dataset / "m"),
            "--out",
            str(link),
            str(dataset / "imagesTs" / "ct_010_0000.nii.gz"),
        ],
        "output folder contains the input file",
    )
    assert _snapshot(dataset / "imagesTs") == before


def test_predict_output_location_checked_before_loading(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = dataset / "dataset.json"
    inputs = str(dataset / "imagesTs")
    _refused(capsys, ["predict", "--model", "m", "--out", str(a_file), inputs], "exists and is not a folder")
    _refused(capsys, ["predict", "--model", "m", "--out", str(a_file / "sub"), inputs], "is a file, not a folder")


# ----------------------------------------------------------------------------- convert
def test_convert_out_inside_input_is_refused(dicom_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(dicom_dir)
    _refused(capsys, ["convert", str(dicom_dir), str(dicom_dir / "out")], "lies inside the input folder")
    _refused(capsys, ["convert", str(dicom_dir), str(dicom_dir), "--overwrite"], "is the input folder")
    assert _snapshot(dicom_dir) == before


def test_convert_volume_into_its_own_folder_is_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = dataset / "imagesTr"
    before = _snapshot(images)
    source = images / "ct_000_0000.nii.gz"
    _refused(capsys, ["convert", str(source), str(images), "--overwrite"], "contains the input file")
    _refused(capsys, ["convert", str(source), str(source), "--overwrite"], "is the input file")
    assert _snapshot(images) == before


def test_convert_does_not_reingest_its_outputs(dicom_dir: Path, tmp_path: Path) -> None:
    """``convert IN OUT`` twice with ``--overwrite``: the second run converts the same series only."""
    out = tmp_path / "converted"
    assert main(["convert", str(dicom_dir), str(out)]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert main(["convert", str(dicom_dir), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == first


def test_convert_rtstruct_next_to_its_reference_is_refused(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = shared_data / "rtstruct-dicomrttool-anon"
    if not src.is_dir():
        pytest.skip("rtstruct data missing")
    folder = Path(shutil.copytree(src, tmp_path / "rt"))
    rts = [p for p in folder.rglob("*") if p.is_file() and "RS" in p.name.upper()]
    from medseg.io.rtstruct import find_rtstructs

    found = find_rtstructs(folder)
    assert found or rts
    rtstruct = (found or rts)[0]
    before = _snapshot(folder)
    # default reference = the RTSTRUCT's folder: an output inside it is refused
    _refused(capsys, ["convert", str(rtstruct), str(rtstruct.parent / "labels")], "lies inside the input")
    assert _snapshot(folder) == before


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_report_into_inputs_is_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = dataset / "labelsTr"
    before = _snapshot(labels)
    _refused(
        capsys,
        ["evaluate", "--pred", str(labels), "--ref", str(labels), "--out", str(labels), "--overwrite"],
        "report folder is the input folder",
    )
    _refused(
        capsys,
        ["evaluate", "--pred", str(labels), "--ref", str(labels), "--out", str(dataset)],
        "report folder contains the input folder",
    )
    assert _snapshot(labels) == before
    assert not (dataset / "summary.json").exists()


# ----------------------------------------------------------------------------- batch / pacs
def test_batch_out_containing_or_inside_archive_is_refused(
    dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(
        capsys,
        ["batch", str(dicom_dir), "--model", "/nonexistent/model", "--out", str(tmp_path)],
        "output folder contains the input folder",
    )
    _refused(
        capsys,
        ["batch", str(dicom_dir), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "model" / "o")],
        "output folder lies inside the input",
    )
    assert not (tmp_path / "manifest.sqlite").exists() and not (tmp_path / "model").exists()


def test_pacs_out_over_model_or_profile_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    profile = tmp_path / "profile.yaml"
    profile.write_text("name: x\n")
    _refused(
        capsys,
        ["pacs", "run", "--profile", str(profile), "--model", str(model), "--out", str(model / "o"), "--all"],
        "output folder lies inside the input folder",
    )
    _refused(
        capsys,
        ["listen", "--profile", str(profile), "--model", str(model), "--out", str(profile)],
        "output folder is the input file",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "profile.yaml"]


# ----------------------------------------------------------------------------- plan / train / demo
def test_plan_and_train_outputs_inside_dataset_are_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(dataset)
    _refused(capsys, ["plan", str(dataset), "-o", str(dataset / "plan.yaml")], "plan file lies inside")
    config = dataset.parent / "c.yaml"
    config.write_text("seed: 1\n")
    _refused(
        capsys,
        ["plan", str(dataset), "-o", str(config), "--config", str(config), "--overwrite"],
        "plan file is the input file",
    )
    assert config.read_text() == "seed: 1\n"
    _refused(capsys, ["train", str(dataset), "--out", str(dataset / "model")], "model folder lies inside")
    _refused(capsys, ["train", str(dataset), "--out", str(dataset.parent), "--config", str(config)], "contains")
    assert _snapshot(dataset) == before


def test_train_api_refuses_model_folder_inside_a_case_folder(dataset: Path) -> None:
    from medseg.config import Config
    from medseg.data.datasets import load_dataset
    from medseg.train.loop import train

    info = load_dataset(dataset)
    with pytest.raises(OutputPathError, match="model folder lies inside"):
        train(info, out_dir=dataset / "labelsTr" / "model", config=Config())


def test_demo_out_over_data_is_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, ["demo", "--data", str(dataset), "--out", str(dataset / "demo")], "lies inside")


# ----------------------------------------------------------------------------- API
def test_write_volume_never_replaces_its_source(dataset: Path) -> None:
    from medseg.io import load_volume, write_volume

    source = dataset / "imagesTr" / "ct_000_0000.nii.gz"
    before = source.read_bytes()
    volume = load_volume(source)
    with pytest.raises(OutputPathError, match="output file is the input file"):
        write_volume(volume, source, overwrite=True)
    assert source.read_bytes() == before
    assert [p.name for p in source.parent.iterdir() if p.name.startswith(".")] == []


def test_write_volume_into_its_dicom_folder_is_refused(dicom_dir: Path) -> None:
    from medseg.io import load_volume, write_volume

    volume = load_volume(dicom_dir)
    with pytest.raises(OutputPathError, match="lies inside the input folder"):
        write_volume(volume, dicom_dir / "x.nii.gz")
    assert not (dicom_dir / "x.nii.gz").exists()


def test_write_into_a_path_under_a_file_is_a_typed_error(dataset: Path, tmp_path: Path) -> None:
    from medseg.io import load_volume, write_volume

    volume = load_volume(dataset / "imagesTr" / "ct_000_0000.nii.gz")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        write_volume(volume, blocker / "sub" / "out.nii.gz")
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        write_volume(volume, tmp_path / "dir.nii.gz", overwrite=True)


def _as_unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run as an unprivileged user (``setpriv`` as root), so permission checks mean something."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot test permissions")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


def test_unwritable_output_folder_is_reported_before_work(dataset: Path) -> None:
    import subprocess
    import sys
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="medseg-perm-"))
    try:
        base.chmod(0o755)
        inputs = Path(shutil.copytree(dataset / "imagesTs", base / "in"))
        for p in [inputs, *inputs.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        argv = [sys.executable, "-m", "medseg.cli", "predict", "--model", "m", "--out", str(locked / "o"), str(inputs)]
        result = subprocess.run(_as_unprivileged(argv), capture_output=True, text=True, timeout=120, cwd=base)
        assert result.returncode == 2, result.stderr
        assert "is not writable (permission denied)" in result.stderr and "Traceback" not in result.stderr
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_predict_api_refuses_before_writing_provenance(tiny_model: Path, dataset: Path) -> None:
    from medseg.infer.predictor import Predictor
    from medseg.infer.run import predict_to_folder

    images = dataset / "imagesTs"
    before = _snapshot(images)
    predictor = Predictor(tiny_model, progress=False)
    with pytest.raises(OutputPathError, match="contains the input file"):
        predict_to_folder(predictor, [images / "ct_010_0000.nii.gz"], images, overwrite=True, progress=False)
    with pytest.raises(OutputPathError, match="lies inside the input folder"):
        predict_to_folder(predictor, [dataset / "imagesTs"], tiny_model / "preds", progress=False)
    assert _snapshot(images) == before and not (images / "prediction.yaml").exists()
    assert not (tiny_model / "preds").exists()


def test_export_into_its_model_is_refused(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tiny_model)
    for argv in (
        ["export", str(tiny_model), "--out", str(tiny_model / "model.onnx"), "--overwrite"],
        ["export", str(tiny_model), "--out", str(tiny_model / "weights.pt"), "--overwrite"],
    ):
        _refused(capsys, argv, "lies inside the input folder")
    assert _snapshot(tiny_model) == before
