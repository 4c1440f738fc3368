"""medseg: 3D medical image segmentation with exact geometry, from DICOM to report."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from medseg._lazy import lazy_attributes
from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.io import Geometry, Volume, load_volume, write_volume

try:
    __version__ = version("medseg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["Geometry", "MedsegError", "Volume", "__version__", "load_volume", "write_volume"]

# Imported on first use, so that `medseg --help` does not load nibabel, SimpleITK and pydicom.
if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name stays an error
    __getattr__ = lazy_attributes(
        __name__,
        {
            "Geometry": "medseg.io.volume",
            "Volume": "medseg.io.volume",
            "load_volume": "medseg.io",
            "write_volume": "medseg.io",
        },
    )
