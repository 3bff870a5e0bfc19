"""Dataset mirrors: hub datasets as local folders, for clusters whose compute nodes are offline.

A mirror is a folder of dataset repository snapshots, ``<mirror>/<org>/<name>/``, each in the
layout a hub dataset repository has: a ``README.md`` whose YAML front matter lists the configs
and their data files, and parquet files per config and split::

    <mirror>/aps/super_glue/README.md          ---\\n configs:\\n - config_name: rte ...
    <mirror>/aps/super_glue/rte/train-00000-of-00001.parquet

``datasets.load_dataset(<folder>, <config>)`` reads such a folder offline (STACK.md), so a
:class:`~multipromot.data.sources.HubSource` whose id has a folder in the mirror loads from
there, and from the hub (or its cache) otherwise. The mirror comes from the run config's
``data.mirror`` or, for a whole cluster, the ``MULTIPROMOT_DATA_MIRROR`` environment variable
(the config wins). :func:`write_snapshot` writes the layout (``multipromot data pull``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from multipromot.errors import UserError
from multipromot.fsio import temp_dir_for, write_atomic

__all__ = [
    "ENV_VAR",
    "DEFAULT_CONFIG",
    "set_mirror",
    "current_mirror",
    "snapshot_dir",
    "find_snapshot",
    "snapshot_configs",
    "snapshot_files",
    "write_snapshot",
]

ENV_VAR = "MULTIPROMOT_DATA_MIRROR"
# The config name datasets gives a repository without named configs.
DEFAULT_CONFIG = "default"
README = "README.md"

_configured: str | None = None


def set_mirror(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the mirror for this process (None: fall back to the environment)."""
    global _configured
    _configured = os.fspath(path) if path else None


def current_mirror() -> Path | None:
    """The mirror in force: :func:`set_mirror`'s, else ``$MULTIPROMOT_DATA_MIRROR``, else None."""
    value = _configured or os.environ.get(ENV_VAR) or None
    return Path(value) if value else None


def snapshot_dir(mirror: str | os.PathLike, hub_id: str) -> Path:
    """Where the snapshot of ``hub_id`` (``org/name``) lives in ``mirror``.

    Raises:
        UserError: the id is not a plain ``org/name`` (or ``name``) path.
    """
    parts = hub_id.split("/")
    if not all(p and p not in (".", "..") for p in parts) or len(parts) > 2:
        raise UserError(f"not a hub dataset id: {hub_id!r}", key="hub")
    return Path(mirror, *parts)


def find_snapshot(hub_id: str, mirror: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder of ``hub_id`` in the mirror in force (or ``mirror``), if it has one."""
    root = Path(mirror) if mirror is not None else current_mirror()
    parts = hub_id.split("/")
    if root is None or len(parts) > 2 or not all(p and p not in (".", "..") for p in parts):
        return None  # no mirror, or a local path rather than a hub id
    folder = snapshot_dir(root, hub_id)
    return folder if (folder / README).is_file() else None


def snapshot_configs(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``configs`` list of a snapshot's README front matter ([] if it has none).

    Raises:
        UserError: the README's front matter is not valid YAML.
    """
    path = Path(folder) / README
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return []
    head = text[4:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(head) or {}
    except yaml.YAMLError as e:
        raise UserError(f"front matter is not valid YAML ({e})", file=path) from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return list(configs) if isinstance(configs, list) else []


def snapshot_files(folder: str | os.PathLike, config: str | None) -> dict[str, list[Path]]:
    """Split -> parquet files of one config of a snapshot, as absolute paths.

    Read from the README's ``configs`` block. The files are then loaded with the ``parquet``
    builder by path: loading the folder itself lets ``datasets`` reuse a cache entry made for
    another folder with the same layout (seen with datasets 5.2: a second mirror returned the
    first one's rows), while a cache keyed on the files' own paths and times does not.

    Raises:
        UserError: the snapshot has no such config (naming the ones it has).
    """
    folder = Path(folder)
    name = config or DEFAULT_CONFIG
    configs = {str(c.get("config_name")): c for c in snapshot_configs(folder)}
    if name not in configs:
        have = ", ".join(sorted(configs)) or "none"
        raise UserError(f"no config {name!r} in the mirror (it has: {have})", file=folder)
    files: dict[str, list[Path]] = {}
    for item in configs[name].get("data_files") or []:
        paths = item.get("path")
        for path in [paths] if isinstance(paths, str) else list(paths or []):
            files.setdefault(str(item.get("split")), []).append(folder / path)
    return files


def write_snapshot(
    mirror: str | os.PathLike,
    hub_id: str,
    config: str | None,
    splits: Mapping[str, Any],
) -> Path:
    """Write ``splits`` (split name -> ``datasets.Dataset``) as config ``config`` of ``hub_id``'s
    snapshot in ``mirror``, next to the configs already there.

    Each split becomes ``<config>/<split>-00000-of-00001.parquet`` (written to a temporary folder
    and moved into place, so a kill leaves the old files or the new ones); the README's
    ``configs`` list is then rewritten atomically with this config's entry replaced.

    Args:
        mirror: the mirror folder.
        hub_id: ``org/name``.
        config: the config name (None: the dataset has none; stored as ``default``).
        splits: the rows per split.

    Returns:
        The snapshot folder.
    """
    folder = snapshot_dir(mirror, hub_id)
    name = config or DEFAULT_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for split, dataset in splits.items():
        relative = f"{name}/{split}-00000-of-00001.parquet"
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_for(target)
        try:
            dataset.to_parquet(str(tmp / "data.parquet"))
            os.replace(tmp / "data.parquet", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        files.append({"split": split, "path": relative})
    configs = [c for c in snapshot_configs(folder) if c.get("config_name") != name]
    configs.append({"config_name": name, "data_files": files})
    configs.sort(key=lambda c: str(c.get("config_name")))
    front = yaml.safe_dump({"configs": configs}, sort_keys=False)
    body = f"---\n{front}---\n\nA snapshot of the hub dataset `{hub_id}` written by `multipromot data pull`.\n"
    write_atomic(folder / README, body.encode())
    return folder
