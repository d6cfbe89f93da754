"""Bar validation: the one place that decides whether a bar may enter the engine.

A rejected bar is counted by reason and journaled; the run goes on.

Two kinds of reasons. A single bar shows the per-bar ones (a price that is not a finite positive
number, a high below the open, time going back); :class:`BarValidator` checks them bar by bar.
Only the bars around a bar show the others (:data:`SOURCE_REASONS`): a price off the instrument's
tick grid, a print far from its neighbours, a timestamp written in another unit or zone than the
rest of its file. The feed that has the whole file finds those with the vectorised helpers below
and hands such a bar over as a :class:`RefusedBar`, which the validator rejects with its reason;
so the engine, the bulk features and crash recovery all see one verdict per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trader.domain import Bar

BAR_REASONS = (
    "not_finite",
    "non_positive_price",
    "high_below_open_close",
    "low_above_open_close",
    "negative_volume",
    "time_backwards",
    "duplicate_timestamp",
)
SOURCE_REASONS = (
    "off_tick_grid",  # a price that is not a multiple of instrument.tick_size
    "price_outlier",  # more than OUTLIER_RATIO away from the median close of the rows near it
    "epoch_unit_mismatch",  # an epoch number in another unit (s/ms/us/ns) than most of its file
    "timezone_mismatch",  # a date-time with a UTC offset in a file of naive ones, or the reverse
)
REJECT_REASONS = BAR_REASONS + SOURCE_REASONS
# What the engine does with a row whose timestamp cannot be read (the feed hands it over as None).
BAD_TIMESTAMP = "bad_timestamp"
# Row reason codes of :func:`reason_codes`: 0 = accepted, k = ROW_REASONS[k].
ROW_REASONS = ("", BAD_TIMESTAMP, *REJECT_REASONS)

# A price more than twice or less than half the median close of its block of OUTLIER_WINDOW rows
# is a bad print, not a market move: no futures contract moves 50 % within an hour of bars.
OUTLIER_RATIO = 2.0
OUTLIER_WINDOW = 61  # rows
OUTLIER_MIN_ROWS = 3  # with fewer rows nothing says which print is the bad one
# in ticks: float noise, and vendors that write fractional ticks (1/32, 1/128) rounded to 4-6
# decimals; a price off the grid by more than 1% of a tick is not a rounding
TICK_TOLERANCE = 1e-2


@dataclass(frozen=True, slots=True)
class RefusedBar(Bar):
    """A bar its feed already refused for a reason only the bars around it show (one of
    :data:`SOURCE_REASONS`); the prices are kept as read, for the journal."""

    reason: str


class BarValidator:
    """Stateful: remembers the last accepted bar's time to catch time going back and duplicates."""

    __slots__ = ("last_ts_ns",)

    def __init__(self) -> None:
        self.last_ts_ns: int | None = None

    def check(self, bar: Bar) -> str | None:
        """None if the bar is good (and then it becomes the last accepted bar), else the reason."""
        if isinstance(bar, RefusedBar):
            return bar.reason
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


def _code(reason: str) -> int:
    return ROW_REASONS.index(reason)


def price_codes(o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per row, :meth:`BarValidator.check`'s price verdict as a code (0 = good), vectorised."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c) & np.isfinite(v)
        return np.select(
            [
                ~finite,
                (o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0),
                (h < o) | (h < c),
                (lo > o) | (lo > c),
                v < 0,
            ],
            [_code(r) for r in BAR_REASONS[:5]],
            0,
        ).astype(np.int8)


def off_tick_grid(
    o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray, tick_size: float
) -> np.ndarray:
    """Rows with a price that is not a whole number of ``tick_size`` (within float noise)."""
    off = np.zeros(len(o), dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        for p in (o, h, lo, c):
            t = p / tick_size
            off |= np.abs(t - np.rint(t)) > TICK_TOLERANCE
    return off


def price_outliers(h: np.ndarray, lo: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Rows whose high or low is more than OUTLIER_RATIO away from the median close of their
    block of OUTLIER_WINDOW rows (the last block: the last OUTLIER_WINDOW rows). Give only rows
    whose prices passed :func:`price_codes`."""
    n, w = len(c), OUTLIER_WINDOW
    if n < OUTLIER_MIN_ROWS:
        return np.zeros(n, dtype=bool)
    k = n // w
    ref = np.empty(n)
    if k:
        ref[: k * w] = np.repeat(np.median(c[: k * w].reshape(k, w), axis=1), w)
    if n > k * w:
        ref[k * w :] = np.median(c[-w:])
    with np.errstate(invalid="ignore"):
        far = (h > ref * OUTLIER_RATIO) | (lo < ref / OUTLIER_RATIO)
        # a bad print is a spike: its neighbours' closes are not where it is. A market that moved
        # (daily bars over months, a gap that holds) has neighbours that moved with it.
        prev_c = np.concatenate(([c[0]], c[:-1]))
        next_c = np.concatenate((c[1:], [c[-1]]))
        hi_spike = (h > prev_c * OUTLIER_RATIO) & (h > next_c * OUTLIER_RATIO)
        lo_spike = (lo < prev_c / OUTLIER_RATIO) & (lo < next_c / OUTLIER_RATIO)
        return far & (hi_spike | lo_spike)


def reason_codes(
    ts_ns: np.ndarray,
    o: np.ndarray,
    h: np.ndarray,
    lo: np.ndarray,
    c: np.ndarray,
    v: np.ndarray,
    source: np.ndarray | None = None,
) -> np.ndarray:
    """What the engine will say about each row played in this order, vectorised: 0 = accepted,
    else an index into :data:`ROW_REASONS`. ``ts_ns`` < 0 = unreadable; ``source``: per row 0 or
    1 + an index into :data:`SOURCE_REASONS` (a :class:`RefusedBar`).

    A row is accepted iff its own checks pass and its time is after every earlier accepted row's:
    a row failing only the time check is never later than that maximum, so the running maximum
    over the rows that pass their own checks is the validator's ``last_ts_ns``.
    """
    code = price_codes(o, h, lo, c, v)
    if source is not None:
        code = np.where(source > 0, source.astype(np.int8) + _code(SOURCE_REASONS[0]) - 1, code)
    code = np.where(ts_ns < 0, np.int8(_code(BAD_TIMESTAMP)), code).astype(np.int8)
    own_ok = code == 0
    t = np.where(own_ok, ts_ns, -1)
    before = np.empty_like(t)
    if len(t):
        before[0] = -1
        np.maximum.accumulate(t[:-1], out=before[1:])
    code[own_ok & (ts_ns < before)] = _code("time_backwards")
    code[own_ok & (ts_ns == before)] = _code("duplicate_timestamp")
    return code
