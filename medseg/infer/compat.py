"""Does an input series fit a model?  Checked before anything is predicted.

A model says what it expects per input channel as a :class:`ChannelSpec` (name, DICOM modality,
normalisation scheme); :func:`channel_specs` builds them from a medseg plan (another model
format only has to produce the same list).  Two checks use them:

* :func:`check_header` - from DICOM headers alone (discovery time): the number of channels (a
  DICOM series is one channel) and the modality: a channel normalised with the ``ct`` scheme or
  named like a CT/MR/PET contrast expects that modality (``CT``; ``MR`` for ``T1``, ``T2``,
  ``FLAIR``, ``DWI``, ``ADC``, ...; ``PT`` for ``PET``/``SUV``).  A channel whose modality is not
  recognisable from its name (``image``, ``channel0``) accepts any modality.
* :func:`check_intensities` - on the loaded voxels: a volume with at most two distinct values is a
  mask or a blank image, not an image to segment; a CT channel must hold Hounsfield units: at least
  :data:`CT_MIN_FRACTION` of the voxels (the padding value outside the reconstruction circle
  excluded) within :data:`CT_RANGE_HU`.  This catches series stored without their rescale, and
  derived or secondary-capture images labelled CT.

Both return ``None`` when the input fits, else a one-line reason without patient data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CT_MIN_FRACTION",
    "CT_RANGE_HU",
    "ChannelSpec",
    "channel_specs",
    "check_header",
    "check_intensities",
    "expected_modality",
]

#: Plausible rescaled CT values (air -1000, dense bone / contrast up to ~3000, some metal).
CT_RANGE_HU = (-1100.0, 4000.0)
#: Fraction of the (non-padding) voxels a CT series must have within :data:`CT_RANGE_HU`.
CT_MIN_FRACTION = 0.95

_MR_NAMES = re.compile(
    r"^(mr|mri|t1|t2|t1w|t2w|t1c|t1ce|t1gd|t1post|t1pre|t2star|flair|pd|pdw|dwi|adc|swi|dce|bold|epi|"
    r"tof|mra|stir|gre|tse|mprage|spgr|hbv|b\d+)"
)
_CT_NAMES = re.compile(r"^(ct|cta|ncct|cect|hu)(\b|_|$)")
_PET_NAMES = re.compile(r"^(pet|pt|suv)(\b|_|$)")


@dataclass(frozen=True)
class ChannelSpec:
    """What a model expects of one input channel.

    Attributes:
        name: Channel name (``CT``, ``T1``, ``FLAIR``, ...).
        modality: DICOM Modality it expects (``CT``, ``MR``, ``PT``), ``None`` if any.
        scheme: Normalisation scheme (``ct``, ``zscore``, ``none``), if known.
    """

    name: str
    modality: str | None = None
    scheme: str | None = None

    def describe(self) -> str:
        """``'CT' (CT)`` - name and expected modality, for messages."""
        return f"'{self.name}'" + (f" ({self.modality})" if self.modality else "")


def expected_modality(name: str, scheme: str | None = None) -> str | None:
    """The DICOM modality a channel named ``name`` with normalisation ``scheme`` expects (``None``: any)."""
    if scheme == "ct":
        return "CT"
    key = re.sub(r"[\s\-]+", "", name.strip().lower())
    if _CT_NAMES.match(key):
        return "CT"
    if _PET_NAMES.match(key):
        return "PT"
    if _MR_NAMES.match(key):
        return "MR"
    return None


def channel_specs(plan: Any) -> list[ChannelSpec]:
    """Channel specs of a medseg :class:`~medseg.data.plan.Plan` (``plan.channels``: name + scheme)."""
    return [
        ChannelSpec(name=str(c.name), modality=expected_modality(str(c.name), str(c.scheme)), scheme=str(c.scheme))
        for c in plan.channels
    ]


def check_header(
    specs: Sequence[ChannelSpec], *, modality: str | None, channels: int = 1, volumes: int = 1
) -> str | None:
    """Header-level fit of a series to a model.

    Args:
        specs: The model's channels.
        modality: The series' DICOM Modality.
        channels: Channels the series provides (a DICOM series: 1).
        volumes: 3D volumes in the series (> 1: a 4D series - time points, diffusion directions,
            echoes -, which is never mapped onto model channels implicitly).

    Returns:
        ``None`` if it fits, else the reason.
    """
    if volumes > 1:
        return (
            f"a 4D series ({volumes} volumes: time points, diffusion directions or echoes); the model takes one 3D"
            f" volume per channel ({', '.join(s.name for s in specs)})"
        )
    if len(specs) != channels:
        names = ", ".join(s.name for s in specs)
        return f"the model needs {len(specs)} input channel(s) ({names}); a series provides {channels}" + (
            " - use medseg predict with one file per channel" if len(specs) > channels else ""
        )
    for spec in specs:
        if spec.modality and (modality or "").upper() != spec.modality:
            return f"modality {modality or 'unknown'} does not fit the model's channel {spec.describe()}"
    return None


def _sample(array: np.ndarray, limit: int = 1 << 20) -> np.ndarray:
    """A strided subsample of at most about ``limit`` voxels (float64)."""
    step = max(1, round((array.size / limit) ** (1 / 3))) if array.size > limit else 1
    return np.asarray(array[::step, ::step, ::step], dtype=np.float64)


def check_intensities(specs: Sequence[ChannelSpec], volume: Any) -> str | None:
    """Voxel-level fit: not a mask, and CT channels in Hounsfield units.

    Args:
        specs: The model's channels.
        volume: A :class:`~medseg.io.volume.Volume` ``(C, X, Y, Z)`` (C = len(specs); extra channels ignored).

    Returns:
        ``None`` if it fits, else the reason.
    """
    array = np.asarray(volume.array)
    for index, spec in enumerate(specs[: array.shape[0]]):
        sample = _sample(array[index])
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            return f"channel {spec.describe()}: no finite voxel values"
        distinct = np.unique(finite)
        if distinct.size <= 2:
            values = ", ".join(f"{v:g}" for v in distinct)
            return f"channel {spec.describe()}: only the values {{{values}}} - a mask or a blank image, not a scan"
        if spec.modality == "CT":
            low, high = CT_RANGE_HU
            lowest = float(finite.min())
            body = finite[finite > lowest] if lowest < low else finite  # padding outside the field of view
            inside = float(np.mean((body >= low) & (body <= high))) if body.size else 0.0
            if inside < CT_MIN_FRACTION:
                lo, hi = (float(v) for v in np.percentile(body if body.size else finite, [1, 99]))
                return (
                    f"channel {spec.describe()}: only {inside:.0%} of the voxels in [{low:g}, {high:g}] HU (1st-99th"
                    f" percentile {lo:g} to {hi:g}) - not rescaled CT values"
                )
    return None
