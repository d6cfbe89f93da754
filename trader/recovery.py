"""Continue a run from its journal, for every mode: one re-drive.

The journal commits each bar's rows together (decision, orders, fills, trades, account), so after
a kill -9 it ends exactly at a bar boundary; a graceful stop or a failed run ends the same way,
plus what the shutdown did between bars (cancelled entries, a flatten, late fills). On restart
the same run continues:

1. its journaled decisions are re-driven through the run's own engine over the same bars
   (:meth:`Engine.redrive`: each bar's journaled final verdict, so whatever the controls, a
   backfill, a reload or the LLM said then, the same orders and stop changes follow; the journal
   and the LLM detached); then the operator's controls are re-applied in order. That rebuilds everything
   the engine holds: position, average entry, stop, break-even and trailing state, balance, peak
   equity and the drawdown threshold, daily P&L, the loss streak and recent-trades window, the
   paper broker's working orders, the order/fill/trade sequence numbers, and the operator state
   (halt, kill switch, a pending flatten). Bars come from the journal (service runs journal every
   bar) or, for recorded-bar runs, from the same data files. A paper broker simulates the fills
   again; a live run's fills are the journaled ones (what the broker really executed);
2. the rebuilt account is checked against the last journaled decision and the last account row;
   any difference stops the restart with the numbers (nothing is assumed);
3. the feed continues after the last journaled bar under the same run id, so client order ids
   continue deterministically and an order the journal already holds can never be sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from trader.domain import Action, Verdict, Veto
from trader.errors import RecoveryError
from trader.journal import reader

if TYPE_CHECKING:
    from trader.wiring import Run

log = structlog.get_logger(__name__)
_HOLD = Verdict(Action.HOLD)


@dataclass(frozen=True)
class Recovered:
    run_id: str
    last_bar: int  # last journaled bar index (-1 = none)
    bars: int  # bars re-driven
    position: int
    balance_usd: float


def _check(
    run_id: str, what: str, got: tuple[float, ...], want: tuple[float, ...], names: tuple[str, ...]
) -> None:
    if int(got[0]) != int(want[0]) or any(abs(x - y) > 1e-6 for x, y in zip(got[1:], want[1:], strict=True)):
        have = ", ".join(f"{n} {g:.2f}" for n, g in zip(names, got, strict=True))
        says = ", ".join(f"{n} {w:.2f}" for n, w in zip(names, want, strict=True))
        raise RecoveryError(
            f"run {run_id}: re-driving the journal gives {have}; {what} says {says}. "
            "Not continuing: check the data files and config, or start a new account with --fresh."
        )


async def recover(run: Run) -> Recovered:
    """Re-drive ``run`` (built with its journaled run id) to where its journal ends."""
    eng, controls = run.engine, run.controls
    h = reader.run_history(run.journal.path, run.run_id)
    last = -1 if h.last_decision is None else h.last_decision.bar_index
    live_fills = run.mode == "live"
    stops = {i for i, a, _ in h.controls if a == "stop"}

    def verdict(i: int) -> Verdict:
        final, flatten_reason, vetoes = h.verdicts[i]
        action = Action(final)
        vs = tuple(
            Veto(*v.split(":", 1)) if ":" in v else Veto(v, "") for v in (vetoes or "").split(";") if v
        )
        # a vetoed BUY/SELL that still went through was a vetoed reversal turned exit-only
        reduce_only = bool(vs) and action in (Action.BUY, Action.SELL)
        return Verdict(action, vs, reduce_only, bool(flatten_reason), flatten_reason or "")

    async def after_bar(i: int) -> None:
        if i == last and h.last_decision is not None:
            pf = eng.portfolio
            d = h.last_decision
            _check(
                run.run_id,
                f"its last decision (bar {i})",
                (pf.position, pf.balance_usd, pf.balance_usd + pf.unrealized_usd, pf.threshold_usd),
                (d.position, d.balance_usd, d.equity_usd, d.threshold_usd),
                ("position", "balance", "equity", "threshold"),
            )
        if not live_fills and i + 1 in stops:
            await eng.redrive_shutdown(h.between_bar_orders.get(i, ()))

    redriven = 0
    if h.bars:  # a service run on the live feed: every bar is in the journal
        decided = [b for b in h.bars if b.kind == "bar"]
        if len(decided) != len(h.verdicts):
            raise RecoveryError(
                f"run {run.run_id}: journal has {len(decided)} bars but {len(h.verdicts)} decisions"
            )
        given = 0
        for jb in h.bars:
            if jb.kind == "prime":
                eng.redrive_prime(jb.bar)
                continue
            assert jb.index is not None
            fills = None
            if live_fills:
                fills, given = h.fills[given : jb.fills_through], max(given, jb.fills_through)
            await eng.redrive(jb.bar, -1, verdict(jb.index), fills)
            redriven += 1
            await after_bar(jb.index)
        if live_fills and given < len(h.fills):
            eng.redrive_fills(h.fills[given:])  # late fills journaled at a stop
        last_ts = h.bars[-1].bar.ts_ns if h.bars else -1
        next_row = -1
    else:  # recorded bars: the same files give the same rows
        rb = run.recorded
        if rb is None:
            raise RecoveryError(f"run {run.run_id}: journal has no bars to re-drive a live-feed run from")
        if last >= 0 and len(h.verdicts) != last + 1:
            raise RecoveryError(
                f"run {run.run_id}: journal has {len(h.verdicts)} decisions for bars 0..{last}"
            )
        row = 0
        while eng.bar_index <= last and row < len(rb):
            i = eng.bar_index
            bar = rb.bar(row) if int(rb.ts_ns[row]) >= 0 else None
            if bar is None:
                await eng.redrive(None, row, _HOLD)
            elif i not in h.verdicts:
                raise RecoveryError(f"run {run.run_id}: bar {i} of the data files has no journaled decision")
            elif await eng.redrive(bar, row, verdict(i)):
                redriven += 1
                await after_bar(i)
            row += 1
        if eng.bar_index <= last:
            raise RecoveryError(
                f"run {run.run_id}: the data files end at bar {eng.bar_index - 1} but the journal has "
                f"decisions up to bar {last}; use the same data files (data.paths) to continue"
            )
        last_ts = eng.last_bar.ts_ns if eng.last_bar is not None else -1
        next_row = row
    controls.restore((a, r) for _, a, r in h.controls)  # halt, kill switch, flatten: as they ended
    pf = eng.portfolio
    if h.end_account is not None:
        pos, bal, thr = h.end_account
        _check(
            run.run_id,
            "its account at the end of the run",
            (pf.position, pf.balance_usd, pf.threshold_usd),
            (pos, bal, thr),
            ("position", "balance", "threshold"),
        )
    advisor = eng.advisor
    if advisor is not None:
        advisor.continue_after(h.max_query_id)
    eng.feed.resume_after(last_ts, next_row)
    eng.journal_control("recover", "restart", "accepted", f"continued after bar {last}")
    log.warning(
        "recovered",
        run_id=run.run_id,
        last_bar=last,
        bars=redriven,
        position=pf.position,
        stop=pf.stop_price,
        balance=round(pf.balance_usd, 2),
        halted_by=controls.halt_reasons(),
    )
    return Recovered(run.run_id, last, redriven, pf.position, pf.balance_usd)
