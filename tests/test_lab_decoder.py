"""The decoder-only lab model (``lab-llama``): micro pretraining, cache, registry, the demo config.

The T5 lab model's recipe must not move (``make demo`` prints the same table): a guard test
pins the values its cache key is made of.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from multipromot.lab import FAMILIES

RECIPE = dict(
    seed=0, size="llama-micro", lr=0.1, steps=25, batch_size=8, warmup_steps=5, progress=False
)


def test_micro_decoder_pretrain_writes_a_loadable_model_whose_loss_went_down(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multipromot.lab.model import ensure_lab_model, read_pretrain_record
    from multipromot.models import read_lineage

    path = ensure_lab_model(tmp_path / "lab", eval_examples=2, **RECIPE)
    record = read_pretrain_record(path)
    assert record["config"]["size"] == "llama-micro"
    assert record["loss_last"] < record["loss_first"] - 0.5
    assert set(record["one_shot_test_scores"]) == set(FAMILIES)
    assert read_lineage(path)["name"] == "lab-llama"

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert not model.config.is_encoder_decoder and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["Q: what does the nera eat? A:"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1
    # Cached like the T5 lab model: the same recipe is not trained again.
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_lab_model(path, eval_examples=0, **RECIPE) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_lab_llama_is_a_registered_builtin_with_its_own_recipe(monkeypatch, tmp_path):
    from multipromot.lab import model as lab_model
    from multipromot.models import BUILTIN_MODELS

    calls = []
    monkeypatch.setattr(
        "multipromot.lab.ensure_lab_model", lambda path, **kw: calls.append((path, kw))
    )
    BUILTIN_MODELS.lookup("lab-llama")(tmp_path / "x", 3)
    assert calls == [
        (tmp_path / "x", {"seed": 3, "size": "llama-small", **lab_model.LAB_DECODER_RECIPE})
    ]
    BUILTIN_MODELS.lookup("lab")(tmp_path / "y", 0)
    assert calls[1] == (tmp_path / "y", {"seed": 0})  # the T5 lab model: default recipe


def test_lab_pretrain_cli_builds_lab_llama_as_the_builtin_does(monkeypatch, tmp_path):
    """`multipromot lab pretrain --size llama-small` trains what `model: lab-llama` loads: the
    same directory and the same recipe (else the CLI would build a model the runs never use)."""
    from multipromot.cli import main
    from multipromot.lab import model as lab_model
    from multipromot.models import BUILTIN_MODELS

    monkeypatch.setenv("MULTIPROMOT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(
        "multipromot.cli.lab.ensure_lab_model", lambda path, **kw: calls.append((path, kw))
    )
    monkeypatch.setattr(
        "multipromot.lab.ensure_lab_model", lambda path, **kw: calls.append((path, kw))
    )
    assert main(["lab", "pretrain", "--size", "llama-small", "--seed", "2", "--json"]) == 0
    BUILTIN_MODELS.lookup("lab-llama")(tmp_path / "models" / "lab-llama-seed2", 2)
    (cli_path, cli_kw), (builtin_path, builtin_kw) = calls
    assert cli_path == builtin_path
    cli_kw = {k: v for k, v in cli_kw.items() if k not in ("device", "rebuild", "progress")}
    assert (
        cli_kw == builtin_kw == {"seed": 2, "size": "llama-small", **lab_model.LAB_DECODER_RECIPE}
    )


def test_lab_pretrain_hold_out_leaves_a_family_out_in_a_directory_of_its_own(
    monkeypatch, tmp_path, capsys
):
    from multipromot.cli import main
    from multipromot.lab import PRETRAIN_FAMILIES

    calls = []
    monkeypatch.setattr(
        "multipromot.cli.lab.ensure_lab_model", lambda path, **kw: calls.append((path, kw))
    )
    # without --out it would rebuild the cached built-in under another recipe: refused
    assert main(["lab", "pretrain", "--size", "llama-small", "--hold-out", "lab_trans_fr"]) == 2
    assert "--hold-out" in capsys.readouterr().err and calls == []
    assert main(["lab", "pretrain", "--hold-out", "lab_nope", "--out", str(tmp_path)]) == 2
    assert "lab_nope" in capsys.readouterr().err and calls == []

    args = ["lab", "pretrain", "--size", "llama-small", "--hold-out", "lab_trans_fr"]
    assert main([*args, "--out", str(tmp_path / "m"), "--json"]) == 0
    ((path, kw),) = calls
    assert path == tmp_path / "m"
    assert kw["families"] == tuple(f for f in PRETRAIN_FAMILIES if f != "lab_trans_fr")
    assert kw["optimizer"] == "adamw"  # the rest of the decoder recipe stays


def test_t5_lab_recipe_is_unchanged():
    """The values the cached T5 lab model was built with (its cache key) stay as they were.

    A record written before a field existed reads as that field's default (``_recipe``), so a
    model cached then still matches this recipe."""
    from multipromot.lab.model import LAB_SIZES, LAB_VERSION, LabConfig, _recipe

    assert LAB_VERSION == 4
    assert LAB_SIZES["small"] == {
        "d_model": 128,
        "d_kv": 32,
        "d_ff": 512,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
    }
    assert _recipe(asdict(LabConfig())) == {
        "seed": 0,
        "size": "small",
        "steps": 2000,
        "batch_size": 48,
        "lr": 0.01,
        "warmup_steps": 100,
        "final_fraction": 0.2,
        "shot_weights": [0.2, 0.2, 0.15, 0.1, 0.1, 0.08, 0.07, 0.05, 0.05],
        "families": list(LabConfig().families),
        "max_input_length": 512,
        "max_target_length": 32,
        # fields added later hold the defaults that reproduce the old recipe
        "optimizer": "adafactor",
        "weight_decay": 0.0,
        "family_weights": {},
    }
    written_before = {k: v for k, v in asdict(LabConfig()).items()}
    for later_field in ("optimizer", "weight_decay", "family_weights"):
        del written_before[later_field]
    assert _recipe(written_before) == _recipe(asdict(LabConfig()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, method",
    [("demo_decoder.yaml", "promot+1shot"), ("demo_decoder_rte.yaml", "promot@multi")],
)
def test_micro_lab_llama_runs_the_decoder_demo_configs_end_to_end(tmp_path, capsys, config, method):
    """`make demo-decoder` (the En-Fr-like setting) and the RTE-like decoder config in
    miniature, with every stage cut short."""
    from multipromot.cli import main
    from multipromot.lab.model import ensure_lab_model

    root = Path(__file__).resolve().parents[1]
    model = ensure_lab_model(tmp_path / "lab", eval_examples=0, **{**RECIPE, "steps": 10})
    overrides = [
        f"model={model}",
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        f"methods=[pretrained,{method}]",
        "stage1.steps=2",
        "stage1.eval_every=2",
        "stage1.eval_examples=2",
        "stage2.steps=2",
        "stage2.save_every=2",
        "stage2.eval_every=2",
        "stage2.eval_examples=2",
        "stage2.batch_size=4",
        "eval.examples=2",
        "eval.max_new_tokens=3",
        "eval.shots=[1]",
    ]
    assert main(["run", str(root / "configs" / config), *overrides]) == 0
    assert method in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {r["method"] for r in results["records"]} == {"pretrained", method}
