"""Mixture YAML: rates (numbers, examples-proportional, nesting), validation, safe loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from multipromot.data import sources, tasks
from multipromot.data.mixtures import (
    Mixture,
    load_mixture,
    rate_examples_proportional,
)
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.yamlio import MAX_EXPANDED_NODES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def rows_generator():
    """Generator ``mixtest_rows``: ``n`` train and ``n_validation`` validation rows."""

    @sources.register_generator("mixtest_rows")
    def rows(split: str, seed: int, n: int = 10, n_validation: int = 2) -> list[dict]:
        size = n if split == "train" else n_validation
        return [{"text": f"{split} row {i}", "label": i % 2} for i in range(size)]

    yield
    sources.reset_generators()
    tasks.reset_registry()


def inline(name: str, n: int, rate: str | None = None, template: str = "{{text}} ||| {{label}}"):
    """YAML lines of one inline task entry with ``n`` train rows."""
    lines = [
        f"  - name: {name}",
        f"    source: {{generator: mixtest_rows, n: {n}}}",
        f'    template: {{jinja: "{template}"}}',
        "    metric: exact_match",
    ]
    if rate is not None:
        lines.append(f"    rate: {rate}")
    return "\n".join(lines) + "\n"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def register(name: str, n: int) -> None:
    """A 'catalogue' task (registered tasks shadow the catalogue)."""
    spec = {
        "name": name,
        "source": {"generator": "mixtest_rows", "n": n},
        "template": {"jinja": "{{text}} ||| {{label}}"},
        "metric": "exact_match",
    }
    tasks.register_task(tasks.task_from_spec(spec), replace=True)


def sampled_shares(mixture: Mixture, draws: int = 100_000) -> np.ndarray:
    picks = [d.task_index for d in MixtureSampler(mixture, seed=0).take(draws)]
    return np.bincount(picks, minlength=len(mixture.tasks)) / draws


def test_numeric_rates_are_normalised_and_header_is_read(tmp_path):
    path = write(
        tmp_path,
        "m.yaml",
        "name: small\nversion: 1\nexemplars: {shots: 2, seed: 5}\ntasks:\n"
        + inline("a", 30, "3")
        + inline("b", 20, "1.0")
        + inline("c", 10),  # default rate 1.0
    )
    m = load_mixture(path)
    assert (m.name, m.version, m.shots, m.exemplar_seed) == ("small", 1, 2, 5)
    assert m.task_names == ["a", "b", "c"]
    assert m.rates == pytest.approx([0.6, 0.2, 0.2])
    assert m.file == str(path)
    assert m.origins == [f"{path}:tasks[{i}]" for i in range(3)]
    assert m.tasks[0].render(m.tasks[0].examples("train")[3]) == ("train row 3", "1")
    np.testing.assert_allclose(sampled_shares(m), [0.6, 0.2, 0.2], atol=0.01)


def test_examples_proportional_follows_seqio_with_cap_and_temperature(tmp_path):
    assert rate_examples_proportional(1000, cap=500, temperature=2.0) == pytest.approx(500**0.5)
    assert rate_examples_proportional(200, cap=500, temperature=1.0, scale=3.0) == 500.0
    assert rate_examples_proportional(7) == 7.0
    path = write(
        tmp_path,
        "m.yaml",
        "rate: {examples_proportional: {cap: 500, temperature: 2.0}}\ntasks:\n"
        + inline("big", 1000)
        + inline("mid", 200)
        + inline("small", 50)
        + inline("fixed", 5, "10.0"),  # a per-task override, in the same units
    )
    m = load_mixture(path)
    raw = np.array([math.sqrt(500), math.sqrt(200), math.sqrt(50), 10.0])
    np.testing.assert_allclose(m.rates, raw / raw.sum())
    assert m.name == "m"  # defaults to the file stem
    np.testing.assert_allclose(sampled_shares(m), raw / raw.sum(), atol=0.01)


def test_per_task_examples_proportional_under_a_numeric_default(tmp_path):
    path = write(
        tmp_path,
        "m.yaml",
        "rate: 100\ntasks:\n"
        + inline("a", 40)
        + inline("b", 300, "{examples_proportional: {cap: 200}}"),
    )
    np.testing.assert_allclose(load_mixture(path).rates, [1 / 3, 2 / 3])


def test_nested_mixture_rate_scales_its_normalised_rates(tmp_path):
    write(tmp_path, "sub/inner.yaml", "tasks:\n" + inline("c", 10, "1") + inline("d", 10, "3"))
    path = write(
        tmp_path,
        "outer.yaml",
        "tasks:\n" + inline("a", 10, "3") + "  - mixture: sub/inner.yaml\n    rate: 1\n",
    )
    m = load_mixture(path)
    assert m.task_names == ["a", "c", "d"]
    expected = [3 / 4, 1 / 4 * 1 / 4, 1 / 4 * 3 / 4]
    np.testing.assert_allclose(m.rates, expected)
    assert m.origins[1] == f"{tmp_path / 'sub' / 'inner.yaml'}:tasks[0]"
    np.testing.assert_allclose(sampled_shares(m), expected, atol=0.01)


def test_nested_examples_proportional_inside_and_numeric_rate_outside(tmp_path):
    write(
        tmp_path,
        "inner.yaml",
        "rate: {examples_proportional: {cap: 300}}\ntasks:\n"
        + inline("c", 100)
        + inline("d", 1000),
    )
    path = write(
        tmp_path,
        "outer.yaml",
        "rate: {examples_proportional: {}}\ntasks:\n"
        + inline("a", 400)
        + "  - mixture: inner.yaml\n    rate: 400\n",
    )
    m = load_mixture(path)
    expected = np.array([400, 400 * 100 / 400, 400 * 300 / 400]) / 800
    np.testing.assert_allclose(m.rates, expected)
    np.testing.assert_allclose(sampled_shares(m), expected, atol=0.01)


def test_a_catalogue_task_reached_twice_sums_its_rates(tmp_path):
    register("shared", 10)
    write(tmp_path, "inner.yaml", "tasks:\n  - task: shared\n    rate: 1\n" + inline("x", 5, "1"))
    path = write(
        tmp_path,
        "outer.yaml",
        "tasks:\n  - task: shared\n    rate: 2\n  - mixture: inner.yaml\n    rate: 2\n",
    )
    m = load_mixture(path)
    assert m.task_names == ["shared", "x"]
    np.testing.assert_allclose(m.rates, [3 / 4, 1 / 4])


def test_catalogue_task_with_another_template(tmp_path):
    register("cat", 4)
    path = write(
        tmp_path,
        "m.yaml",
        'tasks:\n  - task: cat\n    template: {jinja: "Say: {{text}} ||| {{label}}", id: say}\n',
    )
    task = load_mixture(path).tasks[0]
    assert task.template.id == "say"
    assert task.render(task.examples("train")[1]) == ("Say: train row 1", "1")
    assert tasks.get_task("cat").template.id != "say"  # the catalogue's task is untouched


def test_shipped_rte_enfr_mixture_resolves_its_rates():
    register("rte", 2490)  # stand-ins of the catalogue's hub tasks, with their real sizes
    register("wmt14_en_fr", 40_000)
    m = load_mixture(REPO / "mixtures" / "rte_enfr.yaml")
    assert m.task_names == ["rte", "wmt14_en_fr"]
    assert (m.shots, m.exemplar_seed) == (1, 0)
    np.testing.assert_allclose(m.rates, [2490 / 12490, 10000 / 12490])


def test_anchors_and_aliases_within_bounds_are_allowed(tmp_path):
    path = write(
        tmp_path,
        "m.yaml",
        "tasks:\n"
        "  - name: a\n    source: {generator: mixtest_rows, n: 4}\n"
        '    template: &tpl {jinja: "{{text}} ||| {{label}}"}\n    metric: exact_match\n'
        "  - name: b\n    source: {generator: mixtest_rows, n: 4}\n"
        "    template: *tpl\n    metric: exact_match\n",
    )
    assert load_mixture(path).task_names == ["a", "b"]


# -- errors: (file text, key in the message, words of the message) ------------------------------

ERRORS = {
    "yaml_syntax": ("tasks:\n  - task: a\n   rate: [1\n", "line 3, column", "invalid YAML"),
    "not_mapping": ("- task: a\n", None, "a mixture file is a mapping"),
    "empty_file": ("", None, "got an empty file"),
    "unknown_top_key": ("name: x\ntask:\n  - task: a\n", "task", "did you mean 'tasks'"),
    "missing_tasks": ("name: x\n", "tasks", "missing"),
    "unknown_task": ("tasks:\n  - task: no_such_task_xyz\n", "tasks[0].task", "unknown task"),
    "negative_rate": (
        "tasks:\n" + inline("a", 3) + inline("b", 3, "-1"),
        "tasks[1].rate",
        "finite number >= 0",
    ),
    "zero_total_rate": (
        "rate: 0\ntasks:\n" + inline("a", 3) + inline("b", 3),
        "tasks",
        "all rates are zero",
    ),
    "unknown_template": (
        "tasks:\n  - name: a\n    source: {generator: mixtest_rows}\n"
        "    template: no_such_template_xyz\n    metric: exact_match\n",
        "tasks[0].template",
        "no_such_template_xyz",
    ),
    "template_syntax": (
        "tasks:\n" + inline("a", 3, template="{{text ||| {{label}}"),
        "tasks[0].template",
        "Jinja syntax error",
    ),
    "bad_version": ("version: 2\ntasks:\n" + inline("a", 3), "version", "unsupported version 2"),
    "duplicate_task": (
        "tasks:\n" + inline("a", 3) + inline("a", 4),
        "tasks[1]",
        "duplicate task 'a' (also tasks[0])",
    ),
    "duplicate_yaml_key": ("tasks: []\ntasks: []\n", "line 2, column 1", "duplicate key 'tasks'"),
    "entry_two_kinds": (
        "tasks:\n  - task: a\n    mixture: b.yaml\n",
        "tasks[0]",
        "exactly one of 'task'",
    ),
    "bad_rate_function": (
        "rate: {examples_proportional: {temprature: 2}}\ntasks:\n" + inline("a", 3),
        "rate.examples_proportional.temprature",
        "did you mean 'temperature'",
    ),
    "negative_shots": (
        "exemplars: {shots: -1}\ntasks:\n" + inline("a", 3),
        "exemplars.shots",
        "integer >= 0",
    ),
    "missing_nested_file": (
        "tasks:\n  - mixture: nowhere.yaml\n    rate: 1\n",
        "tasks[0].mixture",
        "no such mixture file 'nowhere.yaml'",
    ),
    "nested_function_rate": (
        "rate: {examples_proportional: {cap: 10}}\ntasks:\n  - mixture: other.yaml\n",
        "tasks[0].rate",
        "the default rate (examples_proportional(cap=10, temperature=1)) cannot apply",
    ),
    "cycle": ("tasks:\n  - mixture: cycle_b.yaml\n    rate: 1\n", "tasks[0].mixture", "cycle"),
    "alias_bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "tasks: []\n",
        "line",
        f"more than {MAX_EXPANDED_NODES} nodes",
    ),
    "recursive_alias": ("tasks: &t [*t]\n", "line 1", "refers to itself"),
}


def error_file(tmp_path: Path, kind: str) -> Path:
    """Write the failing mixture of one kind (plus the files it refers to)."""
    text = ERRORS[kind][0]
    if kind == "cycle":
        write(tmp_path, "cycle_b.yaml", "tasks:\n  - mixture: cycle_a.yaml\n    rate: 1\n")
        return write(tmp_path, "cycle_a.yaml", text)
    if kind == "nested_function_rate":
        write(tmp_path, "other.yaml", "tasks:\n" + inline("z", 3))
    return write(tmp_path, f"{kind}.yaml", text)


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_bad_mixture_is_one_user_error_naming_file_and_key(tmp_path, kind):
    path = error_file(tmp_path, kind)
    _, key, words = ERRORS[kind]
    with pytest.raises(UserError) as info:
        load_mixture(path)
    err = info.value
    # The error names the file it is about (the cycle is reported where it closes).
    assert err.file is not None and Path(err.file).parent == tmp_path
    if key is not None:
        assert err.key is not None and err.key.startswith(key)
    assert words in err.message
    assert "\n" not in str(err)


def test_cycle_names_the_chain(tmp_path):
    with pytest.raises(UserError, match=r"cycle: cycle_a.yaml -> cycle_b.yaml -> cycle_a.yaml"):
        load_mixture(error_file(tmp_path, "cycle"))


def test_self_nesting_is_a_cycle(tmp_path):
    path = write(tmp_path, "self.yaml", "tasks:\n  - mixture: self.yaml\n    rate: 1\n")
    with pytest.raises(UserError, match="cycle: self.yaml -> self.yaml"):
        load_mixture(path)


def test_missing_and_oversized_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_mixture(tmp_path / "absent.yaml")
    big = write(tmp_path, "big.yaml", "# " + "x" * (1 << 20) + "\ntasks: []\n")
    with pytest.raises(UserError, match="at most 1 MiB"):
        load_mixture(big)


def test_mixture_constructor_validates_rates():
    with pytest.raises(ValueError, match="sum to zero"):
        Mixture("m", ["t"], [0.0])
    with pytest.raises(ValueError, match="1 tasks but 2 rates"):
        Mixture("m", ["t"], [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        Mixture("m", ["t", "u"], [1.0, -1.0])
