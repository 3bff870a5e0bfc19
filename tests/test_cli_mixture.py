"""``multipromot mixture show|sample``: what it prints, and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_mixtures import ERRORS, error_file, inline, write  # shared cases, one definition

from multipromot.cli import main
from multipromot.data import sources, tasks
from multipromot.data.exemplars import choose_exemplars, render_exemplar
from multipromot.features import SEPARATOR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def rows_generator():
    @sources.register_generator("mixtest_rows")
    def rows(split: str, seed: int, n: int = 10, n_validation: int = 2) -> list[dict]:
        size = n if split == "train" else n_validation
        return [{"text": f"{split} row {i}", "label": i % 2} for i in range(size)]

    yield
    sources.reset_generators()
    tasks.reset_registry()


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mixture_file(tmp_path) -> Path:
    return write(
        tmp_path,
        "m.yaml",
        "name: demo\nexemplars: {shots: 1, seed: 3}\ntasks:\n"
        + inline("alpha", 12, "3", template="Q {{text}} ||| A{{label}}")
        + inline("beta", 8, "1"),
    )


def test_show_lists_tasks_rates_sizes_and_templates(capsys, mixture_file):
    code, out, err = run(capsys, "mixture", "show", mixture_file)
    assert code == 0 and err == ""
    assert "mixture demo" in out and "1-shot (exemplar seed 3)" in out
    assert "alpha" in out and "75.00%" in out and "12" in out
    assert "beta" in out and "25.00%" in out
    assert "exact_match" in out


def test_show_json(capsys, mixture_file):
    code, out, _ = run(capsys, "mixture", "show", mixture_file, "--json")
    info = json.loads(out)
    assert code == 0
    assert (info["name"], info["version"], info["shots"], info["exemplar_seed"]) == (
        "demo",
        1,
        1,
        3,
    )
    assert [(t["id"], t["name"], t["train_examples"], t["template"]) for t in info["tasks"]] == [
        (0, "alpha", 12, "alpha"),
        (1, "beta", 8, "beta"),
    ]
    assert [t["rate"] for t in info["tasks"]] == pytest.approx([0.75, 0.25])


def test_sample_json_is_the_k_shot_input_the_model_gets(capsys, mixture_file):
    code, out, _ = run(capsys, "mixture", "sample", mixture_file, "-n", "6", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 6
    alpha = tasks.task_from_spec(
        {
            "name": "alpha",
            "source": {"generator": "mixtest_rows", "n": 12},
            "template": {"jinja": "Q {{text}} ||| A{{label}}"},
            "metric": "exact_match",
        }
    )
    for row in rows:
        assert row["split"] == "train"
        assert row["example_index"] not in row["exemplar_indices"]
        assert len(row["exemplar_indices"]) == 1
        assert row["input"].count(SEPARATOR) == 1
        if row["task"] == "alpha":
            train = alpha.examples("train")
            i = row["example_index"]
            assert row["exemplar_indices"] == choose_exemplars(alpha, i, 1, seed=3)
            picked = [render_exemplar(alpha, train[j]) for j in row["exemplar_indices"]]
            assert row["input"] == SEPARATOR.join([*picked, alpha.render(train[i])[0]])
            assert row["target"] == f"A{i % 2}"
    again = json.loads(run(capsys, "mixture", "sample", mixture_file, "-n", "6", "--json")[1])
    other = json.loads(
        run(capsys, "mixture", "sample", mixture_file, "-n", "6", "--json", "--seed", "1")[1]
    )
    assert again == rows and other != rows


def test_sample_validation_split_zero_shot(capsys, mixture_file):
    code, out, _ = run(
        capsys,
        "mixture",
        "sample",
        mixture_file,
        "-n",
        "3",
        "--split",
        "validation",
        "--shots",
        "0",
        "--json",
    )
    rows = json.loads(out)
    assert code == 0
    assert all(r["split"] == "validation" and r["exemplar_indices"] == [] for r in rows)
    assert all(r["input"].startswith(("Q validation row", "validation row")) for r in rows)


def test_sample_text_prints_inputs_verbatim(capsys, mixture_file):
    code, out, _ = run(capsys, "mixture", "sample", mixture_file, "-n", "2")
    rows = json.loads(run(capsys, "mixture", "sample", mixture_file, "-n", "2", "--json")[1])
    assert code == 0
    for i, row in enumerate(rows, 1):
        assert f"=== {i}/2  task {row['task']}" in out
        assert f"--- input\n{row['input']}\n--- target\n{row['target']}\n" in out


def test_shipped_local_example_samples_offline(capsys):
    path = REPO / "mixtures" / "local_example.yaml"
    code, out, err = run(capsys, "mixture", "sample", path, "-n", "5", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 5
    assert {r["task"] for r in rows} <= {"toy_nli", "toy_qa"}
    for row in rows:
        exemplar, query = row["input"].split(SEPARATOR)
        if row["task"] == "toy_nli":
            assert exemplar.endswith(("answer: True", "answer: False"))
            assert query.endswith("Is it true or false? answer:")
            assert row["target"] in {"True", "False"}
        else:
            assert exemplar.startswith("Q: What is the capital of") and query.endswith(" A:")


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_bad_mixture_exits_2_with_one_line(capsys, tmp_path, kind):
    path = error_file(tmp_path, kind)
    _, key, words = ERRORS[kind]
    for command in ("show", "sample"):
        code, out, err = run(capsys, "mixture", command, path)
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert "Traceback" not in err
        assert words in err
        if key is not None:
            assert f": {key}" in err


def test_missing_template_field_names_file_task_and_key(capsys, tmp_path):
    path = write(tmp_path, "m.yaml", "tasks:\n" + inline("mine", 4, template="{{txet}} ||| x"))
    code, _, err = run(capsys, "mixture", "sample", path, "-n", "1")
    assert code == 2
    assert err == (
        f"error: {path}: tasks[0].template: template 'mine' needs field 'txet', which the "
        "example lacks (fields: label, text)\n"
    )


def test_sample_count_is_bounded(capsys, mixture_file):
    """`-n 100000000` rendered every example before printing (it hung)."""
    assert main(["mixture", "sample", str(mixture_file), "-n", "100000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-n" in err[0] and "10000" in err[0]
