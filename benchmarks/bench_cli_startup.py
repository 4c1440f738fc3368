"""Start-up time of the ``medseg`` command: ``--help`` and ``info`` on the sample data.

Run (other helpers share the 2 cores, so take the lock):

    git archive HEAD medseg | tar -x -C /tmp/medseg_base     # the baseline tree, once
    flock /tmp/medseg-bench.lock .venv/bin/python benchmarks/bench_cli_startup.py \
        --baseline /tmp/medseg_base [--repeats 5]

Each command is run as a fresh process of the installed ``medseg`` console script, with the
baseline tree put first on ``PYTHONPATH`` (so ``import medseg`` finds it) or not; the two
contenders are interleaved and medians of the wall times are printed, plus the number of modules
``import medseg.cli`` loads and whether torch/MONAI are among them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDSEG = Path(sys.executable).with_name("medseg")
COMMANDS = {
    "medseg --help": ["--help"],
    "medseg info <nifti>": ["info", str(ROOT / "sample_data/Dataset001_CTPhantom/imagesTr/ct_000_0000.nii.gz")],
    "medseg info <dicom folder>": ["info", str(ROOT / "sample_data/dicom/ct_010")],
}
PROBE = (
    "import sys, json, medseg.cli; "
    "print(json.dumps([len(sys.modules), 'torch' in sys.modules, 'monai' in sys.modules, medseg.cli.__file__]))"
)


def _env(baseline: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if baseline is not None:
        env["PYTHONPATH"] = str(baseline)
    return env


def _wall(argv: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Print a table of median wall times (s) for the baseline tree and the working tree."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="folder holding the baseline medseg/ package")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    contenders = {"baseline": args.baseline.resolve(), "ours": None}
    with tempfile.TemporaryDirectory() as cwd:  # neutral cwd: nothing shadows the package on sys.path
        for name, base in contenders.items():
            out = subprocess.run(
                [sys.executable, "-c", PROBE], env=_env(base), cwd=cwd, check=True, capture_output=True, text=True
            )
            modules, torch, monai, path = json.loads(out.stdout)
            print(f"{name:9s} import medseg.cli: {modules} modules, torch={torch}, monai={monai} ({path})")
        for label, cmd in COMMANDS.items():
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, base in contenders.items():
                    times[name].append(_wall([str(MEDSEG), *cmd], _env(base), cwd))
            med = {name: statistics.median(t) for name, t in times.items()}
            print(
                f"{label:28s} baseline {med['baseline']:.2f} s   ours {med['ours']:.2f} s   "
                f"speed-up x{med['baseline'] / med['ours']:.1f}   (median of {args.repeats})"
            )


if __name__ == "__main__":
    main()
