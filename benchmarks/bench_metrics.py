"""Surface metrics on a 512x512x300 label pair: medseg vs MONAI, same inputs, same process, interleaved.

The pair: 5 foreground classes shaped like abdominal organs (a liver-sized ellipsoid, spleen, two
kidneys, two small lesions) on a 0.8 x 0.8 x 1.5 mm grid; the prediction is the reference deformed by
smooth noise (Dice 0.85-0.95), so surfaces differ everywhere as in real predictions.

* MONAI: ``compute_hausdorff_distance(percentile=95)`` + ``compute_surface_dice`` (one call each, all
  classes, ``include_background=False``) on one-hot tensors; the one-hot encoding is timed separately.
* medseg: ``evaluate_case`` = Dice/IoU/precision/recall/volumes + HD95 + HD + ASSD + NSD + lesion-wise
  metrics for all classes (everything the report needs), from the label arrays.

Both results are compared (max |difference| of HD95 in mm and NSD) before any time is reported.

Usage: flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_metrics.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from medseg.evaluate.metrics import EvalOptions, evaluate_case, make_structures
from medseg.io import Geometry, Volume

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.5)
TOLERANCE_MM = 2.0
# (label, centre voxel, semi-axes in mm)
ORGANS = [
    (1, (330, 250, 160), (95.0, 80.0, 85.0)),  # liver
    (2, (150, 300, 170), (45.0, 35.0, 55.0)),  # spleen
    (3, (320, 340, 120), (25.0, 30.0, 50.0)),  # kidney right
    (4, (180, 350, 125), (25.0, 30.0, 50.0)),  # kidney left
    (5, (300, 200, 190), (9.0, 9.0, 9.0)),  # lesions
    (5, (360, 230, 140), (6.0, 6.0, 6.0)),
]


def make_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label arrays ``(512, 512, 300)`` uint8."""
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal((64, 64, 38)).astype(np.float32), 2.0)
    noise = ndimage.zoom(coarse / coarse.std(), [s / c for s, c in zip(SHAPE, coarse.shape, strict=True)], order=1)
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    for label, centre, axes_mm in ORGANS:
        box = tuple(
            slice(max(c - int(a / s) - 12, 0), min(c + int(a / s) + 12, n))
            for c, a, s, n in zip(centre, axes_mm, SPACING, SHAPE, strict=True)
        )
        grids = np.ogrid[box]
        r2 = sum(((g - c) * s / a) ** 2 for g, c, s, a in zip(grids, centre, SPACING, axes_mm, strict=True))
        ref[box][r2 <= 1.0] = label
        pred[box][(r2 + 0.12 * noise[box]) <= 1.0] = label
    return pred, ref


def one_hot(labels: np.ndarray, classes: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels == c for c in range(classes)])[None])


def run_monai(pred: np.ndarray, ref: np.ndarray, classes: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    p, r = one_hot(pred, classes), one_hot(ref, classes)
    t_onehot = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = time.perf_counter()
        hd95 = compute_hausdorff_distance(p, r, include_background=False, percentile=95, spacing=SPACING)
        t2 = time.perf_counter()
        nsd = compute_surface_dice(p, r, [TOLERANCE_MM] * (classes - 1), include_background=False, spacing=SPACING)
        t3 = time.perf_counter()
    times = {"onehot_s": t_onehot, "hd95_s": t2 - t1, "nsd_s": t3 - t2, "total_s": t3 - t0}
    return times, hd95.numpy()[0].astype(np.float64), nsd.numpy()[0].astype(np.float64)


def run_medseg(pred: np.ndarray, ref: np.ndarray, names: dict[int, str]) -> tuple[float, np.ndarray, np.ndarray]:
    geometry = Geometry.from_itk(shape=SHAPE, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    pv, rv = Volume(pred[None], geometry, kind="label"), Volume(ref[None], geometry, kind="label")
    t0 = time.perf_counter()
    result = evaluate_case(
        pv, rv, structures=make_structures(names), case_id="bench", options=EvalOptions(tolerance_mm=TOLERANCE_MM)
    )
    elapsed = time.perf_counter() - t0
    return elapsed, np.array([r["hd95_mm"] for r in result.rows]), np.array([r["nsd"] for r in result.rows])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    pred, ref = make_pair()
    names = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "lesion"}
    classes = max(names) + 1
    dice = [
        2 * np.count_nonzero((pred == c) & (ref == c)) / (np.count_nonzero(pred == c) + np.count_nonzero(ref == c))
        for c in names
    ]
    print(f"pair {SHAPE}, spacing {SPACING} mm, Dice per class {np.round(dice, 3).tolist()}")
    ours_t, monai_t = [], []
    for i in range(args.repeats):
        t, hd_ours, nsd_ours = run_medseg(pred, ref, names)
        ours_t.append(t)
        m, hd_monai, nsd_monai = run_monai(pred, ref, classes)
        monai_t.append(m)
        hd_err, nsd_err = float(np.max(np.abs(hd_ours - hd_monai))), float(np.max(np.abs(nsd_ours - nsd_monai)))
        print(
            f"repeat {i + 1}: medseg {t:.2f} s | MONAI {m['total_s']:.2f} s (one-hot {m['onehot_s']:.2f}, "
            f"HD95 {m['hd95_s']:.2f}, NSD {m['nsd_s']:.2f}) | max |dHD95| {hd_err:.2e} mm, max |dNSD| {nsd_err:.2e}"
        )
        assert hd_err < 1e-3 and nsd_err < 1e-6, "medseg and MONAI disagree"
    med_ours = statistics.median(ours_t)
    med_monai = statistics.median(m["total_s"] for m in monai_t)
    med_monai_metrics = statistics.median(m["hd95_s"] + m["nsd_s"] for m in monai_t)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "medseg_all_metrics_s": round(med_ours, 2),
        "monai_hd95_plus_nsd_s": round(med_monai_metrics, 2),
        "monai_including_onehot_s": round(med_monai, 2),
        "speedup_vs_monai_metrics": round(med_monai_metrics / med_ours, 1),
        "speedup_vs_monai_including_onehot": round(med_monai / med_ours, 1),
        "hd95_mm": np.round(hd_ours, 3).tolist(),
        "nsd": np.round(nsd_ours, 4).tolist(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
