"""Stage 2 at scale, on CPU: preemption, resuming with changed settings or another number of
ranks, asynchronous checkpoint saves, activation checkpointing, FSDP2 policies and the sharded
export.

Tolerance: a resume in the same world size is bit-exact (0.0); a resume with another world
size continues a straight run's losses and weights within 1e-5 (the same bound as the
one-vs-two-process parity in test_distributed.py: the sums run in another order).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _stage2_utils import (
    DRIVER,
    ROOT,
    cached_run,
    final_weights,
    loss_diff,
    make_bank,
    max_diff,
    run_in_process,
    run_torchrun,
    setup_env,
    train_losses,
    write_config,
    write_mixture,
)

from multipromot.errors import UserError
from multipromot.train import distributed as D
from multipromot.train.checkpoint import read_trainer_state

ELASTIC = 1e-5
SIGTERM_STATUS = 143  # 128 + SIGTERM


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    setup_env(base)
    root = base / "scaleout-ws"
    return {
        "root": root,
        "mixture": write_mixture(root / "mixture"),
        "bank": make_bank(root / "bank-tiny-t5", "tiny-t5"),
    }


def _config(ws, name: str, **stage2):
    return write_config(
        ws["root"] / name / "config.yaml",
        model="tiny-t5",
        bank=ws["bank"],
        out_dir=ws["root"] / name / "out",
        mixture=ws["mixture"],
        **stage2,
    )


def _straight(ws):
    """The uninterrupted one-process run (the same config test_distributed.py trains)."""
    return cached_run("tiny-t5-1", lambda: run_in_process(_config(ws, "straight")))


def _signalled_one_process(ws):
    """One process, SIGTERM after step 3 (save_every is 2: step 3 is saved only because of
    the signal), keep_last 1."""

    def make():
        config = _config(ws, "sigterm-1", keep_last=1)
        env = {"OMP_NUM_THREADS": "1", **dict(__import__("os").environ)}
        result = subprocess.run(
            [sys.executable, str(DRIVER), str(config), "--signal-after-step", "3"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        ckpt = config.parent / "out" / "checkpoints" / "step_3"
        if ckpt.is_dir():  # kept aside: the resume below prunes it (keep_last=1)
            shutil.copytree(ckpt, config.parent / "aside" / "step_3")
        return config, result

    return cached_run("sigterm-1", make)


def _signalled_two_ranks(ws):
    """Two ranks, SIGTERM to rank 1 only after step 3: both must stop after step 3."""

    def make():
        config = _config(ws, "sigterm-2")
        return config, run_torchrun(
            config, "--signal-after-step", "3", "--signal-rank", "1", driver=True
        )

    return cached_run("sigterm-2", make)


def test_sigterm_checkpoints_and_resumes_exactly(ws):
    """SIGTERM mid-run: the step finishes, a checkpoint of it is written, exit 143 with one
    line; rerunning with stage2.resume=latest gives the straight run's losses and final
    weights bit for bit. keep_last=1 leaves one checkpoint at every moment."""
    straight = _straight(ws)
    config, result = _signalled_one_process(ws)
    assert result.returncode == SIGTERM_STATUS, result.stderr[-3000:]
    assert "SIGTERM at step 3" in result.stderr and "Traceback" not in result.stderr
    ckpts = config.parent / "out" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_3"]  # step_2 pruned
    assert not (config.parent / "out" / "final").exists()

    out = run_in_process(config, ["stage2.resume=latest"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_4"]
    assert loss_diff(train_losses(out), train_losses(straight)) == 0.0
    assert max_diff(final_weights(out), final_weights(straight)) == 0.0


def test_sigterm_on_one_rank_stops_both_then_resumes_on_one(ws):
    """2 ranks, only rank 1 signalled: both stop after step 3 (one checkpoint with both
    shards); resuming it in one process (2 -> 1: dcp reshards model and optimizer, the
    sampler continues the global stream) continues the straight run's losses within 1e-5."""
    straight = _straight(ws)
    config, result = _signalled_two_ranks(ws)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "SIGTERM at step 3" in result.stderr
    out = config.parent / "out"
    step3 = out / "checkpoints" / "step_3"
    assert (out / "checkpoints" / "latest").read_text() == "step_3\n"
    assert sorted(p.name for p in step3.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert read_trainer_state(step3)["world_size"] == 2
    assert sorted(train_losses(out)) == [1, 2, 3]

    run_in_process(config, ["stage2.resume=latest"])
    assert read_trainer_state(out / "checkpoints" / "step_4")["world_size"] == 1
    assert loss_diff(train_losses(out), train_losses(straight)) < ELASTIC
    assert max_diff(final_weights(out), final_weights(straight)) < ELASTIC


def test_one_rank_checkpoint_resumes_on_two_with_memory_options(ws):
    """1 -> 2: the one-process step-3 checkpoint continues under torchrun with 2 ranks, with
    activation checkpointing and the streamed sharded export switched on (both leave the
    arithmetic alone): step 4's loss and the exported weights match the straight run within
    1e-5, and the export is sharded safetensors + index that from_pretrained loads."""
    from transformers import AutoModelForSeq2SeqLM

    straight = _straight(ws)
    source, _ = _signalled_one_process(ws)
    config = _config(ws, "elastic-1-2")
    ckpt = config.parent / "from" / "step_3"
    shutil.copytree(source.parent / "aside" / "step_3", ckpt)
    result = run_torchrun(
        config,
        f"stage2.resume={ckpt}",
        "stage2.activation_checkpointing=true",
        "stage2.export_shard_size=60KB",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "written by 1 process(es), now 2" in result.stdout
    assert "applied: activation_checkpointing False -> True" in result.stdout
    out = config.parent / "out"
    assert abs(train_losses(out)[4] - train_losses(straight)[4]) < ELASTIC

    final = out / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in final.glob("model-*.safetensors"))
    loaded = AutoModelForSeq2SeqLM.from_pretrained(final)
    expected = final_weights(straight)
    got = {k: v for k, v in loaded.state_dict().items() if k in expected}
    assert got.keys() == expected.keys()
    assert max_diff(got, expected) < ELASTIC
    assert json.loads((final / "multipromot.json").read_text())["lineage"]


def test_async_saved_checkpoints_resume_exactly(ws):
    """stage2.async_save: the run's losses and weights equal the synchronous run's; each
    checkpoint records the state of its own step (the loss history is a snapshot, though the
    run went on while it was written); resuming from the async-saved step 2 gives the straight
    run's losses and final weights bit for bit."""
    from multipromot.train.checkpoint import verify_checkpoint

    straight = _straight(ws)
    config = _config(ws, "async", async_save=True)
    out = run_in_process(config)
    assert loss_diff(train_losses(out), train_losses(straight)) == 0.0
    assert max_diff(final_weights(out), final_weights(straight)) == 0.0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_4\n"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2", "step_4"]
    for step in (2, 4):
        verify_checkpoint(ckpts / f"step_{step}")
        saved = read_trainer_state(ckpts / f"step_{step}")
        assert [s for s, _ in saved["losses"]] == list(range(1, step + 1))

    run_in_process(config, [f"stage2.resume={ckpts / 'step_2'}"])
    assert loss_diff(train_losses(out), train_losses(straight)) == 0.0
    assert max_diff(final_weights(out), final_weights(straight)) == 0.0


def test_async_save_under_two_ranks(ws):
    """2 ranks with async_save (the background writes talk over a gloo group of their own):
    the straight run's losses and weights within the two-process bound, and a published
    checkpoint holding both ranks' shards; keep_last=1 leaves only the last."""
    straight = _straight(ws)
    config = _config(ws, "async-2", async_save=True, keep_last=1)
    result = run_torchrun(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = config.parent / "out"
    assert loss_diff(train_losses(out), train_losses(straight)) < ELASTIC
    assert max_diff(final_weights(out), final_weights(straight)) < ELASTIC
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_4"]
    assert sorted(p.name for p in (ckpts / "step_4").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def test_kill_while_an_async_save_is_in_flight_keeps_the_previous_checkpoint(ws):
    """Step 2's background write never finishes; training goes on to step 3's optimizer
    step (not held up by the save), where the process dies: step 1 is still `latest`, complete and verified,
    step 2 exists only as its unpublished .tmp, and keep_last=1 pruned nothing it needed.
    Resuming continues from step 1 to the straight run's losses and weights bit for bit."""
    from multipromot.train.checkpoint import latest_checkpoint, verify_checkpoint

    straight = _straight(ws)
    config = _config(ws, "async-killed", async_save=True, save_every=1, keep_last=1)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(DRIVER), str(config), "--hold-save", "2", "--die-after-step", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # The driver's os._exit status: reached only by step 3's optimizer step, taken while
    # step 2's save was still in flight (before step 3's loss is logged).
    assert result.returncode == 17, result.stderr[-3000:]
    out = config.parent / "out"
    ckpts = out / "checkpoints"
    assert sorted(train_losses(out)) == [1, 2]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_1", "step_2.tmp"]
    assert latest_checkpoint(ckpts) == ckpts / "step_1"
    verify_checkpoint(ckpts / "step_1")

    run_in_process(config, ["stage2.resume=latest"])
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_4"]
    assert loss_diff(train_losses(out), train_losses(straight)) == 0.0
    assert max_diff(final_weights(out), final_weights(straight)) == 0.0


def test_resume_refuses_changed_settings_and_applies_safe_ones(ws, capsys):
    """lr and batch_size changed on resume: one line naming both, exit 2, nothing trained.
    steps changed: applied, said so, and the run continues to the new end."""
    from multipromot.cli import main

    straight = _straight(ws)
    config = _config(ws, "changed")
    shutil.copytree(straight / "checkpoints", config.parent / "out" / "checkpoints")
    status = main(["stage2", str(config), "stage2.lr=0.5", "stage2.batch_size=16"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "lr 0.001 -> 0.5" in err and "batch_size 8 -> 16" in err
    assert not (config.parent / "out" / "metrics.jsonl").exists()

    with pytest.raises(UserError, match="mode 'promot' -> 'standard'|mode"):
        run_in_process(config, ["stage2.mode=standard"])

    from multipromot.config import load_config
    from multipromot.train.stage2 import finetune

    out = finetune(load_config(config, ["stage2.steps=5"]), progress=True)
    assert "applied: steps 4 -> 5" in capsys.readouterr().out
    assert sorted(train_losses(out)) == [5]  # resumed at step 4 of the straight run


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(model):
    from conftest import build_tiny

    from multipromot.soft_prompt import PromptedModel

    def loss_and_grads(checkpointing: bool):
        base, _ = build_tiny(model)
        prompted = PromptedModel(
            base,
            torch.randn(
                2,
                3,
                base.config.hidden_size
                if hasattr(base.config, "hidden_size")
                else base.config.d_model,
            ),
        )
        prompted.set_trainable("both")
        if checkpointing:
            assert D.enable_activation_checkpointing(prompted) >= 2
        prompted.train()
        ids = torch.randint(3, 100, (4, 10))
        kwargs = (
            {"labels": torch.randint(3, 100, (4, 5))}
            if base.config.is_encoder_decoder
            else {"labels": ids}
        )
        out = prompted(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            task_ids=torch.tensor([0, 1, -1, 0]),
            **kwargs,
        )
        out.loss.backward()
        return out.loss.item(), {
            n: p.grad.clone() for n, p in prompted.named_parameters() if p.grad is not None
        }

    torch.manual_seed(0)
    loss_plain, grads_plain = loss_and_grads(False)
    torch.manual_seed(0)
    loss_ac, grads_ac = loss_and_grads(True)
    assert loss_ac == pytest.approx(loss_plain, abs=1e-6)
    assert grads_ac.keys() == grads_plain.keys() and "prompts" in grads_ac
    assert max_diff(grads_ac, grads_plain) < 1e-6


def test_fsdp_policies_keep_cpu_runs_unchanged():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    if not torch.cuda.is_available():
        assert D.fsdp_policies("auto") == {}  # the default: today's fp32 arithmetic on CPU
    assert D.fsdp_policies("fp32") == {}
    bf16 = D.fsdp_policies("bf16", cpu_offload=True)
    assert isinstance(bf16["mp_policy"], MixedPrecisionPolicy)
    assert bf16["mp_policy"].param_dtype == torch.bfloat16
    assert bf16["mp_policy"].reduce_dtype == torch.float32
    assert isinstance(bf16["offload_policy"], CPUOffloadPolicy)


def test_scale_keys_are_validated(tmp_path):
    from multipromot.config import load_config, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5KiB") == 1536
    assert parse_size("5XB") is None and parse_size("-1MB") is None
    for bad, key in [
        ("stage2.mixed_precision=fp16", "mixed_precision"),
        ("stage2.keep_last=-1", "keep_last"),
        ("stage2.export_shard_size=lots", "export_shard_size"),
    ]:
        with pytest.raises(UserError, match=key):
            load_config(None, [bad])


def test_sharded_export_loads_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """One process: the streamed export loads with from_pretrained to the same weights; a
    write failing midway (disk full) raises and leaves neither the folder nor a temp dir."""
    from conftest import build_tiny
    from transformers import AutoModelForSeq2SeqLM

    from multipromot.train import export

    model, tok = build_tiny("tiny-t5")
    dest = tmp_path / "final"
    export.export_sharded(model, tok, dest, max_shard_bytes=40_000, name="t", parents=["p"])
    shards = sorted(p.name for p in dest.glob("model-*.safetensors"))
    assert len(shards) > 2 and (dest / export.INDEX_FILE).is_file()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(dest)
    assert max_diff(loaded.state_dict(), model.state_dict()) == 0.0

    calls = []

    def full_disk(tmp, i, tensors):
        calls.append(i)
        if i == 1:
            raise OSError(28, "No space left on device")
        return write_shard(tmp, i, tensors)

    write_shard = export._write_shard
    monkeypatch.setattr(export, "_write_shard", full_disk)
    with pytest.raises(OSError, match="No space"):
        export.export_sharded(
            model, tok, tmp_path / "other", max_shard_bytes=40_000, name="t", parents=[]
        )
    assert calls == [0, 1]  # stopped writing at the failure, still walked every tensor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
