"""Benchmark RTSTRUCT writing of a noisy multi-class label: this checkout vs a baseline git revision.

The label is what an untrained or uncertain model produces on a real series: the 31-class
TotalSegmentator label (``../shared/data/totalseg-tests/example_seg_dicom.nii.gz``, 512x512x20;
its last 4 slices repeated to 24) placed on the PGBM-003 T1post series (512x512x24 MR, real
headers), with ``--speckle`` of the voxels (default 0.5 %) set to random classes: tens of thousands
of one-voxel islands, each one contour.  The RTSTRUCT is written the way ``medseg batch`` and
``medseg predict --outputs rtstruct`` write it (:func:`medseg.infer.writers.write_outputs`).

Each version runs in its own process (``--baseline REV`` exports that revision with ``git archive``
and imports its ``medseg`` through ``PYTHONPATH``); the script prints the median write time of
``--repeats`` writes per version, the ratio, and whether the two RTSTRUCTs are identical apart from
new UIDs and creation dates.

Run as::

    flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_rtstruct.py --baseline cbb9060 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SERIES = "pgbm-brain-tumor-progression/PGBM-003/10-17-1995-MR RCBV SEQUENCE-57198/13-T1post-56086"
LABEL = "totalseg-tests/example_seg_dicom.nii.gz"
#: Attributes that differ between any two writes (new UIDs, creation time, version).
VOLATILE = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SeriesDate",
    "SeriesTime",
    "StructureSetDate",
    "StructureSetTime",
    "SoftwareVersions",
}


def measure(data: Path, speckle: float, repeats: int, out: Path) -> dict[str, float | int | str]:
    """Write the RTSTRUCT ``repeats`` times with the importable medseg; the last file stays at ``out``."""
    import warnings

    import numpy as np

    import medseg
    from medseg.infer.writers import write_outputs
    from medseg.io import load_volume, read_dicom_series
    from medseg.io.volume import Volume

    warnings.simplefilter("ignore")
    image = read_dicom_series(data / SERIES)
    source = np.asarray(load_volume(data / LABEL, kind="label").array[0])
    labels = np.zeros(image.array.shape[1:], np.uint8)
    labels[:, :, :20] = source[:, :, :20]
    labels[:, :, 20:] = source[:, :, 16:20]
    rng = np.random.default_rng(0)
    noise = rng.random(labels.shape) < speckle
    labels[noise] = rng.integers(1, 32, int(noise.sum()))
    label = Volume(labels[None], image.geometry, kind="label")
    names = {v: f"class {v}" for v in range(1, 32)}
    out.parent.mkdir(parents=True, exist_ok=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = write_outputs(label, out.parent, outputs=["rtstruct"], label_names=names, image=image, overwrite=True)[
            "rtstruct"
        ]
        times.append(time.perf_counter() - start)
        if not result.ok:
            raise SystemExit(f"RTSTRUCT not written: {result.error}")
    (out.parent / "rtstruct.dcm").replace(out)
    return {
        "medseg": str(Path(medseg.__file__).resolve().parent),
        "seconds": statistics.median(times),
        "all": ",".join(f"{t:.2f}" for t in times),
        "speckle_voxels": int(noise.sum()),
        "bytes": out.stat().st_size,
    }


def same_content(a: Path, b: Path) -> bool:
    """The two RTSTRUCTs hold the same elements and values, apart from :data:`VOLATILE` ones."""
    import pydicom

    def walk(x: pydicom.Dataset, y: pydicom.Dataset) -> bool:
        tags_x = [e.tag for e in x if e.keyword not in VOLATILE]
        tags_y = [e.tag for e in y if e.keyword not in VOLATILE]
        if tags_x != tags_y:
            return False
        for tag in tags_x:
            ex, ey = x[tag], y[tag]
            if ex.VR == "SQ":
                if len(ex.value) != len(ey.value) or not all(
                    walk(i, j) for i, j in zip(ex.value, ey.value, strict=True)
                ):
                    return False
            elif ex.VR != ey.VR or ex.value != ey.value:
                return False
        return True

    return walk(pydicom.dcmread(a), pydicom.dcmread(b))


def contours(path: Path) -> int:
    import pydicom

    ds = pydicom.dcmread(path)
    return sum(len(item.get("ContourSequence", [])) for item in ds.ROIContourSequence)


def run_version(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, float | int | str]:
    """Measure in a fresh process importing medseg from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        str(out),
        "--speckle",
        str(args.speckle),
        "--repeats",
        str(args.repeats),
        "--data",
        str(args.data),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree, check=False)
    if proc.returncode:
        raise SystemExit(f"{tree}: measurement failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float | int | str] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(str(result["medseg"])).is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: the measurement imported medseg from {result['medseg']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--speckle", type=float, default=0.005, help="fraction of voxels set to random classes")
    parser.add_argument("--repeats", type=int, default=3, help="writes per version (median time)")
    parser.add_argument("--baseline", default=None, help="git revision to compare with (e.g. cbb9060)")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.data, args.speckle, args.repeats, args.measure)))
        return
    if not (args.data / SERIES).is_dir():
        raise SystemExit(f"{args.data / SERIES}: not found (the shared data folder)")

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        current = run_version(REPO, args, Path(tmp) / "current" / "rtstruct-current.dcm")
        rows.append(("this checkout", current))
        baseline = None
        if args.baseline:
            tree = Path(tmp) / "baseline-tree"
            tree.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.baseline], capture_output=True, check=True
            ).stdout
            (Path(tmp) / "baseline.tar").write_bytes(archive)
            with tarfile.open(Path(tmp) / "baseline.tar") as tar:
                tar.extractall(tree, filter="data")
            baseline = run_version(tree, args, Path(tmp) / "baseline" / "rtstruct-baseline.dcm")
            rows.append((f"baseline {args.baseline}", baseline))
        n_contours = contours(Path(tmp) / "current" / "rtstruct-current.dcm")
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}; "
            f"label 512x512x24, 31 classes, speckle {args.speckle:g} ({current['speckle_voxels']} voxels), "
            f"{n_contours} contours, {int(current['bytes']) / 1e6:.1f} MB"
        )
        print("| version | write (s, median) | all writes (s) | vs baseline |")
        print("|---|---|---|---|")
        for name, row in rows:
            ratio = (
                "-"
                if baseline is None or row is baseline
                else f"{float(baseline['seconds']) / float(row['seconds']):.1f}x faster"
            )
            print(f"| {name} | {float(row['seconds']):.2f} | {row['all']} | {ratio} |")
        if baseline is not None:
            identical = same_content(
                Path(tmp) / "current" / "rtstruct-current.dcm", Path(tmp) / "baseline" / "rtstruct-baseline.dcm"
            )
            print(f"output identical to the baseline's (apart from UIDs and dates): {identical}")


if __name__ == "__main__":
    main()
