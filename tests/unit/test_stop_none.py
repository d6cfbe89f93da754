"""execution.stop_mode = "none": entries carry no protective stop; the stop actions (MOVE_TO_BE,
ENABLE_TRAIL, DISABLE_TRAIL) have nothing to move, so the mask never offers them and the planner
plans nothing for them; the paper broker holds no stop."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import flat, make_settings
from trader.decision.mask import ActionMasker
from trader.domain import Action, Bar, Fill, OrderKind, Verdict
from trader.errors import ConfigError
from trader.execution.brokers.paper import PaperBroker
from trader.execution.planner import ExecutionPlanner
from trader.execution.portfolio import Portfolio

NONE = make_settings(execution={"stop_mode": "none"})
ATR = make_settings()
STOP_ACTIONS = (Action.MOVE_TO_BE, Action.ENABLE_TRAIL, Action.DISABLE_TRAIL)
MIN = 60_000_000_000


def held(trailing: bool = False):
    # long one contract, 10 points in profit: every stop action is legal with stops
    return flat(position=1, avg_entry=16000.0, stop_price=None, trailing=trailing, unrealized_usd=200.0)


@pytest.mark.parametrize("trailing", [False, True])
def test_the_mask_never_offers_a_stop_action_without_stops(trailing):
    with_stops = ActionMasker(ATR).mask(held(trailing), 16010.0).copy()
    without = ActionMasker(NONE).mask(held(trailing), 16010.0).copy()
    assert with_stops[Action.MOVE_TO_BE] and with_stops[Action.ENABLE_TRAIL] != trailing
    assert not any(without[a] for a in STOP_ACTIONS)
    assert without[Action.HOLD] and without[Action.SELL]  # the exit stays open


def test_an_entry_carries_no_stop():
    plan = ExecutionPlanner(NONE, "r" * 16).plan(Verdict(Action.BUY), flat(), atr=3.0, bar_index=7)
    assert plan is not None
    (o,) = plan.orders
    assert (o.purpose, o.stop_ticks, o.kind) == ("entry", 0, OrderKind.MARKET)
    with_stops = ExecutionPlanner(ATR, "r" * 16).plan(Verdict(Action.BUY), flat(), atr=3.0, bar_index=7)
    assert with_stops is not None and with_stops.orders[0].stop_ticks == 24


def test_a_reversal_carries_no_stop_either():
    s = make_settings(execution={"stop_mode": "none", "reverse_on_opposite": True})
    plan = ExecutionPlanner(s, "r" * 16).plan(Verdict(Action.SELL), held(), atr=3.0, bar_index=7)
    assert plan is not None and [(o.purpose, o.stop_ticks) for o in plan.orders] == [
        ("exit", 0),
        ("reverse", 0),
    ]


@pytest.mark.parametrize("action", STOP_ACTIONS)
def test_a_stop_action_that_reaches_the_planner_anyway_plans_nothing(action):
    # e.g. a Python policy that ignores the mask: no stop is made out of nothing
    assert ExecutionPlanner(NONE, "r" * 16).plan(Verdict(action), held(True), 3.0, 1) is None
    assert ExecutionPlanner(ATR, "r" * 16).plan(Verdict(action), held(True), 3.0, 1) is not None


def test_the_paper_broker_holds_no_stop_and_a_deep_fall_fills_nothing():
    broker = PaperBroker(NONE)
    planner = ExecutionPlanner(NONE, "r" * 16)
    plan = planner.plan(Verdict(Action.BUY), flat(), atr=3.0, bar_index=1)
    assert plan is not None
    asyncio.run(broker.submit(plan.orders[0]))
    broker.on_bar(Bar(MIN, 16000.0, 16001.0, 15999.0, 16000.0, 10.0))
    (entry,) = broker.drain_events()
    assert isinstance(entry, Fill) and broker.working_stop is None and broker.position == 1
    broker.on_bar(Bar(2 * MIN, 15900.0, 15901.0, 15000.0, 15100.0, 10.0))  # 1,000 points down
    assert broker.drain_events() == [] and broker.position == 1
    p = Portfolio(NONE)
    p.apply_fill(entry)
    assert p.snapshot().stop_price is None


def test_the_one_stop_size_check_does_not_apply_without_a_stop():
    # no stop to size against: the daily loss limit and the trailing drawdown breach (both
    # flatten) bound the loss instead
    wide = {"stop_ticks": 1_000_000}
    with pytest.raises(ConfigError, match=r"execution\.order_qty: 1 contracts stopped out lose"):
        make_settings(execution=wide | {"stop_mode": "ticks"})
    s = make_settings(execution=wide | {"stop_mode": "none"}, risk={"max_contracts": 5})
    assert s.execution.stop_mode == "none" and s.risk.max_contracts == 5
