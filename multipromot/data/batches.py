"""From sampler draws to model batches: the one batch builder of both training stages.

Draws become :class:`~multipromot.features.Item` rows through
:func:`~multipromot.data.exemplars.build_item` (the one item builder), optionally reordered to
cut padding, and the collator turns each chunk into tensors. Reordering only moves rows inside
the draws given; which rows are trained on, and each task's rate, stay the sampler's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from multipromot.data.exemplars import build_item
from multipromot.data.sampler import Draw
from multipromot.features import Item, item_chars

__all__ = ["ORDERS", "group_by_length", "batches_from_draws"]

# drawn: rows in sampler order; length: sorted by length; task: by task, then length.
ORDERS = ("drawn", "length", "task")


def group_by_length(
    items: Sequence[Item],
    batch_size: int,
    *,
    window: int | None = None,
    key: Callable[[Item], Any] = item_chars,
) -> list[list[Item]]:
    """Batches of similar length, to cut padding without giving up the mixture's randomness.

    Items are taken in their drawn order, ``window`` at a time; each window is sorted by
    ``key`` (longest first, stable, so the result is deterministic and the largest batch of a
    window comes first, where an out-of-memory shows at once) and cut into batches. The rate
    of each task is unchanged; only the order inside a window moves.

    Args:
        items: items in sampler order.
        batch_size: items per batch.
        window: items per sorting window; rounded down to a multiple of ``batch_size``;
            defaults to ``32 * batch_size``.
        key: length proxy; defaults to the number of characters (no second tokenization).

    Returns:
        The batches; only the last one may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window = 32 * batch_size if window is None else window
    window = max(window // batch_size, 1) * batch_size
    out: list[list[Item]] = []
    for start in range(0, len(items), window):
        chunk = sorted(items[start : start + window], key=key, reverse=True)
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return out


def batches_from_draws(
    tasks: Sequence[Any],
    draws: Sequence[Draw],
    collator: Callable[[list[Item]], dict],
    *,
    batch_size: int,
    shots: int | Sequence[int] = 0,
    seed: int = 0,
    task_ids: Sequence[int] | None = None,
    split: str = "train",
    order: str = "drawn",
) -> list[dict]:
    """Collated batches of ``batch_size`` rows made from ``draws``.

    Args:
        tasks: the mixture's tasks (``draw.task_index`` indexes them).
        draws: sampler draws, in stream order.
        collator: turns a list of items into tensors.
        batch_size: rows per batch (the last may be short).
        shots: exemplars per row, or per task (a stage-2 stream's replay tasks have their own
            number).
        seed: the exemplar seed.
        task_ids: the prompt-table row of each task (default: its index); -1 trains that task
            without a prompt.
        split: the split the draws point into.
        order: ``drawn`` keeps the stream order; ``length`` sorts the rows by length (the loss
            is a token sum, so a step's result holds); ``task`` sorts by task, then length, so
            that a batch holds one task (stage 1: a frozen model's prompt gets its gradient
            from its own rows whatever shares the batch).

    Returns:
        The collated batches.
    """
    rows = list(range(len(tasks))) if task_ids is None else task_ids
    per_task = [shots] * len(tasks) if isinstance(shots, int) else list(shots)
    items = [
        build_item(
            tasks[d.task_index],
            d.example_index,
            split=split,
            shots=per_task[d.task_index],
            seed=seed,
            task_id=rows[d.task_index],
        )
        for d in draws
    ]
    if order == "task":
        chunks = group_by_length(
            items, batch_size, window=len(items), key=lambda it: (it.task_id, item_chars(it))
        )
    elif order == "length":
        chunks = group_by_length(items, batch_size, window=len(items))
    elif order == "drawn":
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    else:
        raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")
    return [collator(chunk) for chunk in chunks]
