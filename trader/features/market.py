"""Market features: everything in the observation that does not depend on the position.

Two ways to the same numbers. Live bars go through :class:`MarketState.update` (O(1) per bar);
replay computes whole files at once with :func:`market_features_batch`. Only the *primitives*
(indicator values) are computed twice, by the twin methods in ``indicators.py``; every feature
formula is written once, in :func:`derive`, as array code that both paths run. A test checks
that the two paths agree bar for bar on the recorded NQ data.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from trader.domain import Bar
from trader.features.clock import SessionClock
from trader.features.indicators import (
    ADX,
    ATR,
    EMA,
    MACD,
    NAN,
    RSI,
    SMA,
    EfficiencyRatio,
    Lag,
    ResampledRSI,
    RollingMax,
    RollingMin,
    RollingStd,
    shift,
)

EMA_PERIODS = (5, 9, 12, 21, 26, 50, 100, 200)
SMA_PERIODS = (5, 10, 20, 50, 100, 200)
RSI_PERIODS = (2, 7, 14, 21, 28)
ATR_PERIODS = (5, 14, 30, 60)
RETURN_HORIZONS = (1, 2, 3, 5, 10, 15, 30, 60, 120, 240)
DONCHIAN = (5, 10, 14, 20, 40, 60, 120, 240)
CLOSE_STD = (20, 50, 60, 240)
RET_STD = (5, 10, 20, 60, 120)
VOL_SMA = (5, 10, 20, 60, 240)
ER_PERIODS = (5, 10, 30, 60)
WINDOW = 37  # bars of recent history in the observation window block

# (primitive, k): the primitive's value k bars ago is available to derive() as "name@k".
LAGS: tuple[tuple[str, int], ...] = (
    *((f"ema_{n}", 1) for n in EMA_PERIODS),
    ("sma_50", 1),
    ("sma_200", 1),
    ("adx_14", 5),
    *(("close", h) for h in RETURN_HORIZONS),
    ("close", 20),
    ("hh_10", 10),
    ("ll_10", 10),
    ("hh_40", 20),
    ("ll_40", 20),
    ("hh_60", 1),
    ("ll_60", 1),
    *(("ret1", k) for k in range(1, WINDOW + 1)),
    *(("range", k) for k in range(1, WINDOW + 1)),
    *(("logv", k) for k in range(1, WINDOW + 1)),
)


def primitive_lookbacks() -> dict[str, int]:
    """Bars before each primitive's first value (see ``lookback`` in ``indicators.py``), for
    every primitive :class:`MarketState` and :func:`primitives_batch` produce, lags included.

    Session values (VWAP, session high/low/open) exist from the first bar; the previous session's
    close is NaN until a second session begins, which the formulas read as "no gap" (0), so it
    holds no decision back and counts 0 here.
    """
    lb: dict[str, int] = {k: 0 for k in ("open", "high", "low", "close", "volume", "ts", "local_s")}
    lb |= {k: 0 for k in ("range", "logv", "vwap", "sess_high", "sess_low", "sess_open", "prev_sess_close")}
    lb |= {f"ema_{n}": EMA.lookback(n) for n in EMA_PERIODS}
    lb |= {f"sma_{n}": SMA.lookback(n) for n in (*SMA_PERIODS, *CLOSE_STD)}
    lb |= {f"rsi_{n}": RSI.lookback(n) for n in RSI_PERIODS}
    lb |= {f"atr_{n}": ATR.lookback(n) for n in ATR_PERIODS}
    for n in (14, 7):
        lb[f"adx_{n}"], lb[f"pdi_{n}"] = ADX.lookback(n)
        lb[f"mdi_{n}"] = lb[f"pdi_{n}"]
    for key, (fast, slow, signal) in (("macd", (12, 26, 9)), ("macdf", (5, 35, 5))):
        lb[key], lb[f"{key}_sig"] = MACD.lookback(fast, slow, signal)
        lb[f"{key}_hist"] = lb[f"{key}_sig"]
    for n in DONCHIAN:
        lb[f"hh_{n}"] = lb[f"ll_{n}"] = RollingMax.lookback(n)
    lb |= {f"std_{n}": RollingStd.lookback(n) for n in CLOSE_STD}
    lb["ret1"] = Lag.lookback(1)
    lb |= {f"rstd_{n}": Lag.lookback(1) + RollingStd.lookback(n) for n in RET_STD}  # of log returns
    lb |= {f"vsma_{n}": SMA.lookback(n) for n in VOL_SMA}
    lb["vstd_20"] = RollingStd.lookback(20)
    lb |= {f"er_{n}": EfficiencyRatio.lookback(n) for n in ER_PERIODS}
    lb["rsi_15m"] = ResampledRSI.lookback(15)
    lb["rsi_60m"] = ResampledRSI.lookback(60)
    lb["range_sma_20"] = SMA.lookback(20)
    lb["atr_sma_240"] = lb["atr_14"] + SMA.lookback(240)  # an SMA of ATR(14)
    for name, k in LAGS:
        lb[f"{name}@{k}"] = lb[name] + Lag.lookback(k)
    return lb


class MarketState:
    """Incremental primitives for live bars: call :meth:`update` once per bar, in time order."""

    def __init__(self, clock: SessionClock) -> None:
        self.clock = clock
        self.ema = {n: EMA(n) for n in EMA_PERIODS}
        self.sma = {n: SMA(n) for n in SMA_PERIODS}
        self.rsi = {n: RSI(n) for n in RSI_PERIODS}
        self.atr = {n: ATR(n) for n in ATR_PERIODS}
        self.adx14, self.adx7 = ADX(14), ADX(7)
        self.macd, self.macd_fast = MACD(12, 26, 9), MACD(5, 35, 5)
        self.hh = {n: RollingMax(n) for n in DONCHIAN}
        self.ll = {n: RollingMin(n) for n in DONCHIAN}
        self.close_std = {n: RollingStd(n) for n in CLOSE_STD}
        self.close_sma = {n: SMA(n) for n in CLOSE_STD if n not in SMA_PERIODS}
        self.ret_std = {n: RollingStd(n) for n in RET_STD}
        self.vol_sma = {n: SMA(n) for n in VOL_SMA}
        self.vol_std20 = RollingStd(20)
        self.er = {n: EfficiencyRatio(n) for n in ER_PERIODS}
        self.rsi15, self.rsi60 = ResampledRSI(15), ResampledRSI(60)
        self.range_sma20 = SMA(20)
        self.atr_sma240 = SMA(240)
        self.lags = {spec: Lag(spec[1]) for spec in LAGS}
        self._prev_close = NAN
        self._session = -1
        self._sess_pv = self._sess_v = 0.0
        self._sess_high = self._sess_low = self._sess_open = NAN
        self._prev_session_close = NAN

    def update(self, bar: Bar) -> dict[str, float]:
        o, h, lo, c, v, ts = bar.open, bar.high, bar.low, bar.close, bar.volume, bar.ts_ns
        p: dict[str, float] = {"open": o, "high": h, "low": lo, "close": c, "volume": v, "ts": float(ts)}
        for n, ema_ind in self.ema.items():
            p[f"ema_{n}"] = ema_ind.update(c)
        for n, sma_ind in self.sma.items():
            p[f"sma_{n}"] = sma_ind.update(c)
        for n, close_sma_ind in self.close_sma.items():
            p[f"sma_{n}"] = close_sma_ind.update(c)
        for n, rsi_ind in self.rsi.items():
            p[f"rsi_{n}"] = rsi_ind.update(c)
        for n, atr_ind in self.atr.items():
            p[f"atr_{n}"] = atr_ind.update(h, lo, c)
        p["adx_14"], p["pdi_14"], p["mdi_14"] = self.adx14.update(h, lo, c)
        p["adx_7"], p["pdi_7"], p["mdi_7"] = self.adx7.update(h, lo, c)
        p["macd"], p["macd_sig"], p["macd_hist"] = self.macd.update(c)
        p["macdf"], p["macdf_sig"], p["macdf_hist"] = self.macd_fast.update(c)
        for n in DONCHIAN:
            p[f"hh_{n}"] = self.hh[n].update(h)
            p[f"ll_{n}"] = self.ll[n].update(lo)
        for n, close_std_ind in self.close_std.items():
            p[f"std_{n}"] = close_std_ind.update(c)
        prev, self._prev_close = self._prev_close, c
        ret1 = c - prev if not math.isnan(prev) else NAN
        logret = math.log(c / prev) if not math.isnan(prev) else NAN
        p["ret1"] = ret1
        for n, ret_std_ind in self.ret_std.items():
            p[f"rstd_{n}"] = ret_std_ind.update(logret)
        logv = math.log1p(v)
        p["logv"] = logv
        for n, vol_sma_ind in self.vol_sma.items():
            p[f"vsma_{n}"] = vol_sma_ind.update(v)
        p["vstd_20"] = self.vol_std20.update(v)
        for n, er_ind in self.er.items():
            p[f"er_{n}"] = er_ind.update(c)
        p["rsi_15m"] = self.rsi15.update(ts, c)
        p["rsi_60m"] = self.rsi60.update(ts, c)
        p["range"] = h - lo
        p["range_sma_20"] = self.range_sma20.update(h - lo)
        p["atr_sma_240"] = self.atr_sma240.update(p["atr_14"])
        # session state: VWAP, high/low, open, previous session's close
        sess = self.clock.session_id(ts)
        if sess != self._session:
            if self._session >= 0:
                self._prev_session_close = prev
            self._session = sess
            self._sess_pv = self._sess_v = 0.0
            self._sess_high, self._sess_low, self._sess_open = h, lo, o
        self._sess_pv += (h + lo + c) / 3.0 * v
        self._sess_v += v
        self._sess_high = max(self._sess_high, h)
        self._sess_low = min(self._sess_low, lo)
        p["vwap"] = self._sess_pv / self._sess_v if self._sess_v > 0 else c
        p["sess_high"], p["sess_low"], p["sess_open"] = self._sess_high, self._sess_low, self._sess_open
        p["prev_sess_close"] = self._prev_session_close
        p["local_s"] = float(self.clock.local_s(ts))
        for spec, lag in self.lags.items():
            p[f"{spec[0]}@{spec[1]}"] = lag.update(p[spec[0]])
        return p


def primitives_batch(
    ts: np.ndarray,
    o: np.ndarray,
    h: np.ndarray,
    lo: np.ndarray,
    c: np.ndarray,
    v: np.ndarray,
    clock: SessionClock,
) -> dict[str, np.ndarray]:
    """All primitives for whole arrays, equal to feeding the bars one by one to MarketState."""
    p: dict[str, np.ndarray] = {
        "open": o,
        "high": h,
        "low": lo,
        "close": c,
        "volume": v,
        "ts": ts.astype(np.float64),
    }
    for n in EMA_PERIODS:
        p[f"ema_{n}"] = EMA.batch(c, n)
    for n in sorted(set(SMA_PERIODS) | set(CLOSE_STD)):
        p[f"sma_{n}"] = SMA.batch(c, n)
    for n in RSI_PERIODS:
        p[f"rsi_{n}"] = RSI.batch(c, n)
    for n in ATR_PERIODS:
        p[f"atr_{n}"] = ATR.batch(h, lo, c, n)
    p["adx_14"], p["pdi_14"], p["mdi_14"] = ADX.batch(h, lo, c, 14)
    p["adx_7"], p["pdi_7"], p["mdi_7"] = ADX.batch(h, lo, c, 7)
    p["macd"], p["macd_sig"], p["macd_hist"] = MACD.batch(c, 12, 26, 9)
    p["macdf"], p["macdf_sig"], p["macdf_hist"] = MACD.batch(c, 5, 35, 5)
    for n in DONCHIAN:
        p[f"hh_{n}"] = RollingMax.batch(h, n)
        p[f"ll_{n}"] = RollingMin.batch(lo, n)
    for n in CLOSE_STD:
        p[f"std_{n}"] = RollingStd.batch(c, n)
    prev = shift(c, 1)
    p["ret1"] = c - prev
    logret = np.log(c / prev)
    for n in RET_STD:
        p[f"rstd_{n}"] = RollingStd.batch(logret, n)
    p["logv"] = np.log1p(v)
    for n in VOL_SMA:
        p[f"vsma_{n}"] = SMA.batch(v, n)
    p["vstd_20"] = RollingStd.batch(v, 20)
    for n in ER_PERIODS:
        p[f"er_{n}"] = EfficiencyRatio.batch(c, n)
    p["rsi_15m"] = ResampledRSI.batch(ts, c, 15)
    p["rsi_60m"] = ResampledRSI.batch(ts, c, 60)
    p["range"] = h - lo
    p["range_sma_20"] = SMA.batch(h - lo, 20)
    p["atr_sma_240"] = SMA.batch(p["atr_14"], 240)
    sess = clock.session_id_batch(ts)
    df = pl.DataFrame({"s": sess, "h": h, "l": lo, "o": o, "c": c, "pv": (h + lo + c) / 3.0 * v, "v": v})
    df = df.with_columns(
        pl.col("pv").cum_sum().over("s").alias("cpv"),
        pl.col("v").cum_sum().over("s").alias("cv"),
        pl.col("h").cum_max().over("s").alias("sh"),
        pl.col("l").cum_min().over("s").alias("sl"),
        pl.col("o").first().over("s").alias("so"),
    )
    cpv, cv = df["cpv"].to_numpy(), df["cv"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        p["vwap"] = np.where(cv > 0, cpv / np.where(cv > 0, cv, 1.0), c)
    p["sess_high"], p["sess_low"], p["sess_open"] = (
        df["sh"].to_numpy(),
        df["sl"].to_numpy(),
        df["so"].to_numpy(),
    )
    first_of_session = np.concatenate(([False], np.diff(sess) != 0))
    psc = np.where(first_of_session, prev, NAN)
    # forward-fill the previous session's close through the session
    idx = np.where(~np.isnan(psc), np.arange(len(c)), 0)
    np.maximum.accumulate(idx, out=idx)
    p["prev_sess_close"] = np.where(idx > 0, psc[idx], NAN) if len(c) else psc
    p["local_s"] = clock.local_s_batch(ts).astype(np.float64)
    for name, k in LAGS:
        p[f"{name}@{k}"] = shift(p[name], k)
    return p


# ---------------------------------------------------------------------------------------------
# Feature formulas: written once, run on arrays (replay) or 1-element arrays (live).


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, with 0 where b == 0 (NaN stays NaN so warm-up is visible)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _flag(cond: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
    """1.0/0.0 for a condition; NaN where any input is still warming up."""
    out = cond.astype(np.float64)
    for x in inputs:
        out = np.where(np.isnan(x), NAN, out)
    return out


def derive(p: dict[str, np.ndarray], clock: SessionClock, tick_size: float) -> dict[str, np.ndarray]:
    """Named market features from primitives. Units are in the names' spirit: ``*_atr`` = ATR(14)
    multiples, ``ret_*`` = percent, RSI/ADX/DI scaled to [0, 1]."""
    c, o, h, lo = p["close"], p["open"], p["high"], p["low"]
    atr = np.maximum(p["atr_14"], tick_size)
    f: dict[str, np.ndarray] = {}
    # A. bar shape
    f["bar_body_atr"] = _div(c - o, atr)
    f["bar_upper_wick_atr"] = _div(h - np.maximum(o, c), atr)
    f["bar_lower_wick_atr"] = _div(np.minimum(o, c) - lo, atr)
    f["bar_range_atr"] = _div(h - lo, atr)
    f["bar_close_location"] = np.where(h > lo, _div(c - lo, h - lo), 0.5)
    # B. returns over horizons (percent, log)
    for k in RETURN_HORIZONS:
        f[f"ret_{k}m_pct"] = 100.0 * np.log(_div(c, p[f"close@{k}"]))
    # D/E. moving averages: distance and slope in ATR units
    for n in EMA_PERIODS:
        f[f"ema_{n}_dist_atr"] = _div(c - p[f"ema_{n}"], atr)
    for n in EMA_PERIODS:
        f[f"ema_{n}_slope_atr"] = _div(p[f"ema_{n}"] - p[f"ema_{n}@1"], atr)
    for n in SMA_PERIODS:
        f[f"sma_{n}_dist_atr"] = _div(c - p[f"sma_{n}"], atr)
    # F/G/H. oscillators and volatility
    for n in RSI_PERIODS:
        f[f"rsi_{n}"] = p[f"rsi_{n}"] / 100.0
    for n in ATR_PERIODS:
        f[f"atr_{n}_bps"] = 1e4 * _div(p[f"atr_{n}"], c)
    for n in (14, 7):
        f[f"adx_{n}"] = p[f"adx_{n}"] / 100.0
        f[f"plus_di_{n}"] = p[f"pdi_{n}"] / 100.0
        f[f"minus_di_{n}"] = p[f"mdi_{n}"] / 100.0
    # I. MACD
    for tag, key in (("12_26_9", "macd"), ("5_35_5", "macdf")):
        f[f"macd_{tag}_atr"] = _div(p[key], atr)
        f[f"macd_{tag}_signal_atr"] = _div(p[f"{key}_sig"], atr)
        f[f"macd_{tag}_hist_atr"] = _div(p[f"{key}_hist"], atr)
    # J. Bollinger bands (k = 2)
    for n in (20, 50):
        width = 4.0 * p[f"std_{n}"]
        f[f"bb_{n}_pct_b"] = np.where(width > 0, _div(c - (p[f"sma_{n}"] - 2.0 * p[f"std_{n}"]), width), 0.5)
        f[f"bb_{n}_width_atr"] = _div(width, atr)
    # K. channel position
    for n in (5, 10, 20, 60, 120, 240):
        f[f"high_{n}_dist_atr"] = _div(c - p[f"hh_{n}"], atr)
        f[f"low_{n}_dist_atr"] = _div(c - p[f"ll_{n}"], atr)
    f["williams_r_14"] = np.where(p["hh_14"] > p["ll_14"], _div(p["hh_14"] - c, p["hh_14"] - p["ll_14"]), 0.5)
    # L. realised volatility of 1-minute log returns (percent)
    for n in RET_STD:
        f[f"realized_vol_{n}_pct"] = 100.0 * p[f"rstd_{n}"]
    # M. volume
    f["log_volume"] = p["logv"]
    for n in (10, 60, 240):
        f[f"volume_ratio_{n}"] = _div(p["volume"], p[f"vsma_{n}"])
    f["volume_zscore_20"] = _div(p["volume"] - p["vsma_20"], p["vstd_20"])
    # N/O. efficiency and z-scores
    for n in (5, 30, 60):
        f[f"efficiency_ratio_{n}"] = p[f"er_{n}"]
    for n in (20, 60, 240):
        f[f"close_zscore_{n}"] = _div(c - p[f"sma_{n}"], p[f"std_{n}"])
    # P. time (exchange-local)
    local_s = p["local_s"]
    minute = np.floor(local_s / 60.0) % 1440
    dow = (np.floor(local_s / 86400.0) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    f["time_sin"] = np.sin(2 * math.pi * minute / 1440)
    f["time_cos"] = np.cos(2 * math.pi * minute / 1440)
    f["weekday_sin"] = np.sin(2 * math.pi * dow / 7)
    f["weekday_cos"] = np.cos(2 * math.pi * dow / 7)
    f["session_elapsed"] = ((minute - clock.session_open_min) % 1440) / 1380.0
    rth = (minute >= 570) & (minute < 960)
    f["is_rth"] = rth.astype(np.float64)
    f["is_overnight"] = (~rth).astype(np.float64)
    f["in_entry_window"] = clock.in_entry_window_batch(minute).astype(np.float64)
    f["rth_elapsed"] = np.clip((minute - 570) / 390.0, 0.0, 1.0)
    f["to_flatten"] = clock.to_flatten_batch(minute)
    # Q. session levels
    f["session_high_dist_atr"] = _div(c - p["sess_high"], atr)
    f["session_low_dist_atr"] = _div(c - p["sess_low"], atr)
    f["session_gap_atr"] = np.where(np.isnan(p["prev_sess_close"]), 0.0, _div(c - p["prev_sess_close"], atr))
    # C. window of recent bars, in today's ATR units
    logv_base = np.log1p(p["vsma_60"])
    for k in range(1, WINDOW + 1):
        f[f"win_ret_{k}_atr"] = _div(p[f"ret1@{k}"], atr)
    for k in range(1, WINDOW + 1):
        f[f"win_range_{k}_atr"] = _div(p[f"range@{k}"], atr)
    for k in range(1, WINDOW + 1):
        f[f"win_logvol_{k}"] = p[f"logv@{k}"] - logv_base
    return f


def derive_llm_context(
    p: dict[str, np.ndarray], clock: SessionClock, tick_size: float
) -> dict[str, np.ndarray]:
    """The 28 market-side LLM-context features of DESIGN.md (extended, multi-timeframe, patterns)."""
    c = p["close"]
    atr = np.maximum(p["atr_14"], tick_size)
    adx, pdi, mdi = p["adx_14"], p["pdi_14"], p["mdi_14"]
    support, resistance = p["ll_60"], p["hh_60"]
    f: dict[str, np.ndarray] = {}
    # extended market context (10)
    f["ctx_adx_slope"] = (adx - p["adx_14@5"]) / 100.0
    f["ctx_vwap_distance_atr"] = _div(c - p["vwap"], atr)
    f["ctx_volatility_regime"] = _div(p["atr_14"], p["atr_sma_240"])
    f["ctx_volume_regime"] = _div(p["vsma_20"], p["vsma_240"])
    f["ctx_momentum_20m_pct"] = 100.0 * _div(c - p["close@20"], p["close@20"])
    f["ctx_momentum_60m_pct"] = 100.0 * _div(c - p["close@60"], p["close@60"])
    f["ctx_efficiency_ratio"] = p["er_10"]
    f["ctx_spread_ratio"] = _div(p["range"], p["range_sma_20"])
    f["ctx_session_trend_atr"] = _div(c - p["sess_open"], atr)
    trending = adx > 25.0
    f["ctx_market_regime"] = _flag(trending, adx) * np.where(pdi >= mdi, 1.0, -1.0)
    # multi-timeframe (8)
    f["mtf_sma_50_slope_atr"] = _div(p["sma_50"] - p["sma_50@1"], atr) * 50.0
    f["mtf_sma_200_slope_atr"] = _div(p["sma_200"] - p["sma_200@1"], atr) * 200.0
    f["mtf_rsi_15m"] = p["rsi_15m"] / 100.0
    f["mtf_rsi_60m"] = p["rsi_60m"] / 100.0
    f["mtf_volume_ratio_5"] = _div(p["volume"], p["vsma_5"])
    f["mtf_volume_ratio_20"] = _div(p["volume"], p["vsma_20"])
    f["mtf_change_60m_atr"] = _div(c - p["close@60"], atr)
    f["mtf_sr_distance_atr"] = np.minimum(_div(c - support, atr), _div(resistance - c, atr))
    # patterns (10)
    hh10, ll10 = p["hh_10"], p["ll_10"]
    f["pat_higher_highs"] = _flag(hh10 > p["hh_10@10"], p["hh_10@10"])
    f["pat_higher_lows"] = _flag(ll10 > p["ll_10@10"], p["ll_10@10"])
    f["pat_lower_highs"] = _flag(hh10 < p["hh_10@10"], p["hh_10@10"])
    f["pat_lower_lows"] = _flag(ll10 < p["ll_10@10"], p["ll_10@10"])
    old_top, old_bottom = p["hh_40@20"], p["ll_40@20"]
    tol = 0.25 * atr
    f["pat_double_top"] = _flag(
        (np.abs(hh10 - old_top) <= tol) & (c < np.minimum(hh10, old_top) - 0.5 * atr), old_top
    )
    f["pat_double_bottom"] = _flag(
        (np.abs(ll10 - old_bottom) <= tol) & (c > np.maximum(ll10, old_bottom) + 0.5 * atr), old_bottom
    )
    f["pat_support_dist_atr"] = _div(c - support, atr)
    f["pat_resistance_dist_atr"] = _div(resistance - c, atr)
    f["pat_breakout"] = _flag(c > p["hh_60@1"], p["hh_60@1"])
    f["pat_breakdown"] = _flag(c < p["ll_60@1"], p["ll_60@1"])
    return f


def market_features_batch(
    ts: np.ndarray,
    o: np.ndarray,
    h: np.ndarray,
    lo: np.ndarray,
    c: np.ndarray,
    v: np.ndarray,
    clock: SessionClock,
    tick_size: float,
    with_llm: bool,
) -> dict[str, np.ndarray]:
    p = primitives_batch(ts, o, h, lo, c, v, clock)
    f = derive(p, clock, tick_size)
    if with_llm:
        f.update(derive_llm_context(p, clock, tick_size))
    return f


def market_features_one(
    p: dict[str, float], clock: SessionClock, tick_size: float, with_llm: bool
) -> dict[str, float]:
    arr = {k: np.array([v], dtype=np.float64) for k, v in p.items()}
    f = derive(arr, clock, tick_size)
    if with_llm:
        f.update(derive_llm_context(arr, clock, tick_size))
    return {k: float(v[0]) for k, v in f.items()}
