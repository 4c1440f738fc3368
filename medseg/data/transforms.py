"""MONAI dictionary transforms built from a :class:`~medseg.data.plan.Plan`.

Keys: ``"image"`` (a list of channel paths, or :class:`~medseg.io.Volume` objects) and
``"label"``.  Loading goes through :func:`medseg.io.load_volume` (so DICOM folders
work wherever files do) and checks that all channels and the label share one grid.
Everything after loading is MONAI: ``Orientationd``, ``Spacingd``, intensity scaling,
``RandCropByPosNegLabeld`` and augmentation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRange,
    Spacingd,
    SpatialPadd,
)

from medseg.config import TrainConfig
from medseg.data.plan import ChannelNorm, Plan
from medseg.errors import GeometryError
from medseg.io import Volume, load_volume

__all__ = ["LoadVolumed", "NormalizeChannelsd", "preprocess_transforms", "stack_channels", "train_transforms"]

#: Grids of channels and labels may differ by this much (mm) and still count as equal.
GRID_ATOL = 1e-3


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
    array = np.concatenate([np.asarray(c.array, dtype=np.float32) for c in channels], axis=0)
    return Volume(array=array, geometry=first.geometry, kind="image", source=first.source, meta=dict(first.meta))


class LoadVolumed(MapTransform):
    """Load ``image`` (list of channels) and optional ``label`` as MetaTensors in RAS.

    Values may be paths (files or DICOM folders) or already-loaded :class:`Volume` s.
    The label must lie on the image grid (within 1e-3 mm); a mismatch is an error.
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
            label = raw if isinstance(raw, Volume) else load_volume(raw, kind="label")
            image.geometry.require_same(
                label.geometry, atol=GRID_ATOL, what=f"image {image.source} and label {label.source}"
            )
            if label.channels != 1:
                raise GeometryError(f"{label.source}: label must have one channel, has {label.channels}")
            d[self.label_key] = label.to_metatensor()
        return d


def _channel_transform(norm: ChannelNorm) -> Any:
    if norm.scheme == "ct":
        assert norm.clip is not None and norm.mean is not None and norm.std is not None
        lo, hi = norm.clip
        # Clip to [lo, hi] then z-score with dataset statistics, as one linear map.
        return ScaleIntensityRange(
            a_min=lo, a_max=hi, b_min=(lo - norm.mean) / norm.std, b_max=(hi - norm.mean) / norm.std, clip=True
        )
    return NormalizeIntensity(nonzero=False)


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation as the plan says (CT window+z-score, or z-score)."""

    def __init__(self, keys: str, channels: Sequence[ChannelNorm]) -> None:
        super().__init__(keys)
        self.transforms = [_channel_transform(c) for c in channels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise each channel of the ``(C, X, Y, Z)`` image with its own scheme."""
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.transforms):
                raise GeometryError(f"expected {len(self.transforms)} channels, got {img.shape[0]}")
            parts = [t(img[c : c + 1].float()) for c, t in enumerate(self.transforms)]
            out = torch.cat([torch.as_tensor(p) for p in parts], dim=0)
            d[key] = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return d


def preprocess_transforms(plan: Plan, *, with_label: bool) -> Compose:
    """Deterministic part: load -> orientation -> spacing -> normalisation.

    Output ``image`` is a float32 MetaTensor ``(C, X', Y', Z')`` on the plan's grid;
    ``label`` (if present) a ``(1, X', Y', Z')`` MetaTensor resampled with nearest neighbour.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    return Compose(
        [
            LoadVolumed("image", "label" if with_label else None),
            Orientationd(keys=keys, axcodes=plan.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=plan.target_spacing, mode=modes),
            NormalizeChannelsd("image", plan.channels),
            EnsureTyped(keys="image", dtype=torch.float32),
        ]
    )


def train_transforms(plan: Plan, train: TrainConfig) -> Compose:
    """Preprocessing plus foreground-oversampled patch sampling and augmentation.

    Yields ``train.samples_per_volume`` patches of ``plan.patch_size`` per volume.
    """
    keys = ["image", "label"]
    pos = train.foreground_ratio
    steps: list[Any] = [
        *preprocess_transforms(plan, with_label=True).transforms,
        EnsureTyped(keys="label", dtype=torch.uint8),
        SpatialPadd(keys=keys, spatial_size=plan.patch_size),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=plan.patch_size,
            pos=pos,
            neg=1.0 - pos,
            num_samples=train.samples_per_volume,
        ),
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
        ]
    steps.append(EnsureTyped(keys=keys, dtype=(torch.float32, torch.long), track_meta=False))
    return Compose(steps)
