"""The lab: generated task families, the lab tokenizer, a miniature lab pretraining, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from multipromot.errors import UserError
from multipromot.lab import FAMILIES, PRETRAIN_FAMILIES, SPLITS, generate, get_world
from multipromot.lab.world import COMMITMENT, RELATIONS, TARGET_LANGUAGES

CLASSIFICATION = {"lab_rte": 2, "lab_cb": 3, "lab_wic": 2, "lab_sentiment": 2}
SMALL = {"n_train": 120, "n_validation": 30, "n_test": 30}


def _content(example: dict) -> tuple:
    """An example without its position: what must not repeat across splits."""
    return tuple(sorted((k, str(v)) for k, v in example.items() if k != "idx"))


# ------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("family", FAMILIES)
def test_generators_are_deterministic_for_a_seed(family):
    for split in SPLITS:
        assert generate(family, split, 0, **SMALL) == generate(family, split, 0, **SMALL)
    # Another seed gives other examples (QA's facts stay; its phrasings and order move).
    assert generate(family, "test", 0, **SMALL) != generate(family, "test", 1, **SMALL)


def test_generator_output_is_a_fresh_copy():
    first = generate("lab_rte", "train", 0, **SMALL)
    first[0]["premise"] = "changed"
    assert generate("lab_rte", "train", 0, **SMALL)[0]["premise"] != "changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_splits_are_disjoint(family):
    splits = {split: {_content(e) for e in generate(family, split, 0)} for split in SPLITS}
    assert not splits["train"] & splits["validation"]
    assert not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]
    # Examples are distinct inside a split too, and every split has what it was asked for.
    for split in SPLITS:
        assert len(splits[split]) == len(generate(family, split, 0))


def test_default_sizes_and_held_out_splits_do_not_move_with_train_size():
    for family in FAMILIES:
        sizes = {split: len(generate(family, split, 0)) for split in SPLITS}
        expected = (480, 160, 160) if family == "lab_qa" else (3000, 200, 200)
        assert (sizes["train"], sizes["validation"], sizes["test"]) == expected, family
        small = generate(family, "test", 0, n_train=50)
        assert small == generate(family, "test", 0), family


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_the_rte_difficulty_knob_changes_the_rule_and_nothing_else(share):
    """other_dimension, the share of False rows that compare on another dimension: every row
    keeps its place, premise and label, True rows do not move, the share is the one asked for,
    and no split repeats an example or shares one with another."""
    default = {split: generate("lab_rte", split) for split in SPLITS}
    ruled = {split: generate("lab_rte", split, other_dimension=share) for split in SPLITS}
    moved = 0
    for split in SPLITS:
        assert [e["premise"] for e in ruled[split]] == [e["premise"] for e in default[split]]
        assert [e["label"] for e in ruled[split]] == [e["label"] for e in default[split]]
        for new, old in zip(ruled[split], default[split], strict=True):
            if new["label"] == 0:
                assert new == old
            moved += new != old
    false = [e for split in SPLITS for e in ruled[split] if e["label"] == 1]
    other = sum(" not " not in e["hypothesis"] for e in false) / len(false)
    assert abs(other - share) < 0.02 and moved > 0
    keys = {split: {json.dumps(e, sort_keys=True) for e in ruled[split]} for split in SPLITS}
    assert sum(map(len, keys.values())) == sum(len(ruled[s]) for s in SPLITS)
    assert not keys["train"] & (keys["validation"] | keys["test"])


def test_the_rte_default_share_is_the_catalogue_task():
    for split in SPLITS:
        assert generate("lab_rte", split, other_dimension=0.5) == generate("lab_rte", split)
    with pytest.raises(UserError, match="other_dimension must be in"):
        generate("lab_rte", "train", other_dimension=1.5)
    with pytest.raises(UserError, match="unknown rule setting"):
        generate("lab_cb", "train", other_dimension=0.5)


def test_closed_book_qa_asks_only_facts_taught_in_train():
    world = get_world()

    def fact(example: dict) -> tuple[str, str]:
        entity = next(w for w in example["question"].rstrip("?.").split() if w in world.facts)
        return entity, example["answer"]

    train = generate("lab_qa", "train", 0)
    taught = {fact(e) for e in train}
    for split in ("validation", "test"):
        for example in generate("lab_qa", split, 0):
            entity, answer = fact(example)
            assert answer in world.facts[entity].values()
            assert (entity, answer) in taught
    assert len({e["question"] for e in train}) == 3 * len(world.entities) * len(RELATIONS)


@pytest.mark.parametrize("family", sorted(CLASSIFICATION))
def test_classification_labels_are_balanced(family):
    for split in SPLITS:
        labels = Counter(e["label"] for e in generate(family, split, 0))
        assert set(labels) == set(range(CLASSIFICATION[family]))
        assert max(labels.values()) - min(labels.values()) <= 1


def test_labels_follow_the_generating_rule():
    world = get_world()
    inverse = {
        a: b
        for pair in [
            ("bigger", "smaller"),
            ("older", "younger"),
            ("faster", "slower"),
            ("taller", "shorter"),
        ]
        for a, b in (pair, pair[::-1])
    }
    kinds: Counter[str] = Counter()
    for e in generate("lab_rte", "test", 0):
        words = e["hypothesis"].rstrip(".").split()
        negated = "not" in words
        if negated:
            words.remove("not")
        _, x, _, w, _, _, y = words
        comparative = next(s for s in e["premise"].rstrip(".").split(". ") if " than " in s)
        _, a, _, word, _, _, b = comparative.split()
        # the pair restated or paraphrased, on the premise's dimension or (False only) another
        assert (x, y) in {(a, b), (b, a)}
        other_dimension = w not in (word, inverse[word])
        if not other_dimension:
            assert (x, w, y) in {(a, word, b), (b, inverse[word], a)}
        assert not (negated and other_dimension)
        assert (negated or other_dimension) == (e["label"] == 1)
        kinds["negated" if negated else "other" if other_dimension else "entailed"] += 1
    # both ways to be False occur, about equally
    assert kinds["entailed"] == 100 and 35 <= kinds["negated"] <= 65, kinds
    for e in generate("lab_cb", "test", 0):
        # The clause the speaker embeds is the hypothesis; the embedding phrase is the label's.
        premise = f" {e['premise']} "
        said = [
            p for p in COMMITMENT[("True", "False", "Neither")[e["label"]]] if f" {p} " in premise
        ]
        assert len(said) == 1
        assert f" {said[0]} {e['hypothesis']}" in premise
        others = [p for phrases in COMMITMENT.values() for p in phrases if p != said[0]]
        assert not any(f" {p} " in premise for p in others)
    for e in generate("lab_wic", "test", 0):
        assert e["word"] in world.polysemes
        # noun sense: "the E V a W of the X."; verb sense: "the E W the X."
        senses = [
            "noun" if f" a {e['word']} of " in e[k] else "verb" for k in ("sentence1", "sentence2")
        ]
        for k, sense in zip(("sentence1", "sentence2"), senses, strict=True):
            if sense == "verb":
                assert e[k].split()[2] == e["word"]
        assert (senses == ["noun", "noun"]) == (e["label"] == 1)
        assert "verb" in senses or e["label"] == 1
    for e in generate("lab_sentiment", "test", 0):
        words = e["review"].replace(".", "").split()
        score = sum(w in world.positive for w in words) - sum(w in world.negative for w in words)
        assert (score > 0) == (e["label"] == 1)


def test_translation_lexicons_are_distinct_bijections():
    world = get_world()
    lexicons = [world.lexicons[lang] for lang in TARGET_LANGUAGES]
    for lexicon in lexicons:
        assert len(set(lexicon.values())) == len(lexicon)  # one target word per source word
    targets = [set(lexicon.values()) for lexicon in lexicons]
    assert not (targets[0] & targets[1] or targets[0] & targets[2] or targets[1] & targets[2])
    for lang in TARGET_LANGUAGES:
        for e in generate(f"lab_trans_{lang}", "test", 0, **SMALL):
            words = e["source"].rstrip(".").split()
            assert e["target"] == " ".join(world.lexicons[lang][w] for w in words) + "."


def test_bad_arguments_are_user_errors():
    from multipromot.lab.tasks import lab_rte

    with pytest.raises(UserError, match="split"):
        generate("lab_rte", "dev", 0)
    with pytest.raises(UserError, match="n_tran"):
        lab_rte("train", 0, n_tran=5)
    with pytest.raises(UserError, match="unknown lab family"):
        generate("lab_nope", "train", 0)


# ------------------------------------------------------------------------------ catalogue
def test_every_catalogue_lab_task_renders_with_its_answer_set():
    from multipromot.data.tasks import get_task

    for family in FAMILIES:
        task = get_task(family)
        assert task.source.describe().startswith(f"generator:{family}")
        for split in SPLITS:
            examples = task.examples(split)
            for example in examples[:50]:
                source, target = task.render(example)
                assert source and target
                assert "|||" not in source + target
                if task.answers is not None:
                    assert target == task.answers[example["label"]]
        if family in CLASSIFICATION:
            assert task.metric == "accuracy" and len(task.answers) == CLASSIFICATION[family]
        else:
            assert task.answers is None
    metrics = {get_task(f).metric for f in FAMILIES}
    assert metrics == {"accuracy", "exact_match", "bleu", "rouge2"}
    assert "lab_rte" not in PRETRAIN_FAMILIES and len(PRETRAIN_FAMILIES) == len(FAMILIES) - 1


def test_sources_find_the_lab_generators_after_a_registry_reset():
    import multipromot.lab
    from multipromot.data import sources

    sources.register_generator("test_gone")(lambda split, seed: [])
    sources.reset_generators()  # the lab's generators are built in: a reset keeps them
    assert "test_gone" not in sources.GENERATORS
    multipromot.lab.register()  # idempotent: registering again is no duplicate
    assert sources.get_generator("lab_sum")("test", 0, **SMALL)[0]["summary"]
    assert set(FAMILIES) <= set(sources.list_generators())


# ------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def lab_tokenizer():
    from multipromot.lab.model import build_lab_tokenizer, lab_corpus, lab_tasks

    return build_lab_tokenizer(lab_corpus(lab_tasks()))


def test_lab_tokenizer_is_word_level_and_round_trips(lab_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from multipromot.data.tasks import get_task
    from multipromot.features import SEPARATOR

    tok = lab_tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    task = get_task("lab_trans_de")
    source, target = task.render(task.examples("test")[0])
    # Every corpus word is one token; the period is its own.
    assert len(tok(target, add_special_tokens=False).input_ids) == len(target.split()) + 1
    text = f"{source} {target}{SEPARATOR}Unseen words, still fine!"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert ids.count(tok.convert_tokens_to_ids("\n")) == 2  # the separator stays visible
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text).input_ids == ids and len(loaded) == len(tok)
    assert loaded.decode(ids, skip_special_tokens=True).split() == text.split()


def test_micro_pretrain_writes_a_loadable_model_whose_loss_went_down(tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from multipromot.lab.model import LAB_VERSION, ensure_lab_model, read_pretrain_record
    from multipromot.models import read_lineage

    recipe = dict(seed=0, size="micro", steps=25, batch_size=8, warmup_steps=5, progress=False)
    path = ensure_lab_model(tmp_path / "lab", eval_examples=4, **recipe)
    record = read_pretrain_record(path)
    assert record["config"]["size"] == "micro" and record["config"]["steps"] == 25
    assert record["loss_last"] < record["loss_first"] - 0.5
    assert set(record["one_shot_test_scores"]) == set(FAMILIES)
    assert record["unseen_in_pretraining"] == ["lab_rte"]
    assert read_lineage(path)["name"] == "lab"
    assert read_lineage(path)["fingerprint"] == record["fingerprint"]

    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.d_model == 32 and model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["Q: what does the nera eat? A:"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1

    # A second call with the same recipe finds the model and does not train again (how many
    # test items the 1-shot check scores is not part of the recipe).
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_lab_model(path, eval_examples=0, **recipe) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # Another recipe, or a model cached by another lab version, is built again.
    ensure_lab_model(path, eval_examples=0, **{**recipe, "steps": 5})
    assert read_pretrain_record(path)["config"]["steps"] == 5
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    stale = {**read_pretrain_record(path), "lab_version": LAB_VERSION - 1}
    (path / "lab_pretrain.json").write_text(json.dumps(stale))
    ensure_lab_model(path, eval_examples=0, **{**recipe, "steps": 5})
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp
    assert read_pretrain_record(path)["lab_version"] == LAB_VERSION


def test_micro_lab_model_runs_the_demo_config_end_to_end(tmp_path, capsys):
    """`make demo` in miniature: a micro lab model, then configs/demo.yaml (the file itself, so
    its keys stay valid) with every stage cut to a few steps: stage 1, stage 2 single- and
    multi-task, the router, the lab suite and the report."""
    from pathlib import Path

    from multipromot.cli import main
    from multipromot.lab.model import ensure_lab_model

    root = Path(__file__).resolve().parents[1]
    model = ensure_lab_model(
        tmp_path / "lab",
        seed=0,
        size="micro",
        steps=10,
        batch_size=8,
        warmup_steps=2,
        eval_examples=0,
        progress=False,
    )
    overrides = [
        f"model={model}",
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        "methods=[pretrained,standard,promot+1shot,promot@multi]",
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
    assert main(["run", str(root / "configs" / "demo.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'run' / 'report.md'}" in out
    assert "promot@multi" in out and "Norm.Avg" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    unseen = {r["task"] for r in results["records"] if not r["seen"]}
    assert unseen == {"lab_cb", "lab_wic", "lab_qa", "lab_trans_de", "lab_trans_ro", "lab_sum"}
    methods = {r["method"] for r in results["records"]}
    assert methods == {"pretrained", "standard", "promot+1shot", "promot@multi"}


def test_lab_recipe_is_validated(tmp_path):
    from multipromot.lab.model import ensure_lab_model

    with pytest.raises(UserError, match="batch_sise"):
        ensure_lab_model(tmp_path / "x", batch_sise=4)
    with pytest.raises(UserError, match="size"):
        ensure_lab_model(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ CLI
def test_cli_lab_tasks_lists_every_family():
    from typer.testing import CliRunner

    from multipromot.cli.lab import app

    result = CliRunner().invoke(app, ["tasks", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(FAMILIES)
    rte = rows[0]
    assert rte["answers"] == ["True", "False"] and not rte["pretraining"]
    assert rte["example"]["input"].endswith("Is it true or false? answer:")
    text = CliRunner().invoke(app, ["tasks"]).output
    assert "lab_trans_ro: 3000 train / 200 validation / 200 test; bleu" in text


def test_lab_import_is_light_and_registers_generators_and_the_builtin_model():
    import subprocess
    import sys

    # sources.py imports multipromot.lab to find an unknown generator: that must not pull in
    # transformers (seconds), and must leave `lab` a built-in model of multipromot.models.
    code = (
        "import sys, multipromot.lab, multipromot.data.sources as s, multipromot.models as m; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert 'lab_qa' in s.GENERATORS and 'lab' in m.BUILTIN_MODELS"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
