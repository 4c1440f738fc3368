"""Inputs are read-only: every command checks its output locations against its inputs first.

One rule for every command that writes (``predict``, ``convert``, ``evaluate``, ``batch``,
``pacs``, ``plan``, ``train``, ``demo``) and for :func:`medseg.io.write_volume`: an output path
that **is**, **contains** or **lies inside** an input is refused before any work, with or
without ``--overwrite``.  Paths are compared after resolving symlinks (``os.path.realpath``), and
existing paths also by device and inode, so a symlinked or bind-mounted alias of an input is
caught too.

:func:`check_output_dir` / :func:`check_output_file` check that an output location can be
written (not a file where a folder is needed, no file in the way of the folders to create,
writable) before inference starts, so a run never computes for minutes and then fails on its
output.  :func:`require_readable_file` turns FIFOs, devices and sockets into "not a regular file"
instead of a hang or a misleading "permission denied".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from medseg.errors import InputError, OutputPathError
from medseg.types import PathLike

__all__ = [
    "check_output_dir",
    "check_output_file",
    "overlap",
    "refuse_input_overlap",
    "require_input",
    "require_readable_file",
]


def _real(path: PathLike) -> Path:
    """The absolute path with every symlink resolved (non-existing tails are kept as given)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same_existing(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def overlap(output: PathLike, input_path: PathLike) -> str | None:
    """How ``output`` overlaps ``input_path``: ``"is"``, ``"lies inside"``, ``"contains"`` or ``None``."""
    out, inp = _real(output), _real(input_path)
    if out == inp or _same_existing(out, inp):
        return "is"
    if out.is_relative_to(inp):
        return "lies inside"
    if inp.is_relative_to(out):
        return "contains"
    return None


def refuse_input_overlap(
    outputs: Iterable[PathLike | None], inputs: Iterable[PathLike | None], *, what: str = "output"
) -> None:
    """Refuse outputs that are, contain or lie inside an input (``None`` entries are ignored).

    Args:
        outputs: Output files or folders (they need not exist yet).
        inputs: Input files or folders (model folders, configs and rules files are inputs too).
        what: How to call the output in the message (``"output folder"``, ``"plan file"``, ...).

    Raises:
        OutputPathError: The first conflict found; the message names both paths.
    """
    input_list = [Path(p) for p in inputs if p is not None and str(p) != ""]
    for output in outputs:
        if output is None or str(output) == "":
            continue
        found = [(relation, p) for p in input_list if (relation := overlap(output, p)) is not None]
        if found:
            relation, input_path = min(found, key=lambda item: _RELATION_ORDER.index(item[0]))
            kind = " folder" if input_path.is_dir() else " file" if input_path.exists() else ""
            reason = f"{what} {relation} the input{kind} {input_path}; inputs are never written, choose another {what}"
            raise OutputPathError(Path(output), reason)


_RELATION_ORDER = ("is", "lies inside", "contains")


def _nearest_existing(path: Path) -> Path:
    current = path
    while not os.path.lexists(current):
        if current.parent == current:
            break
        current = current.parent
    return current


def _check_creatable(path: Path, what: str) -> None:
    """The folders up to ``path`` can be created: no file in the way, the existing ancestor writable."""
    parent = _nearest_existing(path.parent if path.parent != path else path)
    if not parent.is_dir():
        raise OutputPathError(path, f"cannot create the {what}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(path, f"cannot create the {what}: {parent} is not writable (permission denied)")


def check_output_dir(path: PathLike, *, what: str = "output folder") -> Path:
    """Check that ``path`` is (or can be created as) a writable folder; nothing is created.

    Raises:
        OutputPathError: ``path`` is a file, a file is in the way, or the location is not writable.
    """
    p = Path(path)
    if os.path.lexists(p) and not p.exists():
        raise OutputPathError(p, f"{what} is a broken symlink")
    if p.exists():
        if not p.is_dir():
            raise OutputPathError(p, f"{what} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(p, f"{what} is not writable (permission denied)")
        return p
    _check_creatable(p, what)
    return p


def check_output_file(path: PathLike, *, what: str = "output file") -> Path:
    """Check that the file ``path`` can be written (its folder exists or can be created, and is writable).

    Raises:
        OutputPathError: ``path`` is a folder or a special file, a file is in the way of its folder,
            or the folder is not writable.
    """
    p = Path(path)
    if p.exists():
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            raise OutputPathError(p, f"{what} is a folder")
        if not stat.S_ISREG(mode):
            raise OutputPathError(p, f"{what} exists and is not a regular file")
    parent = p.parent
    if parent.exists():
        if not parent.is_dir():
            raise OutputPathError(p, f"cannot create the {what}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputPathError(p, f"cannot write the {what}: {parent} is not writable (permission denied)")
        return p
    _check_creatable(p, what)
    return p


def require_readable_file(path: PathLike, *, what: str = "file") -> Path:
    """``path`` as a :class:`Path` if it is a readable regular file.

    FIFOs, devices and sockets are refused without opening them (reading a FIFO blocks, a device
    never ends).

    Raises:
        InputError: Missing, a folder, a special file, or not readable.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        reason = "broken symlink" if os.path.lexists(p) else f"no such {what}"
        raise InputError(p, reason) from None
    except OSError as exc:  # ELOOP (symlink loop), ENAMETOOLONG, EACCES on a parent ...
        raise InputError(p, f"cannot access the {what} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(p, f"is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise InputError(p, f"not a regular file ({_special_kind(mode)}); refusing to read it")
    if not os.access(p, os.R_OK):
        raise InputError(p, "permission denied")
    return p


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def require_input(path: PathLike, *, what: str = "file or folder") -> Path:
    """``path`` as a :class:`Path` if it is a readable folder or a readable regular file.

    Raises:
        InputError: Missing (or a broken symlink / symlink loop), a FIFO/device/socket, or not readable.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise InputError(p, "broken symlink" if os.path.lexists(p) else f"no such {what}") from None
    except OSError as exc:
        raise InputError(p, f"cannot access the {what} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        if not os.access(p, os.R_OK | os.X_OK):
            raise InputError(p, "permission denied")
        return p
    return require_readable_file(p)
