"""Numerical and disk faults: a disk that fills up in the middle of a save leaves every earlier
bank entry and checkpoint intact; a NaN/Inf loss stops training with a clear message.

Disk full is simulated by making the n-th ``os.fsync`` of an operation raise
``OSError(ENOSPC)`` (every durable write of the bank and of the checkpoints goes through one,
and a real full disk reports there or at the write before it), for every n the operation has.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from reliability import tally
from test_checkpoint import _train, _trainer  # the tiny trainer of those tests

from multipromot.bank import PromptBank
from multipromot.train import checkpoint as checkpoint_module
from multipromot.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


class DiskFull:
    """``os.fsync`` that fails with ENOSPC on its ``fail_at``-th call (counting from 1)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls = fail_at, 0
        self.real = os.fsync

    def __call__(self, fd):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd)


def _snapshot(root: Path) -> dict:
    bank = PromptBank(root)
    return {
        "current": {t: bank.get(t).ref for t in bank.tasks()},
        "prompts": {e.ref: bank.load_prompt(e) for e in bank.entries()},
        "stage2": {e.ref: e.stage2 for e in bank.entries()},
    }


def _bank(root: Path) -> PromptBank:
    bank = PromptBank(root)
    for i in range(3):
        bank.add("rte", torch.full((4, 8), float(i)), base_model=BASE)
    bank.add("cb", torch.ones(4, 8), base_model=BASE)
    bank.set_current("rte@v2")
    bank.record_stage2("rte@v2", "runs/a/final")
    return bank


OPERATIONS = {
    "add": lambda b: b.add("rte", torch.full((4, 8), 9.0), base_model=BASE),
    "add_new_task": lambda b: b.add("wnli", torch.full((4, 8), 7.0), base_model=BASE),
    "record_stage2": lambda b: b.record_stage2("rte@v1", "runs/b/final"),
    "set_current": lambda b: b.set_current("rte@v3"),
    "remove": lambda b: b.remove("rte@v1", force=True),
    "rebuild_index": lambda b: b.rebuild_index(),
}


def _count_fsyncs(tmp_path: Path, operation) -> int:
    counter = DiskFull(fail_at=0)
    root = tmp_path / "count"
    bank = _bank(root)
    os.fsync, real = counter, os.fsync
    try:
        operation(bank)
    finally:
        os.fsync = real
    return counter.calls


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_disk_full_during_a_bank_write_keeps_earlier_state(tmp_path, monkeypatch, name):
    operation = OPERATIONS[name]
    points = _count_fsyncs(tmp_path, operation)
    assert points >= 1
    outcomes = {}
    for fail_at in range(1, points + 1):
        root = tmp_path / f"fail{fail_at}"
        bank = _bank(root)
        before = _snapshot(root)
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", DiskFull(fail_at))
            with pytest.raises(OSError) as err:
                operation(bank)
        assert err.value.errno == errno.ENOSPC
        after = _snapshot(root)
        # every entry that was there is still there, bit for bit, with its stage-2 records
        for ref, prompt in before["prompts"].items():
            if name == "remove" and ref == "rte@v0001" and ref not in after["prompts"]:
                continue  # the removal itself got through before the index write failed
            assert torch.equal(after["prompts"][ref], prompt), (name, fail_at, ref)
            # earlier stage-2 records kept; a new one only if it is this operation's own
            added = [s for s in after["stage2"][ref] if s not in before["stage2"][ref]]
            assert after["stage2"][ref][: len(before["stage2"][ref])] == before["stage2"][ref]
            assert [s["checkpoint"] for s in added] in ([], ["runs/b/final"]), (name, fail_at)
        untouched = {t: r for t, r in before["current"].items() if t != "rte"}
        assert {t: after["current"][t] for t in untouched} == untouched
        # what verify says right after (only the index may lag), then after the next write
        problems = bank.verify()
        assert all(p.file == str(root / "index.json") for p in problems), problems
        outcomes[fail_at] = "index behind" if problems else "clean"
        bank.add("cb", torch.zeros(4, 8), base_model=BASE)  # the next writer
        assert bank.verify() == []
        assert not [p for p in root.rglob(".*") if p.name != ".lock"]
    tally.record(
        f"disk_full_bank_{name}",
        fault=f"ENOSPC at every durable write of bank {name}",
        trials=points,
        survived=points,
        data_lost=0,
        verify_right_after=outcomes,
    )


def _checkpoint_dir(tmp_path: Path):
    model, optimizer, scheduler, sampler = _trainer()
    _train(model, optimizer, scheduler, sampler, 2)
    root = tmp_path / "ckpts"
    save_checkpoint(root, 2, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, optimizer, scheduler, sampler, 2)
    return root, good, (model, optimizer, scheduler, sampler)


def test_disk_full_during_a_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    root, good, trainer = _checkpoint_dir(tmp_path / "count")
    counter = DiskFull(fail_at=0)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", counter)
        save_checkpoint(root, 4, model=trainer[0], optimizer=trainer[1])
    points = counter.calls
    assert points >= 3
    kinds = {}
    for fail_at in [*range(1, points + 1), "safetensors"]:
        root, good, (model, optimizer, scheduler, sampler) = _checkpoint_dir(
            tmp_path / f"f{fail_at}"
        )
        with monkeypatch.context() as m:
            if fail_at == "safetensors":

                def full(*args, **kwargs):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                m.setattr(checkpoint_module, "save_file", full)
            else:
                m.setattr(os, "fsync", DiskFull(fail_at))
            with pytest.raises(BaseException) as err:  # noqa: B017 (dcp wraps it in a BaseException)
                save_checkpoint(
                    root, 4, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler
                )
        assert not isinstance(err.value, KeyboardInterrupt)
        kinds[str(fail_at)] = type(err.value).__name__
        latest = latest_checkpoint(root)
        # the pointer either still names step 2, or the failure came after step 4 was whole
        assert latest is not None and latest.name in ("step_2", "step_4")
        fresh, *_ = _trainer(seed=1)
        load_checkpoint(root / "step_2", model=fresh, restore_rng=False)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())
        if latest.name == "step_4":
            load_checkpoint(latest, model=fresh, restore_rng=False)
            assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in good)
        # the next save clears what the failed one left
        save_checkpoint(root, 6, model=model, optimizer=optimizer)
        assert sorted(p.name for p in root.iterdir() if ".tmp" in p.name) == []
    tally.record(
        "disk_full_checkpoint",
        fault="ENOSPC at every durable write of a checkpoint save",
        trials=len(kinds),
        survived=len(kinds),
        data_lost=0,
        raised=kinds,
    )


# ----------------------------------------------------------------------------- NaN / Inf


def _stage2_config(tmp_path_factory, name: str, **stage2):
    from _stage2_utils import dropout_model, make_bank, setup_env, write_config, write_mixture

    base = tmp_path_factory.getbasetemp()
    setup_env(base)
    ws = base / "stage2-ws"
    model = dropout_model(ws / "t5-dropout")
    return write_config(
        tmp_path_factory.mktemp(name) / "config.yaml",
        model=model,
        out_dir=tmp_path_factory.getbasetemp() / name / "out",
        bank=make_bank(ws / "bank", model),
        mixture=write_mixture(ws / "mixture"),
        **stage2,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_loss_stops_stage2_and_keeps_the_last_good_checkpoint(
    tmp_path_factory, monkeypatch, bad
):
    from _stage2_utils import run_in_process

    from multipromot.errors import UserError
    from multipromot.train import stage2

    config = _stage2_config(tmp_path_factory, f"nan-{bad}", eval_every=0)
    real, calls = stage2.token_loss, []

    def diverging(logits, labels, **kwargs):
        loss, n = real(logits, labels, **kwargs)
        calls.append(1)
        return (loss * bad if len(calls) > 6 else loss), n  # step 4 (2 micro-batches a step)

    monkeypatch.setattr(stage2, "token_loss", diverging)
    torch.set_num_threads(1)
    with pytest.raises(UserError, match="(?i)nan|inf|finite") as err:
        run_in_process(config)
    assert "\n" not in str(err.value) and "step 4" in str(err.value)
    out = config.parent.parent / f"nan-{bad}" / "out"
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.name == "step_2"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert all(loss == loss and abs(loss) != float("inf") for _, loss in state["losses"])
