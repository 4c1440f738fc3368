"""Shared type aliases."""

from __future__ import annotations

import os
from typing import Literal, Union

PathLike = Union[str, "os.PathLike[str]"]
Spacing = tuple[float, float, float]
Shape3D = tuple[int, int, int]
VolumeKind = Literal["image", "label"]

__all__ = ["PathLike", "Shape3D", "Spacing", "VolumeKind"]
