"""Evaluation suites: YAML validation, k-shot items, routing to prompt rows, scoring, determinism.

The scoring checks replace ``predict`` with fixed strings, so every expected score is worked out
by hand from the lab test split's first golds (lab_cb: True, False, Neither, True; lab_qa: fize,
neri, lukuk, deno). One test runs a real untrained tiny T5 end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multipromot.data.exemplars import render_exemplar
from multipromot.data.tasks import get_task
from multipromot.errors import UserError
from multipromot.eval import generation
from multipromot.eval.suites import (
    DEFAULT_SHOTS,
    EvalSuite,
    SuiteTask,
    build_items,
    evaluate_finetuned,
    evaluate_suite,
    load_suite,
)
from multipromot.features import SEPARATOR
from multipromot.router import Route, Router, RouterEntry
from multipromot.soft_prompt import PromptedModel
from tests.conftest import build_tiny

ROOT = Path(__file__).resolve().parents[1]
# An inline suite task (issue 26, item 8), as written in a mixture
INLINE = (
    'name: mine, source: {files: d.jsonl, format: json}, template: {jinja: "{{q}} ||| {{a}}"}, '
    "metric: exact_match"
)
RECORD_KEYS = {
    "task",
    "shots",
    "metric",
    "score",
    "n",
    "random",
    "specialization",
    "target_language",
    "input_copy",
    "prompt",
    "prompted",
    "split",
    "exemplars_kept",
    "items",
}
ITEM_KEYS = {
    "id",
    "input_sha256",
    "output",
    "prediction",
    "references",
    "prompt",
    "value",
    "specialized",
    "target_language",
    "input_copy",
}


# -- loading ---------------------------------------------------------------------------------------


def test_shipped_suites_name_the_expected_tasks():
    lab = load_suite(ROOT / "eval" / "lab.yaml")
    assert lab.task_names == [
        "lab_cb",
        "lab_wic",
        "lab_qa",
        "lab_trans_de",
        "lab_trans_ro",
        "lab_sum",
    ]
    assert lab.shots == (1, 4) == DEFAULT_SHOTS
    assert lab.split == "test"
    # The fine-tuned lab tasks are not "unseen".
    assert not {"lab_rte", "lab_trans_fr"} & set(lab.task_names)
    assert lab.random_baselines == {
        "lab_cb": 33.33,
        "lab_wic": 50.0,
        "lab_qa": 0.0,
        "lab_trans_de": 0.0,
        "lab_trans_ro": 0.0,
        "lab_sum": 0.0,
    }

    paper = load_suite(ROOT / "eval" / "paper8.yaml")  # names only: nothing is downloaded
    assert paper.task_names == [
        "cb",
        "wic",
        "trivia_qa",
        "web_questions",
        "wmt16_en_de",
        "wmt16_en_ro",
        "xsum",
        "wiki_lingua_en",
    ]
    assert paper.random_baselines["cb"] == 33.33 and paper.random_baselines["wic"] == 50.0
    assert [get_task(n).metric for n in paper.task_names] == [
        "accuracy",
        "accuracy",
        "triviaqa_exact_match",
        "exact_match",
        "bleu",
        "bleu",
        "rouge2",
        "rouge2",
    ]

    tiny = load_suite(ROOT / "eval" / "tiny.yaml")
    assert tiny.task_names == ["lab_cb", "lab_qa"] and tiny.examples == 4


def test_defaults_and_bare_task_names(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntasks: [lab_qa, {task: lab_cb, random: 33}]\n")
    suite = load_suite(path)
    assert suite == EvalSuite(
        name="s",
        tasks=(SuiteTask("lab_qa", 0.0), SuiteTask("lab_cb", 33.0)),
        shots=(1, 4),
        examples=100,
        split="test",
        file=str(path.resolve()),
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tasks: [lab_cb]\n", "name"),
        ("name: s\n", "tasks"),
        ("name: s\ntasks: []\n", "tasks"),
        ("name: s\nshot: [1]\ntasks: [lab_cb]\n", "shot"),
        ("name: s\nshots: [1, -1]\ntasks: [lab_cb]\n", "shots[1]"),
        ("name: s\nshots: [1, 1]\ntasks: [lab_cb]\n", "shots"),
        ("name: s\nshots: 4\ntasks: [lab_cb]\n", "shots"),
        ("name: s\nexamples: 0\ntasks: [lab_cb]\n", "examples"),
        ("name: s\ntasks: [lab_cb, lab_nope]\n", "tasks[1].task"),
        ("name: s\ntasks: [{task: lab_cb, random: 100}]\n", "tasks[0].random"),
        ("name: s\ntasks: [{task: lab_cb, rnd: 3}]\n", "tasks[0].rnd"),
        ("name: s\ntasks: [{random: 3}]\n", "tasks[0]"),
        ("name: s\ntasks: [lab_cb, {task: lab_cb}]\n", "tasks[1].task"),
        ("name: s\ntasks: [3]\n", "tasks[0]"),
        # inline tasks (issue 26, item 8): the mixture's form, and no catalogue name
        (f"name: s\ntasks: [{{{INLINE}, rnd: 3}}]\n", "tasks[0].rnd"),
        (f"name: s\ntasks: [{{{INLINE.replace('mine', 'lab_cb')}}}]\n", "tasks[0].name"),
        (f"name: s\ntasks: [{{{INLINE}, task: lab_cb}}]\n", "tasks[0]"),
        (f"name: s\ntasks: [{{{INLINE}, random: 100}}]\n", "tasks[0].random"),
        ("name: s\ntasks: [{name: mine, metric: accuracy}]\n", "tasks[0].source"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, text, key):
    (tmp_path / "d.jsonl").write_text('{"q": "x", "a": "y"}\n')
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_suite(path)
    assert info.value.file == str(path)
    assert info.value.key == key


def test_inline_tasks_load_like_a_mixtures(tmp_path):
    rows = "".join(f'{{"q": "question {i}", "a": "a{i}"}}\n' for i in range(30))
    (tmp_path / "d.jsonl").write_text(rows)
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ntasks: [lab_cb, {{{INLINE}, random: 5}}]\n")
    suite = load_suite(path)
    assert suite.task_names == ["lab_cb", "mine"] and suite.random_baselines["mine"] == 5.0
    lab_cb, mine = suite.resolved_tasks()
    assert lab_cb is get_task("lab_cb") and mine.name == "mine"
    assert mine.render(mine.examples("test")[0])[0].startswith("question ")


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_suite(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- lab_cb\n")
    with pytest.raises(UserError, match="mapping"):
        load_suite(tmp_path / "list.yaml")


# -- items -----------------------------------------------------------------------------------------


def test_items_are_kshot_from_train_and_deterministic():
    task = get_task("lab_cb")
    items = build_items(task, 4, examples=3, split="test", seed=0)
    assert [i.target for i in items] == ["True", "False", "Neither"]
    assert [i.input for i in items] == [task.render(e)[0] for e in task.examples("test")[:3]]
    train = {render_exemplar(task, e) for e in task.examples("train")}
    assert all(len(i.exemplars) == 4 and set(i.exemplars) <= train for i in items)
    assert build_items(task, 4, examples=3, split="test", seed=0) == items
    assert build_items(task, 4, examples=3, split="test", seed=1) != items
    assert [i.exemplars for i in build_items(task, 0, examples=3, split="test", seed=0)] == [[]] * 3


# -- evaluation with a fixed predict ---------------------------------------------------------------


class FakeRouter:
    """Sends lab_cb inputs (any k) to lab_rte's prompt, everything else to none."""

    def __init__(self):
        self.texts: list[str] = []

    def route(self, texts):
        self.texts.extend(texts)
        return [
            Route("lab_rte", "test", 1.0)
            if "true, false, or neither" in t
            else Route(None, "test", 0.0)
            for t in texts
        ]


FIXED = {  # outputs per input prefix, in item order
    "lab_cb": ["True", "False. The", "Neither", "zzz"],  # 3 of 4 right; 2 in {True, False}
    "lab_qa": ["True", "neri\n\nQ: who", "x", "false"],  # 1 right (cut at the separator); 2 T/F
}


@pytest.fixture
def fixed_predict(monkeypatch):
    """Replace predict: record every call's items, answer from FIXED by task and position."""
    calls: list[list] = []

    def fake(prompted, tokenizer, items, collator, **kwargs):
        calls.append(list(items))
        seen = {"lab_cb": 0, "lab_qa": 0}
        out = []
        for item in items:
            task = "lab_cb" if "neither" in item.input else "lab_qa"
            out.append(FIXED[task][seen[task]])
            seen[task] += 1
        return out

    monkeypatch.setattr(generation, "predict", fake)
    return calls


@pytest.fixture(scope="module")
def tiny_t5():
    model, tok = build_tiny("tiny-t5")
    dim = model.get_input_embeddings().weight.shape[1]
    prompts = torch.randn(2, 3, dim, generator=torch.Generator().manual_seed(0))
    return PromptedModel(model, prompts, ["lab_trans_fr", "lab_rte"]), tok


def test_scores_and_specialization_from_the_outputs(tiny_t5, fixed_predict):
    prompted, tok = tiny_t5
    suite = load_suite(ROOT / "eval" / "tiny.yaml")
    records = evaluate_suite(
        prompted,
        tok,
        suite,
        decoder_only=False,
        shots=[1, 2],
        specialization_answers=["True", "False"],
    )
    assert [(r["task"], r["shots"]) for r in records] == [
        ("lab_cb", 1),
        ("lab_qa", 1),
        ("lab_cb", 2),
        ("lab_qa", 2),
    ]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["n"] == 4 and r["prompt"] is None and r["prompted"] == 0.0
        assert r["specialization"] == 50.0  # two of four outputs start with True/False
    assert [r["score"] for r in records] == [75.0, 25.0, 75.0, 25.0]
    assert [r["random"] for r in records] == [33.33, 0.0, 33.33, 0.0]
    # Every scored item is kept: its output, what it counted for, whether it was specialized.
    cb = records[0]["items"]
    assert [set(item) for item in cb] == [ITEM_KEYS] * 4
    assert [item["id"] for item in cb] == [0, 1, 2, 3]
    assert [item["output"] for item in cb] == FIXED["lab_cb"][:4]
    assert sum(item["value"][0] for item in cb) / 4 == records[0]["score"]
    assert sum(item["specialized"] for r in records[:2] for item in r["items"]) == 4
    assert [r["metric"] for r in records[:2]] == ["accuracy", "exact_match"]
    # One predict call per shots setting; each mixes both tasks; no router -> no prompt.
    assert len(fixed_predict) == 2
    for k, items in zip([1, 2], fixed_predict, strict=True):
        assert len(items) == 8
        assert {len(i.exemplars) for i in items} == {k}
        assert {i.task_id for i in items} == {-1}
    without = evaluate_suite(prompted, tok, suite, decoder_only=False, shots=[1])
    assert {r["specialization"] for r in without} == {None}
    assert {r["target_language"] for r in without} == {None}  # no generation task fine-tuned
    # "True", "False. The" (half its words), "Neither", "zzz": 2 of 4 in a language of
    # {true, false}; on lab_qa "True" and "false" are, "neri" (cut at the separator) and "x" not
    measured = evaluate_suite(
        prompted, tok, suite, decoder_only=False, shots=[1], language=frozenset({"true", "false"})
    )
    assert [r["target_language"] for r in measured] == [50.0, 50.0]
    assert [i["target_language"] for i in measured[0]["items"]] == [True, True, False, False]
    assert {r["input_copy"] for r in measured} == {0.0}  # no output repeats its input


def test_outputs_in_the_fine_tuned_tasks_language_and_copies_of_the_input():
    """After a generation task (issue 27, item 3): an output counts as in its language when half
    its words are the task's target words absent from its inputs; as a copy when 3+ words of it
    stand verbatim in the item's input."""
    from multipromot.eval.specialization import copies_input, in_language, language_words

    fr, de, cb = get_task("lab_trans_fr"), get_task("lab_trans_de"), get_task("lab_cb")
    words = language_words([fr, cb])  # a classification task adds no words
    assert words == language_words([fr]) and not language_words([cb])
    text, target = fr.render(fr.examples("test")[0])
    assert in_language(target, words)  # a French-like sentence (test split: same vocabulary)
    assert not in_language(text, words)  # its English-like input
    assert not in_language(de.render(de.examples("test")[0])[1], words)  # German-like
    assert not in_language("", words) and not in_language("42 !", words)
    half = " ".join(target.split()[:2] + ["the", "nose"])
    assert in_language(half, words)  # two of four words: half counts
    assert copies_input("The  kozo nose", "translate: the kozo NOSE the nodok")
    assert not copies_input("kozo nose", "the kozo nose the nodok")  # two words: too short
    assert not copies_input("the nodok nose", "the kozo nose the nodok")  # not contiguous


def test_router_decisions_map_to_prompt_rows(tiny_t5, fixed_predict):
    prompted, tok = tiny_t5
    suite = load_suite(ROOT / "eval" / "tiny.yaml")
    router = FakeRouter()
    records = evaluate_suite(prompted, tok, suite, decoder_only=False, shots=[2], router=router)
    # lab_rte is row 1 of the table (the default rows follow prompted.task_names).
    (items,) = fixed_predict
    assert [i.task_id for i in items] == [1, 1, 1, 1, -1, -1, -1, -1]
    # The router saw each full k-shot input, exemplars included, as the collator joins it.
    assert router.texts == [SEPARATOR.join([*i.exemplars, i.input]) for i in items]
    cb, qa = records
    assert (cb["prompt"], cb["prompted"]) == ("lab_rte", 100.0)
    assert (qa["prompt"], qa["prompted"]) == (None, 0.0)

    fixed_predict.clear()
    evaluate_suite(
        prompted,
        tok,
        suite,
        decoder_only=False,
        shots=[1],
        router=router,
        prompt_rows={"lab_rte": 7},
    )
    assert [i.task_id for i in fixed_predict[0]][:4] == [7, 7, 7, 7]
    with pytest.raises(ValueError, match="no row in the prompt table"):
        evaluate_suite(
            prompted,
            tok,
            suite,
            decoder_only=False,
            shots=[1],
            router=router,
            prompt_rows={"lab_trans_fr": 0},
        )


def test_finetuned_tasks_use_their_own_prompt(tiny_t5, monkeypatch):
    prompted, tok = tiny_t5
    calls = []

    def gold(prompted, tokenizer, items, collator, **kwargs):
        calls.append(list(items))
        return [item.target for item in items]  # a perfect model

    monkeypatch.setattr(generation, "predict", gold)
    records = evaluate_finetuned(
        prompted,
        tok,
        ["lab_rte", "lab_trans_fr"],
        {"lab_rte": 1},
        decoder_only=False,
        examples=3,
    )
    assert len(calls) == 1  # both tasks in one batched call
    assert [i.task_id for i in calls[0]] == [1, 1, 1, -1, -1, -1]
    assert all(i.exemplars == [] for i in calls[0])
    rte, fr = records
    assert (rte["task"], rte["shots"], rte["score"], rte["prompt"]) == (
        "lab_rte",
        0,
        100.0,
        "lab_rte",
    )
    assert (fr["task"], fr["metric"], fr["prompt"], fr["prompted"]) == (
        "lab_trans_fr",
        "bleu",
        None,
        0.0,
    )
    assert fr["score"] == pytest.approx(100.0)
    assert rte["specialization"] is None


def test_real_router_prompts_only_inputs_in_a_bank_format(tiny_t5, monkeypatch):
    prompted, tok = tiny_t5
    calls = []

    def gold(prompted, tokenizer, items, collator, **kwargs):
        calls.append(list(items))
        return [item.target for item in items]

    monkeypatch.setattr(generation, "predict", gold)
    bank = ["lab_trans_fr", "lab_rte"]  # rows 0 and 1 of the prompt table
    router = Router([RouterEntry(name, get_task(name).signature) for name in bank])
    # Unseen formats, k-shot (cb looks like rte: premise, "question:", True/False answers).
    suite = EvalSuite(name="x", tasks=(SuiteTask("lab_cb"), SuiteTask("lab_trans_de")), examples=3)
    records = evaluate_suite(prompted, tok, suite, decoder_only=False, shots=[1], router=router)
    assert [i.task_id for i in calls[0]] == [-1] * 6
    assert [(r["prompt"], r["prompted"], r["score"]) for r in records] == [
        (None, 0.0, 100.0),
        (None, 0.0, pytest.approx(100.0)),
    ]
    # The fine-tuned tasks' own inputs get their own rows.
    evaluate_finetuned(
        prompted,
        tok,
        ["lab_rte", "lab_trans_fr"],
        {n: i for i, n in enumerate(bank)},
        decoder_only=False,
        examples=3,
        router=router,
    )
    assert [i.task_id for i in calls[1]] == [1, 1, 1, 0, 0, 0]


# -- a real tiny model ------------------------------------------------------------------------------


def test_untrained_tiny_t5_end_to_end_is_deterministic(tiny_t5):
    prompted, tok = tiny_t5
    suite = load_suite(ROOT / "eval" / "tiny.yaml")
    kwargs = dict(
        decoder_only=False,
        examples=2,
        shots=[1],
        router=FakeRouter(),
        max_new_tokens=4,
        specialization_answers=["True", "False"],
        batch_size=4,
    )
    first = evaluate_suite(prompted, tok, suite, **kwargs)
    second = evaluate_suite(prompted, tok, suite, **kwargs)
    assert first == second
    assert [(r["task"], r["shots"], r["n"], r["prompt"]) for r in first] == [
        ("lab_cb", 1, 2, "lab_rte"),
        ("lab_qa", 1, 2, None),
    ]
    for r in first:
        assert 0.0 <= r["score"] <= 100.0 and 0.0 <= r["specialization"] <= 100.0
