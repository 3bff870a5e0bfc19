"""The methods beyond the paper's main comparison: promot_lora, lora, hft and wiseA:LABEL."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from multipromot import experiment
from multipromot.cli import main
from multipromot.config import LoraConfig, load_config
from multipromot.data.collate import Collator
from multipromot.data.exemplars import build_item
from multipromot.data.tasks import get_task
from multipromot.eval.generation import predict
from multipromot.models import load_model
from multipromot.soft_prompt import PromptedModel
from multipromot.train import hft, lora, wise
from tests.conftest import build_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path):
    """configs/tiny.yaml cut to one task (lab_rte), two steps per stage, two items per task."""
    for sub in ("configs", "mixtures", "eval"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("data"))
    rte = tmp_path / "mixtures" / "lab_rte.yaml"
    return tmp_path / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        f"stage1.mixture={rte}",
        f"stage2.mixture={rte}",
        "stage1.steps=2",
        "stage1.eval_every=2",
        "stage1.eval_examples=2",
        "stage2.steps=2",
        "stage2.save_every=1",
        "stage2.eval_every=2",
        "stage2.eval_examples=2",
        "stage2.keep_best_by=none",
        "eval.examples=2",
        "eval.max_new_tokens=3",
        "eval.shots=[1]",
        "eval.curve=true",
        "hft.round_steps=1",
        "lora.rank=2",
    ]


def _items(n=3):
    task = get_task("lab_rte")
    return [build_item(task, i, split="test", task_id=-1) for i in range(n)]


def _outputs(prompted, tokenizer, items):
    collator = Collator(tokenizer, decoder_only=False, for_generation=True)
    return predict(prompted, tokenizer, items, collator, max_new_tokens=4)


def test_each_new_method_runs_end_to_end_and_stores_peft_adapters(small, tmp_path, monkeypatch):
    path, overrides = small
    cfg = load_config(path, [*overrides, "methods=[promot_lora,lora,hft,wise1:hft]"])
    plotted = {}
    write_report = experiment.write_report

    def spy(*args, **kwargs):
        plotted.update(kwargs["stage1_losses"])
        return write_report(*args, **kwargs)

    monkeypatch.setattr(experiment, "write_report", spy)
    experiment.run_experiment(cfg)
    # promot_lora's stage 1 (its adapters' training losses) has its curve in the loss panel
    assert list(plotted) == ["promot_lora's adapters"]
    assert [step for step, _ in plotted["promot_lora's adapters"]] == [2]  # the last step
    run = tmp_path / "run"
    records = json.loads((run / "results.json").read_text())["records"]
    labels = {r["method"] for r in records}
    assert labels == {"promot_lora", "lora", "hft", "wise1:hft"}
    for label in ("promot_lora", "lora", "hft"):  # curves: the other checkpoint is scored too
        assert {r["step"] for r in records if r["method"] == label} == {1, 2}
    # promot_lora: the fine-tuned task's rows got its adapter, the unseen tasks' rows none.
    ours = [r for r in records if r["method"] == "promot_lora" and r["selected"]]
    assert {r["prompt"] for r in ours if r["seen"]} == {"lab_rte"}
    assert {r["prompt"] for r in ours if not r["seen"]} == {None}

    # The adapters are peft's: promot_lora's task adapter (frozen in stage 2: the stage-1 file)
    # and lora's adapter, which merged gives final/'s weights.
    final = run / "methods" / "promot_lora" / "final" / "adapters" / "lab_rte"
    stage1 = run / "stage1_lora" / "adapters" / "lab_rte"
    assert (final / "adapter_model.safetensors").read_bytes() == (
        stage1 / "adapter_model.safetensors"
    ).read_bytes()
    base, tok, _ = load_model("tiny-t5")
    loaded = PeftModel.from_pretrained(base, final)
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    base, _, _ = load_model("tiny-t5")
    lora_final = run / "methods" / "lora" / "final"
    merged = PeftModel.from_pretrained(base, lora_final / "adapters").merge_and_unload()
    saved, _, _ = load_model(str(lora_final))
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor)

    # WiSE-FT names the weights it interpolated (its end points: the next test).
    interpolated = next(r["interpolated"] for r in records if r["method"] == "wise1:hft")
    assert interpolated["weights"] == str((run / "methods" / "hft" / "final").resolve())
    assert interpolated["source"] == "hft" and interpolated["alpha"] == 1.0

    assert interpolated["step"] == 2
    # hft fine-tuned again with other settings: its WiSE rows are scored again, never reused.
    cfg = load_config(path, [*overrides, "methods=[hft,wise1:hft]", "hft.round_steps=2"])
    experiment.run_experiment(cfg)
    lines = {
        line.split("`")[1]: line
        for line in (run / "report.md").read_text().splitlines()
        if line.startswith("- `")
    }
    assert "trained and scored by this run" in lines["hft"] and "reused" not in lines["wise1:hft"]
    assert "`wise1:hft`: 1 x hft's stage-2 step 2 weights + 0 x the base;" in lines["wise1:hft"]
    assert lines["wise1:hft"].endswith("interpolated and scored by this run")
    # the same command again: the WiSE row is reused, and says it was interpolated, not trained
    experiment.run_experiment(cfg)
    lines = {
        line.split("`")[1]: line
        for line in (run / "report.md").read_text().splitlines()
        if line.startswith("- `")
    }
    assert lines["wise1:hft"].endswith("reused (interpolated and scored by an earlier run)")
    again = json.loads((run / "results.json").read_text())["records"]
    new = next(r["interpolated"] for r in again if r["method"] == "wise1:hft")
    assert new["fingerprint"] != interpolated["fingerprint"]


def test_attaching_and_loading_adapters_warns_nothing(tmp_path):
    # peft reads a deprecated transformers property on every wrap; users saw its FutureWarning
    # once per LoRA load in `run`
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, _ = load_model("tiny-t5")
        lora.save_adapters(lora.attach(model, LoraConfig(rank=2), ["lab_rte"]), tmp_path)
        model, _, _ = load_model("tiny-t5")
        lora.load_adapters(model, tmp_path, ["lab_rte"])
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []


def test_wise_end_points_are_the_base_and_the_fine_tuned_weights():
    base, tok = build_tiny("tiny-t5")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    items = _items()
    for alpha, expected in ((0.0, base), (1.0, tuned)):
        model = copy.deepcopy(tuned)
        wise.interpolate(model, base, alpha)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected.state_dict()[name]), name
        assert _outputs(PromptedModel(model), tok, items) == _outputs(
            PromptedModel(expected), tok, items
        )
    half = copy.deepcopy(tuned)
    wise.interpolate(half, base, 0.5)
    w = "encoder.block.0.layer.0.SelfAttention.q.weight"
    expected = (base.state_dict()[w] + tuned.state_dict()[w]) / 2
    torch.testing.assert_close(half.state_dict()[w], expected)


def test_hft_freezes_exactly_half_the_tensors_per_round_chosen_by_the_seed():
    model, _ = build_tiny("tiny-t5")
    names = hft.groups(model)
    first = hft.freeze_for_step(model, 1, seed=0, round_steps=3)
    assert len(first) == len(names) // 2
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == first
    assert hft.freeze_for_step(model, 3, seed=0, round_steps=3) == first  # same round
    second = hft.freeze_for_step(model, 4, seed=0, round_steps=3)  # the next round
    assert len(second) == len(names) // 2 and second != first
    assert hft.frozen_groups(names, seed=0, round_index=0) == first  # the seed decides, alone
    assert hft.frozen_groups(names, seed=1, round_index=0) != first


def test_a_mixed_task_training_batch_gives_the_loss_and_logits_of_routed_rows():
    model, tok = build_tiny("tiny-t5")
    torch.manual_seed(0)
    adapted = lora.attach(model, load_config(None).lora, ["lab_rte", "other"])
    with torch.no_grad():  # non-zero adapters, different per task
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    items = _items(4)
    for item, task in zip(items, [0, 1, -1, 0], strict=True):
        item.task_id = task
    batch = Collator(tok, decoder_only=False)(items)
    adapted.set_trainable("model")
    adapted.eval()
    routed = adapted(**batch)  # peft's mixed-adapter batch, one forward
    adapted.train()  # one forward per adapter, put back in row order
    split = adapted(**batch)
    torch.testing.assert_close(split.logits, routed.logits)
    torch.testing.assert_close(split.loss, routed.loss)
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    "methods, message",
    [
        ("[standard,wise1.5:standard]", "the WiSE-FT weight must be in [0, 1]"),
        ("[wise0.5:standard]", "which `methods` does not list"),
        ("[lora,wise0.5:lora]", "not 'lora'"),
        ("[standard,wise0.5:wise0.5:standard]", "not 'wise'"),
        ("[lora@multi]", "names mixture 'multi'"),
    ],
)
def test_bad_method_labels_are_one_line_errors_before_training(
    small, tmp_path, capsys, methods, message
):
    path, overrides = small
    assert main(["run", str(path), *overrides, f"methods={methods}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path.resolve()}: methods: ") and message in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_bad_lora_settings_stop_before_any_training(small, tmp_path, capsys):
    path, overrides = small
    fr = tmp_path / "mixtures" / "lab_rte_fr.yaml"
    cases = [
        ([f"stage2.mixture={fr}", "methods=[promot_lora]"], "stage1.mixture trains no adapter"),
        (["methods=[lora]", "lora.target_modules=[nope]"], "lora.target_modules"),
        (["methods=[lora]", "lora.rank=0"], "lora.rank: must be > 0"),
    ]
    for extra, message in cases:
        assert main(["run", str(path), *overrides, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not list((tmp_path / "run").glob("**/checkpoints"))
        assert not (tmp_path / "run" / "stage1_lora").exists()
