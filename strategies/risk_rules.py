"""Example risk rules from the hybrid-agent guide. Each blocks entry-side actions only.

Configure with ``risk.rules = ["strategies.risk_rules:LunchBlock", ...]`` and keyword options in
``[risk.rule_options."strategies.risk_rules:LunchBlock"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from trader.config import Settings, parse_hhmm
from trader.decision.risk import RiskContext
from trader.domain import Action, PortfolioSnapshot


class HighVix:
    """No new entries while the VIX is above ``threshold``.

    The VIX comes from a file (CSV or Parquet with ``timestamp`` and ``column``), read once at
    start; the value used for a bar is the last one at or before the bar's time (no look-ahead).
    """

    name = "high_vix"

    def __init__(
        self,
        settings: Settings,
        file: str,
        column: str = "vix",
        threshold: float = 30.0,
        timezone: str | None = None,
        **_: Any,
    ) -> None:
        path = Path(file)
        if not path.exists():
            raise ValueError(f"risk.rule_options high_vix.file: {path} not found")
        df = pl.read_parquet(path) if path.suffix in (".parquet", ".pq") else pl.read_csv(path)
        for col in ("timestamp", column):
            if col not in df.columns:
                raise ValueError(f"{path}: missing column {col!r} for the high_vix rule")
        ts = df["timestamp"]
        if ts.dtype == pl.String:
            ts = ts.str.to_datetime(time_unit="ns")
        if ts.dtype.time_zone is None:  # type: ignore[union-attr]
            ts = ts.dt.replace_time_zone(timezone or settings.data.timezone)
        order = np.argsort(ts.dt.epoch("ns").to_numpy(), kind="stable")
        self.ts = ts.dt.epoch("ns").to_numpy()[order]
        self.vix = df[column].cast(pl.Float64).to_numpy()[order]
        self.threshold = threshold

    def value_at(self, ts_ns: int) -> float | None:
        i = int(np.searchsorted(self.ts, ts_ns, side="right")) - 1
        return float(self.vix[i]) if i >= 0 else None

    def check(self, action: Action, snapshot: PortfolioSnapshot, ctx: RiskContext) -> str | None:
        v = self.value_at(ctx.ts_ns)
        if v is not None and v > self.threshold:
            return f"VIX {v:.2f} > {self.threshold}"
        return None


class NearSupportResistance:
    """No buying within ``min_distance_atr`` ATR under resistance, no selling just above support."""

    name = "near_support_resistance"

    def __init__(self, settings: Settings, min_distance_atr: float = 0.5, **_: Any) -> None:
        self.min_distance = min_distance_atr

    def check(self, action: Action, snapshot: PortfolioSnapshot, ctx: RiskContext) -> str | None:
        if action not in (Action.BUY, Action.SELL):
            return None
        m = ctx.market()
        if not m.atr > 0:
            return None
        if action == Action.BUY and 0 <= (m.resistance - m.close) / m.atr < self.min_distance:
            return f"close {m.close:.2f} within {self.min_distance} ATR of resistance {m.resistance:.2f}"
        if action == Action.SELL and 0 <= (m.close - m.support) / m.atr < self.min_distance:
            return f"close {m.close:.2f} within {self.min_distance} ATR of support {m.support:.2f}"
        return None


class LunchBlock:
    """No new entries from ``start`` to ``end`` exchange time (default 12:00-13:00 ET)."""

    name = "lunch_block"

    def __init__(self, settings: Settings, start: str = "12:00", end: str = "13:00", **_: Any) -> None:
        s, e = parse_hhmm(start), parse_hhmm(end)
        self.start, self.end = s.hour * 60 + s.minute, e.hour * 60 + e.minute

    def check(self, action: Action, snapshot: PortfolioSnapshot, ctx: RiskContext) -> str | None:
        if self.start <= ctx.minute_of_day < self.end:
            s, e = self.start, self.end
            return f"lunch block {s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}"
        return None
