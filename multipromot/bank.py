"""The prompt bank: versioned, immutable soft prompts on disk, with integrity and lineage checks.

Layout (DESIGN.md, "Prompt bank on disk")::

    <root>/
      index.json                          schema version, current version per task, one summary
                                          line per entry; derived from disk, rewritten atomically
      .lock                               writers hold it (filelock)
      <task>/v<NNNN>/prompt.safetensors   one float32 tensor "prompt" [P, d]
      <task>/v<NNNN>/meta.json            task, version, shape, init, base model, format,
                                          stage-1 score, created, sha256, stage-2 checkpoints

Why it is built this way:

- Entries are immutable: a new training makes a new version, and version numbers are never
  reused (the index keeps the highest number ever given), so ``rte@v0002`` always names the
  same tensor. Only ``meta.json``'s ``stage2`` list grows; the tensor never changes.
- A new version is written into a temporary directory inside the bank and renamed into place,
  and a removed one is renamed out before it is deleted: a kill leaves a complete entry or
  nothing. ``index.json`` is rebuilt from disk on every write, so the only state it holds that
  disk does not is ``current`` and the version high-water mark.
- ``index.json`` and ``meta.json`` each carry the sha256 of the rest of their content, so a
  corrupted byte is an error naming the file rather than a silently different ``current``
  version, format signature or score (the tensor's own sha256 lives in ``meta.json``).
- Loading never unpickles (safetensors + JSON only), checks the tensor's sha256 and the
  model's fingerprint (the model's own, or one in its recorded lineage, so a prompt trained on
  a base model is accepted by the base's fine-tuned descendants and refused by unrelated
  models), and never follows a symlink out of the bank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from multipromot.errors import BankError
from multipromot.models import model_fingerprint, read_lineage

__all__ = [
    "PromptBank",
    "BankEntry",
    "BankProblem",
    "parse_ref",
    "format_ref",
    "validate_task_name",
    "describe_model",
    "base_model_record",
    "INDEX_SCHEMA_VERSION",
    "META_SCHEMA_VERSION",
]

INDEX_SCHEMA_VERSION = 1
META_SCHEMA_VERSION = 1
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
PROMPT_FILE = "prompt.safetensors"
META_FILE = "meta.json"
TENSOR_KEY = "prompt"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_META_FILE = "multipromot_meta.json"  # provenance next to a PEFT export; PEFT ignores it
PEFT_TENSOR_KEY = "prompt_embeddings"
# each JSON file carries the sha256 of the rest of its content: a flipped byte anywhere is an
# error naming the file, never a silently different current version, format or score
INDEX_CHECKSUM_KEY = "checksum"
META_CHECKSUM_KEY = "meta_sha256"

_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")
_VERSION_REF_RE = re.compile(r"^v?(\d+)$")
_RESERVED_TASK_NAMES = {INDEX_FILE}
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_META_REQUIRED = ("task", "version", "prompt_length", "dim", "base_model", "sha256", "created")


# ----------------------------------------------------------------------------- names and refs


def validate_task_name(task: str) -> str:
    """Check that ``task`` is safe to use as a directory name inside the bank.

    Args:
        task: a task name such as ``rte`` or ``wmt14_en_fr``.

    Returns:
        the name, unchanged.

    Raises:
        BankError: the name is empty, has a path separator or ``..``, or uses other characters
            than letters, digits, ``_``, ``.`` and ``-`` (first character a letter or digit).
    """
    if not isinstance(task, str) or not _TASK_RE.match(task) or ".." in task:
        raise BankError(
            "bad task name: use letters, digits, '_', '.', '-' (starting with a letter or digit), "
            "no path separators or '..'",
            key=repr(task),
        )
    if task in _RESERVED_TASK_NAMES or len(task) > 128:
        raise BankError("task name is reserved or longer than 128 characters", key=repr(task))
    return task


def format_ref(task: str, version: int) -> str:
    """The canonical reference of an entry, e.g. ``rte@v0002``."""
    return f"{task}@{_version_dir(version)}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split a reference into (task, version); version is None when the ref names the task.

    Accepted forms: ``rte`` (the task; its current version where one entry is meant),
    ``rte@v2``, ``rte@2``, ``rte@v0002``.

    Raises:
        BankError: the task name or the version is malformed.
    """
    if not isinstance(ref, str) or not ref:
        raise BankError("empty bank reference; expected TASK or TASK@vN", key=repr(ref))
    task, sep, version = ref.partition("@")
    validate_task_name(task)
    if not sep:
        return task, None
    match = _VERSION_REF_RE.match(version)
    if not match or int(match.group(1)) < 1:
        raise BankError("bad version; expected TASK@vN with N >= 1 (rte@v2, rte@0002)", key=ref)
    return task, int(match.group(1))


def _version_dir(version: int) -> str:
    return f"v{version:04d}"


def _parse_version_dir(name: str) -> int | None:
    """Version number of a canonical ``v<NNNN>`` directory name, else None."""
    match = _VERSION_DIR_RE.match(name)
    if not match or _version_dir(int(match.group(1))) != name:
        return None  # "v00001" would alias v0001; only the canonical spelling is an entry
    version = int(match.group(1))
    return version if version >= 1 else None


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class BankEntry:
    """One immutable version of one task's prompt.

    Attributes:
        task: the task name.
        version: the version number (1, 2, ...).
        path: the entry's directory ``<root>/<task>/v<NNNN>``.
        meta: the parsed ``meta.json``.
        current: whether this is the task's current version.
    """

    task: str
    version: int
    path: Path
    meta: dict = field(repr=False)
    current: bool = False

    @property
    def ref(self) -> str:
        """Canonical reference, e.g. ``rte@v0002``."""
        return format_ref(self.task, self.version)

    @property
    def prompt_path(self) -> Path:
        return self.path / PROMPT_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def prompt_length(self) -> int:
        return int(self.meta["prompt_length"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["base_model"]["fingerprint"])

    @property
    def stage2(self) -> list[dict]:
        return list(self.meta.get("stage2") or [])

    def summary(self) -> dict:
        """The entry's line in ``index.json`` and in ``bank list --json``."""
        stage1 = self.meta.get("stage1") or None
        return {
            "ref": self.ref,
            "task": self.task,
            "version": self.version,
            "current": self.current,
            "prompt_length": self.prompt_length,
            "dim": self.dim,
            "init": self.meta.get("init"),
            "base_model": self.meta["base_model"].get("name"),
            "fingerprint": self.fingerprint,
            "stage1": (
                {"metric": stage1.get("metric"), "value": stage1.get("value")} if stage1 else None
            ),
            "created": self.meta.get("created"),
            "sha256": self.meta.get("sha256"),
            "stage2_checkpoints": len(self.stage2),
        }


@dataclass(frozen=True)
class BankProblem:
    """One finding of :meth:`PromptBank.verify`; ``str()`` gives one line."""

    entry: str | None
    file: str
    message: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.file, self.entry, self.message) if p)

    def to_dict(self) -> dict:
        return {"entry": self.entry, "file": self.file, "message": self.message}


# ----------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jsonable(value: Any, *, key: str) -> Any:
    """Plain JSON data from dataclasses, tuples and paths (e.g. a template's FormatSignature)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, key=key) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key=key) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON; a score that was never measured is null
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise BankError(f"cannot store a {type(value).__name__} in meta.json", key=key)


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_file_atomically(path: Path, data: bytes) -> None:
    """Write a sibling temp file, fsync it, then ``os.replace``: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _content_sha256(data: dict, skip: str) -> str:
    """sha256 of a JSON object's content without the key ``skip`` (canonical form, so it does
    not depend on indentation or key order)."""
    body = {k: v for k, v in data.items() if k != skip}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _checksum_problem(data: dict, key: str) -> str | None:
    """Why ``data`` fails its embedded checksum, or None. Files written before checksums were
    added have none; they are accepted (a flip inside the key's name leaves the rest intact)."""
    if key not in data or data[key] == _content_sha256(data, key):
        return None
    return "checksum mismatch: the file was modified or is corrupt"


def _meta_bytes(meta: dict) -> bytes:
    meta = {**meta, META_CHECKSUM_KEY: _content_sha256(meta, META_CHECKSUM_KEY)}
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _model_dim(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


def _model_dir(model: nn.Module) -> str:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return str(name or "")


def describe_model(model: nn.Module, name: str | None = None) -> dict:
    """The ``base_model`` record of a prompt trained on ``model``.

    Args:
        model: the (frozen) model the prompt was trained on.
        name: where it loads from; defaults to ``model.name_or_path``. A local directory is
            recorded as an absolute path, so the entry stays loadable from any working dir.

    Returns:
        ``{"name": ..., "fingerprint": ...}``.
    """
    name = name or _model_dir(model)
    if name and Path(name).is_dir():
        name = os.fspath(Path(name).resolve())  # a relative path would break from another cwd
    return {"name": name, "fingerprint": model_fingerprint(model)}


def base_model_record(name_or_path: str) -> dict:
    """The ``base_model`` record of a model given by path, without loading it when possible.

    A directory saved by :func:`multipromot.models.save_model` carries its fingerprint; any other
    model is loaded (CPU) and fingerprinted.

    Raises:
        UserError: the model cannot be loaded.
    """
    record = read_lineage(name_or_path) if Path(name_or_path).is_dir() else {}
    if record.get("fingerprint"):
        return {"name": str(name_or_path), "fingerprint": record["fingerprint"]}
    from multipromot.models import load_model

    model, _, path = load_model(str(name_or_path))
    return {"name": path, "fingerprint": model_fingerprint(model)}


def _validate_base_model(base_model: dict, *, key: str) -> dict:
    if (
        not isinstance(base_model, dict)
        or not isinstance(base_model.get("name"), str)
        or not isinstance(base_model.get("fingerprint"), str)
        or not base_model["fingerprint"]
    ):
        raise BankError(
            "base_model must be {'name': <loadable path or hub id>, 'fingerprint': <str>} "
            "(see bank.describe_model)",
            key=key,
        )
    return _jsonable(base_model, key=key)


def _validate_prompt(prompt: torch.Tensor, *, key: str) -> torch.Tensor:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or 0 in prompt.shape:
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise BankError(f"prompt must be a non-empty tensor [P, d], got {shape}", key=key)
    if not prompt.is_floating_point():
        raise BankError(f"prompt must be floating point, got {prompt.dtype}", key=key)
    prompt = prompt.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(prompt).all():
        raise BankError("prompt has NaN or infinite values; refusing to store it", key=key)
    return prompt


# ----------------------------------------------------------------------------- the bank


class PromptBank:
    """A directory of versioned soft prompts (see the module docstring for the layout).

    Reading needs no lock; every write holds ``<root>/.lock``.

    Args:
        root: the bank directory; created on the first write.
        lock_timeout: seconds a writer waits for another process's lock.
    """

    def __init__(self, root: str | os.PathLike, *, lock_timeout: float = 30.0):
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self._lock: FileLock | None = None

    def __repr__(self) -> str:
        return f"PromptBank({os.fspath(self.root)!r})"

    # ------------------------------------------------------------------ locking and paths

    def _locked(self, *, create: bool = False) -> FileLock:
        """The writer lock (re-entrant within this object, exclusive across processes)."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise BankError("no prompt bank here (not a directory)", file=self.root)
        if self._lock is None:
            self._lock = FileLock(self.root / LOCK_FILE, timeout=self.lock_timeout)
        try:
            self._lock.acquire()
        except Timeout:
            raise BankError(
                f"another process holds the bank lock (waited {self.lock_timeout:g} s); "
                "retry when it has finished writing",
                file=self.root / LOCK_FILE,
            ) from None
        return self._lock

    def _inside(self, path: Path, *, key: str | None = None) -> Path:
        """``path`` if it resolves inside the bank root; a symlink leading out is an error."""
        root = self.root.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise BankError(
                f"resolves to {real}, outside the bank; refusing to follow the symlink",
                file=path,
                key=key,
            )
        return path

    def _task_dir(self, task: str) -> Path:
        return self.root / validate_task_name(task)

    def _entry_dir(self, task: str, version: int) -> Path:
        return self._task_dir(task) / _version_dir(version)

    def _cleanup_interrupted(self) -> None:
        """Remove what a killed writer left (only called under the lock): temp and trash dirs,
        and the temp files of an interrupted ``index.json`` or ``meta.json`` replacement (they
        would otherwise pile up, one per kill)."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.is_symlink():
                continue
            if child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)
            elif child.name.startswith(f".{INDEX_FILE}.") and child.is_file():
                child.unlink(missing_ok=True)
        for task, versions in self._disk_versions().items():
            for version in versions:
                for stale in self._entry_dir(task, version).glob(f".{META_FILE}.*"):
                    if stale.is_file() and not stale.is_symlink():
                        stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ disk and index

    def _disk_versions(self) -> dict[str, list[int]]:
        """Task -> sorted versions found on disk (canonical names, no symlinked dirs)."""
        found: dict[str, list[int]] = {}
        if not self.root.is_dir():
            return found
        for task_dir in sorted(self.root.iterdir()):
            name = task_dir.name
            if name.startswith(".") or task_dir.is_symlink() or not task_dir.is_dir():
                continue
            if not _TASK_RE.match(name) or ".." in name or name in _RESERVED_TASK_NAMES:
                continue
            versions = sorted(
                v
                for child in task_dir.iterdir()
                if (v := _parse_version_dir(child.name)) is not None
                and child.is_dir()
                and not child.is_symlink()
            )
            if versions:
                found[name] = versions
        return found

    def read_index(self) -> dict:
        """The parsed ``index.json`` ({} when the bank has none yet).

        Raises:
            BankError: the file is not valid JSON, fails its checksum, or has an unknown schema
                version.
        """
        index = self._read_index_unchecked()
        problem = _checksum_problem(index, INDEX_CHECKSUM_KEY)
        if problem:
            raise BankError(
                f"{problem}; `multipromot bank verify --fix` rebuilds it from disk (every "
                "task's current version becomes its newest)",
                file=self.root / INDEX_FILE,
            )
        return index

    def _read_index_unchecked(self) -> dict:
        """``index.json`` parsed and schema-checked, its checksum not checked ({} if none)."""
        path = self.root / INDEX_FILE
        if not path.is_file():
            return {}
        self._inside(path)
        try:
            index = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BankError(
                f"not valid JSON ({e}); `multipromot bank verify --fix` rebuilds it", file=path
            ) from None
        if not isinstance(index, dict) or index.get("schema_version") != INDEX_SCHEMA_VERSION:
            raise BankError(
                f"unknown index schema {index.get('schema_version') if isinstance(index, dict) else None!r}"
                f" (this multipromot reads {INDEX_SCHEMA_VERSION})",
                file=path,
            )
        return index

    def _state(
        self, index: dict | None = None
    ) -> tuple[dict[str, list[int]], dict[str, int], dict[str, int]]:
        """(versions on disk, current version per task, highest version ever given per task).

        Disk is the truth for which entries exist; the index (read here unless given) adds
        ``current`` and the high-water mark. A task the index does not know (e.g. after a kill
        between renaming a new entry into place and rewriting the index) is current at its
        newest version.
        """
        disk = self._disk_versions()
        index = self.read_index() if index is None else index
        tasks = index.get("tasks") or {}
        current: dict[str, int] = {}
        last: dict[str, int] = {}
        for task, versions in disk.items():
            info = tasks.get(task) or {}
            recorded = info.get("current")
            known_last = int(info.get("last_version") or 0)
            # an entry newer than the index knows was added by a writer killed before it
            # rewrote the index; adding makes an entry current, so finish that intent
            orphaned = versions[-1] > known_last
            current[task] = recorded if recorded in versions and not orphaned else versions[-1]
            last[task] = max(versions[-1], known_last)
        for task, info in tasks.items():
            if task not in disk and info.get("last_version"):
                last[task] = int(info["last_version"])  # removed task: never reuse its numbers
        return disk, current, last

    def _write_index(self, current: dict[str, int], last: dict[str, int]) -> None:
        """Rebuild ``index.json`` from disk and replace it atomically (caller holds the lock)."""
        disk = self._disk_versions()
        summaries = []
        for task, versions in disk.items():
            for version in versions:
                try:
                    entry = self._read_entry(task, version, current=current.get(task) == version)
                except BankError:
                    continue  # one broken entry must not block every write; verify reports it
                summaries.append(entry.summary())
        tasks = {
            task: {"current": current.get(task, versions[-1]), "last_version": last[task]}
            for task, versions in disk.items()
        }
        # removed tasks keep their high-water mark so a re-added task never reuses a version
        tasks.update(
            {t: {"current": None, "last_version": v} for t, v in last.items() if t not in disk}
        )
        # one line per entry keeps the file readable and diffs small; still plain JSON
        head = {"schema_version": INDEX_SCHEMA_VERSION, "updated": _now(), "tasks": tasks}
        checksum = _content_sha256({**head, "entries": summaries}, INDEX_CHECKSUM_KEY)
        head = json.dumps({**head, INDEX_CHECKSUM_KEY: checksum}, sort_keys=True)
        lines = [json.dumps(s, sort_keys=True) for s in summaries]
        body = head[:-1] + ', "entries": [\n' + ",\n".join(lines) + ("\n" if lines else "") + "]}\n"
        _replace_file_atomically(self.root / INDEX_FILE, body.encode())

    def _read_entry(self, task: str, version: int, *, current: bool = False) -> BankEntry:
        ref = format_ref(task, version)
        path = self._entry_dir(task, version)
        if not path.is_dir():
            raise BankError(f"no such entry in bank {os.fspath(self.root)}", key=ref)
        self._inside(path, key=ref)
        meta_path = self._inside(path / META_FILE, key=ref)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise BankError("entry has no meta.json", file=meta_path, key=ref) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BankError(f"not valid JSON ({e})", file=meta_path, key=ref) from None
        if not isinstance(meta, dict):
            raise BankError("meta.json is not a JSON object", file=meta_path, key=ref)
        missing = [k for k in _META_REQUIRED if k not in meta]
        if missing:
            raise BankError(f"meta.json lacks {', '.join(missing)}", file=meta_path, key=ref)
        if meta["task"] != task or meta["version"] != version:
            raise BankError(
                f"meta.json says {meta['task']}@v{meta['version']}, the directory says {ref}",
                file=meta_path,
                key=ref,
            )
        if not isinstance(meta["base_model"], dict) or "fingerprint" not in meta["base_model"]:
            raise BankError("meta.json base_model lacks a fingerprint", file=meta_path, key=ref)
        problem = _checksum_problem(meta, META_CHECKSUM_KEY)
        if problem:
            raise BankError(problem, file=meta_path, key=ref)
        return BankEntry(task=task, version=version, path=path, meta=meta, current=current)

    # ------------------------------------------------------------------ reading

    def tasks(self) -> list[str]:
        """Names of the tasks with at least one entry, sorted."""
        return sorted(self._disk_versions())

    def versions(self, task: str) -> list[int]:
        """Versions of ``task`` on disk, oldest first ([] if the task has none)."""
        return self._disk_versions().get(validate_task_name(task), [])

    def current_version(self, task: str) -> int | None:
        """The current version of ``task``, or None if the bank has no entry for it."""
        _, current, _ = self._state()
        return current.get(validate_task_name(task))

    def get(self, ref: str) -> BankEntry:
        """The entry a reference names: ``rte`` (current), ``rte@v2``, ``rte@2``, ``rte@v0002``.

        Raises:
            BankError: malformed ref, no such task or version, or an unreadable meta.json.
        """
        task, version = parse_ref(ref)
        disk, current, _ = self._state()
        versions = disk.get(task)
        if not versions:
            known = ", ".join(sorted(disk)) or "none"
            raise BankError(
                f"no entry for task {task!r} in bank {os.fspath(self.root)} (tasks: {known})",
                key=ref,
            )
        if version is None:
            version = current[task]
        elif version not in versions:
            have = ", ".join(_version_dir(v) for v in versions)
            raise BankError(
                f"no such version (task {task} has {have})", key=format_ref(task, version)
            )
        return self._read_entry(task, version, current=current[task] == version)

    def entries(self, task: str | None = None) -> list[BankEntry]:
        """Every entry (or every entry of ``task``), by task then version."""
        disk, current, _ = self._state()
        if task is not None:
            disk = {validate_task_name(task): disk.get(task, [])}
        found = []
        for t, versions in sorted(disk.items()):
            for v in versions:
                try:
                    found.append(self._read_entry(t, v, current=current.get(t) == v))
                except BankError:
                    # readers take no lock: a writer may have removed it since the listing
                    # (renamed out whole), which is not an error of the listing
                    if self._entry_dir(t, v).is_dir():
                        raise
        return found

    def _read_prompt_bytes(self, entry: BankEntry) -> bytes:
        path = self._inside(entry.prompt_path, key=entry.ref)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BankError("entry has no prompt.safetensors", file=path, key=entry.ref) from None

    def _decode_prompt(self, entry: BankEntry, data: bytes) -> torch.Tensor:
        """The tensor in ``data`` after checking checksum, keys, dtype and shape against meta."""
        path = entry.prompt_path
        actual = _sha256(data)
        if actual != entry.meta["sha256"]:
            raise BankError(
                f"checksum mismatch: file sha256 {actual[:16]}..., meta.json records "
                f"{str(entry.meta['sha256'])[:16]}...; the file was modified or is corrupt",
                file=path,
                key=entry.ref,
            )
        try:
            tensors = load_safetensors_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise BankError(
                f"not a readable safetensors file ({e})", file=path, key=entry.ref
            ) from None
        if set(tensors) != {TENSOR_KEY}:
            raise BankError(
                f"expected one tensor 'prompt', found {sorted(tensors)}", file=path, key=entry.ref
            )
        prompt = tensors[TENSOR_KEY]
        expected = (entry.prompt_length, entry.dim)
        if prompt.dtype != torch.float32 or tuple(prompt.shape) != expected:
            raise BankError(
                f"tensor is {prompt.dtype} {tuple(prompt.shape)}, meta.json says float32 {expected}",
                file=path,
                key=entry.ref,
            )
        return prompt

    def accepted_fingerprints(
        self, model: nn.Module | None = None, accept: Iterable[str] | None = None
    ) -> set[str]:
        """Fingerprints a prompt may have been trained on to be used with ``model``.

        The model's own fingerprint, the fingerprint and lineage recorded in its directory
        (``multipromot.json``, written by :func:`multipromot.models.save_model`), and ``accept``.
        """
        fingerprints = set(accept or ())
        if model is not None:
            fingerprints |= self._lineage(model)
            fingerprints.add(model_fingerprint(model))
        return fingerprints

    @staticmethod
    def _lineage(model: nn.Module) -> set[str]:
        directory = _model_dir(model)
        record = read_lineage(directory) if directory and Path(directory).is_dir() else {}
        return {str(f) for f in [record.get("fingerprint"), *record.get("lineage", [])] if f}

    def _check_fingerprint(
        self, entry: BankEntry, model: nn.Module | None, accept: Iterable[str] | None
    ) -> None:
        wanted = entry.fingerprint
        cheap = set(accept or ()) | (self._lineage(model) if model is not None else set())
        if wanted in cheap:
            return  # no need to hash the model's weights
        own = model_fingerprint(model) if model is not None else None
        if wanted == own:
            return
        trained_on = entry.meta["base_model"].get("name") or "?"
        got = f"model has {own}" if own else "no model given"
        allowed = sorted(cheap | ({own} if own else set()))
        raise BankError(
            f"fingerprint mismatch: prompt trained on {wanted} ({trained_on}), {got} "
            f"(accepted: {', '.join(allowed) or 'none'}); the model is neither that base model "
            "nor fine-tuned from it",
            file=entry.meta_path,
            key=entry.ref,
        )

    def load_prompt(
        self,
        ref: str | BankEntry,
        *,
        model: nn.Module | None = None,
        accept: Iterable[str] | None = None,
    ) -> torch.Tensor:
        """Load an entry's prompt [P, d] (float32, CPU), checking it on the way.

        Always checked: the sha256 of the file, the tensor's name, dtype and shape. With
        ``model`` and/or ``accept``: the fingerprint the prompt was trained on must be the
        model's own, one in the model directory's lineage, or one in ``accept``; with ``model``
        the prompt's d must equal the model's embedding size.

        Args:
            ref: a reference (``rte``, ``rte@v2``) or an entry from :meth:`get`.
            model: the model the prompt will be prepended for.
            accept: extra fingerprints to accept (e.g. a base model checked by hand).

        Returns:
            the prompt tensor.

        Raises:
            BankError: naming the entry, for a missing entry, a checksum mismatch, a
                fingerprint mismatch (both fingerprints named), or a shape mismatch.
        """
        entry = ref if isinstance(ref, BankEntry) else self.get(ref)
        prompt = self._decode_prompt(entry, self._read_prompt_bytes(entry))
        if model is not None or accept is not None:
            self._check_fingerprint(entry, model, accept)
        if model is not None and _model_dim(model) != entry.dim:
            raise BankError(
                f"prompt is [{entry.prompt_length}, {entry.dim}] but the model's embeddings "
                f"have d={_model_dim(model)}",
                file=entry.prompt_path,
                key=entry.ref,
            )
        return prompt

    # ------------------------------------------------------------------ writing

    def add(
        self,
        task: str,
        prompt: torch.Tensor,
        *,
        base_model: dict,
        init: str = "random",
        format: dict | None = None,
        stage1: dict | None = None,
        extra: dict | None = None,
        make_current: bool = True,
    ) -> BankEntry:
        """Store a new version of ``task``'s prompt; it becomes the current version.

        Args:
            task: the task name (a directory name; see :func:`validate_task_name`).
            prompt: the trained prompt [P, d]; stored as float32.
            base_model: ``{"name", "fingerprint"}`` of the frozen model it was trained on
                (:func:`describe_model`).
            init: how the prompt was initialised (``random``, ``vocab``, ``text:...``).
            format: ``{"template", "answer_choices", "signature"}`` of the task's format.
            stage1: ``{"steps", "metric", "value"}`` of the selected stage-1 checkpoint.
            extra: more JSON-able provenance, stored under ``meta["extra"]``.
            make_current: set False to store without moving ``current``.

        Returns:
            the new entry.

        Raises:
            BankError: bad task name, bad tensor or metadata, or the lock is held elsewhere.
        """
        validate_task_name(task)
        prompt = _validate_prompt(prompt, key=task)
        base_model = _validate_base_model(base_model, key=task)
        format = _jsonable(format, key=task) if format is not None else None
        stage1 = _jsonable(stage1, key=task) if stage1 is not None else None
        data = save_safetensors_bytes({TENSOR_KEY: prompt}, metadata={"format": "pt"})
        lock = self._locked(create=True)
        try:
            self._cleanup_interrupted()
            _, current, last = self._state()
            version = last.get(task, 0) + 1
            meta = {
                "schema_version": META_SCHEMA_VERSION,
                "task": task,
                "version": version,
                "ref": format_ref(task, version),
                "prompt_length": int(prompt.shape[0]),
                "dim": int(prompt.shape[1]),
                "dtype": "float32",
                "init": str(init),
                "base_model": base_model,
                "format": format,
                "stage1": stage1,
                "created": _now(),
                "sha256": _sha256(data),
                "stage2": [],
            }
            if extra:
                meta["extra"] = _jsonable(extra, key=task)
            # the whole entry is written in a temp dir on the same filesystem, then renamed:
            # a kill leaves the complete entry or nothing
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            try:
                _write_bytes_durably(tmp / PROMPT_FILE, data)
                _write_bytes_durably(tmp / META_FILE, _meta_bytes(meta))
                task_dir = self._task_dir(task)
                if task_dir.is_symlink():
                    raise BankError("task directory is a symlink; refusing to write", file=task_dir)
                task_dir.mkdir(exist_ok=True)
                os.rename(tmp, self._entry_dir(task, version))  # fails if it exists: immutable
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            last[task] = version
            if make_current or task not in current:
                current[task] = version
            self._write_index(current, last)
            return self._read_entry(task, version, current=current[task] == version)
        finally:
            lock.release()

    def record_stage2(self, ref: str, checkpoint: str | os.PathLike) -> BankEntry:
        """Record that a stage-2 checkpoint was trained with this entry's prompt.

        Idempotent (a resumed run records the same checkpoint once). Only ``meta.json`` is
        rewritten (atomically); the tensor never changes.

        Returns:
            the updated entry.

        Raises:
            BankError: no such entry, or the lock is held elsewhere.
        """
        lock = self._locked()
        try:
            entry = self.get(ref)
            checkpoint = os.fspath(checkpoint)
            meta = dict(entry.meta)
            stage2 = list(meta.get("stage2") or [])
            if not any(item.get("checkpoint") == checkpoint for item in stage2):
                stage2.append({"checkpoint": checkpoint, "recorded": _now()})
            meta["stage2"] = stage2
            _replace_file_atomically(
                self._inside(entry.meta_path, key=entry.ref), _meta_bytes(meta)
            )
            _, current, last = self._state()
            self._write_index(current, last)
            return self._read_entry(entry.task, entry.version, current=entry.current)
        finally:
            lock.release()

    def set_current(self, ref: str) -> BankEntry:
        """Make an existing version the task's current one (e.g. to roll back).

        Raises:
            BankError: no such entry, or the lock is held elsewhere.
        """
        lock = self._locked()
        try:
            entry = self.get(ref)
            _, current, last = self._state()
            current[entry.task] = entry.version
            self._write_index(current, last)
            return self._read_entry(entry.task, entry.version, current=True)
        finally:
            lock.release()

    def remove(self, ref: str, *, force: bool = False) -> list[BankEntry]:
        """Remove one version (``rte@v1``) or, with ``force``, a whole task (``rte``).

        Rules: a bare task name means every version of the task, so it always needs
        ``force``. A single version needs ``force`` when it is the current one (``current``
        then moves to the newest remaining version, or the task disappears) or when stage-2
        checkpoints were trained with it (they need it at inference). Version numbers are
        never reused.

        Returns:
            the removed entries.

        Raises:
            BankError: the rules above, or no such entry.
        """
        task, version = parse_ref(ref)
        lock = self._locked()
        try:
            self._cleanup_interrupted()
            disk, current, last = self._state()
            if task not in disk:
                raise BankError(
                    f"no entry for task {task!r} in bank {os.fspath(self.root)}", key=ref
                )
            if version is None:
                removed = self.entries(task)
                if not force:
                    raise BankError(
                        f"names every version of {task} ({len(removed)} versions, current "
                        f"{_version_dir(current[task])}); name one version ({task}@v1) or pass "
                        "--force to remove the whole task",
                        key=ref,
                    )
                target = self._task_dir(task)
            else:
                entry = self.get(ref)
                removed = [entry]
                if entry.current and not force:
                    rest = [v for v in disk[task] if v != version]
                    after = (
                        f"{task} would move to {_version_dir(rest[-1])}"
                        if rest
                        else f"{task} would have no entry"
                    )
                    raise BankError(
                        f"is the current version of {task}; pass --force to remove it ({after})",
                        key=entry.ref,
                    )
                if entry.stage2 and not force:
                    raise BankError(
                        f"{len(entry.stage2)} stage-2 checkpoint(s) were trained with this "
                        "prompt (bank show lists them); pass --force to remove it anyway",
                        key=entry.ref,
                    )
                target = entry.path
            if target.is_symlink():
                raise BankError("is a symlink; refusing to remove", file=target, key=ref)
            self._inside(target, key=ref)
            # rename out first (atomic), then delete: a kill never leaves half an entry
            trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=self.root))
            os.rename(target, trash / "gone")
            remaining = [v for v in disk[task] if v != version] if version is not None else []
            if remaining:
                if current[task] not in remaining:
                    current[task] = remaining[-1]
            else:
                current.pop(task, None)
                task_dir = self._task_dir(task)
                if task_dir.is_dir() and not task_dir.is_symlink() and not any(task_dir.iterdir()):
                    task_dir.rmdir()
            self._write_index(current, last)
            shutil.rmtree(trash, ignore_errors=True)
            return removed
        finally:
            lock.release()

    def rebuild_index(self) -> None:
        """Rewrite ``index.json`` from disk (keeping recorded ``current`` where still valid).

        Raises:
            BankError: the lock is held elsewhere.
        """
        lock = self._locked()
        try:
            try:
                _, current, last = self._state()
            except BankError:  # unreadable index: start over from disk, newest is current
                (self.root / INDEX_FILE).unlink()
                _, current, last = self._state()
            self._write_index(current, last)
        finally:
            lock.release()

    # ------------------------------------------------------------------ checks

    def verify(
        self, *, model: nn.Module | None = None, accept: Iterable[str] | None = None
    ) -> list[BankProblem]:
        """Check the whole bank; returns the problems found ([] when all is well).

        Checked for every entry: meta.json readable, intact (its own checksum) and consistent
        with its directory, the tensor's sha256, name, dtype and shape; the index is intact and
        lists exactly what is on disk with matching summaries and valid ``current`` versions; no
        symlinks inside the bank; when the base model is a local directory saved by
        multipromot, its recorded fingerprint (or lineage) still includes the entry's
        fingerprint; with ``model``/``accept``, every entry's fingerprint is accepted for that
        model.
        """
        problems: list[BankProblem] = []
        root = os.fspath(self.root)
        if not self.root.is_dir():
            return [BankProblem(None, root, "no prompt bank here (not a directory)")]
        index_path = os.fspath(self.root / INDEX_FILE)
        index_readable = True
        try:
            index = self._read_index_unchecked()
        except BankError as e:
            problems.append(BankProblem(None, index_path, e.message))
            index, index_readable = {}, False
        problems += self._verify_layout()
        disk, current, _ = self._state(index) if index else (self._disk_versions(), {}, {})
        checking = model is not None or accept is not None
        accepted = self.accepted_fingerprints(model, accept) if checking else None
        entries: dict[str, BankEntry] = {}
        for task, versions in disk.items():
            for version in versions:
                ref = format_ref(task, version)
                try:
                    entry = self._read_entry(task, version, current=current.get(task) == version)
                    self._decode_prompt(entry, self._read_prompt_bytes(entry))
                except BankError as e:
                    problems.append(BankProblem(ref, e.file or root, e.message))
                    continue
                entries[ref] = entry
                problems += self._verify_fingerprint(entry, accepted, model)
        if index:
            drift = self._verify_index(index, disk, entries, index_path)
            problems += drift
            checksum = _checksum_problem(index, INDEX_CHECKSUM_KEY)
            if checksum and not drift:  # the drift lines already say what differs
                problems.append(
                    BankProblem(
                        None,
                        index_path,
                        f"{checksum}; `multipromot bank verify --fix` rebuilds it from disk",
                    )
                )
        elif disk and index_readable:
            problems.append(
                BankProblem(
                    None, index_path, "missing; `multipromot bank verify --fix` rebuilds it"
                )
            )
        return problems

    def _verify_layout(self) -> list[BankProblem]:
        problems = []
        for task_dir in sorted(self.root.iterdir()):
            if task_dir.name.startswith(".") or task_dir.name == INDEX_FILE:
                continue
            if task_dir.is_symlink():
                problems.append(
                    BankProblem(
                        None, os.fspath(task_dir), "is a symlink; banks hold real directories"
                    )
                )
                continue
            if not task_dir.is_dir():
                continue
            for child in sorted(task_dir.iterdir()):
                if child.is_symlink():
                    problems.append(
                        BankProblem(
                            None, os.fspath(child), "is a symlink; banks hold real directories"
                        )
                    )
                elif (
                    child.is_dir()
                    and _parse_version_dir(child.name) is None
                    and not child.name.startswith(".")
                ):
                    problems.append(
                        BankProblem(
                            None, os.fspath(child), "is not a version directory (v0001, ...)"
                        )
                    )
        return problems

    def _verify_fingerprint(
        self, entry: BankEntry, accepted: set[str] | None, model: nn.Module | None
    ) -> list[BankProblem]:
        problems = []
        name = entry.meta["base_model"].get("name") or ""
        if name and Path(name).is_dir():
            try:
                record = read_lineage(name)
            except Exception as e:  # a broken lineage file is a finding, not a crash
                record = {}
                problems.append(BankProblem(entry.ref, name, f"unreadable lineage ({e})"))
            known = {record.get("fingerprint"), *record.get("lineage", [])} - {None}
            if record and entry.fingerprint not in known:
                problems.append(
                    BankProblem(
                        entry.ref,
                        os.fspath(entry.meta_path),
                        f"fingerprint mismatch: prompt trained on {entry.fingerprint}, base "
                        f"model directory {name} now holds {record.get('fingerprint')}",
                    )
                )
        if accepted is not None and entry.fingerprint not in accepted:
            own = sorted(accepted)
            problems.append(
                BankProblem(
                    entry.ref,
                    os.fspath(entry.meta_path),
                    f"fingerprint mismatch: prompt trained on {entry.fingerprint}, the model "
                    f"accepts {', '.join(own) or 'none'}",
                )
            )
        if model is not None and _model_dim(model) != entry.dim:
            problems.append(
                BankProblem(
                    entry.ref,
                    os.fspath(entry.prompt_path),
                    f"d={entry.dim} but the model has d={_model_dim(model)}",
                )
            )
        return problems

    @staticmethod
    def _verify_index(
        index: dict, disk: dict[str, list[int]], entries: dict[str, BankEntry], index_path: str
    ) -> list[BankProblem]:
        problems = []
        listed = {s.get("ref"): s for s in index.get("entries") or [] if isinstance(s, dict)}
        on_disk = {format_ref(t, v) for t, vs in disk.items() for v in vs}
        for ref in sorted(on_disk - set(listed)):
            problems.append(BankProblem(ref, index_path, "entry on disk is missing from the index"))
        for ref in sorted(set(listed) - on_disk):
            problems.append(
                BankProblem(ref, index_path, "index lists an entry that is not on disk")
            )
        for ref, entry in sorted(entries.items()):
            summary = listed.get(ref)
            if summary is None:
                continue
            fresh = entry.summary()
            diff = sorted(k for k in fresh if k != "current" and summary.get(k) != fresh[k])
            if diff:
                problems.append(
                    BankProblem(
                        ref,
                        index_path,
                        f"index summary differs from meta.json in {', '.join(diff)}",
                    )
                )
        tasks = index.get("tasks") or {}
        for task, versions in sorted(disk.items()):
            recorded = (tasks.get(task) or {}).get("current")
            if recorded not in versions:
                problems.append(
                    BankProblem(task, index_path, f"current version {recorded!r} is not on disk")
                )
        return problems

    # ------------------------------------------------------------------ comparison

    def diff(self, a: str, b: str) -> dict:
        """Compare two entries' prompts (checksums verified, no model needed).

        Returns:
            ``{"a", "b", "shape_a", "shape_b", "norm_a", "norm_b", "mean_row_norm_a",
            "mean_row_norm_b", "cosine", "cosine_mean_per_position", "l2_distance",
            "stage1_a", "stage1_b", "same_base_model"}``. ``cosine`` is over the flattened
            prompts, ``cosine_mean_per_position`` averages the cosine of row i of a with row i
            of b; those two and ``l2_distance`` (Frobenius norm of a - b) are None when the
            shapes differ. Computed in float64.

        Raises:
            BankError: either entry is missing or fails its checksum.
        """
        ea, eb = self.get(a), self.get(b)
        ta = self.load_prompt(ea).to(torch.float64)
        tb = self.load_prompt(eb).to(torch.float64)
        same_shape = ta.shape == tb.shape
        result = {
            "a": ea.ref,
            "b": eb.ref,
            "shape_a": list(ta.shape),
            "shape_b": list(tb.shape),
            "norm_a": float(ta.norm()),
            "norm_b": float(tb.norm()),
            "mean_row_norm_a": float(ta.norm(dim=1).mean()),
            "mean_row_norm_b": float(tb.norm(dim=1).mean()),
            "cosine": None,
            "cosine_mean_per_position": None,
            "l2_distance": None,
            "stage1_a": ea.meta.get("stage1"),
            "stage1_b": eb.meta.get("stage1"),
            "same_base_model": ea.fingerprint == eb.fingerprint,
        }
        if same_shape:
            cos = torch.nn.functional.cosine_similarity
            result["cosine"] = float(cos(ta.reshape(1, -1), tb.reshape(1, -1)).item())
            result["cosine_mean_per_position"] = float(cos(ta, tb, dim=1).mean())
            result["l2_distance"] = float((ta - tb).norm())
        return result

    # ------------------------------------------------------------------ PEFT interop

    def export_peft(
        self,
        ref: str,
        out_dir: str | os.PathLike,
        *,
        base_model_name_or_path: str | None = None,
        task_type: str | None = None,
    ) -> Path:
        """Write an entry as a PEFT prompt-tuning adapter that ``PeftModel.from_pretrained`` loads.

        Writes ``adapter_config.json`` (peft's own ``PromptTuningConfig``: P virtual tokens,
        token_dim d, one transformer submodule, i.e. the prompt goes on the encoder input
        only, as in the bank), ``adapter_model.safetensors`` with ``prompt_embeddings`` [P, d],
        and ``multipromot_meta.json`` (the entry's meta, which :meth:`import_peft` reads back).

        Args:
            ref: the entry.
            out_dir: a new (or empty) directory.
            base_model_name_or_path: recorded in the adapter config; default: the entry's
                ``base_model.name``.
            task_type: ``SEQ_2_SEQ_LM`` or ``CAUSAL_LM``; default: read from the base model's
                config (``is_encoder_decoder``).

        Returns:
            the output directory.

        Raises:
            BankError: bad entry, a non-empty ``out_dir``, or a task type that cannot be told.
        """
        from peft import PromptTuningConfig, TaskType
        from safetensors.torch import save_file

        entry = self.get(ref)
        prompt = self.load_prompt(entry)
        base = base_model_name_or_path or entry.meta["base_model"].get("name") or None
        task_type = _peft_task_type(task_type, base, key=entry.ref)
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BankError(
                "exists and is not an empty directory; choose a new one", file=out, key=entry.ref
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        config = PromptTuningConfig(
            task_type=TaskType(task_type),
            num_virtual_tokens=entry.prompt_length,
            token_dim=entry.dim,
            num_transformer_submodules=1,  # encoder-side prompt only, as PromptedModel does
            base_model_name_or_path=base,
            inference_mode=True,  # what PeftModel.save_pretrained writes
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            config.save_pretrained(os.fspath(tmp))
            save_file(
                {PEFT_TENSOR_KEY: prompt},
                os.fspath(tmp / PEFT_WEIGHTS_FILE),
                metadata={"format": "pt"},
            )
            (tmp / PEFT_META_FILE).write_text(
                json.dumps({**entry.meta, "exported_from": entry.ref}, indent=2)
            )
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def import_peft(
        self,
        adapter_dir: str | os.PathLike,
        task: str,
        *,
        base_model: dict | None = None,
        init: str | None = None,
        format: dict | None = None,
        stage1: dict | None = None,
    ) -> BankEntry:
        """Read a PEFT prompt-tuning adapter into a new version of ``task``.

        Only safetensors weights are read (``adapter_model.bin`` is refused: never unpickle).
        For a seq2seq adapter saved with two transformer submodules, PEFT's prompt tuning only
        ever prepends the first P rows (encoder side), so those are imported.

        Args:
            adapter_dir: the adapter directory.
            task: the bank task to add a version to.
            base_model: ``{"name", "fingerprint"}``; default: from ``multipromot_meta.json`` if
                the adapter was exported by multipromot, else from the adapter config's
                ``base_model_name_or_path`` when that is a directory saved by multipromot.
            init, format, stage1: as in :meth:`add`; default from ``multipromot_meta.json``.

        Returns:
            the new entry.

        Raises:
            BankError: not a prompt-tuning adapter, pickled weights, wrong shapes, or an
                unknown base model.
        """
        src = Path(adapter_dir)
        validate_task_name(task)
        config_path = src / PEFT_CONFIG_FILE
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise BankError(
                "no adapter_config.json; not a PEFT adapter directory", file=src
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BankError(f"not valid JSON ({e})", file=config_path) from None
        if config.get("peft_type") != "PROMPT_TUNING":
            raise BankError(
                f"peft_type is {config.get('peft_type')!r}; only PROMPT_TUNING adapters hold a soft prompt",
                file=config_path,
                key="peft_type",
            )
        weights = src / PEFT_WEIGHTS_FILE
        if not weights.is_file():
            pickled = (
                " (adapter_model.bin is pickled; multipromot never unpickles)"
                if (src / "adapter_model.bin").exists()
                else ""
            )
            raise BankError(f"no adapter_model.safetensors{pickled}", file=src)
        try:
            tensors = load_safetensors_bytes(weights.read_bytes())
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise BankError(f"not a readable safetensors file ({e})", file=weights) from None
        if PEFT_TENSOR_KEY not in tensors:
            raise BankError(
                f"no 'prompt_embeddings' tensor (found {sorted(tensors)})", file=weights
            )
        embeddings = tensors[PEFT_TENSOR_KEY]
        p, d = config.get("num_virtual_tokens"), config.get("token_dim")
        submodules = config.get("num_transformer_submodules") or 1
        if embeddings.dim() != 2 or tuple(embeddings.shape) != (p * submodules, d):
            raise BankError(
                f"prompt_embeddings is {tuple(embeddings.shape)}, the config says "
                f"[{p} x {submodules}, {d}]",
                file=weights,
            )
        prompt = embeddings[:p]
        sidecar = _read_sidecar(src / PEFT_META_FILE)
        if base_model is None:
            base_model = sidecar.get("base_model") or _base_model_from_config(config, config_path)
        return self.add(
            task,
            prompt,
            base_model=base_model,
            init=init
            or sidecar.get("init")
            or f"peft:{config.get('prompt_tuning_init', 'RANDOM')}",
            format=format if format is not None else sidecar.get("format"),
            stage1=stage1 if stage1 is not None else sidecar.get("stage1"),
            extra={
                "imported_from": os.fspath(src.resolve()),
                "peft_exported_from": sidecar.get("exported_from"),
            },
        )


def _peft_task_type(task_type: str | None, base: str | None, *, key: str) -> str:
    """SEQ_2_SEQ_LM or CAUSAL_LM, given or read from the base model's config."""
    aliases = {
        "seq2seq": "SEQ_2_SEQ_LM",
        "seq_2_seq_lm": "SEQ_2_SEQ_LM",
        "causal": "CAUSAL_LM",
        "causal_lm": "CAUSAL_LM",
    }
    if task_type is not None:
        value = aliases.get(task_type.lower(), task_type.upper())
        if value not in ("SEQ_2_SEQ_LM", "CAUSAL_LM"):
            raise BankError(f"task type {task_type!r}: use SEQ_2_SEQ_LM or CAUSAL_LM", key=key)
        return value
    if not base:
        raise BankError(
            "entry records no base model; pass a task type (SEQ_2_SEQ_LM or CAUSAL_LM)", key=key
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BankError(
            f"cannot read the base model config of {base!r} ({first}); pass --base-model or a "
            "task type (SEQ_2_SEQ_LM or CAUSAL_LM)",
            key=key,
        ) from None
    return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"


def _read_sidecar(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"not valid JSON ({e})", file=path) from None
    return meta if isinstance(meta, dict) else {}


def _base_model_from_config(config: dict, config_path: Path) -> dict:
    name = config.get("base_model_name_or_path")
    record = read_lineage(name) if name and Path(name).is_dir() else {}
    if not record.get("fingerprint"):
        raise BankError(
            f"cannot tell the fingerprint of base model {name!r}; pass base_model "
            "(CLI: --base-model PATH)",
            file=config_path,
            key="base_model_name_or_path",
        )
    return {"name": name, "fingerprint": record["fingerprint"]}
