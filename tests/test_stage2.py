"""Stage 2 in one process: what each mode trains, exact resume after a kill, the export."""

from __future__ import annotations

import json

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
from safetensors.torch import load_file

from multipromot.bank import PromptBank
from multipromot.config import load_config
from multipromot.models import load_model, read_lineage
from multipromot.soft_prompt import PromptedModel, init_prompts
from multipromot.train import checkpoint, stage2
from multipromot.train.metrics_log import MetricsLog


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Mixture, a dropout tiny-t5 (so resume must restore the RNG) and its bank."""
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


def _config(ws, name: str, **stage2):
    return write_config(
        ws["root"] / name / "config.yaml",
        model=ws["model"],
        out_dir=ws["root"] / name / "out",
        bank=ws["bank"],
        mixture=ws["mixture"],
        **stage2,
    )


def _straight(ws):
    return cached_run("t5-dropout-straight", lambda: run_in_process(_config(ws, "straight")))


def _base_weights(ws) -> dict[str, torch.Tensor]:
    return load_file(f"{ws['model']}/model.safetensors")


def _bank_table(ws) -> torch.Tensor:
    bank = PromptBank(ws["bank"])
    return torch.stack([bank.load_prompt(t) for t in TASKS])


def _checkpoint_prompts(out, step: int) -> torch.Tensor | None:
    """The prompt table a checkpoint holds (None in standard mode, which has none)."""
    path = out / "checkpoints" / f"step_{step}"
    if "model.prompts" not in checkpoint._read_metadata(path / ".metadata").state_dict_metadata:
        return None
    model, _, _ = load_model(str(out / "final"))
    prompted = PromptedModel(model, torch.zeros(len(TASKS), 4, model.config.d_model), TASKS)
    checkpoint.load_checkpoint(path, model=prompted, restore_rng=False)
    return prompted.prompts.detach()


class Killed(BaseException):
    """Stands in for a kill: nothing in the run catches it."""


def _dying_optimizer(build, after: int):
    """build_stage2_optimizer whose optimizer raises Killed right after its ``after``-th step."""

    def wrapped(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        count = [0]

        def die(opt, a, kw):
            count[0] += 1
            if count[0] == after:
                raise Killed

        optimizer.register_step_post_hook(die)
        return optimizer

    return wrapped


@pytest.mark.parametrize(
    "mode, prompt, task_ids",
    [
        ("promot", "bank", {0, 1}),
        ("joint", "trained", {0, 1}),
        ("standard", None, {-1}),
        ("random_prompt", "random", {0, 1}),
    ],
)
def test_one_step_per_mode(ws, monkeypatch, mode, prompt, task_ids):
    """One stage-2 step: the model always trains; the prompt table stays bit-identical to the
    bank's in promot mode, moves in joint mode, is absent in standard mode (every row -1)."""
    seen: set[int] = set()
    forward = PromptedModel.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.update(kwargs["task_ids"].tolist())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PromptedModel, "forward", spy)
    out = run_in_process(_config(ws, f"mode-{mode}", mode=mode, steps=1, eval_every=0))

    assert seen == task_ids
    assert max_diff(final_weights(out), _base_weights(ws)) > 1e-4  # the model always trains
    table = _checkpoint_prompts(out, 1)
    bank = _bank_table(ws)
    if prompt == "bank":
        assert torch.equal(table, bank)
    elif prompt == "trained":
        assert (table - bank).abs().max() > 1e-4
        # The trained table is stored next to the weights as checksummed bank entries.
        own = PromptBank(out / "final" / "prompt_bank")
        names = json.loads((out / "final" / "stage2.json").read_text())["tasks"]
        stored = torch.stack([own.load_prompt(task) for task in names])
        assert torch.equal(stored, table)
    elif prompt == "random":  # the seeded draw, unchanged by training
        model, tokenizer, _ = load_model(ws["model"])
        assert torch.equal(table, init_prompts(model, tokenizer, 2, 4, "random", seed=0))
    else:
        assert table is None
    info = json.loads((out / "final" / "stage2.json").read_text())
    assert info["mode"] == mode and info["step"] == 1
    assert bool(info["bank_refs"]) is (mode != "standard")
    # joint and random_prompt evaluate with their own table, never the bank's versions
    assert (info.get("bank_dir") == "prompt_bank") is (mode in ("joint", "random_prompt"))


def test_resume_after_kill_is_exact(ws, monkeypatch, capsys):
    """4 steps straight == 3 steps, killed (a half line at the end of metrics.jsonl),
    resumed from step 2 to 4: same losses (with dropout on, so the RNG must continue too),
    the same log and the same final weights; the resume says where it continues from."""
    straight = _straight(ws)
    config = _config(ws, "killed")
    with monkeypatch.context() as m:
        m.setattr(
            stage2, "build_stage2_optimizer", _dying_optimizer(stage2.build_stage2_optimizer, 3)
        )
        with pytest.raises(Killed):
            run_in_process(config)
    out = config.parent / "out"
    assert checkpoint.latest_checkpoint(out / "checkpoints").name == "step_2"
    assert max(train_losses(out)) == 2  # step 3 died before it was logged
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"stage": 2, "step": 3, "lo')  # the half line a kill mid-write leaves

    capsys.readouterr()
    resumed = stage2.finetune(load_config(config), progress=True)
    assert "stage 2: resumed from step 2 (" in capsys.readouterr().out
    assert loss_diff(train_losses(resumed), train_losses(straight)) == 0.0
    assert loss_diff(val_losses(resumed), val_losses(straight)) == 0.0
    assert max_diff(final_weights(resumed), final_weights(straight)) == 0.0
    steps = [r["step"] for r in MetricsLog(resumed).records() if "loss" in r]
    assert steps == [r["step"] for r in MetricsLog(straight).records() if "loss" in r]


def test_kill_during_save_keeps_last_good_checkpoint(ws, monkeypatch):
    """A kill while step 4 is being saved (shards written, not yet published): ``latest``
    still names the complete step 2, the half-save is ignored, and resuming from step 2
    reproduces the straight run."""
    straight = _straight(ws)
    config = _config(ws, "killed-in-save")
    publish = checkpoint._publish

    def dying_publish(root, tmp, final):
        if final.name == "step_4":
            raise Killed
        return publish(root, tmp, final)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_publish", dying_publish)
        with pytest.raises(Killed):
            run_in_process(config)
    ckpts = config.parent / "out" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert (ckpts / "step_4.tmp" / ".metadata").is_file() and not (ckpts / "step_4").exists()
    assert checkpoint.latest_checkpoint(ckpts).name == "step_2"

    resumed = run_in_process(config)
    assert not (ckpts / "step_4.tmp").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2", "step_4"]
    assert loss_diff(train_losses(resumed), train_losses(straight)) == 0.0
    assert max_diff(final_weights(resumed), final_weights(straight)) == 0.0


def test_export_loads_in_transformers_with_the_same_logits(ws):
    """final/ loads with from_pretrained, its lineage lets the bank accept the base model's
    prompts, and it gives exactly the logits of the trained model (the last checkpoint)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from multipromot.data.collate import Collator
    from multipromot.features import Item

    out = _straight(ws)
    final = out / "final"
    exported = AutoModelForSeq2SeqLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    bank = PromptBank(ws["bank"])
    served = PromptedModel.from_bank(exported, bank, TASKS).eval()  # lineage check passes

    base, _, _ = load_model(ws["model"])
    trained = PromptedModel(base, _bank_table(ws), TASKS)
    checkpoint.load_checkpoint(out / "checkpoints" / "step_4", model=trained, restore_rng=False)
    trained.eval()

    items = [
        Item(0, "alpha beta odd or even?", "odd"),
        Item(1, "shout: mu", "MU"),
        Item(-1, "eta eta", "x"),
    ]
    batch = Collator(tokenizer, decoder_only=False)(items)
    with torch.no_grad():
        a = served(**batch).logits
        b = trained(**batch).logits
    assert torch.equal(a, b)
    assert read_lineage(final)["lineage"][0] == read_lineage(ws["model"])["fingerprint"]
    used = [
        e.ref
        for e in bank.entries()
        if any(s["checkpoint"] == str(final.resolve()) for s in e.stage2)
    ]
    assert sorted(used) == ["lab_qa@v0001", "lab_rte@v0001"]


def test_keep_best_by_loss_selects_the_lowest_validation_loss(ws):
    out = run_in_process(_config(ws, "best", keep_best_by="loss", eval_every=2))
    losses = val_losses(out)
    best_step = min(losses, key=losses.get)
    info = json.loads((out / "final" / "stage2.json").read_text())
    assert info["step"] == best_step and info["selected_by"] == "loss"
    assert info["value"] == losses[best_step]
