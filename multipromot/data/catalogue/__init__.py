"""The task catalogue: every ``*.yaml`` file in this directory, plus registered files.

A catalogue file is a mapping with a ``tasks:`` list; each entry is an inline task exactly as in
a mixture YAML (``name``, ``source``, ``template``, ``metric``, optional ``postprocess``,
``splits``, ``description``). ``paper.yaml`` holds the paper's tasks; a package that brings its
own tasks adds its file with :func:`register_catalogue_file` (the lab does). This module only
reads and indexes the files: :mod:`multipromot.data.tasks` turns entries into Tasks and
:mod:`multipromot.data.templates` looks up a catalogue template by task name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from multipromot.errors import UserError
from multipromot.registry import Registry

__all__ = [
    "CatalogueEntry",
    "catalogue_dir",
    "catalogue_files",
    "register_catalogue_file",
    "CATALOGUE_FILES",
    "read_catalogue",
    "catalogue_index",
]

_TOP_LEVEL_KEYS = {"tasks", "description"}


@dataclass(frozen=True)
class CatalogueEntry:
    """One task entry of a catalogue file.

    Attributes:
        name: the task name.
        spec: the entry as written (a mapping).
        file: the catalogue file it came from.
        key: its place in that file, e.g. ``tasks[3]``.
    """

    name: str
    spec: dict[str, Any]
    file: Path
    key: str


def catalogue_dir() -> Path:
    """The directory that holds the catalogue YAML files.

    Returns:
        The directory of this package.
    """
    return Path(__file__).resolve().parent


# Catalogue files registered by other packages, by resolved path (in registration order).
CATALOGUE_FILES: Registry[Path] = Registry("catalogue file")


def register_catalogue_file(path: str | os.PathLike) -> None:
    """Add a catalogue file of another package to the catalogue (idempotent)."""
    path = Path(path).resolve()
    CATALOGUE_FILES.register(str(path), path)


def catalogue_files() -> list[Path]:
    """Every catalogue file: this directory's, sorted by name, then the registered ones.

    Returns:
        The ``*.yaml`` files of :func:`catalogue_dir` and of :func:`register_catalogue_file`.
    """
    return sorted(catalogue_dir().glob("*.yaml")) + CATALOGUE_FILES.values()


def read_catalogue(path: str | os.PathLike) -> list[CatalogueEntry]:
    """Read one catalogue file and check its outer shape (entries are checked by their users).

    Args:
        path: a catalogue YAML file.

    Returns:
        Its entries, in file order.

    Raises:
        UserError: unreadable YAML, no ``tasks`` list, an entry that is not a mapping or has no
            string ``name``.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read catalogue: {exc}", file=path) from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise UserError("a catalogue file must be a mapping with a 'tasks' list", file=path)
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(
            f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_LEVEL_KEYS))})",
            file=path,
            key=unknown[0],
        )
    entries = []
    for i, spec in enumerate(data["tasks"]):
        key = f"tasks[{i}]"
        if not isinstance(spec, dict):
            raise UserError("a catalogue entry must be a mapping", file=path, key=key)
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise UserError("a catalogue entry needs a string 'name'", file=path, key=f"{key}.name")
        entries.append(CatalogueEntry(name=name, spec=spec, file=path, key=key))
    return entries


# Re-read only when a file is added, removed or changed (tests and notebooks edit catalogues).
_INDEX_CACHE: dict[tuple, dict[str, CatalogueEntry]] = {}


def catalogue_index() -> dict[str, CatalogueEntry]:
    """All catalogue entries by task name.

    Returns:
        ``{task name: CatalogueEntry}`` over every catalogue file.

    Raises:
        UserError: a bad catalogue file, or one task name defined twice (names both places).
    """
    files = catalogue_files()
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    cached = _INDEX_CACHE.get(stamp)
    if cached is not None:
        return cached
    index: dict[str, CatalogueEntry] = {}
    for path in files:
        for entry in read_catalogue(path):
            first = index.get(entry.name)
            if first is not None:
                raise UserError(
                    f"task {entry.name!r} is defined twice (first in {first.file.name} "
                    f"{first.key})",
                    file=entry.file,
                    key=entry.key,
                )
            index[entry.name] = entry
    _INDEX_CACHE.clear()
    _INDEX_CACHE[stamp] = index
    return index
