"""Frozen bottom layers (stage2.freeze_bottom, a method's ~freezeK): the embeddings and the
bottom K blocks of every stack come out of stage 2 bit-identical, in one process and sharded;
the rest trains; a K beyond the model's depth is refused before training."""

from __future__ import annotations

import pytest
import torch
from _stage2_utils import (
    final_weights,
    make_bank,
    run_in_process,
    run_torchrun,
    setup_env,
    write_config,
    write_mixture,
)

from multipromot.errors import UserError
from multipromot.models import load_model
from multipromot.train.freeze import frozen_names, stacks


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    setup_env(base)
    root = base / "freeze-ws"
    return {"root": root, "mixture": write_mixture(root / "mixture")}


def _config(ws, name: str, model: str = "tiny-t5", **stage2):
    return write_config(
        ws["root"] / name / "config.yaml",
        model=model,
        bank=make_bank(ws["root"] / f"bank-{model}", model),
        out_dir=ws["root"] / name / "out",
        mixture=ws["mixture"],
        **stage2,
    )


def _moved(model_name: str, out, k: int) -> tuple[list[str], list[str]]:
    """(frozen tensors that moved, other tensors that moved) between the base model and a
    stage-2 run's final weights."""
    base, _, _ = load_model(model_name)
    start = base.state_dict()
    frozen = frozen_names(base, k)
    final = final_weights(out)
    moved = [n for n, t in final.items() if not torch.equal(t, start[n])]
    return [n for n in moved if n in frozen], [n for n in moved if n not in frozen]


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_frozen_layers_are_bit_identical_after_stage2(ws, model):
    base, _, _ = load_model(model)
    frozen = frozen_names(base, 1)
    assert any("embed" in n or n.startswith("shared") for n in frozen)
    assert len(stacks(base)) == (2 if model == "tiny-t5" else 1)
    config = _config(ws, f"one-{model}", model=model, mode="standard", freeze_bottom=1, steps=2)
    frozen_moved, trained_moved = _moved(model, run_in_process(config), 1)
    assert frozen_moved == [] and trained_moved  # the rest of the model trained


def test_frozen_layers_stay_frozen_when_sharded(ws):
    config = _config(ws, "two", mode="standard", freeze_bottom=1, steps=2)
    result = run_torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    frozen_moved, trained_moved = _moved("tiny-t5", config.parent / "out", 1)
    assert frozen_moved == [] and trained_moved


def test_a_depth_beyond_the_model_is_refused_before_training(ws):
    with pytest.raises(UserError, match="stacks have 2 blocks"):
        run_in_process(_config(ws, "deep", mode="standard", freeze_bottom=3, steps=2))
    with pytest.raises(UserError, match="full fine-tuning"):
        run_in_process(_config(ws, "lora", mode="lora", freeze_bottom=1, steps=2))
