"""Every user-facing failure of medseg is a :class:`MedsegError`.

The message always names the file (or series) and the reason, so the command line
can print it without a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "ConfigError",
    "DatasetError",
    "ExportError",
    "GeometryError",
    "InputError",
    "MedsegError",
    "ModelError",
    "OutputExistsError",
    "reraise_medseg",
    "run_reporting_errors",
]


class MedsegError(Exception):
    """Base class of all errors medseg reports to users."""


class InputError(MedsegError):
    """An input file or folder cannot be read or is not what was expected."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class GeometryError(MedsegError):
    """Two volumes that must share a voxel grid do not, or a grid is invalid."""


class ConfigError(MedsegError):
    """A YAML configuration or plan is invalid; the message names the bad key."""


class DatasetError(MedsegError):
    """A dataset folder is inconsistent (missing labels, unknown layout, ...)."""


class ModelError(MedsegError):
    """A model directory is missing a file or does not fit the input."""


class ExportError(MedsegError):
    """A derived DICOM object (SEG, RTSTRUCT, ...) could not be written for a series.

    The message names the series (patient, study, series number and description) and the
    reason, never a temporary output path, so a caller writing several outputs per series can
    record which one failed and keep the others.
    """

    def __init__(self, series: str, output: str, reason: str) -> None:
        self.series = series
        self.output = output
        self.reason = reason
        super().__init__(f"{series}: {output} not written: {reason}")


class OutputExistsError(MedsegError):
    """Refusing to overwrite an existing output without ``overwrite=True``."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: output exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def reraise_medseg() -> Iterator[None]:
    """Re-raise a :class:`MedsegError` that a library wrapped.

    MONAI wraps transform errors in ``RuntimeError("applying transform ...")``; users
    should see our message (file and reason), not the wrapper.
    """
    try:
        yield
    except MedsegError:
        raise
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, MedsegError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def run_reporting_errors(handler: Callable[[], int], *, command: str, debug: bool = False) -> int:
    """Run a command-line handler, turning user-facing failures into one line and an exit code.

    Args:
        handler: The subcommand; returns its exit code.
        command: Name shown in the message (``"medseg predict"``).
        debug: Re-raise :class:`MedsegError` (traceback) instead of printing it.

    Returns:
        The handler's exit code; 2 after a :class:`MedsegError`, 130 after Ctrl-C.
    """
    try:
        return int(handler())
    except MedsegError as exc:
        if debug:
            raise
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
