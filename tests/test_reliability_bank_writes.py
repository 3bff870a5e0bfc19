"""Prompt-bank writes under kill -9 and under concurrent writers.

Kill -9: a fork server (tests/reliability/bank_writer.py) forks a writer that adds versions,
records stage-2 checkpoints (meta.json rewrites), moves ``current`` and removes entries in a
loop, and SIGKILLs it after a random delay. After every kill the bank is checked against the
writer's log (tests/reliability/bankcheck.py): every entry is complete and holds exactly its
prompt, or is absent; nothing finished is lost. Then one more add (the next writer) must clean
up, after which ``verify`` finds nothing and no temporary file is left.

Concurrency: several forked writers work on one bank at the same time; no entry is lost,
duplicated or mixed up. A writer that cannot get the lock gets one clear line, and a killed
lock holder never leaves a stale lock.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from reliability import tally
from reliability.bank_writer import write
from reliability.bankcheck import check_bank, leftovers, read_log, replay, settle

from multipromot.bank import INDEX_FILE, PromptBank
from multipromot.cli import main

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("reliability") / "bank_writer.py"
BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


class ForkServer:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), "forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


# ----------------------------------------------------------------------------- kill -9


def _kill_trials(server: ForkServer, tmp_path: Path, trials: int, seed: int, max_delay: float):
    bank_dir, log = tmp_path / "bank", tmp_path / "writer.jsonl"
    rng = random.Random(seed)
    seen: Counter = Counter()
    survived = 0
    for trial in range(trials):
        delay = rng.uniform(0.0, max_delay)
        answer = server.ask(
            bank=str(bank_dir), log=str(log), writer="k", seed=seed * 100_000 + trial, delay=delay
        )
        assert answer["killed"], answer

        check_bank(bank_dir, read_log(log), one_writer=True)  # the killed op: done or not at all
        interrupted = settle(bank_dir, log)
        check_bank(bank_dir, read_log(log), one_writer=True)  # exact again: nothing uncertain
        for op in interrupted:
            seen[f"killed during {op['op']}"] += 1
        seen["killed between operations"] += not interrupted
        for kind, n in leftovers(bank_dir).items():
            seen[f"left {kind}"] += bool(n)
        if bank_dir.is_dir():
            problems = PromptBank(bank_dir).verify()
            # only the index may lag behind disk (the writer died before rewriting it)
            assert all(p.file == str(bank_dir / INDEX_FILE) for p in problems), problems
            seen["verify clean right after the kill"] += not problems
            seen["index behind disk after the kill"] += bool(problems)

        # the next writer: an add (or remove) cleans up and rewrites the index
        write(str(bank_dir), str(log), "k", 1, seed, cleaning=True)
        expected = check_bank(bank_dir, read_log(log), one_writer=True)
        assert PromptBank(bank_dir).verify() == []
        assert not any(leftovers(bank_dir).values()), leftovers(bank_dir)
        survived += 1
    return {
        "trials": trials,
        "survived": survived,
        "seen": dict(seen),
        "entries_at_end": len(PromptBank(bank_dir).entries()),
        "operations_finished": expected.done_ops,
    }


def _record_kills(name: str, result: dict, max_delay: float) -> None:
    tally.record(
        name,
        fault=f"kill -9 of a bank writer at a random moment (0-{max_delay:g} s into its loop)",
        trials=result["trials"],
        survived=result["survived"],
        data_lost=result["trials"] - result["survived"],
        **{k: v for k, v in result.items() if k not in ("trials", "survived")},
    )


def test_kill_9_during_bank_writes(server, tmp_path):
    result = _kill_trials(server, tmp_path, trials=20, seed=1, max_delay=0.4)
    _record_kills("bank_kill_fast", result, 0.4)
    assert result["survived"] == 20
    # the kills did land inside operations, not only between them
    assert sum(v for k, v in result["seen"].items() if k.startswith("killed during")) >= 5


@pytest.mark.slow
def test_kill_9_during_bank_writes_stress(server, tmp_path):
    result = _kill_trials(server, tmp_path, trials=300, seed=2, max_delay=0.6)
    _record_kills("bank_kill_stress", result, 0.6)
    assert result["survived"] == 300
    seen = result["seen"]
    for op in ("add", "remove", "record_stage2", "set_current"):
        assert seen.get(f"killed during {op}", 0) > 0, seen
    assert seen.get("index behind disk after the kill", 0) > 0, seen


# ----------------------------------------------------------------------------- concurrency


def _concurrent_round(server: ForkServer, tmp_path: Path, writers: int, ops: int, seed: int):
    bank, log = tmp_path / "bank", tmp_path / "writers.jsonl"
    before = len(read_log(log))
    answer = server.ask(bank=str(bank), log=str(log), writers=writers, ops=ops, seed=seed)
    assert answer["exit_codes"] == [0] * writers, answer
    records = read_log(log)
    expected = check_bank(bank, records, one_writer=False)  # the whole history, every round
    assert not expected.in_flight
    # no version was handed out twice: every finished add is its own entry
    added = [r["ref"] for r in records if r["op"] == "add" and r["phase"] == "done"]
    assert len(added) == len(set(added))
    assert PromptBank(bank).verify() == []
    records = records[before:]  # this round's figures
    added = [r for r in records if r["op"] == "add" and r["phase"] == "done"]
    # the writers really overlapped: operations of different writers interleave in the log
    running: set[str] = set()
    overlaps = 0
    for r in records:
        if r["phase"] == "begin":
            overlaps += bool(running - {r["w"]})
            running.add(r["w"])
        else:
            running.discard(r["w"])
    return {
        "added": len(added),
        "overlapping_operations": overlaps,
        "operations": sum(r["phase"] != "begin" for r in records),
    }


def test_concurrent_writers_lose_and_mix_up_nothing(server, tmp_path):
    result = _concurrent_round(server, tmp_path, writers=4, ops=12, seed=0)
    assert result["added"] > 0 and result["overlapping_operations"] > 0
    tally.record(
        "bank_concurrent_fast",
        fault="4 processes adding/recording/moving current/removing on one bank at once",
        trials=1,
        survived=1,
        data_lost=0,
        **result,
    )
    # the checker is not blind: an entry that vanishes is reported as lost
    records = read_log(tmp_path / "writers.jsonl")
    task, version = next(iter(replay(records).present)).split("@")
    shutil.rmtree(tmp_path / "bank" / task / version)
    with pytest.raises(AssertionError, match="entries lost"):
        check_bank(tmp_path / "bank", records, one_writer=False)


@pytest.mark.slow
def test_concurrent_writers_stress(server, tmp_path):
    rounds, totals = 10, Counter()
    for round_ in range(rounds):
        totals.update(_concurrent_round(server, tmp_path, writers=6, ops=30, seed=round_ * 10))
    assert totals["overlapping_operations"] > 0
    tally.record(
        "bank_concurrent_stress",
        fault="6 processes writing one bank at once, 30 operations each (10 rounds)",
        trials=rounds,
        survived=rounds,
        data_lost=0,
        **dict(totals),
    )


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process that takes the bank lock and keeps it."""
    code = (
        "import sys, time\nfrom filelock import FileLock\n"
        "lock = FileLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_timeout_is_one_clear_line_and_a_killed_holder_frees_the_lock(
    tmp_path, capsys, monkeypatch
):
    root = tmp_path / "bank"
    bank = PromptBank(root)
    bank.add("rte", torch.ones(4, 8), base_model=BASE)
    bank.add("rte", torch.zeros(4, 8), base_model=BASE)
    holder = _hold_lock(root / ".lock")
    try:
        waiting = PromptBank(root, lock_timeout=0.3)
        with pytest.raises(Exception) as err:
            waiting.add("rte", torch.ones(4, 8), base_model=BASE)
        assert str(err.value) == (
            f"{root / '.lock'}: another process holds the bank lock (waited 0.3 s); retry when "
            "it has finished writing"
        )
        # the command: one line on stderr, exit status 2, the bank untouched
        monkeypatch.setitem(PromptBank.__init__.__kwdefaults__, "lock_timeout", 0.3)
        capsys.readouterr()
        assert main(["bank", "rm", "rte@v1", "--bank", str(root)]) == 2
        out, err_text = capsys.readouterr()
        assert err_text.count("\n") == 1 and "another process holds the bank lock" in err_text
        assert "Traceback" not in out + err_text
        assert bank.versions("rte") == [1, 2]
        assert torch.equal(bank.load_prompt("rte"), torch.zeros(4, 8))  # readers need no lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 of the holder released the lock: the next writer gets it on its first try
    entry = PromptBank(root, lock_timeout=0).add("rte", torch.ones(4, 8), base_model=BASE)
    assert entry.version == 3
    assert bank.verify() == []


def test_listing_while_another_writer_removes_an_entry(tmp_path, monkeypatch):
    """Readers take no lock: an entry removed between the listing of the directories and the
    reading of its meta.json is simply not listed (it used to fail with 'no such entry')."""
    root = tmp_path / "bank"
    bank = PromptBank(root)
    for i in range(3):
        bank.add("rte", torch.full((4, 8), float(i)), base_model=BASE)
    real = PromptBank._read_entry
    raced = []

    def racing(self, task, version, **kwargs):
        if (task, version) == ("rte", 2) and not raced:
            raced.append(True)
            PromptBank(root).remove("rte@v2")  # another writer, right now
        return real(self, task, version, **kwargs)

    monkeypatch.setattr(PromptBank, "_read_entry", racing)
    assert [e.ref for e in PromptBank(root).entries()] == ["rte@v0001", "rte@v0003"]
    assert raced
    monkeypatch.undo()
    assert bank.verify() == []
