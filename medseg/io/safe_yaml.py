"""The one YAML loader: safe tags only, bounded size, bounded alias expansion, clear errors.

Every YAML medseg reads (configs, plans, dataset descriptions, batch rules, PACS profiles and
filters, evaluation regions) goes through :func:`load_yaml_file` / :func:`load_yaml_text`:

* ``yaml.SafeLoader`` tags only (no Python objects);
* at most :attr:`~medseg.io.limits.ReadLimits.max_yaml_bytes` bytes, decoded as UTF-8 (a binary file is
  "not a text file", not a ``UnicodeDecodeError``);
* the document is *composed* first and its size after expanding aliases is counted on the node graph
  (shared nodes counted once per reference, without expanding anything): a "billion laughs" document
  of a few hundred bytes that would expand to billions of nodes is refused in microseconds, as are
  recursive aliases and nesting deeper than :attr:`~medseg.io.limits.ReadLimits.max_yaml_depth`.
  Ordinary anchors and merge keys (``<<: *defaults``) keep working.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from medseg.errors import ConfigError, MedsegError
from medseg.io.limits import format_bytes, get_read_limits
from medseg.io.paths import require_readable_file
from medseg.types import PathLike

__all__ = ["load_json_file", "load_json_text", "load_yaml_file", "load_yaml_text"]


class _Loader(yaml.SafeLoader):
    """SafeLoader (a new class so nothing registered on it leaks into PyYAML's global one)."""


def _expanded_size(root: Node, *, limit: int, max_depth: int, source: str) -> int:
    """Nodes of ``root`` once every alias is expanded, computed on the graph (memoised per node)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source}: recursive YAML alias (a node contains itself)")
        if depth > max_depth:
            raise ConfigError(f"{source}: YAML nested deeper than {max_depth} levels")
        if isinstance(node, ScalarNode):
            sizes[key] = 1
            return 1
        active.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            children: list[Node] = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:  # pragma: no cover - PyYAML has no other node kinds
            children = []
        for child in children:
            total += visit(child, depth + 1)
            if total > limit:
                raise ConfigError(
                    f"{source}: YAML document expands to more than {limit} nodes (aliases multiplying a few bytes "
                    "into a huge document are refused)"
                )
        active.discard(key)
        sizes[key] = total
        return total

    return visit(root, 0)


_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def _check_flow_depth(text: str, limit: int, source: str) -> None:
    """Refuse deeply nested flow collections before parsing (PyYAML's scanner is quadratic in their depth).

    Every bracket counts, also those inside quoted strings and comments: an over-estimate, so nothing
    deeper than the limit can hide from this check.
    """
    depth = 0
    for char in _NOT_BRACKETS.sub("", text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        if depth > limit:
            raise ConfigError(f"{source}: YAML nested deeper than {limit} levels")


def load_yaml_text(text: str, *, source: str = "<yaml>") -> Any:
    """Parse YAML text safely (see the module docstring); ``None`` for an empty document.

    Raises:
        ConfigError: Invalid YAML, several documents, or a document beyond the limits; names ``source``.
    """
    limits = get_read_limits()
    if len(text) > limits.max_yaml_bytes:
        raise ConfigError(f"{source}: YAML text of {len(text)} characters exceeds the {limits.max_yaml_bytes} limit")
    _check_flow_depth(text, limits.max_yaml_depth, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, limit=limits.max_yaml_nodes, max_depth=limits.max_yaml_depth, source=source)
        return loader.construct_document(node)
    except MedsegError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an unhashable mapping key
        raise ConfigError(f"{source}: invalid YAML ({type(exc).__name__}: {exc})") from None
    finally:
        loader.dispose()


def _read_text(p: Path, what: str) -> str:
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"{p}: no such file")
    try:
        require_readable_file(p, what=what)
    except MedsegError as exc:
        raise ConfigError(str(exc)) from None
    limit = get_read_limits().max_yaml_bytes
    try:
        size = p.stat().st_size
        if size > limit:
            raise ConfigError(f"{p}: {format_bytes(size)} is too large for a {what} (limit {format_bytes(limit)})")
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a text file (invalid UTF-8 at byte {exc.start}); expected a {what}") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (contains NUL bytes); expected a {what}")
    return text


def load_json_text(text: str | bytes, *, source: str = "<json>", what: str = "JSON document") -> Any:
    """Parse JSON text with the YAML limits (:attr:`~medseg.io.limits.ReadLimits.max_yaml_bytes`, UTF-8, depth).

    For JSON that comes from inside another file (e.g. the metadata of an exported model).

    Raises:
        ConfigError: Too large, not UTF-8 text, nested too deeply or invalid JSON; names ``source``.
    """
    import json

    limits = get_read_limits()
    if len(text) > limits.max_yaml_bytes:
        raise ConfigError(
            f"{source}: {what} of {format_bytes(len(text))} exceeds the {format_bytes(limits.max_yaml_bytes)} limit"
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: {what} is not UTF-8 text (invalid byte at {exc.start})") from None
    _check_flow_depth(text, limits.max_yaml_depth, source)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: invalid JSON in the {what} ({' '.join(str(exc).split())})") from None


def load_json_file(path: PathLike, *, what: str = "JSON file") -> Any:
    """Read a JSON file with the same checks as YAML files (regular file, size limit, UTF-8 text).

    Raises:
        ConfigError: Missing, not a regular file, too large, not text, or invalid JSON; names the file.
    """
    import json

    p = Path(path)
    text = _read_text(p, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{p}: invalid JSON ({' '.join(str(exc).split())})") from None


def load_yaml_file(path: PathLike, *, what: str = "YAML file") -> Any:
    """Read and parse a YAML file safely; errors name the file.

    Raises:
        ConfigError: Missing, not a regular file, too large, not UTF-8 text, or invalid / oversized YAML.
    """
    p = Path(path)
    return load_yaml_text(_read_text(p, what), source=str(p))
