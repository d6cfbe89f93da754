"""features.warmup_bars = "auto": the longest look-back of the features in the layout, built from
each indicator's declared look-back, which must be when its values really start."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trader.config import InstrumentConfig, load_settings
from trader.domain import Bar
from trader.errors import ConfigError
from trader.features.clock import SessionClock
from trader.features.market import MarketState, primitive_lookbacks, primitives_batch
from trader.features.observation import BulkFeatures
from trader.features.warmup import auto_warmup_bars, market_lookback_bars, warmup_bars

HOUR_S = 3600


def synthetic_bars(n: int, seed: int = 3) -> dict[str, np.ndarray]:
    """1-minute bars without gaps from the start of an hour (the worst case for the hourly RSI):
    a random walk on the 0.25 grid with ranges and volume that are never flat."""
    rng = np.random.default_rng(seed)
    start_s = 1_700_784_000 + 23 * HOUR_S  # 2023-11-24 23:00 UTC, an hour boundary
    ts = ((start_s + 60 * np.arange(n)) * 1_000_000_000).astype(np.int64)
    close = 16_000 + 0.25 * np.cumsum(rng.integers(-8, 9, n))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) + 0.25 * rng.integers(1, 6, n)
    low = np.minimum(open_, close) - 0.25 * rng.integers(1, 6, n)
    volume = rng.integers(50, 900, n).astype(np.float64)
    return {"ts_ns": ts, "open": open_, "high": high, "low": low, "close": close, "volume": volume}


def first_value(x: np.ndarray) -> int:
    defined = ~np.isnan(x)
    assert defined.any()
    i = int(np.argmax(defined))
    assert defined[i:].all(), "a value went back to NaN"
    return i


def test_every_declared_look_back_is_where_the_batch_primitive_starts():
    b = synthetic_bars(1200)
    clock = SessionClock(InstrumentConfig())
    p = primitives_batch(b["ts_ns"], b["open"], b["high"], b["low"], b["close"], b["volume"], clock)
    declared = primitive_lookbacks()
    assert set(declared) == set(p)
    measured = {k: first_value(v) for k, v in p.items() if k != "prev_sess_close"}
    assert measured == {k: v for k, v in declared.items() if k != "prev_sess_close"}


def test_every_declared_look_back_is_where_the_live_primitive_starts():
    b = synthetic_bars(1000)
    state = MarketState(SessionClock(InstrumentConfig()))
    declared = primitive_lookbacks()
    first: dict[str, int] = {}
    for i in range(1000):
        bar = Bar(*(b[k][i].item() for k in ("ts_ns", "open", "high", "low", "close", "volume")))
        for k, v in state.update(bar).items():
            if k not in first and not math.isnan(v):
                first[k] = i
    first.pop("prev_sess_close", None)
    assert first == {k: v for k, v in declared.items() if k != "prev_sess_close"}


def test_the_default_layout_needs_900_bars_set_by_the_hourly_rsi():
    assert market_lookback_bars(True) == primitive_lookbacks()["rsi_60m"] == 900


def test_the_228_feature_layout_needs_a_shorter_warm_up_of_240_bars():
    assert market_lookback_bars(False) == 240 < market_lookback_bars(True)


@pytest.mark.parametrize("use_llm_features", [True, False])
def test_auto_is_exactly_when_every_feature_of_the_layout_has_a_value(use_llm_features):
    s = load_settings(None, {"features": {"use_llm_features": use_llm_features}})
    features = BulkFeatures(s, synthetic_bars(1200))
    assert first_value(np.where(features.ready_col, 1.0, np.nan)) == auto_warmup_bars(use_llm_features)


class SlowBlock:
    names = ("custom_slow",)
    lookback_bars = 2000

    def update(self, bar: Bar) -> tuple[float]:
        return (0.0,)


class UndeclaredBlock:
    names = ("custom_plain",)

    def update(self, bar: Bar) -> tuple[float]:
        return (0.0,)


def test_a_custom_block_counts_with_its_declared_look_back():
    assert auto_warmup_bars(False, [SlowBlock()]) == 2000
    assert auto_warmup_bars(False, [UndeclaredBlock()]) == 240


@pytest.mark.parametrize("bad", [-1, 2.5, "100", True])
def test_a_custom_block_with_a_look_back_that_is_not_a_count_is_refused(bad):
    block = UndeclaredBlock()
    block.lookback_bars = bad  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"features\.custom_blocks: UndeclaredBlock\.lookback_bars"):
        auto_warmup_bars(True, [block])


def test_the_default_stays_a_fixed_960_and_a_number_is_taken_as_it_is():
    assert warmup_bars(load_settings(None)) == 960
    assert warmup_bars(load_settings(None, {"features": {"warmup_bars": 17}})) == 17
    auto = load_settings(None, {"features": {"warmup_bars": "auto", "use_llm_features": False}})
    assert warmup_bars(auto) == 240


def test_auto_reads_custom_blocks_from_the_config():
    s = load_settings(
        None,
        {"features": {"warmup_bars": "auto", "custom_blocks": ["strategies.features:RunRangeBlock"]}},
    )
    assert warmup_bars(s) == 900  # the example block needs no history


@pytest.mark.parametrize("value", ["Auto", "-5", "later"])
def test_a_warmup_that_is_neither_a_count_nor_auto_is_refused_naming_the_key(monkeypatch, value):
    monkeypatch.setenv("TRADER_FEATURES__WARMUP_BARS", value)
    with pytest.raises(ConfigError, match=r"features\.warmup_bars: .*'auto'.*TRADER_FEATURES__WARMUP_BARS"):
        load_settings(None)
