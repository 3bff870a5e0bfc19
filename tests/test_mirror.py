"""Dataset mirrors: hub sources load from a snapshot folder offline; `data pull` writes one,
`data check` says where each task loads from."""

from __future__ import annotations

import json

import datasets
import pytest

from multipromot.cli import main
from multipromot.cli.data import pull_task
from multipromot.config import load_config
from multipromot.data.mirror import (
    ENV_VAR,
    find_snapshot,
    set_mirror,
    snapshot_configs,
    write_snapshot,
)
from multipromot.data.sources import HubSource
from multipromot.data.tasks import get_task
from multipromot.errors import UserError
from multipromot.train.common import use_data_mirror

# Rows with the real field layout of SuperGLUE RTE / CB and SNLI (label -1 = no gold label).
RTE = [
    {"premise": f"Cats sleep {i}.", "hypothesis": "Cats rest.", "idx": i, "label": i % 2}
    for i in range(6)
]
CB = [
    {"premise": f"He said it {i}.", "hypothesis": "It is.", "idx": i, "label": i % 3}
    for i in range(5)
]
SNLI = [
    {"premise": "A dog runs.", "hypothesis": f"An animal moves {i}.", "label": label}
    for i, label in enumerate([0, 1, 2, 0, -1])
]


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    rows = lambda data: datasets.Dataset.from_list(data)  # noqa: E731
    write_snapshot(root, "aps/super_glue", "rte", {"train": rows(RTE), "validation": rows(RTE[:3])})
    write_snapshot(root, "aps/super_glue", "cb", {"train": rows(CB), "validation": rows(CB[:2])})
    write_snapshot(root, "stanfordnlp/snli", None, {"train": rows(SNLI), "test": rows(SNLI)})
    yield root
    set_mirror(None)
    for name in ("rte", "cb", "snli"):
        get_task(name).clear_cache()


def test_snapshot_layout_has_a_configs_block_per_config(mirror):
    folder = mirror / "aps" / "super_glue"
    configs = {c["config_name"]: c["data_files"] for c in snapshot_configs(folder)}
    assert set(configs) == {"rte", "cb"}  # the second write kept the first config
    assert configs["rte"] == [
        {"split": "train", "path": "rte/train-00000-of-00001.parquet"},
        {"split": "validation", "path": "rte/validation-00000-of-00001.parquet"},
    ]
    assert (folder / "cb" / "validation-00000-of-00001.parquet").is_file()


def test_hub_sources_load_from_the_mirror_offline(mirror):
    set_mirror(mirror)
    source = HubSource("aps/super_glue", "cb")
    assert source.where() == f"mirror {mirror / 'aps' / 'super_glue'}"
    assert list(source.load("train")) == CB
    # Catalogue tasks, with their split mapping and filters, read it too.
    rte, snli = get_task("rte"), get_task("snli")
    assert len(rte.examples("test")) == 3  # SuperGLUE: test -> validation
    assert rte.render(rte.examples("train")[1])[1] == "False"
    assert [r["label"] for r in snli.examples("train")] == [0, 1, 2, 0]  # label -1 dropped


def test_the_config_key_and_the_environment_set_the_mirror(mirror, tmp_path, monkeypatch):
    assert find_snapshot("aps/super_glue") is None
    monkeypatch.setenv(ENV_VAR, str(mirror))
    assert find_snapshot("aps/super_glue") == mirror / "aps" / "super_glue"
    monkeypatch.delenv(ENV_VAR)
    cfg = load_config(None, [f"data.mirror={mirror}"])
    assert find_snapshot("aps/super_glue") is None  # loading a config sets nothing
    use_data_mirror(cfg)  # what every command that reads the config's data does first
    assert find_snapshot("aps/super_glue") == mirror / "aps" / "super_glue"
    with pytest.raises(UserError, match="data.mirror: no such folder"):
        load_config(None, [f"data.mirror={tmp_path / 'nope'}"])


def test_errors_name_every_place_looked(mirror):
    set_mirror(mirror)
    with pytest.raises(UserError) as err:
        HubSource("aps/super_glue", "rte").load("test")  # the snapshot has no test split
    assert str(mirror / "aps" / "super_glue") in str(err.value)
    with pytest.raises(UserError) as err:
        HubSource("EdinburghNLP/xsum").load("train")  # not in the mirror, hub offline
    assert f"the mirror {mirror} has no folder {mirror / 'EdinburghNLP' / 'xsum'}" in str(err.value)
    assert "hub is offline" in str(err.value)


def test_pull_writes_what_the_task_loads_back(tmp_path):
    served = {"train": CB, "validation": CB[:2]}

    def fake_hub(source, split):  # stands in for the hub: nothing downloads in tests
        assert (source.path, source.name) == ("aps/super_glue", "cb")
        if split not in served:
            raise ValueError(f"Unknown split {split!r}")
        return datasets.Dataset.from_list(served[split])

    counts = pull_task(get_task("cb"), tmp_path / "m", load=fake_hub)
    assert counts == {"train": 5, "validation": 2}
    set_mirror(tmp_path / "m")
    try:
        cb = get_task("cb")
        cb.clear_cache()
        assert len(cb.examples("train")) == 5 and len(cb.examples("test")) == 2
    finally:
        set_mirror(None)
        get_task("cb").clear_cache()
    with pytest.raises(UserError, match="is not a hub dataset"):
        pull_task(get_task("lab_cb"), tmp_path / "m", load=fake_hub)


def test_data_check_says_where_each_task_loads_from(mirror, capsys):
    # exit status 1: the hub tasks outside the mirror cannot load offline (issue 26, item 7)
    assert main(["data", "check", "--mirror", str(mirror), "--json"]) == 1
    out, err = capsys.readouterr()
    rows = {r["task"]: r for r in json.loads(out)}
    assert "tasks cannot load: " in err and "xsum" in err
    assert rows["rte"]["where"] == f"mirror {mirror / 'aps' / 'super_glue'}"
    assert rows["rte"]["rows"] == {"train": 6, "validation": 3, "test": 3}
    assert rows["rte"]["error"] is None
    assert rows["xsum"]["where"] == "hub (or its local cache)" and rows["xsum"]["error"]
    assert rows["lab_cb"]["error"] is None and rows["lab_cb"]["rows"]["train"] > 0


def test_two_mirrors_with_the_same_layout_never_share_rows(tmp_path):
    """datasets' cache for a folder load is keyed on the layout, not the files: loading by the
    files' own paths keeps a second mirror (or a re-pulled one) from serving stale rows."""
    for value, name in ((1, "a"), (2, "b")):
        rows = datasets.Dataset.from_list([{"x": value}])
        write_snapshot(tmp_path / name, "org/same", None, {"train": rows})
    try:
        for value, name in ((1, "a"), (2, "b")):
            set_mirror(tmp_path / name)
            assert list(HubSource("org/same").load("train")) == [{"x": value}]
    finally:
        set_mirror(None)
