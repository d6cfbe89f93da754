"""Run observers (dashboard, notifications, progress) see what the journal holds, and a broken
observer never changes the run."""

from __future__ import annotations

import itertools
import sqlite3

from tests.conftest import NQ, make_settings
from trader.domain import (
    BarDecided,
    BatchDone,
    FillApplied,
    HaltChanged,
    RunEvent,
    SessionEnded,
    StopMoved,
)
from trader.replay import replay


class Recorder:
    def __init__(self) -> None:
        self.events: list[RunEvent] = []

    def on_event(self, event: RunEvent) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


class Exploding:
    def __init__(self) -> None:
        self.calls = 0

    def on_event(self, event: RunEvent) -> None:
        self.calls += 1
        if isinstance(event, FillApplied):
            raise RuntimeError("a dashboard bug")


def _settings():
    return make_settings(data={"paths": [str(NQ)]})


def test_observers_see_every_decision_fill_trade_stop_and_session_the_journal_holds(tmp_path):
    rec = Recorder()
    out = replay(_settings(), journal_path=tmp_path / "j.sqlite", observers=(rec,))
    assert out.status == "completed"
    decided = rec.of(BarDecided)
    assert len(decided) == out.stats.bars
    assert [e.bar_index for e in decided] == list(range(len(decided)))
    assert [e.equity_usd for e in decided] == out.stats.equity
    with sqlite3.connect(tmp_path / "j.sqlite") as db:
        finals = [r[0] for r in db.execute("SELECT final_action FROM decisions ORDER BY bar_index")]
        fills = db.execute("SELECT ts_ns, side, qty, price FROM fills ORDER BY seq").fetchall()
        stops = db.execute(
            "SELECT stop_price FROM account WHERE reason LIKE 'fill:%' ORDER BY rowid"
        ).fetchall()
    assert [int(e.verdict.action) for e in decided] == finals
    applied = rec.of(FillApplied)
    assert len(fills) > 2
    assert [(e.fill.ts_ns, int(e.fill.side), e.fill.qty, e.fill.price) for e in applied] == fills
    assert [e.stop_price for e in applied] == [s[0] for s in stops]
    closed = [t for e in applied for t in e.trades]
    assert closed == out.trades
    # every stop change is announced once, and consecutive announcements chain old -> new
    moves = rec.of(StopMoved)
    assert moves, "a run with trades moves stops"
    for before, after in itertools.pairwise(moves):
        assert after.old == before.new
    assert all(m.old != m.new for m in moves)
    # sessions: one summary per trading day, adding up to the run's net P&L
    sessions = rec.of(SessionEnded)
    assert len(sessions) == out.report["trading_days"] or len(sessions) == out.report["trading_days"] + 1
    assert abs(sum(s.net_pnl_usd for s in sessions) - out.report["net_pnl"]) < 0.01
    # each summary comes with the session's last bar (16:59 New York, the bar that ends at the
    # 17:00 close), right after that bar's decision, not at the next session's first bar
    from trader.features.clock import SessionClock

    clock = SessionClock(_settings().instrument)
    closing = [s for s in sessions if clock.minute_of_day(s.last_ts_ns) == 16 * 60 + 59]
    # Thanksgiving's two early closes (13:00, 13:15) end at their last bar, seen at the next
    # session's first bar; every other session ends with its 16:59 bar
    assert len(closing) == len(sessions) - 2
    early = [s for s in sessions if s not in closing]
    assert [clock.minute_of_day(s.last_ts_ns) for s in early] == [12 * 60 + 59, 13 * 60 + 14]
    for s in closing:
        k = rec.events.index(s)
        before = rec.events[k - 1]
        assert isinstance(before, BarDecided) and before.bar.ts_ns == s.last_ts_ns
    assert rec.of(BatchDone)[-1].bars == out.stats.bars
    assert rec.of(BatchDone)[-1].total_bars is not None


class Halter(Recorder):
    """Halts entries at bar 1500 and resumes at bar 1800, as an operator would between bars."""

    controls = None

    def on_event(self, event: RunEvent) -> None:
        super().on_event(event)
        if isinstance(event, BarDecided) and self.controls is not None:
            if event.bar_index == 1500:
                self.controls.apply("halt", "operator test")
            elif event.bar_index == 1800:
                self.controls.apply("resume")


def test_a_halt_is_announced_when_it_starts_and_when_it_ends(tmp_path):
    import asyncio

    from trader.wiring import build_replay

    obs = Halter()
    run = build_replay(_settings(), tmp_path / "j.sqlite", observers=(obs,))
    obs.controls = run.controls

    async def go() -> None:
        await run.engine.run()
        await run.engine.close()

    asyncio.run(go())
    run.journal.close()
    halts = obs.of(HaltChanged)
    assert [h.reasons for h in halts] == [("operator test",), ()]
    at = {e.bar.ts_ns: e.bar_index for e in obs.of(BarDecided)}
    assert [at[h.ts_ns] for h in halts] == [1500, 1800]
    # while halted no entry was decided
    halted = [e for e in obs.of(BarDecided) if 1500 < e.bar_index <= 1800]
    assert all(e.verdict.action not in (1, 2) or e.position != 0 for e in halted)
    assert any(
        any(v.rule == "halted" or "operator test" in v.reason for v in e.verdict.vetoes) for e in halted
    )


def test_an_observer_that_raises_is_dropped_and_the_run_is_unchanged(tmp_path):
    plain = replay(_settings(), journal_path=tmp_path / "a.sqlite")
    boom = Exploding()
    rec = Recorder()
    watched = replay(_settings(), journal_path=tmp_path / "b.sqlite", observers=(boom, rec))
    assert watched.status == "completed"
    assert watched.trades == plain.trades
    assert watched.stats.equity == plain.stats.equity
    calls_at_drop = boom.calls
    assert calls_at_drop < len(rec.events)  # it was not called again after it raised
    assert len(rec.of(FillApplied)) == watched.stats.fills
