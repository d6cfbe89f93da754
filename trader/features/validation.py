"""Bar validation: the one place that decides whether a bar may enter the engine.

A rejected bar is counted by reason and journaled; the run goes on.
"""

from __future__ import annotations

import math

from trader.domain import Bar

REJECT_REASONS = (
    "not_finite",
    "non_positive_price",
    "high_below_open_close",
    "low_above_open_close",
    "negative_volume",
    "time_backwards",
    "duplicate_timestamp",
)


class BarValidator:
    """Stateful: remembers the last accepted bar's time to catch time going back and duplicates."""

    __slots__ = ("last_ts_ns",)

    def __init__(self) -> None:
        self.last_ts_ns: int | None = None

    def check(self, bar: Bar) -> str | None:
        """None if the bar is good (and then it becomes the last accepted bar), else the reason."""
        o, h, lo, c, v = bar.open, bar.high, bar.low, bar.close, bar.volume
        if not (
            math.isfinite(o)
            and math.isfinite(h)
            and math.isfinite(lo)
            and math.isfinite(c)
            and math.isfinite(v)
        ):
            return "not_finite"
        if o <= 0 or h <= 0 or lo <= 0 or c <= 0:
            return "non_positive_price"
        if h < o or h < c:
            return "high_below_open_close"
        if lo > o or lo > c:
            return "low_above_open_close"
        if v < 0:
            return "negative_volume"
        last = self.last_ts_ns
        if last is not None:
            if bar.ts_ns < last:
                return "time_backwards"
            if bar.ts_ns == last:
                return "duplicate_timestamp"
        self.last_ts_ns = bar.ts_ns
        return None
