"""Tasks: inline specs (story 5), the catalogue, the registry, split maps, caching."""

from __future__ import annotations

import json

import pytest
import yaml

import multipromot.data.catalogue as catalogue
from multipromot.data.sources import (
    FilteredSource,
    HubSource,
    register_generator,
    reset_generators,
)
from multipromot.data.tasks import (
    Task,
    get_task,
    list_tasks,
    register_task,
    reset_registry,
    task_from_spec,
)
from multipromot.data.templates import Template
from multipromot.errors import UserError
from multipromot.registry import Registry

RTE_JINJA = (
    "{{premise}} question: {{hypothesis}} Is it true or false? answer: ||| "
    "{{answer_choices[label]}}"
)
TRAIN = [
    {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0},
    {"premise": "It rained.", "hypothesis": "The ground is dry.", "label": 1},
]
DEV = [{"premise": "Birds fly.", "hypothesis": "Some animals fly.", "label": 0}]

PAPER_TASKS = {
    # name: (hub id, config, metric, postprocess, split map)
    "rte": ("aps/super_glue", "rte", "accuracy", "first_word", {"test": "validation"}),
    "cb": ("aps/super_glue", "cb", "accuracy", "first_word", {"test": "validation"}),
    "snli": ("stanfordnlp/snli", None, "accuracy", "first_word", {}),
    "wic": ("aps/super_glue", "wic", "accuracy", "first_word", {"test": "validation"}),
    "openbookqa": ("allenai/openbookqa", "main", "accuracy", "first_word", {}),
    "trivia_qa": (
        "mandarjoshi/trivia_qa",
        "rc.nocontext",
        "triviaqa_exact_match",
        "prefix",
        {"test": "validation"},
    ),
    "web_questions": ("stanfordnlp/web_questions", None, "exact_match", "prefix", {}),
    "wmt14_en_fr": ("wmt/wmt14", "fr-en", "bleu", "prefix", {}),
    "wmt16_en_de": ("wmt/wmt16", "de-en", "bleu", "prefix", {}),
    "wmt16_en_ro": ("wmt/wmt16", "ro-en", "bleu", "prefix", {}),
    "xsum": ("EdinburghNLP/xsum", None, "rouge2", "prefix", {}),
    "wiki_lingua_en": ("GEM/wiki_lingua", "en", "rouge2", "prefix", {}),
}


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    reset_registry()
    yield
    reset_registry()
    reset_generators()


@pytest.fixture
def rte_dir(tmp_path):
    """A user's folder of JSONL files next to her mixture YAML (story 5)."""
    data = tmp_path / "data" / "rte"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DEV))
    return tmp_path


def _inline_spec(**changes):
    spec = {
        "name": "my_rte_local",
        "source": {"files": "data/rte/train.jsonl", "format": "json", "split": "train"},
        "template": {"jinja": RTE_JINJA, "answer_choices": "True ||| False"},
        "metric": "accuracy",
    }
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}


# -- inline tasks (the design's mixture example) -----------------------------------------------


def test_inline_task_renders_like_the_model_sees_it(rte_dir):
    task = task_from_spec(_inline_spec(), file=rte_dir / "mix.yaml", key="tasks[2]")
    assert task.name == "my_rte_local"
    assert task.metric == "accuracy"
    assert task.postprocess == "first_word"  # the default for classification
    assert task.answers == ["True", "False"]
    assert task.template.id == "my_rte_local"
    assert task.num_examples("train") == 2
    assert task.render(task.examples("train")[1]) == (
        "It rained. question: The ground is dry. Is it true or false? answer:",
        "False",
    )
    assert task.signature.pieces == ("question:", "Is it true or false? answer:")


def test_split_map_on_the_task_or_in_its_source(rte_dir):
    files = {"train": "data/rte/train.jsonl", "validation": "data/rte/dev.jsonl"}
    task = task_from_spec(
        _inline_spec(source={"files": files}, splits={"test": "validation"}),
        file=rte_dir / "mix.yaml",
    )
    assert task.splits == {"test": "validation"}
    assert list(task.examples("test")) == DEV
    assert task.examples("validation")[0] == DEV[0]
    moved = task_from_spec(
        _inline_spec(source={"files": files, "splits": {"test": "validation"}}),
        file=rte_dir / "mix.yaml",
    )
    assert moved.splits == {"test": "validation"}
    with pytest.raises(UserError) as err:
        task_from_spec(
            _inline_spec(source={"files": files, "splits": {}}, splits={}),
            file="mix.yaml",
            key="tasks[0]",
        )
    assert str(err.value) == (
        "mix.yaml: tasks[0].source.splits: give 'splits' once: on the task or in its source"
    )


def test_examples_are_loaded_once_per_split():
    calls = []

    @register_generator("test_rte")
    def _gen(split: str, seed: int) -> list[dict]:
        calls.append(split)
        return [dict(row) for row in TRAIN]

    task = task_from_spec(_inline_spec(source={"generator": "test_rte"}))
    first = task.examples("train")
    assert task.examples("train") is first
    task.examples("validation")
    assert calls == ["train", "validation"]
    task.clear_cache()
    task.examples("train")
    assert calls == ["train", "validation", "train"]


def test_generative_task_defaults_to_the_paper_postprocess():
    register_generator("test_qa")(lambda split, seed: [{"q": "2+2?", "a": "4"}])
    task = task_from_spec(
        {
            "name": "qa",
            "source": {"generator": "test_qa"},
            "template": {"jinja": "Q: {{q}} A: ||| {{a}}"},
            "metric": "exact_match",
        }
    )
    assert task.postprocess == "prefix"
    assert task.answers is None
    assert task.render(task.examples("train")[0]) == ("Q: 2+2? A:", "4")


def test_mixture_keys_can_be_left_to_the_caller(rte_dir):
    spec = _inline_spec(rate=2.0)
    with pytest.raises(UserError, match=r"tasks\[1\].rate: unknown key 'rate'"):
        task_from_spec(spec, file=rte_dir / "mix.yaml", key="tasks[1]")
    assert task_from_spec(spec, file=rte_dir / "mix.yaml", ignore=["rate"]).name == "my_rte_local"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"template": None},
            "mix.yaml: tasks[2].template: a task needs 'template'",
        ),
        (
            {"metric": "acuracy"},
            "mix.yaml: tasks[2].metric: unknown metric 'acuracy'; did you mean accuracy?",
        ),
        (
            {"postprocess": "first_wrd"},
            "mix.yaml: tasks[2].postprocess: unknown postprocess 'first_wrd'; "
            "did you mean first_word?",
        ),
        (
            {"name": "../rte"},
            "mix.yaml: tasks[2].name: task name '../rte' must be letters, digits, '_', '-' or "
            "'.' (it names a bank directory)",
        ),
        (
            {"splits": ["test"]},
            "mix.yaml: tasks[2].splits: 'splits' must map split names to the source's split "
            "names, e.g. {test: validation}",
        ),
        (
            {"templat": "rte"},
            "mix.yaml: tasks[2].templat: unknown key 'templat' in a task (allowed: name, "
            "source, template, metric, postprocess, splits, description, references)",
        ),
        (
            {"template": {"jinja": "{{premise} ||| {{label}}", "answer_choices": "A ||| B"}},
            "mix.yaml: tasks[2].template: template 'my_rte_local': Jinja syntax error in "
            "template (line 1): unexpected '}'",
        ),
        (
            {"template": "rtee"},
            "mix.yaml: tasks[2].template: unknown catalogue template 'rtee'; did you mean rte?",
        ),
        (
            {"source": {"files": "data/rte/*.jsonl", "fromat": "json"}},
            "mix.yaml: tasks[2].source.fromat: unknown key 'fromat' in a files source "
            "(allowed: files, filter, format, split)",
        ),
    ],
)
def test_inline_task_errors_name_file_and_key(changes, message):
    with pytest.raises(UserError) as err:
        task_from_spec(_inline_spec(**changes), file="mix.yaml", key="tasks[2]")
    assert str(err.value) == message


def test_missing_files_name_file_and_key(tmp_path):
    spec = _inline_spec(source={"files": "data/rte/*.jsonl", "format": "json"})
    with pytest.raises(UserError) as err:
        task_from_spec(spec, file=tmp_path / "mix.yaml", key="tasks[2]")
    assert str(err.value) == (
        f"{tmp_path / 'mix.yaml'}: tasks[2].source.files: no files match 'data/rte/*.jsonl' "
        f"(looked in {tmp_path})"
    )


def test_template_typo_in_a_field_names_task_and_key(rte_dir):
    spec = _inline_spec(
        template={
            "jinja": RTE_JINJA.replace("hypothesis", "hypotesis"),
            "answer_choices": "T ||| F",
        }
    )
    task = task_from_spec(spec, file=rte_dir / "mix.yaml", key="tasks[2]")
    with pytest.raises(UserError) as err:
        task.render(task.examples("train")[0])
    assert str(err.value) == (
        f"{rte_dir / 'mix.yaml'}: tasks[2].template: template 'my_rte_local' needs field "
        "'hypotesis', which the example lacks (fields: hypothesis, label, premise)"
    )


# -- the catalogue -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
def test_paper_catalogue_entry(name):
    hub, config, metric, postprocess, splits = PAPER_TASKS[name]
    task = get_task(name)
    source = task.source.source if isinstance(task.source, FilteredSource) else task.source
    assert isinstance(source, HubSource)
    assert (source.path, source.name) == (hub, config)
    assert (task.metric, task.postprocess, task.splits) == (metric, postprocess, splits)
    assert task.template.id == name
    assert get_task(name) is task  # built once


def test_snli_drops_unlabeled_pairs():
    task = get_task("snli")
    assert isinstance(task.source, FilteredSource)
    assert task.source.condition == "label >= 0"


def test_catalogue_hub_task_fails_in_one_line_offline(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        get_task("rte").examples("test")  # test -> the SuperGLUE dev set
    text = str(err.value)
    assert text.startswith(
        f"{catalogue.catalogue_dir() / 'paper.yaml'}: tasks[0].source: task 'rte': cannot load "
        "hub dataset 'aps/super_glue' (config 'rte', split 'validation'): "
    )
    assert "\n" not in text and "HF_HUB_OFFLINE=0" in text


def test_list_and_unknown_tasks():
    assert set(PAPER_TASKS) <= set(list_tasks())
    with pytest.raises(UserError) as err:
        get_task("wmt14_en_fe", file="mix.yaml", key="tasks[0].task")
    assert str(err.value).startswith(
        "mix.yaml: tasks[0].task: unknown task 'wmt14_en_fe'; did you mean wmt14_en_fr"
    )


def test_registered_task_shadows_the_catalogue():
    register_generator("test_rte")(lambda split, seed: list(TRAIN))
    mine = Task(
        "rte",
        task_from_spec(_inline_spec(source={"generator": "test_rte"})).source,
        Template("rte", RTE_JINJA, "True ||| False"),
        "accuracy",
    )
    get_task("rte")  # the catalogue task is built first; registering still works
    assert register_task(mine) is mine
    assert get_task("rte") is mine
    with pytest.raises(UserError, match="task 'rte' is already registered"):
        register_task(Task("rte", mine.source, mine.template, "accuracy"))
    reset_registry()
    assert isinstance(get_task("rte").source, HubSource)


def test_every_yaml_in_the_catalogue_dir_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(catalogue, "catalogue_dir", lambda: tmp_path)
    # without the catalogue file the lab registers
    monkeypatch.setattr(catalogue, "CATALOGUE_FILES", Registry("catalogue file"))
    register_generator("test_rte")(lambda split, seed: list(TRAIN))

    def write(filename, *entries):
        (tmp_path / filename).write_text(yaml.safe_dump({"tasks": list(entries)}))

    def use_rte_fmt(name):
        return {
            "name": name,
            "source": {"generator": "test_rte"},
            "template": "rte_fmt",
            "metric": "accuracy",
        }

    template = {"jinja": RTE_JINJA, "answer_choices": "True ||| False"}
    write("a.yaml", {**use_rte_fmt("rte_fmt"), "template": template})
    write("b.yaml", use_rte_fmt("second"))
    assert list_tasks() == ["rte_fmt", "second"]
    # "second" reuses the catalogue template of "rte_fmt" by name
    assert get_task("second").render(TRAIN[0]) == (
        "A cat sat. question: An animal sat. Is it true or false? answer:",
        "True",
    )
    write("c.yaml", use_rte_fmt("second"))
    with pytest.raises(UserError) as err:
        list_tasks()
    assert str(err.value) == (
        f"{tmp_path / 'c.yaml'}: tasks[0]: task 'second' is defined twice (first in b.yaml "
        "tasks[0])"
    )


def test_bad_catalogue_file(tmp_path, monkeypatch):
    monkeypatch.setattr(catalogue, "catalogue_dir", lambda: tmp_path)
    (tmp_path / "a.yaml").write_text("task:\n  - name: x\n")
    with pytest.raises(UserError) as err:
        get_task("x")
    assert str(err.value) == (
        f"{tmp_path / 'a.yaml'}: a catalogue file must be a mapping with a 'tasks' list"
    )


def test_rows_without_a_gold_label_are_dropped_with_a_count(tmp_path, caplog):
    """SuperGLUE's and SNLI's label -1 ("no gold label") rendered the last answer choice and
    was trained and scored as such."""
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": -1}, {"text": "c", "label": 1}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "nolabel",
        "source": {"files": {"train": "train.jsonl"}, "format": "json"},
        "template": {
            "jinja": "{{text}} ||| {{answer_choices[label]}}",
            "answer_choices": "no ||| yes",
        },
        "metric": "accuracy",
    }
    task = task_from_spec(spec, file=tmp_path / "mix.yaml", key="tasks[0]")
    with caplog.at_level("WARNING"):
        kept = task.examples("train")
    assert [r["text"] for r in kept] == ["a", "c"]
    assert "dropped 1 of 3 train rows with a negative label" in caplog.text
    with pytest.raises(UserError, match=r"answer_choices\[-1\]: a negative label"):
        task.render(rows[1])  # never the last choice
