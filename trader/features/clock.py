"""Exchange-local time for bars: minute of day, weekday, session id, in O(1) per bar.

The UTC offset of the exchange time zone is cached per UTC hour, so live bars cost a dict
lookup and replay computes the same values with vectorised integer arithmetic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np

from trader.config import InstrumentConfig, hhmm_minutes, window_minutes

NS = 1_000_000_000
HOUR_NS = 3600 * NS


class SessionClock:
    """Maps UTC ns timestamps to exchange-local minutes and trading-session ids.

    A trading session starts at ``session_open`` local time (18:00 ET for CME Globex) and its id
    is the local calendar day on which it ends: the day after the open for a session that wraps
    past midnight (18:00-17:00), the day of the open for one that does not (09:30-16:00,
    00:00-24:00). Minutes are of the local day, 0..1439; the entry
    window and the flatten period may wrap past midnight (entries 18:00-16:00), so membership is
    tested modulo a day, never with a plain ``start <= minute < end``.
    """

    def __init__(self, instrument: InstrumentConfig) -> None:
        self.tz = ZoneInfo(instrument.timezone)
        self.session_open_min = hhmm_minutes(instrument.session_open)
        self.session_close_min = hhmm_minutes(instrument.session_close) % 1440  # "24:00" = 0
        # the session ends on the day after its open only when it wraps past midnight (a session
        # from 00:00 ends on its own day, at 24:00, whatever its close is written as)
        wraps = 0 < self.session_open_min >= hhmm_minutes(instrument.session_close)
        self._session_shift = 1 if wraps else 0
        self.trade_start_min = hhmm_minutes(instrument.trade_start)
        self.trade_end_min = hhmm_minutes(instrument.trade_end)  # 1440 for "24:00"
        self.entry_window_min = window_minutes(instrument.trade_start, instrument.trade_end)
        # None: flatten_at = "off", positions are never forced flat before the close
        self.flatten_min: int | None = (
            None if instrument.flatten_at == "off" else hhmm_minutes(instrument.flatten_at) % 1440
        )
        # The to_flatten feature counts down to flatten_at from an anchor minute: midnight when the
        # window and flatten_at lie inside one calendar day (the layout the bundled policy learnt),
        # else the session open; flatten_at at the close counts down to the close.
        self._flatten_anchor = self.session_open_min
        self._flatten_rel: int | None = None
        if self.flatten_min is not None:
            raw = hhmm_minutes(instrument.flatten_at)
            if self.trade_start_min < self.trade_end_min <= raw < 1440:
                self._flatten_anchor = 0
            self._flatten_rel = (self.flatten_min - self._flatten_anchor) % 1440
            if self._flatten_anchor != 0 and self.flatten_min == self.session_close_min:
                self._flatten_rel = (self.session_close_min - self.session_open_min) % 1440 or 1440
        self._offsets: dict[int, int] = {}

    def offset_s(self, ts_ns: int) -> int:
        hour = ts_ns // HOUR_NS
        off = self._offsets.get(hour)
        if off is None:
            dt = datetime.fromtimestamp(hour * 3600, tz=UTC).astimezone(self.tz)
            off = int(dt.utcoffset().total_seconds())  # type: ignore[union-attr]
            self._offsets[hour] = off
        return off

    def local_s(self, ts_ns: int) -> int:
        return ts_ns // NS + self.offset_s(ts_ns)

    def minute_of_day(self, ts_ns: int) -> int:
        return (self.local_s(ts_ns) // 60) % 1440

    def session_id(self, ts_ns: int) -> int:
        """Local day number on which the session containing ts ends."""
        return self.session_of_local(self.local_s(ts_ns))

    def session_of_local(self, local_s: int) -> int:
        return (local_s - self.session_open_min * 60) // 86400 + self._session_shift

    def in_entry_window(self, minute: int) -> bool:
        """True from trade_start until trade_end (exclusive), across midnight when it wraps."""
        return (minute - self.trade_start_min) % 1440 < self.entry_window_min

    def past_flatten(self, minute: int) -> bool:
        """True from flatten_at until the session closes (entries blocked, positions flattened);
        never with ``flatten_at = "off"``."""
        if self.flatten_min is None:
            return False
        return (minute - self.flatten_min) % 1440 < (self.session_close_min - self.flatten_min) % 1440

    # vectorised twins -------------------------------------------------------------------------
    def local_s_batch(self, ts_ns: np.ndarray) -> np.ndarray:
        hours = ts_ns // HOUR_NS
        uniq, inv = np.unique(hours, return_inverse=True)
        offs = np.array([self.offset_s(int(h) * HOUR_NS) for h in uniq], dtype=np.int64)
        return ts_ns // NS + offs[inv]

    def session_id_batch(self, ts_ns: np.ndarray) -> np.ndarray:
        return (self.local_s_batch(ts_ns) - self.session_open_min * 60) // 86400 + self._session_shift

    def in_entry_window_batch(self, minute: np.ndarray) -> np.ndarray:
        """:meth:`in_entry_window` for an array of minutes of the day (bool array)."""
        return (minute - self.trade_start_min) % 1440 < self.entry_window_min

    def to_flatten_batch(self, minute: np.ndarray) -> np.ndarray:
        """The ``to_flatten`` feature: minutes until flatten_at in units of 390 (a regular session),
        clipped to [0, 1]; 0 from flatten_at until the count restarts, 1 with flatten_at "off"."""
        if self._flatten_rel is None:
            return np.ones_like(minute, dtype=np.float64)
        left = self._flatten_rel - (minute - self._flatten_anchor) % 1440
        return np.clip(left / 390.0, 0.0, 1.0)
