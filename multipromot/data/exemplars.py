"""k-shot rows: which training examples of the same task go in front of an input, and the one
builder of :class:`~multipromot.features.Item` rows that training, evaluation, ``mixture
sample`` and the lab all use.

Exemplars always come from the task's ``train`` split
(:data:`~multipromot.features.EXEMPLAR_SPLIT`) and are a pure function of
``(seed, task name, split, example index)``: the same example gets the same exemplars in every
epoch, on every rank, after a resume and for every method evaluated, and a training example
never sees itself. How a row is laid out as a string is defined in :mod:`multipromot.features`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from multipromot.data.sampler import task_size
from multipromot.features import EXEMPLAR_SPLIT, TARGET_DELIMITER, Item, kshot_text

__all__ = ["choose_exemplars", "render_exemplar", "build_item", "kshot_inputs", "shots_kept"]


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def choose_exemplars(
    task: Any, example_index: int, k: int, seed: int, split: str = "train"
) -> list[int]:
    """Indices into ``task``'s train split to use as exemplars for one example.

    Args:
        task: the example's task (``.name``, ``.examples(split)``).
        example_index: index of the example in ``split``.
        k: number of exemplars wanted; clipped to what the train split can give (its size, or
            its size - 1 when the example itself is a training example).
        seed: non-negative exemplar seed (the mixture's ``exemplars.seed``).
        split: the split ``example_index`` points into.

    Returns:
        Distinct train indices, in the order they go in front of the input; never
        ``example_index`` itself when ``split == "train"``.
    """
    if k <= 0:
        return []
    n = task_size(task, EXEMPLAR_SPLIT)
    exclude_self = split == EXEMPLAR_SPLIT
    pool = n - 1 if exclude_self else n
    k = min(k, pool)
    if k <= 0:
        return []
    rng = np.random.default_rng([int(seed), _key(task.name), _key(split), int(example_index)])
    # Draw from a pool without the example, then shift indices past it: no rejection loop.
    picks = rng.choice(pool, size=k, replace=False)
    if exclude_self:
        picks = picks + (picks >= example_index)
    return [int(i) for i in picks]


def render_exemplar(task: Any, example: dict) -> str:
    """One exemplar as the model sees it: ``input + TARGET_DELIMITER + target``."""
    source, target = task.render(example)
    return f"{source}{TARGET_DELIMITER}{target}"


def build_item(
    task: Any,
    index: int,
    *,
    split: str = "train",
    shots: int = 0,
    seed: int = 0,
    task_id: int = -1,
    exemplar_indices: Sequence[int] | None = None,
) -> Item:
    """The row for example ``index`` of ``task``'s ``split``, with ``shots`` exemplars.

    Args:
        task: the task (``.name``, ``.examples(split)``, ``.render(example)`` and
            ``.reference_list(example)``, the acceptable answers to score against).
        index: the example's index in ``split``.
        split: the split ``index`` points into.
        shots: exemplars in front of the input (same task, train split, never the row itself).
        seed: the exemplar seed.
        task_id: the prompt-table row the row gets (-1 = no prompt).
        exemplar_indices: these train rows as the exemplars instead of a seeded choice
            (``shots`` and ``seed`` are then not used): SDFT's rewrite prompt shows an example
            itself as its one demonstration (``[index]``), the one place a row sees itself.

    Returns:
        The :class:`~multipromot.features.Item`.
    """
    example = task.examples(split)[index]
    source, target = task.render(example)
    if exemplar_indices is not None:
        picks = [int(i) for i in exemplar_indices]
    else:
        picks = choose_exemplars(task, index, shots, seed, split)
    train = task.examples(EXEMPLAR_SPLIT) if picks else []
    exemplars = [render_exemplar(task, train[i]) for i in picks]
    # Tasks that name several acceptable answers give them for scoring ([]: only the target).
    references = task.reference_list(example)
    return Item(task_id, source, target, exemplars, references)


def kshot_inputs(
    task: Any, *, split: str, examples: int, shots: Sequence[int] = (0,), seed: int = 0
) -> list[str]:
    """The full input strings (exemplars first) of the first ``examples`` rows of ``split``, once
    per shots setting: what a router sees of a task at inference time.

    Args:
        task: the task.
        split: the split the rows come from.
        examples: rows per shots setting (fewer if the split is smaller).
        shots: the k-shot settings.
        seed: the exemplar seed.

    Returns:
        ``len(shots) * min(examples, split size)`` strings.
    """
    count = min(examples, len(task.examples(split)))
    return [
        kshot_text(build_item(task, i, split=split, shots=k, seed=seed))
        for k in shots
        for i in range(count)
    ]


def shots_kept(
    task: Any,
    collator: Any,
    shots: int,
    *,
    split: str = "train",
    seed: int = 0,
    examples: int = 16,
) -> float:
    """The mean number of exemplars a ``shots``-shot input of ``task`` keeps once tokenized:
    the collator drops whole exemplars that do not fit its ``max_input_length``.

    Args:
        task: the task.
        collator: a :class:`~multipromot.data.collate.Collator` (its budget and tokenizer).
        shots: exemplars asked per input.
        split: the split the inputs come from.
        seed: the exemplar seed.
        examples: inputs measured (the split's first ones).

    Returns:
        The mean over the measured inputs (``shots`` when all fit; 0 for 0-shot).
    """
    count = min(examples, len(task.examples(split)))
    if shots <= 0 or count == 0:
        return float(max(shots, 0))
    items = [build_item(task, i, split=split, shots=shots, seed=seed) for i in range(count)]
    kept = collator.exemplars_kept(items)
    return sum(kept) / len(kept)
