"""Paper broker fills and stops, portfolio accounting and trailing drawdown, execution planning."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import make_settings
from trader.domain import Action, Bar, Fill, OrderIntent, OrderKind, Side, TickGrid, Verdict
from trader.execution.brokers.paper import PaperBroker
from trader.execution.planner import ExecutionPlanner
from trader.execution.portfolio import Portfolio

S = make_settings()  # NQ: tick 0.25, $20/pt, $2.25/side, 1 tick slippage
MIN = 60_000_000_000


def bar(i: int, o: float, h: float, lo: float, c: float) -> Bar:
    return Bar(i * MIN, o, h, lo, c, 100.0)


def submit(
    broker: PaperBroker, side: Side, qty: int = 1, purpose: str = "entry", stop_ticks: int = 0
) -> None:
    asyncio.run(
        broker.submit(OrderIntent(f"c{purpose}{side}", side, qty, OrderKind.MARKET, purpose, stop_ticks))
    )


# -- paper broker ---------------------------------------------------------------------------------
def test_market_order_fills_at_next_open_plus_slippage_with_commission():
    b = PaperBroker(S)
    submit(b, Side.BUY, stop_ticks=40)
    assert b.drain_events() == []  # nothing until the next bar
    b.on_bar(bar(1, 16000.0, 16004.0, 15999.0, 16002.0))
    (f,) = b.drain_events()
    assert (f.price, f.qty, f.side, f.commission_usd) == (16000.25, 1, Side.BUY, 2.25)
    assert b.working_stop == 16000.25 - 40 * 0.25


def test_sell_entry_slips_down():
    b = PaperBroker(S)
    submit(b, Side.SELL, stop_ticks=8)
    b.on_bar(bar(1, 16000.0, 16001.0, 15990.0, 15995.0))
    (f,) = b.drain_events()
    assert f.price == 15999.75 and b.working_stop == 16001.75


def test_long_stop_triggers_inside_the_bar_at_the_stop_minus_slippage():
    b = PaperBroker(S)
    submit(b, Side.BUY, stop_ticks=20)  # stop 5 points under the fill
    b.on_bar(bar(1, 16000.0, 16003.0, 15998.0, 16001.0))
    b.drain_events()
    b.on_bar(bar(2, 15999.0, 15999.5, 15994.0, 15996.0))  # low 15994 < stop 15995.25
    (f,) = b.drain_events()
    assert (f.side, f.price, f.purpose) == (Side.SELL, 15995.0, "stop")
    assert b.position == 0 and b.working_stop is None


def test_a_gap_through_the_stop_fills_at_the_open_not_the_stop():
    b = PaperBroker(S)
    submit(b, Side.BUY, stop_ticks=20)
    b.on_bar(bar(1, 16000.0, 16003.0, 15998.0, 16001.0))
    b.drain_events()
    b.on_bar(bar(2, 15980.0, 15985.0, 15975.0, 15982.0))  # opens 15 points under the stop
    (f,) = b.drain_events()
    assert f.price == 15979.75


def test_short_stop_and_short_gap():
    b = PaperBroker(S)
    submit(b, Side.SELL, stop_ticks=20)
    b.on_bar(bar(1, 16000.0, 16001.0, 15997.0, 15999.0))
    b.drain_events()
    stop = b.working_stop
    assert stop == 16004.75
    b.on_bar(bar(2, 16010.0, 16012.0, 16008.0, 16011.0))
    (f,) = b.drain_events()
    assert (f.side, f.price) == (Side.BUY, 16010.25)


def test_stop_can_trigger_in_the_entry_bar():
    b = PaperBroker(S)
    submit(b, Side.BUY, stop_ticks=8)
    b.on_bar(bar(1, 16000.0, 16001.0, 15990.0, 15991.0))
    entry, stop = b.drain_events()
    assert (
        entry.side == Side.BUY and stop.purpose == "stop" and stop.price == 15998.0
    )  # stop 15998.25 - 1 tick


def test_an_exit_after_the_stop_already_closed_the_position_does_nothing():
    b = PaperBroker(S)
    submit(b, Side.BUY, stop_ticks=8)
    b.on_bar(bar(1, 16000.0, 16001.0, 15990.0, 15991.0))
    b.drain_events()
    submit(b, Side.SELL, purpose="exit")
    b.on_bar(bar(2, 15991.0, 15992.0, 15990.0, 15991.0))
    assert b.drain_events() == [] and b.position == 0


@given(o=st.floats(10000, 20000), spread=st.floats(0, 50), ticks=st.integers(1, 200))
@hsettings(max_examples=200, deadline=None)
def test_every_fill_and_stop_is_on_the_tick_grid(o, spread, ticks):
    grid = TickGrid(0.25)
    o = grid.round(o)
    b = PaperBroker(S)
    submit(b, Side.BUY, stop_ticks=ticks)
    b.on_bar(bar(1, o, o + spread, o - spread, o))
    for f in b.drain_events():
        assert f.price / 0.25 == round(f.price / 0.25)
    if b.working_stop is not None:
        assert b.working_stop / 0.25 == round(b.working_stop / 0.25)


# -- portfolio ------------------------------------------------------------------------------------
def fill(side: Side, qty: int, price: float, ts: int = 0, purpose: str = "entry") -> Fill:
    return Fill("x", ts, side, qty, price, 2.25 * qty, purpose)


def test_round_trip_pnl_is_net_of_both_commissions_and_counts_a_loss():
    p = Portfolio(S)
    p.apply_fill(fill(Side.BUY, 1, 16000.0))
    (t,) = p.apply_fill(fill(Side.SELL, 1, 16001.0, purpose="exit"))
    assert t.pnl_usd == pytest.approx(20.0 - 4.5)
    assert p.balance_usd == pytest.approx(50_000 + 15.5)
    p.apply_fill(fill(Side.SELL, 1, 16000.0))
    (t,) = p.apply_fill(fill(Side.BUY, 1, 16000.5))
    assert t.pnl_usd == pytest.approx(-10.0 - 4.5)
    snap = p.snapshot()
    assert snap.consecutive_losses == 1 and snap.recent_win_rate == 0.5 and snap.position == 0


def test_adding_averages_the_entry_and_partial_exit_realises_the_right_share():
    s = make_settings(risk={"max_contracts": 3})
    p = Portfolio(s)
    p.apply_fill(fill(Side.BUY, 1, 16000.0))
    p.apply_fill(fill(Side.BUY, 2, 16003.0))
    assert p.position == 3 and p.avg_entry == pytest.approx(16002.0)
    (t,) = p.apply_fill(fill(Side.SELL, 1, 16004.0))
    assert t.qty == 1 and p.position == 2 and p.avg_entry == pytest.approx(16002.0)
    assert t.pnl_usd == pytest.approx(2 * 20 - 2.25 * 1 - 2.25)  # entry commission share: 6.75/3


def test_a_reversal_fill_closes_and_opens_the_other_side():
    p = Portfolio(S)
    p.apply_fill(fill(Side.BUY, 1, 16000.0))
    (t,) = p.apply_fill(fill(Side.SELL, 2, 16002.0))
    assert t.pnl_usd == pytest.approx(40 - 4.5) and p.position == -1 and p.avg_entry == 16002.0


def test_trailing_drawdown_threshold_follows_the_peak_and_locks():
    p = Portfolio(S)  # start 50,000, limit 2,500, lock at 50,100
    assert p.threshold_usd == 47_500.0
    p.apply_fill(fill(Side.BUY, 1, 16000.0))  # balance 49,997.75
    p.mark_bar(bar(1, 16000.0, 16050.0, 15990.0, 16040.0), 1)  # high +50 pts = +1000 USD unrealised peak
    assert p.peak_equity_usd == pytest.approx(49_997.75 + 1000.0)
    assert p.threshold_usd == pytest.approx(49_997.75 + 1000.0 - 2500.0)
    p.mark_bar(bar(2, 16040.0, 16200.0, 16030.0, 16150.0), 1)  # peak way up: threshold locks at start + 100
    assert p.threshold_usd == 50_100.0
    p.mark_bar(bar(3, 16150.0, 16150.0, 15900.0, 15950.0), 1)  # falls: threshold never goes down
    assert p.threshold_usd == 50_100.0
    assert p.snapshot().equity_usd < p.threshold_usd  # breached: the risk engine flattens


def test_daily_pnl_and_streak_reset_with_a_new_session():
    p = Portfolio(S)
    p.mark_bar(bar(1, 1.0, 1.0, 1.0, 1.0), 1)
    for _ in range(3):
        p.apply_fill(fill(Side.BUY, 1, 16000.0))
        p.apply_fill(fill(Side.SELL, 1, 15999.0))
    assert p.snapshot().consecutive_losses == 3 and p.snapshot().daily_pnl_usd < 0
    p.mark_bar(bar(2, 1.0, 1.0, 1.0, 1.0), 2)
    snap = p.snapshot()
    assert snap.consecutive_losses == 0 and snap.recent_trades == 0 and snap.daily_pnl_usd == 0.0


def test_snapshot_is_rebuilt_when_protection_changes():
    p = Portfolio(S)
    p.apply_fill(fill(Side.BUY, 1, 16000.0))
    a = p.snapshot()
    assert p.snapshot() is a
    p.set_stop(15990.0)
    assert p.snapshot().stop_price == 15990.0


# -- planner --------------------------------------------------------------------------------------
def test_entry_has_an_atr_bracket_and_a_deterministic_client_id():
    pl = ExecutionPlanner(S, "abcdef0123456789")
    p = Portfolio(S)
    plan = pl.plan(Verdict(Action.BUY), p.snapshot(), atr=3.1, bar_index=42)
    (o,) = plan.orders
    assert o.client_id == "abcdef01-42-0" and o.purpose == "entry" and o.stop_ticks == 25  # ceil(6.2/0.25)


def test_sell_while_long_is_an_exit_unless_reversing():
    p = Portfolio(S)
    p.apply_fill(fill(Side.BUY, 1, 16000.0))
    (o,) = ExecutionPlanner(S, "r" * 16).plan(Verdict(Action.SELL), p.snapshot(), 3.0, 1).orders
    assert o.purpose == "exit" and o.side == Side.SELL
    rs = make_settings(execution={"reverse_on_opposite": True})
    orders = ExecutionPlanner(rs, "r" * 16).plan(Verdict(Action.SELL), p.snapshot(), 3.0, 1).orders
    assert [x.purpose for x in orders] == ["exit", "reverse"] and orders[1].stop_ticks > 0
    reduce = ExecutionPlanner(rs, "r" * 16).plan(Verdict(Action.SELL, reduce_only=True), p.snapshot(), 3.0, 1)
    assert [x.purpose for x in reduce.orders] == ["exit"]


def test_move_to_break_even_puts_the_stop_at_entry_plus_offset_on_the_grid():
    p = Portfolio(S)
    p.apply_fill(fill(Side.BUY, 1, 16000.1))  # an off-grid average (e.g. from adds)
    p.set_stop(15990.0)
    plan = ExecutionPlanner(S, "r" * 16).plan(Verdict(Action.MOVE_TO_BE), p.snapshot(), 3.0, 1)
    assert plan.move_stop == 16000.5 and plan.break_even  # 16000.35 rounded up to the grid


def test_trailing_stop_only_ratchets_towards_the_market():
    pl = ExecutionPlanner(S, "r" * 16)
    assert pl.trail(1, 15990.0, 20, 16010.0) == 16005.0
    assert pl.trail(1, 16005.0, 20, 16008.0) is None  # would loosen
    assert pl.trail(-1, 16020.0, 20, 16000.0) == 16005.0
    assert pl.trail(0, None, 20, 16000.0) is None


def test_flatten_verdict_closes_the_whole_position():
    p = Portfolio(make_settings(risk={"max_contracts": 2}))
    p.apply_fill(fill(Side.SELL, 2, 16000.0))
    (o,) = (
        ExecutionPlanner(S, "r" * 16)
        .plan(Verdict(Action.HOLD, flatten=True, flatten_reason="kill_switch"), p.snapshot(), 3.0, 9)
        .orders
    )
    assert (o.side, o.qty, o.purpose) == (Side.BUY, 2, "flatten:kill_switch")


@pytest.mark.parametrize(("flatten_at", "held"), [("15:55", True), ("off", False)])
def test_a_position_open_when_its_session_ends_is_marked_held_over_unless_flatten_is_off(flatten_at, held):
    p = Portfolio(make_settings(instrument={"flatten_at": flatten_at}))
    p.mark_bar(bar(0, 16000, 16001, 15999, 16000), session_id=100)
    assert not p.held_over
    p.apply_fill(fill(Side.BUY, 1, 16000.0))
    p.mark_bar(bar(1, 16000, 16001, 15999, 16000), session_id=100)
    assert not p.held_over  # the same session
    p.mark_bar(bar(2, 16000, 16001, 15999, 16000), session_id=101)
    assert p.held_over is held
    flat = Portfolio(make_settings())
    flat.mark_bar(bar(0, 16000, 16001, 15999, 16000), session_id=100)
    flat.mark_bar(bar(1, 16000, 16001, 15999, 16000), session_id=101)
    assert not flat.held_over  # nothing open
    adopted = Portfolio(make_settings())
    adopted.apply_fill(fill(Side.BUY, 1, 16000.0))  # before any bar (a broker's position taken over)
    adopted.mark_bar(bar(0, 16000, 16001, 15999, 16000), session_id=100)
    assert not adopted.held_over  # no session had ended yet
