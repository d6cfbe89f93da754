"""Run report: statistics, a readable table, JSON, and an equity/drawdown plot (self-contained HTML).

Sharpe and Sortino use per-session (trading day) returns of equity, annualised with sqrt(252);
max drawdown is the largest peak-to-trough fall of marked equity, in USD.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from trader.domain import ACTION_NAMES, Trade
from trader.engine import RunStats
from trader.features.clock import SessionClock


def build_report(
    stats: RunStats,
    trades: list[Trade],
    start_balance: float,
    clock: SessionClock,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    eq = np.asarray(stats.equity, dtype=np.float64)
    pnl = np.array([t.pnl_usd for t in trades], dtype=np.float64)
    wins, losses = pnl[pnl > 0], pnl[pnl <= 0]
    gross_win, gross_loss = float(wins.sum()), float(-losses.sum())
    if len(eq):
        peak = np.maximum.accumulate(np.concatenate(([start_balance], eq)))[1:]
        max_dd = float((peak - eq).max())
    else:
        max_dd = 0.0
    daily = _daily_returns(stats, start_balance, clock)
    lat = np.asarray(stats.latencies_ns, dtype=np.float64) / 1000.0
    pos = np.asarray(stats.position)
    rejected = sum(stats.rejected.values())
    report: dict[str, Any] = {
        "bars": stats.bars,
        "bars_rejected": rejected,
        "bars_rejected_by_reason": dict(sorted(stats.rejected.items())),
        "trades": len(trades),
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


def _daily_returns(stats: RunStats, start_balance: float, clock: SessionClock) -> np.ndarray:
    return daily_returns(stats.ts_ns, stats.equity, start_balance, clock)


def daily_returns(ts_ns: Any, equity: Any, start_balance: float, clock: SessionClock) -> np.ndarray:
    """Return of marked equity over each trading session (its last bar vs the previous one's)."""
    if not len(ts_ns):
        return np.zeros(0)
    sess = clock.session_id_batch(np.asarray(ts_ns, dtype=np.int64))
    eq = np.asarray(equity, dtype=np.float64)
    last = np.flatnonzero(np.diff(sess) != 0)
    ends = np.concatenate((eq[last], eq[-1:]))
    prev = np.concatenate(([start_balance], ends[:-1]))
    return ends / prev - 1.0


def ratio(r: np.ndarray, downside: bool) -> float | None:
    """Sharpe (or Sortino with ``downside``) of per-session returns, annualised with sqrt(252)."""
    if len(r) < 2:
        return None
    mean = float(r.mean())
    dev = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2))) if downside else float(r.std(ddof=1))
    if dev == 0:
        return None
    return round(mean / dev * math.sqrt(252), 4)


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


def format_table(r: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.2f}"
        if isinstance(v, dict):
            return ", ".join(f"{k}={fmt(x)}" for k, x in v.items()) or "-"
        return str(v)

    rows = [
        ("status", r["status"]),
        ("bars processed", r["bars"]),
        ("bars rejected", r["bars_rejected"]),
        ("  by reason", r["bars_rejected_by_reason"]),
        ("trades", r["trades"]),
        ("net P&L (USD)", r["net_pnl"]),
        ("win rate", r["win_rate"]),
        ("profit factor", r["profit_factor"]),
        ("avg trade (USD)", r["avg_trade"]),
        ("max drawdown (USD)", r["max_drawdown"]),
        ("Sharpe (daily, ann.)", r["sharpe"]),
        ("Sortino (daily, ann.)", r["sortino"]),
        ("trading days", r["trading_days"]),
        ("exposure", r["exposure"]),
        ("actions", r["actions"]),
        ("vetoes by rule", r["vetoes"]),
        ("fusion methods", r["fusion_methods"]),
        ("bars per second", r["bars_per_second"]),
        ("decision latency (us)", r["decision_latency_us"]),
    ]
    llm = r.get("llm") or {}
    if llm.get("queries") is not None:
        rows += [
            ("LLM mode", llm["mode"]),
            ("LLM queries", llm["queries"]),
            ("  answered", llm["answered"]),
            ("  errors / timeouts", f"{llm['errors']} / {llm['timeouts']}"),
            ("  unparseable", llm["unparseable"]),
            ("  skipped while busy", llm["skipped_busy"]),
            ("  latency (ms)", llm["latency_ms"]),
            ("  agreement with RL", llm["agreement_rate"]),
            ("  LLM overrides", llm["llm_overrides"]),
            (
                "  confidence stated / logits",
                f"{fmt(llm['stated_confidence_avg'])} / {fmt(llm['logit_confidence_avg'])}",
            ),
        ]
    elif llm:
        rows.append(("LLM mode", llm["mode"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in rows)


def write_json(r: dict[str, Any], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(r, indent=2, default=lambda x: None if x != x else str(x)) + "\n")


def write_plot_html(
    stats: RunStats, start_balance: float, path: str | Path, title: str = "trader replay"
) -> None:
    """Equity and drawdown as inline SVG in one HTML file (no external assets)."""
    eq = np.asarray(stats.equity, dtype=np.float64)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if len(eq) == 0:
        p.write_text(f"<!doctype html><title>{html.escape(title)}</title><p>No bars.</p>")
        return
    peak = np.maximum.accumulate(np.concatenate(([start_balance], eq)))[1:]
    dd = eq - peak
    w, h1, h2, pad = 960, 300, 140, 40

    def path_of(y: np.ndarray, top: float, height: float) -> tuple[str, float, float]:
        step = max(1, len(y) // 2000)
        ys = y[::step]
        lo, hi = float(ys.min()), float(ys.max())
        span = hi - lo or 1.0
        xs = np.linspace(pad, w - pad, len(ys))
        pts = " ".join(
            f"{x:.1f},{top + height - (v - lo) / span * height:.1f}" for x, v in zip(xs, ys, strict=True)
        )
        return pts, lo, hi

    e_pts, e_lo, e_hi = path_of(eq, pad, h1 - pad)
    d_pts, d_lo, d_hi = path_of(dd, h1 + pad, h2 - pad)
    t = html.escape(title)
    size = f'width="{w}" height="{h1 + h2 + pad}"'
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" {size} font-family="sans-serif" font-size="12">
<text x="{pad}" y="20">Equity (USD): {e_lo:,.2f} .. {e_hi:,.2f}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.2" points="{e_pts}"/>
<text x="{pad}" y="{h1 + 30}">Drawdown from peak (USD): {d_lo:,.2f} .. {d_hi:,.2f}</text>
<polyline fill="none" stroke="#d62728" stroke-width="1.2" points="{d_pts}"/>
</svg>"""
    p.write_text(f"<!doctype html><meta charset='utf-8'><title>{t}</title><h3>{t}</h3>{svg}\n")
