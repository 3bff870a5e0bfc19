"""The mitigations of issue 28 next to ProMoT, each tested on its mechanism: replay rows come
only from the train splits of the replayed families (never an evaluation row) and carry no
prompt; sdft's targets are the base model's rewrites, kept where they score, and cached by
provenance; the drift from the base model (KL) of a model with itself is 0; a replay share
outside [0, 1) and sdft with a task whose metric has no per-item score are refused before
training; and the new methods run under `run` and `sweep`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from multipromot.cli import main
from multipromot.config import load_config
from multipromot.data import metrics
from multipromot.data.collate import Collator
from multipromot.data.exemplars import build_item, render_exemplar
from multipromot.data.metrics import postprocess
from multipromot.data.mixtures import load_mixture
from multipromot.data.tasks import get_task
from multipromot.errors import UserError
from multipromot.eval.drift import kl_from_base
from multipromot.eval.suite_file import load_suite
from multipromot.lab.tasks import PRETRAIN_FAMILIES
from multipromot.models import load_model
from multipromot.soft_prompt import PromptedModel
from multipromot.sweep import plan_sweep, run_sweep
from multipromot.train import sdft, stage2

ROOT = Path(__file__).resolve().parents[1]
SUITE = {t.name for t in load_suite(ROOT / "eval" / "lab.yaml").resolved_tasks()}


def _rendered(task, split: str) -> tuple[set[str], set[str]]:
    """A task's rendered inputs and exemplar strings of one split."""
    rows = task.examples(split)
    return {task.render(r)[0] for r in rows}, {render_exemplar(task, r) for r in rows}


def _stream(tmp_path, mixture: str, steps: int, **stage2_keys) -> tuple[object, list]:
    """The items stage 2's own setup draws in ``steps`` steps (tiny T5, lab tasks)."""
    keys = {"mode": "standard", "batch_size": 32, "steps": steps, "mixture": mixture}
    keys.update(stage2_keys)
    cfg = load_config(
        None,
        [
            "model=tiny-t5",
            f"out_dir={tmp_path / 'stage2'}",
            "log.to=[]",
            *[f"stage2.{k}={v}" for k, v in keys.items()],
        ],
    )
    run = stage2.setup(cfg, progress=False)
    run.collator = list  # the items of each micro-batch, not their tensors
    return run, [item for _ in range(steps) for batch in run.batches() for item in batch]


@pytest.mark.parametrize(
    "mixture, replayed",
    [
        ("lab_rte_replay_all.yaml", set(PRETRAIN_FAMILIES)),  # every pretraining family
        ("lab_rte_replay_outside.yaml", {"lab_sentiment", "lab_trans_fr"}),
    ],
)
def test_replay_rows_are_train_rows_of_the_replayed_families_only(tmp_path, mixture, replayed):
    from multipromot.lab import PRETRAIN_FAMILIES

    assert replayed <= set(PRETRAIN_FAMILIES)
    if "outside" in mixture:
        assert not replayed & SUITE  # the second way: no family the suite evaluates
    _, items = _stream(tmp_path, str(ROOT / "mixtures" / mixture), steps=60)
    families = {name: get_task(name) for name in [*replayed, *SUITE, "lab_rte"]}
    train = {name: _rendered(task, "train") for name, task in families.items()}
    held_out = set()  # every validation and test input of every family involved
    for task in families.values():
        for split in ("validation", "test"):
            held_out |= _rendered(task, split)[0] | _rendered(task, split)[1]
    drawn: dict[str, int] = {}
    for item in items:
        (family,) = [n for n, (inputs, _) in train.items() if item.input in inputs]
        drawn[family] = drawn.get(family, 0) + 1
        assert item.input not in held_out
        assert all(e in train[family][1] and e not in held_out for e in item.exemplars)
        if family == "lab_rte":  # the fine-tuned task: as the method trains it
            assert (item.task_id, len(item.exemplars)) == (-1, 0)
        else:  # a replay row: no prompt, replay.shots exemplars of its own family
            assert (item.task_id, len(item.exemplars)) == (-1, 2)
    assert set(drawn) == {"lab_rte", *replayed}
    share = 1 - drawn["lab_rte"] / len(items)
    assert 0.07 < share < 0.13  # replay.share 0.1 of 1920 rows


def test_replay_rows_get_no_prompt_and_are_not_fine_tuned_tasks(tmp_path):
    """ProMoT with replay: its task's rows carry its prompt (row 0), replay rows none; the
    prompt table, validation and the record know only the fine-tuned task."""
    mixture = load_mixture(ROOT / "mixtures" / "lab_rte_replay_all.yaml")
    assert mixture.task_names == ["lab_rte"] and len(mixture.stream().tasks) == 9
    assert mixture.stream_rows([0], 0) == ([0, *[-1] * 8], [0, *[2] * 8])
    run, items = _stream(tmp_path, mixture.file, steps=4, mode="random_prompt")
    assert run.prompted.prompts.shape[0] == 1 and run.task_ids == [0]
    rte = _rendered(get_task("lab_rte"), "train")[0]
    assert {item.task_id for item in items if item.input in rte} == {0}
    assert {item.task_id for item in items if item.input not in rte} == {-1}
    assert run.record.tasks == ["lab_rte"] and run.record.replay["share"] == 0.1


def test_a_share_of_zero_replays_nothing(tmp_path):
    path = tmp_path / "zero.yaml"
    path.write_text("tasks: [{task: lab_rte}]\nreplay: {share: 0, tasks: [{task: lab_cb}]}\n")
    mixture = load_mixture(path)
    assert mixture.stream() is mixture and mixture.replayed == []


@pytest.mark.parametrize(
    "replay, key, words",
    [
        ("{share: 1.0, tasks: [{task: lab_cb}]}", "replay.share", "[0, 1)"),
        ("{share: -0.1, tasks: [{task: lab_cb}]}", "replay.share", "[0, 1)"),
        ("{share: '0.1', tasks: [{task: lab_cb}]}", "replay.share", "[0, 1)"),
        ("{tasks: [{task: lab_cb}]}", "replay.share", "missing"),
        ("{share: 0.1, tasks: [{task: lab_rte}]}", "replay.tasks[0]", "fine-tuned"),
        ("{share: 0.1, shots: -1, tasks: [{task: lab_cb}]}", "replay.shots", ">= 0"),
        ("{share: 0.1, tasks: [{task: lab_cb}], epochs: 2}", "replay.epochs", "unknown"),
    ],
)
def test_bad_replay_settings_are_refused(tmp_path, replay, key, words):
    path = tmp_path / "mix.yaml"
    path.write_text(f"tasks: [{{task: lab_rte}}]\nreplay: {replay}\n")
    with pytest.raises(UserError) as err:
        load_mixture(path)
    assert err.value.key == key and words in err.value.message
    assert Path(err.value.file) == path


def test_a_replay_task_whose_train_rows_are_evaluated_is_refused(tmp_path):
    data = "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(30))
    (tmp_path / "rows.jsonl").write_text(data)
    path = tmp_path / "mix.yaml"
    path.write_text(
        "tasks: [{task: lab_rte}]\n"
        "replay:\n  share: 0.1\n  tasks:\n"
        "    - name: same_rows\n"
        "      source: {files: {train: rows.jsonl, test: rows.jsonl}, format: json}\n"
        '      template: {jinja: "{{text}} ||| {{answer_choices[label]}}", answer_choices: "a ||| b"}\n'
        "      metric: accuracy\n"
        "      splits: {validation: {from: train, size: 5}, test: train}\n"
    )
    with pytest.raises(UserError, match="train split is also its test split") as err:
        load_mixture(path)
    assert err.value.key == "replay.tasks[0]"


def _tiny_run(tmp_path, out: str = "run") -> tuple[str, list[str]]:
    for sub in ("configs", "mixtures", "eval"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("data"))
    return str(tmp_path / "configs" / "tiny.yaml"), [
        f"out_dir={tmp_path / out}",
        f"bank.dir={tmp_path / 'bank'}",
        "stage2.steps=2",
        "stage2.save_every=2",
        "stage2.eval_every=2",
        "stage2.eval_examples=2",
        "stage2.batch_size=4",
        "eval.examples=3",
        "eval.max_new_tokens=3",
        "eval.drift_examples=2",
        "eval.curve=false",
        "log.to=[]",
    ]


def test_a_bad_replay_share_stops_run_before_training(tmp_path, monkeypatch, capsys):
    path, overrides = _tiny_run(tmp_path)
    bad = tmp_path / "mixtures" / "bad.yaml"
    bad.write_text("tasks: [{task: lab_rte}]\nreplay: {share: 1.5, tasks: [{task: lab_cb}]}\n")
    monkeypatch.setattr(stage2, "finetune", lambda *a, **k: pytest.fail("trained"))
    code = main(["run", path, *overrides, f"mixtures={{bad: {bad}}}", "methods=[standard@bad]"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {bad}: replay.share: ")


def test_sdft_refuses_a_task_whose_metric_has_no_item_scores(tmp_path, monkeypatch, capsys):
    path, overrides = _tiny_run(tmp_path)
    data = "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(40))
    (tmp_path / "mixtures" / "rows.jsonl").write_text(data)
    mixture = tmp_path / "mixtures" / "corpus.yaml"
    mixture.write_text(
        "tasks:\n  - name: corpus_task\n    source: {files: rows.jsonl, format: json}\n"
        '    template: {jinja: "{{text}} ||| {{answer_choices[label]}}", answer_choices: "a ||| b"}\n'
        "    metric: corpus_only\n"
    )
    metrics.register_metric("corpus_only")(lambda p, r: 50.0)
    monkeypatch.setattr(stage2, "finetune", lambda *a, **k: pytest.fail("trained"))
    try:
        assert not metrics.scores_items("corpus_only") and metrics.scores_items("bleu")
        code = main(["run", path, *overrides, f"mixtures={{c: {mixture}}}", "methods=[sdft@c]"])
        assert code == 2
        # (the lines before it say which rows the local task holds out for validation, test)
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
        assert line.startswith(f"error: {Path(path).resolve()}: methods: method 'sdft@c': ")
        assert "'corpus_task'" in line and "corpus_only" in line
        stage2_only = [f"stage2.mixture={mixture}", "stage2.mode=sdft"]
        assert main(["stage2", path, *overrides, *stage2_only]) == 2
        assert "stage2.mode: stage 2: sdft keeps" in capsys.readouterr().err
    finally:
        metrics.reset_registries()


def _sdft_config(tmp_path, *extra: str):
    return load_config(
        None,
        [
            "model=tiny-llama",  # a random tiny model that writes something (the T5 writes "")
            f"out_dir={tmp_path / 'out'}",
            f"stage2.mixture={ROOT / 'mixtures' / 'lab_rte.yaml'}",
            "stage2.steps=2",
            "stage2.batch_size=6",
            "stage2.max_target_length=8",
            *extra,
        ],
    )


def test_sdft_targets_are_the_base_models_rewrites_and_are_cached(tmp_path, monkeypatch):
    # keep every non-empty rewrite: the random tiny model is never right
    cfg = _sdft_config(tmp_path, "sdft.threshold=0")
    mixture = load_mixture(cfg.stage2.mixture)
    retargeted, stats = sdft.distilled(cfg, mixture, 0, progress=False)
    task, new = mixture.tasks[0], retargeted.tasks[0]
    folder = Path(stats["folder"])
    rows = [json.loads(line) for line in (folder / "lab_rte.jsonl").read_text().splitlines()]
    assert len(rows) == stats["tasks"]["lab_rte"]["rows"] <= 12  # the rows 2 x 6 draws reach
    assert stats["reused"] is False and folder.parent == tmp_path / "out" / "sdft_targets"

    # The base model's own greedy continuation of "input target \n\n input", post-processed
    base, tokenizer, _ = load_model("tiny-llama")
    collator = Collator(tokenizer, decoder_only=True, for_generation=True)
    for row in rows:
        source, target = task.render(task.examples("train")[row["index"]])
        item = build_item(task, row["index"], exemplar_indices=[row["index"]])
        assert item.exemplars == [f"{source} {target}"] and item.input == source
        batch = collator([item])
        ids = base.generate(
            **{k: batch[k] for k in ("input_ids", "attention_mask")},
            max_new_tokens=8,
            do_sample=False,
            num_beams=1,
        )[:, batch["input_ids"].shape[1] :]
        text = tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
        assert row["rewrite"] == postprocess(text, task.postprocess)
        assert row["original"] == target and row["kept"] == (row["rewrite"] != "")
        # stage 2 trains on the kept rewrite, else on the original target
        trained = new.render(new.examples("train")[row["index"]])
        assert trained == (source, row["rewrite"] if row["kept"] else target)
    assert any(row["kept"] and row["rewrite"] != row["original"] for row in rows)
    assert new.render(new.examples("validation")[0]) == task.render(task.examples("validation")[0])

    # Cached: the same provenance reads the folder and generates nothing ...
    monkeypatch.setattr(sdft, "predict", lambda *a, **k: pytest.fail("generated again"))
    again, stats2 = sdft.distilled(cfg, mixture, 0, progress=False)
    assert stats2["reused"] is True and stats2["folder"] == stats["folder"]
    assert again.tasks[0].targets == new.targets
    # ... another threshold is another set
    monkeypatch.undo()
    cfg.sdft.threshold = 100.0
    _, stats3 = sdft.distilled(cfg, mixture, 0, progress=False)
    assert stats3["folder"] != stats["folder"] and stats3["tasks"]["lab_rte"]["kept"] == 0


def test_sdft_keeps_a_rewrite_only_where_it_scores_as_correct(tmp_path, monkeypatch):
    """Rewrites that match the label (case and punctuation aside: accuracy's per-item score is
    100) replace their targets; the others, and empty ones, leave the original."""
    cfg = _sdft_config(tmp_path)
    task = load_mixture(cfg.stage2.mixture).tasks[0]

    def rewrites(prompted, tokenizer, items, collator, **kw):
        said = {"True": "true.", "False": "False, as said"}  # correct, in other words
        return [
            said[it.target] if i % 3 == 0 else ("" if i % 3 == 1 else "Neither")
            for i, it in enumerate(items)
        ]

    monkeypatch.setattr(sdft, "predict", rewrites)
    retargeted, stats = sdft.distilled(cfg, load_mixture(cfg.stage2.mixture), 0, progress=False)
    rows = [
        json.loads(line)
        for line in (Path(stats["folder"]) / "lab_rte.jsonl").read_text().splitlines()
    ]
    for i, row in enumerate(rows):
        assert row["kept"] == (i % 3 == 0) and row["score"] == (100.0 if i % 3 == 0 else 0.0)
        expected = row["rewrite"] if i % 3 == 0 else row["original"]
        trained = retargeted.tasks[0].examples("train")[row["index"]]
        assert retargeted.tasks[0].render(trained)[1] == expected
        if row["kept"]:  # the rewrite as scoring post-processes it: its first word
            assert row["rewrite"] == {"True": "true", "False": "False"}[row["original"]]
    counts = stats["tasks"]["lab_rte"]
    assert counts["kept"] == sum(i % 3 == 0 for i in range(len(rows)))
    assert counts["changed"] == sum(r["kept"] and r["rewrite"] != r["original"] for r in rows)
    assert task.render(task.examples("train")[rows[0]["index"]])[1] == rows[0]["original"]


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_the_kl_of_a_model_with_itself_is_zero(name):
    model, tokenizer, _ = load_model(name)
    model.eval()
    task = get_task("lab_rte")
    items = [build_item(task, i, split="test", shots=1) for i in range(4)]
    decoder_only = name != "tiny-t5"
    args = dict(decoder_only=decoder_only, max_input_length=256, max_target_length=16)
    same = kl_from_base(PromptedModel(model), PromptedModel(model), tokenizer, items, **args)
    assert same["kl"] == 0.0 and same["tokens"] > 0 and same["items"] == 4
    other, _, _ = load_model(name)
    assert (
        kl_from_base(PromptedModel(model), PromptedModel(other.eval()), tokenizer, items, **args)[
            "kl"
        ]
        == 0.0
    )  # the same weights loaded twice
    with torch.no_grad():
        weight = next(p for p in other.parameters() if p.dim() == 2)
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    moved = kl_from_base(
        PromptedModel(other.eval()), PromptedModel(model), tokenizer, items, **args
    )
    assert moved["kl"] > 0
    # a prompted row drifts; a row without a prompt is the base model's own
    table = torch.randn(1, 3, model.get_input_embeddings().weight.shape[1])
    prompted = PromptedModel(model, table)
    for item in items:
        item.task_id = 0
    assert kl_from_base(prompted, PromptedModel(model), tokenizer, items, **args)["kl"] > 0


def test_the_mitigations_run_under_sweep_and_run(tmp_path):
    """The acceptance scenario: one sweep cell (a `run`) with replay, sdft and frozen layers
    next to the pretrained model: results.json and report.md say what each did, every record
    has its drift (0 for the pretrained model), and the aggregate plots the trade-off."""
    path, overrides = _tiny_run(tmp_path, "sweep")
    replay = tmp_path / "mixtures" / "tiny_replay.yaml"
    replay.write_text(
        "tasks: [{task: lab_rte}]\n"
        "replay: {share: 0.5, shots: 1, tasks: [{task: lab_sentiment}, {task: lab_qa}]}\n"
    )
    methods = "methods=[pretrained,standard@replay,sdft,standard~freeze1]"
    sweep = plan_sweep(
        path,
        [*overrides, f"mixtures={{replay: {replay}}}", methods],
        seeds=[0],
    )
    report = run_sweep(sweep)
    cell = tmp_path / "sweep" / "cells" / "seed=0"
    results = json.loads((cell / "results.json").read_text())
    records = [r for r in results["records"] if r["selected"]]
    seen = {(r["method"], r["task"]) for r in records if r["seen"]}
    assert ("standard@replay", "lab_rte") in seen
    assert not {t for m, t in seen if m == "standard@replay"} - {"lab_rte"}  # replay: not seen
    replayed = {r["method"]: r.get("train_replay") for r in records}
    assert replayed["standard@replay"]["tasks"] == {"lab_sentiment": 0.5, "lab_qa": 0.5}
    targets = next(r["train_targets"] for r in records if r["method"] == "sdft")
    assert set(targets["tasks"]) == {"lab_rte", "lab_trans_fr"}
    assert all(r["drift"]["kl"] is not None for r in records)
    assert {r["drift"]["kl"] for r in records if r["method"] == "pretrained"} == {0.0}
    drift = {d["method"]: d for d in results["summary"]["drift"]}
    assert drift["standard~freeze1"]["finetuned"] > 0
    text = (cell / "report.md").read_text()
    assert "## Drift from the base model" in text and "self-distilled targets" in text
    assert "replay: 50% of stage 2's rows were 1-shot train rows of lab_sentiment, lab_qa" in text
    assert (cell / "sdft_targets").is_dir()
    assert (report.parent / "sweep_tradeoff.png").is_file()
    assert (report.parent / "sweep_drift.png").is_file()


def _results(folder, methods):
    """A run folder whose results.json holds, per method, (target score, unseen scores per
    shots, kl): the fields :func:`tradeoff` reads."""
    records = []
    for method, (target, unseen, kl) in methods.items():
        drift = {"kl": kl, "tokens": 10}
        records.append(
            {
                "method": method,
                "task": "t",
                "seen": True,
                "shots": 0,
                "score": target,
                "drift": drift,
            }
        )
        for shots, scores in unseen.items():
            for i, score in enumerate(scores):
                records.append(
                    {
                        "method": method,
                        "task": f"u{i}",
                        "seen": False,
                        "shots": shots,
                        "score": score,
                    }
                )
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"records": records}))
    return {"folder": str(folder), "seed": int(folder.name[-1]), "values": {}}


def test_tradeoff_points_and_their_rank_correlation_by_hand(tmp_path):
    from multipromot.eval.aggregate import tradeoff

    cells = []
    for seed in (0, 1):
        cells.append(
            _results(
                tmp_path / f"seed{seed}",
                {
                    "pretrained": (10.0, {1: [90.0, 100.0]}, 0.0),
                    "standard": (100.0, {1: [10.0, 20.0 + seed]}, 2.0 + seed),
                    "promot": (98.0, {1: [80.0, 90.0 + seed]}, 0.5 + seed / 10),
                },
            )
        )
    trade = tradeoff({"all cells": cells})
    points = {(p["seed"], p["method"]): p for p in trade["points"]}
    assert points[(0, "pretrained")]["kept"] == {"1": 0.0}
    assert points[(0, "standard")]["kept"] == {"1": 15.0 - 95.0}
    assert points[(1, "promot")]["kept"] == {"1": 85.5 - 95.0}
    assert points[(1, "standard")]["target"] == 100.0 and points[(1, "standard")]["kl"] == 3.0
    # kl 0.5, 0.6, 2, 3 rank 1-4; their kept -10, -9.5, -80, -79.5 rank 3, 4, 1, 2: the rank
    # differences are 2 each, so rho = 1 - 6 x 16 / (4 x 15) = -0.6 (pretrained left out)
    rho = trade["spearman_kl_kept"]["all cells"]["1"]
    assert rho["points"] == 4 and rho["rho"] == pytest.approx(-0.6)
