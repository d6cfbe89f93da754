"""Prompt templates from config, their placeholders, and the context that fills them.

Templates use ``str.format`` syntax. An unknown placeholder, a positional ``{}`` or a format spec
that does not fit the placeholder's type is a configuration error at start, naming it.
"""

from __future__ import annotations

import math
import string
from datetime import UTC, datetime
from typing import Any

from trader.config import InstrumentConfig, PromptsConfig
from trader.domain import PortfolioSnapshot

# placeholder -> an example value of its type (used to validate format specs at start)
PLACEHOLDERS: dict[str, Any] = {
    "market_name": "NQ",
    "current_time": "10:31",
    "current_price": 16000.25,
    "adx": 25.0,
    "rsi": 50.0,
    "vwap_distance": 0.5,
    "momentum": 0.1,
    "position_status": "flat",
    "unrealized_pnl": 0.0,
    "win_rate": 0.5,
    "consecutive_losses": 0,
    "balance": 50_000.0,
    "contract_specs": "NQ, tick 0.25 = $5.00",
    "session_time": "RTH",
    "vol_regime": "normal",
    "trend_strength": "trending",
    "macd": 1.0,
    "support": 15_950.0,
    "resistance": 16_050.0,
    "entry_price": "-",
    "peak_balance": 50_000.0,
    "drawdown": 0.0,
}


class PromptError(ValueError):
    pass


def validate_templates(prompts: PromptsConfig) -> None:
    """Raise PromptError naming the template and placeholder that cannot be filled."""
    for key in ("system", "context_template"):
        template = getattr(prompts, key)
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise PromptError(f"prompts.{key}: not a valid template: {exc}") from None
        for _, name, spec, _conv in fields:
            if name is None:
                continue
            base = name.split(".")[0].split("[")[0]
            if base == "" or base.isdigit():
                raise PromptError(f"prompts.{key}: positional placeholder {{{name}}}; use a name")
            if base not in PLACEHOLDERS:
                known = ", ".join(sorted(PLACEHOLDERS))
                raise PromptError(f"prompts.{key}: unknown placeholder {{{base}}} (known: {known})")
            try:
                format(PLACEHOLDERS[base], spec or "")
            except (ValueError, TypeError) as exc:
                raise PromptError(f"prompts.{key}: bad format spec {{{name}:{spec}}}: {exc}") from None


class NoTradesYet(float):
    """``win_rate`` when the win-rate window holds no trade: it reads "n/a (no trades yet)" under
    any format spec (``{win_rate:.0%}`` included), never "0%", which would tell the model that
    every trade lost. As a number it is NaN, so nothing can mistake it for a rate."""

    TEXT = "n/a (no trades yet)"

    def __new__(cls) -> NoTradesYet:
        return super().__new__(cls, math.nan)

    def __format__(self, spec: str) -> str:
        return self.TEXT

    def __str__(self) -> str:
        return self.TEXT

    def __repr__(self) -> str:
        return self.TEXT


NO_TRADES_YET = NoTradesYet()


def _num(x: float, default: float = 0.0) -> float:
    return x if isinstance(x, int | float) and math.isfinite(x) else default


def build_context(
    market: Any, snap: PortfolioSnapshot, instrument: InstrumentConfig, clock: Any
) -> dict[str, Any]:
    """Placeholder values from the market context and the portfolio (prices in points, money in USD)."""
    local_s = market.ts_ns // 1_000_000_000 + clock.offset_s(market.ts_ns)
    t = datetime.fromtimestamp(local_s, tz=UTC)
    minute = t.hour * 60 + t.minute
    session = "RTH" if 570 <= minute < 960 else "overnight"
    adx = _num(market.adx)
    vol = _num(market.volatility_regime, 1.0)
    pos = snap.position
    status = "flat" if pos == 0 else f"{'long' if pos > 0 else 'short'} {abs(pos)}"
    win_rate = snap.recent_win_rate
    return {
        "market_name": instrument.symbol,
        "current_time": t.strftime("%H:%M"),
        "current_price": _num(market.close),
        "adx": adx,
        "rsi": _num(market.rsi, 50.0),
        "vwap_distance": _num(market.vwap_distance_atr),
        "momentum": _num(market.momentum_pct),
        "position_status": status,
        "unrealized_pnl": snap.unrealized_usd,
        "win_rate": NO_TRADES_YET if win_rate is None or snap.recent_trades == 0 else win_rate,
        "consecutive_losses": snap.consecutive_losses,
        "balance": snap.balance_usd,
        "contract_specs": f"{instrument.symbol}, tick {instrument.tick_size} = "
        f"${instrument.tick_size * instrument.point_value_usd:.2f}",
        "session_time": session,
        "vol_regime": "high" if vol > 1.5 else "low" if vol < 0.7 else "normal",
        "trend_strength": "strong trend" if adx >= 40 else "trending" if adx >= 25 else "ranging",
        "macd": _num(market.macd),
        "support": _num(market.support),
        "resistance": _num(market.resistance),
        "entry_price": f"{snap.avg_entry:.2f}" if pos else "-",
        "peak_balance": snap.peak_equity_usd,
        "drawdown": snap.peak_equity_usd - snap.equity_usd,
    }


def render(prompts: PromptsConfig, context: dict[str, Any]) -> tuple[str, str]:
    """(system prompt, user message). The system prompt should not change between queries, so its
    tokens stay in llama.cpp's KV cache."""
    return prompts.system.format(**context), prompts.context_template.format(**context)
