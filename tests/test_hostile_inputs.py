"""Every broken or hostile input of ``tests/hostile_inputs.py`` gets the behaviour it must get.

A case either succeeds (and passes its check: good files beside bad ones are processed, the bad
ones reported by name) or raises the expected :class:`~medseg.errors.MedsegError` subclass with a
one-line message naming the broken file and matching the case's pattern.  Through the command line
the same case exits 2 with exactly one line on stderr.  Python memory (tracemalloc, which sees
numpy's allocations) stays far below what the lying headers declare.
"""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import pytest
from hostile_inputs import CASES, CLASSES, Case, find_sources

from medseg.errors import MedsegError

PEAK_BYTES = 400 * 1024**2  # a case may decode a real series; none may follow a lying header


def test_every_class_has_cases_and_there_are_at_least_60() -> None:
    counts = {cls: sum(1 for c in CASES if c.cls == cls) for cls in CLASSES}
    assert all(counts.values()), counts
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES), len(CASES)


@pytest.mark.parametrize("item", CASES, ids=[f"{c.cls}-{c.name}" for c in CASES])
def test_hostile_input(item: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("tiny_model") if "model" in item.needs else None
    sources = find_sources(model)
    missing = sources.have(item.needs)
    if missing:
        pytest.skip(f"no real file for {', '.join(missing)} (../shared/data absent?)")
    folder = tmp_path / item.name
    folder.mkdir(parents=True)
    expect = item.build(sources, folder)
    tracemalloc.start()
    try:
        if expect.error is None:
            result = expect.run()
            if expect.check is not None:
                expect.check(result)
        else:
            assert issubclass(expect.error, MedsegError)
            with pytest.raises(expect.error) as info:
                expect.run(debug=True) if expect.cli else expect.run()
            message = str(info.value)
            assert "\n" not in message, message
            assert re.search(expect.match, message), (expect.match, message)
            named = str(expect.names if expect.names is not None else folder)
            assert named in message, (named, message)
            assert "weights_only" not in message
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak Python memory {peak / 2**20:.0f} MiB"
    if expect.error is not None and expect.cli:
        code, _, err = expect.run()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
