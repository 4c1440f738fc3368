"""Sliding-window inference: medseg vs MONAI ``sliding_window_inference`` vs nnU-Net v2 (issue #5).

Parts (``all`` runs every part; each prints JSON and a Markdown table):

* ``speed``: 160³ volume (CT phantom upsampled), MONAI UNet 16-256 (random weights, same for
  everyone), 96³ windows, Gaussian blending at 0.5 overlap.  Baselines MONAI (fp32) and nnU-Net
  v2 ``predict_sliding_window_return_logits`` (fp32, its CPU default) are interleaved with medseg
  variants round by round; medians.  Peak RSS per method is measured in a fresh subprocess.
* ``agreement``: the trained demo model on the 4 held-out phantoms: argmax of each method vs the
  fp32 MONAI reference (Dice per class, pooled), on the network grid and end-to-end on the input grid.
* ``memory``: 512x512x600 int16 CT, 14 classes, 96³ windows, the full ``Predictor`` (no body crop,
  every window runs) in a subprocess: peak RSS; once with the plan's spacing equal to the image's
  (labels re-indexed) and once with another spacing (float16 logits + chunked resampling).
* ``e2e``: a 512x512x300 CT written as DICOM, then ``predict_to_folder`` (read DICOM -> predict ->
  write labels) with the 16-256 U-Net: stage timings and the share spent in the network.

Usage (one benchmark at a time on the shared machine)::

    flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_inference.py all \
        --model /tmp/demo_for_bench/model

nnU-Net v2 is a benchmark-only dependency, installed in its own virtualenv
(``python -m venv /tmp/nnunet-venv && /tmp/nnunet-venv/bin/pip install torch==2.13.0 nnunetv2``);
its site-packages are appended to ``sys.path`` (``--nnunet-site``) so that it runs in this
process with this process's torch.  OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``
unless set otherwise) for every method: on a shared 2-core machine spinning threads cost more
than they save.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample
from scipy import ndimage

from medseg.config import Config, InferConfig
from medseg.data.plan import ChannelNorm, NetworkPlan, Plan
from medseg.infer.predictor import Predictor
from medseg.infer.sliding_window import WindowPredictor, class_argmax, iter_logit_slabs
from medseg.io import Geometry, Volume, load_volume
from medseg.models.networks import build_network
from medseg.models.package import load_model, save_model
from medseg.sample_data import make_phantom

REPO = Path(__file__).resolve().parents[1]
ROI = (96, 96, 96)
BIG_UNET = {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 1}
CT_NORM = ChannelNorm(name="CT", scheme="ct", clip=(-200.0, 300.0), mean=60.0, std=90.0)


# ------------------------------------------------------------------------ helpers
def _status_gib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _rss_gib() -> float:
    """Current resident set size."""
    return _status_gib("VmRSS")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss_gib() -> float:
    """Peak resident set size since the last :func:`_reset_peak` (process start otherwise)."""
    return _status_gib("VmHWM")


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "bf16_native": bool(torch.cpu._is_avx512_bf16_supported()),
        "load_average": os.getloadavg(),
    }


def _phantom_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Volume:
    """A CT phantom (body, organs, table, air) stretched to ``shape``, RAS grid with ``spacing``."""
    small = make_phantom(0).channels[0].array[0].astype(np.float32)
    big = ndimage.zoom(small, [s / n for s, n in zip(shape, small.shape, strict=True)], order=1)
    affine = np.diag([*spacing, 1.0])
    return Volume(np.rint(big).astype(np.int16)[None], Geometry(shape=shape, affine=affine), source="phantom")


def _model_dir(path: Path, *, classes: int, network: dict[str, Any], spacing: tuple[float, float, float]) -> Path:
    labels = {0: "background", **{c: f"class{c}" for c in range(1, classes)}}
    plan = Plan(
        channels=[CT_NORM],
        labels=labels,
        target_spacing=spacing,
        patch_size=ROI,
        network=NetworkPlan(name="unet", in_channels=1, out_channels=classes, **network),
    )
    torch.manual_seed(0)
    return save_model(path, config=Config(), plan=plan, state_dict=build_network(plan.network).state_dict())


def _dice_per_class(a: np.ndarray, b: np.ndarray, classes: int) -> list[float]:
    out = []
    for c in range(1, classes):
        x, y = a == c, b == c
        denom = x.sum() + y.sum()
        out.append(float(2 * np.sum(x & y) / denom) if denom else float("nan"))
    return out


def _nnunet_predictor(site: str, network: torch.nn.Module, roi: tuple[int, ...], classes: int) -> Any:
    """nnU-Net v2's predictor around our network (Gaussian, step 0.5, no mirroring, CPU)."""
    if site not in sys.path:
        sys.path.append(site)
    import io
    from contextlib import redirect_stdout
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with redirect_stdout(io.StringIO()):  # it prints a notice about perform_everything_on_device
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            verbose=False,
            allow_tqdm=False,
        )
    predictor.network = network
    predictor.configuration_manager = SimpleNamespace(patch_size=list(roi))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=classes)
    predictor.allowed_mirroring_axes = None
    return predictor


def _medseg_argmax(image: torch.Tensor, wp: WindowPredictor, roi: tuple[int, ...], batch: int) -> np.ndarray:
    """Streamed medseg core on a ``(C, X, Y, Z)`` network-grid image -> argmax labels."""
    labels = np.zeros(image.shape[1:], dtype=np.uint8)
    for slab in iter_logit_slabs(image, wp, roi_size=roi, overlap=0.5, mode="gaussian", sw_batch_size=batch):
        index = [slice(None)] * 3
        index[slab.axis] = slice(slab.start, slab.stop)
        labels[tuple(index)] = class_argmax(slab.logits).numpy()
    return labels


def _methods(
    net: torch.nn.Module, roi: tuple[int, ...], classes: int, nnunet_site: str | None
) -> dict[str, Callable[[torch.Tensor], np.ndarray]]:
    """name -> function of a ``(1, C, X, Y, Z)`` network-grid image returning argmax labels."""

    def monai(x: torch.Tensor) -> np.ndarray:
        net.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            out = sliding_window_inference(x, roi, 1, net, overlap=0.5, mode="gaussian")
        return class_argmax(torch.as_tensor(out)[0]).numpy().astype(np.uint8)

    methods: dict[str, Callable[[torch.Tensor], np.ndarray]] = {"monai_fp32": monai}
    if nnunet_site:
        try:
            nn_predictor = _nnunet_predictor(nnunet_site, net, roi, classes)

            def nnunet(x: torch.Tensor) -> np.ndarray:
                net.to(memory_format=torch.contiguous_format)
                logits = nn_predictor.predict_sliding_window_return_logits(x[0])
                return class_argmax(logits).numpy().astype(np.uint8)

            methods["nnunet_fp32"] = nnunet
        except ImportError as exc:
            print(f"nnU-Net v2 not importable from {nnunet_site}: {exc}", file=sys.stderr)

    def ours(
        dtype: torch.dtype | None, channels_last: bool, batch: int, *, cast: bool = True
    ) -> Callable[[torch.Tensor], np.ndarray]:
        def run(x: torch.Tensor) -> np.ndarray:
            wp = WindowPredictor(net, dtype=dtype, channels_last=channels_last, batch_size=batch, cast_weights=cast)
            return _medseg_argmax(x[0], wp, roi, batch)

        return run

    methods["medseg_fp32"] = ours(None, False, 1)
    methods["medseg_fp32_cl"] = ours(None, True, 1)
    methods["medseg_bf16_autocast"] = ours(torch.bfloat16, False, 1, cast=False)
    methods["medseg_bf16_weights"] = ours(torch.bfloat16, False, 1)
    methods["medseg_bf16_weights_cl"] = ours(torch.bfloat16, True, 1)
    methods["medseg_bf16_weights_cl_b2"] = ours(torch.bfloat16, True, 2)
    return methods


# -------------------------------------------------------------------------- speed
def _speed_setup(classes: int) -> tuple[torch.nn.Module, Volume, Path]:
    volume = _phantom_ct((160, 160, 160), (1.5, 1.5, 1.5))
    model = _model_dir(Path(tempfile.mkdtemp()) / "model", classes=classes, network=BIG_UNET, spacing=(1.5, 1.5, 1.5))
    return load_model(model).network.eval(), volume, model


def _network_grid_image(model: Path, volume: Volume) -> torch.Tensor:
    predictor = Predictor(model, infer=InferConfig(precision="fp32"))
    return predictor.preprocess(volume).as_tensor()[None]


def _predictor_run(model: Path, volume: Volume, *, crop: str) -> Callable[[], np.ndarray]:
    predictor = Predictor(model, infer=InferConfig(body_crop=crop))

    def run() -> np.ndarray:
        return predictor.predict(volume).array[0]

    return run


def speed(args: argparse.Namespace) -> dict[str, Any]:
    classes = 4
    net, volume, model = _speed_setup(classes)
    x = _network_grid_image(model, volume)
    voxels = int(np.prod(x.shape[2:]))
    methods: dict[str, Callable[[], np.ndarray]] = {
        name: (lambda f=f: f(x)) for name, f in _methods(net, ROI, classes, args.nnunet_site).items()
    }
    for crop in ("none", "windows", "box"):
        methods[f"medseg_predictor_{crop}"] = _predictor_run(model, volume, crop=crop)
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only.split(",") or k == "monai_fp32"}
    times: dict[str, list[float]] = {name: [] for name in methods}
    labels: dict[str, np.ndarray] = {}
    for rnd in range(args.rounds):
        for name, run in methods.items():
            t0 = time.perf_counter()
            labels[name] = run()
            times[name].append(time.perf_counter() - t0)
            print(f"round {rnd} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    ref = labels["monai_fp32"]
    base = statistics.median(times["monai_fp32"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "method": name,
                "median_s": round(med, 2),
                "runs_s": [round(t, 2) for t in ts],
                "mvox_per_s": round(voxels / med / 1e6, 3),
                "speedup_vs_monai": round(base / med, 2),
                "dice_vs_monai_fp32": [round(d, 4) for d in _dice_per_class(labels[name], ref, classes)],
                "label_agreement": round(float(np.mean(labels[name] == ref)), 5),
            }
        )
    if not args.no_memory:
        for row in rows:
            row["peak_rss_gib"] = _speed_memory_subprocess(row["method"], args)
    return {"part": "speed", "volume": list(x.shape[2:]), "windows": 27, "classes": classes, "rows": rows}


def _speed_memory_subprocess(method: str, args: argparse.Namespace) -> dict[str, float] | None:
    cmd = [sys.executable, __file__, "speed-one", "--method", method, "--nnunet-site", args.nnunet_site or ""]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed_one(args: argparse.Namespace) -> dict[str, Any]:
    classes = 4
    net, volume, model = _speed_setup(classes)
    if args.method.startswith("medseg_predictor"):
        run = _predictor_run(model, volume, crop=args.method.rsplit("_", 1)[1])
        before = _rss_gib()
        _reset_peak()
        run()
    else:
        x = _network_grid_image(model, volume)
        fn = _methods(net, ROI, classes, args.nnunet_site or None)[args.method]
        before = _rss_gib()
        _reset_peak()
        fn(x)
    peak = _peak_rss_gib()
    return {"peak": round(peak, 3), "before": round(before, 3), "added": round(peak - before, 3)}


# ---------------------------------------------------------------------- agreement
def agreement(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model)
    classes = model.plan.num_classes
    roi = tuple(model.plan.patch_size)
    images = sorted((REPO / "sample_data" / "Dataset001_CTPhantom" / "imagesTs").glob("*.nii.gz"))
    if not images:
        raise SystemExit("no held-out phantoms in sample_data/Dataset001_CTPhantom/imagesTs")
    methods = _methods(model.network.eval(), roi, classes, args.nnunet_site)
    keep = (
        "monai_fp32",
        "nnunet_fp32",
        "medseg_fp32",
        "medseg_bf16_autocast",
        "medseg_bf16_weights",
        "medseg_bf16_weights_cl",
    )
    methods = {k: methods[k] for k in keep if k in methods}
    e2e_modes = {  # bf16 autocast (precision auto on this CPU) with each body-crop mode
        crop: Predictor(args.model, infer=InferConfig(body_crop=crop)) for crop in ("windows", "box")
    }
    prep = Predictor(args.model, infer=InferConfig(precision="fp32"))
    grid: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    e2e_ref: list[np.ndarray] = []
    e2e_ours: dict[str, list[np.ndarray]] = {crop: [] for crop in e2e_modes}
    refs = []
    for path in images:
        volume = load_volume(path)
        image = prep.preprocess(volume)
        x = image.as_tensor()[None]
        for name, fn in methods.items():
            grid[name].append(fn(x))
        # old medseg / MONAI end-to-end reference: fp32 logits -> softmax -> SpatialResample -> argmax
        with torch.inference_mode():
            logits = torch.as_tensor(sliding_window_inference(x, roi, 1, model.network, overlap=0.5, mode="gaussian"))
        probs = MetaTensor(torch.softmax(logits[0], 0), affine=image.affine)
        back = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
            probs, dst_affine=torch.as_tensor(np.array(volume.geometry.affine)), spatial_size=volume.geometry.shape
        )
        e2e_ref.append(class_argmax(torch.as_tensor(back)).numpy())
        for crop, predictor in e2e_modes.items():
            e2e_ours[crop].append(predictor.predict(volume).array[0])
        ref_path = path.parent.parent / "labelsTs" / path.name.replace("_0000", "")
        refs.append(load_volume(ref_path, kind="label").array[0] if ref_path.exists() else None)
    ref = np.concatenate([g.ravel() for g in grid["monai_fp32"]])
    rows = []
    for name, outs in grid.items():
        ours = np.concatenate([g.ravel() for g in outs])
        rows.append({"method": name, "grid": "network", "dice_vs_monai_fp32": _dice_per_class(ours, ref, classes)})
    b = np.concatenate([g.ravel() for g in e2e_ref])
    ours_e2e = {crop: np.concatenate([g.ravel() for g in outs]) for crop, outs in e2e_ours.items()}
    for crop, a in ours_e2e.items():
        name = f"medseg Predictor (bf16, body_crop={crop})"
        rows.append({"method": name, "grid": "input", "dice_vs_monai_fp32": _dice_per_class(a, b, classes)})
    truth = [r for r in refs if r is not None]
    if len(truth) == len(refs):
        t = np.concatenate([r.ravel() for r in truth])
        rows.append(
            {
                "method": "MONAI fp32 vs ground truth",
                "grid": "input",
                "dice_vs_monai_fp32": _dice_per_class(b, t, classes),
            }
        )
        for crop, a in ours_e2e.items():
            name = f"medseg (body_crop={crop}) vs ground truth"
            rows.append({"method": name, "grid": "input", "dice_vs_monai_fp32": _dice_per_class(a, t, classes)})
    for row in rows:
        row["dice_vs_monai_fp32"] = [round(d, 4) for d in row["dice_vs_monai_fp32"]]
    return {"part": "agreement", "model": str(args.model), "cases": [p.name for p in images], "rows": rows}


# ------------------------------------------------------------------------- memory
def memory(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for spacing in ((0.8, 0.8, 1.0), (0.85, 0.85, 1.0)):
        cmd = [sys.executable, __file__, "memory-one", "--spacing", *map(str, spacing)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"plan_spacing": spacing, "error": done.stderr[-3000:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    shape, classes = (512, 512, 600), 14
    n = int(np.prod(shape))
    monai_gib = (4 * classes * n + 4 * n + 4 * n) / 2**30  # output + count map + float32 input (no resampling)
    return {
        "part": "memory",
        "shape": list(shape),
        "classes": classes,
        "rows": rows,
        "monai_buffers_gib": round(monai_gib, 2),
    }


def memory_one(args: argparse.Namespace) -> dict[str, Any]:
    shape, classes = (512, 512, 600), 14
    tiny = {"channels": (8, 16), "strides": (2,), "num_res_units": 0}
    spacing = tuple(args.spacing)
    model = _model_dir(Path(tempfile.mkdtemp()) / "model", classes=classes, network=tiny, spacing=spacing)
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(1, *shape), dtype=np.int16)
    volume = Volume(array, Geometry(shape=shape, affine=np.diag([0.8, 0.8, 1.0, 1.0])), source="big")
    predictor = Predictor(model, infer=InferConfig(body_crop="none"))
    before = _rss_gib()
    _reset_peak()
    t0 = time.perf_counter()
    result = predictor.predict_case(volume)
    seconds = time.perf_counter() - t0
    assert result.labels.geometry is volume.geometry and result.labels.array.shape == (1, *shape)
    return {
        "plan_spacing": list(spacing),
        "path": "re-index" if spacing == (0.8, 0.8, 1.0) else "float16 logits + chunked resampling",
        "peak_rss_gib": round(_peak_rss_gib(), 3),
        "rss_before_predict_gib": round(before, 3),
        "seconds": round(seconds, 1),
        "timings": result.timings,
    }


# ---------------------------------------------------------------------------- e2e
def e2e(args: argparse.Namespace) -> dict[str, Any]:
    """Read DICOM -> predict -> write labels, with the trained demo model and with the 16-256 U-Net."""
    from medseg.infer.run import predict_to_folder
    from medseg.sample_data import write_ct_dicom_series

    work = Path(tempfile.mkdtemp(prefix="medseg-e2e-"))
    try:
        ct = _phantom_ct((512, 512, 300), (0.8, 0.8, 1.5))
        series = write_ct_dicom_series(ct, work / "dicom" / "ct512", case_id="ct512")
        del ct
        models = {"demo model (trained, U-Net 16-128, 4 classes, 64x64x32 windows, 2.1x2.1x3.3 mm)": args.model}
        if args.big_model is not None:
            models["U-Net 16-256 (trained 300 it), 4 classes, 96^3 windows, 1.5 mm"] = args.big_model
        rows = []
        for index, (name, model) in enumerate(models.items()):
            plan = load_model(model).plan
            predictor = Predictor(model, infer=InferConfig())
            t0 = time.perf_counter()
            (record,) = predict_to_folder(predictor, [series], work / f"out{index}", progress=False)
            total = time.perf_counter() - t0
            if record["status"] != "done":
                raise SystemExit(record["error"])
            rows.append(
                {
                    "model": name,
                    "plan_spacing": [round(v, 3) for v in plan.target_spacing],
                    "total_s": round(total, 1),
                    "record": record,
                    "forward_share": round(record["forward_s"] / total, 3),
                    "network_share": round(record["network_s"] / total, 3),
                }
            )
        return {"part": "e2e", "input": "512x512x300 CT phantom, 0.8x0.8x1.5 mm, 300 DICOM files", "rows": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["speed", "agreement", "memory", "e2e", "all", "speed-one", "memory-one"])
    parser.add_argument("--model", type=Path, default=Path("/tmp/demo_for_bench/model"), help="trained demo model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=None, help="speed: comma-separated methods (MONAI always runs)")
    parser.add_argument("--no-memory", action="store_true", help="speed: skip the per-method RSS subprocesses")
    parser.add_argument("--nnunet-site", default="/tmp/nnunet-venv/lib/python3.11/site-packages")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--big-model",
        type=Path,
        default=None,
        help="e2e: also a trained 16-256 U-Net at 1.5 mm (benchmarks/configs/unet256_1p5mm.yaml)",
    )
    args = parser.parse_args()
    if args.nnunet_site and not Path(args.nnunet_site).is_dir():
        args.nnunet_site = None
    parts = {"speed": speed, "agreement": agreement, "memory": memory, "e2e": e2e}
    if args.part == "speed-one":
        print(json.dumps(speed_one(args)))
        return
    if args.part == "memory-one":
        print(json.dumps(memory_one(args)))
        return
    chosen = list(parts) if args.part == "all" else [args.part]
    results = {"machine": _machine()}
    for name in chosen:
        t0 = time.perf_counter()
        results[name] = parts[name](args)
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(results[name]), file=sys.stderr, flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
