"""Durable file writes and checksums: the one place that decides how a file reaches the disk.

The rule for every file we write (bank entries, checkpoints, models, reports, run records):
write a uniquely named temporary file next to the target, flush and fsync it, ``os.replace`` it
over the target, then fsync the directory. A reader sees the old file or the new one, never
half of one, and a power cut after the call returns keeps the new one. Temporary files are
opened with ``"x"`` (not ``mkstemp``, which makes them 0600) so that they get the umask's usual
mode and stay readable by a colleague on a shared filesystem.

A whole directory (a bank entry, a checkpoint, a model) is written into a temporary sibling and
published with :func:`publish_dir`, so a kill leaves the old directory or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "sha256_bytes",
    "sha256_file",
    "content_sha256",
    "write_atomic",
    "write_json",
    "write_durably",
    "fsync_dir",
    "publish_dir",
    "temp_dir_for",
    "TMP_MARK",
]

# Part of every temporary name we create, so that cleanup code can recognise leftovers.
TMP_MARK = ".tmp-"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoint shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(data: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces): the same digest
    whatever the indentation or key order it was written with."""
    return sha256_bytes(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def content_sha256(data: dict, skip: str) -> str:
    """sha256 of a JSON object's content without the key ``skip``: the embedded checksum of a
    record that carries its own."""
    return json_sha256({k: v for k, v in data.items() if k != skip})


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write a new file and fsync it; for files inside a temporary directory that is published
    as a whole afterwards (the directory rename is the atomic step)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 1) -> None:
    """:func:`write_atomic` of ``data`` as JSON (numpy and torch scalars as floats)."""
    write_atomic(path, (json.dumps(data, indent=indent, default=float) + "\n").encode())


def temp_dir_for(dest: str | os.PathLike) -> Path:
    """A new empty directory next to ``dest`` to build its replacement in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def publish_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move a finished temporary directory to ``dest``, replacing what was there.

    The old ``dest`` is first renamed aside, so at every moment ``dest`` is the old complete
    directory, absent, or the new complete one; the old copy is deleted last.
    """
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
