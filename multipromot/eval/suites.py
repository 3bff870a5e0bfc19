"""Evaluation suites: which unseen tasks to test in context, with how many shots, and how.

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

:func:`evaluate_suite` turns a suite into flat records, one per (task, shots): every k-shot
input of every task goes through **one** batched :func:`~multipromot.eval.generation.predict` call per
shots setting, so batches mix tasks and (with a router) prompted and bare rows, as at inference.
:func:`evaluate_finetuned` scores the fine-tuned tasks 0-shot with their own prompts.

Why one module of this size: suite files, k-shot items, routing and scoring of one suite
are one evaluation; the loader is ~150 lines of validation.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multipromot.data.collate import Collator
from multipromot.data.exemplars import build_item
from multipromot.data.metrics import item_values, postprocess, score, specialization_rate
from multipromot.data.tasks import check_inline_name, get_task, task_from_spec
from multipromot.errors import UserError
from multipromot.eval import generation
from multipromot.eval.samples import input_digest
from multipromot.features import kshot_text
from multipromot.yamlio import check_keys, read_yaml

__all__ = [
    "DEFAULT_SHOTS",
    "EVAL_MAX_INPUT_LENGTH",
    "SuiteTask",
    "EvalSuite",
    "load_suite",
    "build_items",
    "evaluate_suite",
    "evaluate_finetuned",
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
# Evaluation


def _resolve(task: Any) -> Any:
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

    positives = {t.name: texts(t) for t in map(_resolve, bank_tasks)}
    negatives = [text for t in map(_resolve, other_tasks) for text in texts(t)]
    return positives, negatives


def _route_rows(
    router: Any, items: list, prompt_rows: dict[str, int]
) -> tuple[list[int], list[str | None]]:
    """Route every k-shot input as the model will see it; map the chosen task to its row."""
    texts = [kshot_text(item) for item in items]
    routes = router.route(texts)
    rows, names = [], []
    for route in routes:
        if route.task is None:
            rows.append(-1)
        elif route.task in prompt_rows:
            rows.append(prompt_rows[route.task])
        else:
            # A router over a bigger bank than the model's prompt table: scoring this row bare
            # while reporting the prompt would be a silent lie, so stop here.
            raise ValueError(
                f"the router chose {route.task!r}, which has no row in the prompt table "
                f"{sorted(prompt_rows)}"
            )
        names.append(route.task)
    return rows, names


def _majority(names: list[str | None]) -> str | None:
    """The prompt most rows of a task got (None = no prompt); ties go to the first seen."""
    return Counter(names).most_common(1)[0][0] if names else None


def _record(
    task: Any,
    shots: int,
    items: list,
    outputs: list[str],
    names: list[str | None],
    *,
    random: float,
    specialization_answers: Sequence[str] | None,
    split: str,
    kept: list[int] | None = None,
) -> dict:
    """Score one task's outputs: a flat summary record, with every scored item under ``items``
    (written to samples.jsonl by :func:`multipromot.eval.samples.write_samples`)."""
    preds = [postprocess(text, task.postprocess) for text in outputs]
    golds = [item.gold for item in items]
    special = None
    specialized = [None] * len(items)
    if specialization_answers:
        # On the raw outputs: specialization_rate applies the paper's trimming and first-word
        # rule itself, whatever post-processing the evaluated task uses.
        special = specialization_rate(outputs, specialization_answers)
        specialized = [specialization_rate([o], specialization_answers) > 0 for o in outputs]
    values = item_values(task.metric, preds, golds) or [None] * len(items)
    scored = []
    for index, item in enumerate(items):
        scored.append(
            {
                "id": index,  # the item's index in its split (items are the split's first N)
                "input_sha256": input_digest(kshot_text(item)),
                "output": outputs[index],
                "prediction": preds[index],
                "references": golds[index],
                "prompt": names[index],
                "value": values[index],
                "specialized": specialized[index],
            }
        )
    return {
        "task": task.name,
        "shots": shots,
        "metric": task.metric,
        "score": score(task.metric, preds, golds),
        "n": len(items),
        "random": random,
        "specialization": special,
        "prompt": _majority(names),
        "prompted": 100.0 * sum(name is not None for name in names) / len(names),
        # Where the scored rows come from (a split held out from train says so).
        "split": task.split_origin(split) if hasattr(task, "split_origin") else split,
        # k-shot: the exemplars an input kept on average (the rest did not fit the budget)
        "exemplars_kept": sum(kept) / len(kept) if kept and shots else None,
        "items": scored,
    }


def _run(
    prompted: Any,
    tokenizer: Any,
    groups: list[tuple[Any, list, list[str | None]]],
    *,
    decoder_only: bool,
    num_beams: int,
    batch_size: int,
    max_new_tokens: int,
    max_input_length: int,
    progress: str | None = None,
) -> tuple[list[list[str]], list[list[int]]]:
    """One batched predict over all groups' items; returns the outputs split back per group,
    and per group the exemplars each item's prompt kept within ``max_input_length``."""
    collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=max_input_length,
        for_generation=True,
    )
    items = [item for _, group_items, _ in groups for item in group_items]
    outputs = generation.predict(
        prompted,
        tokenizer,
        items,
        collator,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    split_outputs, kept, start = [], [], 0
    for _, group_items, _ in groups:
        split_outputs.append(outputs[start : start + len(group_items)])
        kept.append(collator.exemplars_kept(group_items) if group_items else [])
        start += len(group_items)
    return split_outputs, kept


def _report(progress: str | None, record: dict) -> dict:
    """One line per scored (task, shots) when asked: the progress of a long evaluation."""
    if progress:
        print(
            f"{progress}: {record['task']} {record['shots']}-shot: {record['n']} items, "
            f"{record['metric']} {record['score']:.1f}"
        )
    return record


def evaluate_suite(
    prompted: Any,
    tokenizer: Any,
    suite: EvalSuite,
    *,
    decoder_only: bool,
    shots: Sequence[int] | None = None,
    examples: int | None = None,
    router: Any = None,
    prompt_rows: dict[str, int] | None = None,
    specialization_answers: list[str] | None = None,
    num_beams: int = 1,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_input_length: int = EVAL_MAX_INPUT_LENGTH,
    seed: int = 0,
    progress: str | None = None,
) -> list[dict]:
    """k-shot in-context evaluation of a suite's (unseen) tasks.

    Args:
        prompted: a :class:`~multipromot.soft_prompt.PromptedModel`.
        tokenizer: its tokenizer.
        suite: the suite.
        decoder_only: True for causal LMs (the collator's layout).
        shots: k-shot settings (default: the suite's).
        examples: items per task (default: the suite's).
        router: a :class:`~multipromot.router.Router`; each k-shot input is routed and gets the
            chosen task's prompt (``prompt_rows``), or none. Without a router no row is prompted.
        prompt_rows: bank task -> row of ``prompted``'s prompt table (default: the table's own
            ``task_names`` order).
        specialization_answers: the fine-tuned task's answer set (e.g. ``["True", "False"]``);
            each record then carries the share of its outputs that fall in it.
        num_beams: beam width (1 = greedy; the paper uses 4).
        batch_size: rows per generate call.
        max_new_tokens: generation budget per row.
        max_input_length: token budget of a k-shot input (exemplars are dropped first).
        seed: exemplar seed.
        progress: a label (the method); each scored (task, shots) then prints one line
            ``LABEL: TASK K-shot: N items, METRIC SCORE``, and a terminal shows a bar over
            the rows. None prints nothing.

    Returns:
        One record per (task, shots), tasks in suite order within each shots setting::

            {"task", "shots", "metric", "score" (0-100), "n" (items), "random" (0-100),
             "specialization" (0-100 or None), "prompt" (majority routed task or None),
             "prompted" (share of rows that got a prompt, 0-100), "split" (where the rows come from)}

    Raises:
        UserError: a task is unknown or its split is empty.
        ValueError: ``examples < 1`` or a negative shot count; the router chose a task that
            has no row in the prompt table.
    """
    shots = list(suite.shots if shots is None else shots)
    examples = suite.examples if examples is None else examples
    if examples < 1 or any(k < 0 for k in shots):
        raise ValueError(f"need examples >= 1 and shots >= 0, got {examples} and {shots}")
    if prompt_rows is None:
        prompt_rows = {name: i for i, name in enumerate(getattr(prompted, "task_names", []))}
    tasks = suite.resolved_tasks()
    random = suite.random_baselines
    records: list[dict] = []
    for k in shots:
        groups = []
        for task in tasks:
            items = build_items(task, k, examples=examples, split=suite.split, seed=seed)
            names: list[str | None] = [None] * len(items)
            if router is not None:
                rows, names = _route_rows(router, items, prompt_rows)
                for item, row in zip(items, rows, strict=True):
                    item.task_id = row
            groups.append((task, items, names))
        outputs, kept = _run(
            prompted,
            tokenizer,
            groups,
            decoder_only=decoder_only,
            num_beams=num_beams,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_input_length=max_input_length,
            progress=f"{progress} {k}-shot" if progress else None,
        )
        for (task, items, names), outs, fits in zip(groups, outputs, kept, strict=True):
            records.append(
                _report(
                    progress,
                    _record(
                        task,
                        k,
                        items,
                        outs,
                        names,
                        random=random[task.name],
                        specialization_answers=specialization_answers,
                        split=suite.split,
                        kept=fits,
                    ),
                )
            )
    return records


def evaluate_finetuned(
    prompted: Any,
    tokenizer: Any,
    tasks: Sequence[Any],
    prompt_rows: dict[str, int],
    *,
    decoder_only: bool,
    examples: int = 100,
    split: str = "test",
    router: Any = None,
    num_beams: int = 1,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_input_length: int = EVAL_MAX_INPUT_LENGTH,
    progress: str | None = None,
) -> list[dict]:
    """Zero-shot scores of the fine-tuned tasks, each with its own prompt.

    Args:
        prompted: a :class:`~multipromot.soft_prompt.PromptedModel`.
        tokenizer: its tokenizer.
        tasks: tasks or catalogue names.
        prompt_rows: task -> row of the prompt table; a task not in it is scored bare
            (standard fine-tuning, the pretrained model).
        decoder_only: True for causal LMs.
        examples: items per task.
        split: the split the items come from.
        router: if given, each input is routed instead (measures the router end to end).
        num_beams: beam width.
        batch_size: rows per generate call.
        max_new_tokens: generation budget per row.
        max_input_length: token budget of an input.
        progress: a label; one line per scored task (see :func:`evaluate_suite`).

    Returns:
        One record per task, in order, with the fields of :func:`evaluate_suite`, ``shots`` 0,
        ``random`` 0 and ``specialization`` None.
    """
    groups = []
    for task in map(_resolve, tasks):
        items = build_items(task, 0, examples=examples, split=split, seed=0)
        if router is not None:
            rows, names = _route_rows(router, items, prompt_rows)
        else:
            row = prompt_rows.get(task.name, -1)
            rows = [row] * len(items)
            names = [task.name if row >= 0 else None] * len(items)
        for item, row in zip(items, rows, strict=True):
            item.task_id = row
        groups.append((task, items, names))
    outputs, _ = _run(
        prompted,
        tokenizer,
        groups,
        decoder_only=decoder_only,
        num_beams=num_beams,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_input_length=max_input_length,
        progress=f"{progress} 0-shot" if progress else None,
    )
    records = []
    for (task, items, names), outs in zip(groups, outputs, strict=True):
        record = _record(
            task, 0, items, outs, names, random=0.0, specialization_answers=None, split=split
        )
        # the best stage-1 prompt and stage-2 step are picked on validation: the report says
        # so when these scores come from the same rows
        if hasattr(task, "shares_rows"):
            record["selected_on_scored_split"] = task.shares_rows(split, "validation")
        records.append(_report(progress, record))
    return records
