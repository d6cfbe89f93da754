"""Example custom feature block: distance (percent) from the highest high and lowest low of the run.

Enable with ``features.custom_blocks = ["strategies.features:RunRangeBlock"]``; the layout
(and its hash) grows by two columns, so the policy must be trained with it.
"""

from __future__ import annotations

import math

import numpy as np

from trader.domain import Bar


class RunRangeBlock:
    names = ("custom_range_high_dist_pct", "custom_range_low_dist_pct")

    def __init__(self) -> None:
        self.high = -math.inf
        self.low = math.inf

    def update(self, bar: Bar) -> tuple[float, float]:
        self.high = max(self.high, bar.high)
        self.low = min(self.low, bar.low)
        c = bar.close
        return 100.0 * (c - self.high) / c, 100.0 * (c - self.low) / c

    def batch(
        self, ts_ns: np.ndarray, o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray
    ) -> np.ndarray:
        hi = np.maximum.accumulate(h)
        low = np.minimum.accumulate(lo)
        return np.column_stack((100.0 * (c - hi) / c, 100.0 * (c - low) / c))
