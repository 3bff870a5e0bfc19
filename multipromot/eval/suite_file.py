"""Evaluation suite files: which unseen tasks to test in context, with how many shots.

A suite YAML file (``eval/*.yaml``) is data, validated on load; every error is one
:class:`~multipromot.errors.UserError` naming the file and the key (``tasks[1].random``)::

    name: lab
    shots: [1, 4]            # k-shot settings (default [1, 4], the paper's)
    examples: 100            # test items per task (the first N of the split)
    split: test              # where the items come from (exemplars always come from train)
    tasks:
      - task: lab_cb
        random: 33.33        # random-guess score (0-100) for BIG-bench's normalized metric
      - lab_qa               # a bare name: no baseline given (0, as for generative tasks)
      - name: my_heldout     # an inline task, the same form as in a mixture (your own data)
        source: {files: data/heldout.jsonl, format: json}
        template: {jinja: "{{question}} ||| {{answer}}"}
        metric: exact_match
        random: 0

Splits are framework names; a catalogue task maps them to its source's (SuperGLUE's ``test``
is its ``validation``: the test labels are hidden). An inline task's relative files resolve
against the suite's folder, and it may not take a catalogue task's name.

Also here, as strings (no model, no tensors): a task's k-shot items (:func:`build_items`) and
the held-out inputs a router is measured on (:func:`routing_sets`). Scoring a suite is
:mod:`multipromot.eval.suites`; this module is apart so that reading a suite (``route
--eval``, preflight) imports no model code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multipromot.data.exemplars import build_item
from multipromot.data.tasks import check_inline_name, get_task, task_from_spec
from multipromot.errors import UserError
from multipromot.features import kshot_text
from multipromot.yamlio import check_keys, read_yaml

__all__ = [
    "DEFAULT_SHOTS",
    "EVAL_MAX_INPUT_LENGTH",
    "SuiteTask",
    "EvalSuite",
    "load_suite",
    "resolve_task",
    "build_items",
    "routing_sets",
]

DEFAULT_SHOTS: tuple[int, ...] = (1, 4)  # the paper evaluates unseen tasks 1- and 4-shot
# Token budget of a k-shot input at evaluation (exemplars that do not fit are dropped first).
EVAL_MAX_INPUT_LENGTH = 512
_TOP_KEYS = ("name", "description", "shots", "examples", "split", "tasks")
_TASK_KEYS = ("task", "random")


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite.

    Args:
        name: a catalogue task name, or an inline task's name.
        random: its random-guess score (0-100); 0 when not given, which is right for generative
            metrics (BLEU, exact match, ROUGE) and leaves the score unchanged when normalized.
        task: an inline task's definition (None: the catalogue's task of that name).
    """

    name: str
    random: float = 0.0
    task: Any = None

    def resolve(self) -> Any:
        """The Task: the inline definition, or the catalogue's."""
        return self.task if self.task is not None else get_task(self.name)


@dataclass(frozen=True)
class EvalSuite:
    """A validated suite (see the module docstring for the YAML form).

    Args:
        name: the suite's name.
        tasks: the tasks, in report order.
        shots: k-shot settings, in order.
        examples: items per task (the first N of each task's split).
        split: the split the items come from (exemplars always come from ``train``).
        description: free text.
        file: where it was loaded from, if anywhere.
    """

    name: str
    tasks: tuple[SuiteTask, ...]
    shots: tuple[int, ...] = DEFAULT_SHOTS
    examples: int = 100
    split: str = "test"
    description: str = ""
    file: str | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def resolved_tasks(self) -> list[Any]:
        """The Task objects, in order (inline definitions, or the catalogue's)."""
        return [t.resolve() for t in self.tasks]

    @property
    def random_baselines(self) -> dict[str, float]:
        """``{task: random-guess score}`` for every task (0 where none was given)."""
        return {t.name: t.random for t in self.tasks}


# --------------------------------------------------------------------------------------------
# Loading


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(file: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"must be a non-empty string, got {value!r}", file=file, key=key)
    return value.strip()


def _shots(file: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(
            f"must be a non-empty list of integers >= 0, got {value!r}", file=file, key="shots"
        )
    for i, k in enumerate(value):
        if not _is_int(k) or k < 0:
            raise UserError(f"must be an integer >= 0, got {k!r}", file=file, key=f"shots[{i}]")
    if len(set(value)) != len(value):
        raise UserError(f"lists a setting twice: {value}", file=file, key="shots")
    return tuple(value)


def _random(file: str, key: str, value: Any) -> float:
    number = _is_int(value) or isinstance(value, float)
    if not number or not math.isfinite(value) or not 0.0 <= value < 100.0:
        raise UserError(f"must be a score in [0, 100), got {value!r}", file=file, key=key)
    return float(value)


def _task(file: str, index: int, entry: Any, check_task) -> SuiteTask:
    key = f"tasks[{index}]"
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict):
        raise UserError(
            f"must be a task name, a mapping with 'task', or an inline task with 'name', got "
            f"{entry!r}",
            file=file,
            key=key,
        )
    if "name" in entry and "task" not in entry:  # an inline task, as in a mixture
        if isinstance(entry["name"], str):  # before its data: the name alone is refused
            check_inline_name(entry["name"], file=file, key=key)
        task = task_from_spec(entry, file=file, key=key, ignore=("random",))
        random = _random(file, f"{key}.random", entry["random"]) if "random" in entry else 0.0
        return SuiteTask(name=task.name, random=random, task=task)
    if "name" in entry:
        raise UserError(
            "a suite task has either 'task' (a catalogue task) or 'name' (an inline task), "
            "not both",
            file=file,
            key=key,
        )
    check_keys(file, key, entry, _TASK_KEYS)
    if "task" not in entry:
        raise UserError("missing 'task'", file=file, key=key)
    name = _name(file, f"{key}.task", entry["task"])
    if check_task is not None:
        try:
            check_task(name)
        except UserError as e:
            raise UserError(e.message, file=file, key=f"{key}.task") from None
    random = _random(file, f"{key}.random", entry["random"]) if "random" in entry else 0.0
    return SuiteTask(name=name, random=random)


def _catalogue_check(name: str) -> None:
    get_task(name)


def load_suite(path: str | os.PathLike, *, check_tasks: bool = True) -> EvalSuite:
    """Read and validate an evaluation suite.

    Args:
        path: the suite YAML file.
        check_tasks: look every task name up in the task catalogue (no data is loaded).

    Returns:
        The :class:`EvalSuite`.

    Raises:
        UserError: unreadable file or bad YAML, an unknown key, a value of the wrong type or
            range, a task listed twice, or a task the catalogue does not know; the error names
            the file and the key (``tasks[2].task``).
    """
    file = os.fspath(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError("a suite must be a mapping with at least 'name' and 'tasks'", file=file)
    check_keys(file, "", data, _TOP_KEYS)
    for required in ("name", "tasks"):
        if required not in data:
            raise UserError(f"missing '{required}'", file=file, key=required)
    name = _name(file, "name", data["name"])
    shots = _shots(file, data["shots"]) if "shots" in data else DEFAULT_SHOTS
    examples = data.get("examples", 100)
    if not _is_int(examples) or examples < 1:
        raise UserError(f"must be an integer >= 1, got {examples!r}", file=file, key="examples")
    split = _name(file, "split", data["split"]) if "split" in data else "test"
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise UserError("must be a string", file=file, key="description")
    entries = data["tasks"]
    if not isinstance(entries, list) or not entries:
        raise UserError("must be a non-empty list of tasks", file=file, key="tasks")
    check = _catalogue_check if check_tasks else None
    tasks = [_task(file, i, entry, check) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if task.name in seen:
            raise UserError(
                f"task {task.name!r} is already listed at tasks[{seen[task.name]}]",
                file=file,
                key=f"tasks[{i}].task",
            )
        seen[task.name] = i
    return EvalSuite(
        name=name,
        tasks=tuple(tasks),
        shots=shots,
        examples=examples,
        split=split,
        description=description.strip(),
        file=str(Path(file).resolve()),
    )


# --------------------------------------------------------------------------------------------
# Items (strings)


def resolve_task(task: Any) -> Any:
    """A Task object from a catalogue name, a suite's task (or the object itself)."""
    if isinstance(task, SuiteTask):
        return task.resolve()
    return get_task(task) if isinstance(task, str) else task


def build_items(task: Any, shots: int, *, examples: int, split: str, seed: int) -> list:
    """The k-shot items of one task: the first ``examples`` of ``split``, exemplars from train.

    Exemplars are :func:`~multipromot.data.exemplars.choose_exemplars` of the item's index, so the
    same seed gives the same prompts in every run and for every method (a fair comparison).

    Args:
        task: the task.
        shots: exemplars per item (0 = zero-shot).
        examples: at most this many items.
        split: the split the items come from.
        seed: the exemplar seed.

    Returns:
        :class:`~multipromot.data.collate.Item` rows with ``task_id = -1`` (callers set the row).

    Raises:
        UserError: the split has no examples.
    """
    size = len(task.examples(split))
    if size == 0:
        raise UserError(f"split {split!r} has no examples", key=task.name)
    return [
        build_item(task, index, split=split, shots=shots, seed=seed)
        for index in range(min(examples, size))
    ]


def routing_sets(
    bank_tasks: Sequence[Any],
    other_tasks: Sequence[Any],
    *,
    examples: int = 100,
    shots: Sequence[int] = (0, 1, 4),
    split: str = "test",
    seed: int = 0,
) -> tuple[dict[str, list[str]], list[str]]:
    """Held-out router inputs: each bank task's own inputs (0- and k-shot) as positives, every
    other task's inputs and k-shot prompts as negatives, rendered exactly as evaluation does.

    Returns:
        ``({bank task: inputs}, negative inputs)``
    """

    def texts(task: Any) -> list[str]:
        out = []
        for k in shots:
            for item in build_items(task, k, examples=examples, split=split, seed=seed):
                out.append(kshot_text(item))
        return out

    positives = {t.name: texts(t) for t in map(resolve_task, bank_tasks)}
    negatives = [text for t in map(resolve_task, other_tasks) for text in texts(t)]
    return positives, negatives
