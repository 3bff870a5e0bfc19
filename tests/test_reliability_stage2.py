"""Kill -9 during stage 2, at random moments of training and inside checkpoint saves: the last
good checkpoint is never damaged, and resuming gives exactly the run that was never killed
(same losses, same validation, same final weights).

The killed run is a real process (tests/reliability/stage2_killer.py) that SIGKILLs itself at a
random function-call boundary; the resume and the reference run are in this process, one thread
each, as in tests/test_stage2.py (whose reference run this one shares when both run).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from _stage2_utils import (
    TASKS,
    cached_run,
    dropout_model,
    final_weights,
    loss_diff,
    make_bank,
    max_diff,
    run_in_process,
    setup_env,
    train_losses,
    val_losses,
    write_config,
    write_mixture,
)
from reliability import tally

from multipromot.soft_prompt import PromptedModel
from multipromot.train import checkpoint
from multipromot.train.checkpoint import is_complete, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KILLER = Path(__file__).with_name("reliability") / "stage2_killer.py"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    setup_env(base)
    root = base / "stage2-ws"
    model = dropout_model(root / "t5-dropout")
    return {
        "root": root,
        "mixture": write_mixture(root / "mixture"),
        "model": model,
        "bank": make_bank(root / "bank", model),
    }


def _config(ws, name: str) -> Path:
    return write_config(
        ws["root"] / name / "config.yaml",
        model=ws["model"],
        out_dir=ws["root"] / name / "out",
        bank=ws["bank"],
        mixture=ws["mixture"],
    )


def _straight(ws) -> Path:
    return cached_run("t5-dropout-straight", lambda: run_in_process(_config(ws, "straight")))


def _checkpoint_weights(ws, path: Path) -> dict[str, torch.Tensor]:
    """The model and prompt weights a checkpoint holds."""
    from multipromot.bank import PromptBank
    from multipromot.models import load_model

    model, _, _ = load_model(ws["model"])
    table = torch.stack([PromptBank(ws["bank"]).load_prompt(t) for t in TASKS])
    prompted = PromptedModel(model, table, TASKS)
    checkpoint.load_checkpoint(path, model=prompted, restore_rng=False)
    return {k: v.detach().clone() for k, v in prompted.state_dict().items()}


def _kill(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(KILLER), str(config), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _trial(ws, name: str, args: list[str], seen: Counter) -> None:
    """One killed run, checked, then resumed and compared with the straight run."""
    straight = _straight(ws)
    config = _config(ws, name)
    proc = _kill(config, *args)
    assert proc.returncode in (0, -9), proc.stderr[-3000:]
    out = config.parent / "out"
    ckpts = out / "checkpoints"
    seen["killed" if proc.returncode == -9 else "finished before the kill"] += 1
    seen["left a half-written save"] += any(ckpts.glob("step_*.tmp"))

    # every published checkpoint is whole and equals the straight run's at that step
    published = sorted(p for p in ckpts.glob("step_*") if is_complete(p)) if ckpts.is_dir() else []
    seen[f"{len(published)} checkpoint(s) published before the kill"] += 1
    good = {}
    for path in published:
        reference = straight / "checkpoints" / path.name
        good[path.name] = _checkpoint_weights(ws, path)
        assert max_diff(good[path.name], _checkpoint_weights(ws, reference)) == 0.0, path
    latest = latest_checkpoint(ckpts) if ckpts.is_dir() else None
    assert (latest.name if latest else None) == (published[-1].name if published else None)

    resumed = run_in_process(config)
    assert loss_diff(train_losses(resumed), train_losses(straight)) == 0.0
    assert loss_diff(val_losses(resumed), val_losses(straight)) == 0.0
    assert max_diff(final_weights(resumed), final_weights(straight)) == 0.0
    for step_name, weights in good.items():  # resuming did not damage what was there
        assert max_diff(_checkpoint_weights(ws, ckpts / step_name), weights) == 0.0
    assert not any(ckpts.glob("step_*.tmp"))


def test_kill_9_inside_a_checkpoint_save_then_resume_is_exact(ws):
    fraction = random.Random(0).random()
    seen: Counter = Counter()
    _trial(
        ws,
        "reliability-killed-in-save",
        ["--in-save", "--save", "2", "--fraction", f"{fraction:.6f}"],
        seen,
    )
    assert seen["killed"] == 1 and seen["1 checkpoint(s) published before the kill"] == 1
    tally.record(
        "stage2_kill_fast",
        fault="kill -9 at a random moment inside the second checkpoint save, then resume",
        trials=1,
        survived=1,
        data_lost=0,
        seen=dict(seen),
    )


@pytest.mark.slow
def test_kill_9_at_random_moments_of_stage2_then_resume_is_exact(ws, tmp_path):
    """Calibrate once (how many events a whole run has), then kill at uniformly drawn events
    of the whole run, and at uniformly drawn moments inside the second save."""
    calibration = _config(ws, "calibration")
    count = tmp_path / "count.json"
    proc = _kill(calibration, "--count-out", str(count))
    assert proc.returncode == 0, proc.stderr[-3000:]
    total = json.loads(count.read_text())["events"]
    # a run in another process is the same run as in this one
    straight = _straight(ws)
    assert max_diff(final_weights(calibration.parent / "out"), final_weights(straight)) == 0.0

    rng = random.Random(1)
    seen: Counter = Counter()
    trials = 0
    for i in range(10):
        _trial(ws, f"killed-anywhere-{i}", ["--kill-at", str(rng.randint(1, total))], seen)
        trials += 1
    for i in range(6):
        fraction = f"{rng.random():.6f}"
        _trial(
            ws, f"killed-in-save-{i}", ["--in-save", "--save", "2", "--fraction", fraction], seen
        )
        trials += 1
    tally.record(
        "stage2_kill_stress",
        fault="kill -9 at a random moment of a stage-2 run (10) or inside a checkpoint "
        "save (6), then resume",
        trials=trials,
        survived=trials,
        data_lost=0,
        events_per_run=total,
        seen=dict(seen),
    )


def _fail_in_second_save(m, stage2, fail_at: int) -> dict:
    """Make the ``fail_at``-th fsync of the second checkpoint save raise ENOSPC (0: none, only
    count them)."""
    import errno

    save, real_fsync = checkpoint.save_checkpoint, os.fsync
    state = {"saves": 0, "inside": False, "fsyncs": 0}

    def saving(*args, **kwargs):
        state["saves"] += 1
        state["inside"] = state["saves"] == 2
        try:
            return save(*args, **kwargs)
        finally:
            state["inside"] = False

    def full(fd):
        if state["inside"]:
            state["fsyncs"] += 1
            if state["fsyncs"] == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    m.setattr(stage2, "save_checkpoint", saving)
    m.setattr(os, "fsync", full)
    return state


@pytest.mark.slow
def test_disk_full_in_a_stage2_save_then_resume_is_exact(ws, monkeypatch):
    """ENOSPC at every durable write of the second checkpoint save of a real run: the run
    stops with the error, the first checkpoint stays whole, and resuming is exact."""
    from multipromot.train import stage2

    straight = _straight(ws)
    with monkeypatch.context() as m:  # how many fsyncs does the second save make?
        count = _fail_in_second_save(m, stage2, fail_at=0)
        run_in_process(_config(ws, "disk-full-count"))
    points = count["fsyncs"]
    assert points >= 3
    for fail_at in range(1, points + 1):
        config = _config(ws, f"disk-full-{fail_at}")
        with monkeypatch.context() as m:
            _fail_in_second_save(m, stage2, fail_at)
            with pytest.raises(BaseException) as err:  # noqa: B017 (dcp wraps it in a BaseException)
                run_in_process(config)
        assert not isinstance(err.value, KeyboardInterrupt)
        ckpts = config.parent / "out" / "checkpoints"
        first = sorted(p for p in ckpts.glob("step_*") if is_complete(p))[0]
        reference = _checkpoint_weights(ws, straight / "checkpoints" / first.name)
        assert max_diff(_checkpoint_weights(ws, first), reference) == 0.0
        resumed = run_in_process(config)
        assert loss_diff(train_losses(resumed), train_losses(straight)) == 0.0
        assert max_diff(final_weights(resumed), final_weights(straight)) == 0.0
    tally.record(
        "disk_full_stage2_stress",
        fault="ENOSPC at every durable write of the second checkpoint save of a "
        "stage-2 run, then resume",
        trials=points,
        survived=points,
        data_lost=0,
    )
