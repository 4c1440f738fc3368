"""Batch inference over DICOM archives: selection rules, a resumable SQLite manifest, prefetching runner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from medseg.batch.manifest import Manifest
    from medseg.batch.runner import BatchOptions, run_batch
    from medseg.batch.selection import SelectionRules, load_rules

__all__ = ["BatchOptions", "Manifest", "SelectionRules", "load_rules", "run_batch"]

# Imported on first use, so that `medseg --help` does not load the runner and its dependencies.
if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name stays an error
    __getattr__ = lazy_attributes(
        __name__,
        {
            "Manifest": "medseg.batch.manifest",
            "BatchOptions": "medseg.batch.runner",
            "run_batch": "medseg.batch.runner",
            "SelectionRules": "medseg.batch.selection",
            "load_rules": "medseg.batch.selection",
        },
    )
