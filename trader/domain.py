"""Domain values shared by every component: frozen, slotted, typed.

Prices are floats that are always on the instrument's tick grid (see :class:`TickGrid`);
money is USD; times are UTC epoch nanoseconds (``ts_ns``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np


class Action(enum.IntEnum):
    """The six actions, in the fixed order shared by policy, LLM grammar and journal."""

    HOLD = 0
    BUY = 1
    SELL = 2
    MOVE_TO_BE = 3
    ENABLE_TRAIL = 4
    DISABLE_TRAIL = 5


N_ACTIONS = len(Action)
ACTION_NAMES: tuple[str, ...] = tuple(a.name for a in Action)
ENTRY_SIDE_ACTIONS = frozenset({Action.BUY, Action.SELL, Action.ENABLE_TRAIL})


@dataclass(frozen=True, slots=True)
class Bar:
    """One OHLCV bar. ``ts_ns`` is the bar's open time (UTC ns); the bar covers [ts, ts + interval)."""

    ts_ns: int
    open: float
    high: float
    low: float
    close: float
    volume: float


@dataclass(frozen=True, slots=True)
class TickGrid:
    """Rounds prices to the instrument's tick grid. All prices the engine emits pass through here."""

    tick_size: float

    def ticks(self, price: float) -> int:
        return round(price / self.tick_size)

    def price(self, ticks: int) -> float:
        return ticks * self.tick_size

    def round(self, price: float) -> float:
        return round(price / self.tick_size) * self.tick_size

    def round_down(self, price: float) -> float:
        # A tiny epsilon keeps 15999.999999 from dropping a whole tick.
        return math.floor(price / self.tick_size + 1e-9) * self.tick_size

    def round_up(self, price: float) -> float:
        return math.ceil(price / self.tick_size - 1e-9) * self.tick_size


@dataclass(frozen=True, slots=True)
class Advice:
    """One LLM answer. ``confidence`` is what fusion uses; it decays with ``age_bars``."""

    action: Action
    confidence: float
    reason: str
    asked_bar: int
    age_bars: int = 0
    stated_confidence: float | None = None
    logit_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Fusion's output: the chosen action, how it was chosen and why."""

    action: Action
    method: str
    rl_action: Action
    rl_confidence: float
    llm_action: Action | None
    llm_confidence: float | None
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Veto:
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """Risk's output. ``reduce_only`` turns SELL/BUY into an exit without a new entry."""

    action: Action
    vetoes: tuple[Veto, ...] = ()
    reduce_only: bool = False
    flatten: bool = False
    flatten_reason: str = ""


class OrderKind(enum.Enum):
    MARKET = "market"
    STOP = "stop"


class Side(enum.IntEnum):
    BUY = 1
    SELL = -1


@dataclass(frozen=True, slots=True)
class OrderIntent:
    """What execution asks the broker to do. ``purpose`` says why (entry, exit, flatten, reverse)."""

    client_id: str
    side: Side
    qty: int
    kind: OrderKind
    purpose: str
    stop_ticks: int = 0  # > 0: a protective stop this many ticks from the fill (bracket)
    # the signed position (contracts) the order was planned against, at its turn in the plan (a
    # reversal's entry: 0, after its exit). A live broker does not send an entry or add whose
    # position changed before it could go out (a late fill, a stop): it would be a guess.
    position_before: int | None = None


@dataclass(frozen=True, slots=True)
class StopUpdate:
    """Move (or place) the protective stop of the open position."""

    stop_price: float
    reason: str


@dataclass(frozen=True, slots=True)
class TrailUpdate:
    enabled: bool
    distance_ticks: int


@dataclass(frozen=True, slots=True)
class Fill:
    client_id: str
    ts_ns: int
    side: Side
    qty: int
    price: float
    commission_usd: float
    purpose: str


@dataclass(frozen=True, slots=True)
class Trade:
    """A closed round trip (or the closed part of one)."""

    entry_ts_ns: int
    exit_ts_ns: int
    side: Side
    qty: int
    entry_price: float
    exit_price: float
    pnl_usd: float  # net of commissions of both sides
    exit_reason: str


@dataclass(frozen=True, slots=True)
class PortfolioSnapshot:
    """Position and account state the decision path reads on each bar."""

    position: int  # signed contracts
    avg_entry: float
    stop_price: float | None
    trailing: bool
    at_break_even: bool
    bars_in_trade: int
    unrealized_usd: float
    balance_usd: float
    equity_usd: float
    peak_equity_usd: float
    drawdown_threshold_usd: float
    daily_pnl_usd: float
    consecutive_losses: int
    recent_win_rate: float | None
    recent_trades: int
    mae_usd: float
    mfe_usd: float


@dataclass(frozen=True, slots=True)
class MarketContext:
    """Market facts for prompts and risk plug-ins (prices in points, ATR in points)."""

    ts_ns: int
    close: float
    atr: float
    adx: float
    plus_di: float
    minus_di: float
    rsi: float
    macd: float
    vwap: float
    vwap_distance_atr: float
    momentum_pct: float
    support: float
    resistance: float
    volatility_regime: float
    minute_of_day: int
    extras: tuple[tuple[str, float], ...] = ()


class BatchKind(enum.Enum):
    """How the engine treats a batch of bars from a feed."""

    PRIME = "prime"  # history before the first decided bar: warms the indicators, never traded
    CATCH_UP = "catch_up"  # bars missed while disconnected: decided on, entries vetoed
    LIVE = "live"  # decided on and traded


class Observed(NamedTuple):
    """One bar between ``Engine.observe`` and ``Engine.decide``: what the policy sees.

    ``obs`` and ``mask`` are the engine's preallocated buffers (valid until the next bar; copy to
    keep them). ``ready`` is False during warm-up, when the policy's choice is not used.
    A NamedTuple: immutable, and cheap to make once per bar."""

    bar_index: int  # decided-bar index in the run
    bar: Bar
    minute_of_day: int  # exchange-local minute
    snapshot: PortfolioSnapshot
    obs: np.ndarray
    mask: np.ndarray
    ready: bool
    t0_ns: int  # perf_counter_ns when the bar arrived (decision latency starts here)


class PolicyChoice(NamedTuple):
    """A policy's answer: the action, its probability, and all six probabilities. ``problem``:
    why the answer cannot be used (a non-finite output, say): the bar is decided as HOLD."""

    action: int
    confidence: float
    probs: list[float]
    problem: str = ""


@dataclass(frozen=True, slots=True)
class OrderRejected:
    """The broker refused an order (counted, journaled as an account note, never retried)."""

    client_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class BrokerProblem:
    """Something the broker could not do that leaves its state uncertain (entries halt until a
    reconcile agrees again); ``text`` says what."""

    text: str


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What the broker says it holds, for :func:`trader.execution.reconcile.compare`."""

    why: str  # "start", "reconnect"
    position: int
    avg_price: float
    working_stop: float | None
    unknown_orders: tuple[int, ...]  # working orders at the broker that no run of ours placed


@dataclass(frozen=True, slots=True)
class BrokerBlocked:
    """The broker cannot take new orders for a while (a rate-limit lockout, a captcha penalty, the
    request budget nearly spent): entries halt while ``reason`` is set, working stops stay at the
    broker, and an event with ``reason = ""`` ends it."""

    reason: str


BrokerEvent = Fill | OrderRejected | BrokerProblem | ReconcileReport | BrokerBlocked


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """A feed's or broker's health as /healthz and the watchdog see it."""

    kind: str
    connected: bool
    disconnected_s: float = 0.0  # how long it has been down (0 while connected)
    counters: tuple[tuple[str, int], ...] = ()
    degraded: str = ""  # up, but limited (a lockout, a penalty): /healthz says so, the watchdog not


# -- what a run tells its watchers (dashboard, notifications, progress) -----------------------------
@dataclass(frozen=True, slots=True)
class BarDecided:
    """One decided bar (warm-up bars included, ``ready`` False): the policy's probabilities, the
    advice used, fusion's decision, risk's verdict, and the account after it. Prices in points,
    money in USD."""

    bar_index: int
    bar: Bar
    ready: bool
    probs: Sequence[float]
    decision: Decision
    advice: Advice | None
    verdict: Verdict
    position: int
    equity_usd: float
    stop_price: float | None
    latency_us: float
    llm_busy: bool  # an LLM query was in flight while this bar was decided


@dataclass(frozen=True, slots=True)
class FillApplied:
    """A fill entered the portfolio; ``trades`` are the round trips it closed."""

    fill: Fill
    position: int
    avg_entry: float
    stop_price: float | None
    trades: tuple[Trade, ...]


@dataclass(frozen=True, slots=True)
class StopMoved:
    """The protective stop changed (``new`` None = no stop): break-even, trailing or a resync."""

    ts_ns: int
    old: float | None
    new: float | None
    position: int


@dataclass(frozen=True, slots=True)
class HaltChanged:
    """The reasons entries are halted changed; empty ``reasons`` = entries allowed again."""

    ts_ns: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """A trading session ended (seen at the first bar of the next one, or at the end of a run)."""

    session_id: int
    last_ts_ns: int
    net_pnl_usd: float
    trades: int
    equity_usd: float


@dataclass(frozen=True, slots=True)
class BatchDone:
    """The feed's batch is done: ``bars`` decided so far of the feed's ``total_bars`` rows (None
    for a live feed), for progress displays."""

    bars: int
    total_bars: int | None


RunEvent = BarDecided | FillApplied | StopMoved | HaltChanged | SessionEnded | BatchDone


@dataclass(frozen=True, slots=True)
class LLMReply:
    """One answer of an LLM backend (text, the six-action distribution when it has logits)."""

    text: str
    action_probs: tuple[float, ...] | None  # from logits at the action position, if the backend has them
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    backend: str
    timed_out: bool = False
