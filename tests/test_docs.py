"""The docs: the generated reference pages are current, every config key has help text, and
every internal link resolves (``make docs`` checks the same with ``mkdocs build --strict``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
import unicodedata
from pathlib import Path

import pytest
import yaml

from multipromot import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator(name: str = "gen_reference"):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
RESULTS = _generator("gen_results")


def test_results_tables_are_the_ones_their_kept_data_gives():
    """Every generated table of docs/results/ equals what its aggregate in docs/results/data/
    renders (python docs/gen_results.py rewrites them), and every kept aggregate is shown."""
    shown = set()
    for page in RESULTS.pages():
        assert page.read_text() == RESULTS.render(page), (
            f"{page.name}: a table differs from its data; run python docs/gen_results.py"
        )
        shown |= {m.group(2) for m in RESULTS._TABLE.finditer(page.read_text())}
    kept = {p.stem for p in RESULTS.DATA.glob("*.json")}
    assert kept <= shown, f"data files no page shows: {sorted(kept - shown)}"


def test_a_results_table_that_disagrees_with_its_data_is_found(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    stats = {"rows": [], "differences": [], "seeds": 3}
    summary = {
        "command": "multipromot sweep c.yaml --seeds 0,1,2",
        "seeds": [0, 1, 2],
        "base_model": "both vary",
        "axes": {},
        "groups": [{"label": "all cells", "values": {}, "cells": [], "statistics": stats}],
    }
    (data / "t.json").write_text(__import__("json").dumps(summary))
    page = tmp_path / "p.md"
    page.write_text("before\n<!-- table: t main -->\nhand-typed 12.3\n<!-- end table -->\nafter\n")
    monkeypatch.setattr(RESULTS, "DATA", data)
    rendered = RESULTS.render(page)
    assert rendered != page.read_text() and "hand-typed" not in rendered
    assert rendered.startswith("before\n<!-- table: t main -->\n```\nmultipromot sweep c.yaml")


def test_the_lab_models_table_takes_its_lowest_score_over_pretrained_families_only(tmp_path):
    """`import-lab` keeps lab_pretrain.json records; the table's last column is the check the
    converged-model target is read from, so lab_rte (never pretrained on) must not count."""
    import json

    record = {
        "lab_version": 4,
        "config": {"seed": 1, "steps": 10, "eval_examples": 30, "shot_weights": [1.0]},
        "loss_first": 6.0,
        "loss_last": 0.02,
        "train_seconds": 100.0,
        "torch_threads": 1,
        "unseen_in_pretraining": ["lab_rte"],
        "one_shot_test_scores": {"lab_cb": 100.0, "lab_qa": 96.7, "lab_rte": 50.0},
    }
    model = tmp_path / "m"
    model.mkdir()
    (model / "lab_pretrain.json").write_text(json.dumps(record))
    (tmp_path / "empty").mkdir()
    kept = {"command": "multipromot lab pretrain --seed 1", "models": [record]}
    table = RESULTS.VIEWS["lab"](kept)
    assert table.splitlines()[-3].endswith("| 100.0 | 96.7 | 50.0 | 96.7 |")
    assert "multipromot lab pretrain --seed 1" in table and "30 test items" in table
    with pytest.raises(SystemExit, match="empty"):  # a model without scores is not kept
        RESULTS.import_lab("x", "cmd", [str(model), str(tmp_path / "empty")])


@pytest.mark.parametrize("name", sorted(GEN.PAGES))
def test_generated_reference_page_is_current(name):
    committed = DOCS / "reference" / name
    rendered = GEN.PAGES[name]()
    stale = not committed.is_file() or committed.read_text(encoding="utf-8") != rendered
    assert not stale, (
        f"docs/reference/{name} is stale: run `.venv/bin/python docs/gen_reference.py` "
        "and commit the page"
    )


def _config_classes() -> list[type]:
    found, todo = [], [config.RunConfig]
    while todo:
        cls = todo.pop()
        found.append(cls)
        hints = typing.get_type_hints(cls)
        todo += [
            hints[f.name]
            for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name])
        ]
    return found


def test_every_config_field_has_help_text():
    classes = _config_classes()
    names = "RunConfig BankConfig Stage1Config Stage2Config EvalConfig DataConfig LogConfig"
    assert {c.__name__ for c in classes} >= {*names.split(), "LoraConfig", "HftConfig"}
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        if not str(f.metadata.get("help", "")).strip()
    ]
    assert missing == []  # field(default=..., metadata={"help": "..."})


def test_config_reference_lists_every_key():
    page = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    hints = typing.get_type_hints(config.RunConfig)
    for f in dataclasses.fields(config.RunConfig):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            for sub in dataclasses.fields(section):
                assert f"`{f.name}.{sub.name}`" in page
        else:
            assert f"`{f.name}`" in page


# ------------------------------------------------------------------------------------------
# Links

_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
_SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"', re.M)


def _slug(heading: str) -> str:
    """python-markdown's toc slug of a heading (what mkdocs anchors are)."""
    custom = re.search(r"\{#([^}\s]+)\}\s*$", heading)
    if custom:
        return custom.group(1)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    for snippet in _SNIPPET.findall(text):  # an included file's headings are the page's
        text += "\n" + (ROOT / snippet).read_text(encoding="utf-8")
    return {_slug(h) for h in _HEADING.findall(_FENCE.sub("", text))}


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def _broken_links(page: Path) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target} (no such file)")
        elif where.is_dir():
            continue
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_internal_links_resolve(page):
    assert _broken_links(page) == []


def test_snippets_exist_and_nav_covers_every_page():
    for page in DOCS.rglob("*.md"):
        for snippet in _SNIPPET.findall(page.read_text(encoding="utf-8")):
            assert (ROOT / snippet).is_file(), f"{page}: includes missing {snippet}"
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def listed(nav) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        if isinstance(nav, list):
            return set().union(*(listed(item) for item in nav))
        if isinstance(nav, dict):
            return set().union(*(listed(item) for item in nav.values()))
        return set()

    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - listed(site["nav"]) == set()
    assert listed(site["nav"]) - pages == set()
