"""The one registry class behind tasks, templates, metrics, generators, catalogue files and
built-in models: duplicates refused, replace on request, did-you-mean, reset to the built-ins."""

from __future__ import annotations

import pytest

from multipromot.errors import UserError
from multipromot.registry import Registry


def _metrics() -> Registry[int]:
    return Registry("metric", {"accuracy": 1, "exact_match": 2})


def test_register_and_look_up():
    registry = _metrics()
    assert registry.register("bleu", 3) == 3
    assert registry.lookup("bleu") == 3
    assert "bleu" in registry and "rouge2" not in registry
    assert registry.names() == ["accuracy", "bleu", "exact_match"]
    assert registry.values() == [1, 2, 3]  # registration order
    assert registry.get("rouge2") is None and registry.get("rouge2", 0) == 0
    assert len(registry) == 3


def test_a_duplicate_is_refused_unless_replace():
    registry = _metrics()
    with pytest.raises(UserError) as err:
        registry.register("accuracy", 9)
    assert str(err.value) == "accuracy: metric 'accuracy' is already registered"
    assert registry.lookup("accuracy") == 1
    registry.register("accuracy", 9, replace=True)
    assert registry.lookup("accuracy") == 9


def test_registering_the_same_entry_again_is_allowed():
    registry: Registry[object] = Registry("generator")
    entry = object()
    registry.register("lab_rte", entry)
    assert registry.register("lab_rte", entry) is entry


def test_an_unknown_name_suggests_the_close_names():
    registry = _metrics()
    with pytest.raises(UserError) as err:
        registry.lookup("acuracy", file="mix.yaml", key="tasks[0].metric")
    assert (
        str(err.value)
        == "mix.yaml: tasks[0].metric: unknown metric 'acuracy'; did you mean accuracy?"
    )
    assert err.value.file == "mix.yaml" and err.value.key == "tasks[0].metric"


def test_an_unknown_name_with_nothing_close_lists_the_known_ones():
    assert str(_metrics().unknown("f1")) == "unknown metric 'f1' (known: accuracy, exact_match)"
    assert str(Registry("generator").unknown("x")) == "unknown generator 'x' (known: none)"
    close = Registry("task", suggestions=2).unknown("rtee", also=["rte", "rte2", "cb"])
    assert str(close) == "unknown task 'rtee'; did you mean rte, rte2?"


def test_reset_restores_the_builtins():
    registry = _metrics()
    registry.register("bleu", 3)
    registry.register("accuracy", 9, replace=True)
    registry.reset()
    assert registry.names() == ["accuracy", "exact_match"]
    assert registry.lookup("accuracy") == 1


def test_mark_builtins_makes_the_current_entries_the_builtins():
    registry: Registry[int] = Registry("generator")
    registry.register("lab_rte", 1)
    registry.mark_builtins()
    registry.register("mine", 2)
    registry.reset()
    assert registry.names() == ["lab_rte"]


def test_the_package_registries_reset_to_their_builtins():
    from multipromot.data import metrics, sources
    from multipromot.models import BUILTIN_MODELS

    metrics.register_metric("test_len")(lambda p, r: 0.0)
    with pytest.raises(UserError, match="metric 'test_len' is already registered"):
        metrics.register_metric("test_len")(lambda p, r: 1.0)
    metrics.reset_registries()
    assert "test_len" not in metrics.list_metrics() and "bleu" in metrics.list_metrics()
    sources.register_generator("test_gen")(lambda split, seed: [])
    sources.reset_generators()
    assert "test_gen" not in sources.GENERATORS and "lab_rte" in sources.GENERATORS
    assert {"tiny-t5", "tiny-gpt2", "tiny-llama", "lab", "lab-llama"} <= set(BUILTIN_MODELS.names())
