"""Checkpoints: exact round trip without a process group, atomic publishing, safe loading."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from multipromot.errors import UserError
from multipromot.train import checkpoint
from multipromot.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from multipromot.train.common import build_optimizer, lr_schedule


class Counter:
    """A stand-in sampler: a position that moves as data is drawn."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _trainer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4)
    )
    optimizer = build_optimizer(model.parameters(), "adafactor", 1e-2)
    scheduler = lr_schedule(optimizer, warmup_steps=2, total_steps=10, decay="cosine")
    return model, optimizer, scheduler, Counter()


def _train(model, optimizer, scheduler, sampler, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        # Data from the torch, Python and NumPy RNGs, dropout from torch's: resuming exactly
        # needs all three streams restored.
        x = torch.randn(4, 8) + random.random() + float(np.random.rand())
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        sampler.position += 4
        losses.append(loss.item())
    return losses


def test_round_trip_without_process_group_continues_exactly(tmp_path):
    """dcp save/load need no process group: 3 steps, save, 3 more == 3 steps, save, load into
    fresh objects (other seed), 3 more, bit for bit."""
    assert not torch.distributed.is_initialized()
    model, optimizer, scheduler, sampler = _trainer()
    _train(model, optimizer, scheduler, sampler, 3)
    path = save_checkpoint(
        tmp_path,
        3,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        state={"losses": [1.5]},
    )
    expected = _train(model, optimizer, scheduler, sampler, 3)

    model2, optimizer2, scheduler2, sampler2 = _trainer(seed=1)
    trainer = load_checkpoint(
        path, model=model2, optimizer=optimizer2, scheduler=scheduler2, sampler=sampler2
    )
    assert trainer["step"] == 3 and trainer["losses"] == [1.5] and trainer["world_size"] == 1
    assert sampler2.position == 12
    assert _train(model2, optimizer2, scheduler2, sampler2, 3) == expected
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_layout_and_latest_pointer(tmp_path):
    model, optimizer, scheduler, sampler = _trainer()
    for step in (2, 4):
        save_checkpoint(
            tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2", "step_4"]
    assert (tmp_path / "latest").read_text() == "step_4\n"
    files = sorted(p.name for p in (tmp_path / "step_4").iterdir())
    assert files == [
        ".metadata",
        "__0_0.distcp",
        "checksums.json",
        "rng.safetensors",
        "trainer_state.json",
    ]
    state = json.loads((tmp_path / "step_4" / "trainer_state.json").read_text())
    assert state["sampler"] == [{"position": 0}] and len(state["rng"]) == 1


def test_interrupted_saves_never_replace_the_good_checkpoint(tmp_path):
    model, optimizer, scheduler, sampler = _trainer()
    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    # A save killed before publishing leaves a .tmp directory: never picked.
    (tmp_path / "step_4.tmp").mkdir()
    (tmp_path / "step_4.tmp" / ".metadata").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    # Killed between renaming step_6 into place and moving the pointer: the pointer's target
    # is still complete and wins; if it were gone, the newest complete step would.
    save_checkpoint(tmp_path, 6, model=model, optimizer=optimizer)
    (tmp_path / "latest").write_text("step_2\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    (tmp_path / "latest").write_text("../../etc\n")  # never followed out of the directory
    assert latest_checkpoint(tmp_path) == tmp_path / "step_6"
    # The next save clears the leftovers.
    save_checkpoint(tmp_path, 8, model=model, optimizer=optimizer)
    assert not (tmp_path / "step_4.tmp").exists()


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "") is None
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "step_9"))
    model, optimizer, _, _ = _trainer()
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    assert resolve_resume(tmp_path, "") == resolve_resume(tmp_path, "latest") == tmp_path / "step_1"
    assert resolve_resume(tmp_path, str(tmp_path / "step_1")) == tmp_path / "step_1"


def test_metadata_pickle_cannot_run_code(tmp_path):
    """dcp's .metadata is a pickle; ours is read by an unpickler that builds only dcp classes."""
    model, optimizer, _, _ = _trainer()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match="checksum mismatch"):  # first line of defence
        load_checkpoint(path, model=model, restore_rng=False)
    checkpoint._write_checksums(path)  # an attacker can re-seal: the unpickler must still refuse
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path, model=model, restore_rng=False)
    assert not marker.exists()


def test_non_tensor_values_cannot_run_code(tmp_path):
    """dcp stores non-tensor values (optimizer step counts, param groups) as pickles and its
    default planner loads them with weights_only=False; ours loads them weights_only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model, optimizer, scheduler, sampler = _trainer()
    _train(model, optimizer, scheduler, sampler, 1)
    good = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tensors = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    tensors["optim"]["param_groups"][0]["lr"] = Exploit()
    bad = tmp_path / "step_2"
    dcp.save(tensors, checkpoint_id=bad, no_dist=True)
    (bad / "trainer_state.json").write_text((good / "trainer_state.json").read_text())
    checkpoint._write_checksums(bad)  # sealed like a real one: the planner must still refuse
    with pytest.raises(UserError, match="cannot load the checkpoint"):
        load_checkpoint(bad, model=model, optimizer=optimizer, restore_rng=False)
    assert not marker.exists()


def test_other_world_size_needs_a_consecutive_stream(tmp_path):
    """A checkpoint of another world size reshards the sampler's stream; saved ranks that do
    not stand at consecutive positions of one stream are refused before anything loads."""
    model, optimizer, _, sampler = _trainer()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, sampler=sampler)
    state = json.loads((path / "trainer_state.json").read_text())
    state["world_size"] = 2
    state["sampler"] = [{"position": 8, "world_size": 2}, {"position": 5, "world_size": 2}]
    (path / "trainer_state.json").write_text(json.dumps(state))
    checkpoint._write_checksums(path)
    with pytest.raises(UserError, match="rank 1 stood at position 5, expected 9"):
        load_checkpoint(path, model=model, sampler=sampler)
    load_checkpoint(path, model=model, restore_rng=False)  # weights alone load anywhere


@pytest.mark.parametrize(("saved_world", "new_world"), [(2, 1), (1, 2), (3, 2), (2, 4)])
def test_resharded_sampler_continues_the_global_stream(saved_world, new_world):
    """N ranks draw 3 steps, their states are resharded to M ranks: interleaved by position,
    the M ranks continue the one-process stream with nothing skipped or seen twice."""
    from test_sampler import toy_mixture

    from multipromot.data.sampler import MixtureSampler

    mixture = toy_mixture([50, 7, 20], [3, 1, 2])
    rows = 4  # per rank per step
    old = [
        MixtureSampler(mixture, seed=3, rank=r, world_size=saved_world) for r in range(saved_world)
    ]
    for _ in range(3):
        for s in old:
            s.take(rows)
    saved = [json.loads(json.dumps(s.state_dict())) for s in old]
    new = [MixtureSampler(mixture, seed=3, rank=r, world_size=new_world) for r in range(new_world)]
    for s in new:
        s.load_state_dict(checkpoint.reshard_sampler_state(saved, s))
    drawn = [s.take(5) for s in new]
    interleaved = [drawn[i % new_world][i // new_world] for i in range(5 * new_world)]
    one = MixtureSampler(mixture, seed=3)
    one.take(3 * rows * saved_world)
    assert interleaved == one.take(5 * new_world)


def test_prune_keeps_the_newest_the_latest_and_the_best(tmp_path):
    model, optimizer, _, sampler = _trainer()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, sampler=sampler)
    removed = checkpoint.prune_checkpoints(tmp_path, 2, protect={2})
    assert sorted(p.name for p in removed) == ["step_1", "step_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2", "step_4", "step_5"]
    # latest is kept even when it is not among the newest (a resumed run re-saving earlier)
    (tmp_path / "latest").write_text("step_2\n")
    checkpoint.prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2", "step_5"]
    assert checkpoint.prune_checkpoints(tmp_path, 0) == []  # 0 keeps everything
