"""Percentile bootstrap of a mean over sessions (``trader compare``'s confidence intervals).

The resampling is the textbook one: ``resamples`` times, draw ``n`` sessions with replacement
(``numpy.random.default_rng(seed).integers(0, n)``, drawn row by row in one stream), take the mean;
the interval is the ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of those means
(linear interpolation between order statistics, numpy's default). Vectorised: the resamples are
drawn in blocks of at most :data:`BLOCK_CELLS` indices, so memory stays bounded for long
histories and the result does not depend on the block size (the draws form one stream).

A percentile bootstrap over a handful of sessions is rough: with few sessions the interval is too
narrow more often than its nominal level says (with two it is about the span of the two values,
so two sessions of the same sign "exclude zero"). Below :data:`MIN_SESSIONS` the statement
therefore draws no conclusion, whatever the interval; above it, it says how many sessions the
interval rests on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_CELLS = 4_000_000  # indices drawn at once (32 MB of int64)
MIN_SESSIONS = 5  # fewer values: the interval is shown, but no verdict is drawn from it


@dataclass(frozen=True, slots=True)
class BootstrapCI:
    """The mean of ``n`` values with its percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    confidence: float
    n: int
    resamples: int
    seed: int

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def verdict(self) -> str:
        """``not distinguishable from zero``, ``above zero``, ``below zero``, or ``too few
        sessions`` (fewer than :data:`MIN_SESSIONS`)."""
        if self.n < MIN_SESSIONS:
            return "too few sessions"
        if self.contains_zero:
            return "not distinguishable from zero"
        return "above zero" if self.low > 0 else "below zero"

    def statement(self, what: str = "the mean", unit: str = "USD") -> str:
        """Plain words: the mean, the interval, and whether it tells the sign apart from zero."""
        level = f"{self.confidence:.0%}"
        core = (
            f"{what}: {self.mean:+,.2f} {unit} (mean of {self.n} sessions), {level} CI "
            f"[{self.low:+,.2f}, {self.high:+,.2f}]"
        )
        if self.n < MIN_SESSIONS:
            return f"{core}: too few sessions to tell ({self.n} < {MIN_SESSIONS})"
        return f"{core}: {self.verdict}"


def bootstrap_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` means of ``len(x)`` values drawn from ``x`` with replacement (see module doc)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap: no values")
    rng = np.random.default_rng(seed)
    out = np.empty(resamples, dtype=np.float64)
    rows = max(1, BLOCK_CELLS // n)
    for lo in range(0, resamples, rows):
        k = min(rows, resamples - lo)
        idx = rng.integers(0, n, size=(k, n))
        out[lo : lo + k] = x[idx].mean(axis=1)
    return out


def bootstrap_mean_ci(
    x: np.ndarray | list[float], *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> BootstrapCI:
    """Percentile-bootstrap CI of the mean of ``x`` (one value per session). Needs two values."""
    values = np.asarray(x, dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"bootstrap: {len(values)} value(s); a confidence interval needs at least 2")
    if not np.isfinite(values).all():
        raise ValueError("bootstrap: values must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap: confidence {confidence} is not within (0, 1)")
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples {resamples} < 1")
    means = bootstrap_means(values, resamples, seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    mean = float(values.mean())
    return BootstrapCI(mean, float(low), float(high), confidence, len(values), resamples, seed)
