"""``bank verify``: check a whole bank without trusting its index.

Every entry's ``meta.json`` (its own checksum, consistency with its directory), tensor (sha256,
name, dtype, shape), the index against the disk, symlinks, and fingerprints against the base
model directories (and a given model). Findings are :class:`BankProblem` lines, never
exceptions, so one bad entry does not hide the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multipromot.bank.entry import (
    INDEX_CHECKSUM_KEY,
    INDEX_FILE,
    BankEntry,
    BankProblem,
    checksum_problem,
    format_ref,
    model_dim,
    parse_version_dir,
)
from multipromot.errors import BankError
from multipromot.models import read_lineage

if TYPE_CHECKING:
    from torch import nn

__all__ = ["verify_bank"]

# The functions take the bank (a multipromot.bank.store.PromptBank) as an argument: the store
# calls them from its methods, so this module cannot import it.


def verify_bank(
    bank: Any, *, model: nn.Module | None = None, accept: Iterable[str] | None = None
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
    root = os.fspath(bank.root)
    if not bank.root.is_dir():
        return [BankProblem(None, root, "no prompt bank here (not a directory)")]
    index_path = os.fspath(bank.root / INDEX_FILE)
    index_readable = True
    try:
        index = bank._read_index_unchecked()
    except BankError as e:
        problems.append(BankProblem(None, index_path, e.message))
        index, index_readable = {}, False
    problems += _verify_layout(bank)
    disk, current, _ = bank._state(index) if index else (bank._disk_versions(), {}, {})
    checking = model is not None or accept is not None
    accepted = bank.accepted_fingerprints(model, accept) if checking else None
    entries: dict[str, BankEntry] = {}
    for task, versions in disk.items():
        for version in versions:
            ref = format_ref(task, version)
            try:
                entry = bank._read_entry(task, version, current=current.get(task) == version)
                bank._decode_prompt(entry, bank._read_prompt_bytes(entry))
            except BankError as e:
                problems.append(BankProblem(ref, e.file or root, e.message))
                continue
            entries[ref] = entry
            problems += _verify_fingerprint(entry, accepted, model)
    if index:
        drift = _verify_index(index, disk, entries, index_path)
        problems += drift
        checksum = checksum_problem(index, INDEX_CHECKSUM_KEY)
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
            BankProblem(None, index_path, "missing; `multipromot bank verify --fix` rebuilds it")
        )
    return problems


def _verify_layout(bank: Any) -> list[BankProblem]:
    problems = []
    for task_dir in sorted(bank.root.iterdir()):
        if task_dir.name.startswith(".") or task_dir.name == INDEX_FILE:
            continue
        if task_dir.is_symlink():
            problems.append(
                BankProblem(None, os.fspath(task_dir), "is a symlink; banks hold real directories")
            )
            continue
        if not task_dir.is_dir():
            continue
        for child in sorted(task_dir.iterdir()):
            if child.is_symlink():
                problems.append(
                    BankProblem(None, os.fspath(child), "is a symlink; banks hold real directories")
                )
            elif (
                child.is_dir()
                and parse_version_dir(child.name) is None
                and not child.name.startswith(".")
            ):
                problems.append(
                    BankProblem(None, os.fspath(child), "is not a version directory (v0001, ...)")
                )
    return problems


def _verify_fingerprint(
    entry: BankEntry, accepted: set[str] | None, model: nn.Module | None
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
    if model is not None and model_dim(model) != entry.dim:
        problems.append(
            BankProblem(
                entry.ref,
                os.fspath(entry.prompt_path),
                f"d={entry.dim} but the model has d={model_dim(model)}",
            )
        )
    return problems


def _verify_index(
    index: dict, disk: dict[str, list[int]], entries: dict[str, BankEntry], index_path: str
) -> list[BankProblem]:
    problems = []
    listed = {s.get("ref"): s for s in index.get("entries") or [] if isinstance(s, dict)}
    on_disk = {format_ref(t, v) for t, vs in disk.items() for v in vs}
    for ref in sorted(on_disk - set(listed)):
        problems.append(BankProblem(ref, index_path, "entry on disk is missing from the index"))
    for ref in sorted(set(listed) - on_disk):
        problems.append(BankProblem(ref, index_path, "index lists an entry that is not on disk"))
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
