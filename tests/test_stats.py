"""Intervals and paired differences, against cases a reader can check by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from multipromot.data.metrics import (
    item_values,
    register_metric,
    reset_registries,
    score,
    score_values,
)
from multipromot.eval.stats import Estimate, TaskScores, difference, estimate


def _mean_task(values, random_score=None) -> TaskScores:
    """Per-item scores [seeds][items] of a metric that is a mean over items."""
    array = np.asarray(values, dtype=float)[..., None]
    return TaskScores(array, lambda rows: float(np.mean(rows)), random_score)


def test_a_coin_flip_sample_has_the_textbook_interval():
    """50 hits in 100 items: 50 with the normal-approximation interval 50 +- 1.96 * 5 = [40.2,
    59.8]; the bootstrap's BCa interval is within a point of it."""
    hits = [100.0] * 50 + [0.0] * 50
    result = estimate({"t": _mean_task([hits])})
    assert result.value == 50.0 and (result.seeds, result.items) == (1, 100)
    assert 39.0 <= result.low <= 41.5 and 58.5 <= result.high <= 61.0
    assert result.text() == f"50.0 [{result.low:.1f}, {result.high:.1f}]"


def test_identical_methods_differ_by_zero_with_an_interval_that_contains_zero():
    rng = random.Random(0)
    scores = {
        "a": _mean_task([[rng.choice((0.0, 100.0)) for _ in range(80)] for _ in range(3)]),
        "b": _mean_task([[rng.choice((0.0, 100.0)) for _ in range(40)] for _ in range(3)]),
    }
    same = difference(scores, scores, average="plain")
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert (same.seeds, same.items) == (3, 120)
    assert same.counts() == "3 seeds x 120 items"


def test_a_constant_shift_is_found_exactly():
    base = [[float(i % 7) * 10 for i in range(50)] for _ in range(2)]
    shifted = [[v + 5.0 for v in row] for row in base]
    diff = difference({"t": _mean_task(shifted)}, {"t": _mean_task(base)})
    assert (diff.value, diff.low, diff.high) == (5.0, 5.0, 5.0)
    assert diff.text(signed=True) == "+5.0 [+5.0, +5.0]"


def test_seeds_are_resampled_too():
    """Three seeds whose items all score 40, 50 and 60: no item noise, only seed noise. The
    mean is 50; the interval is wide (seeds are resampled) but inside [40, 60]."""
    values = [[40.0] * 30, [50.0] * 30, [60.0] * 30]
    result = estimate({"t": _mean_task(values)})
    assert result.value == pytest.approx(50.0)
    assert 40.0 <= result.low < 48.0 and 52.0 < result.high <= 60.0


def test_norm_avg_is_the_mean_of_task_scores_and_above_random_rescales():
    scores = {"a": _mean_task([[100.0, 0.0]], random_score=50.0), "b": _mean_task([[60.0, 60.0]])}
    assert estimate(scores, average="plain").value == pytest.approx((50 + 60) / 2)
    # BIG-bench: a at random (50 of 100 with random 50) is 0, b stays 60 (random 0)
    assert estimate(scores, average="above_random").value == pytest.approx((0 + 60) / 2)
    with pytest.raises(ValueError, match="exactly one task"):
        estimate(scores)


def test_paired_data_must_line_up():
    with pytest.raises(ValueError, match="same items"):
        difference({"t": _mean_task([[1.0, 2.0]])}, {"t": _mean_task([[1.0]])})
    with pytest.raises(ValueError, match="same seeds"):
        estimate({"a": _mean_task([[1.0]]), "b": _mean_task([[1.0], [2.0]])}, average="plain")


def test_item_values_rescore_every_metric_exactly():
    rng = random.Random(1)
    words = "the cat sat on a mat dog ran far".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))

    preds = [sentence() for _ in range(40)]
    refs = [sentence() for _ in range(40)]
    for metric in ("accuracy", "exact_match", "bleu", "rouge2"):
        values = np.asarray(item_values(metric, preds, refs))
        assert len(values) == 40
        assert score_values(metric, values) == pytest.approx(score(metric, preds, refs), abs=1e-9)
    # corpus BLEU of a subset is BLEU of that subset, not a mean of sentence scores
    rows = np.asarray(item_values("bleu", preds, refs))[:10]
    assert score_values("bleu", rows) == pytest.approx(score("bleu", preds[:10], refs[:10]))


def test_a_metric_that_is_not_a_per_item_mean_gets_no_item_values():
    @register_metric("longest_hit")
    def longest_hit(predictions, references):  # a max, not a mean: no per-item decomposition
        return max(
            100.0 * (p == r) * len(p) / 10 for p, r in zip(predictions, references, strict=True)
        )

    try:
        assert item_values("longest_hit", ["abcde", "ab"], ["abcde", "ab"]) is None
    finally:
        reset_registries()


def test_estimate_json_round_trip():
    est = Estimate(1.0, 0.5, 1.5, 3, 600)
    assert Estimate(**est.to_json()) == est
