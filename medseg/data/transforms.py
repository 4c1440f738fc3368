"""MONAI dictionary transforms built from a :class:`~medseg.data.plan.Plan`.

Keys: ``"image"`` (a list of channel paths, or :class:`~medseg.io.Volume` objects) and
``"label"``.  Loading goes through :func:`medseg.io.load_volume` (so DICOM folders
work wherever files do) and checks that all channels and the label share one grid.
Everything after loading is MONAI: intensity normalisation (per channel, as the plan
says, before resampling as in nnU-Net), ``Orientationd``, ``Spacingd``, class-balanced
patch sampling (``RandCropByLabelClassesd`` on cached per-class voxel indices) and
nnU-Net-like spatial and intensity augmentation.

Training splits the pipeline in two: :func:`cache_transforms` (deterministic; cached
once per case by ``CacheDataset`` / ``PersistentDataset``) and :func:`random_transforms`
(patch sampling and augmentation, re-seeded per sample by the training loop).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from medseg.config import TrainConfig
from medseg.data.datasets import GRID_ATOL, read_label
from medseg.data.plan import ChannelNorm, Plan
from medseg.errors import GeometryError
from medseg.io import Volume, load_volume

__all__ = [
    "GRID_ATOL",
    "LoadVolumed",
    "NormalizeChannelsd",
    "cache_transforms",
    "normalize_channel",
    "preprocess_transforms",
    "random_transforms",
    "stack_channels",
    "train_transforms",
]

#: Per-class voxel indices kept per case for patch sampling (a regular subsample beyond this).
MAX_INDICES_PER_CLASS = 20_000
_INDICES_KEY = "label_cls_indices"


def stack_channels(channels: Sequence[Volume], *, what: str = "image") -> Volume:
    """Concatenate single-channel volumes on one grid into ``(C, X, Y, Z)``.

    Raises:
        GeometryError: Naming the channel whose grid differs from the first one.
    """
    first = channels[0]
    for index, other in enumerate(channels[1:], start=1):
        first.geometry.require_same(
            other.geometry,
            atol=GRID_ATOL,
            what=f"{what} channel 0 ({first.source}) and channel {index} ({other.source})",
        )
    arrays = [np.asarray(c.array, dtype=np.float32) for c in channels]  # no copy for float32 input
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return Volume(array=array, geometry=first.geometry, kind="image", source=first.source, meta=dict(first.meta))


class LoadVolumed(MapTransform):
    """Load ``image`` (list of channels) and optional ``label`` as MetaTensors.

    Values may be paths (files or DICOM series folders) or already-loaded :class:`Volume` s.
    Labels are read as integers (:func:`~medseg.data.datasets.read_label`, so a DICOM mask
    series works too).  The label must lie on the image grid (within 1e-3 mm).
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label") -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace paths/volumes under the keys by ``(C, X, Y, Z)`` MetaTensors."""
        d = dict(data)
        items = d[self.image_key]
        items = items if isinstance(items, (list, tuple)) else [items]
        channels = [v if isinstance(v, Volume) else load_volume(v) for v in items]
        image = stack_channels(channels)
        d[self.image_key] = image.to_metatensor()
        if self.label_key and d.get(self.label_key) is not None:
            raw = d[self.label_key]
            label = raw if isinstance(raw, Volume) else read_label(raw)
            image.geometry.require_same(
                label.geometry, atol=GRID_ATOL, what=f"image {image.source} and label {label.source}"
            )
            if label.channels != 1:
                raise GeometryError(f"{label.source}: label must have one channel, has {label.channels}")
            d[self.label_key] = label.to_metatensor()
        return d


def normalize_channel(values: torch.Tensor, norm: ChannelNorm) -> torch.Tensor:
    """Normalise one channel as the plan says.

    Args:
        values: ``(1, X, Y, Z)`` float tensor.
        norm: The channel's plan entry.

    Returns:
        ``(1, X, Y, Z)`` float32: CT clipped to ``norm.clip`` and z-scored with the dataset
        statistics; z-score with this image's mean/std (over the foreground = voxels above
        the minimum, background set to 0, when ``norm.region == "foreground"``); or unchanged.
    """
    x = values.to(torch.float32, copy=True)  # one new buffer, then in place: CT volumes are large
    if norm.scheme == "none":
        return x
    if norm.scheme == "ct":
        assert norm.clip is not None and norm.mean is not None and norm.std is not None
        return x.clamp_(norm.clip[0], norm.clip[1]).sub_(norm.mean).div_(norm.std)
    if norm.region == "foreground":
        mask = x > x.min()
        if int(mask.sum()) >= 2:
            fg = x[mask].double()
            mean, std = float(fg.mean()), float(fg.std(correction=0))
            return x.sub_(mean).div_(max(std, 1e-8)).masked_fill_(~mask, 0.0)
    mean, std = float(x.double().mean()), float(x.double().std(correction=0))
    return x.sub_(mean).div_(max(std, 1e-8))


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation as the plan says (CT window+z-score, z-score, none)."""

    def __init__(self, keys: str, channels: Sequence[ChannelNorm]) -> None:
        super().__init__(keys)
        self.channels = list(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise each channel of the ``(C, X, Y, Z)`` image with its own scheme."""
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.channels):
                raise GeometryError(f"expected {len(self.channels)} channels, got {img.shape[0]}")
            plain = torch.as_tensor(img)
            if len(self.channels) == 1:
                out = normalize_channel(plain, self.channels[0])
            else:
                out = torch.cat([normalize_channel(plain[c : c + 1], n) for c, n in enumerate(self.channels)], dim=0)
            if isinstance(img, MetaTensor):
                d[key] = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
            else:
                d[key] = out
        return d


def preprocess_transforms(plan: Plan, *, with_label: bool) -> Compose:
    """Deterministic part: load -> normalisation -> orientation -> spacing.

    Output ``image`` is a float32 MetaTensor ``(C, X', Y', Z')`` on the plan's grid;
    ``label`` (if present) a ``(1, X', Y', Z')`` MetaTensor resampled with nearest neighbour.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    return Compose(
        [
            LoadVolumed("image", "label" if with_label else None),
            NormalizeChannelsd("image", plan.channels),
            Orientationd(keys=keys, axcodes=plan.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=plan.target_spacing, mode=modes),
            EnsureTyped(keys="image", dtype=torch.float32),
        ]
    )


def _label_dtype(plan: Plan) -> torch.dtype:
    return torch.uint8 if plan.num_classes <= 256 else torch.int32


def cache_transforms(plan: Plan) -> Compose:
    """Deterministic, cacheable part of training: preprocessing, padding to the patch, class indices.

    Output: ``image`` ``(C, X', Y', Z')`` float32, ``label`` ``(1, X', Y', Z')`` uint8 (both padded
    to at least the patch size) and ``label_cls_indices`` (flat voxel indices per class,
    at most :data:`MAX_INDICES_PER_CLASS` each).
    """
    keys = ["image", "label"]
    return Compose(
        [
            *preprocess_transforms(plan, with_label=True).transforms,
            EnsureTyped(keys="label", dtype=_label_dtype(plan)),
            SpatialPadd(keys=keys, spatial_size=plan.patch_size),
            ClassesToIndicesd(keys="label", num_classes=plan.num_classes, max_samples_per_class=MAX_INDICES_PER_CLASS),
        ]
    )


def random_transforms(plan: Plan, train: TrainConfig) -> Compose:
    """Patch sampling and augmentation; yields ``train.samples_per_volume`` patches per case.

    A share ``train.foreground_ratio`` of patches is centred on a voxel of a foreground class
    (classes present in the case chosen with equal probability, as nnU-Net oversamples), the
    rest on a background voxel.  Augmentation (``train.augment``): rotation/scaling, Gaussian
    noise and blur, brightness, shift, gamma, and mirroring along ``train.flip_axes``.
    Output: ``image`` ``(C, *patch)`` float32 and ``label`` ``(1, *patch)`` int64, no metadata.
    """
    keys = ["image", "label"]
    fg = train.foreground_ratio
    k = plan.num_classes
    ratios = [max(1.0 - fg, 1e-6)] + [fg / (k - 1)] * (k - 1)
    steps: list[Any] = [
        RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=plan.patch_size,
            ratios=ratios,
            num_classes=k,
            num_samples=train.samples_per_volume,
            indices_key=_INDICES_KEY,
            warn=False,
        ),
        DeleteItemsd(keys=_INDICES_KEY),
    ]
    if train.augment:
        steps += [
            RandAffined(
                keys=keys,
                prob=0.2,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandGaussianNoised(keys="image", prob=0.15, std=0.1),
            RandGaussianSmoothd(keys="image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3),
            RandAdjustContrastd(keys="image", prob=0.1, gamma=(0.7, 1.5)),
        ]
        steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in train.flip_axes]
    steps.append(EnsureTyped(keys=keys, dtype=(torch.float32, torch.long), track_meta=False))
    return Compose(steps)


def train_transforms(plan: Plan, train: TrainConfig) -> Compose:
    """The whole training pipeline (:func:`cache_transforms` then :func:`random_transforms`).

    Yields ``train.samples_per_volume`` patches of ``plan.patch_size`` per volume.
    """
    return Compose([*cache_transforms(plan).transforms, *random_transforms(plan, train).transforms])
