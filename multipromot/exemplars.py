"""k-shot exemplars: which training examples of the same task go in front of an input.

A k-shot input is ``exemplar_1 SEP ... SEP exemplar_k SEP input`` where each exemplar is
rendered ``input + TARGET_DELIMITER + target`` by the task's own template and ``SEP`` is
:data:`SEPARATOR`.

Why ``"\\n\\n"``: it is the usual few-shot delimiter (GPT-3, lm-eval-harness), and byte-level
and BPE tokenizers (ByT5, GPT-2, the lab model) keep it as a visible boundary. Sentencepiece
tokenizers of the T5 family normalise whitespace and turn it into a single space; the paper's
templates carry their own cues ("question:", "answer:") so the exemplar boundary stays
readable there too, and nothing else is needed from the tokenizer.

Exemplars always come from the task's ``train`` split and are a pure function of
``(seed, task name, split, example index)``: the same example gets the same exemplars in every
epoch, on every rank and after a resume, and a training example never sees itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from multipromot.collate import Item
from multipromot.sampler import Draw, task_size

if TYPE_CHECKING:
    from multipromot.mixtures import Mixture

__all__ = [
    "SEPARATOR",
    "TARGET_DELIMITER",
    "EXEMPLAR_SPLIT",
    "choose_exemplars",
    "render_exemplar",
    "kshot_input",
    "make_item",
]

SEPARATOR = "\n\n"
TARGET_DELIMITER = " "
EXEMPLAR_SPLIT = "train"


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
    """One exemplar as the model sees it: ``input + TARGET_DELIMITER + target``.

    Args:
        task: the task whose template renders the example.
        example: a raw example dict of that task.

    Returns:
        The rendered exemplar string.
    """
    source, target = task.render(example)
    return f"{source}{TARGET_DELIMITER}{target}"


def kshot_input(task: Any, example: dict, exemplar_examples: Sequence[dict]) -> str:
    """The full k-shot input string: exemplars joined by :data:`SEPARATOR`, then the input.

    Args:
        task: the task of ``example`` and of the exemplars.
        example: the raw example to answer.
        exemplar_examples: raw train examples to show first (may be empty).

    Returns:
        The input string as the collator joins it (before truncation).
    """
    parts = [render_exemplar(task, e) for e in exemplar_examples]
    parts.append(task.render(example)[0])
    return SEPARATOR.join(parts)


def make_item(
    mixture: Mixture,
    draw: Draw,
    *,
    split: str = "train",
    shots: int | None = None,
    seed: int | None = None,
    task_id: int | None = None,
) -> Item:
    """The collator's input for one draw: rendered input, target and exemplar strings.

    Args:
        mixture: the mixture the draw came from.
        draw: a sampler draw.
        split: the split the draw points into.
        shots: number of exemplars; defaults to ``mixture.shots``.
        seed: exemplar seed; defaults to ``mixture.exemplar_seed``.
        task_id: prompt-table row; defaults to ``draw.task_index`` (-1 means no prompt).

    Returns:
        An :class:`~multipromot.collate.Item`.
    """
    task = mixture.tasks[draw.task_index]
    example = task.examples(split)[draw.example_index]
    source, target = task.render(example)
    shots = mixture.shots if shots is None else shots
    seed = mixture.exemplar_seed if seed is None else seed
    indices = choose_exemplars(task, draw.example_index, shots, seed, split)
    train = task.examples(EXEMPLAR_SPLIT) if indices else []
    return Item(
        task_id=draw.task_index if task_id is None else task_id,
        input=source,
        target=target,
        exemplars=[render_exemplar(task, train[i]) for i in indices],
    )
