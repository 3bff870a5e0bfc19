"""A source without the split a stage needs: a deterministic hold-out from train, disjoint from
what training samples; an explicit split always wins."""

from __future__ import annotations

import json

import pytest

from multipromot.cli import main
from multipromot.data.tasks import task_from_spec
from multipromot.errors import UserError

TEMPLATE = {
    "jinja": "{{premise}} question: {{hypothesis}} ||| {{answer_choices[label]}}",
    "answer_choices": "True ||| False",
}


def _write(path, n):
    rows = [{"premise": f"P{i}", "hypothesis": f"H{i}", "label": i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task(tmp_path, files, splits=None):
    spec = {
        "name": "one_file",
        "source": {"files": files, "format": "json"},
        "template": TEMPLATE,
        "metric": "accuracy",
    }
    if splits is not None:
        spec["splits"] = splits
    return task_from_spec(spec, file=tmp_path / "m.yaml", key="tasks[0]")


def test_one_file_gets_validation_and_test_held_out_disjoint_from_train(tmp_path, capsys):
    _write(tmp_path / "train.jsonl", 50)
    task = _task(tmp_path, "train.jsonl")
    train, val, test = (task.examples(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    ids = [{r["premise"] for r in rows} for rows in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 50  # nothing lost
    # Deterministic: a fresh task (another run, another rank) holds out the same rows.
    again = _task(tmp_path, "train.jsonl")
    assert [r["premise"] for r in again.examples("validation")] == [r["premise"] for r in val]
    err = capsys.readouterr().err
    assert "'validation' = 5 of 50 train rows held out" in err
    assert task.split_origin("validation") == "held out from train (10%, seeded)"


def test_an_explicit_split_wins_and_sizes_are_configurable(tmp_path):
    _write(tmp_path / "train.jsonl", 30)
    _write(tmp_path / "dev.jsonl", 7)
    task = _task(tmp_path, {"train": "train.jsonl", "validation": "dev.jsonl"})
    assert len(task.examples("validation")) == 7 and len(task.examples("train")) == 27  # test: 3
    sized = _task(tmp_path, "train.jsonl", splits={"validation": {"from": "train", "size": 12}})
    assert len(sized.examples("validation")) == 12
    with pytest.raises(UserError, match=r"splits\.validation\.size: must be a number of rows"):
        _task(tmp_path, "train.jsonl", splits={"validation": {"from": "train", "size": -2}})
    with pytest.raises(UserError, match="leaves no train rows"):
        _task(
            tmp_path, "train.jsonl", splits={"validation": {"from": "train", "size": 40}}
        ).examples("train")


def test_a_one_file_task_trains_through_stage_1(tmp_path, capsys):
    _write(tmp_path / "train.jsonl", 40)
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        "name: mine\ntasks:\n  - name: one_file\n    source: {files: train.jsonl, format: json}\n"
        f"    template: {json.dumps(TEMPLATE)}\n    metric: accuracy\n"
    )
    args = [
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        f"stage1.mixture={mixture}",
        "stage1.steps=2",
        "stage1.eval_every=2",
        "stage1.eval_examples=4",
        "stage1.prompt_length=4",
        "stage1.batch_size=4",
    ]
    assert main(["stage1", "configs/tiny.yaml", *args]) == 0
    assert "one_file@v0001" in capsys.readouterr().out
