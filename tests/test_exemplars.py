"""k-shot exemplars: deterministic, from train, never the example itself, rendered as documented."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from multipromot.data.exemplars import (
    build_item,
    choose_exemplars,
    render_exemplar,
)
from multipromot.features import SEPARATOR, Item, kshot_text


@dataclass
class ToyTask:
    name: str
    n: int
    n_validation: int = 0

    def examples(self, split: str) -> list[dict]:
        size = self.n if split == "train" else self.n_validation
        return [{"i": i, "split": split} for i in range(size)]

    def render(self, example: dict) -> tuple[str, str]:
        return f"Q{example['i']} ({example['split']})", f"A{example['i']}"

    def reference_list(self, example: dict) -> list[str]:
        return []  # the rendered target is the only answer, as for a Task without references


def test_separator_is_a_blank_line():
    assert SEPARATOR == "\n\n"


def test_choice_is_deterministic_and_depends_on_seed_task_and_index():
    task = ToyTask("rte", 1000)
    first = choose_exemplars(task, 17, 3, seed=0)
    assert first == choose_exemplars(task, 17, 3, seed=0)
    assert len(first) == 3 and len(set(first)) == 3
    assert all(0 <= i < 1000 for i in first)
    assert first != choose_exemplars(task, 17, 3, seed=1)
    assert first != choose_exemplars(task, 18, 3, seed=0)
    assert first != choose_exemplars(ToyTask("cb", 1000), 17, 3, seed=0)
    assert first != choose_exemplars(task, 17, 3, seed=0, split="validation")


def test_never_the_example_itself_and_k_is_clipped():
    task = ToyTask("tiny", 4, n_validation=2)
    for index in range(4):
        for seed in range(20):
            picks = choose_exemplars(task, index, 10, seed=seed)
            assert sorted(picks) == sorted(set(range(4)) - {index})  # k clipped to 4 - 1
    # an evaluation example is not in train: every train example may serve
    assert sorted(choose_exemplars(task, 0, 10, seed=0, split="validation")) == [0, 1, 2, 3]
    assert choose_exemplars(task, 0, 0, seed=0) == []
    assert choose_exemplars(ToyTask("one", 1), 0, 1, seed=0) == []


def test_self_is_never_chosen_on_a_larger_split():
    task = ToyTask("mid", 30)
    assert all(i not in choose_exemplars(task, i, 5, seed=s) for i in range(30) for s in range(5))


def test_rendering_and_kshot_text():
    task = ToyTask("t", 5)
    train = task.examples("train")
    assert render_exemplar(task, train[2]) == "Q2 (train) A2"
    item = Item(
        0, "Q0 (train)", "A0", [render_exemplar(task, train[3]), render_exemplar(task, train[1])]
    )
    assert kshot_text(item) == "Q3 (train) A3\n\nQ1 (train) A1\n\nQ0 (train)"
    assert kshot_text(Item(0, "Q0 (train)", "A0")) == "Q0 (train)"


def test_build_item_renders_the_row_and_its_exemplars():
    task = ToyTask("t", 6, n_validation=3)
    item = build_item(task, 4, shots=2, seed=9, task_id=1)
    picks = choose_exemplars(task, 4, 2, seed=9)
    assert 4 not in picks
    assert item == Item(
        task_id=1,
        input="Q4 (train)",
        target="A4",
        exemplars=[f"Q{i} (train) A{i}" for i in picks],
    )
    evaluation = build_item(task, 2, split="validation", shots=1, seed=9)
    assert evaluation.task_id == -1
    assert evaluation.input == "Q2 (validation)"
    assert len(evaluation.exemplars) == 1
    assert re.fullmatch(r"Q(\d) \(train\) A\1", evaluation.exemplars[0])


@pytest.mark.parametrize("shots", [0, 1])
def test_zero_shot_items_have_no_exemplars(shots):
    assert len(build_item(ToyTask("t", 3), 0, shots=shots).exemplars) == shots
