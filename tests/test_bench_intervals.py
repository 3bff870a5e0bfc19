"""benchmarks/intervals.py: the intervals behind every benchmark figure and the target verdicts
``make bench`` prints, on cases a reader can check by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import intervals  # noqa: E402


def test_ratio_is_the_ratio_of_sums_with_an_interval_around_it():
    slow = [2.0, 2.2, 1.8, 2.1, 1.9, 2.0, 2.05, 1.95]
    fast = [1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 1.05, 0.95]
    e = intervals.ratio(slow, fast)
    assert e.point == pytest.approx(sum(slow) / sum(fast))
    assert e.low < e.point < e.high and e.n == 8
    assert e.low > 1.9 and e.high < 2.1  # every pair is within 2 +- 0.1


def test_identical_arms_give_exactly_one():
    times = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2]
    e = intervals.ratio(times, times)
    assert (e.point, e.low, e.high) == (1.0, 1.0, 1.0)  # no spread: the point is the interval


def test_pairs_are_kept_together():
    # A load that doubles both arms in some repeats moves the ratio not at all when the arms
    # are paired; unpaired resampling would give a wide interval.
    load = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.5, 1.0, 2.0])
    e = intervals.ratio(1.5 * load, load)
    assert e.low == pytest.approx(1.5) and e.high == pytest.approx(1.5)


def test_too_few_repeats_get_no_interval():
    e = intervals.ratio([2.0, 2.1, 1.9], [1.0, 1.0, 1.0])
    assert e.n == 3 and math.isnan(e.low) and math.isnan(e.high)
    assert "no interval" in str(e)
    target = intervals.Target("k", "w", ">=", 1.5, e)
    assert target.verdict() == "holds by the point estimate only"


def test_mean_and_median_of_a_fixed_sample():
    values = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 10.2, 9.8]
    m = intervals.mean(values)
    assert m.point == pytest.approx(10.0) and m.low < 10.0 < m.high
    assert intervals.median(values).point == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("op", "threshold", "estimate", "verdict"),
    [
        (">=", 2.0, (2.2, 2.1, 2.3), "holds"),
        (">=", 2.0, (2.05, 1.9, 2.2), "holds by the point estimate only"),
        (">=", 2.0, (1.95, 1.8, 2.1), "fails"),
        ("<=", 1.02, (1.01, 1.00, 1.015), "holds"),
        ("<=", 1.02, (1.01, 0.99, 1.03), "holds by the point estimate only"),
        ("<=", 1.02, (1.05, 1.01, 1.08), "fails"),
    ],
)
def test_target_verdict_reads_the_interval(op, threshold, estimate, verdict):
    target = intervals.Target("key", "what", op, threshold, intervals.Estimate(*estimate, n=10))
    assert target.verdict() == verdict
    stored = target.as_json()
    assert stored["verdict"] == verdict and stored["point"] == estimate[0]


def test_reference_arm_prints_as_reference():
    assert str(intervals.REFERENCE) == "1 (reference)"
