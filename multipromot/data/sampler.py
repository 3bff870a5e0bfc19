"""Deterministic, resumable, rank-sharded sampling from a mixture of tasks.

The sampler defines one *global stream* of draws, position 0, 1, 2, ..., that depends only on
the mixture (its task names, rates and split sizes), the seed and the split. Rank ``r`` of
``W`` yields positions ``r, r + W, r + 2W, ...``, so the ranks together see exactly the
one-process stream, with no overlap and no communication.

How a position becomes a draw:

* **Which task.** Positions come in blocks of :data:`BLOCK` positions. Block ``b`` draws one
  uniform number per position from a generator seeded by ``(seed, b)`` and maps it through the
  cumulative rates. Blocks make the choice fast (numpy, not a Python loop) and let a resume
  regenerate one block instead of replaying the stream.
* **Which example.** Each task keeps a count of how often it was chosen so far in the global
  stream. Its ``k``-th draw is ``perm_e[k % n]`` with ``e = k // n`` and ``perm_e`` a fresh
  permutation of its ``n`` examples for epoch ``e``, drawn from a generator seeded by
  ``(seed, task name, split, e // G)`` (a small task shuffles ``G = 4096 // n`` epochs in one
  vectorised call): without replacement inside an epoch, and a new order every epoch.

Every rank computes the task choices of all positions (cheap: one vector per block) so that the
per-task counts agree across ranks; only the permutation lookups are restricted to the rank's
own positions. The state is the next global position and the per-task counts there: plain ints
that serialise to JSON and resume the exact stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from multipromot.errors import UserError

__all__ = ["BLOCK", "Draw", "MixtureSampler", "task_size"]

# Part of the stream's definition: changing it changes every stream, so the state records it.
BLOCK = 8192
_STATE_VERSION = 1
# Domain tags keep the task-choice and the permutation generators apart for the same seed.
_CHOICE_STREAM = 0
_PERM_STREAM = 1
_PERM_GROUP_ITEMS = 4096


class Draw(NamedTuple):
    """One position of the stream: a task (index into ``mixture.tasks``) and an example."""

    task_index: int
    example_index: int


class _TaskLike(Protocol):
    name: str

    def examples(self, split: str) -> Sequence[dict]: ...


class _MixtureLike(Protocol):
    """What the sampler reads of a :class:`~multipromot.data.mixtures.Mixture` (which imports
    this module, so it is not imported here)."""

    tasks: Sequence[_TaskLike]
    rates: Sequence[float]


def task_size(task: _TaskLike, split: str) -> int:
    """Number of examples of ``task`` in ``split`` (``num_examples`` when the task has it).

    Args:
        task: a :class:`~multipromot.data.tasks.Task` or anything with ``.examples(split)``.
        split: split name.

    Returns:
        The number of examples.
    """
    counter = getattr(task, "num_examples", None)
    if callable(counter):
        return int(counter(split))
    return len(task.examples(split))


def _name_key(text: str) -> int:
    # A stable 32-bit key (Python's hash() is salted per process).
    return zlib.crc32(text.encode("utf-8"))


class MixtureSampler:
    """An infinite iterator of :class:`Draw` following the mixture's rates.

    Args:
        mixture: a :class:`~multipromot.data.mixtures.Mixture` (``.tasks``, ``.rates``).
        seed: non-negative seed; the same seed gives the same stream.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of processes that share the stream.
        split: which split of every task to sample.

    Raises:
        UserError: a negative seed, a task with a positive rate but no examples in ``split``.
        ValueError: a rank outside ``[0, world_size)``.
    """

    def __init__(
        self,
        mixture: _MixtureLike,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        if int(seed) < 0:
            raise UserError(f"the seed must be >= 0, got {seed}", key="seed")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.mixture = mixture
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.split = split
        self.task_names = [t.name for t in mixture.tasks]
        rates = np.asarray(mixture.rates, dtype=np.float64)
        self.rates = (rates / rates.sum()).tolist()
        self.sizes = [
            task_size(t, split) if r > 0 else 0 for t, r in zip(mixture.tasks, rates, strict=True)
        ]
        for name, size, rate in zip(self.task_names, self.sizes, rates, strict=True):
            if rate > 0 and size == 0:
                raise UserError(
                    f"task {name!r} has rate {rate:.4g} but no {split!r} examples", key=name
                )
        self._cdf = np.cumsum(rates / rates.sum())
        # Rounding can leave the sum just below 1: close the gap at the last task with a
        # positive rate, so that trailing zero-rate tasks can never be drawn.
        self._cdf[int(np.flatnonzero(rates > 0)[-1]) :] = 1.0
        self._task_keys = [_name_key(n) for n in self.task_names]
        self._split_key = _name_key(split)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        # Counts are known at position 0 (all zero); the cursor then skips to our first position.
        self._seek(position=0, counts=[0] * len(self.task_names))

    # -- stream ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Draw]:
        return self

    def __next__(self) -> Draw:
        self._fill()
        draw = self._draws[self._cursor]
        self._cursor += 1
        return draw

    def take(self, n: int) -> list[Draw]:
        """The next ``n`` draws of this rank, as a list (faster than ``n`` calls to next)."""
        out: list[Draw] = []
        while len(out) < n:
            self._fill()
            chunk = self._draws[self._cursor : self._cursor + n - len(out)]
            out.extend(chunk)
            self._cursor += len(chunk)
        return out

    @property
    def position(self) -> int:
        """Global stream position of the next draw this rank yields."""
        self._fill()
        return self._block * BLOCK + int(self._offsets[self._cursor])

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The exact position in the stream, as JSON-serialisable plain values.

        Returns:
            ``{"version", "seed", "rank", "world_size", "split", "block", "tasks", "sizes",
            "rates", "position", "counts"}``; ``counts[i]`` is how often task ``i`` was drawn
            before ``position``.
        """
        position = self.position
        consumed = position - self._block * BLOCK
        counts = self._block_counts + np.bincount(
            self._choices[:consumed], minlength=len(self.task_names)
        )
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "split": self.split,
            "block": BLOCK,
            "tasks": list(self.task_names),
            "sizes": [int(n) for n in self.sizes],
            "rates": [float(r) for r in self.rates],
            "position": int(position),
            "counts": [int(c) for c in counts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken.

        Args:
            state: a dict from :meth:`state_dict` (possibly through JSON).

        Raises:
            UserError: the state belongs to a different seed, rank layout, split, or mixture
                (task names, split sizes or rates differ).
        """
        expected = {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "split": self.split,
            "block": BLOCK,
            "tasks": list(self.task_names),
            "sizes": [int(n) for n in self.sizes],
            "rates": [float(r) for r in self.rates],
        }
        # Everything that defines the stream must match, or "exact resume" would be a lie.
        for key, value in expected.items():
            if state.get(key) != value:
                raise UserError(
                    f"cannot resume: the saved sampler has {key}={state.get(key)!r}, "
                    f"this run has {value!r}",
                    key=f"sampler.{key}",
                )
        position = int(state["position"])
        if position % self.world_size != self.rank:
            raise UserError(f"position {position} is not rank {self.rank}'s", key="sampler")
        self._seek(position=position, counts=[int(c) for c in state["counts"]])

    # -- internals ------------------------------------------------------------------------------

    def _seek(self, *, position: int, counts: list[int]) -> None:
        """Regenerate the block holding ``position`` (``counts`` = the per-task counts there)
        and point the cursor at this rank's first position at or after it."""
        block = position // BLOCK
        choices = self._block_choices(block)
        before = np.bincount(choices[: position - block * BLOCK], minlength=len(counts))
        self._block = block - 1
        self._block_counts = np.asarray(counts, dtype=np.int64) - before
        self._choices = np.zeros(0, dtype=np.int64)
        self._draws = []
        self._offsets = np.zeros(0, dtype=np.int64)
        self._cursor = 0
        # _next_block advances counts by the previous block's choices: none here.
        self._next_block(counts_at_start=self._block_counts)
        self._cursor = int(np.searchsorted(self._offsets, position - block * BLOCK))

    def _fill(self) -> None:
        # A loop, not an if: with world_size > BLOCK a block can hold none of this rank's draws.
        while self._cursor >= len(self._draws):
            self._next_block()

    def _first_own_position(self, start: int) -> int:
        return start + (self.rank - start) % self.world_size

    def _block_choices(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _CHOICE_STREAM, block])
        choices = np.searchsorted(self._cdf, rng.random(BLOCK), side="right")
        return np.minimum(choices, len(self._cdf) - 1)

    def _next_block(self, counts_at_start: np.ndarray | None = None) -> None:
        if counts_at_start is None:
            counts_at_start = self._block_counts + np.bincount(
                self._choices, minlength=len(self.task_names)
            )
        self._block += 1
        self._block_counts = counts_at_start
        self._choices = self._block_choices(self._block)
        start = self._block * BLOCK
        offsets = np.arange(self._first_own_position(start) - start, BLOCK, self.world_size)
        tasks = self._choices[offsets]
        # k-th occurrence of each task in the block, at every position (stable group ranks).
        order = np.argsort(self._choices, kind="stable")
        group_start = np.searchsorted(self._choices[order], np.arange(len(self.task_names)))
        occurrence = np.empty(BLOCK, dtype=np.int64)
        occurrence[order] = np.arange(BLOCK) - group_start[self._choices[order]]
        draw_counts = counts_at_start[tasks] + occurrence[offsets]
        examples = np.empty(len(offsets), dtype=np.int64)
        for t in np.unique(tasks):
            mask = tasks == t
            examples[mask] = self._lookup(int(t), draw_counts[mask])
        self._offsets = offsets
        self._draws = [Draw(*pair) for pair in zip(tasks.tolist(), examples.tolist(), strict=True)]
        self._cursor = 0

    def _lookup(self, task: int, counts: np.ndarray) -> np.ndarray:
        """Example indices for the ``counts``-th draws of ``task`` (one permutation per epoch)."""
        n = self.sizes[task]
        per_group = _epochs_per_group(n)
        epochs = counts // n
        groups = epochs // per_group
        out = np.empty(len(counts), dtype=np.int64)
        for group in np.unique(groups):
            mask = groups == group
            rows = self._permutations(task, int(group))
            out[mask] = rows[epochs[mask] % per_group, counts[mask] % n]
        return out

    def _permutations(self, task: int, group: int) -> np.ndarray:
        """The permutations of epochs ``group * G ... group * G + G - 1`` of ``task``, one row
        each (``G = _epochs_per_group(n)``), from one generator seeded by (seed, task, split,
        group)."""
        key = (task, group)
        rows = self._perm_cache.get(key)
        if rows is None:
            # Keep only the newest groups: a big task holds one permutation, not one per epoch.
            for old in [k for k in self._perm_cache if k[0] == task and k[1] < group - 1]:
                del self._perm_cache[old]
            n = self.sizes[task]
            dtype = np.int32 if n < 2**31 else np.int64
            seed = [self.seed, _PERM_STREAM, self._task_keys[task], self._split_key, group]
            base = np.broadcast_to(np.arange(n, dtype=dtype), (_epochs_per_group(n), n))
            rows = np.random.default_rng(seed).permuted(base, axis=1)
            self._perm_cache[key] = rows
        return rows


def _epochs_per_group(n: int) -> int:
    # Small tasks run through many epochs per block; shuffling a group of epochs in one call
    # keeps them vectorised (one generator per group, not per epoch). Part of the stream's
    # definition, like BLOCK.
    return max(1, _PERM_GROUP_ITEMS // n)
