"""Training data: cached preprocessed cases, counter-based sampling, rank sharding.

Sample number ``g`` of a run (``g = iteration * items_per_step + slot``) is a pure
function of the seed and ``g``: the case is ``permutation(seed, epoch)[g % n]`` with
``epoch = g // n`` (every case once per epoch, reshuffled each epoch), and the random
patch and augmentation are drawn from generators seeded with ``(seed, g)``.  Hence

* the data order survives a restart: resuming at iteration ``k`` continues with sample
  ``k * items_per_step`` -- no sampler or worker state to save;
* results do not depend on ``num_workers`` or on which worker produced a sample;
* with ``W`` distributed ranks, rank ``r`` takes slots ``r * B/W ... (r + 1) * B/W - 1`` of
  every global batch of ``B`` items, so the union over ranks is exactly the
  single-process batch (rank-sharded, like ``DistributedSampler`` but step-aligned).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose
from torch.utils.data import Sampler

from medseg.data.datasets import Case
from medseg.errors import reraise_medseg

__all__ = ["IterationSampler", "PatchDataset", "cached_dataset", "sample_seed"]


def sample_seed(seed: int, index: int) -> int:
    """The 32-bit seed of sample ``index`` of a run."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def cached_dataset(
    cases: Sequence[Case],
    transform: Compose,
    *,
    mode: str,
    cache_dir: Path | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> Dataset:
    """Cases through the deterministic ``transform``, cached.

    Args:
        cases: The cases.
        transform: Deterministic transforms (loading, normalisation, resampling, ...).
        mode: ``memory`` (:class:`~monai.data.CacheDataset`: decoded once, kept in RAM),
            ``disk`` (:class:`~monai.data.PersistentDataset` in ``cache_dir``: decoded once, reused
            across runs and shared between ranks) or ``none`` (decoded at every access).
        cache_dir: Folder for ``disk``.
        num_workers: Threads filling the memory cache.
        progress: Progress bar while caching.
    """
    data = [c.to_dict() for c in cases]
    with reraise_medseg():
        if mode == "memory":
            return CacheDataset(
                data, transform=transform, cache_rate=1.0, num_workers=max(1, num_workers), progress=progress
            )
        if mode == "disk":
            if cache_dir is None:
                raise ValueError("cache mode 'disk' needs a cache_dir")
            cache_dir.mkdir(parents=True, exist_ok=True)
            return PersistentDataset(data, transform=transform, cache_dir=cache_dir)
        return Dataset(data, transform=transform)


class PatchDataset:
    """Map-style dataset of training samples: index ``g`` -> patches of one case.

    Args:
        cases: Preprocessed cases (``image``, ``label``, class indices), e.g. a cached dataset.
        transform: The random part (patch sampling, augmentation); re-seeded per sample.
        seed: The run's seed.
    """

    def __init__(self, cases: Any, transform: Compose, *, seed: int) -> None:
        self.cases = cases
        self.transform = transform
        self.seed = seed
        self._perm_epoch = -1
        self._perm: np.ndarray = np.arange(0)

    def case_index(self, index: int) -> int:
        """Which case sample ``index`` comes from (each epoch is a fresh permutation)."""
        n = len(self.cases)
        epoch, position = divmod(index, n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[position])

    def __len__(self) -> int:
        return 2**62  # indices are unbounded; the sampler decides which are drawn

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        item = dict(self.cases[self.case_index(index)])
        self.transform.set_random_state(seed=sample_seed(self.seed, index))
        with reraise_medseg():
            out = self.transform(item)
        patches = out if isinstance(out, list) else [out]
        return [{"image": p["image"], "label": p["label"]} for p in patches]


class IterationSampler(Sampler[int]):
    """Sample numbers for iterations ``start + 1 .. stop`` on one rank.

    Args:
        items_per_step: Items (cases) per global batch.
        start: Iterations already done.
        stop: Last iteration.
        rank: This process's rank.
        world_size: Number of ranks (must divide ``items_per_step``).
    """

    def __init__(self, *, items_per_step: int, start: int, stop: int, rank: int = 0, world_size: int = 1) -> None:
        if items_per_step % world_size:
            raise ValueError(f"{items_per_step} items per step cannot be split over {world_size} ranks")
        self.items = items_per_step
        self.start, self.stop = start, stop
        self.rank, self.world = rank, world_size
        self.per_rank = items_per_step // world_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            first = step * self.items + self.rank * self.per_rank
            yield from range(first, first + self.per_rank)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.per_rank
