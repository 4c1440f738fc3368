"""Surface distances (HD95, HD, ASSD, NSD) against MONAI, SimpleITK, DeepMind's surface-distance and
analytic answers; lesion-wise metrics and panoptic quality against hand-made cases and MONAI."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_hausdorff_distance,
    compute_panoptic_quality,
    compute_surface_dice,
)
from scipy import ndimage

from medseg.data.instances import connected_instances
from medseg.evaluate import case_metrics, lesion_metrics, surface_distances, surface_metrics
from medseg.evaluate.surface import bounding_box, farthest_surface_point, surface_voxels
from medseg.io import Geometry, Volume, load_volume

SPLEEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spleen-labels-udacity"
MM_TOL, RATIO_TOL = 1e-3, 1e-6


# ------------------------------------------------------------------ references
def monai_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float, *, full: bool = True
) -> dict[str, float]:
    """MONAI's own functions on one-hot (background, foreground) tensors (HD95 and NSD only unless ``full``)."""
    p = torch.from_numpy(np.stack([~pred, pred])[None])
    r = torch.from_numpy(np.stack([~ref, ref])[None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "hd95_mm": float(compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)),
            "nsd": float(compute_surface_dice(p, r, class_thresholds=[tol], spacing=spacing)),
        }
        if full:
            out["hd_mm"] = float(compute_hausdorff_distance(p, r, spacing=spacing))
            out["assd_mm"] = float(compute_average_surface_distance(p, r, symmetric=True, spacing=spacing))
    return out


def _itk(mask: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))
    image.SetSpacing([float(s) for s in spacing])
    return image


def sitk_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    """Independent construction with SimpleITK: LabelContour surfaces + Maurer distance maps."""
    pred, ref = np.pad(pred, 1), np.pad(ref, 1)  # ITK's border handling differs; give both a background rim
    contours = {}
    for name, mask in (("pred", pred), ("ref", ref)):
        contour = sitk.LabelContour(_itk(mask, spacing), fullyConnected=False, backgroundValue=0)
        contours[name] = sitk.GetArrayFromImage(contour).transpose(2, 1, 0) > 0
        assert np.array_equal(contours[name], surface_voxels(mask))  # same surface definition
    directed = {}
    for source, target in (("pred", "ref"), ("ref", "pred")):
        dist = sitk.SignedMaurerDistanceMap(
            _itk(contours[target], spacing), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        values = np.maximum(sitk.GetArrayFromImage(dist).transpose(2, 1, 0), 0.0)
        directed[source] = values[contours[source]].astype(np.float64)
    hd_filter = sitk.HausdorffDistanceImageFilter()
    hd_filter.Execute(_itk(contours["pred"], spacing), _itk(contours["ref"], spacing))
    both = np.concatenate([directed["pred"], directed["ref"]])
    return {
        "hd95_mm": max(float(np.percentile(d, 95)) for d in directed.values()),
        "hd_mm": hd_filter.GetHausdorffDistance(),
        "assd_mm": float(both.mean()),
        "nsd": float(np.count_nonzero(both <= tol) / both.size),
    }


def assert_agree(ours: dict[str, float], theirs: dict[str, float], what: str) -> None:
    for key in ("hd95_mm", "hd_mm", "assd_mm"):
        if key not in theirs:
            continue
        assert abs(ours[key] - theirs[key]) < MM_TOL, f"{what} {key}: {ours[key]} vs {theirs[key]}"
    assert abs(ours["nsd"] - theirs["nsd"]) < RATIO_TOL, f"{what} nsd: {ours['nsd']} vs {theirs['nsd']}"


def blob_masks(seed: int, shape: tuple[int, int, int] = (44, 40, 26)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    noisy = field + 0.35 * ndimage.gaussian_filter(rng.standard_normal(shape), 2)
    return noisy > 0.08, field > 0.05


# ------------------------------------------------------------------ agreement
@pytest.mark.parametrize(("seed", "spacing"), [(0, (0.7, 1.3, 5.0)), (1, (1.0, 1.0, 1.0)), (2, (0.8, 0.8, 2.5))])
def test_surface_metrics_agree_with_monai_and_simpleitk(seed: int, spacing: tuple[float, float, float]) -> None:
    pred, ref = blob_masks(seed)
    ours = surface_metrics(pred, ref, spacing=spacing, tolerance_mm=2.0)
    assert 0.3 < ours["nsd"] < 0.99 and ours["hd95_mm"] > 2 * min(spacing)  # a realistic, imperfect pair
    assert_agree(ours, monai_metrics(pred, ref, spacing, 2.0), "MONAI")
    assert_agree(ours, sitk_metrics(pred, ref, spacing, 2.0), "SimpleITK")
    # The distance-transform path gives the same distances as the k-d tree.
    tree = surface_distances(pred, ref, spacing=spacing)
    edt = surface_distances(pred, ref, spacing=spacing, method="edt", crop=False)
    np.testing.assert_allclose(edt.pred_to_ref, tree.pred_to_ref, atol=1e-9)
    np.testing.assert_allclose(edt.ref_to_pred, tree.ref_to_pred, atol=1e-9)


def test_hd95_is_the_larger_directed_percentile() -> None:
    pred, ref = blob_masks(4)
    d = surface_distances(pred, ref, spacing=(1.0, 1.0, 1.0))
    directed = [float(np.percentile(x, 95)) for x in (d.pred_to_ref, d.ref_to_pred)]
    assert directed[0] != pytest.approx(directed[1])  # the choice matters for this pair
    pooled = float(np.percentile(np.concatenate([d.pred_to_ref, d.ref_to_pred]), 95))
    assert d.hausdorff(95) == max(directed) != pytest.approx(pooled)


def test_real_spleen_pair_matches_references() -> None:
    gt, auto = SPLEEN_DIR / "spleen1_label_gt.nii.gz", SPLEEN_DIR / "spleen1_label_auto.nii.gz"
    if not (gt.is_file() and auto.is_file()):
        pytest.skip(f"real spleen labels not available in {SPLEEN_DIR}")
    ref, pred = load_volume(gt, kind="label"), load_volume(auto, kind="label")
    spacing = ref.geometry.spacing
    assert spacing[2] == pytest.approx(5.0)
    row = case_metrics(pred, ref, label_names={1: "spleen"}, case_id="spleen1")[0]
    assert row["dice"] == pytest.approx(0.8869, abs=5e-4)
    # References on a crop with a 3-voxel rim (the full 512x512x65 one-hot is slow in MONAI; the crop
    # cannot change the result since only surface voxels matter).
    p, r = pred.array[0] == 1, ref.array[0] == 1
    box = bounding_box(p, r, margin=3)
    assert box is not None
    assert_agree(row, monai_metrics(p[box], r[box], spacing, 2.0, full=False), "MONAI")
    assert_agree(row, sitk_metrics(p[box], r[box], spacing, 2.0), "SimpleITK")
    assert 5.0 < row["hd95_mm"] < 30.0 and 0.5 < row["nsd"] < 0.95  # plausible for Dice 0.89 at 5 mm slices


# ------------------------------------------------------------------ known answers
def sphere(n: int, centre: tuple[float, float, float], radius: float) -> np.ndarray:
    x, y, z = np.ogrid[:n, :n, :n]
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2


def analytic_sphere_distances(radius: float, shift: float) -> np.ndarray:
    """Distances from a sphere's surface to the same sphere shifted by ``shift``: | |p - c'| - R |.

    Sampled uniformly in cos(theta), which is uniform in area on the sphere.
    """
    cos = np.linspace(-1.0, 1.0, 400_001)
    return np.abs(np.sqrt(radius**2 + shift**2 - 2 * radius * shift * cos) - radius)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface_distance uses scipy.ndimage.filters
@pytest.mark.parametrize(("shift", "voxel"), [(2, 0.5), (4, 0.5), (3, 0.4)])
def test_shifted_spheres_have_the_analytic_distances(shift: int, voxel: float) -> None:
    deepmind = pytest.importorskip("surface_distance")  # DeepMind: surfels on the voxel-corner grid

    n, radius = 72, 22
    ref = sphere(n, (36, 36, 33), radius)
    pred = sphere(n, (36, 36, 33 + shift), radius)
    spacing = (voxel,) * 3
    d = surface_distances(pred, ref, spacing=spacing)
    exact = analytic_sphere_distances(radius * voxel, shift * voxel)
    # The maximum is exactly the shift (the poles), for us, for DeepMind and for the analytic shapes.
    assert d.hausdorff(100) == pytest.approx(shift * voxel, abs=1e-12)
    theirs = deepmind.compute_surface_distances(ref, pred, spacing)
    assert deepmind.compute_robust_hausdorff(theirs, 100) == pytest.approx(shift * voxel, abs=1e-12)
    # Mean and 95th percentile: within a fraction of a voxel of the continuous spheres (ASSD = shift/2).
    assert exact.mean() == pytest.approx(shift * voxel / 2, rel=1e-3)
    assert d.assd() == pytest.approx(exact.mean(), abs=0.15 * voxel)
    assert d.hausdorff(95) == pytest.approx(float(np.percentile(exact, 95)), abs=0.25 * voxel)


@pytest.mark.parametrize(("axis", "expected"), [(2, 5.0), (0, 0.7), (1, 1.3)])
def test_one_voxel_shift_is_one_spacing_along_that_axis(axis: int, expected: float) -> None:
    spacing = (0.7, 1.3, 5.0)
    ref = np.zeros((20, 20, 12), dtype=bool)
    ref[5:14, 6:15, 3:8] = True
    pred = np.roll(ref, 1, axis=axis)
    ours = surface_metrics(pred, ref, spacing=spacing, tolerance_mm=expected - 1e-3)
    assert ours["hd_mm"] == pytest.approx(expected, abs=1e-12)
    assert ours["hd95_mm"] == pytest.approx(expected, abs=1e-12)
    assert ours["nsd"] < 1.0  # the shifted faces are beyond a tolerance just below one spacing
    # every surface voxel is within one spacing (plus rounding of index * spacing) of the other surface
    assert surface_metrics(pred, ref, spacing=spacing, tolerance_mm=expected + 1e-9)["nsd"] == 1.0
    assert_agree(ours, monai_metrics(pred, ref, spacing, expected - 1e-3), "MONAI")


def test_single_voxels() -> None:
    ref = np.zeros((6, 6, 8), dtype=bool)
    ref[2, 3, 2] = True
    pred = np.zeros_like(ref)
    pred[2, 3, 5] = True
    spacing = (0.8, 0.8, 2.0)
    ours = surface_metrics(pred, ref, spacing=spacing, tolerance_mm=2.0)
    assert ours == {"hd95_mm": 6.0, "hd_mm": 6.0, "assd_mm": 6.0, "nsd": 0.0}
    same = surface_metrics(ref, ref, spacing=spacing, tolerance_mm=0.0)
    assert same == {"hd95_mm": 0.0, "hd_mm": 0.0, "assd_mm": 0.0, "nsd": 1.0}
    assert farthest_surface_point(pred, ref, spacing=spacing) == ((2, 3, 5), 6.0)


def test_empty_masks_follow_the_conventions() -> None:
    empty = np.zeros((8, 8, 8), dtype=bool)
    blob = empty.copy()
    blob[2:5, 2:5, 2:5] = True
    both = surface_metrics(empty, empty, spacing=(1, 1, 1))
    assert all(math.isnan(v) for v in both.values())
    for pred, ref in ((blob, empty), (empty, blob)):
        one = surface_metrics(pred, ref, spacing=(1, 1, 1))
        assert one["hd95_mm"] == one["hd_mm"] == one["assd_mm"] == math.inf
        assert one["nsd"] == 0.0
    # MONAI gives +inf too when the reference is empty and the prediction is not.
    assert monai_metrics(blob, empty, (1.0, 1.0, 1.0), 1.0)["hd_mm"] == math.inf


def test_rows_carry_surface_metrics_for_classes_and_regions() -> None:
    spacing = (0.9, 0.9, 3.0)
    pred, ref = blob_masks(7, shape=(30, 30, 16))
    ref_labels = ref.astype(np.uint8) + (ref & (np.arange(30)[:, None, None] > 15)).astype(np.uint8)  # 1 and 2
    pred_labels = pred.astype(np.uint8) + (pred & (np.arange(30)[:, None, None] > 14)).astype(np.uint8)

    def volume(a: np.ndarray) -> Volume:
        return Volume(a[None], Geometry.from_itk(shape=a.shape, spacing=spacing, origin=(0, 0, 0), direction=np.eye(3)))

    rows = case_metrics(
        volume(pred_labels),
        volume(ref_labels),
        label_names={1: "core", 2: "rim"},
        case_id="c",
        regions={"whole": [1, "rim"]},
    )
    assert [(r["kind"], r["label"], r["name"]) for r in rows] == [
        ("class", 1, "core"),
        ("class", 2, "rim"),
        ("region", "1+2", "whole"),
    ]
    for row, (p, r) in zip(
        rows, [(pred_labels == 1, ref_labels == 1), (pred_labels == 2, ref_labels == 2), (pred, ref)], strict=True
    ):
        expected = surface_metrics(p, r, spacing=spacing, tolerance_mm=2.0)
        assert {k: row[k] for k in expected} == pytest.approx(expected, abs=1e-12)
        assert row["dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-12)
        assert row["nsd_tolerance_mm"] == 2.0


# ------------------------------------------------------------------ lesions
def lesion_scene() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((40, 40, 12), dtype=bool)
    pred = np.zeros_like(ref)
    ref[2:8, 2:8, 2:6] = True  # A: found well
    pred[2:8, 3:8, 2:6] = True
    ref[14:24, 2:8, 2:6] = True  # B: split into two predicted pieces
    pred[14:18, 2:8, 2:6] = True
    pred[20:24, 2:8, 2:6] = True
    ref[30:36, 30:36, 2:6] = True  # C: missed
    pred[2:5, 30:33, 8:10] = True  # D: false positive far away
    ref[20:26, 20:26, 2:8] = True  # E: barely touched (IoU < 0.1)
    pred[25:27, 25:27, 7:9] = True
    return pred, ref


def test_lesion_detection_known_answer() -> None:
    pred, ref = lesion_scene()
    summary, rows = lesion_metrics(pred, ref, connectivity=26, match_iou=0.1, voxel_ml=0.5)
    assert (summary["ref_lesions"], summary["pred_lesions"]) == (4, 5)
    assert (summary["lesion_tp"], summary["lesion_fn"], summary["lesion_fp"]) == (2, 2, 3)
    assert summary["lesion_sensitivity"] == 0.5
    assert summary["lesion_precision"] == pytest.approx(2 / 5)
    assert summary["lesion_f1"] == pytest.approx(4 / 9)
    dice_a = 2 * 120 / (144 + 120)
    dice_b = 2 * 96 / (240 + 96)  # the better of the two pieces (both same size: the first by id)
    assert summary["lesion_dice"] == pytest.approx((dice_a + dice_b) / 4)
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("TP", "FN", "FP")}
    assert [len(by_status[s]) for s in ("TP", "FN", "FP")] == [2, 2, 3]
    assert sorted(r["ref_voxels"] for r in by_status["FN"]) == [144, 216]  # C and the barely touched E
    assert sorted(r["pred_voxels"] for r in by_status["FP"]) == [8, 18, 96]
    tp_a = next(r for r in by_status["TP"] if r["ref_voxels"] == 144)
    assert tp_a["dice"] == pytest.approx(dice_a) and tp_a["ref_volume_ml"] == 72.0
    # "Any overlap" matching counts the barely touched lesion as found.
    loose, _ = lesion_metrics(pred, ref, match_iou=0.0)
    assert (loose["lesion_tp"], loose["lesion_fn"], loose["lesion_fp"]) == (3, 1, 2)


def test_lesion_connectivity_changes_instances() -> None:
    ref = np.zeros((10, 10, 10), dtype=bool)
    ref[2:4, 2:4, 2:4] = True
    ref[4:6, 4:6, 4:6] = True  # touches the first only at a corner
    for connectivity, expected in ((6, 2), (18, 2), (26, 1)):
        summary, _ = lesion_metrics(ref, ref, connectivity=connectivity)
        assert summary["ref_lesions"] == expected and summary["lesion_f1"] == 1.0 and summary["pq"] == 1.0


def test_panoptic_quality_matches_monai() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal((36, 36, 10)), 2)
        ref = field > 0.12
        pred = ndimage.binary_dilation(ref, iterations=1) & (rng.random(ref.shape) > 0.03)
        pred ^= ndimage.gaussian_filter(rng.standard_normal(ref.shape), 1.5) > 0.55
        ours, _ = lesion_metrics(pred, ref, connectivity=26)
        ref_inst, _ = connected_instances(ref.view(np.uint8))
        pred_inst, _ = connected_instances(pred.view(np.uint8))
        tp, fp, fn, iou_sum = compute_panoptic_quality(
            torch.from_numpy(pred_inst.astype(np.int64)),
            torch.from_numpy(ref_inst.astype(np.int64)),
            output_confusion_matrix=True,
        ).tolist()
        assert ours["pred_lesions"] > 3 and ours["ref_lesions"] > 3
        assert 0 < ours["pq"] < 1
        assert ours["pq"] == pytest.approx(iou_sum / (tp + 0.5 * fp + 0.5 * fn), abs=1e-6)
        assert ours["sq"] == pytest.approx(iou_sum / tp, abs=1e-6)
        assert ours["rq"] == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn), abs=1e-9)
        assert ours["pq"] == pytest.approx(ours["sq"] * ours["rq"], rel=1e-12)


def test_lesion_centres_are_lps_millimetres() -> None:
    ref = np.zeros((10, 10, 10), dtype=bool)
    ref[2:5, 4:7, 6:9] = True  # centre (3, 5, 7)
    geometry = Geometry.from_itk(
        shape=ref.shape, spacing=(0.5, 2.0, 3.0), origin=(10.0, 20.0, 30.0), direction=np.eye(3)
    )
    _, rows = lesion_metrics(ref[1:, 1:, 1:], ref[1:, 1:, 1:], affine=geometry.affine, offset=(1, 1, 1))
    assert len(rows) == 1
    centre = (rows[0]["centre_x_mm"], rows[0]["centre_y_mm"], rows[0]["centre_z_mm"])
    assert centre == pytest.approx((10.0 + 3 * 0.5, 20.0 + 5 * 2.0, 30.0 + 7 * 3.0))
