"""Seeded byte-level mutation fuzzing of the volume readers over real DICOM, NIfTI and NRRD files.

Each mutant ``k`` is a pure function of ``k``: a seed file is chosen and mutated by ``random.Random(k)``
(bit flips, "interesting" integers written over header fields, truncation, inserted / deleted /
duplicated chunks, for ``.nii.gz`` mutations of the decompressed bytes re-compressed or of the gzip
stream itself), written to a file and handed to :func:`medseg.io.info.gather_info` (what ``medseg
info`` runs: header scan, decoding, geometry) and, for DICOM, to :func:`medseg.io.dicom.scan_dicom` on a
folder holding the mutant beside two good slices of its series.

Every outcome must be a success or a :class:`~medseg.errors.MedsegError`; the run is bounded in time
(per mutant) and memory (Python/numpy allocations per mutant via ``tracemalloc``, the whole worker
by ``RLIMIT_AS`` and its peak RSS).  The worker runs in a subprocess so the limits never touch the
caller; a hang is detected by the parent, which kills the worker and names the mutant.

``python tests/fuzz_inputs.py --count 2000`` runs it stand-alone and prints the figures; the seed of
any failure is printed so ``--first K --count 1`` replays it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SAMPLE = REPO / "sample_data"

#: Per-mutant bounds.
MAX_MUTANT_SECONDS = 20.0
MAX_MUTANT_PY_BYTES = 512 * 1024**2
#: Address-space ceiling of the worker above its size after the imports (a runaway allocation fails).
EXTRA_ADDRESS_SPACE = 3 * 1024**3


def seed_files() -> list[Path]:
    """Real files to mutate (shared data when present, plus the generated sample data)."""
    candidates = [
        SHARED / "totalseg-tests" / "example_ct_sm.nii.gz",
        SHARED / "totalseg-tests" / "example_seg.nii.gz",
        SHARED / "rtstruct-dicomrttool-anon" / "CT_1.dcm",
        SHARED / "dcm_qa_ts" / "In" / "4.dcm",  # RLE
        SHARED / "dcm_qa_ts" / "In" / "5.dcm",  # JPEG lossless
        SHARED / "dcm_qa_ts" / "In" / "7.dcm",  # JPEG-LS
        SHARED / "dcm_qa_ts" / "In" / "9.dcm",  # JPEG 2000
        SHARED / "pyradiomics-data" / "breast1_image.nrrd",
        SAMPLE / "Dataset001_CTPhantom" / "imagesTr" / "ct_000_0000.nii.gz",
        SAMPLE / "Dataset001_CTPhantom" / "labelsTr" / "ct_000.nii.gz",
    ]
    found = [p for p in candidates if p.is_file()]
    sample_dicom = SAMPLE / "dicom" / "ct_010"
    if sample_dicom.is_dir():
        found.append(min(p for p in sample_dicom.iterdir() if p.is_file()))
    return found


# ============================================================================= mutation
_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def mutate(data: bytes, rng: random.Random, *, header: int) -> bytes:
    """1-8 random mutations, two thirds of them inside the first ``header`` bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not out:
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            continue
        limit = min(len(out), header) if rng.random() < 0.67 else len(out)
        pos = rng.randrange(max(limit, 1))
        kind = rng.random()
        if kind < 0.30:  # flip bits
            out[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.50:  # an interesting integer over a 1/2/4-byte field
            width = rng.choice((1, 2, 4))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            order = rng.choice(("little", "big"))
            out[pos : pos + width] = value.to_bytes(width, order)
        elif kind < 0.60:  # random bytes
            n = rng.randint(1, 32)
            out[pos : pos + n] = bytes(rng.randrange(256) for _ in range(n))
        elif kind < 0.70:  # truncate
            del out[rng.randrange(len(out)) :]
        elif kind < 0.80:  # delete a chunk
            del out[pos : pos + rng.randint(1, 256)]
        elif kind < 0.90:  # insert a chunk
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 256)))
        else:  # duplicate a chunk elsewhere
            n = rng.randint(1, 512)
            chunk = bytes(out[pos : pos + n])
            where = rng.randrange(len(out) + 1)
            out[where:where] = chunk
    return bytes(out)


@dataclass
class Mutant:
    """Mutant ``k``: which seed file, the mutated bytes and the name to write them under."""

    index: int
    source: Path
    data: bytes
    name: str
    dicom: bool


def make_mutant(index: int, seeds: list[Path], cache: dict[Path, bytes]) -> Mutant:
    rng = random.Random(index)
    source = seeds[index % len(seeds)]
    data = cache.setdefault(source, source.read_bytes())
    name = source.name
    if name.endswith(".gz") and rng.random() < 0.75:  # mutate what nibabel parses, then re-compress
        raw = gzip.decompress(data)
        mutated = gzip.compress(mutate(raw, rng, header=352), compresslevel=1)
    else:
        header = 4096 if _is_dicom(data) else (1024 if name.endswith(".nrrd") else 352)
        mutated = mutate(data, rng, header=header)
    return Mutant(index, source, mutated, name, _is_dicom(data))


# ============================================================================= worker
@dataclass
class Summary:
    mutants: int = 0
    ok: int = 0
    medseg_errors: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    max_seconds: float = 0.0
    max_py_bytes: int = 0
    max_rss_bytes: int = 0
    seconds: float = 0.0
    errors_by_type: dict[str, int] = field(default_factory=dict)


def _exercise(mutant: Mutant, work: Path) -> None:
    from medseg.io.dicom import scan_dicom
    from medseg.io.info import gather_info

    case = work / f"m{mutant.index}"
    case.mkdir()
    path = case / mutant.name
    path.write_bytes(mutant.data)
    try:
        gather_info(path)
    finally:
        if mutant.dicom:
            siblings = [p for p in sorted(mutant.source.parent.iterdir()) if p.is_file() and p != mutant.source][:2]
            for sibling in siblings:
                shutil.copy(sibling, case / f"good_{sibling.name}")
            scan_dicom(case)  # never raises for a corrupt file beside good ones
        shutil.rmtree(case, ignore_errors=True)


def run_worker(first: int, count: int, budget_s: float, out: Path) -> None:
    """Run mutants ``first .. first+count-1`` (or until ``budget_s`` is spent); write the summary to ``out``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns (at length) about every garbled value
    import numpy  # noqa: F401  (imports before the address-space limit)
    import SimpleITK as sitk

    import medseg.io.dicom
    import medseg.io.dicom_stack
    import medseg.io.info  # noqa: F401
    from medseg.errors import MedsegError

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    vm = _address_space()
    if vm:
        resource.setrlimit(resource.RLIMIT_AS, (vm + EXTRA_ADDRESS_SPACE, resource.RLIM_INFINITY))
    seeds = seed_files()
    cache: dict[Path, bytes] = {}
    summary = Summary()
    work = Path(tempfile.mkdtemp(prefix="medseg-fuzz-"))
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for index in range(first, first + count):
            if time.perf_counter() - start > budget_s:
                break
            mutant = make_mutant(index, seeds, cache)
            print(f"START {index}", flush=True)
            tracemalloc.reset_peak()
            t0 = time.perf_counter()
            outcome = "ok"
            try:
                _exercise(mutant, work)
            except MedsegError as exc:
                outcome = "medseg"
                key = type(exc).__name__
                summary.errors_by_type[key] = summary.errors_by_type.get(key, 0) + 1
            except BaseException as exc:  # everything else is a finding
                outcome = "failure"
                summary.failures.append(
                    {
                        "seed": index,
                        "source": str(mutant.source),
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
                if isinstance(exc, KeyboardInterrupt):
                    raise
            elapsed = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            summary.mutants += 1
            summary.ok += outcome == "ok"
            summary.medseg_errors += outcome == "medseg"
            summary.max_seconds = max(summary.max_seconds, elapsed)
            summary.max_py_bytes = max(summary.max_py_bytes, peak)
            if elapsed > MAX_MUTANT_SECONDS or peak > MAX_MUTANT_PY_BYTES:
                summary.failures.append(
                    {"seed": index, "source": str(mutant.source), "error": f"{elapsed:.1f} s, {peak / 2**20:.0f} MiB"}
                )
    finally:
        tracemalloc.stop()
        shutil.rmtree(work, ignore_errors=True)
        summary.seconds = time.perf_counter() - start
        summary.max_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.write_text(json.dumps(summary.__dict__, indent=1))


def _address_space() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


# ============================================================================= parent
def run_fuzz(*, first: int = 0, count: int = 2000, budget_s: float = 1e9, python: str = sys.executable) -> Summary:
    """Run the worker in a subprocess with a per-mutant watchdog; returns its summary.

    A mutant running longer than :data:`MAX_MUTANT_SECONDS` (a hang) kills the worker and is
    reported as a failure with its seed.
    """
    with tempfile.TemporaryDirectory(prefix="medseg-fuzz-out-") as tmp:
        result = Path(tmp) / "summary.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        command = [python, str(Path(__file__).resolve()), "--worker", "--first", str(first), "--count", str(count)]
        command += ["--budget", str(budget_s), "--out", str(result)]
        errors = (Path(tmp) / "stderr.txt").open("w")  # (a pipe nobody drains would block the worker)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        current = None
        hang = None
        while True:
            ready = selector.select(timeout=MAX_MUTANT_SECONDS + 10)
            if not ready:
                hang = current
                process.kill()
                break
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("START "):
                current = int(line.split()[1])
        process.wait()
        errors.close()
        stderr = (Path(tmp) / "stderr.txt").read_text(errors="replace")
        if hang is not None or not result.exists():
            summary = Summary()
            summary.failures.append(
                {
                    "seed": current,
                    "error": "hang (no progress)" if hang is not None else f"worker died: {stderr[-2000:]}",
                }
            )
            return summary
        return Summary(**json.loads(result.read_text()))


def format_summary(summary: Summary) -> str:
    return (
        f"{summary.mutants} mutants in {summary.seconds:.1f} s: {summary.ok} read, {summary.medseg_errors} MedsegError "
        f"{summary.errors_by_type}, {len(summary.failures)} failures; slowest mutant {summary.max_seconds:.2f} s, "
        f"max Python memory per mutant {summary.max_py_bytes / 2**20:.0f} MiB, worker peak RSS "
        f"{summary.max_rss_bytes / 2**20:.0f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=0, help="first mutant index (seed)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=1e9, help="stop after this many seconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.first, args.count, args.budget, Path(args.out))
        return 0
    summary = run_fuzz(first=args.first, count=args.count, budget_s=args.budget)
    print(format_summary(summary))
    for failure in summary.failures:
        print(f"seed {failure['seed']}: {failure.get('source', '')}: {failure['error']}")
        if "traceback" in failure:
            print(failure["traceback"])
    return 1 if summary.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
