"""medseg: 3D medical image segmentation with exact geometry, from DICOM to report."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from medseg.errors import MedsegError
from medseg.io import Geometry, Volume, load_volume, write_volume

try:
    __version__ = version("medseg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["Geometry", "MedsegError", "Volume", "__version__", "load_volume", "write_volume"]
