"""Rule policies: baselines that run through the same engine, journal and report as the RL policy
(``policy.path = "module:attr"``; ``strategies.rules`` re-exports these for the CLI).

Each answers with certainty (probability 1 on its action); an action the mask forbids becomes
HOLD. One with indicators of its own (``sees_warmup = True``: EmaCross) is also shown the warm-up
bars, its answers unused, so its indicators start with the data as the features' do.
"""

from __future__ import annotations

from trader.config import Settings
from trader.domain import Action, Observed, PolicyChoice
from trader.errors import ConfigError
from trader.features.clock import SessionClock
from trader.features.indicators import EMA


def _certain(a: int) -> PolicyChoice:
    p = [0.0] * 6
    p[a] = 1.0
    return PolicyChoice(a, 1.0, p)


class Flat:
    """Always HOLD: the flat baseline (it still gets the engine's stops and session flattening)."""

    name = "flat"

    def __init__(self, settings: Settings | None = None) -> None:
        pass

    def act(self, o: Observed) -> PolicyChoice:
        return _certain(Action.HOLD)


class BuyAndHold:
    """Long: BUY whenever flat inside the entry window (``instrument.trade_start`` ..
    ``trade_end``), HOLD otherwise.

    Intraday buy-and-hold under the engine's rules: it buys at the first decided bar of each
    session's entry window (the fill is the next bar's open) and holds until something closes the
    position, which with the default session rules is the flatten at ``instrument.flatten_at``
    (15:55 ET), so it is long from 09:30 to 15:55 every session. A protective stop or a risk
    rule (daily loss limit, trailing drawdown) can close it earlier; it buys again on the next bar
    the risk engine allows an entry. Run it with ``execution.stop_mode = "none"`` to hold through
    the day without a stop (``trader compare`` does).
    """

    name = "buy_and_hold"

    def __init__(self, settings: Settings | None = None) -> None:
        self.clock = SessionClock(settings.instrument) if settings is not None else None

    def act(self, o: Observed) -> PolicyChoice:
        in_window = self.clock is None or self.clock.in_entry_window(o.minute_of_day)
        if o.snapshot.position == 0 and in_window and o.mask[Action.BUY]:
            return _certain(Action.BUY)
        return _certain(Action.HOLD)


class EmaCross:
    """BUY when EMA(fast) crosses above EMA(slow), SELL when it crosses below, else HOLD.

    EMAs of every accepted bar's close (warm-up bars included), seeded with the SMA of the first
    ``n`` closes (TA-Lib's EMA). A cross needs the side of both bars: the first bar on which
    EMA(slow) exists is no cross, whatever its side.
    """

    name = "ema_cross"
    sees_warmup = True

    def __init__(self, settings: Settings | None = None, fast: int = 20, slow: int = 50) -> None:
        if (
            isinstance(fast, bool)
            or isinstance(slow, bool)
            or not isinstance(fast, int)
            or not isinstance(slow, int)
        ):
            raise ConfigError(
                f"policy.options: EmaCross periods must be integers (fast={fast!r}, slow={slow!r})"
            )
        if not 1 <= fast < slow:
            raise ConfigError(f"policy.options: EmaCross needs 1 <= fast < slow (fast={fast}, slow={slow})")
        self.fast, self.slow = EMA(fast), EMA(slow)
        self.name = f"ema_cross_{fast}_{slow}"
        self._side: float | None = None  # sign of fast - slow on the previous bar (None: unknown)

    def act(self, o: Observed) -> PolicyChoice:
        c = o.bar.close
        diff = self.fast.update(c) - self.slow.update(c)
        side = None if diff != diff else (1.0 if diff > 0 else -1.0 if diff < 0 else 0.0)
        prev, self._side = self._side, side
        a = Action.HOLD
        if side is not None and prev is not None:
            if side > 0 and prev <= 0:
                a = Action.BUY
            elif side < 0 and prev >= 0:
                a = Action.SELL
        if not o.mask[a]:
            a = Action.HOLD
        return _certain(a)
