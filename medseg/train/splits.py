"""Train/validation splits that keep a patient's studies together.

The patient key of a case is its ``group`` (from a YAML/CSV dataset), else the first
group of ``train.group_pattern`` (or the dataset's ``group_pattern``) matched against the
case id, else the case id itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.config import TrainConfig
from medseg.data.datasets import Case, DatasetInfo, case_group
from medseg.errors import DatasetError

__all__ = ["kfold_split", "make_split", "split_cases"]


def _groups(cases: Sequence[Case], pattern: str | None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for index, case in enumerate(cases):
        out.setdefault(case_group(case, pattern), []).append(index)
    return out


def split_cases(
    cases: list[Case], *, val_fraction: float, seed: int, group_pattern: str | None = None
) -> tuple[list[Case], list[Case]]:
    """Random train/validation split by patient (at least one training patient).

    Args:
        cases: Labelled cases.
        val_fraction: Share of patients held out (0: no validation).
        seed: Shuffling seed.
        group_pattern: Patient-key regex (see module doc).
    """
    groups = _groups(cases, group_pattern)
    if val_fraction <= 0 or len(groups) < 2:
        return list(cases), []
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = min(len(keys) - 1, max(1, round(val_fraction * len(keys))))
    val_idx = sorted(i for k in order[:n_val] for i in groups[keys[k]])
    val_set = set(val_idx)
    return [c for i, c in enumerate(cases) if i not in val_set], [cases[i] for i in val_idx]


def kfold_split(
    cases: Sequence[Case], *, folds: int, fold: int, seed: int, group_pattern: str | None = None
) -> tuple[list[Case], list[Case]]:
    """Fold ``fold`` of a ``folds``-fold cross-validation over patients.

    Patients are shuffled with ``seed`` and, largest first, assigned to the fold with the
    fewest cases so far (ties: lowest fold), so folds are balanced in cases and no
    patient is split.

    Raises:
        DatasetError: Fewer patients than folds, or ``fold`` out of range.
    """
    if not 0 <= fold < folds:
        raise DatasetError(f"fold {fold} does not exist with {folds} folds (0..{folds - 1})")
    groups = _groups(cases, group_pattern)
    if len(groups) < folds:
        raise DatasetError(f"{folds}-fold cross-validation needs at least {folds} patients, found {len(groups)}")
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    keys.sort(key=lambda k: -len(groups[k]))  # stable: equal sizes keep the shuffled order
    sizes = [0] * folds
    assignment: dict[str, int] = {}
    for key in keys:
        target = int(np.argmin(sizes))
        assignment[key] = target
        sizes[target] += len(groups[key])
    val_idx = sorted(i for key, f in assignment.items() if f == fold for i in groups[key])
    val_set = set(val_idx)
    return [c for i, c in enumerate(cases) if i not in val_set], [cases[i] for i in val_idx]


def make_split(info: DatasetInfo, train: TrainConfig, *, seed: int) -> tuple[list[Case], list[Case], dict[str, Any]]:
    """The run's training and validation cases, and a description for ``splits.json``.

    ``train.fold`` set: k-fold over all labelled cases (training + validation sections);
    else the dataset's fixed validation cases if it has any; else a ``train.val_fraction``
    random split by patient.
    """
    pattern = train.group_pattern or info.group_pattern
    if train.fold is not None:
        pool = info.training + info.validation
        tr, va = kfold_split(pool, folds=train.folds, fold=train.fold, seed=seed, group_pattern=pattern)
        how = f"fold {train.fold} of {train.folds}"
    elif info.validation:
        tr, va = list(info.training), list(info.validation)
        how = "the dataset's validation cases"
    else:
        tr, va = split_cases(info.training, val_fraction=train.val_fraction, seed=seed, group_pattern=pattern)
        how = f"random {train.val_fraction:g} of patients" if va else "no validation"
    if not tr:
        raise DatasetError(f"{info.source or info.root}: no training cases left after the split ({how})")
    record = {
        "method": how,
        "group_pattern": pattern,
        "train": [c.case_id for c in tr],
        "val": [c.case_id for c in va],
        "groups": {c.case_id: case_group(c, pattern) for c in tr + va},
    }
    return tr, va, record
