"""Crash recovery: continue an unfinished run from its journal.

The journal commits each bar's rows together (decision, orders, fills, trades, account), so after
a kill -9 it ends exactly at a bar boundary. On restart the same run continues:

1. its journaled decisions are re-driven through a fresh engine over the same bars (``observe`` then
   ``decide`` with the journaled fused action, journal and LLM detached), which rebuilds everything
   the engine holds — position, average entry, stop, break-even and trailing state, balance, peak
   equity and the drawdown threshold, daily P&L, the loss streak and recent-trades window, the
   paper broker's working orders, and the order/fill/trade sequence numbers;
2. the rebuilt account is checked against the last journaled decision row; any difference stops
   the restart with the numbers (nothing is assumed);
3. the feed continues with the next bar under the same run id, so client order ids continue
   deterministically and an order the journal already holds can never be sent again.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import structlog

from trader.config import Settings
from trader.engine import NullJournal, ReplayRun

log = structlog.get_logger(__name__)

# Sections that may differ between the crashed process and the restart.
MAY_DIFFER = ("service", "logging", "journal")


class RecoveryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Recovered:
    run_id: str
    last_bar: int  # last journaled bar index (-1 = none)
    next_row: int  # first raw row the feed hands out now
    position: int
    balance_usd: float


def config_differences(old_json: str, settings: Settings) -> list[str]:
    old = json.loads(old_json)
    new = json.loads(settings.model_dump_json())
    out = []
    for section in sorted(set(old) | set(new)):
        if section in MAY_DIFFER or old.get(section) == new.get(section):
            continue
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(section)
    return out


async def recover(run: ReplayRun) -> Recovered:
    eng, journal = run.engine, run.journal
    con = sqlite3.connect(journal.path)
    try:
        actions = dict(
            con.execute(
                "SELECT bar_index, fused_action FROM decisions WHERE run_id=?", (run.run_id,)
            ).fetchall()
        )
        last_row: Any = con.execute(
            "SELECT bar_index, position, balance_usd, equity_usd, threshold_usd FROM decisions "
            "WHERE run_id=? ORDER BY bar_index DESC LIMIT 1",
            (run.run_id,),
        ).fetchone()
        max_qid = con.execute(
            "SELECT max(query_id) FROM llm_queries WHERE run_id=?", (run.run_id,)
        ).fetchone()[0]
    finally:
        con.close()
    last = -1 if last_row is None else int(last_row[0])
    if last >= 0 and len(actions) != last + 1:
        raise RecoveryError(f"run {run.run_id}: journal has {len(actions)} decisions for bars 0..{last}")

    rb = run.recorded
    assert rb is not None, "a recorded-bars run"
    saved_journal, saved_advisor = eng.journal, eng.advisor
    eng.journal, eng.advisor = NullJournal(), None
    row = 0
    try:
        while eng.bar_index <= last and row < len(rb):
            ts = int(rb.ts_ns[row])
            if ts < 0:
                eng._reject(None, row, "bad_timestamp")
            elif eng.observe(rb.bar(row), row):
                a = int(actions[eng._i])
                await eng.decide(a, 1.0, [1.0 if k == a else 0.0 for k in range(6)])
            row += 1
    finally:
        eng.journal, eng.advisor = saved_journal, saved_advisor
    pf = eng.portfolio
    if last_row is not None:
        _, pos, bal, eq, thr = last_row
        got = (pf.position, pf.balance_usd, pf.balance_usd + pf.unrealized_usd, pf.threshold_usd)
        if got[0] != pos or any(abs(x - y) > 1e-6 for x, y in zip(got[1:], (bal, eq, thr), strict=True)):
            raise RecoveryError(
                f"run {run.run_id}: re-driving {last + 1} journaled bars gives position {got[0]}, balance "
                f"{got[1]:.2f}, equity {got[2]:.2f}, threshold {got[3]:.2f}; the journal says {pos}, "
                f"{bal:.2f}, {eq:.2f}, {thr:.2f}. Not continuing: check the data files and config."
            )
    if eng.advisor is not None and max_qid is not None:
        eng.advisor._qid = int(max_qid)  # type: ignore[attr-defined]
    eng.feed.start_row = row  # type: ignore[attr-defined]
    log.warning(
        "recovered",
        run_id=run.run_id,
        last_bar=last,
        next_row=row,
        position=pf.position,
        stop=pf.stop_price,
        balance=round(pf.balance_usd, 2),
    )
    return Recovered(run.run_id, last, row, pf.position, pf.balance_usd)
