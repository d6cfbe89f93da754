"""Run statistics: the report's figures, per-session returns and the ratios, the LLM's figures.

Sharpe and Sortino use per-session (trading day) returns of equity, annualised with sqrt(252);
max drawdown is the largest peak-to-trough fall of marked equity, in USD. The figures come from
one function, :func:`performance`, fed either by the engine's statistics at the end of a run
(:func:`build_report`) or by the journal's rows afterwards (:func:`journal_figures`), so a report
can be checked against the journal it came with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trader.domain import ACTION_NAMES, Trade
from trader.engine import RunStats
from trader.features.clock import SessionClock

# The report's figures that the journal alone determines (``journal_figures`` recomputes them).
JOURNAL_FIGURES = (
    "bars",
    "trades",
    "net_pnl",
    "win_rate",
    "profit_factor",
    "avg_trade",
    "max_drawdown",
    "sharpe",
    "sortino",
    "trading_days",
    "exposure",
)


def performance(
    ts_ns: Any,
    equity_usd: Any,
    position: Any,
    trade_pnls_usd: Sequence[float],
    start_balance: float,
    clock: SessionClock,
) -> dict[str, Any]:
    """The P&L figures of a run from its marked equity and position per decided bar and the P&L of
    its closed trades (USD, net of commissions)."""
    eq = np.asarray(equity_usd, dtype=np.float64)
    pnl = np.asarray(trade_pnls_usd, dtype=np.float64)
    wins, losses = pnl[pnl > 0], pnl[pnl <= 0]
    gross_win, gross_loss = float(wins.sum()), float(-losses.sum())
    max_dd = float(drawdown_usd(eq, start_balance).max(initial=0.0)) if len(eq) else 0.0
    daily = daily_returns(ts_ns, eq, start_balance, clock)
    pos = np.asarray(position)
    return {
        "bars": len(eq),
        "trades": len(pnl),
        "net_pnl": round(float(eq[-1] - start_balance), 2) if len(eq) else 0.0,
        "win_rate": round(len(wins) / len(pnl), 4) if len(pnl) else None,
        "profit_factor": round(gross_win / gross_loss, 4)
        if gross_loss > 0
        else (None if not len(pnl) else math.inf),
        "avg_trade": round(float(pnl.mean()), 2) if len(pnl) else None,
        "max_drawdown": round(max_dd, 2),
        "sharpe": ratio(daily, downside=False),
        "sortino": ratio(daily, downside=True),
        "trading_days": len(daily),
        "exposure": round(float((pos != 0).mean()), 4) if len(pos) else 0.0,
    }


def drawdown_usd(equity_usd: Any, start_balance: float) -> np.ndarray:
    """Fall from the running peak of equity (the start balance counts as the first peak), >= 0."""
    eq = np.asarray(equity_usd, dtype=np.float64)
    if not len(eq):
        return np.zeros(0)
    peak = np.maximum.accumulate(np.concatenate(([start_balance], eq)))[1:]
    return np.asarray(peak - eq)


def build_report(
    stats: RunStats,
    trades: list[Trade],
    start_balance: float,
    clock: SessionClock,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    lat = np.asarray(stats.latencies_ns, dtype=np.float64) / 1000.0
    rejected = sum(stats.rejected.values())
    perf = performance(
        stats.ts_ns, stats.equity, stats.position, [t.pnl_usd for t in trades], start_balance, clock
    )
    report: dict[str, Any] = {
        "bars": stats.bars,
        "bars_rejected": rejected,
        "bars_rejected_by_reason": dict(sorted(stats.rejected.items())),
        **{k: perf[k] for k in JOURNAL_FIGURES if k != "bars"},
        "actions": {ACTION_NAMES[i]: n for i, n in enumerate(stats.actions)},
        "vetoes": dict(sorted(stats.vetoes.items())),
        "fusion_methods": dict(sorted(stats.fusion_methods.items())),
        "bars_per_second": round(stats.bars / stats.wall_s, 1) if stats.wall_s > 0 else None,
        "decision_latency_us": {
            "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "max": round(float(lat.max()), 1) if len(lat) else None,
        },
        "status": stats.status,
    }
    if extra:
        report.update(extra)
    return report


def journal_figures(
    ts_ns: Any,
    equity_usd: Any,
    position: Any,
    trades: Sequence[Trade],
    start_balance: float,
    clock: SessionClock,
) -> dict[str, Any]:
    """:data:`JOURNAL_FIGURES` recomputed from a run's journaled decisions and trades."""
    return performance(ts_ns, equity_usd, position, [t.pnl_usd for t in trades], start_balance, clock)


def daily_returns(ts_ns: Any, equity: Any, start_balance: float, clock: SessionClock) -> np.ndarray:
    """Return of marked equity over each trading session (its last bar vs the previous one's)."""
    if not len(ts_ns):
        return np.zeros(0)
    sess = clock.session_id_batch(np.asarray(ts_ns, dtype=np.int64))
    eq = np.asarray(equity, dtype=np.float64)
    last = np.flatnonzero(np.diff(sess) != 0)
    ends = np.concatenate((eq[last], eq[-1:]))
    prev = np.concatenate(([start_balance], ends[:-1]))
    return np.asarray(ends / prev - 1.0)


def ratio(r: np.ndarray, downside: bool) -> float | None:
    """Sharpe (or Sortino with ``downside``) of per-session returns, annualised with sqrt(252)."""
    if len(r) < 2:
        return None
    mean = float(r.mean())
    dev = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2))) if downside else float(r.std(ddof=1))
    if dev == 0:
        return None
    return round(mean / dev * math.sqrt(252), 4)


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One trading session of a run. ``net_pnl_usd``: marked equity at its last bar less the
    previous session's (the start balance for the first), so the rows add up to the run's net P&L;
    ``max_drawdown_usd``: the deepest fall from the session's own running peak."""

    session_id: int  # days since 1970-01-01 of the local date the session ends on
    first_ts_ns: int
    last_ts_ns: int
    bars: int
    trades: int  # closed in this session
    wins: int
    net_pnl_usd: float
    max_drawdown_usd: float
    end_equity_usd: float
    llm_decided: int  # decisions where the LLM's advice changed the RL's action
    entries_vetoed: int  # BUY/SELL decisions a risk rule turned into HOLD


def session_rows(
    ts_ns: Any,
    equity_usd: Any,
    trades: Sequence[Trade],
    start_balance: float,
    clock: SessionClock,
    llm_decided_ts_ns: Sequence[int] = (),
    vetoed_ts_ns: Sequence[int] = (),
) -> list[SessionRow]:
    """The per-session table (sessions by :meth:`SessionClock.session_id_batch`; a trade belongs
    to the session it closed in)."""
    ts = np.asarray(ts_ns, dtype=np.int64)
    if not len(ts):
        return []
    eq = np.asarray(equity_usd, dtype=np.float64)
    sess = clock.session_id_batch(ts)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sess) != 0) + 1))
    ends = np.concatenate((starts[1:], [len(ts)]))

    def per_session(times: Sequence[int]) -> dict[int, int]:
        if not len(times):
            return {}
        ids, counts = np.unique(clock.session_id_batch(np.asarray(times, dtype=np.int64)), return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))

    exits = clock.session_id_batch(np.asarray([t.exit_ts_ns for t in trades], dtype=np.int64))
    pnls = np.asarray([t.pnl_usd for t in trades], dtype=np.float64)
    llm, vetoed = per_session(llm_decided_ts_ns), per_session(vetoed_ts_ns)
    out: list[SessionRow] = []
    prev_end = float(start_balance)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        sid = int(sess[a])
        seg = eq[a:b]
        peak = np.maximum.accumulate(np.concatenate(([prev_end], seg)))[1:]
        mine = exits == sid
        out.append(
            SessionRow(
                sid,
                int(ts[a]),
                int(ts[b - 1]),
                b - a,
                int(mine.sum()),
                int((pnls[mine] > 0).sum()),
                round(float(seg[-1] - prev_end), 2),
                round(float((peak - seg).max()), 2),
                float(seg[-1]),
                llm.get(sid, 0),
                vetoed.get(sid, 0),
            )
        )
        prev_end = float(seg[-1])
    return out


def llm_report(advisor: Any, stats: RunStats, mode: str) -> dict[str, Any]:
    """The advisor's statistics: queries, failures, latency, agreement with RL, LLM-driven decisions."""
    if advisor is None:
        return {"mode": mode}
    a = advisor.stats
    lat = np.asarray(a.latencies_s) * 1000.0
    overrides = sum(
        stats.fusion_methods.get(m, 0)
        for m in stats.fusion_methods
        if m.endswith(("llm_override", "weighted_llm"))
    )

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 1) if len(lat) else None

    return {
        "mode": mode,
        "queries": a.queries,
        "answered": a.answered,
        "errors": a.errors,
        "timeouts": a.timeouts,
        "unparseable": a.unparseable,
        "skipped_busy": a.skipped_busy,
        "recorded_misses": a.recorded_misses,
        "triggers": dict(sorted(a.triggers.items())),
        "latency_ms": {
            "p50": pct(50),
            "p95": pct(95),
            "max": round(float(lat.max()), 1) if len(lat) else None,
        },
        "decisions_with_advice": stats.with_advice,
        "agreement_rate": round(stats.agreements / stats.with_advice, 4) if stats.with_advice else None,
        "llm_overrides": overrides,
        "stated_confidence_avg": round(float(np.mean(a.stated_conf)), 4) if a.stated_conf else None,
        "logit_confidence_avg": round(float(np.mean(a.logit_conf)), 4) if a.logit_conf else None,
    }


def write_json(r: dict[str, Any], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(r, indent=2, default=lambda x: None if x != x else str(x)) + "\n")
