"""Incremental indicators, each with its vectorised twin.

Every class has ``update(...)`` (O(1) per bar, for live bars) and a ``batch(...)`` classmethod
over whole numpy arrays (for replay). Both follow TA-Lib's seeding conventions (EMA seeded with
the SMA of the first n values, Wilder averages seeded with the mean of the first n terms), so the
parity tests can compare both against TA-Lib and against each other. Values are NaN until ready.

Each class also says how long that is: ``lookback(...)`` = the bars before its first value (the
0-based index of its first value when every input is defined from the first bar). The automatic
warm-up (``features.warmup_bars = "auto"``) is built from these; a test checks each one against
the values the class really produces.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
import polars as pl

NAN = math.nan
_RESUM_EVERY = 4096  # re-add rolling sums exactly now and then, so float drift cannot build up


def recurrence_batch(x: np.ndarray, start: int, seed: float, alpha: float) -> np.ndarray:
    """y[start] = seed; y[t] = (1 - alpha) * y[t-1] + alpha * x[t] for t > start; NaN before start."""
    out = np.full(len(x), NAN)
    if start >= len(x) or math.isnan(seed):
        return out
    seg = x[start:].astype(np.float64, copy=True)
    seg[0] = seed
    out[start:] = pl.Series(seg).ewm_mean(alpha=alpha, adjust=False, min_samples=1).to_numpy()
    return out


def _on_valid_suffix(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a rolling computation to the part of x after its leading NaNs (warm-up of an input)."""
    nan = np.isnan(x)
    if not nan[:1].any():
        return fn(x)
    out = np.full(len(x), NAN)
    valid = np.flatnonzero(~nan)
    if len(valid):
        out[valid[0] :] = fn(x[valid[0] :])
    return out


def shift(x: np.ndarray, k: int) -> np.ndarray:
    """x lagged by k bars (NaN where there is no history)."""
    out = np.full(len(x), NAN)
    if k < len(x):
        out[k:] = x[: len(x) - k]
    return out


def rolling_sum_batch(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full(len(x), NAN)
    if len(x) >= n:
        c = np.concatenate(([0.0], np.cumsum(x, dtype=np.float64)))
        out[n - 1 :] = c[n:] - c[:-n]
    return out


class Lag:
    """The value from k updates ago (NaN until there is one)."""

    __slots__ = ("_buf", "k")

    def __init__(self, k: int) -> None:
        self.k = k
        self._buf: deque[float] = deque(maxlen=k + 1)

    def update(self, x: float) -> float:
        self._buf.append(x)
        return self._buf[0] if len(self._buf) == self.k + 1 else NAN

    @staticmethod
    def lookback(k: int) -> int:
        return k


class SMA:
    """Simple moving average over n values, with a running sum."""

    __slots__ = ("_buf", "_count", "_sum", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._buf: deque[float] = deque(maxlen=n)
        self._sum = 0.0
        self._count = 0

    def update(self, x: float) -> float:
        if x != x:  # an input still warming up: no window yet
            return NAN
        if len(self._buf) == self.n:
            self._sum -= self._buf[0]
        self._buf.append(x)
        self._sum += x
        self._count += 1
        if self._count % _RESUM_EVERY == 0:
            self._sum = math.fsum(self._buf)
        return self._sum / self.n if len(self._buf) == self.n else NAN

    @classmethod
    def batch(cls, x: np.ndarray, n: int) -> np.ndarray:
        return _on_valid_suffix(x, lambda v: rolling_sum_batch(v, n) / n)

    @staticmethod
    def lookback(n: int) -> int:
        return n - 1


class RollingStd:
    """Population standard deviation over n values (TA-Lib STDDEV with nbdev=1)."""

    __slots__ = ("_buf", "_count", "_s1", "_s2", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._buf: deque[float] = deque(maxlen=n)
        self._s1 = 0.0
        self._s2 = 0.0
        self._count = 0

    def update(self, x: float) -> float:
        if x != x:
            return NAN
        if len(self._buf) == self.n:
            old = self._buf[0]
            self._s1 -= old
            self._s2 -= old * old
        self._buf.append(x)
        self._s1 += x
        self._s2 += x * x
        self._count += 1
        if self._count % _RESUM_EVERY == 0:
            self._s1 = math.fsum(self._buf)
            self._s2 = math.fsum(v * v for v in self._buf)
        if len(self._buf) < self.n:
            return NAN
        mean = self._s1 / self.n
        return math.sqrt(max(self._s2 / self.n - mean * mean, 0.0))

    @classmethod
    def batch(cls, x: np.ndarray, n: int) -> np.ndarray:
        def std(v: np.ndarray) -> np.ndarray:
            mean = rolling_sum_batch(v, n) / n
            var = rolling_sum_batch(v * v, n) / n - mean * mean
            return np.sqrt(np.maximum(var, 0.0))

        return _on_valid_suffix(x, std)

    @staticmethod
    def lookback(n: int) -> int:
        return n - 1


class EMA:
    """Exponential moving average, k = 2/(n+1), seeded with the SMA of the first n values."""

    __slots__ = ("_alpha", "_seed", "_seen", "n", "value")

    def __init__(self, n: int, alpha: float | None = None) -> None:
        self.n = n
        self._alpha = 2.0 / (n + 1) if alpha is None else alpha
        self._seed = 0.0
        self._seen = 0
        self.value = NAN

    def update(self, x: float) -> float:
        if math.isnan(x):
            return self.value
        self._seen += 1
        if self._seen < self.n:
            self._seed += x
        elif self._seen == self.n:
            self.value = (self._seed + x) / self.n
        else:
            self.value = (1.0 - self._alpha) * self.value + self._alpha * x
        return self.value

    @classmethod
    def batch(cls, x: np.ndarray, n: int, alpha: float | None = None) -> np.ndarray:
        a = 2.0 / (n + 1) if alpha is None else alpha
        valid = np.flatnonzero(~np.isnan(x))
        if len(valid) < n:
            return np.full(len(x), NAN)
        first = valid[0]
        start = first + n - 1
        seed = float(np.mean(x[first : start + 1]))
        return recurrence_batch(x, start, seed, a)

    @staticmethod
    def lookback(n: int) -> int:
        return n - 1  # seeded with the mean of the first n values


class Wilder(EMA):
    """Wilder's smoothing: an EMA with alpha = 1/n, seeded with the mean of the first n values."""

    __slots__ = ()

    def __init__(self, n: int) -> None:
        super().__init__(n, alpha=1.0 / n)

    @classmethod
    def batch(cls, x: np.ndarray, n: int, alpha: float | None = None) -> np.ndarray:
        return EMA.batch(x, n, alpha=1.0 / n)


class RSI:
    """Wilder's RSI (TA-Lib RSI): average gain/loss over n changes, 0..100."""

    __slots__ = ("_gain", "_loss", "_prev", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._gain = Wilder(n)
        self._loss = Wilder(n)
        self._prev = NAN

    @property
    def averages(self) -> tuple[float, float]:
        """Wilder's average gain and loss so far (NaN before n changes)."""
        return self._gain.value, self._loss.value

    @staticmethod
    def _rsi(g: float, loss: float) -> float:
        if math.isnan(g):
            return NAN
        total = g + loss
        return 100.0 * g / total if total > 0 else 50.0

    def update(self, x: float) -> float:
        prev, self._prev = self._prev, x
        if math.isnan(prev):
            return NAN
        d = x - prev
        return self._rsi(self._gain.update(max(d, 0.0)), self._loss.update(max(-d, 0.0)))

    def peek(self, x: float) -> float:
        """The RSI if x were the next value, without committing it (for forming higher-timeframe bars)."""
        if math.isnan(self._prev) or math.isnan(self._gain.value):
            return NAN
        d = x - self._prev
        a = 1.0 / self.n
        g = (1 - a) * self._gain.value + a * max(d, 0.0)
        loss = (1 - a) * self._loss.value + a * max(-d, 0.0)
        return self._rsi(g, loss)

    @classmethod
    def batch(cls, x: np.ndarray, n: int) -> np.ndarray:
        d = np.diff(x, prepend=NAN)
        g = Wilder.batch(np.where(np.isnan(d), NAN, np.maximum(d, 0.0)), n)
        lo = Wilder.batch(np.where(np.isnan(d), NAN, np.maximum(-d, 0.0)), n)
        total = g + lo
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, 100.0 * g / total, np.where(np.isnan(total), NAN, 50.0))

    @staticmethod
    def lookback(n: int) -> int:
        return n  # n changes: n + 1 values


def true_range_batch(h: np.ndarray, lo: np.ndarray, c: np.ndarray) -> np.ndarray:
    pc = shift(c, 1)
    tr = np.maximum(h - lo, np.maximum(np.abs(h - pc), np.abs(lo - pc)))
    tr[0] = NAN  # TA-Lib starts the true range at the second bar
    return tr


class ATR:
    """Average true range, Wilder-smoothed (TA-Lib ATR)."""

    __slots__ = ("_prev_close", "_w", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._w = Wilder(n)
        self._prev_close = NAN

    def update(self, h: float, lo: float, c: float) -> float:
        pc, self._prev_close = self._prev_close, c
        if math.isnan(pc):
            return NAN
        tr = max(h - lo, abs(h - pc), abs(lo - pc))
        return self._w.update(tr)

    @classmethod
    def batch(cls, h: np.ndarray, lo: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
        return Wilder.batch(true_range_batch(h, lo, c), n)

    @staticmethod
    def lookback(n: int) -> int:
        return n  # the true range starts at the second bar


class ADX:
    """Average directional index with +DI/-DI (TA-Lib ADX, PLUS_DI, MINUS_DI conventions).

    DM and TR are Wilder-smoothed with the first n-1 terms as seed sum; ADX is the Wilder
    average of DX seeded with the mean of the first n DX values.
    """

    __slots__ = ("_dx", "_i", "_mdm", "_pdm", "_prev", "_s_mdm", "_s_pdm", "_s_tr", "_tr", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._prev: tuple[float, float, float] | None = None
        self._i = 0
        self._s_pdm = self._s_mdm = self._s_tr = 0.0
        self._pdm = self._mdm = self._tr = 0.0
        self._dx = Wilder(n)

    def update(self, h: float, lo: float, c: float) -> tuple[float, float, float]:
        """Returns (adx, plus_di, minus_di)."""
        prev, self._prev = self._prev, (h, lo, c)
        if prev is None:
            return NAN, NAN, NAN
        ph, pl_, pc = prev
        up, down = h - ph, pl_ - lo
        pdm = up if (up > down and up > 0) else 0.0
        mdm = down if (down > up and down > 0) else 0.0
        tr = max(h - lo, abs(h - pc), abs(lo - pc))
        self._i += 1
        n = self.n
        if self._i < n:
            self._s_pdm += pdm
            self._s_mdm += mdm
            self._s_tr += tr
            return NAN, NAN, NAN
        self._s_pdm = self._s_pdm - self._s_pdm / n + pdm
        self._s_mdm = self._s_mdm - self._s_mdm / n + mdm
        self._s_tr = self._s_tr - self._s_tr / n + tr
        pdi, mdi = self._di(self._s_pdm, self._s_mdm, self._s_tr)
        s = pdi + mdi
        dx = 100.0 * abs(pdi - mdi) / s if s > 0 else 0.0
        return self._dx.update(dx), pdi, mdi

    @staticmethod
    def _di(pdm: float, mdm: float, tr: float) -> tuple[float, float]:
        if tr <= 0:
            return 0.0, 0.0
        return 100.0 * pdm / tr, 100.0 * mdm / tr

    @classmethod
    def batch(
        cls, h: np.ndarray, lo: np.ndarray, c: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = len(h)
        up = h - shift(h, 1)
        down = shift(lo, 1) - lo
        with np.errstate(invalid="ignore"):
            pdm = np.where((up > down) & (up > 0), up, 0.0)
            mdm = np.where((down > up) & (down > 0), down, 0.0)
        tr = true_range_batch(h, lo, c)
        if m <= n:
            nan = np.full(m, NAN)
            return nan, nan.copy(), nan.copy()
        a = 1.0 / n

        def smooth(x: np.ndarray) -> np.ndarray:
            # S[n-1] = sum(x[1..n-1]); S[t] = S[t-1]*(1-1/n) + x[t]; scaled by 1/n it is a recurrence.
            seed = float(np.sum(x[1:n])) / n
            seg = x.copy()
            seg[0] = 0.0
            r = recurrence_batch(seg, n - 1, seed, a)
            r[n - 1] = NAN
            return r

        s_p, s_m, s_t = smooth(pdm), smooth(mdm), smooth(tr)
        with np.errstate(invalid="ignore", divide="ignore"):
            pdi = np.where(s_t > 0, 100.0 * s_p / s_t, 0.0)
            mdi = np.where(s_t > 0, 100.0 * s_m / s_t, 0.0)
            ssum = pdi + mdi
            dx = np.where(ssum > 0, 100.0 * np.abs(pdi - mdi) / ssum, 0.0)
        pdi[:n] = NAN
        mdi[:n] = NAN
        dx[:n] = NAN
        adx = Wilder.batch(dx, n)
        return adx, pdi, mdi

    @staticmethod
    def lookback(n: int) -> tuple[int, int]:
        """(ADX, ±DI): the DIs from the n-th change on, ADX a Wilder average of n DX values."""
        return 2 * n - 1, n


class MACD:
    """MACD line (EMA fast - EMA slow), its signal EMA and the histogram."""

    __slots__ = ("_fast", "_signal", "_slow")

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9) -> None:
        self._fast, self._slow, self._signal = EMA(fast), EMA(slow), EMA(signal)

    def update(self, x: float) -> tuple[float, float, float]:
        f, s = self._fast.update(x), self._slow.update(x)
        line = f - s if not math.isnan(s) else NAN
        sig = self._signal.update(line)
        return line, sig, line - sig

    @classmethod
    def batch(
        cls, x: np.ndarray, fast: int = 12, slow: int = 26, signal: int = 9
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        line = EMA.batch(x, fast) - EMA.batch(x, slow)
        line[: slow - 1] = NAN
        sig = EMA.batch(line, signal)
        return line, sig, line - sig

    @staticmethod
    def lookback(fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[int, int]:
        """(line, signal and histogram)."""
        line = EMA.lookback(max(fast, slow))
        return line, line + EMA.lookback(signal)


class RollingMax:
    """Max over the last n values: monotonic deque, O(1) amortised."""

    __slots__ = ("_dq", "_i", "_sign", "n")

    def __init__(self, n: int, sign: float = 1.0) -> None:
        self.n = n
        self._dq: deque[tuple[int, float]] = deque()
        self._i = 0
        self._sign = sign

    def update(self, x: float) -> float:
        v = self._sign * x
        dq = self._dq
        while dq and dq[-1][1] <= v:
            dq.pop()
        dq.append((self._i, v))
        if dq[0][0] <= self._i - self.n:
            dq.popleft()
        self._i += 1
        return self._sign * dq[0][1] if self._i >= self.n else NAN

    @classmethod
    def batch(cls, x: np.ndarray, n: int) -> np.ndarray:
        out = np.full(len(x), NAN)
        if len(x) >= n:
            out[n - 1 :] = np.lib.stride_tricks.sliding_window_view(x, n).max(axis=1)
        return out

    @staticmethod
    def lookback(n: int) -> int:
        return n - 1


class RollingMin(RollingMax):
    __slots__ = ()

    def __init__(self, n: int) -> None:
        super().__init__(n, sign=-1.0)

    @classmethod
    def batch(cls, x: np.ndarray, n: int) -> np.ndarray:
        return -RollingMax.batch(-x, n)


class EfficiencyRatio:
    """Kaufman's efficiency ratio: |net change over n| / sum of |1-bar changes|, in [0, 1]."""

    __slots__ = ("_lag", "_noise", "_prev", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._lag = Lag(n)
        self._noise = SMA(n)
        self._prev = NAN

    def update(self, x: float) -> float:
        prev, self._prev = self._prev, x
        old = self._lag.update(x)
        if math.isnan(prev):
            return NAN
        noise = self._noise.update(abs(x - prev)) * self.n
        if math.isnan(old) or math.isnan(noise):
            return NAN
        return abs(x - old) / noise if noise > 0 else 0.0

    @classmethod
    def batch(cls, x: np.ndarray, n: int) -> np.ndarray:
        d = np.abs(np.diff(x, prepend=NAN))
        d[0] = 0.0
        noise = rolling_sum_batch(d, n)
        noise[:n] = NAN
        net = np.abs(x - shift(x, n))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(noise > 0, net / noise, np.where(np.isnan(noise), NAN, 0.0))

    @staticmethod
    def lookback(n: int) -> int:
        return n


class ResampledRSI:
    """RSI on higher-timeframe bars (e.g. 15 or 60 minutes) built from 1-minute closes.

    A bucket is ``ts // bucket_ns``; completed buckets feed a Wilder RSI, and the value for
    the current bar is that RSI provisionally advanced by the current close.
    """

    __slots__ = ("_bucket", "_bucket_ns", "_last_close", "_rsi", "n")

    def __init__(self, minutes: int, n: int = 14) -> None:
        self.n = n
        self._bucket_ns = minutes * 60 * 1_000_000_000
        self._rsi = RSI(n)
        self._bucket = -1
        self._last_close = NAN

    def update(self, ts_ns: int, close: float) -> float:
        b = ts_ns // self._bucket_ns
        if b != self._bucket:
            if self._bucket >= 0:
                self._rsi.update(self._last_close)
            self._bucket = b
        self._last_close = close
        return self._rsi.peek(close)

    @staticmethod
    def lookback(minutes: int, n: int = 14) -> int:
        """Worst case, 1-minute bars from the start of a bucket: n + 1 completed buckets (a later
        start completes the first bucket sooner; gaps in the bars make it fewer bars)."""
        return (n + 1) * minutes

    @classmethod
    def batch(cls, ts_ns: np.ndarray, close: np.ndarray, minutes: int, n: int = 14) -> np.ndarray:
        bucket = ts_ns // (minutes * 60 * 1_000_000_000)
        m = len(close)
        out = np.full(m, NAN)
        if m == 0:
            return out
        new_bucket = np.flatnonzero(np.diff(bucket) != 0) + 1  # first bar of each later bucket
        completed_close = close[new_bucket - 1]  # close of each completed bucket, in order
        if len(completed_close) == 0:
            return out  # no higher-timeframe bar has completed yet
        rsi = RSI(n)
        gains = np.full(len(completed_close), NAN)
        losses = np.full(len(completed_close), NAN)
        prevs = np.full(len(completed_close), NAN)
        for k, cl in enumerate(completed_close):
            rsi.update(float(cl))
            gains[k], losses[k] = rsi.averages
            prevs[k] = cl
        # number of completed buckets before each bar
        k_done = np.searchsorted(new_bucket, np.arange(m), side="right")
        idx = k_done - 1
        has = idx >= 0
        g = np.where(has, gains[np.maximum(idx, 0)], NAN)
        lo = np.where(has, losses[np.maximum(idx, 0)], NAN)
        pc = np.where(has, prevs[np.maximum(idx, 0)], NAN)
        d = close - pc
        a = 1.0 / n
        g2 = (1 - a) * g + a * np.maximum(d, 0.0)
        l2 = (1 - a) * lo + a * np.maximum(-d, 0.0)
        total = g2 + l2
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(total > 0, 100.0 * g2 / total, np.where(np.isnan(total), NAN, 50.0))
        return out
