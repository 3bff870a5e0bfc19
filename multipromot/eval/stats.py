"""Confidence intervals for scores, from per-item values: within a run (over the test items of
each task) and within a sweep (over seeds and items), and paired differences between methods
scored on the same seeds and items.

Every interval is a 95% bootstrap interval from :func:`scipy.stats.bootstrap` (BCa; the
percentile interval where BCa cannot be computed). The resampling design:

- the items of each task are resampled independently (a stratified bootstrap: each task keeps
  its number of items, as a score is a per-task mean or corpus statistic);
- in a sweep the seeds are resampled too, independently of the items: every seed shares the
  same test items (crossed design), so the interval covers both another choice of seeds and
  another draw of test items;
- a paired difference resamples the same seeds and items for both methods.

A score is what :class:`Scores` aggregates: per task, a ``[seeds, items, k]`` array of
per-item values and the function that turns any subset of rows into the task's score
(:class:`multipromot.data.metrics.ItemScores`: a mean for accuracy or exact match, corpus
BLEU from summed n-gram counts). The point estimate is always the statistic on all the data,
so it equals the score the report prints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

from multipromot.data.metrics import normalized_average

__all__ = ["Estimate", "TaskScores", "Scores", "estimate", "difference", "N_RESAMPLES"]

N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A score with its 95% interval and the counts behind it."""

    value: float
    low: float
    high: float
    seeds: int
    items: int

    def text(self, signed: bool = False, digits: int = 1) -> str:
        """``81.0 [76.2, 85.1]`` (``+59.0 [+52.1, +65.3]`` when ``signed``)."""
        sign = "+" if signed else ""
        return (
            f"{self.value:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, "
            f"{self.high:{sign}.{digits}f}]"
        )

    def counts(self) -> str:
        """``3 seeds x 600 items`` (``600 items`` for one seed)."""
        seeds = f"{self.seeds} seeds x " if self.seeds > 1 else ""
        return f"{seeds}{self.items} items"

    def to_json(self) -> dict:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "seeds": self.seeds,
            "items": self.items,
        }


@dataclass(frozen=True)
class TaskScores:
    """One task's per-item values for one method and shots setting.

    Attributes:
        values: ``[seeds, items, k]`` per-item values (the same items for every seed).
        aggregate: the task's score (0-100) from any ``[n, k]`` rows of ``values[s]``.
        random: the task's random-guess score (for BIG-bench's normalized metric), or None.
    """

    values: np.ndarray
    aggregate: Callable[[np.ndarray], float]
    random: float | None = None

    @property
    def seeds(self) -> int:
        return int(self.values.shape[0])

    @property
    def items(self) -> int:
        return int(self.values.shape[1])

    def score(self, seeds: np.ndarray, items: np.ndarray) -> float:
        """The mean over ``seeds`` of the task score on rows ``items``."""
        return float(np.mean([self.aggregate(self.values[s][items]) for s in seeds]))


# One score: a single task, or the normalized average of several.
Scores = Mapping[str, TaskScores]


def _value(
    scores: Scores, seeds: np.ndarray, items: Sequence[np.ndarray], average: str | None
) -> float:
    """The mean over ``seeds`` of the task's score (``average`` None, one task) or of the
    normalized average of the tasks (``plain``: the paper's Norm. Avg.; ``above_random``:
    BIG-bench's, each task rescaled against its random-guess score)."""
    names = list(scores)
    if average is None:
        return scores[names[0]].score(seeds, items[0])
    random = {name: scores[name].random or 0.0 for name in names}
    per_seed = []
    for s in seeds:
        task_scores = {
            name: scores[name].aggregate(scores[name].values[s][rows])
            for name, rows in zip(names, items, strict=True)
        }
        per_seed.append(
            normalized_average(task_scores, random if average == "above_random" else None)
        )
    return float(np.mean(per_seed))


def _check(groups: Sequence[Scores]) -> tuple[int, list[int]]:
    """The seeds and per-task items shared by every group (paired data must line up)."""
    first = groups[0]
    seeds = {t.seeds for g in groups for t in g.values()}
    if len(seeds) != 1:
        raise ValueError(f"every task must have the same seeds, got {sorted(seeds)}")
    for group in groups[1:]:
        if list(group) != list(first):
            raise ValueError(f"paired scores need the same tasks: {list(first)} vs {list(group)}")
        for name in first:
            if group[name].items != first[name].items:
                raise ValueError(f"paired scores need the same items of task {name!r}")
    return seeds.pop(), [first[name].items for name in first]


def _interval(
    statistic: Callable[[np.ndarray, list[np.ndarray]], float],
    n_seeds: int,
    n_items: list[int],
    *,
    random_state: int,
) -> tuple[float, float, float]:
    """(value on all the data, low, high): the seeds (when more than one) and each task's items
    resampled independently by scipy.stats.bootstrap."""
    all_seeds = np.arange(n_seeds)
    all_items = [np.arange(n) for n in n_items]
    value = statistic(all_seeds, all_items)
    samples = ([all_seeds] if n_seeds > 1 else []) + all_items

    def resampled(*drawn):
        seeds = drawn[0].astype(int) if n_seeds > 1 else all_seeds
        items = [d.astype(int) for d in drawn[-len(n_items) :]]
        return statistic(seeds, items)

    result = None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa on degenerate data: we fall back below
            result = bootstrap(
                tuple(samples),
                resampled,
                vectorized=False,
                paired=False,
                n_resamples=N_RESAMPLES,
                confidence_level=CONFIDENCE,
                method=method,
                random_state=random_state,
            )
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            break
    # every resample gives the same value (to float rounding): no spread to show
    if np.ptp(result.bootstrap_distribution) <= 1e-9 * max(1.0, abs(value)):
        return value, value, value
    return value, float(low), float(high)


AVERAGES = (None, "plain", "above_random")


def _checked_average(scores: Scores, average: str | None) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if not scores or (average is None and len(scores) != 1):
        raise ValueError("a task's score needs exactly one task; an average at least one")


def estimate(scores: Scores, *, average: str | None = None, random_state: int = 0) -> Estimate:
    """A score and its 95% interval, averaged over the seeds: one task's (``average`` None,
    ``scores`` holding that task) or an average over the tasks (``plain`` or
    ``above_random``, see :func:`_value`).

    Raises:
        ValueError: no tasks, several tasks without an average, tasks with different seeds.
    """
    _checked_average(scores, average)
    seeds, items = _check([scores])
    value, low, high = _interval(
        lambda s, i: _value(scores, s, i, average), seeds, items, random_state=random_state
    )
    return Estimate(value, low, high, seeds, sum(items))


def difference(
    a: Scores, b: Scores, *, average: str | None = None, random_state: int = 0
) -> Estimate:
    """``a - b`` on the same seeds and items, with the 95% interval of the paired difference.

    Raises:
        ValueError: the two do not share tasks, seeds and items.
    """
    _checked_average(a, average)
    seeds, items = _check([a, b])

    def statistic(s: np.ndarray, i: list[np.ndarray]) -> float:
        return _value(a, s, i, average) - _value(b, s, i, average)

    value, low, high = _interval(statistic, seeds, items, random_state=random_state)
    return Estimate(value, low, high, seeds, sum(items))
