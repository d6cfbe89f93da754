"""Held-out evaluation of a policy against baselines, through the real replay path.

Every strategy except buy-and-hold runs through ``build_replay`` and ``Engine.run``: the same
features, action mask, fusion (RL alone: the LLM is off), risk rules, stops, session flattening,
paper fills with slippage and commission. Only the source of the action differs:

* ``policy``: the ONNX policy under test (greedy);
* ``flat``: HOLD on every bar (never trades);
* ``ema_cross``: a rule baseline: BUY when EMA(20) of the close crosses above EMA(50), SELL when it
  crosses below, HOLD otherwise (with ``execution.reverse_on_opposite = false`` an opposite signal
  first exits, and the position re-opens only on the next cross);
* ``buy_and_hold``: one contract bought at the first evaluation bar's close plus slippage and held to
  the last bar's close minus slippage, with both commissions, marked at every close. It is computed
  from the same bars, since the engine's stops and session flattening would not let it hold.

Indicators need ``features.warmup_bars`` bars of history: the replay starts that many bars before
``eval_from`` (those bars are never traded) so that the first decision falls on ``eval_from``.
Statistics cover only bars from ``eval_from``; Sharpe uses per-session returns like the report.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from trader.config import PolicyConfig, Settings
from trader.engine import Engine, RunStats
from trader.features.clock import SessionClock
from trader.feeds.replay import bound_ns, load_bars
from trader.report import daily_returns, ratio
from trader.wiring import build_replay

EMA_FAST, EMA_SLOW = 20, 50


async def _run(eng: Engine) -> RunStats:
    stats = await eng.run()
    await eng.close()
    return stats


def _iso(ts_ns: int, tz: str) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=ZoneInfo(tz)).isoformat()


def _summary(
    ts: np.ndarray, eq: np.ndarray, pnls: list[float], start_eq: float, clock: SessionClock
) -> dict[str, Any]:
    peak = np.maximum.accumulate(np.concatenate(([start_eq], eq)))[1:]
    daily = daily_returns(ts, eq, start_eq, clock)
    wins = [p for p in pnls if p > 0]
    return {
        "net_pnl": round(float(eq[-1] - start_eq), 2) if len(eq) else 0.0,
        "sharpe": ratio(daily, downside=False),
        "max_drawdown": round(float((peak - eq).max()), 2) if len(eq) else 0.0,
        "trades": len(pnls),
        "win_rate": round(len(wins) / len(pnls), 4) if pnls else None,
        "sessions": len(daily),
    }


def evaluate(
    settings: Settings,
    policy_path: Path,
    data_paths: list[Path] | None,
    eval_from: str,
    eval_to: str | None = None,
) -> dict[str, Any]:
    """Run the policy and the baselines on [eval_from, eval_to); returns a table of statistics."""
    tz = settings.data.timezone
    rec = load_bars(
        settings.data, data_paths, tick_size=settings.instrument.tick_size, symbol=settings.instrument.symbol
    )
    acc = rec.accepted()
    ts_all = rec.ts_ns[acc]
    lo = bound_ns(eval_from, tz)
    assert lo is not None
    first = int(np.searchsorted(ts_all, lo))
    from trader.features.warmup import warmup_bars

    warm = warmup_bars(settings)
    if first >= len(ts_all):
        raise ValueError(f"no bars at or after {eval_from}")
    if first < warm:
        raise ValueError(
            f"only {first} bars before {eval_from}; the indicators need {warm} (features.warmup_bars)"
        )
    start = _iso(int(ts_all[first - warm]), tz)
    base = settings.model_copy(
        update={
            "advisor": settings.advisor.model_copy(update={"mode": "off"}),
            "policy": settings.policy.model_copy(update={"path": Path(policy_path)}),
            "data": settings.data.model_copy(update={"start": start, "end": eval_to}),
        }
    )
    clock = SessionClock(settings.instrument)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in (
            ("policy", base.policy),
            ("flat", PolicyConfig(path=Path("trader.policy.rules:Flat"))),
            (
                "ema_cross",
                PolicyConfig(
                    path=Path("trader.policy.rules:EmaCross"), options={"fast": EMA_FAST, "slow": EMA_SLOW}
                ),
            ),
        ):
            arm = base.model_copy(update={"policy": policy})
            run = build_replay(arm, Path(tmp) / f"{name}.sqlite", data_paths)
            eng = run.engine
            try:
                stats: RunStats = asyncio.run(_run(eng))
            finally:
                run.journal.close()
            ts = np.asarray(stats.ts_ns, dtype=np.int64)
            eq = np.asarray(stats.equity)
            keep = ts >= lo
            first_decision = int(np.flatnonzero(keep)[0])
            start_eq = (
                float(eq[first_decision - 1]) if first_decision else settings.account.starting_balance_usd
            )
            pnls = [t.pnl_usd for t in eng.portfolio.trades if t.entry_ts_ns >= lo]
            results[name] = _summary(ts[keep], eq[keep], pnls, start_eq, clock)
    hi = bound_ns(eval_to, tz)
    window = (ts_all >= lo) & (ts_all < hi if hi is not None else True)
    ts_eval, close_eval = ts_all[window], rec.close[acc][window]
    results["buy_and_hold"] = _buy_and_hold(base, ts_eval, close_eval, clock)
    order = ("policy", "flat", "buy_and_hold", "ema_cross")
    return {
        "from": _iso(int(ts_eval[0]), tz),
        "to": _iso(int(ts_eval[-1]), tz),
        "bars": len(ts_eval),
        "policy_path": str(policy_path),
        "results": {k: results[k] for k in order},
    }


def _buy_and_hold(s: Settings, ts: np.ndarray, close: np.ndarray, clock: SessionClock) -> dict[str, Any]:
    ins = s.instrument
    slip = ins.slippage_ticks * ins.tick_size
    entry = close[0] + slip
    start = s.account.starting_balance_usd
    eq = start - ins.commission_per_side_usd + (close - entry) * ins.point_value_usd
    exit_px = close[-1] - slip
    final = start + (exit_px - entry) * ins.point_value_usd - 2 * ins.commission_per_side_usd
    eq[-1] = final
    return _summary(ts, eq, [final - start], start, clock)


def format_evaluation(ev: dict[str, Any]) -> str:
    head = f"{'strategy':<14}{'net P&L $':>12}{'Sharpe':>9}{'max DD $':>11}{'trades':>8}{'win rate':>10}"
    lines = [
        f"held-out {ev['from']} .. {ev['to']} ({ev['bars']} bars), policy {Path(ev['policy_path']).name}",
        head,
        "-" * len(head),
    ]
    for name, r in ev["results"].items():
        sharpe = "-" if r["sharpe"] is None else f"{r['sharpe']:.2f}"
        win = "-" if r["win_rate"] is None else f"{r['win_rate']:.0%}"
        lines.append(
            f"{name:<14}{r['net_pnl']:>12,.2f}{sharpe:>9}{r['max_drawdown']:>11,.2f}{r['trades']:>8}{win:>10}"
        )
    return "\n".join(lines)
