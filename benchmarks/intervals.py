"""95% intervals for benchmark figures, and targets judged from them (numpy and scipy only).

A comparison is a ratio of summed times over paired repeats (or steps), with a BCa bootstrap
interval over the pairs (scipy.stats.bootstrap); a target holds when its whole interval meets
it, holds by the point estimate only when the point does and the interval reaches past it, and
fails when the point does not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
MIN_SAMPLES = 5  # fewer repeats or pairs than this get no interval


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% interval and the number of repeats or pairs behind it."""

    point: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if not math.isfinite(self.low):
            return f"{_num(self.point)} (no interval: n = {self.n})"
        return f"{_num(self.point)} ({_num(self.low)}-{_num(self.high)}, n = {self.n})"


class _Reference(Estimate):
    def __str__(self) -> str:
        return "1 (reference)"


REFERENCE = _Reference(1.0, 1.0, 1.0, 0)


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _bootstrap(data: tuple, statistic, point: float) -> Estimate:
    """A 95% BCa bootstrap interval (scipy.stats.bootstrap over the first axis, the samples
    paired); a sample with no spread gets the point as its interval."""
    from scipy.stats import bootstrap

    n = len(data[0])
    if n < MIN_SAMPLES:  # too few for an interval: the point alone, marked as such
        return Estimate(point, float("nan"), float("nan"), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate samples: handled below
        res = bootstrap(
            data,
            statistic,
            paired=len(data) > 1,
            vectorized=True,
            confidence_level=CONFIDENCE,
            n_resamples=9999,
            method="BCa",
            rng=np.random.default_rng(0),
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = point
    return Estimate(point, low, high, n)


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Estimate:
    """sum(numerator) / sum(denominator) over paired repeats, with a 95% bootstrap interval
    over the pairs. A speed-up of A over B on the same work: ``ratio(times_B, times_A)``."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    return _bootstrap(
        (num, den),
        lambda a, b, axis=-1: a.sum(axis=axis) / b.sum(axis=axis),
        float(num.sum() / den.sum()),
    )


def mean(values: Sequence[float]) -> Estimate:
    """The mean of repeated measurements with a 95% bootstrap interval."""
    xs = np.asarray(values, float)
    return _bootstrap((xs,), lambda a, axis=-1: a.mean(axis=axis), float(xs.mean()))


def median(values: Sequence[float]) -> Estimate:
    """The median of repeated measurements with a 95% bootstrap interval."""
    xs = np.asarray(values, float)
    return _bootstrap((xs,), lambda a, axis=-1: np.median(a, axis=axis), float(np.median(xs)))


@dataclass(frozen=True)
class Target:
    """A benchmark target, judged from its estimate's interval: ``holds`` when the whole
    interval meets it, ``holds by the point estimate only`` when the point does and the
    interval reaches past it, ``fails`` when the point does not."""

    key: str
    what: str
    op: str  # ">=" or "<="
    threshold: float
    estimate: Estimate

    def verdict(self) -> str:
        e, t = self.estimate, self.threshold
        met = (lambda v: v >= t) if self.op == ">=" else (lambda v: v <= t)
        if not met(e.point):
            return "fails"
        bound = e.low if self.op == ">=" else e.high
        return (
            "holds" if math.isfinite(bound) and met(bound) else "holds by the point estimate only"
        )

    def as_json(self) -> dict:
        return {
            "what": self.what,
            "op": self.op,
            "threshold": self.threshold,
            **asdict(self.estimate),
            "verdict": self.verdict(),
        }
