"""Sources: local files through datasets' builders, the offline hub, generators, filters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from multipromot.data.sources import (
    GENERATORS,
    FileSource,
    FilteredSource,
    GeneratorSource,
    HubSource,
    Rows,
    Source,
    get_generator,
    list_generators,
    register_generator,
    reset_generators,
    source_from_spec,
    split_of_file,
)
from multipromot.errors import UserError

ROWS = [
    {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0},
    {"premise": "It rained.", "hypothesis": "The ground is dry.", "label": 1},
    {"premise": "No gold.", "hypothesis": "Unlabeled.", "label": -1},
]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """datasets writes its Arrow cache under tmp_path, never under ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    yield
    reset_generators()


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_delimited(path, rows, sep):
    lines = [sep.join(rows[0])] + [sep.join(str(r[k]) for k in rows[0]) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- local files -------------------------------------------------------------------------------


def test_jsonl_files(tmp_path):
    _write_jsonl(tmp_path / "data" / "a.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "data" / "b.jsonl", ROWS[2:])
    source = FileSource("data/*.jsonl", "json", base_dir=tmp_path)
    rows = source.load("train")
    assert isinstance(source, Source)
    assert isinstance(rows, Rows)
    assert list(rows) == ROWS
    assert rows[1] == ROWS[1] and rows[-1] == ROWS[2] and rows[0:2] == ROWS[:2]
    assert rows[np.int64(2)] == ROWS[2]
    with pytest.raises(IndexError):
        rows[3]
    assert source.describe() == "files:json:train=2 files"


def test_csv_and_tsv_files(tmp_path):
    csv = FileSource(str(_write_delimited(tmp_path / "d.csv", ROWS, ",")), "csv").load("train")
    tsv = FileSource(str(_write_delimited(tmp_path / "d.tsv", ROWS, "\t")), "tsv").load("train")
    assert list(csv) == ROWS  # ints come back as ints: the csv builder infers column types
    assert list(tsv) == ROWS


def test_tsv_with_commas_in_fields(tmp_path):
    rows = [{"text": "a, b, c", "label": 1}]
    path = _write_delimited(tmp_path / "d.tsv", rows, "\t")
    assert list(FileSource(str(path), "tsv").load("train")) == rows


def test_parquet_files(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    assert list(FileSource("d.parquet", "parquet", base_dir=tmp_path).load("train")) == ROWS


def test_files_per_split_and_relative_to_the_yaml(tmp_path):
    _write_jsonl(tmp_path / "data" / "train.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "data" / "dev.jsonl", ROWS[2:])
    spec = {"files": {"train": "data/train.jsonl", "validation": "data/dev.jsonl"}}
    source = source_from_spec(spec, file=tmp_path / "mix.yaml", key="tasks[0].source")
    assert source.format == "json"  # guessed from the suffix
    assert list(source.load("validation")) == ROWS[2:]
    assert len(source.load("train")) == 2
    with pytest.raises(UserError) as err:
        source.load("test")
    assert str(err.value) == (
        f"{tmp_path / 'mix.yaml'}: tasks[0].source: no files for split 'test' "
        "(this source has: train, validation)"
    )


def test_no_matching_files_names_file_and_key(tmp_path):
    spec = {"files": "data/*.jsonl", "format": "json", "split": "train"}
    with pytest.raises(UserError) as err:
        source_from_spec(spec, file=tmp_path / "mix.yaml", key="tasks[2].source")
    assert str(err.value) == (
        f"{tmp_path / 'mix.yaml'}: tasks[2].source.files: no files match 'data/*.jsonl' "
        f"(looked in {tmp_path})"
    )


def test_unparseable_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{not json\n', encoding="utf-8")
    source = FileSource("bad.jsonl", "json", base_dir=tmp_path, file="m.yaml", key="src")
    with pytest.raises(UserError, match=r"^m.yaml: src: cannot read json files for split 'train'"):
        source.load("train")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"files": "d.jsonl", "fromat": "json"},
            "m.yaml: tasks[1].source.fromat: unknown key 'fromat' in a files source "
            "(allowed: files, filter, format, split)",
        ),
        (
            {"files": "d.txt"},
            "m.yaml: tasks[1].source.format: 'format' is missing and cannot be guessed "
            "(one of: json, jsonl, csv, tsv, parquet)",
        ),
        (
            {"files": "d.jsonl", "format": "xml"},
            "m.yaml: tasks[1].source.format: unknown file format 'xml' "
            "(known: json, jsonl, csv, tsv, parquet)",
        ),
        (
            {"hub": "super_glue", "files": "d.jsonl"},
            "m.yaml: tasks[1].source: a source needs exactly one of 'hub', 'files' or "
            "'generator' (got hub, files)",
        ),
        (
            {"hub": "super_glue", "config": "rte"},
            "m.yaml: tasks[1].source.config: unknown key 'config' in a hub source "
            "(allowed: data_dir, filter, hub, name, revision)",
        ),
        (
            "super_glue",
            "m.yaml: tasks[1].source: a source is a mapping: {hub: ...}, "
            "{files: ..., format: ...} or {generator: ...}",
        ),
    ],
)
def test_malformed_specs_name_the_key(spec, message):
    # every one of these is refused before any file is looked for
    with pytest.raises(UserError) as err:
        source_from_spec(spec, file="m.yaml", key="tasks[1].source")
    assert str(err.value) == message


# -- hub, offline ------------------------------------------------------------------------------


def test_missing_hub_dataset_fails_fast_in_one_line(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    source = source_from_spec(
        {"hub": "multipromot-tests/not-a-dataset", "name": "rte"},
        file="m.yaml",
        key="tasks[0].source",
    )
    assert isinstance(source, HubSource)
    assert source.describe() == "hub:multipromot-tests/not-a-dataset/rte"
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        source.load("train")
    assert time.perf_counter() - start < 5.0
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(
        "m.yaml: tasks[0].source: cannot load hub dataset 'multipromot-tests/not-a-dataset' "
        "(config 'rte', split 'train'): "
    )
    assert text.endswith(
        "it is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1): download it "
        "once with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0, or point the task at local files "
        "({files: ..., format: ...})"
    )


def test_hub_source_loads_a_dataset_directory(tmp_path):
    # load_dataset takes a local repository layout the same way as a cached hub repo.
    import datasets

    repo = tmp_path / "my_rte"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS[:2]).to_parquet(str(repo / "data" / "train.parquet"))
    datasets.Dataset.from_list(ROWS[2:]).to_parquet(str(repo / "data" / "validation.parquet"))
    source = source_from_spec({"hub": str(repo)}, file="m.yaml", key="s")
    assert list(source.load("validation")) == ROWS[2:]
    assert source.load("train")[1] == ROWS[1]
    with pytest.raises(UserError) as err:
        source.load("tset")
    assert str(err.value).startswith(
        f"m.yaml: s: cannot load hub dataset '{repo}' (split 'tset'): "
    )
    assert str(err.value).endswith("check the config and split names (a task's 'splits' maps them)")


# -- generators --------------------------------------------------------------------------------


def _counting(split: str, seed: int, n: int = 3) -> list[dict]:
    return [{"split": split, "seed": seed, "i": i, "label": i % 2} for i in range(n)]


def test_generator_source_passes_split_seed_and_kwargs():
    register_generator("test_count")(_counting)
    source = source_from_spec({"generator": "test_count", "seed": 7, "n": 2})
    assert isinstance(source, GeneratorSource)
    assert source.load("validation") == [
        {"split": "validation", "seed": 7, "i": 0, "label": 0},
        {"split": "validation", "seed": 7, "i": 1, "label": 1},
    ]
    assert source.describe() == "generator:test_count(seed=7, n=2)"


def test_generator_errors_name_file_and_key():
    register_generator("test_count")(_counting)
    with pytest.raises(UserError) as err:
        source_from_spec({"generator": "test_cuont"}, file="m.yaml", key="tasks[0].source")
    assert str(err.value) == (
        "m.yaml: tasks[0].source.generator: unknown generator 'test_cuont'; "
        "did you mean test_count?"
    )
    source = source_from_spec({"generator": "test_count", "size": 2}, file="m.yaml", key="s")
    with pytest.raises(UserError, match="generator 'test_count' rejected its arguments"):
        source.load("train")
    with pytest.raises(UserError, match="'seed' must be an integer"):
        source_from_spec({"generator": "test_count", "seed": "0"})


def test_generator_must_return_a_list_of_dicts():
    register_generator("test_bad")(lambda split, seed: ("not", "a", "list"))
    with pytest.raises(UserError, match="must return a list of dicts, got tuple"):
        GeneratorSource("test_bad").load("train")


def test_reset_generators_forgets_outside_registrations():
    register_generator("test_count")(_counting)
    assert "test_count" in list_generators()
    reset_generators()
    assert "test_count" not in GENERATORS
    with pytest.raises(UserError, match="unknown generator 'test_count'"):
        get_generator("test_count")


# -- filters -----------------------------------------------------------------------------------


def test_filter_drops_examples(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = {"files": "d.jsonl", "format": "json", "filter": "label >= 0"}
    source = source_from_spec(spec, file=tmp_path / "m.yaml", key="s")
    assert isinstance(source, FilteredSource)
    rows = source.load("train")
    assert len(rows) == 2
    assert list(rows) == ROWS[:2] and rows[-1] == ROWS[1] and rows[1:] == [ROWS[1]]
    assert source.describe() == "files:json:train=1 files where label >= 0"


def test_filter_errors():
    register_generator("test_count")(_counting)
    with pytest.raises(UserError) as err:
        source_from_spec({"generator": "test_count", "filter": "label >="}, file="m.yaml", key="s")
    assert str(err.value).startswith("m.yaml: s.filter: 'label >=' is not a valid expression")
    source = source_from_spec({"generator": "test_count", "filter": "score > 1"}, key="s")
    with pytest.raises(UserError, match=r"'score > 1' failed on an example with fields i, label"):
        source.load("train")
    source = source_from_spec({"generator": "test_count", "filter": "''.__class__"}, key="s")
    with pytest.raises(UserError, match="unsafe"):
        source.load("train")


def _split_files(tmp_path, names):
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(names):
        (data / name).write_text(json.dumps({"text": name, "label": i}) + "\n")
    return tmp_path / "mix.yaml"


def test_a_glob_over_split_files_takes_the_splits_from_the_names(tmp_path):
    """`files: data/*.jsonl` over train/dev/test files put every row into train (a leak of the
    validation and test rows); the splits now come from the file names, as in `datasets`."""
    mix = _split_files(tmp_path, ["rte-train.jsonl", "rte-dev.jsonl", "rte-test.jsonl"])
    source = source_from_spec({"files": "data/*.jsonl", "format": "json"}, file=mix, key="s")
    assert {s: [Path(p).name for p in ps] for s, ps in source.files.items()} == {
        "train": ["rte-train.jsonl"],
        "validation": ["rte-dev.jsonl"],
        "test": ["rte-test.jsonl"],
    }
    assert [r["text"] for r in source.load("train")] == ["rte-train.jsonl"]
    assert [split_of_file(n) for n in ("contest.jsonl", "a_valid_0.json", "x.jsonl")] == [
        None,
        "validation",
        None,
    ]


def test_an_ambiguous_glob_is_refused(tmp_path):
    mix = _split_files(tmp_path, ["train.jsonl", "validation.jsonl", "extra.jsonl"])
    with pytest.raises(UserError, match="extra.jsonl, whose name says no split") as e:
        source_from_spec({"files": "data/*.jsonl", "format": "json"}, file=mix, key="s")
    assert e.value.key == "s.files" and "files: {train: ..." in str(e.value)
    # an explicit split over files named for another split
    spec = {"files": "data/*.jsonl", "format": "json", "split": "train"}
    with pytest.raises(UserError, match="split is 'train' but the glob matches validation.jsonl"):
        source_from_spec(spec, file=mix, key="s")
    # unnamed files alone: one split, as before
    ok = {"files": "data/extra.jsonl", "format": "json", "split": "train"}
    assert list(source_from_spec(ok, file=mix, key="s").files) == ["train"]
