"""Batch inference over DICOM archives: selection rules, a resumable SQLite manifest, prefetching runner."""

from __future__ import annotations

from medseg.batch.manifest import Manifest
from medseg.batch.runner import BatchOptions, run_batch
from medseg.batch.selection import SelectionRules, load_rules

__all__ = ["BatchOptions", "Manifest", "SelectionRules", "load_rules", "run_batch"]
