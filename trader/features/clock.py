"""Exchange-local time for bars: minute of day, weekday, session id, in O(1) per bar.

The UTC offset of the exchange time zone is cached per UTC hour, so live bars cost a dict
lookup and replay computes the same values with vectorised integer arithmetic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np

from trader.config import InstrumentConfig, parse_hhmm

NS = 1_000_000_000
HOUR_NS = 3600 * NS


def _minute_of(hhmm: str) -> int:
    t = parse_hhmm(hhmm)
    return t.hour * 60 + t.minute


class SessionClock:
    """Maps UTC ns timestamps to exchange-local minutes and trading-session ids.

    A trading session starts at ``session_open`` local time (18:00 ET for CME Globex) and its id
    is the local calendar day on which it ends.
    """

    def __init__(self, instrument: InstrumentConfig) -> None:
        self.tz = ZoneInfo(instrument.timezone)
        self.session_open_min = _minute_of(instrument.session_open)
        self.session_close_min = _minute_of(instrument.session_close)
        self.trade_start_min = _minute_of(instrument.trade_start)
        self.trade_end_min = _minute_of(instrument.trade_end)
        self.flatten_min = _minute_of(instrument.flatten_at)
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
        return (local_s - self.session_open_min * 60) // 86400 + 1

    def in_entry_window(self, minute: int) -> bool:
        return self.trade_start_min <= minute < self.trade_end_min

    def past_flatten(self, minute: int) -> bool:
        """True from flatten_at until the session closes (entries blocked, positions flattened)."""
        if self.flatten_min <= self.session_close_min:
            return self.flatten_min <= minute < self.session_close_min
        return minute >= self.flatten_min or minute < self.session_close_min

    # vectorised twins -------------------------------------------------------------------------
    def local_s_batch(self, ts_ns: np.ndarray) -> np.ndarray:
        hours = ts_ns // HOUR_NS
        uniq, inv = np.unique(hours, return_inverse=True)
        offs = np.array([self.offset_s(int(h) * HOUR_NS) for h in uniq], dtype=np.int64)
        return ts_ns // NS + offs[inv]

    def session_id_batch(self, ts_ns: np.ndarray) -> np.ndarray:
        return (self.local_s_batch(ts_ns) - self.session_open_min * 60) // 86400 + 1
