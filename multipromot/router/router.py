"""Router: which bank prompt (or none) to prepend to each input.

ProMoT prepends a task's soft prompt only to inputs in that task's format and feeds every other
input to the fine-tuned model bare (paper, arXiv 2211.00635, Sec. 4, "Evaluation"). The router
makes that call per input, in a fixed order of small strategies (each a :class:`RouteStrategy`);
the first one that decides wins:

1. :class:`ExplicitTask`: the caller named the task.
2. :class:`SignatureMatch`: the input is written in a bank task's template. Each task carries a
   ``templates.FormatSignature`` (the template's literal pieces, in order, and its answers).
   A k-shot prompt is ``exemplar SEP ... SEP input``; the signature must match the final input
   *and* every exemplar (an exemplar ends with one of the task's answers when it has some). A
   prompt whose final input is a bank task's but whose exemplars show another format is routed
   to none: its exemplars ask for a different output format than the prompt was tuned on.
3. :class:`SimilarityFallback`: for bank tasks without a signature (by default), character n-gram
   TF-IDF similarity to the task's example inputs, with a per-task abstain threshold calibrated
   on those examples against inputs of other formats. Every part of a k-shot prompt (each
   exemplar and the final input) must look like the task.

An input no strategy claims gets no prompt (``task=None``). Routing is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from multipromot.data.exemplars import kshot_inputs
from multipromot.errors import UserError
from multipromot.features import SEPARATOR
from multipromot.router.base import (
    ExplicitTask,
    Route,
    RouterEntry,
    RouteStrategy,
)
from multipromot.router.signature import SignatureMatch
from multipromot.router.similarity import SimilarityFallback

__all__ = ["Router", "router_entries", "calibrated_router", "evaluate_routing"]


class Router:
    """Decide per input which bank prompt to prepend, or none.

    Args:
        entries: the bank tasks with their signatures and example inputs.
        negatives: inputs of other formats, to calibrate the similarity fallback's thresholds.
        separator: the exemplar separator of k-shot prompts (``exemplars.SEPARATOR``).
        similarity_for_signed_tasks: let the similarity fallback choose tasks that have a
            signature too (default: only tasks without one).
        strategies: replace the default chain (explicit, signature, similarity); each is a
            :class:`RouteStrategy`, tried in order.

    Raises:
        UserError: two entries share a task name.

    Example:
        >>> router = Router.from_bank(PromptBank("prompt_bank"))
        >>> [r.task for r in router.route(texts)]        # "rte", "wmt14_en_fr" or None
    """

    def __init__(
        self,
        entries: Sequence[RouterEntry],
        negatives: Sequence[str] = (),
        *,
        separator: str = SEPARATOR,
        similarity_for_signed_tasks: bool = False,
        strategies: Sequence[RouteStrategy] | None = None,
    ):
        names = [e.task for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError("router entries must name each task once", key=", ".join(dupes))
        self.entries = list(entries)
        self.separator = separator
        if strategies is None:
            strategies = [
                ExplicitTask(names),
                SignatureMatch(self.entries, separator),
                SimilarityFallback(
                    self.entries, negatives, separator, signed_tasks=similarity_for_signed_tasks
                ),
            ]
        self.strategies = list(strategies)

    @property
    def tasks(self) -> list[str]:
        """The bank tasks this router can choose."""
        return [e.task for e in self.entries]

    @classmethod
    def from_bank(
        cls,
        bank: Any,
        *,
        refs: Mapping[str, str] | None = None,
        examples: Mapping[str, Sequence[str]] | None = None,
        negatives: Sequence[str] = (),
        **kwargs: Any,
    ) -> Router:
        """A router over the current entry of every task in a prompt bank, or over given entries.

        Args:
            bank: a :class:`~multipromot.bank.PromptBank` (anything whose ``entries()`` and
                ``get(ref)`` give :class:`~multipromot.bank.BankEntry` records).
            refs: ``{task: bank ref}``: route among exactly these entries (e.g. the versions a
                stage-2 model was trained with); default: every task's current entry.
            examples: ``{task: validation inputs}``; enables the similarity fallback for those
                tasks and tells the signature match whether a template starts or ends with
                literal text.
            negatives: inputs of other formats, for the similarity thresholds.
            **kwargs: passed on to :class:`Router`.

        Returns:
            The router.

        Raises:
            BankError: an entry's ``format.signature`` is malformed.
        """
        examples = examples or {}
        entries = [
            RouterEntry(e.task, e.signature, list(examples.get(e.task, ())))
            for e in router_entries(bank, refs)
        ]
        return cls(entries, negatives, **kwargs)

    def route(self, texts: Sequence[str], tasks: Sequence[str | None] | None = None) -> list[Route]:
        """Route a batch of inputs.

        Args:
            texts: the model inputs (0-shot or k-shot prompts).
            tasks: optional per-input task names; None (or a None item) lets the router decide.

        Returns:
            One :class:`Route` per input, in order.

        Raises:
            UserError: ``tasks`` has a different length, or names a task not in the bank.
        """
        texts = list(texts)
        requested = list(tasks) if tasks is not None else [None] * len(texts)
        if len(requested) != len(texts):
            raise UserError(f"{len(texts)} inputs but {len(requested)} tasks", key="tasks")
        routes: list[Route | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        for strategy in self.strategies:
            if not pending:
                break
            decided = strategy.decide([texts[i] for i in pending], [requested[i] for i in pending])
            for i, route in zip(pending, decided, strict=True):
                routes[i] = route
            pending = [i for i in pending if routes[i] is None]
        for i in pending:
            routes[i] = Route(None, "no format matched", 0.0)
        return [r for r in routes if r is not None]


def router_entries(bank: Any, refs: Mapping[str, str] | None = None) -> list[RouterEntry]:
    """The bank tasks a router chooses among, with the signature of each entry's format.

    Args:
        bank: a :class:`~multipromot.bank.PromptBank` (anything whose ``entries()`` and
            ``get(ref)`` give :class:`~multipromot.bank.BankEntry` records).
        refs: ``{task: bank ref}``: exactly these entries (e.g. the versions a stage-2 model
            was trained with); default: every task's current entry.

    Raises:
        BankError: an entry's ``format.signature`` is malformed.
    """
    if refs is not None:
        chosen = [bank.get(ref) for ref in refs.values()]
    else:
        chosen = [entry for entry in bank.entries() if entry.current]
    return [RouterEntry(entry.task, entry.signature) for entry in chosen]


def calibrated_router(
    entries: Sequence[RouterEntry],
    tasks: Sequence[Any],
    *,
    negatives: Sequence[Any] = (),
    examples: int = 50,
    shots: Sequence[int] = (0, 1),
    split: str = "validation",
    seed: int = 0,
) -> Router:
    """The router ``run``, ``eval`` and ``route`` use: signature match, then the similarity
    fallback calibrated for the tasks that have no signature.

    A task with a signature is decided by its template alone (the fallback leaves it out), so
    only signature-less tasks get example inputs: their own ``split`` inputs (0- and k-shot)
    against the other-format inputs of ``negatives``.

    Args:
        entries: the tasks to route among (:func:`router_entries` of a bank's prompts, or a
            method's own tasks and their template signatures).
        tasks: the Task objects of those tasks (by ``.name``); an entry missing here is routed
            by its signature only.
        negatives: tasks of other formats (their ``train`` inputs calibrate the thresholds,
            never rows that are scored).
        examples: inputs per task and shots setting.
        shots: the k-shot settings rendered.
        split: the split of the tasks' own inputs.
        seed: the exemplar seed.

    Returns:
        The router.
    """
    by_name = {t.name: t for t in tasks}
    unsigned = [e.task for e in entries if e.signature is None and e.task in by_name]
    if not unsigned:
        return Router(entries)
    own = {
        name: kshot_inputs(by_name[name], split=split, examples=examples, shots=shots, seed=seed)
        for name in unsigned
    }
    others = [
        text
        for task in negatives
        if task.name not in by_name
        for text in kshot_inputs(task, split="train", examples=examples, shots=shots, seed=seed)
    ]
    with_examples = [RouterEntry(e.task, e.signature, list(own.get(e.task, ()))) for e in entries]
    return Router(with_examples, others)


def evaluate_routing(
    router: Router, positives: Mapping[str, Sequence[str]], negatives: Sequence[str]
) -> dict:
    """How well a router sends bank-task inputs to their task and other inputs to none.

    Args:
        router: the router to measure.
        positives: ``{task: held-out inputs of that task}`` (0-shot or k-shot of that task).
        negatives: inputs of other formats, k-shot prompts of other tasks included.

    Returns:
        ``{"positive_rate", "negative_rate", "per_task", "n_positives", "n_negatives",
        "mistakes"}``: percentages (0-100) of positives routed to their own task, of negatives
        routed to none, and per task; the counts; and up to 20 misrouted inputs with their
        expected task and the route taken.
    """
    texts = [t for inputs in positives.values() for t in inputs] + list(negatives)
    expected = [task for task, inputs in positives.items() for _ in inputs]
    expected += [None] * len(negatives)
    routes = router.route(texts)
    hit = [r.task == e for r, e in zip(routes, expected, strict=True)]
    n_pos = len(texts) - len(negatives)

    def pct(flags: list[bool]) -> float:
        return 100.0 * sum(flags) / len(flags) if flags else math.nan

    per_task = {
        task: pct([h for h, e in zip(hit, expected, strict=True) if e == task])
        for task in positives
    }
    mistakes = [
        {"expected": e, **r.to_json(t)}
        for t, r, e, h in zip(texts, routes, expected, hit, strict=True)
        if not h
    ][:20]
    return {
        "positive_rate": pct(hit[:n_pos]),
        "negative_rate": pct(hit[n_pos:]),
        "per_task": per_task,
        "n_positives": n_pos,
        "n_negatives": len(negatives),
        "mistakes": mistakes,
    }
