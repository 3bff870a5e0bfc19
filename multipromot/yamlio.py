"""The bounded YAML reader and the key checks every YAML schema of ours uses.

Configs, mixtures, suites and catalogue files are user input: they are read with
``yaml.SafeLoader`` (no Python objects), files over :data:`MAX_FILE_BYTES` are refused, and so is
a document whose aliases (``*ref``) would expand to more than :data:`MAX_EXPANDED_NODES` nodes (a
"billion laughs" alias bomb) or refer to themselves. Duplicate keys in one mapping are errors
rather than "last one wins".
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from multipromot.errors import UserError

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_EXPANDED_NODES",
    "read_yaml",
    "check_keys",
    "unknown_key",
    "sub_key",
]

MAX_FILE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 100_000


# --------------------------------------------------------------------------------------------
# Safe, bounded YAML


def _yaml_error(file: Path, err: yaml.YAMLError) -> UserError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    message = f"{context}: {problem}" if context else problem
    key = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else None
    return UserError(f"invalid YAML: {message}", file=file, key=key)


def _node_key(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _check_nodes(root: yaml.Node, file: Path) -> None:
    """Refuse alias bombs, self-referencing aliases and duplicate mapping keys."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    total = 0

    def size(node: yaml.Node) -> int:
        nonlocal total
        if id(node) in sizes:  # an alias to an already measured node: counts again, expanded
            total += sizes[id(node)]
            if total > MAX_EXPANDED_NODES:
                raise UserError(
                    f"aliases expand to more than {MAX_EXPANDED_NODES} nodes",
                    file=file,
                    key=_node_key(node),
                )
            return sizes[id(node)]
        if id(node) in active:
            raise UserError("an alias refers to itself", file=file, key=_node_key(node))
        active.add(id(node))
        before = total
        total += 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                size(child)
        elif isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise UserError(
                            f"duplicate key {key_node.value!r}", file=file, key=_node_key(key_node)
                        )
                    seen.add(key_node.value)
                size(key_node)
                size(value_node)
        if total > MAX_EXPANDED_NODES:
            raise UserError(
                f"the document expands to more than {MAX_EXPANDED_NODES} nodes",
                file=file,
                key=_node_key(node),
            )
        active.discard(id(node))
        sizes[id(node)] = total - before
        return sizes[id(node)]

    size(root)


def read_yaml(path: str | os.PathLike) -> Any:
    """Read one YAML document safely (SafeLoader, size and alias-expansion bounds).

    Args:
        path: the file.

    Returns:
        The document (None for an empty file).

    Raises:
        UserError: missing or unreadable file, too large, not UTF-8, bad syntax (with line and
            column), alias bomb, self-referencing alias, duplicate key.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(
                f"file is {size} bytes; multipromot reads YAML files of at most 1 MiB", file=file
            )
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("no such file", file=file) from None
    except IsADirectoryError:
        raise UserError("is a directory, not a YAML file", file=file) from None
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=file) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", file=file) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, file)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(file, e) from None
    except RecursionError:
        raise UserError("the YAML document is nested too deeply", file=file) from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# Validation helpers


def unknown_key(file: str | os.PathLike, where: str, key: Any, allowed: Sequence[str]) -> UserError:
    """The error for an unknown key, with the closest allowed key as a hint."""
    near = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; allowed: {', '.join(allowed)}"
    return UserError(f"unknown key {key!r}{hint}", file=file, key=where or None)


def sub_key(key: str | None, child: str) -> str:
    """The dotted key of ``child`` inside ``key`` (just ``child`` at the top level), as errors
    name it: ``sub_key("tasks[2]", "source")`` is ``tasks[2].source``."""
    return f"{key}.{child}" if key else child


def check_keys(
    file: str | os.PathLike | None,
    where: str | None,
    mapping: Mapping,
    allowed: Sequence[str],
    *,
    what: str | None = None,
) -> None:
    """Raise a UserError naming ``file`` and the dotted key of the first key not in ``allowed``.

    Args:
        file: the file the mapping came from.
        where: the mapping's own key in that file ("" or None at the top level).
        mapping: the mapping to check.
        allowed: the keys it may have.
        what: what the mapping is (``"a files source"``): the message then says ``unknown key
            'K' in a files source (allowed: ...)``, listing ``allowed`` in the given order,
            rather than guessing the closest key.
    """
    for key in mapping:
        if key not in allowed:
            loc = sub_key(where, str(key))
            if what is not None:
                raise UserError(
                    f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})",
                    file=file,
                    key=loc,
                )
            raise unknown_key(file, loc, key, allowed)
