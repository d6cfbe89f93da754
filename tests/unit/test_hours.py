"""Trading hours that wrap past midnight, "24:00" as an end, whole-day windows, flatten_at = "off":
the clock, the risk engine's hours rule, the time features and the config checks agree."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import flat
from trader.config import InstrumentConfig, load_settings
from trader.decision.risk import RiskContext, RiskEngine
from trader.domain import Action
from trader.errors import ConfigError
from trader.features.clock import SessionClock
from trader.features.market import derive, primitives_batch

GLOBEX = {"trade_start": "18:00", "trade_end": "16:00", "flatten_at": "16:30"}


def minute(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def clock(**instrument: str) -> SessionClock:
    return SessionClock(load_settings(None, {"instrument": instrument}).instrument)


def context(at: str) -> RiskContext:
    return RiskContext(0, minute(at), market=lambda: None)  # type: ignore[arg-type,return-value]


def review(action: Action, at: str, **instrument: str):
    s = load_settings(None, {"instrument": instrument})
    return RiskEngine(s, SessionClock(s.instrument)).review(action, flat(), context(at))


# -- the clock ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "inside"),
    [("23:10", True), ("18:00", True), ("00:00", True), ("09:30", True), ("15:59", True),
     ("16:00", False), ("16:30", False), ("17:59", False)],
)  # fmt: skip
def test_a_window_from_18_00_to_16_00_wraps_past_midnight(at, inside):
    assert clock(**GLOBEX).in_entry_window(minute(at)) is inside


def test_the_batch_window_test_agrees_with_the_one_minute_test_for_every_minute():
    for inst in (GLOBEX, {}, {"trade_start": "00:00", "trade_end": "24:00", "session_open": "00:00",
                              "session_close": "24:00", "flatten_at": "off"}):  # fmt: skip
        c = clock(**inst)
        every = np.arange(1440)
        assert c.in_entry_window_batch(every).tolist() == [c.in_entry_window(m) for m in range(1440)]


def test_a_window_ending_at_24_00_runs_through_23_59_and_not_past_midnight():
    c = clock(trade_start="19:00", trade_end="24:00", flatten_at="off")
    assert c.in_entry_window(minute("23:59")) and not c.in_entry_window(0)
    assert not c.in_entry_window(minute("18:59"))


def test_a_whole_day_window_in_a_24_hour_session_admits_every_minute():
    c = clock(session_open="00:00", session_close="24:00", trade_start="00:00", trade_end="24:00",
              flatten_at="off")  # fmt: skip
    assert all(c.in_entry_window(m) for m in range(1440))
    assert not any(c.past_flatten(m) for m in range(1440))


def test_the_flatten_period_runs_from_flatten_at_to_the_close_and_not_at_all_when_off():
    c = clock(**GLOBEX)
    assert [m for m in range(1440) if c.past_flatten(m)] == list(range(minute("16:30"), minute("17:00")))
    off = clock(**(GLOBEX | {"flatten_at": "off"}))
    assert not any(off.past_flatten(m) for m in range(1440))


# -- the risk engine --------------------------------------------------------------------------------


def test_an_entry_at_23_10_passes_the_hours_rule_of_a_globex_window():
    assert review(Action.BUY, "23:10", **GLOBEX).action == Action.BUY
    assert review(Action.BUY, "23:10").action == Action.HOLD  # the default 09:30-15:45 window


def test_an_entry_at_16_10_between_the_window_and_flatten_at_is_vetoed_for_trading_hours():
    v = review(Action.SELL, "16:10", **GLOBEX)
    assert v.action == Action.HOLD and [x.rule for x in v.vetoes] == ["trading_hours"]


def test_with_flatten_off_nothing_is_flattened_before_the_close():
    held = flat(position=1, avg_entry=16000.0)
    s = load_settings(None, {"instrument": GLOBEX | {"flatten_at": "off"}})
    engine = RiskEngine(s, SessionClock(s.instrument))
    for at in ("16:30", "16:59"):
        v = engine.review(Action.HOLD, held, context(at))
        assert not v.flatten and v.flatten_reason == ""
    on = RiskEngine(load_settings(None, {"instrument": GLOBEX}), clock(**GLOBEX))
    v = on.review(Action.HOLD, held, context("16:45"))
    assert v.flatten and v.flatten_reason == "flatten_before_close"


# -- the time features --------------------------------------------------------------------------------


def time_features(inst: InstrumentConfig, minutes: np.ndarray) -> dict[str, np.ndarray]:
    """The derived features for bars at these minutes of a New York winter day (UTC-5)."""
    c = SessionClock(inst)
    day0 = 1_700_784_000  # 2023-11-24 00:00 UTC
    ts = ((day0 + 5 * 3600 + minutes * 60) * 1_000_000_000).astype(np.int64)
    px = np.full(len(ts), 16000.0)
    p = primitives_batch(ts, px, px, px, px, np.ones(len(ts)), c)
    with np.errstate(all="ignore"):
        return derive(p, c, 0.25)


def test_default_hours_give_the_time_features_the_bundled_policy_was_trained_on():
    every = np.arange(1440)
    f = time_features(InstrumentConfig(), every)
    # the formulas before wrap-around existed, for the default 09:30-15:45, flatten 15:55
    assert f["in_entry_window"].tolist() == ((every >= 570) & (every < 945)).astype(float).tolist()
    assert f["to_flatten"].tolist() == np.clip((955 - every) / 390.0, 0.0, 1.0).tolist()


def test_a_wrapping_window_marks_the_night_inside_and_counts_down_to_flatten_across_midnight():
    every = np.arange(1440)
    inst = load_settings(None, {"instrument": GLOBEX}).instrument
    f = time_features(inst, every)
    assert f["in_entry_window"][minute("23:10")] == 1.0 and f["in_entry_window"][minute("16:10")] == 0.0
    to_flat = f["to_flatten"]
    assert to_flat[minute("23:10")] == 1.0  # 17h20 to go
    assert to_flat[minute("14:00")] == pytest.approx(150 / 390)
    assert to_flat[minute("16:30")] == 0.0 and to_flat[minute("16:59")] == 0.0
    # it only falls from the session open to flatten_at
    run = to_flat[np.r_[minute("18:00") : 1440, 0 : minute("16:30")]]
    assert (np.diff(run) <= 0).all()


def test_flatten_off_reads_as_far_from_any_flatten():
    inst = load_settings(None, {"instrument": GLOBEX | {"flatten_at": "off"}}).instrument
    assert (time_features(inst, np.arange(1440))["to_flatten"] == 1.0).all()


# -- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instrument",
    [
        GLOBEX,
        GLOBEX | {"flatten_at": "16:00"},
        GLOBEX | {"flatten_at": "off"},
        GLOBEX | {"flatten_at": "17:00"},  # at the close: nothing is flattened
        {"trade_start": "19:00", "trade_end": "24:00", "flatten_at": "off"},
        {"trade_start": "22:00", "trade_end": "02:00", "flatten_at": "03:00"},
        {"session_open": "00:00", "session_close": "24:00", "trade_start": "00:00", "trade_end": "24:00",
         "flatten_at": "off"},
        {"session_open": "18:00", "session_close": "18:00", "trade_start": "00:00", "trade_end": "24:00",
         "flatten_at": "18:00"},
    ],
)  # fmt: skip
def test_wrapping_windows_24_00_whole_days_and_flatten_off_are_accepted(instrument):
    got = load_settings(None, {"instrument": instrument}).instrument
    assert got.model_dump(include=set(instrument)) == instrument


@pytest.mark.parametrize(
    ("instrument", "named"),
    [
        ({"trade_start": "18:00", "trade_end": "18:00"},
         ["instrument.trade_start: 18:00 equals instrument.trade_end (18:00)", '"24:00"']),
        ({"trade_start": "16:00", "trade_end": "15:45"},  # wraps through the 17:00-18:00 halt
         ["instrument.trade_start: 16:00", "instrument.trade_end (15:45)", "past midnight",
          "instrument.session_open (18:00)", "instrument.session_close (17:00)"]),
        ({"trade_start": "00:00", "trade_end": "24:00"},  # a whole day, but the session is 23 hours
         ["instrument.trade_start: 00:00", "instrument.trade_end (24:00)",
          "instrument.session_close (17:00)"]),
        (GLOBEX | {"flatten_at": "15:00"},  # inside the entry window
         ["instrument.flatten_at: 15:00", "instrument.trade_end (16:00)", '"off"']),
        (GLOBEX | {"flatten_at": "17:30"},  # while the exchange is closed
         ["instrument.flatten_at: 17:30", "instrument.session_close (17:00)"]),
        ({"trade_start": "24:00"}, ["instrument.trade_start", "'24:00' is only an end time"]),
        ({"session_open": "24:00"}, ["instrument.session_open", "'24:00' is only an end time"]),
        ({"flatten_at": "never"}, ["instrument.flatten_at", "'never' is not a time of day"]),
        ({"trade_end": "24:01"}, ["instrument.trade_end", "'24:01' is not a time of day"]),
    ],
)  # fmt: skip
def test_truly_invalid_hours_are_refused_naming_the_keys(instrument, named):
    with pytest.raises(ConfigError) as e:
        load_settings(None, {"instrument": instrument})
    for text in named:
        assert text in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("hours", "local", "day"),
    [
        ({"session_open": "18:00", "session_close": "17:00"}, "2023-11-20T19:00", "2023-11-21"),
        ({"session_open": "18:00", "session_close": "17:00"}, "2023-11-21T10:00", "2023-11-21"),
        (
            {"session_open": "09:30", "session_close": "16:00", "trade_start": "09:30", "trade_end": "15:45",
             "flatten_at": "15:55"},
            "2023-11-20T10:00", "2023-11-20",
        ),
        (
            {"session_open": "00:00", "session_close": "24:00", "trade_start": "00:00", "trade_end": "24:00",
             "flatten_at": "off"},
            "2023-11-20T23:59", "2023-11-20",
        ),
    ],
)  # fmt: skip
def test_a_session_is_named_by_the_local_day_it_ends_on(hours, local, day):
    """A 09:30-16:00 or 00:00-24:00 session was named by the next day (the +1 of a session that
    wraps past midnight was added to every session): the report's table showed Monday as Tuesday."""
    from datetime import date, datetime, timedelta
    from zoneinfo import ZoneInfo

    ts = int(datetime.fromisoformat(local).replace(tzinfo=ZoneInfo("America/New_York")).timestamp()) * 10**9
    c = clock(**hours)
    sid = c.session_id(ts)
    assert date(1970, 1, 1) + timedelta(days=sid) == date.fromisoformat(day)
    assert int(c.session_id_batch(np.array([ts]))[0]) == sid
