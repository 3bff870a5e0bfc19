"""K-shot prompts (issue 27): a prompt is tuned with the exemplars it is used with, a method uses
only prompts tuned with its own exemplars (or, as a named ablation, others), its fine-tuned
tasks are scored with them, and k-shot inputs of a bank task still route to its prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from multipromot.bank import PromptBank
from multipromot.config import load_config
from multipromot.data import batches
from multipromot.data.exemplars import build_item
from multipromot.data.mixtures import load_mixture
from multipromot.errors import UserError
from multipromot.experiment import run_experiment
from multipromot.features import SEPARATOR, kshot_text
from multipromot.router import calibrated_router, router_entries
from multipromot.train import stage2
from multipromot.train.stage1 import train_prompts

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "stage1.steps=2",
    "stage1.eval_every=2",
    "stage1.eval_examples=2",
    "stage2.steps=2",
    "stage2.save_every=2",
    "stage2.eval_every=2",
    "stage2.eval_examples=2",
    "eval.examples=2",
    "eval.max_new_tokens=3",
    "log.to=[]",
]


@pytest.fixture
def config(tmp_path):
    for sub in ("configs", "mixtures", "eval"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("data"))
    return tmp_path / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        *SMALL,
    ]


def test_a_k_shot_prompt_is_tuned_on_k_shot_inputs(config, monkeypatch):
    path, overrides = config
    drawn = []
    real = batches.batches_from_draws

    def spy(*args, **kwargs):
        drawn.append(kwargs.get("shots", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr("multipromot.train.stage1.batches_from_draws", spy)
    entries = train_prompts(load_config(path, [*overrides, "stage1.shots=1"]), progress=False)
    assert drawn and set(drawn) == {1}  # every stage-1 batch has one exemplar per row
    assert {e.meta["stage1"]["shots"] for e in entries} == {1}  # and the bank says so


def test_methods_use_prompts_tuned_with_their_own_exemplars(config, tmp_path):
    path, overrides = config
    labels = "methods=[promot,promot+1shot,promot+1shot~prompt0shot]"
    run_experiment(load_config(path, [*overrides, labels]))
    bank = PromptBank(tmp_path / "bank")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    used = {}
    for r in results["records"]:
        if r["selected"] and r["seen"] and r["task"] == "lab_rte":
            ref = r["bank_refs"]["lab_rte"]
            used[r["method"]] = (
                bank.get(ref).meta["stage1"]["shots"],
                r["prompt_shots"],
                r["shots"],
            )
    # (the exemplars its prompt was tuned with, what results.json says, what the task was
    # scored with): promot 0-shot throughout; promot+1shot 1-shot throughout; the ablation
    # uses the 0-shot prompt with 1-shot examples
    assert used == {
        "promot": (0, 0, 0),
        "promot+1shot": (1, 1, 1),
        "promot+1shot~prompt0shot": (0, 0, 1),
    }
    assert (tmp_path / "run" / "stage1.json").is_file()
    assert (tmp_path / "run" / "stage1_1shot.json").is_file()


def test_stage2_refuses_a_prompt_tuned_with_other_exemplars(config):
    path, overrides = config
    cfg = load_config(path, [*overrides, "stage1.shots=0"])
    train_prompts(cfg, progress=False)
    one_shot = load_config(path, [*overrides, "stage2.shots=1"])
    with pytest.raises(UserError, match="was tuned with 0-shot inputs, but this stage 2 uses"):
        stage2.finetune(one_shot, progress=False)
    ablation = load_config(path, [*overrides, "stage2.shots=1", "stage2.prompt_shots=0"])
    assert (stage2.finetune(ablation, progress=False) / "final" / "stage2.json").is_file()


def test_k_shot_inputs_of_a_bank_task_route_to_its_prompt(config, tmp_path):
    path, overrides = config
    cfg = load_config(path, [*overrides, "stage1.shots=1"])
    entries = train_prompts(cfg, progress=False)
    bank = PromptBank(tmp_path / "bank")
    refs = {e.task: e.ref for e in entries}
    tasks = load_mixture(cfg.stage1.mixture).tasks
    router = calibrated_router(router_entries(bank, refs), tasks)
    rte = next(t for t in tasks if t.name == "lab_rte")
    one_shot = kshot_text(build_item(rte, 3, split="test", shots=1))
    assert one_shot.count(SEPARATOR) == 1  # an exemplar, then the input
    assert [r.task for r in router.route([one_shot])] == ["lab_rte"]
