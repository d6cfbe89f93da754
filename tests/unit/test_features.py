"""Indicators against TA-Lib, the live (incremental) path against the replay (bulk) path, layout."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import talib

from tests.conftest import NQ, make_settings
from trader.config import InstrumentConfig
from trader.domain import Bar
from trader.features.clock import SessionClock
from trader.features.indicators import ADX, ATR, EMA, MACD, RSI, SMA, RollingMax, RollingMin, RollingStd
from trader.features.layout import BASE_DIM, LLM_DIM, build_layout
from trader.features.market import MarketState, primitives_batch
from trader.features.observation import BulkFeatures, IncrementalFeatures, bars_to_arrays

WARMUP = 1000  # after this many bars, seeding differences (if any) are far below 1e-6


@pytest.fixture(scope="module")
def nq() -> dict[str, np.ndarray]:
    df = pl.read_csv(NQ)
    ts = (
        df["timestamp"]
        .str.to_datetime(time_unit="ns")
        .dt.replace_time_zone("America/New_York")
        .dt.epoch("ns")
    )
    return {
        "ts": ts.to_numpy(),
        **{c: df[c].cast(pl.Float64).to_numpy() for c in ("open", "high", "low", "close", "volume")},
    }


def _incremental(ind, *series: np.ndarray) -> np.ndarray:
    out = []
    for vals in zip(*series, strict=True):
        r = ind.update(*(float(v) for v in vals))
        out.append(r)
    return np.array(out, dtype=np.float64)


def _close(mine: np.ndarray, ref: np.ndarray) -> None:
    a, b = mine[WARMUP:], ref[WARMUP:]
    assert not np.isnan(a).any() and not np.isnan(b).any()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [5, 20, 50, 200])
def test_ema_and_sma_match_talib(nq, n):
    c = nq["close"]
    _close(EMA.batch(c, n), talib.EMA(c, n))
    _close(_incremental(EMA(n), c), talib.EMA(c, n))
    _close(SMA.batch(c, n), talib.SMA(c, n))
    _close(_incremental(SMA(n), c), talib.SMA(c, n))


@pytest.mark.parametrize("n", [2, 7, 14, 28])
def test_wilder_rsi_matches_talib_from_its_first_value(nq, n):
    c = nq["close"]
    ref = talib.RSI(c, n)
    np.testing.assert_allclose(RSI.batch(c, n)[n:], ref[n:], rtol=1e-9)
    np.testing.assert_allclose(_incremental(RSI(n), c)[n:], ref[n:], rtol=1e-9)


def test_atr_adx_and_directional_indexes_match_talib(nq):
    h, lo, c = nq["high"], nq["low"], nq["close"]
    _close(ATR.batch(h, lo, c, 14), talib.ATR(h, lo, c, 14))
    _close(_incremental(ATR(14), h, lo, c), talib.ATR(h, lo, c, 14))
    adx, pdi, mdi = ADX.batch(h, lo, c, 14)
    _close(adx, talib.ADX(h, lo, c, 14))
    _close(pdi, talib.PLUS_DI(h, lo, c, 14))
    _close(mdi, talib.MINUS_DI(h, lo, c, 14))
    live = ADX(14)
    rows = np.array([live.update(float(a), float(b), float(d)) for a, b, d in zip(h, lo, c, strict=True)])
    _close(rows[:, 0], talib.ADX(h, lo, c, 14))
    _close(rows[:, 1], talib.PLUS_DI(h, lo, c, 14))


def test_macd_bollinger_std_and_channels_match_talib(nq):
    h, lo, c = nq["high"], nq["low"], nq["close"]
    line, sig, hist = MACD.batch(c)
    ref = talib.MACD(c, 12, 26, 9)
    for mine, r in zip((line, sig, hist), ref, strict=True):
        _close(mine, r)
    upper, _mid, lower = talib.BBANDS(c, 20, 2.0, 2.0)
    std = RollingStd.batch(c, 20)
    _close(SMA.batch(c, 20) + 2 * std, upper)
    _close(SMA.batch(c, 20) - 2 * std, lower)
    _close(_incremental(RollingStd(20), c), talib.STDDEV(c, 20))
    _close(RollingMax.batch(h, 60), talib.MAX(h, 60))
    _close(_incremental(RollingMin(60), lo), talib.MIN(lo, 60))


def test_incremental_primitives_equal_bulk_primitives_bar_for_bar(nq):
    clock = SessionClock(InstrumentConfig())
    bulk = primitives_batch(nq["ts"], nq["open"], nq["high"], nq["low"], nq["close"], nq["volume"], clock)
    state = MarketState(clock)
    live = {k: np.empty(len(nq["ts"])) for k in bulk}
    for i in range(len(nq["ts"])):
        p = state.update(
            Bar(int(nq["ts"][i]), nq["open"][i], nq["high"][i], nq["low"][i], nq["close"][i], nq["volume"][i])
        )
        for k in bulk:
            live[k][i] = p[k]
    for k in bulk:
        a, b = bulk[k], live[k]
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{k}: warm-up differs"
        m = ~np.isnan(a)
        np.testing.assert_allclose(b[m], a[m], rtol=1e-9, atol=1e-9, err_msg=k)


def test_live_observation_rows_equal_replay_rows(nq):
    n = 3000
    settings = make_settings()
    bars = [
        Bar(int(nq["ts"][i]), nq["open"][i], nq["high"][i], nq["low"][i], nq["close"][i], nq["volume"][i])
        for i in range(n)
    ]
    bulk = BulkFeatures(settings, bars_to_arrays(bars))
    live = IncrementalFeatures(settings)
    for i, bar in enumerate(bars):
        row_live = live.update(bar).copy()
        row_bulk = bulk.update(bar)
        assert live.ready == bulk.ready
        np.testing.assert_allclose(
            row_live, row_bulk, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"bar {i}"
        )
    assert bulk.ready  # the tail of 3000 bars is past warm-up


def test_layout_is_261_with_llm_features_and_228_without():
    full, base = build_layout(True), build_layout(False)
    assert full.dim == BASE_DIM + LLM_DIM == 261
    assert base.dim == BASE_DIM == 228
    assert full.names[: base.n_base_market] == base.names[: base.n_base_market]
    assert full.hash != base.hash
    assert full.hash == build_layout(True).hash  # stable
    assert "ctx_vwap_distance_atr" in full.names and "risk_win_rate_10" in full.names


def test_bulk_features_refuse_to_fall_out_of_step_with_the_feed(nq):
    settings = make_settings()
    bars = [
        Bar(int(nq["ts"][i]), nq["open"][i], nq["high"][i], nq["low"][i], nq["close"][i], nq["volume"][i])
        for i in range(10)
    ]
    bulk = BulkFeatures(settings, bars_to_arrays(bars))
    bulk.update(bars[0])
    with pytest.raises(RuntimeError, match="out of step"):
        bulk.update(bars[2])


def test_custom_feature_block_extends_the_layout_and_both_paths_agree(nq):
    from trader.features.observation import load_feature_blocks

    settings = make_settings(features={"custom_blocks": ["strategies.features:RunRangeBlock"]})
    bars = [
        Bar(int(nq["ts"][i]), nq["open"][i], nq["high"][i], nq["low"][i], nq["close"][i], nq["volume"][i])
        for i in range(300)
    ]
    bulk = BulkFeatures(settings, bars_to_arrays(bars), load_feature_blocks(settings.features.custom_blocks))
    live = IncrementalFeatures(settings, load_feature_blocks(settings.features.custom_blocks))
    assert bulk.layout.dim == 263 and bulk.layout.names[-2:] == (
        "custom_range_high_dist_pct",
        "custom_range_low_dist_pct",
    )
    for bar in bars:
        np.testing.assert_allclose(live.update(bar)[-2:], bulk.update(bar)[-2:], rtol=1e-6)
