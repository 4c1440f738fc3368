"""Byte-mutation fuzzing of the readers (``tests/fuzz_inputs.py``): success or MedsegError, bounded.

The default suite runs the first mutants for a short time budget; ``--runslow`` runs at least 2,000.
Each failure names its seed (``python tests/fuzz_inputs.py --first SEED --count 1`` replays it).
"""

from __future__ import annotations

import pytest
from fuzz_inputs import MAX_MUTANT_PY_BYTES, format_summary, run_fuzz, seed_files

MAX_WORKER_RSS = 2 * 1024**3


def _check(summary, *, at_least: int) -> None:  # type: ignore[no-untyped-def]
    details = "\n".join(
        f"seed {f['seed']} ({f.get('source', '')}): {f['error']}\n{f.get('traceback', '')}" for f in summary.failures
    )
    assert not summary.failures, f"{format_summary(summary)}\n{details}"
    assert summary.mutants >= at_least, format_summary(summary)
    assert summary.max_py_bytes < MAX_MUTANT_PY_BYTES and summary.max_rss_bytes < MAX_WORKER_RSS, format_summary(
        summary
    )
    assert summary.medseg_errors > 0 and summary.ok > 0, format_summary(summary)  # both outcomes exercised


def test_fuzz_readers_short_budget() -> None:
    if not seed_files():
        pytest.skip("no seed files (sample_data and ../shared/data absent)")
    summary = run_fuzz(first=0, count=400, budget_s=15.0)
    print(format_summary(summary))
    _check(summary, at_least=20)  # (the count depends on the machine; the seeds are always 0, 1, 2 ...)


@pytest.mark.slow
def test_fuzz_readers_2000_mutants() -> None:
    if not seed_files():
        pytest.skip("no seed files (sample_data and ../shared/data absent)")
    summary = run_fuzz(first=100_000, count=2400)
    print(format_summary(summary))
    _check(summary, at_least=2000)
