"""Check a prompt bank against the log of the writers that wrote it (see bank_writer.py).

:func:`replay` turns the log into what must be true: entries whose ``add`` finished and that no
finished or interrupted ``remove`` touched must be on disk with the logged checksum, every
finished stage-2 record must be in its entry's meta.json, and (one writer at a time) every
task's current version is the one the last finished operation set. :func:`check_bank` asserts
that, plus: every entry on disk loads (checksum verified) and holds exactly the prompt of the
(writer, seq) it claims, and was written by a logged ``add``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from multipromot.bank import PromptBank

from .bank_writer import prompt_for


@dataclass
class Expected:
    """What a log says must be in the bank."""

    present: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # ref -> w, seq, sha
    removed: set[str] = field(default_factory=set)
    stage2: dict[str, set[str]] = field(default_factory=dict)  # ref -> checkpoints recorded
    current: dict[str, str] = field(default_factory=dict)  # task -> ref (one writer only)
    in_flight: list[dict] = field(default_factory=list)  # begun, neither done nor failed
    done_ops: int = 0

    def uncertain_refs(self) -> set[str]:
        return {op["ref"] for op in self.in_flight if "ref" in op}

    def uncertain_tasks(self) -> set[str]:
        tasks = set()
        for op in self.in_flight:
            if op["op"] == "add":
                tasks.add(op["task"])
            elif op["op"] in ("set_current", "remove"):
                tasks.add(op["ref"].split("@")[0])
        return tasks

    def in_flight_adds(self) -> set[tuple[str, int]]:
        return {(op["w"], op["seq"]) for op in self.in_flight if op["op"] == "add"}


def read_log(path: str | os.PathLike) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def replay(records: list[dict]) -> Expected:
    exp = Expected()
    open_ops: dict[tuple[str, int], dict] = {}
    for r in records:
        key = (r["w"], r["seq"])
        if r["phase"] == "begin":
            open_ops[key] = r
            continue
        open_ops.pop(key, None)
        if r["phase"] == "failed":
            continue
        exp.done_ops += 1
        if r["op"] == "add":
            exp.present[r["ref"]] = (r["w"], r["seq"], r["sha256"])
            exp.stage2[r["ref"]] = set()
            exp.current[r["task"]] = r["ref"]
        elif r["op"] == "remove":
            exp.present.pop(r["ref"], None)
            exp.stage2.pop(r["ref"], None)
            exp.removed.add(r["ref"])
        elif r["op"] == "record_stage2":
            exp.stage2.setdefault(r["ref"], set()).add(r["checkpoint"])
        elif r["op"] == "set_current":
            exp.current[r["ref"].split("@")[0]] = r["ref"]
    exp.in_flight = list(open_ops.values())
    return exp


def check_bank(root: str | os.PathLike, records: list[dict], *, one_writer: bool) -> Expected:
    """Assert the bank at ``root`` is what the log ``records`` says; returns the expectation.

    Raises:
        AssertionError: naming the entry and what is wrong.
    """
    exp = replay(records)
    bank = PromptBank(root)
    entries = {e.ref: e for e in bank.entries()}  # every meta.json parses and fits its dir
    uncertain = exp.uncertain_refs()
    in_flight_adds = exp.in_flight_adds()
    for ref, entry in entries.items():
        prompt = bank.load_prompt(entry)  # sha256, name, dtype and shape checked
        extra = entry.meta.get("extra") or {}
        writer, seq = extra.get("writer"), extra.get("seq")
        assert torch.equal(prompt, prompt_for(writer, seq)), (
            f"{ref}: not the prompt of {writer}/{seq}"
        )
        if ref in exp.present:
            assert exp.present[ref][:2] == (writer, seq), f"{ref}: mixed up with {exp.present[ref]}"
            assert entry.meta["sha256"] == exp.present[ref][2], f"{ref}: checksum changed"
        else:
            assert (writer, seq) in in_flight_adds, f"{ref}: on disk but no logged add made it"
        recorded = {s["checkpoint"] for s in entry.stage2}
        must = exp.stage2.get(ref, set())
        assert must <= recorded, f"{ref}: lost stage-2 records {sorted(must - recorded)}"
        extra_records = recorded - must
        may = {op["checkpoint"] for op in exp.in_flight if op["op"] == "record_stage2"}
        assert extra_records <= may, f"{ref}: stage-2 records nobody made {sorted(extra_records)}"
    lost = sorted(set(exp.present) - set(entries) - uncertain)
    assert not lost, f"entries lost: {lost}"
    if one_writer:
        busy = exp.uncertain_tasks()
        for task, ref in exp.current.items():
            if task in busy or ref not in exp.present:
                continue
            assert bank.get(task).ref == ref, f"{task}: current is {bank.get(task).ref}, not {ref}"
    return exp


def leftovers(root: str | os.PathLike) -> dict[str, int]:
    """Temporary files and directories a killed writer may leave, by kind."""
    root = Path(root)
    found = {"tmp_dirs": 0, "trash_dirs": 0, "index_tmp": 0, "meta_tmp": 0}
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if child.name.startswith(".tmp-"):
            found["tmp_dirs"] += 1
        elif child.name.startswith(".trash-"):
            found["trash_dirs"] += 1
        elif child.name.startswith(".index.json."):
            found["index_tmp"] += 1
    found["meta_tmp"] = sum(1 for _ in root.glob("*/v*/.meta.json.*"))
    return found


def settle(root: str | os.PathLike, log: str | os.PathLike) -> list[dict]:
    """Close the log's interrupted operations with what the bank shows they did.

    A killed operation either took effect or not (that is what :func:`check_bank` allows);
    writing down which lets later checks be exact again instead of leaving its entry and task
    uncertain forever. Returns the interrupted operations.
    """
    records = read_log(log)
    exp = replay(records)
    bank = PromptBank(root)
    entries = {e.ref: e for e in bank.entries()} if Path(root).is_dir() else {}
    lines = []
    for op in exp.in_flight:
        base = {k: v for k, v in op.items() if k != "phase"}
        outcome: dict = {"phase": "failed", "error": "killed before it took effect"}
        if op["op"] == "add":
            made = [
                e
                for e in entries.values()
                if (e.meta.get("extra") or {}) == {"writer": op["w"], "seq": op["seq"]}
            ]
            if made:
                outcome = {"phase": "done", "ref": made[0].ref, "sha256": made[0].meta["sha256"]}
        elif op["op"] == "remove":
            if op["ref"] not in entries:
                outcome = {"phase": "done"}
        elif op["op"] == "record_stage2":
            entry = entries.get(op["ref"])
            if entry and any(s["checkpoint"] == op["checkpoint"] for s in entry.stage2):
                outcome = {"phase": "done"}
        elif op["op"] == "set_current":
            task = op["ref"].split("@")[0]
            base["ref"] = bank.get(task).ref  # the old current or the new one: both are fine
            outcome = {"phase": "done"}
        lines.append({**base, **outcome, "settled": True})
    with open(log, "a") as f:
        for line in lines:
            f.write(json.dumps(line, sort_keys=True) + "\n")
    return exp.in_flight
