"""The paper's eight unseen tasks from a dataset mirror, end to end and offline: each dataset's
real field names, `multipromot eval` with eval/paper8.yaml scores every task."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from multipromot.cli import main
from multipromot.config import load_config
from multipromot.data.mirror import set_mirror, write_snapshot
from multipromot.data.tasks import get_task, list_tasks
from multipromot.train.common import use_data_mirror

ROOT = Path(__file__).resolve().parents[1]
N = 4


def _rows(make) -> datasets.Dataset:
    return datasets.Dataset.from_list([make(i) for i in range(N)])


SNAPSHOTS = {  # hub id, config -> split -> row maker (field names as the datasets have them)
    ("aps/super_glue", "cb"): lambda i: {
        "premise": f"He said it rains {i}.",
        "hypothesis": "It rains.",
        "idx": i,
        "label": i % 3,
    },
    ("aps/super_glue", "wic"): lambda i: {
        "word": "bank",
        "sentence1": f"The bank {i}.",
        "sentence2": "A river bank.",
        "start1": 4,
        "start2": 8,
        "end1": 8,
        "end2": 12,
        "idx": i,
        "label": i % 2,
    },
    ("mandarjoshi/trivia_qa", "rc.nocontext"): lambda i: {
        "question": f"Question {i}?",
        "question_id": f"q{i}",
        "question_source": "",
        "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
        "search_results": {
            "description": [],
            "filename": [],
            "rank": [],
            "title": [],
            "url": [],
            "search_context": [],
        },
        "answer": {
            "aliases": [f"Answer {i}", f"A{i}"],
            "normalized_aliases": [f"answer {i}"],
            "matched_wiki_entity_name": "",
            "normalized_matched_wiki_entity_name": "",
            "normalized_value": f"answer {i}",
            "type": "FreeForm",
            "value": f"Answer {i}",
        },
    },
    ("stanfordnlp/web_questions", None): lambda i: {
        "url": "u",
        "question": f"who is {i}?",
        "answers": [f"Person {i}", f"P{i}"],
    },
    ("wmt/wmt16", "de-en"): lambda i: {"translation": {"de": f"Hallo {i}", "en": f"Hello {i}"}},
    ("wmt/wmt16", "ro-en"): lambda i: {"translation": {"ro": f"Salut {i}", "en": f"Hello {i}"}},
    ("EdinburghNLP/xsum", None): lambda i: {
        "document": f"A long article {i}.",
        "summary": f"Article {i}.",
        "id": str(i),
    },
    ("GEM/wiki_lingua", "en"): lambda i: {
        "gem_id": f"en-{i}",
        "source": f"How to cook {i}.",
        "target": f"Cook {i}.",
        "references": [f"Cook {i}."],
    },
    # The fine-tuning tasks of the paper's configs (configs/paper_*.yaml).
    ("aps/super_glue", "rte"): lambda i: {
        "premise": f"Cats sleep {i}.",
        "hypothesis": "Cats rest.",
        "idx": i,
        "label": i % 2,
    },
    ("stanfordnlp/snli", None): lambda i: {
        "premise": "A dog runs.",
        "hypothesis": f"It moves {i}.",
        "label": i % 3,
    },
    ("allenai/openbookqa", "main"): lambda i: {
        "id": str(i),
        "question_stem": f"Which is {i}?",
        "answerKey": "ABCD"[i % 4],
        "choices": {"text": ["w", "x", "y", "z"], "label": ["A", "B", "C", "D"]},
    },
    ("wmt/wmt14", "fr-en"): lambda i: {"translation": {"fr": f"Bonjour {i}", "en": f"Hello {i}"}},
}


def write_paper_mirror(root: Path) -> Path:
    """A mirror with a few rows of every hub dataset of the paper's tasks."""
    for (hub_id, config), make in SNAPSHOTS.items():
        splits = ("train", "validation", "test")
        write_snapshot(root, hub_id, config, {split: _rows(make) for split in splits})
    return root


@pytest.fixture
def mirror(tmp_path):
    yield write_paper_mirror(tmp_path / "mirror")
    set_mirror(None)
    for name in list_tasks():
        get_task(name).clear_cache()


def test_eval_scores_the_paper_suite_from_a_mirror(mirror, tmp_path, capfd):
    config = ROOT / "configs" / "tiny.yaml"
    status = main(
        [
            "eval",
            str(config),
            f"out_dir={tmp_path / 'run'}",
            f"bank.dir={tmp_path / 'bank'}",
            f"stage2.mixture={ROOT / 'mixtures' / 'lab_rte_fr.yaml'}",
            f"eval.suite={ROOT / 'eval' / 'paper8.yaml'}",
            f"data.mirror={mirror}",
            "eval.prompts=false",
            "eval.examples=2",
            "eval.shots=[1]",
            "eval.max_new_tokens=4",
        ]
    )
    assert status == 0
    records = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["records"]
    unseen = {r["task"]: r for r in records if not r["seen"]}
    assert set(unseen) == {
        "cb",
        "wic",
        "trivia_qa",
        "web_questions",
        "wmt16_en_de",
        "wmt16_en_ro",
        "xsum",
        "wiki_lingua_en",
    }
    assert all(r["n"] == 2 and 0.0 <= r["score"] <= 100.0 for r in unseen.values())
    err = capfd.readouterr().err
    assert "Generating" not in err  # no datasets progress noise


@pytest.mark.parametrize("name", ["rte", "enfr", "rte_enfr", "snli", "openbookqa"])
def test_paper_configs_load_validate_and_resolve_every_task(mirror, name):
    from multipromot.config import resolve_path, run_methods
    from multipromot.data.mixtures import load_mixture
    from multipromot.eval.suites import load_suite

    cfg = load_config(ROOT / "configs" / f"paper_{name}.yaml", [f"data.mirror={mirror}"])
    use_data_mirror(cfg)  # as every command does before it reads the data
    s1, s2, ev = cfg.stage1, cfg.stage2, cfg.eval
    assert cfg.model == "google/mt5-xxl"
    assert (s1.prompt_length, s1.optimizer, s1.lr, s1.steps, s1.eval_every) == (
        100,
        "adafactor",
        0.3,
        5000,
        1000,
    )
    assert (s2.optimizer, s2.lr, s2.steps, s2.save_every, s2.eval_every, s2.batch_size) == (
        "adafactor",
        1e-3,
        1000,
        100,
        100,
        64,
    )
    assert (s2.label_smoothing, s2.keep_best_by, ev.num_beams, ev.shots) == (
        0.1,
        "metric",
        4,
        [1, 4],
    )
    methods = run_methods(cfg)
    tasks = []
    for path in {s1.mixture, s2.mixture, *(m.mixture for m in methods)}:
        tasks += load_mixture(resolve_path(cfg, path)).tasks
    tasks += [get_task(t) for t in load_suite(resolve_path(cfg, ev.suite)).task_names]
    for task in tasks:  # every task loads offline from the mirror
        assert len(task.examples("train")) == N, task.name
