"""The method table: one entry per kind answers every question about a kind, and no module
outside methods.py compares a kind (or a stage-2 mode) with a string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from multipromot.config import load_config, run_methods
from multipromot.errors import UserError
from multipromot.methods import KINDS, STAGE2_MODES, MethodKind, method_kind, parse_method

PACKAGE = Path(__file__).resolve().parents[1] / "multipromot"

# What each field may hold (MethodKind's docstring); a new value needs code that reads it.
ALLOWED = {
    "weights": {"base", "stage2", "interpolated"},
    "trainable": {None, "model", "both", "adapters"},
    "prompts": {"none", "bank", "random"},
    "adapters": {None, "shared", "per_task"},
    "stage1": {None, "prompts", "adapters"},
    "freezing": {None, "half_per_round"},
    "targets": {"data", "self_distilled"},
}


def test_every_kind_has_one_entry_with_known_values():
    assert set(KINDS) == {
        "pretrained",
        "prompt_tuning",
        "standard",
        "promot",
        "joint",
        "random_prompt",
        "promot_lora",
        "lora",
        "hft",
        "sdft",
        "wise",
    }
    for name, kind in KINDS.items():
        assert isinstance(kind, MethodKind) and kind.name == name and kind.summary
        for field, allowed in ALLOWED.items():
            assert getattr(kind, field) in allowed, (name, field)
        assert set(kind.settings) <= {"hft", "lora", "sdft"}, name
        # a kind without stage 2 cannot need a one-process stage 2, or be interpolated
        if not kind.trains:
            assert not kind.single_process and not kind.wise_source, name
        # the kinds that store prompts next to their weights are exactly the ones whose
        # prompts are not the bank's as stage 1 left them
        assert kind.stores_prompts == (kind.prompts == "random" or kind.trainable == "both")
    assert set(STAGE2_MODES) == {name for name, kind in KINDS.items() if kind.trains}


def test_the_table_says_what_each_paper_method_is():
    assert KINDS["promot"].prompts == "bank" and KINDS["promot"].trainable == "model"
    assert KINDS["standard"].prompts == "none" and KINDS["standard"].wise_source
    assert KINDS["joint"].trainable == "both" and KINDS["joint"].stores_prompts
    assert KINDS["random_prompt"].stores_prompts and KINDS["random_prompt"].stage1 is None
    assert KINDS["prompt_tuning"].weights == "base" and KINDS["prompt_tuning"].stage1 == "prompts"
    assert KINDS["promot_lora"].routed and KINDS["promot_lora"].prompts == "none"
    assert KINDS["lora"].trainable == "adapters" and not KINDS["lora"].routed
    # SDFT: a full fine-tuning without prompts on the base model's own (kept) rewrites
    sdft = KINDS["sdft"]
    assert (sdft.trainable, sdft.prompts, sdft.targets) == ("model", "none", "self_distilled")
    assert sdft.wise_source and sdft.settings == ("sdft",)
    # the drift issue #24 found: plan budgeted a prompt for kinds that have none
    assert [k for k in STAGE2_MODES if KINDS[k].prompted] == ["promot", "joint", "random_prompt"]


def test_method_kind_refuses_what_stage2_cannot_train():
    assert method_kind("promot") is KINDS["promot"]
    for name in ("pretrained", "wise", "bogus"):
        with pytest.raises(UserError, match="must be one of"):
            method_kind(name)


def test_labels_parse_through_the_table():
    listed = ["standard", "wise0.3:standard"]
    parse = dict(mixtures={"multi": "m.yaml"}, default_mixture="s.yaml", listed=listed)
    assert parse_method("promot+2shot@multi", **parse).mixture == "m.yaml"
    wise = parse_method("wise0.3:standard", **parse)
    assert (wise.kind, wise.alpha, wise.made.kind) == ("wise", 0.3, "standard")
    assert not wise.uses_prompts and not wise.trains
    for label, message in [
        ("wise", "unknown method"),
        ("wise0.5:lora", "full fine-tuning"),
        ("wise0.5:promot", "does not list"),
        ("wise1.5:standard", r"\[0, 1\]"),
        ("promot+65shot", "at most 64"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_method(label, **parse)


def test_a_bad_label_is_refused_when_the_config_loads(tmp_path):
    with pytest.raises(UserError, match="unknown method 'magic'"):
        load_config(None, ["methods=[promot,magic]"])
    methods = run_methods(load_config(None, ["methods=[hft,wise0.5:hft]"]))
    assert [m.kind for m in methods] == ["hft", "wise"]


def _string_comparisons_of_kinds(path: Path) -> list[str]:
    """Comparisons of a name or attribute called kind or mode with a string (or a collection of
    strings)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any(
            (isinstance(s, ast.Name) and s.id in ("kind", "mode"))
            or (isinstance(s, ast.Attribute) and s.attr in ("kind", "mode"))
            for s in sides
        )
        strings = any(
            (isinstance(s, ast.Constant) and isinstance(s.value, str))
            or (
                isinstance(s, ast.Tuple | ast.List | ast.Set)
                and any(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)
            )
            for s in sides
        )
        if named and strings:
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_kind_or_mode_is_compared_with_a_string_outside_methods_py():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "methods.py" or path.parent != PACKAGE:
            found += _string_comparisons_of_kinds(path)
    assert found == []


def test_the_scan_finds_a_comparison(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(m, kind):\n    return m.mode in ("hft",) or kind != "promot"\n')
    assert _string_comparisons_of_kinds(probe) == ["probe.py:2", "probe.py:2"]
