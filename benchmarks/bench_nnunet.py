"""nnU-Net v2 model folders: ``nnUNetPredictor.predict_from_files`` vs ``medseg predict`` end to end (issue #13).

Steps (each cached in ``--workdir``):

1. ``model``: the phantom CT dataset (``medseg.sample_data``, 10 training cases) as nnU-Net raw data,
   nnU-Net's fingerprint, planner (default ``ExperimentPlanner``) and preprocessing, then a short CPU run
   of nnU-Net's own trainer (``benchmarks/nnunet_bench_trainer.py``: 2 epochs x 25 iterations) for each
   fold in ``--folds``.  Run in a subprocess with ``nnUNet_raw/preprocessed/results`` under the workdir.
2. ``inputs``: a 512x512x300 CT (the real TotalSegmentator test CT ``example_ct.nii.gz`` from
   ``../shared/data`` resampled linearly to that size, same field of view) and the real CT itself.
3. For each input and mirroring off/on: nnU-Net (``predict_from_files``, step 0.5, same folds,
   CPU, its worker processes) and ``medseg predict`` (default precision: bf16 channels-last where the CPU
   has it), each in a fresh subprocess: wall time, peak RSS of the process tree (``ru_maxrss`` of waited
   children), medseg's per-stage times and windows run / skipped as air (``prediction.yaml``), per-class Dice
   between the two outputs.

Usage (take the shared lock; the model step trains for a few minutes)::

    flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_nnunet.py --workdir /tmp/medseg-bench-nnunet

``--only-model`` stops after steps 1 and 2 (train ahead of a quiet-machine run).

Prints JSON and a Markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_CT = REPO.parent / "shared" / "data" / "totalseg-tests" / "example_ct.nii.gz"
DATASET = "Dataset900_CTPhantom"
TRAINER = "nnUNetTrainerBench"
CONFIG = "3d_fullres"


def _env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "nnUNet_raw": str(workdir / "raw"),
        "nnUNet_preprocessed": str(workdir / "preprocessed"),
        "nnUNet_results": str(workdir / "results"),
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def model_folder(workdir: Path) -> Path:
    return workdir / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}"


# ------------------------------------------------------------------------------------ 1. model
def train(workdir: Path, folds: list[int]) -> None:
    """Runs inside the subprocess with the nnU-Net environment (``_child train``)."""
    import torch
    from nnunet_bench_trainer import nnUNetTrainerBench  # type: ignore[import-not-found]
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    from medseg.sample_data import generate_dataset

    raw = workdir / "raw"
    if not (raw / DATASET / "dataset.json").is_file():
        folder = generate_dataset(raw, "Dataset001_CTPhantom", num_train=10, num_test=0)
        folder.rename(raw / DATASET)
    extract_fingerprint_dataset(900, num_processes=2, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiment_dataset(900)
    preprocess_dataset(900, configurations=(CONFIG,), num_processes=(2,), verbose=False)
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 - nnU-Net's name; augmentation in this process
    plans = json.loads((workdir / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((raw / DATASET / "dataset.json").read_text())
    for fold in folds:
        torch.manual_seed(fold)
        plans_copy = json.loads(json.dumps(plans))
        plans_copy["continue_training"] = False
        trainer = nnUNetTrainerBench(plans_copy, CONFIG, fold, dataset_json, torch.device("cpu"))
        trainer.run_training()


def ensure_model(workdir: Path, folds: list[int]) -> Path:
    folder = model_folder(workdir)
    if all((folder / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in folds):
        return folder
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "_child", "train", str(workdir), ",".join(map(str, folds))],
        env=_env(workdir),
        check=True,
    )
    print(f"trained {folds} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return folder


# ----------------------------------------------------------------------------------- 2. inputs
def ensure_inputs(workdir: Path) -> dict[str, Path]:
    import nibabel as nib
    from scipy import ndimage

    out: dict[str, Path] = {}
    if not SHARED_CT.is_file():
        print(f"{SHARED_CT} missing: benchmark needs ../shared/data", file=sys.stderr)
        sys.exit(2)
    real = workdir / "inputs" / "example_ct"
    real.mkdir(parents=True, exist_ok=True)
    if not (real / "example_ct_0000.nii.gz").is_file():
        img = nib.load(SHARED_CT)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine), real / "example_ct_0000.nii.gz")
    out["example_ct"] = real
    big = workdir / "inputs" / "ct512"
    big.mkdir(parents=True, exist_ok=True)
    if not (big / "ct512_0000.nii.gz").is_file():
        img = nib.load(SHARED_CT)
        data = np.asarray(img.dataobj, dtype=np.float32)
        shape = (512, 512, 300)
        zoom = [n / s for n, s in zip(shape, data.shape, strict=True)]
        up = ndimage.zoom(data, zoom, order=1, grid_mode=True, mode="nearest")
        affine = img.affine.copy()
        affine[:3, :3] = img.affine[:3, :3] / np.asarray(zoom)[None, :]
        # keep the field of view: the first voxel centre moves by half an old voxel minus half a new one
        shift = img.affine[:3, :3] @ ((1 / np.asarray(zoom) - 1) / 2)
        affine[:3, 3] = img.affine[:3, 3] + shift
        nib.save(nib.Nifti1Image(np.rint(up).astype(np.int16), affine), big / "ct512_0000.nii.gz")
    out["ct512"] = big
    return out


# ------------------------------------------------------------------------------------ 3. runs
def _child_nnunet(folder: Path, inputs: Path, out: Path, folds: list[int], mirror: bool) -> None:
    import torch
    from nnunet_bench_trainer import nnUNetTrainerBench  # type: ignore[import-not-found]
    from nnunetv2.inference import predict_from_raw_data as pfr

    real_find = pfr.recursive_find_trainer_class_by_name
    pfr.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainerBench if name == TRAINER else real_find(name)
    p = pfr.nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    p.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds))
    p.predict_from_files(
        str(inputs),
        str(out),
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a command run in a fresh process (its largest process)."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:]); w = time.perf_counter() - t; "
        "print('BENCH', w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(r.returncode)"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("BENCH")][-1].split()
    return float(line[1]), float(line[2]) / 2**20


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for c in sorted(set(np.unique(a)) | set(np.unique(b))):
        if c == 0:
            continue
        x, y = a == c, b == c
        out[int(c)] = float(2 * np.logical_and(x, y).sum() / max(1, x.sum() + y.sum()))
    return out


def bench(workdir: Path, folds: list[int], mirrors: list[bool], only: list[str] | None) -> list[dict[str, Any]]:
    import SimpleITK as sitk

    folder = ensure_model(workdir, folds)
    inputs = ensure_inputs(workdir)
    env = _env(workdir)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = []
    for name, folder_in in inputs.items():
        if only and name not in only:
            continue
        for mirror in mirrors:
            tag = f"{name}-{'mirror' if mirror else 'nomirror'}"
            out_n, out_m = workdir / "out" / tag / "nnunet", workdir / "out" / tag / "medseg"
            load0 = os.getloadavg()[0]
            wall_n, rss_n = _run(
                [
                    sys.executable,
                    __file__,
                    "_child",
                    "nnunet",
                    str(folder),
                    str(folder_in),
                    str(out_n),
                    ",".join(map(str, folds)),
                    str(int(mirror)),
                ],
                env,
            )
            cmd = [
                sys.executable,
                "-m",
                "medseg.cli",
                "predict",
                "--model",
                str(folder),
                "--folds",
                ",".join(map(str, folds)),
                "--quiet",
                "--overwrite",
                str(folder_in),
                "--out",
                str(out_m),
            ]
            if not mirror:
                cmd[cmd.index("--quiet") : cmd.index("--quiet")] = ["--mirror-axes", "none"]
            wall_m, rss_m = _run(cmd, env)
            load1 = os.getloadavg()[0]
            case = f"{name}.nii.gz"
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(out_n / case)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(out_m / case)))
            import yaml

            record = yaml.safe_load((out_m / "prediction.yaml").read_text())["cases"][0]
            dice = dice_per_class(a, b)
            rows.append(
                {
                    "input": name,
                    "mirroring": mirror,
                    "folds": folds,
                    "nnunet_s": round(wall_n, 1),
                    "medseg_s": round(wall_m, 1),
                    "speedup": round(wall_n / wall_m, 2),
                    "nnunet_peak_rss_gib": round(rss_n, 2),
                    "medseg_peak_rss_gib": round(rss_m, 2),
                    "medseg_stages_s": {
                        k: record[k]
                        for k in (
                            "read_s",
                            "preprocess_s",
                            "network_s",
                            "forward_s",
                            "resample_s",
                            "postprocess_s",
                            "write_s",
                            "seconds",
                        )
                        if k in record
                    },
                    "windows": record.get("windows"),
                    "windows_skipped": record.get("windows_skipped"),
                    "dice_min": round(min(dice.values()), 5) if dice else None,
                    "dice_per_class": {k: round(v, 5) for k, v in dice.items()},
                    "voxels_equal": round(float(np.mean(a == b)), 6),
                    "load_before_after": [round(load0, 2), round(load1, 2)],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        sys.path.insert(0, str(HERE))
        if argv[1] == "train":
            train(Path(argv[2]), [int(f) for f in argv[3].split(",")])
        elif argv[1] == "nnunet":
            _child_nnunet(
                Path(argv[2]), Path(argv[3]), Path(argv[4]), [int(f) for f in argv[5].split(",")], bool(int(argv[6]))
            )
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medseg-bench-nnunet"))
    parser.add_argument("--folds", default="0", help="folds to train and ensemble (default 0)")
    parser.add_argument("--mirroring", choices=["off", "on", "both"], default="both")
    parser.add_argument("--inputs", default=None, help="comma-separated subset of ct512,example_ct")
    parser.add_argument("--only-model", action="store_true", help="train (1.) and prepare the inputs (2.), then stop")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    folds = [int(f) for f in args.folds.split(",")]
    if args.only_model:
        print(ensure_model(args.workdir, folds), ensure_inputs(args.workdir))
        return 0
    mirrors = {"off": [False], "on": [True], "both": [False, True]}[args.mirroring]
    rows = bench(args.workdir, folds, mirrors, args.inputs.split(",") if args.inputs else None)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    print(json.dumps(info, indent=2))
    print("\n| input | mirroring | nnU-Net s | medseg s | speed-up | peak RSS nnU-Net / medseg GiB | min Dice |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input']} | {'on' if r['mirroring'] else 'off'} | {r['nnunet_s']} | {r['medseg_s']} | "
            f"{r['speedup']}x | {r['nnunet_peak_rss_gib']} / {r['medseg_peak_rss_gib']} | {r['dice_min']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
