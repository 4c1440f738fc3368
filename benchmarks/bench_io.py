"""DICOM loading benchmark: series read vs SimpleITK / dcm2niix, header-only discovery vs full decoding.

Run (other helpers share the 2 cores, so take the lock):

    flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_io.py [--repeats 5] [--keep]

Data is synthesised by our own code from the real TotalSegmentator CT, PGBM MR, dcm_qa_ts mosaics
and DICOM objects in ``../shared/data`` into a temporary folder:

* ``ct300``: a 512x512x300 CT series, uncompressed (Explicit VR Little Endian), cycling through
  the 20 real slices' pixels (decoded from JPEG 2000 and re-encoded) at 2 mm spacing;
* ``mixed``: ~2,000 files: that CT, 20 copies of the JPEG 2000 CT, 4 copies of the 12 PGBM MR
  series, 10 copies of the 9 dcm_qa_ts mosaics (9 transfer syntaxes), SR/SEG/RTSTRUCT objects
  and non-DICOM files, in nested folders, most without a file suffix.

Every timing is repeated with the contenders interleaved in the same process; medians are printed.
"""

from __future__ import annotations

import argparse
import json
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
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from medseg.io import load_series, read_dicom_series, scan_dicom

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _new_uids(ds: pydicom.Dataset, series_uid: str, study_uid: str) -> None:
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def make_ct300(folder: Path) -> None:
    folder.mkdir(parents=True)
    sources = sorted((SHARED / "totalseg-tests" / "example_ct_dicom").iterdir())
    templates = []
    for src in sources:
        ds = pydicom.dcmread(src)
        ds.decompress()  # JPEG 2000 -> Explicit VR Little Endian, same pixel values
        templates.append(ds)
    series_uid, study_uid = generate_uid(), generate_uid()
    z0 = float(templates[0].ImagePositionPatient[2])
    for k in range(300):
        ds = templates[k % len(templates)]
        _new_uids(ds, series_uid, study_uid)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], f"{z0 + 2.0 * k:.3f}"]
        ds.InstanceNumber = 300 - k
        ds.save_as(folder / f"{(k * 7919) % 100000:05d}", enforce_file_format=True)


def _copy_series(files: list[Path], dest: Path, *, rename: bool = True) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    for i, src in enumerate(files):
        ds = pydicom.dcmread(src)
        _new_uids(ds, series_uid, study_uid)
        ds.save_as(dest / (f"IM{i:05d}" if rename else src.name), enforce_file_format=True)
    return len(files)


def make_mixed(folder: Path, ct300: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    shutil.copytree(ct300, folder / "patient000" / "ct300")
    counts["uncompressed CT 512x512x300"] = 300
    j2k = sorted((SHARED / "totalseg-tests" / "example_ct_dicom").iterdir())
    counts["JPEG 2000 CT (20 series x 20)"] = sum(
        _copy_series(j2k, folder / f"patient{c + 1:03d}" / "ct") for c in range(20)
    )
    pgbm = sorted(p for p in (SHARED / "pgbm-brain-tumor-progression").glob("*/*/*") if p.is_dir())
    n = 0
    for c in range(4):
        for s, series in enumerate(pgbm):
            n += _copy_series(sorted(series.iterdir()), folder / f"mr{c}" / f"study{s // 3}" / f"series{s}")
    counts["uncompressed MR (48 series)"] = n
    mosaics = sorted((SHARED / "dcm_qa_ts" / "In").glob("*.dcm"))
    counts["Siemens mosaics, 9 transfer syntaxes (90 series)"] = sum(
        _copy_series([m], folder / "fmri" / f"{c}_{m.stem}") for c in range(10) for m in mosaics
    )
    others = [
        SHARED / "highdicom-testfiles" / "sr_document.dcm",
        SHARED / "highdicom-testfiles" / "seg_image_ct_binary.dcm",
        SHARED / "rtstruct-rtutils-mock" / "rt.dcm",
    ]
    (folder / "objects").mkdir()
    for c in range(20):
        for obj in others:
            shutil.copy(obj, folder / "objects" / f"{obj.stem}_{c}")
    counts["SR / SEG / RTSTRUCT objects"] = 20 * len(others)
    (folder / "junk").mkdir()
    for c in range(100):
        (folder / "junk" / f"notes_{c}.txt").write_text("not DICOM\n" * (c + 1))
    counts["non-DICOM files"] = 100
    return counts


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sitk_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def dcm2niix_exe() -> str | None:
    found = shutil.which("dcm2niix")
    if found:
        return found
    candidate = Path(sys.executable).parent / "dcm2niix"
    return str(candidate) if candidate.is_file() else None


def full_decode_pydicom(files: list[Path]) -> int:
    """The naive way: read every file with pydicom and decode its pixels."""
    total = 0
    for path in files:
        ds = pydicom.dcmread(path)
        total += ds.pixel_array.size
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the synthesised data")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medseg_bench_io_"))
    try:
        ct300 = work / "ct300"
        t = timed(lambda: make_ct300(ct300))
        counts = make_mixed(work / "mixed", ct300)
        n_files = sum(1 for p in (work / "mixed").rglob("*") if p.is_file())
        print(f"synthesised in {t:.1f} s + mixed folder: {n_files} files: {json.dumps(counts)}")
        results = bench_series(ct300, args.repeats, work)
        results.update(bench_discovery(work / "mixed", args.repeats))
        print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"data kept in {work}")


def bench_series(folder: Path, repeats: int, work: Path) -> dict[str, Any]:
    ours = read_dicom_series(folder)
    ref = sitk_read(folder)
    assert np.array_equal(sitk.GetArrayFromImage(ref).transpose(2, 1, 0), ours.array[0])
    assert np.allclose(ref.GetOrigin(), ours.geometry.origin) and np.allclose(ref.GetSpacing(), ours.geometry.spacing)
    del ours, ref
    exe = dcm2niix_exe()
    contenders: dict[str, Callable[[], Any]] = {
        "medseg read_dicom_series (float32)": lambda: read_dicom_series(folder),
        "medseg read_dicom_series (native int16)": lambda: read_dicom_series(folder, dtype="native"),
        "SimpleITK ImageSeriesReader (int16)": lambda: sitk_read(folder),
    }
    if exe:
        out = work / "d2n"

        def run_dcm2niix() -> None:
            out.mkdir()
            subprocess.run([exe, "-z", "n", "-b", "n", "-o", str(out), str(folder)], check=True, capture_output=True)
            shutil.rmtree(out)

        contenders["dcm2niix (-z n, also writes the .nii)"] = run_dcm2niix
    for fn in contenders.values():  # warm-up: page cache, first-touch memory, imports
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["SimpleITK ImageSeriesReader (int16)"]
    print("\n512x512x300 uncompressed CT series (discover + sort + decode + stack), medians:")
    for name, value in medians.items():
        runs = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"  {name:<40} {value:.3f} s  (time / SimpleITK {value / base:.2f}; runs {runs})")
    return {"series_read_s": medians, "series_read_runs_s": times}


def bench_discovery(folder: Path, repeats: int) -> dict[str, Any]:
    scan = scan_dicom(folder)
    image_files = sorted({p for s in scan.series for p in s.files})
    print(f"\nmixed folder: {len(scan.series)} series in {len(image_files)} image files, {len(scan.skipped)} skipped")
    times: dict[str, list[float]] = {
        "medseg scan_dicom (headers only)": [],
        "pydicom dcmread + pixel_array, every image file": [],
        "medseg load every series": [],
    }
    for _ in range(max(1, repeats // 2)):
        times["medseg scan_dicom (headers only)"].append(timed(lambda: scan_dicom(folder)))
        times["pydicom dcmread + pixel_array, every image file"].append(timed(lambda: full_decode_pydicom(image_files)))
        times["medseg load every series"].append(timed(lambda: [load_series(s) for s in scan_dicom(folder).series]))
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["medseg scan_dicom (headers only)"]
    for name, value in medians.items():
        runs = ", ".join(f"{x:.2f}" for x in times[name])
        print(f"  {name:<48} median {value:.2f} s  ({value / base:.1f} x discovery; runs {runs})")
    # Per-kind: uncompressed files only (the hardest case for the ratio: nothing to decompress).
    native = sorted((folder / "patient000" / "ct300").iterdir())
    scan_native, decode_native = [], []
    for _ in range(max(1, repeats // 2)):
        scan_native.append(timed(lambda: scan_dicom(folder / "patient000" / "ct300")))
        decode_native.append(timed(lambda: full_decode_pydicom(native)))
    s, d = statistics.median(scan_native), statistics.median(decode_native)
    print(f"  uncompressed CT only: discovery {s:.2f} s vs pydicom full decode {d:.2f} s  (x{d / s:.1f})")
    return {
        "discovery_s": medians,
        "discovery_runs_s": times,
        "uncompressed_only_s": {"discovery": s, "pydicom_full_decode": d},
        "files": {"image_files": len(image_files), "skipped": len(scan.skipped), "series": len(scan.series)},
    }


if __name__ == "__main__":
    main()
