"""Research configurations through the real engine, journal and paper broker on the bundled NQ
slice: a 24-hour (Globex) entry window, flatten_at = "off", stop_mode = "none" with a real ONNX
policy, and the automatic warm-up."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import NQ, make_settings, write_policy
from trader.features.layout import build_layout
from trader.replay import ReplayOutcome, replay

NY = ZoneInfo("America/New_York")
GLOBEX = {"trade_start": "18:00", "trade_end": "16:00", "flatten_at": "16:00"}
EMA_CROSS = {"path": "strategies.rules:EmaCross", "options": {"fast": 5, "slow": 20}}


def run(tmp_path: Path, name: str, **overrides: Any) -> tuple[ReplayOutcome, Path]:
    # room enough that the day's losses never flatten: only the hours under test do
    overrides.setdefault("risk", {"enable_risk_veto": False, "daily_loss_limit_usd": 1e6})
    overrides.setdefault("account", {"starting_balance_usd": 1e6, "trailing_drawdown_usd": 5e5})
    overrides.setdefault("features", {"warmup_bars": 300})
    db = tmp_path / f"{name}.sqlite"
    return replay(make_settings(**overrides), journal_path=db), db


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def minute(ts_ns: int) -> int:
    t = datetime.fromtimestamp(ts_ns / 1e9, NY)
    return t.hour * 60 + t.minute


def entry_minutes(db: Path) -> list[int]:
    """Minutes of the day of the bars whose decision opened a position."""
    return [minute(t) for (t,) in rows(db, "SELECT ts_ns FROM orders WHERE purpose IN ('entry', 'reverse')")]


def at_night(m: int) -> bool:
    return m >= 18 * 60 or m < 9 * 60 + 30


# -- 24-hour trading ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def globex(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("globex"), "j", instrument=GLOBEX, policy=EMA_CROSS)[1]


@pytest.fixture(scope="module")
def regular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("regular"), "j", policy=EMA_CROSS)[1]


def test_a_window_that_wraps_midnight_enters_at_night(globex, regular):
    night = [m for m in entry_minutes(globex) if at_night(m)]
    assert len(night) > 10, "the 18:00-16:00 window should trade the overnight session"
    assert not [m for m in entry_minutes(regular) if at_night(m)]  # 09:30-15:45 never does


def test_nothing_is_entered_between_the_window_end_and_the_session_close(globex):
    late = [m for m in entry_minutes(globex) if 16 * 60 <= m < 18 * 60]
    assert late == []
    blocked = rows(globex, "SELECT ts_ns, vetoes FROM decisions WHERE vetoes LIKE '%flatten_before_close%'")
    assert blocked and all(16 * 60 <= minute(t) < 17 * 60 for t, _ in blocked)


def test_positions_are_flattened_from_flatten_at_and_none_is_held_into_the_break(globex):
    reasons = {r for (r,) in rows(globex, "SELECT exit_reason FROM trades")}
    assert "flatten:flatten_before_close" in reasons
    held = [minute(t) for t, p in rows(globex, "SELECT ts_ns, position FROM decisions") if p != 0]
    assert not [m for m in held if 16 * 60 + 2 <= m < 18 * 60]  # the flatten fills at 16:01


def test_with_flatten_off_positions_are_held_through_the_close(tmp_path):
    _, db = run(tmp_path, "off", instrument=GLOBEX | {"flatten_at": "off"}, policy=EMA_CROSS)
    reasons = {r for (r,) in rows(db, "SELECT exit_reason FROM trades")}
    assert "flatten:flatten_before_close" not in reasons and "exit" in reasons
    held = [minute(t) for t, p in rows(db, "SELECT ts_ns, position FROM decisions") if p != 0]
    assert [m for m in held if 16 * 60 + 2 <= m < 17 * 60], "a position should stay open after 16:00"
    # still no entries outside the window
    assert not [m for m in entry_minutes(db) if 16 * 60 <= m < 18 * 60]


# -- no protective stops ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stop_lover(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX policy that enters, then prefers the stop actions over anything else."""
    path = tmp_path_factory.mktemp("policy") / "stop_lover.onnx"
    return write_policy(path, build_layout(True), bias=[0.0, 3.0, 0.0, 6.0, 6.0, 6.0])


def test_without_stops_no_stop_action_is_offered_chosen_or_filled(tmp_path, stop_lover):
    _, db = run(tmp_path, "none", execution={"stop_mode": "none"}, policy={"path": str(stop_lover)})
    decided = "FROM decisions WHERE method != 'warmup'"
    assert rows(db, f"SELECT count(*) {decided} AND position != 0")[0][0] > 100
    (p_stop,) = rows(db, f"SELECT max(p_move_to_be + p_enable_trail + p_disable_trail) {decided}")[0]
    assert p_stop == 0.0  # masked inside the policy: never offered
    assert rows(db, f"SELECT count(*) {decided} AND final_action IN (3, 4, 5)")[0][0] == 0
    assert rows(db, "SELECT count(*) FROM fills WHERE purpose = 'stop'")[0][0] == 0
    assert rows(db, "SELECT max(stop_ticks) FROM orders")[0][0] == 0
    assert rows(db, "SELECT count(*) FROM account WHERE stop_price IS NOT NULL")[0][0] == 0
    assert rows(db, "SELECT count(*) FROM trades")[0][0] > 0


def test_the_same_policy_with_stops_moves_them(tmp_path, stop_lover):
    _, db = run(tmp_path, "atr", policy={"path": str(stop_lover)})
    assert rows(db, "SELECT count(*) FROM decisions WHERE final_action IN (3, 4)")[0][0] > 0
    assert rows(db, "SELECT min(stop_ticks) FROM orders WHERE purpose = 'entry'")[0][0] > 0


# -- automatic warm-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("use_llm_features", "warm"), [(True, 900), (False, 240)])
def test_auto_warmup_holds_back_exactly_the_bars_the_layout_needs(tmp_path, use_llm_features, warm):
    features = {"warmup_bars": "auto", "use_llm_features": use_llm_features}
    out, db = run(tmp_path, "auto", features=features, policy=EMA_CROSS)
    methods = rows(db, "SELECT method FROM decisions ORDER BY bar_index")
    assert [m for (m,) in methods[:warm]] == ["warmup"] * warm
    assert "warmup" not in {m for (m,) in methods[warm:]}
    assert out.warmup_bars == warm and out.decided_bars == out.usable_bars - warm


def test_the_default_warmup_is_still_960_bars(tmp_path):
    out, db = run(tmp_path, "default", features={}, policy=EMA_CROSS)
    assert rows(db, "SELECT count(*) FROM decisions WHERE method = 'warmup'")[0][0] == 960 == out.warmup_bars


# -- an early close ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_mode", ["none", "atr"])
def test_a_position_open_at_an_early_close_is_flattened_on_the_next_sessions_first_bar(tmp_path, stop_mode):
    """Thanksgiving 2023: CME closed NQ at 13:00 ET, before flatten_at (15:55), so the session
    flatten never came: a buy-and-hold long was carried into the next session (until a stop, or
    without one until the next day's loss limit, -$1,024.50). It is now flattened on the next
    session's first bar, and the session table names each session by the day it ends."""
    out, db = run(
        tmp_path,
        "thanksgiving",
        data={"paths": [str(NQ)], "start": "2023-11-22T18:00:00", "end": "2023-11-24T12:00:00"},
        policy={"path": "trader.policy.rules:BuyAndHold"},
        execution={"stop_mode": stop_mode},
    )
    assert out.status == "completed"
    trades = rows(db, "SELECT entry_ts_ns, exit_ts_ns, exit_reason FROM trades ORDER BY seq")
    held = [t for t in trades if datetime.fromtimestamp(t[0] / 1e9, NY).date().isoformat() == "2023-11-23"]
    assert held, "buy-and-hold bought on Thanksgiving morning"
    _, exit_, reason = held[-1]
    exit_local = datetime.fromtimestamp(exit_ / 1e9, NY)
    if reason != "flatten:held_over_session_close":  # a stop before the early close: nothing held over
        assert exit_local.hour < 13, (reason, exit_local)
    else:
        assert (exit_local.date().isoformat(), exit_local.hour, exit_local.minute) == ("2023-11-23", 18, 1)
    for ts, position in rows(db, "SELECT ts_ns, position FROM decisions ORDER BY bar_index"):
        local = datetime.fromtimestamp(ts / 1e9, NY)
        if local.date().isoformat() == "2023-11-23" and (local.hour, local.minute) >= (18, 2):
            assert position == 0, local


class BuyAt:
    """BUY on the bar at ``at`` (local time), HOLD otherwise: a position decided on the last bar
    before an early close, filled at the next session's open."""

    name = "buy_at"

    def __init__(self, settings: Any = None, at: str = "2023-11-23T12:59") -> None:
        self.at = at

    def act(self, o: Any) -> Any:
        from trader.domain import Action, PolicyChoice

        when = datetime.fromtimestamp(o.bar.ts_ns / 1e9, NY).strftime("%Y-%m-%dT%H:%M")
        a = Action.BUY if when == self.at and o.mask[Action.BUY] else Action.HOLD
        probs = [0.0] * 6
        probs[a] = 1.0
        return PolicyChoice(a, 1.0, probs)


def test_a_position_filled_at_the_new_sessions_open_is_that_sessions_not_held_over(tmp_path):
    """An entry decided on the last bar before the early close fills at the next session's open
    (18:00): it was not held through any close, so it is not flattened as held over."""
    out, db = run(
        tmp_path,
        "late",
        data={"paths": [str(NQ)], "start": "2023-11-22T18:00:00", "end": "2023-11-24T12:00:00"},
        policy={"path": "tests.integration.test_research_config:BuyAt"},
    )
    assert out.status == "completed"
    fills = rows(db, "SELECT ts_ns, side, purpose FROM fills ORDER BY seq")
    first_ts, _, purpose = fills[0]
    opened = datetime.fromtimestamp(first_ts / 1e9, NY)
    assert (opened.date().isoformat(), opened.hour, opened.minute, purpose) == ("2023-11-23", 18, 0, "entry")
    assert all(p != "flatten:held_over_session_close" for _, _, p in fills)


def test_a_rule_policy_primed_with_history_bars_decides_as_in_the_replay(tmp_path):
    """A live or paper start warms up on history bars (``Engine.prime``): a rule policy with its own
    indicators (EmaCross) must see them, as it sees a replay's warm-up bars, or it starts cold at
    the first live bar and decides otherwise than the replay of the same bars."""
    import asyncio

    from trader.wiring import build_replay

    s = make_settings(
        data={"paths": [str(NQ)], "end": "2023-11-21T17:00:00"},
        policy={"path": "trader.policy.rules:EmaCross", "options": {"fast": 5, "slow": 30}},
        features={"warmup_bars": 300},
    )

    def decisions(primed: bool) -> tuple[list[tuple[int, int]], int]:
        run = build_replay(s, tmp_path / f"{primed}.sqlite")
        engine, seen = run.engine, []
        rule = engine.policy
        act = rule.act

        def watch(o: Any) -> Any:
            choice = act(o)
            if o.ready:
                seen.append((o.bar.ts_ns, int(choice.action)))
            return choice

        engine.policy.act = watch  # type: ignore[method-assign]
        assert run.recorded is not None
        bars = [b for b, _ in run.recorded.items() if b is not None]

        async def drive() -> None:
            await engine.broker.start()
            for k, b in enumerate(bars):
                if primed and k < 300:
                    assert engine.prime(b)
                else:
                    await engine.on_bar(b)
            await engine.close()

        asyncio.run(drive())
        run.journal.close()
        return seen, rule.slow._seen  # type: ignore[attr-defined]  # closes the EMA took in

    (replayed, replay_seen), (primed, primed_seen) = decisions(False), decisions(True)
    assert len(replayed) > 500 and primed == replayed
    assert primed_seen == replay_seen > len(replayed) + 300  # every close, the history's included
