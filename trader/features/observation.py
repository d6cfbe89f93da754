"""Observation building: market rows (live or precomputed) + account features ─▶ float32[dim].

``IncrementalFeatures`` computes each bar's market row on arrival (live, paper). ``BulkFeatures``
precomputes the rows for a whole replay with the same formulas and hands them out bar by bar;
the engine cannot tell the two apart. Custom :class:`FeatureBlock` plug-ins append columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trader.config import Settings
from trader.domain import Bar, MarketContext, PortfolioSnapshot
from trader.errors import ConfigError
from trader.features.clock import SessionClock
from trader.features.layout import ACCOUNT_FEATURES, RISK_CONTEXT_FEATURES, ObservationLayout, build_layout
from trader.features.market import (
    MarketState,
    derive,
    derive_llm_context,
    market_features_one,
    primitives_batch,
)
from trader.ports import FeatureBlock, load_object


def load_feature_blocks(paths: Sequence[str]) -> list[FeatureBlock]:
    blocks = []
    for p in paths:
        factory = load_object(p, "features.custom_blocks")
        block = factory() if callable(factory) else factory
        if not isinstance(block, FeatureBlock):
            raise ConfigError(f"features.custom_blocks: {p!r} is not a FeatureBlock (needs names and update)")
        blocks.append(block)
    return blocks


_CONTEXT_KEYS = (
    "close",
    "atr_14",
    "adx_14",
    "pdi_14",
    "mdi_14",
    "rsi_14",
    "macd",
    "vwap",
    "ll_60",
    "hh_60",
    "atr_sma_240",
    "close@20",
    "local_s",
    "ts",
)


def _context_from(p: dict[str, float]) -> MarketContext:
    atr = p["atr_14"] if p["atr_14"] == p["atr_14"] else 0.0
    c = p["close"]
    prev20 = p["close@20"]
    return MarketContext(
        ts_ns=int(p["ts"]),
        close=c,
        atr=atr,
        adx=p["adx_14"],
        plus_di=p["pdi_14"],
        minus_di=p["mdi_14"],
        rsi=p["rsi_14"],
        macd=p["macd"],
        vwap=p["vwap"],
        vwap_distance_atr=(c - p["vwap"]) / atr if atr > 0 else 0.0,
        momentum_pct=100.0 * (c / prev20 - 1.0) if prev20 == prev20 and prev20 else 0.0,
        support=p["ll_60"],
        resistance=p["hh_60"],
        volatility_regime=p["atr_14"] / p["atr_sma_240"] if p["atr_sma_240"] else math.nan,
        minute_of_day=int(p["local_s"] // 60) % 1440,
    )


class IncrementalFeatures:
    """Live path: O(1) per bar. ``update`` returns the market part in layout order (float32)."""

    def __init__(self, settings: Settings, blocks: Sequence[FeatureBlock] = ()) -> None:
        self.clock = SessionClock(settings.instrument)
        self.tick = settings.instrument.tick_size
        self.blocks = list(blocks)
        self.layout = build_layout(settings.features.use_llm_features, _block_names(self.blocks))
        self._state = MarketState(self.clock)
        self._p: dict[str, float] = {}
        self._row = np.zeros(self.layout.dim, dtype=np.float32)
        self.ready = False
        self.atr = math.nan

    def update(self, bar: Bar) -> np.ndarray:
        self._p = self._state.update(bar)
        f = market_features_one(self._p, self.clock, self.tick, self.layout.use_llm_features)
        values = list(f.values())
        lay = self.layout
        row = self._row
        row[lay.base_market] = values[: lay.n_base_market]
        row[lay.llm_market] = values[lay.n_base_market :]
        custom = [x for b in self.blocks for x in b.update(bar)]
        row[lay.custom] = custom
        self.atr = self._p["atr_14"]
        self.ready = not any(math.isnan(x) for x in values) and not any(math.isnan(x) for x in custom)
        return row

    def context(self) -> MarketContext:
        return _context_from(self._p)


class BulkFeatures:
    """Replay path: every market row computed up front, handed out in order.

    ``update`` checks that the bar is the one the row was computed for, so the precomputed
    rows can never silently fall out of step with the bars the engine accepted.
    """

    def __init__(
        self,
        settings: Settings,
        bars: Sequence[Bar] | dict[str, np.ndarray],
        blocks: Sequence[FeatureBlock] = (),
    ) -> None:
        self.clock = SessionClock(settings.instrument)
        tick = settings.instrument.tick_size
        self.blocks = list(blocks)
        self.layout = build_layout(settings.features.use_llm_features, _block_names(self.blocks))
        cols = bars if isinstance(bars, dict) else bars_to_arrays(bars)
        ts, o, h, lo, c, v = (cols[k] for k in ("ts_ns", "open", "high", "low", "close", "volume"))
        p = primitives_batch(ts, o, h, lo, c, v, self.clock)
        lay = self.layout
        rows = np.zeros((len(ts), lay.dim), dtype=np.float32)
        with np.errstate(invalid="ignore"):
            base = derive(p, self.clock, tick)
            _put_columns(rows, lay.base_market, list(base.values()))
            nan_any = np.zeros(len(ts), dtype=bool)
            for arr in base.values():
                nan_any |= np.isnan(arr)
            if lay.use_llm_features:
                llm = derive_llm_context(p, self.clock, tick)
                _put_columns(rows, lay.llm_market, list(llm.values()))
                for arr in llm.values():
                    nan_any |= np.isnan(arr)
        if self.blocks:
            custom = _custom_batch(self.blocks, cols)
            rows[:, lay.custom] = custom
            nan_any |= np.isnan(custom).any(axis=1)
        self.rows = rows
        self.ts = ts
        self.atr_col = p["atr_14"]
        self.ready_col = ~nan_any
        self._ctx = {k: p[k] for k in _CONTEXT_KEYS}
        self._i = -1
        self.ready = False
        self.atr = math.nan

    def update(self, bar: Bar) -> np.ndarray:
        i = self._i = self._i + 1
        if i >= len(self.ts) or self.ts[i] != bar.ts_ns:
            raise RuntimeError(f"bulk features out of step with the feed at bar {i} (ts_ns={bar.ts_ns})")
        self.ready = bool(self.ready_col[i])
        self.atr = float(self.atr_col[i])
        return self.rows[i]

    def seek(self, row: int) -> None:
        """Make ``row`` the next row handed out (training episodes start mid-file)."""
        if not 0 <= row <= len(self.ts):
            raise IndexError(f"row {row} outside 0..{len(self.ts)}")
        self._i = row - 1
        self.ready = False
        self.atr = math.nan

    @property
    def index(self) -> int:
        """Row of the bar most recently handed out (-1 before the first)."""
        return self._i

    def context(self) -> MarketContext:
        return self.context_at(self._i)

    def context_at(self, i: int) -> MarketContext:
        """The market context of row i (any row, not just the current one)."""
        return _context_from({k: float(v[i]) for k, v in self._ctx.items()})


def _put_columns(rows: np.ndarray, where: slice, columns: list[np.ndarray], block: int = 8192) -> None:
    """``rows[:, where]`` = the columns side by side, a block of rows at a time: one float64
    column_stack of a whole replay would be a second copy of its features (0.3 GB at 150k bars)."""
    for s in range(0, len(rows), block):
        rows[s : s + block, where] = np.column_stack([c[s : s + block] for c in columns])


def _block_names(blocks: Sequence[FeatureBlock]) -> tuple[str, ...]:
    return tuple(n for b in blocks for n in b.names)


def _custom_batch(blocks: Sequence[FeatureBlock], cols: dict[str, np.ndarray]) -> np.ndarray:
    parts = []
    n = len(cols["ts_ns"])
    for b in blocks:
        batch = getattr(b, "batch", None)
        if batch is not None:
            arr = np.asarray(
                batch(cols["ts_ns"], cols["open"], cols["high"], cols["low"], cols["close"], cols["volume"]),
                dtype=np.float64,
            ).reshape(n, len(b.names))
        else:
            arr = np.array(
                [
                    b.update(
                        Bar(
                            int(cols["ts_ns"][i]),
                            float(cols["open"][i]),
                            float(cols["high"][i]),
                            float(cols["low"][i]),
                            float(cols["close"][i]),
                            float(cols["volume"][i]),
                        )
                    )
                    for i in range(n)
                ],
                dtype=np.float64,
            ).reshape(n, len(b.names))
        parts.append(arr)
    return np.hstack(parts) if parts else np.zeros((n, 0))


def bars_to_arrays(bars: Sequence[Bar]) -> dict[str, np.ndarray]:
    return {
        "ts_ns": np.fromiter((b.ts_ns for b in bars), dtype=np.int64, count=len(bars)),
        "open": np.fromiter((b.open for b in bars), dtype=np.float64, count=len(bars)),
        "high": np.fromiter((b.high for b in bars), dtype=np.float64, count=len(bars)),
        "low": np.fromiter((b.low for b in bars), dtype=np.float64, count=len(bars)),
        "close": np.fromiter((b.close for b in bars), dtype=np.float64, count=len(bars)),
        "volume": np.fromiter((b.volume for b in bars), dtype=np.float64, count=len(bars)),
    }


class AccountFeatures:
    """Writes the position/account block and the risk-context block into an observation."""

    def __init__(self, settings: Settings, layout: ObservationLayout) -> None:
        self.layout = layout
        self.point_value = settings.instrument.point_value_usd
        self.tick = settings.instrument.tick_size
        self.max_contracts = settings.risk.max_contracts
        self.start_balance = settings.account.starting_balance_usd
        self.dd_limit = settings.account.trailing_drawdown_usd
        self.daily_limit = settings.risk.daily_loss_limit_usd
        self.max_losses = settings.risk.max_consecutive_losses
        self._acct = layout.account
        self._risk = layout.risk_context
        self._flat_key: tuple[PortfolioSnapshot, int] | None = None
        self._flat_acct = np.zeros(len(ACCOUNT_FEATURES), dtype=np.float32)
        self._flat_risk = np.zeros(len(RISK_CONTEXT_FEATURES), dtype=np.float32)

    def fill(
        self, obs: np.ndarray, s: PortfolioSnapshot, close: float, atr: float, daily_trades: int
    ) -> None:
        if s.position == 0:
            # Flat: nothing here depends on price, so reuse the block while the snapshot is unchanged.
            key = (s, daily_trades)
            if self._flat_key is None or self._flat_key[0] is not s or self._flat_key[1] != daily_trades:
                self._compute(obs, s, close, atr, daily_trades)
                self._flat_acct = obs[self._acct].copy()
                self._flat_risk = obs[self._risk].copy()  # empty in the 228-feature layout
                self._flat_key = key
            else:
                obs[self._acct] = self._flat_acct
                obs[self._risk] = self._flat_risk
            return
        self._compute(obs, s, close, atr, daily_trades)

    def _compute(
        self, obs: np.ndarray, s: PortfolioSnapshot, close: float, atr: float, daily_trades: int
    ) -> None:
        atr_usd = max(atr if atr == atr else 0.0, self.tick) * self.point_value
        qty = abs(s.position)
        side = (s.position > 0) - (s.position < 0)
        per_contract = atr_usd * max(qty, 1)
        stop_dist = (
            (close - s.stop_price) * side / max(atr, self.tick) if s.stop_price is not None and side else 0.0
        )
        obs[self._acct] = (
            side,
            qty / self.max_contracts,
            s.unrealized_usd / per_contract,
            min(s.bars_in_trade / 100.0, 5.0),
            stop_dist,
            float(s.trailing),
            float(s.at_break_even),
            (s.balance_usd - self.start_balance) / self.dd_limit,
            s.daily_pnl_usd / self.daily_limit,
            (s.equity_usd - s.drawdown_threshold_usd) / self.dd_limit,
            s.mfe_usd / per_contract,
            s.mae_usd / per_contract,
            daily_trades / 10.0,
        )
        if self.layout.use_llm_features:
            mfe = s.mfe_usd
            obs[self._risk] = (
                s.unrealized_usd / self.dd_limit,
                (s.peak_equity_usd - s.equity_usd) / self.dd_limit,
                s.consecutive_losses / self.max_losses,
                s.recent_win_rate if s.recent_win_rate is not None else 0.5,
                min(abs(s.mae_usd) / mfe, 10.0) if mfe > 0 else (0.0 if s.mae_usd == 0 else 10.0),
            )
