"""Shared type aliases."""

from __future__ import annotations

import os
from typing import Literal, Union

PathLike = Union[str, "os.PathLike[str]"]
Spacing = tuple[float, float, float]
Shape3D = tuple[int, int, int]
VolumeKind = Literal["image", "label"]

# Rasterisation vocabularies of medseg.io.polygons, here so the `medseg convert` parser needs no numpy.
PixelRule = Literal["centre", "opencv"]
OverlapPolicy = Literal["smaller", "later", "error", "separate"]
PIXEL_RULES: tuple[str, ...] = ("centre", "opencv")
#: ``smaller``: the structure with fewer voxels wins where structures overlap; ``later``: the one
#: listed later wins; ``error``: overlaps are refused; ``separate``: one binary channel each.
OVERLAP_POLICIES: tuple[str, ...] = ("smaller", "later", "error", "separate")

__all__ = [
    "OVERLAP_POLICIES",
    "PIXEL_RULES",
    "OverlapPolicy",
    "PathLike",
    "PixelRule",
    "Shape3D",
    "Spacing",
    "VolumeKind",
]
