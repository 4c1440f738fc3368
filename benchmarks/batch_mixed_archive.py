"""``medseg batch`` over a mixed real archive: which series are done, partial, failed or skipped, and why.

Not a timing benchmark: a reproducible before/after of what batch does with a messy archive
assembled from the public scans in ``../shared/data`` (README there):

* brain MR studies (PGBM, TCIA naming): T1post, FLAIRreg and a MaskTumor series per study; in one
  T1post series every other slice gets an ImageOrientationPatient perturbed by ~1e-7 (as in the
  TCIA exports that made highdicom refuse the SEG);
* CT: the TotalSegmentator example (UIDs blanked by anonymisation), dcmqi's 3-slice GE CT,
  highdicom's single CT slice, DicomRTTool's 4 CT slices with their RTSTRUCT;
* Siemens fMRI mosaics (2 series), DICOM SEG objects, an SR document;
* generated CT phantom series (the only data the tiny phantom model was trained for);
* junk: a text file and a truncated DICOM file.

Two tiny models are trained on phantoms (seconds): a CT model, and the same network declared as a
one-channel ``T1`` MR model (plan edited), so that both the CT and the MR paths are exercised.
Each is run with ``--outputs nifti,seg,rtstruct,json`` and no rules; the script prints, per
model, the counts per state and every series with its state and reason, read from the manifest.

Run (one command per code version; ``--repo`` is the checkout whose ``medseg`` is run)::

    .venv/bin/python benchmarks/batch_mixed_archive.py --workdir /tmp/mixed --repo .
    .venv/bin/python benchmarks/batch_mixed_archive.py --workdir /tmp/mixed --repo /path/to/main

The archive and models are built once in ``--workdir`` and reused; outputs go to
``--workdir/out-<label>-<model>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

__all__ = ["build_mixed_archive", "mr_variant", "perturb_orientation", "tiny_ct_model"]


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)


def perturb_orientation(folder: Path, *, delta: float = 1e-7, every: int = 2) -> int:
    """Add ``delta`` to ImageOrientationPatient of every ``every``-th slice (as in the TCIA exports).

    Returns:
        The number of files changed.
    """
    import pydicom

    changed = 0
    for index, path in enumerate(sorted(folder.glob("*.dcm"))):
        if index % every:
            continue
        ds = pydicom.dcmread(path)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImageOrientationPatient = [f"{v + delta:.10f}" if i in (1, 4) else f"{v:.10f}" for i, v in enumerate(iop)]
        ds.save_as(path)
        changed += 1
    return changed


def _phantom_series(folder: Path, case: int, *, slices: int = 20) -> None:
    import numpy as np

    from medseg.io.volume import Geometry, Volume
    from medseg.sample_data import make_phantom, write_ct_dicom_series

    image = make_phantom(case).channels[0]
    affine = image.geometry.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([20.0, 20.0, 8.0])
    array = image.array[:, 20:60, 20:60, 8 : 8 + slices].copy()
    write_ct_dicom_series(
        Volume(array, Geometry(shape=array.shape[1:], affine=affine)), folder, case_id=f"mx{case:03d}"
    )


def build_mixed_archive(root: Path, shared: Path = SHARED, *, small: bool = False) -> Path:
    """Assemble the archive under ``root`` (idempotent: an existing archive is reused).

    Args:
        root: Archive folder.
        shared: The shared public data folder.
        small: Only a subset (one PGBM study, the CT examples, one phantom, junk) for the test suite.

    Raises:
        FileNotFoundError: ``shared`` lacks a data set the archive needs.
    """
    if (root / ".complete").is_file():
        return root
    pgbm = shared / "pgbm-brain-tumor-progression"
    studies = sorted(p for p in pgbm.glob("PGBM-*/*") if p.is_dir())
    if not studies:
        raise FileNotFoundError(f"{pgbm}: PGBM studies not found")
    for study in studies[:1] if small else studies:
        _copy_tree(study, root / "mr" / study.parent.name / study.name)
    t1 = sorted((root / "mr").glob("*/*/*T1post*"))[0]
    perturb_orientation(t1)
    _copy_tree(shared / "totalseg-tests" / "example_ct_dicom", root / "ct" / "anonymised-ct")
    _copy_tree(shared / "dcmqi-data" / "segmentations" / "ct-3slice", root / "ct" / "ge-3slice")
    shutil.copy2(shared / "dcmqi-data" / "segmentations" / "liver.dcm", root / "ct" / "ge-3slice-seg.dcm")
    rt = root / "ct" / "rt-case"
    rt.mkdir(parents=True, exist_ok=True)
    for path in sorted((shared / "rtstruct-dicomrttool-anon").glob("*.dcm")):
        shutil.copy2(path, rt / path.name)
    if not small:
        hd = root / "ct" / "highdicom"
        hd.mkdir(parents=True, exist_ok=True)
        for name in ("ct_image.dcm", "seg_image_ct_binary.dcm", "sr_document.dcm"):
            shutil.copy2(shared / "highdicom-testfiles" / name, hd / name)
        for series in ("ep2d_Asc_2", "cmrr_Int_8"):
            _copy_tree(shared / "dcm_qa_mosaic" / "In" / series, root / "fmri" / series)
    for case in range(1 if small else 3):
        _phantom_series(root / "phantoms" / f"case{case}", case)
    (root / "junk").mkdir(exist_ok=True)
    (root / "junk" / "notes.txt").write_text("exported by the PACS\n")
    first = sorted((root / "ct" / "ge-3slice").iterdir())[0]
    (root / "junk" / "truncated.dcm").write_bytes(first.read_bytes()[:400])
    (root / ".complete").write_text("")
    return root


def tiny_ct_model(workdir: Path) -> Path:
    """A CT model trained for a few iterations on generated phantoms (fast, not accurate)."""
    model = workdir / "model-ct"
    if (model / "weights.pt").is_file():
        return model
    from medseg.config import load_config
    from medseg.sample_data import generate_dataset
    from medseg.train.loop import train

    generate_dataset(workdir / "data", "Dataset001_CTPhantom", num_train=4, num_test=0)
    config = load_config(
        overrides={
            "model.channels": [8, 16, 32],
            "model.strides": [2, 2],
            "preprocess.patch_size": [32, 32, 16],
            "train.iterations": 12,
        }
    )
    return train(workdir / "data" / "Dataset001_CTPhantom", config=config, out_dir=model, progress=False)


def mr_variant(ct_model: Path, target: Path, *, name: str = "T1") -> Path:
    """The same network declared as a one-channel MR model (channel ``name``, per-image z-score).

    Coarse (3 x 3 x 6.5 mm) with 64 x 64 x 16 windows, so that brain MR series take a few windows.
    """
    import yaml

    if (target / "weights.pt").is_file():
        return target
    shutil.copytree(ct_model, target, dirs_exist_ok=True)
    plan = yaml.safe_load((target / "plan.yaml").read_text())
    plan["channels"] = [{"name": name, "scheme": "zscore", "region": "image"}]
    plan["target_spacing"] = [3.0, 3.0, 6.5]
    plan["patch_size"] = [64, 64, 16]
    (target / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return target


def run_batch_cli(repo: Path, archive: Path, model: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Run ``python -m medseg.batch`` of checkout ``repo``; returns exit code, wall time and the rows."""
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "medseg.batch", str(archive), "--model", str(model), "--out", str(out)]
    command += ["--outputs", "nifti,seg,rtstruct,json", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo.resolve())}
    probe = [sys.executable, "-c", "import medseg, sys; sys.stdout.write(medseg.__file__)"]
    where = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=repo.resolve()).stdout
    if not Path(where).resolve().is_relative_to(repo.resolve()):
        raise SystemExit(f"--repo {repo}: python imports medseg from {where}, not from that checkout")
    t0 = time.perf_counter()
    # cwd = the checkout: ``python -m`` puts the working directory first on sys.path
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo.resolve(), timeout=3600)
    wall = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    with sqlite3.connect(out / "manifest.sqlite") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM series ORDER BY description, key")]
    return {"code": proc.returncode, "wall_s": wall, "rows": rows, "stdout": proc.stdout, "stderr": proc.stderr}


def _why(row: dict[str, Any]) -> str:
    if row["state"] in ("failed", "partial"):
        return str(row.get("error") or "")
    return str(row.get("reason") or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="archive, models and outputs (reused)")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose medseg is run (default: this one)")
    parser.add_argument("--label", default=None, help="name of this run's output folders (default: repo folder name)")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared public data folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    archive = build_mixed_archive(workdir / "archive", args.shared)
    ct = tiny_ct_model(workdir)
    mr = mr_variant(ct, workdir / "model-mr")
    label = args.label or args.repo.resolve().name
    results = {}
    for name, model in (("ct", ct), ("mr", mr)):
        result = run_batch_cli(args.repo, archive, model, workdir / f"out-{label}-{name}")
        results[name] = result
        if args.json:
            continue
        counts = Counter(r["state"] for r in result["rows"])
        print(
            f"== {label}, {name} model: exit {result['code']}, {result['wall_s']:.1f} s, {dict(sorted(counts.items()))}"
        )
        for row in result["rows"]:
            where = Path(json.loads(row["files"])[0]).parent.as_posix() if row["files"] != "[]" else "?"
            what = f"{row['state']:8s} {row['modality']:8s} {str(row['description'])[:22]:22s}"
            print(f"  {what} {where[:42]:42s} {_why(row)[:150]}")
    if args.json:
        print(json.dumps({k: {**v, "stdout": v["stdout"][-2000:]} for k, v in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
