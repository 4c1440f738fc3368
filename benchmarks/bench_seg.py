"""Benchmark DICOM SEG encodings: file size and write time, uncompressed vs lossless compressed.

Writes the 31-class TotalSegmentator label (``../shared/data/totalseg-tests/example_seg_dicom.nii.gz``,
512x512x20, on exactly the grid of ``example_ct_dicom``) as DICOM SEG over that CT series with
:func:`medseg.io.dicom_seg.write_dicom_seg`, for BINARY and LABELMAP and every transfer syntax
medseg offers (``none`` = explicit VR little endian, ``deflate``, ``rle``, ``jpegls``, ``jpeg2000``;
RLE and JPEG-LS only for LABELMAP: highdicom encodes 1-bit BINARY frames only as JPEG 2000).
Each file is read back (highdicom, on the CT grid) and compared with the label volume, and checked
with dicom3tools' ``dciodvfy`` when it is installed (error lines counted).

The CT's UIDs were blanked by its anonymiser; the benchmark gives the headers fresh UIDs in memory
(a SEG must reference its source by UID), nothing on disk is changed.

Run as ``flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_seg.py`` (add ``--repeats N``).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medseg.io import load_volume, read_dicom_series
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.grid import reindex_to
from medseg.io.volume import Volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg-tests"
ENCODINGS = {
    "binary": ("none", "deflate", "jpeg2000"),
    "labelmap": ("none", "deflate", "rle", "jpegls", "jpeg2000"),
}


def sources(folder: Path) -> list[pydicom.Dataset]:
    """The CT headers with fresh study/series/instance/frame-of-reference UIDs (in memory)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        headers.append(ds)
    return headers


def dciodvfy_errors(path: Path) -> int | None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300)
    return sum(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="totalseg-tests folder")
    parser.add_argument("--repeats", type=int, default=3, help="writes per setting (median time)")
    args = parser.parse_args()

    ct = read_dicom_series(args.data / "example_ct_dicom")
    seg = reindex_to(load_volume(args.data / "example_seg_dicom.nii.gz", kind="label"), ct.geometry)
    headers = sources(args.data / "example_ct_dicom")
    by_file = {Path(h.filename).name: h for h in headers}
    uids = [str(by_file[Path(f).name].SOPInstanceUID) for f in ct.meta["slice_files"]]
    reference = Volume(ct.array, ct.geometry, meta={"sop_instance_uids": uids})
    values = [int(v) for v in np.unique(seg.array) if v]
    names = {v: f"class {v}" for v in values}
    print(f"machine: {platform.processor() or platform.machine()}, label {seg.geometry.shape}, {len(values)} classes")
    columns = ("type", "encoding", "transfer syntax", "size (MB)", "vs uncompressed", "write (s)", "read back")
    print("| " + " | ".join((*columns, "dciodvfy errors")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seg_type, encodings in ENCODINGS.items():
            base_size = None
            for encoding in encodings:
                out = Path(tmp) / f"{seg_type}-{encoding}.dcm"
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    write_dicom_seg(
                        seg,
                        headers,
                        out,
                        label_names=names,
                        segmentation_type=seg_type,  # type: ignore[arg-type]
                        compression=encoding,  # type: ignore[arg-type]
                        overwrite=True,
                    )
                    times.append(time.perf_counter() - start)
                size = out.stat().st_size
                base_size = base_size or size
                back = read_dicom_seg(out, reference=reference)
                equal = np.array_equal(back.array[0], seg.array[0])
                syntax = pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
                errors = dciodvfy_errors(out)
                print(
                    f"| {seg_type.upper()} | {encoding} | {syntax} | {size / 1e6:.2f} | {size / base_size:.3f} | "
                    f"{statistics.median(times):.2f} | {'equal' if equal else 'DIFFERENT'} | "
                    f"{'n/a' if errors is None else errors} |"
                )


if __name__ == "__main__":
    main()
