"""Sharded stage 2: torchrun with 2 CPU processes (gloo + FSDP2) against one process.

Each torchrun run starts two Python processes on the 2 shared cores (about 10 s each); runs are
cached for the session and reused across the tests below.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _stage2_utils import (
    TASKS,
    cached_run,
    final_weights,
    loss_diff,
    make_bank,
    max_diff,
    run_in_process,
    run_torchrun,
    setup_env,
    train_losses,
    val_losses,
    write_config,
    write_mixture,
)

from multipromot.train import distributed as D
from multipromot.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state

# One process and two must agree to float rounding (DESIGN: max abs diff < 1e-5).
PARITY = 1e-5
# Per model: T5 keeps the last step; Llama selects by the task metric, which runs generate
# under FSDP every validation and exports the best weights from gathered shards.
KEEP_BEST_BY = {"tiny-t5": "none", "tiny-llama": "metric"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    setup_env(base)
    root = base / "distributed-ws"
    return {"root": root, "mixture": write_mixture(root / "mixture")}


def _config(ws, model: str, name: str):
    bank = make_bank(ws["root"] / f"bank-{model}", model)
    return write_config(
        ws["root"] / name / "config.yaml",
        model=model,
        bank=bank,
        out_dir=ws["root"] / name / "out",
        mixture=ws["mixture"],
        keep_best_by=KEEP_BEST_BY[model],
    )


def _torchrun(config, *args, **kwargs):
    result = run_torchrun(config, *args, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config.parent / "out"


def _one(ws, model):
    return cached_run(f"{model}-1", lambda: run_in_process(_config(ws, model, f"{model}-1")))


def _two(ws, model):
    """The 2-rank run of ``model``: T5 straight; Llama killed while saving step 4, then resumed
    (what the killed run left is kept in ``killed/`` next to ``out/``)."""
    if model == "tiny-t5":
        return cached_run("tiny-t5-2", lambda: _torchrun(_config(ws, model, "tiny-t5-2")))
    return cached_run(f"{model}-2", lambda: _killed_then_resumed(_config(ws, model, f"{model}-2")))


def _killed_then_resumed(config):
    killed = run_torchrun(config, "--die-in-save", "4", driver=True)
    assert killed.returncode != 0, killed.stderr[-3000:]
    out, aside = config.parent / "out", config.parent / "killed"
    aside.mkdir()
    shutil.copy(out / "metrics.jsonl", aside / "metrics.jsonl")
    shutil.copytree(out / "checkpoints", aside / "checkpoints")  # the resume clears step_4.tmp
    return _torchrun(config)


def _checkpoint_weights(out, model: str, step: int, suffix: str = "") -> dict[str, torch.Tensor]:
    """A checkpoint's model weights, loaded in this process without a process group (so a
    2-rank checkpoint is resharded into one unsharded model)."""
    from multipromot.models import load_model
    from multipromot.soft_prompt import PromptedModel

    base, _, _ = load_model(model)
    prompted = PromptedModel(base, torch.zeros(2, 4, 64), TASKS)
    path = out / "checkpoints" / f"step_{step}{suffix}"
    load_checkpoint(path, model=prompted, restore_rng=False)
    return {k: v.detach().clone() for k, v in prompted.state_dict().items()}


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_two_processes_match_one(ws, model):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) == one process, same global batch: losses,
    validation losses, exported weights and checkpoint weights within 1e-5. (The Llama
    2-rank run is the resumed one of the next test: resuming keeps parity too.)"""
    one, two = _one(ws, model), _two(ws, model)

    assert sorted(train_losses(two)) == [1, 2, 3, 4]
    assert loss_diff(train_losses(one), train_losses(two)) < PARITY
    assert loss_diff(val_losses(one), val_losses(two)) < PARITY
    assert max_diff(final_weights(one), final_weights(two)) < PARITY
    assert max_diff(_checkpoint_weights(one, model, 4), _checkpoint_weights(two, model, 4)) < PARITY

    # Sharded for real: one dcp file per rank, the trainer state knows both samplers.
    last = two / "checkpoints" / "step_4"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state = read_trainer_state(last)
    assert state["world_size"] == 2 and [s["rank"] for s in state["sampler"]] == [0, 1]
    # Only rank 0 writes: one record per step, one selection record.
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [1, 2, 3, 4]
    info = json.loads((two / "final" / "stage2.json").read_text())
    assert info == json.loads((one / "final" / "stage2.json").read_text())


def test_accelerate_launch_shards_like_torchrun(ws):
    """`accelerate launch --multi_gpu --num_processes 2 -m multipromot stage2 CONFIG` (how many
    users start jobs) sets torchrun's environment, so stage 2 shards with FSDP2 over gloo here
    and trains what one process does. (`--multi_gpu` only picks accelerate's torchrun
    launcher; without it, on a CPU, accelerate starts one unsharded process.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = _config(ws, "tiny-t5", "accelerate-2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu"]
    flags = [
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    result = subprocess.run(
        [*accelerate, *flags, "-m", "multipromot", "stage2", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, one = config.parent / "out", _one(ws, "tiny-t5")
    assert sorted(p.name for p in (out / "checkpoints" / "step_4").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert loss_diff(train_losses(one), train_losses(out)) < PARITY
    assert max_diff(final_weights(one), final_weights(out)) < PARITY


def test_two_process_kill_during_save_then_resume(ws):
    """2 ranks (Llama): rank 0 is killed while step 4 is saved, after both ranks wrote their
    shards of the straight run's step 4; latest still names step 2; resuming with 2 ranks
    reproduces the straight run's losses and step-4 weights bit for bit."""
    resumed = _two(ws, "tiny-llama")
    killed = resumed.parent / "killed"
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_2\n"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2", "step_4.tmp"]
    assert len(list((ckpts / "step_4.tmp").glob("*.distcp"))) == 2
    assert latest_checkpoint(ckpts) == ckpts / "step_2"

    assert not (resumed / "checkpoints" / "step_4.tmp").exists()
    assert loss_diff(train_losses(resumed), train_losses(killed)) == 0.0
    assert loss_diff(val_losses(resumed), val_losses(killed)) == 0.0
    straight = _checkpoint_weights(killed, "tiny-llama", 4, suffix=".tmp")
    assert max_diff(_checkpoint_weights(resumed, "tiny-llama", 4), straight) == 0.0


def test_one_process_helpers_need_no_group():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    calls = []
    assert D.on_rank0(lambda x: calls.append(x) or x * 2, 21) == 42 and calls == [21]
    assert D.sum_across_ranks([1, 2.5]) == [1.0, 2.5]
    assert D.gather_object("a") == ["a"] and D.broadcast_object("b") == "b"


def test_transformer_blocks_are_the_fsdp_units():
    from conftest import build_tiny

    from multipromot.soft_prompt import PromptedModel

    t5, _ = build_tiny("tiny-t5")
    llama, _ = build_tiny("tiny-llama")
    assert [type(b).__name__ for b in D.transformer_blocks(PromptedModel(t5))] == ["T5Block"] * 4
    assert len(D.transformer_blocks(llama)) == 2


def test_a_bad_input_error_is_printed_by_the_first_process_of_a_node_only(
    tmp_path, monkeypatch, capsys
):
    """Under torchrun every rank meets the same bad input: each exits with status 2, only
    LOCAL_RANK 0 prints the line (in process: the environment decides)."""
    from multipromot.cli import main

    bad = tmp_path / "run.yaml"
    bad.write_text("stage2: {label_smoothing: 2.5}\n")
    for local_rank, printed in (("1", 0), ("0", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["stage2", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == printed and all("label_smoothing" in line for line in err)


@pytest.mark.slow  # ~27 s on 2 shared cores
def test_a_bad_input_under_torchrun_is_one_line(ws, tmp_path):
    """Two gloo processes; a UserError raised on both inside the process group (ProMoT's
    stage 2 on a bank without the mixture's tasks): one error line in all, no traceback of
    ours, exit status 2 (the rest is torchrun's own failure report)."""
    config = write_config(
        tmp_path / "config.yaml",
        model="tiny-t5",
        bank=tmp_path / "bank",
        out_dir=tmp_path / "out",
        mixture=ws["mixture"],
    )
    (tmp_path / "bank").mkdir()
    result = run_torchrun(config, timeout=120)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bank" in errors[0], output[-3000:]
    assert "exitcode  : 2" in result.stderr and result.returncode != 0
    assert "UserError" not in output and "multipromot/" not in output, output[-3000:]
