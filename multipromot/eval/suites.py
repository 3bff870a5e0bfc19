"""Evaluating a suite: the unseen tasks k-shot, the fine-tuned tasks 0-shot, scored.

The suite file (its format, :func:`~multipromot.eval.suite_file.load_suite`, the k-shot items)
is :mod:`multipromot.eval.suite_file`; its names are re-exported here.

:func:`evaluate_suite` turns a suite into flat records, one per (task, shots): every k-shot
input of every task goes through **one** batched :func:`~multipromot.eval.generation.predict` call per
shots setting, so batches mix tasks and (with a router) prompted and bare rows, as at inference.
:func:`evaluate_finetuned` scores the fine-tuned tasks 0-shot with their own prompts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from multipromot.data.collate import Collator
from multipromot.data.metrics import (
    first_line,
    item_values,
    postprocess,
    score,
    specialization_rate,
)
from multipromot.eval import generation
from multipromot.eval.samples import input_digest
from multipromot.eval.specialization import copies_input, in_language
from multipromot.eval.suite_file import (
    DEFAULT_SHOTS,
    EVAL_MAX_INPUT_LENGTH,
    EvalSuite,
    SuiteTask,
    build_items,
    load_suite,
    resolve_task,
    routing_sets,
)
from multipromot.features import kshot_text

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
    language: frozenset[str] | None = None,
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
    answers = [first_line(text) for text in outputs]  # before the model opens another example
    copies = [copies_input(answer, item.input) for answer, item in zip(answers, items, strict=True)]
    in_target_language = [None] * len(items)
    if language:
        in_target_language = [in_language(answer, language) for answer in answers]
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
                "target_language": in_target_language[index],
                "input_copy": copies[index],
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
        "target_language": _share(in_target_language),
        "input_copy": _share(copies),
        "prompt": _majority(names),
        "prompted": 100.0 * sum(name is not None for name in names) / len(names),
        # Where the scored rows come from (a split held out from train says so).
        "split": task.split_origin(split) if hasattr(task, "split_origin") else split,
        # k-shot: the exemplars an input kept on average (the rest did not fit the budget)
        "exemplars_kept": sum(kept) / len(kept) if kept and shots else None,
        "items": scored,
    }


def _share(flags: list[bool | None]) -> float | None:
    """The percentage of True flags; None when not measured (or no items)."""
    if not flags or flags[0] is None:
        return None
    return 100.0 * sum(flags) / len(flags)


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
    language: frozenset[str] | None = None,
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
        language: the fine-tuned generation tasks' output words
            (:func:`multipromot.eval.specialization.language_words`); each record then carries
            the share of its outputs in that language (``target_language``). Every record
            carries the share of outputs that repeat their input (``input_copy``).
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
             "specialization" (0-100 or None), "target_language" (0-100 or None),
             "input_copy" (0-100), "prompt" (majority routed task or None),
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
                        language=language,
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
    shots: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Scores of the fine-tuned tasks, each with its own prompt, with the exemplars the model
    was fine-tuned with (``shots``, 0 by default).

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
        One record per task, in order, with the fields of :func:`evaluate_suite`, ``shots``
        as given, ``random`` 0 and ``specialization`` None.
    """
    groups = []
    for task in map(resolve_task, tasks):
        items = build_items(task, shots, examples=examples, split=split, seed=seed)
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
        progress=f"{progress} {shots}-shot" if progress else None,
    )
    records = []
    for (task, items, names), outs in zip(groups, outputs, strict=True):
        record = _record(
            task, shots, items, outs, names, random=0.0, specialization_answers=None, split=split
        )
        # the best stage-1 prompt and stage-2 step are picked on validation: the report says
        # so when these scores come from the same rows
        if hasattr(task, "shares_rows"):
            record["selected_on_scored_split"] = task.shares_rows(split, "validation")
        records.append(_report(progress, record))
    return records
