"""``medseg export``: ONNX / TorchScript files as a third model adapter (issue 13).

Parity (fp32 on both sides): the exported graph is the torch network traced/exported on one window, so
logits agree to ``LOGIT_RTOL`` times their largest magnitude (float32 rounding: ONNX Runtime's convolution
kernels sum in another order than oneDNN's, and the fold mean is taken per window; measured ~1e-6 for the
medseg model, ~3e-5 for the nnU-Net fixtures, the same size as torch's own float32 error against float64).
Labels: TorchScript's are identical; ONNX's are identical except at near-ties, voxels where the torch
model's decision is within ``TIE`` of its boundary (top-two softmax probabilities, or a region's sigmoid
and 0.5) - 0-4 of 230400 voxels on the nnU-Net fixtures - and at most ``MAX_TIES`` of the voxels.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli import main
from medseg.config import InferConfig
from medseg.errors import ConfigError, ModelError, OutputExistsError, OutputPathError
from medseg.infer.predictor import Predictor
from medseg.io import load_volume
from medseg.models.adapters import open_model
from medseg.models.export import export_model

onnx = pytest.importorskip("onnx", reason="medseg[onnx] extra not installed")
pytest.importorskip("onnxruntime", reason="medseg[onnx] extra not installed")

#: Max |logit difference| exported vs torch, relative to the largest |logit| (float32 on both sides).
LOGIT_RTOL = 1e-4
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: Probability margin of a near-tie, and the largest share of voxels whose ONNX label may differ there.
TIE, MAX_TIES = 1e-3, 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny networks: one thread avoids OpenMP spin-waiting on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny medseg model exported once per format (through the CLI)."""
    out = tmp_path_factory.mktemp("exported")
    files = {}
    for fmt, suffix in FORMATS.items():
        files[fmt] = out / f"tiny{suffix}"
        assert main(["export", str(tiny_model), "--format", fmt, "--out", str(files[fmt])]) == 0
    return files


def _case(sample_root: Path) -> Path:
    return sorted((sample_root / "Dataset001_CTPhantom" / "imagesTs").glob("*.nii.gz"))[0]


def _assert_same_labels(fmt: str, ref: np.ndarray, got: np.ndarray, probs: np.ndarray, kind: str) -> None:
    """Identical labels (TorchScript), or identical except at near-ties of ``probs`` ``(K, *shape)`` (ONNX)."""
    assert ref.shape == got.shape and len(np.unique(ref)) > 1
    differ = ref != got
    if fmt == "torchscript":
        assert not differ.any()
        return
    if kind == "softmax":
        top = np.sort(probs, axis=0)
        tie = top[-1] - top[-2] < TIE
    else:
        tie = (np.abs(probs - 0.5) < TIE).any(axis=0)
    assert not (differ & ~tie.reshape(differ.shape)).any()
    assert differ.mean() <= MAX_TIES


def _fp32(**changes: object) -> InferConfig:
    return InferConfig(precision="fp32", logits_dtype="float32", **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ medseg model
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_medseg_model_export_predicts_the_same(
    fmt: str, tiny_model: Path, exported: dict[str, Path], sample_root: Path, tmp_path: Path
) -> None:
    image = _case(sample_root)
    source, export = open_model(tiny_model), open_model(exported[fmt])
    assert export.preprocessing == source.preprocessing and export.window == source.window
    assert export.output == source.output and export.channels == source.channels

    # logits on the network grid, mirroring on (flipped windows through the exported graph)
    infer = _fp32(mirror_axes=(0, 1))
    reference, candidate = Predictor(source, infer=infer), Predictor(export, infer=infer)
    net_input = reference.preprocess(load_volume(image))[None]
    a, b = reference.predict_logits(net_input), candidate.predict_logits(net_input)
    assert a.shape == b.shape and a.abs().max() > 1.0
    assert float((a - b).abs().max()) <= LOGIT_RTOL * float(a.abs().max())

    # labels through the CLI, and their geometry against independent readers
    outs = {}
    for name, model in (("torch", tiny_model), ("export", exported[fmt])):
        outs[name] = tmp_path / name
        argv = ["predict", str(image), "--model", str(model), "--out", str(outs[name]), "--precision", "fp32"]
        probabilities = ["--save-probabilities", "--probabilities-dtype", "float32"] if name == "torch" else []
        assert main([*argv, *probabilities, "--quiet"]) == 0
    case = image.name.replace("_0000.nii.gz", "")
    written = outs["export"] / f"{case}.nii.gz"
    ref_labels = np.asarray(nib.load(outs["torch"] / f"{case}.nii.gz").dataobj)
    probs = np.moveaxis(np.asarray(nib.load(outs["torch"] / f"{case}_probabilities.nii.gz").dataobj), -1, 0)
    _assert_same_labels(fmt, ref_labels, np.asarray(nib.load(written).dataobj), probs, "softmax")
    assert np.allclose(nib.load(written).affine, nib.load(image).affine, atol=1e-5)
    mine, theirs = sitk.ReadImage(str(written)), sitk.ReadImage(str(image))
    assert mine.GetSize() == theirs.GetSize()
    assert np.allclose(mine.GetSpacing(), theirs.GetSpacing(), atol=1e-6)
    assert np.allclose(mine.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    assert np.allclose(mine.GetDirection(), theirs.GetDirection(), atol=1e-6)
    record = (outs["export"] / "prediction.yaml").read_text()
    assert ("ONNX export" if fmt == "onnx" else "TorchScript export") in record


def test_info_and_evaluate_labels_read_the_export(
    tiny_model: Path, exported: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg.evaluate.inputs import load_label_names

    source = open_model(tiny_model)
    for path in exported.values():
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        patch = ", ".join(str(v) for v in source.window.patch_size)
        assert "export" in text and f"patch_size         {patch}" in text
        assert f"source_fingerprint {source.fingerprint()}" in text and "CT (CT, ct)" in text
        names, _ = load_label_names(path)
        assert names == {k: v for k, v in source.label_names.items() if k}
        adapter = open_model(path)
        assert adapter._networks is None  # described without loading the network
        assert adapter.fingerprint() != source.fingerprint()


def test_torchscript_runs_at_reduced_precision_onnx_in_float32(tiny_model: Path, exported: dict[str, Path]) -> None:
    script = Predictor(open_model(exported["torchscript"]), infer=InferConfig(precision="bf16"))
    assert script.dtype == torch.bfloat16
    onnx_auto = Predictor(open_model(exported["onnx"]), infer=InferConfig(precision="auto"))
    assert onnx_auto.dtype is None and open_model(exported["onnx"]).infer_defaults.precision == "fp32"
    with pytest.raises(ConfigError, match="float32"):
        Predictor(open_model(exported["onnx"]), infer=InferConfig(precision="bf16"))


# ------------------------------------------------------------------------------------ nnU-Net folders
NNUNET_CASES = {
    # name: (dataset, configuration, folds, format)
    "ct_3d_2folds_onnx": ("Dataset501_CT", "3d_fullres", "0,1", "onnx"),
    "ct_2d_torchscript": ("Dataset501_CT", "2d", "0", "torchscript"),
    "regions_onnx": ("Dataset504_Regions", "3d_fullres", "0", "onnx"),
}


@pytest.mark.parametrize("name", list(NNUNET_CASES))
def test_nnunet_export_predicts_the_same(name: str, nnunet_root: Path, models: dict, tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    dataset, configuration, folds, fmt = NNUNET_CASES[name]
    folder = models[dataset][configuration]
    out = tmp_path / f"model{FORMATS[fmt]}"
    result = export_model(folder, out, folds=folds)
    assert result.networks == len(folds.split(","))
    assert result.max_abs_diff <= LOGIT_RTOL * result.max_abs_logit
    source, export = open_model(folder, folds=folds), open_model(out)
    assert export.preprocessing == source.preprocessing and export.window == source.window
    assert export.output == source.output
    files = sorted((nnunet_root / "inputs" / dataset).glob("test_004_*.nii.gz"))
    channels = [load_volume(f) for f in files]
    infer = _fp32(mirror_axes=source.window.allowed_mirror_axes, body_crop="none")
    reference, candidate = Predictor(source, infer=infer), Predictor(export, infer=infer)
    (a, _), (b, _) = reference.pipeline.logits(channels), candidate.pipeline.logits(channels)
    assert a.shape == b.shape and np.abs(a).max() > 1.0
    assert np.abs(a - b).max() <= LOGIT_RTOL * np.abs(a).max()
    expected = reference.predict_case(channels, probabilities="float32")
    assert expected.probabilities is not None
    labels = candidate.predict(channels).array
    kind = source.output.kind
    _assert_same_labels(fmt, expected.labels.array[0], labels[0], expected.probabilities.array, kind)


# ------------------------------------------------------------------------------------ bad input
def _no_labels_written(out: Path) -> bool:
    return not out.exists() or not list(out.glob("*.nii.gz"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_foreign_onnx_without_metadata_is_refused(tmp_path: Path, sample_root: Path) -> None:
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Conv3d(1, 2, 3, padding=1), (torch.zeros(1, 1, 8, 8, 8),), str(foreign), dynamo=False)
    with pytest.raises(ModelError, match=r"foreign\.onnx: not a medseg export: the ONNX model has no 'medseg_export'"):
        open_model(foreign)
    out = tmp_path / "out"
    assert main(["predict", str(_case(sample_root)), "--model", str(foreign), "--out", str(out), "--quiet"]) == 2
    assert _no_labels_written(out)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_export_is_refused(fmt: str, exported: dict[str, Path], tmp_path: Path) -> None:
    data = exported[fmt].read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"bad{FORMATS[fmt]}"
        bad.write_bytes(data[:size])
        with pytest.raises(ModelError, match=r"bad\.(onnx|pt): not a medseg export"):
            open_model(bad).load_networks()


def _rewrite_onnx_metadata(src: Path, dst: Path, edit) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(src))
    entry = next(p for p in model.metadata_props if p.key == "medseg_export")
    entry.value = edit(entry.value)
    onnx.save(model, str(dst))


def _rewrite_torchscript_metadata(src: Path, dst: Path, edit) -> None:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/extra/medseg_export.json"):
                data = edit(data.decode()).encode()
            zout.writestr(info, data)


def _document_edit(change):  # type: ignore[no-untyped-def]
    def edit(text: str) -> str:
        doc = json.loads(text)
        change(doc)
        return json.dumps(doc)

    return edit


TAMPERED = {
    "not JSON": (lambda text: text[: len(text) // 2], r"invalid JSON in the medseg export metadata"),
    "unknown version": (_document_edit(lambda d: d.update(medseg_export=99)), r"document version 99"),
    "missing window": (_document_edit(lambda d: d.pop("window")), r"invalid metadata \(missing 'window'\)"),
    "bad patch": (
        _document_edit(lambda d: d["window"].update(patch_size=[0, 1, 1])),
        r"invalid metadata \(window.patch_size",
    ),
    "plan vs labels": (
        _document_edit(lambda d: d["output"]["labels"].update({"9": "x"})),
        r"invalid metadata \(softmax labels",
    ),
    "deep nesting": (lambda text: text[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}", r"nested deeper"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_metadata_is_refused(fmt: str, case: str, exported: dict[str, Path], tmp_path: Path) -> None:
    edit, message = TAMPERED[case]
    bad = tmp_path / f"tampered{FORMATS[fmt]}"
    (_rewrite_onnx_metadata if fmt == "onnx" else _rewrite_torchscript_metadata)(exported[fmt], bad, edit)
    with pytest.raises(ModelError, match=message):
        open_model(bad)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_metadata_that_does_not_fit_the_graph_fails_without_output(
    fmt: str, exported: dict[str, Path], tmp_path: Path, sample_root: Path
) -> None:
    """Valid metadata declaring one class more than the graph has: refused when the network loads or runs."""

    def more_labels(doc: dict) -> None:
        value = str(len(doc["output"]["labels"]))
        doc["output"]["labels"][value] = "extra"
        plan = doc["preprocessing"]["plan"]
        plan["labels"][value] = "extra"
        plan["network"]["out_channels"] += 1

    bad = tmp_path / f"liar{FORMATS[fmt]}"
    edit = _document_edit(more_labels)
    (_rewrite_onnx_metadata if fmt == "onnx" else _rewrite_torchscript_metadata)(exported[fmt], bad, edit)
    assert len(open_model(bad).label_names) == len(open_model(exported[fmt]).label_names) + 1
    out = tmp_path / "out"
    argv = ["predict", str(_case(sample_root)), "--model", str(bad), "--out", str(out), "--quiet"]
    assert main(argv) in (1, 2)
    assert _no_labels_written(out)
    with pytest.raises(ModelError, match=r"not a medseg export: the (graph|network) gives"):
        net = open_model(bad).load_networks()[0]
        net(torch.zeros(1, 1, *open_model(bad).window.patch_size))


def test_weights_file_and_missing_files_are_named(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"weights\.pt: not a medseg export \(a PyTorch weights file"):
        open_model(tiny_model / "weights.pt")
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(ModelError, match=r"notes\.onnx: not a medseg export: not a readable ONNX model"):
        open_model(text)


def test_missing_onnx_extra_is_named(
    tiny_model: Path, exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"medseg\[onnx\]"):
        open_model(exported["onnx"])
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_model), "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.iterdir())
    open_model(exported["torchscript"])  # TorchScript needs no extra


def test_export_output_rules(tiny_model: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="lies inside the input"):
        export_model(tiny_model, tiny_model / "model.onnx")
    with pytest.raises(OutputExistsError):
        export_model(tiny_model, exported["onnx"])
    with pytest.raises(ModelError, match=r"must be named \*\.onnx"):
        export_model(tiny_model, tmp_path / "model.pt", fmt="onnx")
    with pytest.raises(ModelError, match="--folds and --checkpoint apply to nnU-Net"):
        export_model(tiny_model, tmp_path / "model.onnx", folds="0")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ batch
def test_batch_runs_an_exported_model(exported: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    from test_batch import good_archive

    from medseg.batch.runner import BatchOptions, run_batch

    archive = good_archive(tmp_path / "archive", range(1))
    outs = {}
    for name, model in (("torch", tiny_model), ("onnx", exported["onnx"])):
        outs[name] = tmp_path / name
        options = BatchOptions(progress=False, infer={"precision": "fp32", "logits_dtype": "float32"})
        summary = run_batch(archive, model, outs[name], options)
        assert summary["counts"]["done"] == 1
    (ref,) = sorted(outs["torch"].rglob("*.nii.gz"))
    (got,) = sorted(outs["onnx"].rglob("*.nii.gz"))
    labels, expected = np.asarray(nib.load(got).dataobj), np.asarray(nib.load(ref).dataobj)
    assert labels.shape == expected.shape and np.mean(labels != expected) <= MAX_TIES  # near-ties only
