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

Why one module of this size: every method of PromptBank shares one lock and index protocol
(read without the lock, write under it, rebuild the index from disk); split apart, each
half would have to re-state it. Records, verify and PEFT interop live in their own modules.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes

from multipromot.bank.entry import (
    INDEX_CHECKSUM_KEY,
    INDEX_FILE,
    INDEX_SCHEMA_VERSION,
    LOCK_FILE,
    META_CHECKSUM_KEY,
    META_FILE,
    META_REQUIRED,
    META_SCHEMA_VERSION,
    PROMPT_FILE,
    RESERVED_TASK_NAMES,
    TASK_RE,
    TENSOR_KEY,
    BankEntry,
    BankProblem,
    check_definition,
    checksum_problem,
    format_ref,
    jsonable,
    meta_bytes,
    model_dim,
    model_dir,
    now,
    parse_ref,
    parse_version_dir,
    validate_base_model,
    validate_prompt,
    validate_task_name,
    version_dir,
)
from multipromot.bank.peft import export_peft, import_peft
from multipromot.bank.verify import verify_bank
from multipromot.errors import BankError, UnpinnedPromptWarning
from multipromot.fsio import TMP_MARK, content_sha256, sha256_bytes, write_atomic, write_durably
from multipromot.models import model_fingerprint, read_lineage

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["PromptBank"]

# Leftovers of killed writers, removed under the lock: temp entries and removed entries.
_TMP_PREFIX = TMP_MARK
_TRASH_PREFIX = ".trash-"

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
        return self._task_dir(task) / version_dir(version)

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
            if not TASK_RE.match(name) or ".." in name or name in RESERVED_TASK_NAMES:
                continue
            versions = sorted(
                v
                for child in task_dir.iterdir()
                if (v := parse_version_dir(child.name)) is not None
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
        problem = checksum_problem(index, INDEX_CHECKSUM_KEY)
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
            if recorded in versions and not orphaned:
                current[task] = recorded
            else:  # never promote a folder that is not a whole entry (junk named v0003)
                healthy = [v for v in versions if v > known_last and self._healthy(task, v)]
                fallback = recorded if recorded in versions else versions[-1]
                current[task] = healthy[-1] if healthy else fallback
            last[task] = max(versions[-1], known_last)
        for task, info in tasks.items():
            if task not in disk and info.get("last_version"):
                last[task] = int(info["last_version"])  # removed task: never reuse its numbers
        return disk, current, last

    def _healthy(self, task: str, version: int) -> bool:
        """Whether an entry reads and its prompt verifies (checksum, shape, finite values)."""
        try:
            entry = self._read_entry(task, version)
            self._decode_prompt(entry, self._read_prompt_bytes(entry))
        except BankError:
            return False
        return True

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
        head = {"schema_version": INDEX_SCHEMA_VERSION, "updated": now(), "tasks": tasks}
        checksum = content_sha256({**head, "entries": summaries}, INDEX_CHECKSUM_KEY)
        head = json.dumps({**head, INDEX_CHECKSUM_KEY: checksum}, sort_keys=True)
        lines = [json.dumps(s, sort_keys=True) for s in summaries]
        body = head[:-1] + ', "entries": [\n' + ",\n".join(lines) + ("\n" if lines else "") + "]}\n"
        write_atomic(self.root / INDEX_FILE, body.encode())

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
        missing = [k for k in META_REQUIRED if k not in meta]
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
        problem = checksum_problem(meta, META_CHECKSUM_KEY)
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
            have = ", ".join(version_dir(v) for v in versions)
            raise BankError(
                f"no such version (task {task} has {have})", key=format_ref(task, version)
            )
        return self._read_entry(task, version, current=current[task] == version)

    def content(self, refs: Mapping[str, str]) -> dict[str, str]:
        """The sha256 of the prompt each ref names: what a record keeps next to its refs, so
        that a ref whose content changed (a recreated bank repeats ``rte@v0001``) is noticed.

        Args:
            refs: task -> bank ref.

        Returns:
            task -> the entry's sha256.

        Raises:
            BankError: a ref names no entry.
        """
        return {task: str(self.get(ref).meta["sha256"]) for task, ref in refs.items()}

    def check_content(
        self,
        refs: Mapping[str, str],
        sha256: Mapping[str, str] | None,
        *,
        record: str | os.PathLike | None = None,
    ) -> None:
        """Refuse refs whose entry holds another prompt than the one a record names.

        Args:
            refs: task -> bank ref, as recorded.
            sha256: task -> the sha256 recorded next to each ref; a task without one (a record
                of an older multipromot) is not compared.
            record: the file that recorded them, for the message.

        Raises:
            BankError: naming the entry: it is missing, or its content is not the recorded
                one (the bank was recreated, or the entry replaced, since).
        """
        for task, ref in refs.items():
            want = (sha256 or {}).get(task)
            if want is None:
                continue
            have = str(self.get(ref).meta["sha256"])
            if have != want:
                where = f" ({os.fspath(record)})" if record is not None else ""
                raise BankError(
                    f"holds another prompt than the one recorded{where}: sha256 {have[:12]}... "
                    f"in bank {os.fspath(self.root)}, {want[:12]}... recorded; the bank was "
                    "recreated or the entry replaced since",
                    key=ref,
                )

    def check_definitions(self, refs: Mapping[str, str], tasks: Iterable[Any]) -> None:
        """Refuse a prompt tuned for another definition of its task (an inline task that
        shares a name with another definition): :func:`~multipromot.bank.entry.check_definition`
        for each task of ``tasks`` that ``refs`` names a prompt for.

        Raises:
            BankError: naming the entry.
        """
        for task in tasks:
            if task.name in refs:
                check_definition(self.get(refs[task.name]), task)

    def entries(
        self,
        task: str | None = None,
        *,
        problems: list[BankProblem] | None = None,
        check_prompts: bool = False,
    ) -> list[BankEntry]:
        """Every entry (or every entry of ``task``), by task then version.

        Args:
            task: only this task's entries.
            problems: when given, an unreadable entry is appended here and skipped (a listing
                of the healthy entries); otherwise it raises.
            check_prompts: also read each entry's tensor and check it (sha256, shape, finite
                values): a listing then never shows a NaN prompt as healthy.

        Raises:
            BankError: an unreadable entry (without ``problems``).
        """
        disk, current, _ = self._state()
        if task is not None:
            disk = {validate_task_name(task): disk.get(task, [])}
        found = []
        for t, versions in sorted(disk.items()):
            for v in versions:
                try:
                    entry = self._read_entry(t, v, current=current.get(t) == v)
                    if check_prompts:
                        self._decode_prompt(entry, self._read_prompt_bytes(entry))
                    found.append(entry)
                except BankError as e:
                    # readers take no lock: a writer may have removed it since the listing
                    # (renamed out whole), which is not an error of the listing
                    if not self._entry_dir(t, v).is_dir():
                        continue
                    if problems is None:
                        raise
                    where = os.fspath(e.file or self.root)
                    problems.append(BankProblem(format_ref(t, v), where, e.message))
        return found

    def _read_prompt_bytes(self, entry: BankEntry) -> bytes:
        path = self._inside(entry.prompt_path, key=entry.ref)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BankError("entry has no prompt.safetensors", file=path, key=entry.ref) from None

    def _decode_prompt(self, entry: BankEntry, data: bytes) -> np.ndarray:
        """The tensor in ``data`` after checking checksum, keys, dtype, shape and values
        against meta (as a numpy array: listing and verifying a bank need no torch)."""
        path = entry.prompt_path
        actual = sha256_bytes(data)
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
        if prompt.dtype != np.float32 or tuple(prompt.shape) != expected:
            raise BankError(
                f"tensor is {prompt.dtype} {tuple(prompt.shape)}, meta.json says float32 {expected}",
                file=path,
                key=entry.ref,
            )
        if not np.isfinite(prompt).all():  # checksums only say the bytes are unchanged
            raise BankError("prompt has NaN or infinite values", file=path, key=entry.ref)
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
        directory = model_dir(model)
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

    @staticmethod
    def _warn_unpinned(entry: BankEntry, model: nn.Module) -> None:
        """Say so when a trained model gets another prompt for a task than the one its lineage
        records it was trained with (by content: the same prompt under another ref is fine)."""
        directory = model_dir(model)
        record = read_lineage(directory) if directory and Path(directory).is_dir() else {}
        pin = (record.get("prompts") or {}).get(entry.task) or {}
        if pin.get("sha256") and pin["sha256"] != entry.meta["sha256"]:
            warnings.warn(
                f"{directory}: task {entry.task} gets {entry.ref} (sha256 "
                f"{str(entry.meta['sha256'])[:12]}...), but this model was trained with "
                f"{pin.get('ref')} (sha256 {pin['sha256'][:12]}...); "
                f"multipromot.load_trained({directory!r}) loads the prompts it was trained with",
                UnpinnedPromptWarning,
                stacklevel=3,
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
        import torch  # deferred: torch imports slowly (listing a bank needs none)

        entry = ref if isinstance(ref, BankEntry) else self.get(ref)
        prompt = torch.from_numpy(self._decode_prompt(entry, self._read_prompt_bytes(entry)))
        if model is not None or accept is not None:
            self._check_fingerprint(entry, model, accept)
        if model is not None:
            self._warn_unpinned(entry, model)
        if model is not None and model_dim(model) != entry.dim:
            raise BankError(
                f"prompt is [{entry.prompt_length}, {entry.dim}] but the model's embeddings "
                f"have d={model_dim(model)}",
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
        prompt = validate_prompt(prompt, key=task)
        base_model = validate_base_model(base_model, key=task)
        format = jsonable(format, key=task) if format is not None else None
        stage1 = jsonable(stage1, key=task) if stage1 is not None else None
        # deferred: torch imports slowly (listing a bank needs none)
        from safetensors.torch import save as save_safetensors_bytes

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
                "created": now(),
                "sha256": sha256_bytes(data),
                "stage2": [],
            }
            if extra:
                meta["extra"] = jsonable(extra, key=task)
            # the whole entry is written in a temp dir on the same filesystem, then renamed:
            # a kill leaves the complete entry or nothing
            # (made with mkdir, not mkdtemp, so it gets the umask's mode, 0755 by default,
            # not 0700: a colleague on a shared filesystem can read the bank)
            tmp = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                write_durably(tmp / PROMPT_FILE, data)
                write_durably(tmp / META_FILE, meta_bytes(meta))
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
                stage2.append({"checkpoint": checkpoint, "recorded": now()})
            meta["stage2"] = stage2
            write_atomic(self._inside(entry.meta_path, key=entry.ref), meta_bytes(meta))
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
                        f"{version_dir(current[task])}); name one version ({task}@v1) or pass "
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
                        f"{task} would move to {version_dir(rest[-1])}"
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

    # ------------------------------------------------------------------ checks and interop

    def verify(
        self, *, model: nn.Module | None = None, accept: Iterable[str] | None = None
    ) -> list[BankProblem]:
        """Check the whole bank; see :func:`multipromot.bank.verify.verify_bank`."""
        return verify_bank(self, model=model, accept=accept)

    def export_peft(self, ref: str, out_dir: str | os.PathLike, **kwargs) -> Path:
        """Write an entry as a PEFT adapter; see :func:`multipromot.bank.peft.export_peft`."""
        return export_peft(self, ref, out_dir, **kwargs)

    def import_peft(self, adapter_dir: str | os.PathLike, task: str, **kwargs) -> BankEntry:
        """Add a PEFT adapter as a new version; see :func:`multipromot.bank.peft.import_peft`."""
        return import_peft(self, adapter_dir, task, **kwargs)

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
        ta = self._decode_prompt(ea, self._read_prompt_bytes(ea)).astype(np.float64)
        tb = self._decode_prompt(eb, self._read_prompt_bytes(eb)).astype(np.float64)
        same_shape = ta.shape == tb.shape
        result = {
            "a": ea.ref,
            "b": eb.ref,
            "shape_a": list(ta.shape),
            "shape_b": list(tb.shape),
            "norm_a": float(np.linalg.norm(ta)),
            "norm_b": float(np.linalg.norm(tb)),
            "mean_row_norm_a": float(np.linalg.norm(ta, axis=1).mean()),
            "mean_row_norm_b": float(np.linalg.norm(tb, axis=1).mean()),
            "cosine": None,
            "cosine_mean_per_position": None,
            "l2_distance": None,
            "stage1_a": ea.meta.get("stage1"),
            "stage1_b": eb.meta.get("stage1"),
            "same_base_model": ea.fingerprint == eb.fingerprint,
        }
        if same_shape:
            result["cosine"] = float(_cosine(ta.reshape(1, -1), tb.reshape(1, -1))[0])
            result["cosine_mean_per_position"] = float(_cosine(ta, tb).mean())
            result["l2_distance"] = float(np.linalg.norm(ta - tb))
        return result


def _cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Row-wise cosine similarity (torch's ``cosine_similarity``: each norm clamped at eps)."""
    norms = np.maximum(np.linalg.norm(a, axis=1), eps) * np.maximum(np.linalg.norm(b, axis=1), eps)
    return (a * b).sum(axis=1) / norms
