from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from scipy import ndimage

from medseg.errors import GeometryError, OutputExistsError
from medseg.evaluate import (
    ROW_COLUMNS,
    aggregate,
    case_metrics,
    confusion_counts,
    evaluate_folders,
)
from medseg.io import Geometry, Volume, load_volume, write_volume

SPLEEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spleen-labels-udacity"


# ------------------------------------------------------------------ helpers
def make_volume(
    array: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    kind: str = "label",
) -> Volume:
    geometry = Geometry.from_itk(shape=array.shape, spacing=spacing, origin=origin, direction=np.eye(3))
    return Volume(array[None], geometry, kind=kind)  # type: ignore[arg-type]


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float = 3.0) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return field / field.std()


def blob_labels(field: np.ndarray, num_classes: int) -> np.ndarray:
    """Classes 0..num_classes-1 from the quantiles of a smooth field (each class present)."""
    edges = np.quantile(field, np.linspace(0, 1, num_classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)


def blob_pair(seed: int, *, num_classes: int = 4, shape: tuple[int, int, int] = (40, 40, 40)):
    rng = np.random.default_rng(seed)
    field = smooth_field(rng, shape)
    ref = blob_labels(field, num_classes)
    noisy = field + 0.5 * smooth_field(rng, shape, sigma=2.0)
    edges = np.quantile(field, np.linspace(0, 1, num_classes + 1)[1:-1])
    pred = np.digitize(noisy, edges).astype(np.uint8)
    return pred, ref


def one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels == c for c in range(num_classes)])[None].astype(np.float32))


# ------------------------------------------------------------------ metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_monai(seed: int) -> None:
    num_classes = 4
    pred, ref = blob_pair(seed, num_classes=num_classes)
    if seed == 2:
        pred[pred == 3] = 0  # a class missed entirely: Dice 0 in both implementations
    names = {c: f"class_{c}" for c in range(num_classes)}
    rows = case_metrics(make_volume(pred), make_volume(ref), label_names=names, case_id=f"blob{seed}")
    assert [r["label"] for r in rows] == [1, 2, 3]

    expected = compute_dice(one_hot(pred, num_classes), one_hot(ref, num_classes), include_background=False)
    expected = expected.numpy()[0]
    ours = np.array([r["dice"] for r in rows])
    assert np.all((ours > 0.3) & (ours < 0.99)) or seed == 2  # a realistic, imperfect overlap
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_confusion_counts_against_masks() -> None:
    pred, ref = blob_pair(5, num_classes=3)
    counts = confusion_counts(pred, ref, labels=[0, 1, 2, 7])
    for label in (0, 1, 2, 7):
        p, r = pred == label, ref == label
        assert counts[label] == (int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum()))
    # Large label values take the compacting path and give the same counts.
    big_pred, big_ref = pred.astype(np.uint32) * 5000, ref.astype(np.uint32) * 5000
    big = confusion_counts(big_pred, big_ref, labels=[5000, 10000, 3])
    assert big[5000] == counts[1] and big[10000] == counts[2] and big[3] == (0, 0, 0)


def test_confusion_counts_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_counts(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), labels=[1])
    with pytest.raises(ValueError, match="negative"):
        confusion_counts(np.full((2, 2, 2), -1), np.zeros((2, 2, 2), np.int64), labels=[1])
    with pytest.raises(ValueError, match="integer"):
        confusion_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), labels=[1])


@pytest.fixture(scope="module")
def spleen_pair() -> tuple[Volume, Volume]:
    gt, auto = SPLEEN_DIR / "spleen1_label_gt.nii.gz", SPLEEN_DIR / "spleen1_label_auto.nii.gz"
    if not (gt.is_file() and auto.is_file()):
        pytest.skip(f"real spleen labels not available in {SPLEEN_DIR}")
    return load_volume(auto, kind="label"), load_volume(gt, kind="label")


def test_spleen_dice_on_real_labels(spleen_pair: tuple[Volume, Volume]) -> None:
    pred, ref = spleen_pair
    assert ref.geometry.shape == (512, 512, 65)
    rows = case_metrics(pred, ref, label_names={0: "background", 1: "spleen"}, case_id="spleen1")
    assert len(rows) == 1
    row = rows[0]
    assert row["name"] == "spleen"
    assert row["dice"] == pytest.approx(0.8869, abs=5e-4)
    # Internal consistency on real data: IoU and Dice describe the same overlap.
    assert row["dice"] == pytest.approx(2 * row["iou"] / (1 + row["iou"]), rel=1e-12)
    spacing = ref.geometry.spacing
    assert row["ref_volume_ml"] == pytest.approx(np.count_nonzero(ref.array) * np.prod(spacing) / 1000, rel=1e-12)
    assert 50 < row["ref_volume_ml"] < 500  # a plausible spleen


def test_volumes_use_anisotropic_spacing() -> None:
    spacing = (0.7, 1.3, 2.5)
    ref = np.zeros((12, 10, 8), np.uint8)
    ref[2:8, 3:7, 1:5] = 1  # 96 voxels
    ref[9:11, 0:2, 0:3] = 2  # 12 voxels
    pred = np.zeros_like(ref)
    pred[2:9, 3:7, 1:5] = 1  # 112 voxels
    rows = case_metrics(
        make_volume(pred, spacing=spacing),
        make_volume(ref, spacing=spacing),
        label_names={1: "a", 2: "b"},
        case_id="aniso",
    )
    voxel_ml = 0.7 * 1.3 * 2.5 / 1000
    a, b = rows
    assert (a["ref_voxels"], a["pred_voxels"]) == (96, 112)
    assert a["ref_volume_ml"] == pytest.approx(96 * voxel_ml, rel=1e-9)
    assert a["pred_volume_ml"] == pytest.approx(112 * voxel_ml, rel=1e-9)
    assert a["volume_diff_ml"] == pytest.approx(16 * voxel_ml, rel=1e-9)
    assert a["dice"] == pytest.approx(2 * 96 / (96 + 112))
    assert (b["ref_voxels"], b["pred_voxels"]) == (12, 0)
    assert b["volume_diff_ml"] == pytest.approx(-12 * voxel_ml, rel=1e-9)
    assert list(a) == list(ROW_COLUMNS)


def test_empty_conventions_and_aggregate() -> None:
    names = {1: "organ", 2: "lesion"}
    ref1 = np.zeros((6, 6, 6), np.uint8)
    ref1[1:4, 1:4, 1:4] = 1
    pred1 = ref1.copy()
    pred1[1, 1, 1] = 0  # organ imperfect, lesion empty in both
    ref2 = np.zeros((6, 6, 6), np.uint8)
    ref2[0:2, 0:2, 0:2] = 1
    pred2 = np.zeros_like(ref2)
    pred2[4:6, 4:6, 4:6] = 2  # organ missed, lesion falsely detected
    rows = case_metrics(make_volume(pred1), make_volume(ref1), label_names=names, case_id="c1")
    rows += case_metrics(make_volume(pred2), make_volume(ref2), label_names=names, case_id="c2")
    by_key = {(r["case"], r["name"]): r for r in rows}

    both_empty = by_key["c1", "lesion"]
    assert all(math.isnan(both_empty[k]) for k in ("dice", "iou", "precision", "recall"))
    assert both_empty["volume_diff_ml"] == 0
    false_positive = by_key["c2", "lesion"]
    assert false_positive["dice"] == 0 and false_positive["iou"] == 0 and false_positive["precision"] == 0
    assert math.isnan(false_positive["recall"])
    missed = by_key["c2", "organ"]
    assert missed["dice"] == 0 and missed["recall"] == 0 and math.isnan(missed["precision"])

    summary = aggregate(rows)
    assert summary["n_cases"] == 2
    lesion, organ = summary["classes"]["lesion"], summary["classes"]["organ"]
    assert lesion["n_empty_both"] == 1 and organ["n_empty_both"] == 0
    assert lesion["dice"]["n"] == 1 and lesion["dice"]["mean"] == 0.0  # the NaN is excluded, not counted as 1
    assert lesion["recall"]["n"] == 0 and math.isnan(lesion["recall"]["mean"])
    organ_dice = by_key["c1", "organ"]["dice"]
    assert organ["dice"]["n"] == 2 and organ["dice"]["mean"] == pytest.approx(organ_dice / 2)
    assert organ["dice"]["std"] == pytest.approx(np.std([organ_dice, 0.0], ddof=1))
    assert summary["mean_foreground_dice"] == pytest.approx((organ_dice / 2 + 0.0) / 2)


def test_geometry_mismatch_names_the_case() -> None:
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    ref = make_volume(labels, spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 30.0))
    shifted = make_volume(labels, spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 31.0))
    with pytest.raises(GeometryError, match="case pat_042"):
        case_metrics(shifted, ref, label_names={1: "x"}, case_id="pat_042")
    nearly = make_volume(labels, spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 30.00001))
    assert case_metrics(nearly, ref, label_names={1: "x"}, case_id="pat_042")[0]["dice"] == 1.0


# ------------------------------------------------------------------ folders
SPACING = (0.9, 0.9, 2.5)


def write_case(folder: Path, name: str, array: np.ndarray, *, kind: str = "label") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_volume(make_volume(array, spacing=SPACING, origin=(-20.0, 15.0, 7.5), kind=kind), folder / name)


def make_dataset(root: Path, case_ids: list[str]) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(7)
    refs, preds, images = root / "ref", root / "pred", root / "images"
    for i, case_id in enumerate(case_ids):
        pred, ref = blob_pair(10 + i, num_classes=3, shape=(24, 20, 12))
        write_case(refs, f"{case_id}.nii.gz", ref)
        write_case(preds, f"{case_id}.nii.gz", pred)
        image = (ref * 100 + rng.normal(0, 20, ref.shape)).astype(np.float32)
        write_case(images, f"{case_id}_0000.nii.gz", image, kind="image")
    return preds, refs, images


def test_evaluate_folders_writes_report(tmp_path: Path) -> None:
    case_ids = ["case_a", "case_b", "case_c"]
    preds, refs, images = make_dataset(tmp_path, case_ids)
    write_case(preds, "stray.nii.gz", np.zeros((24, 20, 12), np.uint8))  # prediction without reference
    out = tmp_path / "report"
    names = {1: "liver", 2: "tumour"}
    summary = evaluate_folders(preds, refs, out_dir=out, label_names=names, images=images)

    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2
    assert list(rows[0]) == list(ROW_COLUMNS)
    assert sorted({r["case"] for r in rows}) == case_ids
    assert {r["name"] for r in rows} == {"liver", "tumour"}

    # The CSV holds the same numbers as a direct computation on the written files.
    direct = case_metrics(
        load_volume(preds / "case_b.nii.gz", kind="label"),
        load_volume(refs / "case_b.nii.gz", kind="label"),
        label_names=names,
        case_id="case_b",
    )
    csv_b = [r for r in rows if r["case"] == "case_b"]
    for got, want in zip(csv_b, direct, strict=True):
        assert float(got["dice"]) == pytest.approx(want["dice"], rel=1e-12)
        assert int(got["ref_voxels"]) == want["ref_voxels"]
        assert float(got["ref_volume_ml"]) == pytest.approx(want["ref_voxels"] * np.prod(SPACING) / 1000)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["n_cases"] == 3
    assert set(summary["classes"]) == {"liver", "tumour"}
    assert summary["classes"]["liver"]["dice"]["n"] == 3
    assert 0 < summary["mean_foreground_dice"] < 1
    stray = [p for p in summary["problems"] if p["case"] == "stray"]
    assert [p["kind"] for p in stray] == ["missing_reference"] and "stray.nii.gz" in stray[0]["message"]
    assert summary["cases_not_evaluated"] == ["stray"]
    assert "Metrics Reloaded" in summary["conventions"]

    report = (out / "report.md").read_text()
    assert "| liver |" in report and "case_c" in report and "overlays/case_a.png" in report
    assert "## Problems" in report and "stray" in report
    for name in ("lesions.csv", "report.html"):
        assert (out / name).stat().st_size > 500
    for case_id in case_ids:
        png = out / "overlays" / f"{case_id}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
    assert not list(out.rglob(".*"))  # no temporary files left

    with pytest.raises(OutputExistsError):
        evaluate_folders(preds, refs, out_dir=out, label_names=names)
    again = evaluate_folders(preds, refs, out_dir=out, label_names=names, max_overlays=1, overwrite=True)
    assert again["mean_foreground_dice"] == pytest.approx(summary["mean_foreground_dice"])


def test_evaluate_folders_finds_labels_in_reference(tmp_path: Path) -> None:
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    one = np.zeros((8, 8, 4), np.uint8)
    one[2:5, 2:5, 1:3] = 1
    two = one.copy()
    two[6:8, 6:8, 0:2] = 3
    write_case(refs, "p1.nii.gz", one)
    write_case(preds, "p1.nii.gz", one)
    write_case(refs, "p2.nrrd", two)
    write_case(preds, "p2.nrrd", one)
    summary = evaluate_folders(preds, refs, out_dir=tmp_path / "out", max_overlays=0)
    assert summary["label_names"] == {"1": "label_1", "3": "label_3"}
    assert summary["classes"]["label_1"]["dice"]["mean"] == 1.0
    label_3 = summary["classes"]["label_3"]
    assert label_3["n_cases"] == 2 and label_3["n_empty_both"] == 1 and label_3["dice"]["mean"] == 0.0
    assert not (tmp_path / "out" / "overlays").exists()


def test_missing_predictions_are_listed_and_the_rest_evaluated(tmp_path: Path) -> None:
    preds, refs, _ = make_dataset(tmp_path, ["c1", "c2", "c3", "c4"])
    (preds / "c2.nii.gz").unlink()
    (preds / "c4.nii.gz").unlink()
    out = tmp_path / "report"
    seen: list[str] = []
    summary = evaluate_folders(
        preds, refs, out_dir=out, label_names={1: "a", 2: "b"}, max_overlays=0, on_problem=lambda p: seen.append(p.case)
    )
    assert seen == ["c2", "c4"]
    assert [(p["case"], p["kind"]) for p in summary["problems"]] == [
        ("c2", "missing_prediction"),
        ("c4", "missing_prediction"),
    ]
    assert summary["cases"] == ["c1", "c3"] and summary["n_cases"] == 2
    assert summary["cases_not_evaluated"] == ["c2", "c4"]
    with (out / "metrics.csv").open(newline="") as handle:
        assert sorted({r["case"] for r in csv.DictReader(handle)}) == ["c1", "c3"]
