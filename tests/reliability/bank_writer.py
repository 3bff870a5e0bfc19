"""A prompt-bank writer for the kill -9 and concurrent-writer tests (not collected by pytest).

    python tests/reliability/bank_writer.py write BANK LOG --writer W --ops N [--seed S]
            [--start-at FILE]
        N random operations on BANK, then exit 0 (several of these run at once; FILE is a
        start barrier, so that they all write at the same time)
    python tests/reliability/bank_writer.py forkserver
        one JSON request per stdin line, answered by one JSON line:
        {"bank", "log", "writer", "seed", "delay"}: fork a child that writes to the bank
            forever and SIGKILL it ``delay`` seconds later;
        {"bank", "log", "writers", "ops", "seed"}: fork ``writers`` children (w0, w1, ...) that
            write at the same time, ``ops`` operations each, and wait for them

The fork server imports torch once; a fresh interpreter per trial would cost seconds each.

Operations, chosen at random (seeded): add a new version of a task (it becomes current),
record a stage-2 checkpoint on one of this writer's entries (rewrites its meta.json), make one
of this writer's entries current, remove one of this writer's non-current entries. Every prompt
is a pure function of (writer, seq), recorded in ``meta.extra``, so a checker can regenerate it
and tell a mixed-up entry from a right one.

The log is one JSON object per line, appended with O_APPEND: ``{"w", "seq", "op", ...,
"phase": "begin"}`` before an operation and ``"phase": "done"`` (or ``"failed"`` with the
BankError) after it. A kill leaves at most one operation per writer begun and not done.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

TASKS = ("rte", "cb", "wmt14_en_fr")
DIM = 64
BASE_MODEL = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}
MAX_ENTRIES = 16  # above this many entries, a writer removes more than it adds


def prompt_for(writer: str, seq: int):
    """The prompt of (writer, seq): shape and values are a pure function of the pair."""
    import torch

    seed = int.from_bytes(f"{writer}/{seq}".encode(), "little") % (2**63)
    gen = torch.Generator().manual_seed(seed)
    length = 4 + seed % 97  # 4..100 rows: entries of different sizes
    return torch.randn(length, DIM, generator=gen)


def _log(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())


def _mine(entries: list, writer: str) -> list:
    """This writer's entries (by meta.extra.writer)."""
    return [e for e in entries if (e.meta.get("extra") or {}).get("writer") == writer]


def one_operation(
    bank, writer: str, seq: int, rng: random.Random, fd: int, *, cleaning: bool = False
) -> None:
    """Choose and run one operation, logging begin and done/failed.

    ``cleaning``: an operation that starts with the bank's cleanup of a killed writer's
    leftovers (an add, or a remove when the bank is crowded).
    """
    from multipromot.errors import BankError

    entries = bank.entries()
    mine = _mine(entries, writer)
    crowded = len(entries) > MAX_ENTRIES
    roll = rng.random()
    non_current = [e for e in mine if not e.current]
    if cleaning:
        roll = 0.0 if crowded and non_current else 1.0  # remove or add
    if non_current and (roll < 0.15 or (crowded and roll < 0.6)):
        entry = rng.choice(non_current)
        op = {"op": "remove", "ref": entry.ref}
    elif mine and roll < 0.30:
        op = {
            "op": "record_stage2",
            "ref": rng.choice(mine).ref,
            "checkpoint": f"ckpt/{writer}/{seq}",
        }
    elif mine and roll < 0.40:
        op = {"op": "set_current", "ref": rng.choice(mine).ref}
    else:
        op = {"op": "add", "task": rng.choice(TASKS)}
    base = {"w": writer, "seq": seq, **op}
    _log(fd, {**base, "phase": "begin"})
    try:
        if op["op"] == "add":
            prompt = prompt_for(writer, seq)
            entry = bank.add(
                op["task"],
                prompt,
                base_model=BASE_MODEL,
                init="random",
                stage1={"steps": seq, "metric": "accuracy", "value": 0.5},
                extra={"writer": writer, "seq": seq},
            )
            result = {"ref": entry.ref, "sha256": entry.meta["sha256"]}
        elif op["op"] == "record_stage2":
            bank.record_stage2(op["ref"], op["checkpoint"])
            result = {}
        elif op["op"] == "set_current":
            bank.set_current(op["ref"])
            result = {}
        else:
            bank.remove(op["ref"], force=True)  # force: it may carry stage-2 records
            result = {}
    except BankError as e:
        _log(fd, {**base, "phase": "failed", "error": str(e)})
        return
    _log(fd, {**base, **result, "phase": "done"})


def write(
    bank_dir: str, log: str, writer: str, ops: int | None, seed: int, *, cleaning: bool = False
) -> None:
    """Run ``ops`` operations (forever when None); ``cleaning``: see :func:`one_operation`."""
    from multipromot.bank import PromptBank

    bank = PromptBank(bank_dir, lock_timeout=120)
    rng = random.Random(seed)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    seq = _next_seq(log, writer)
    count = 0
    while ops is None or count < ops:
        one_operation(bank, writer, seq, rng, fd, cleaning=cleaning)
        seq += 1
        count += 1
    os.close(fd)


def _next_seq(log: str, writer: str) -> int:
    """Sequence numbers continue across kills, so (writer, seq) never repeats."""
    last = -1
    if os.path.exists(log):
        for line in Path(log).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("w") == writer:
                last = max(last, record["seq"])
    return last + 1


def forkserver() -> None:
    import safetensors.torch  # noqa: F401

    import multipromot.bank  # noqa: F401  (import once, before forking)

    prompt_for("warm", 0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "writers" in request:
            print(json.dumps(_concurrent(request)), flush=True)
            continue
        pid = _fork_writer(
            request["bank"], request["log"], request["writer"], None, request["seed"]
        )
        time.sleep(request["delay"])
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"killed": killed, "status": status}), flush=True)


def _fork_writer(bank: str, log: str, writer: str, ops: int | None, seed: int) -> int:
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's cleanup
        code = 0
        try:
            write(bank, log, writer, ops, seed)
        except BaseException as e:  # reported through the exit status; details on stderr
            print(f"writer {writer}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code if ops is not None else 3)  # a writer without an end never returns
    return pid


def _concurrent(request: dict) -> dict:
    """Fork ``writers`` writers at once, each doing ``ops`` operations; wait for them all."""
    pids = [
        _fork_writer(request["bank"], request["log"], f"w{i}", request["ops"], request["seed"] + i)
        for i in range(request["writers"])
    ]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return {"exit_codes": codes}


def main(argv: list[str]) -> int:
    if argv[:1] == ["forkserver"]:
        forkserver()
        return 0
    if argv[:1] == ["write"]:
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("bank")
        parser.add_argument("log")
        parser.add_argument("--writer", required=True)
        parser.add_argument("--ops", type=int, required=True)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--start-at", help="wait until this file exists (a start barrier)")
        args = parser.parse_args(argv[1:])
        import multipromot.bank  # noqa: F401  (import before the barrier: start together)

        prompt_for("warm", 0)
        while args.start_at and not os.path.exists(args.start_at):
            time.sleep(0.01)
        write(args.bank, args.log, args.writer, args.ops, args.seed)
        return 0
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
