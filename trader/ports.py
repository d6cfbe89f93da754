"""Every seam of the engine as a small Protocol, and the one loader of plug-ins by dotted path.

The core depends on these; adapters (feeds, brokers, LLM backends) and plug-ins (fusion
strategies, risk rules, feature blocks, Python policies) implement them. The wiring
(:mod:`trader.wiring`) picks the implementations for a mode, in one place.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from trader.domain import (
    Action,
    Advice,
    Bar,
    BatchKind,
    BrokerEvent,
    ComponentHealth,
    Decision,
    LLMReply,
    MarketContext,
    Observed,
    OrderIntent,
    PolicyChoice,
    PortfolioSnapshot,
    RunEvent,
)
from trader.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from trader.config import Settings
    from trader.decision.risk import RiskContext
    from trader.features.layout import ObservationLayout
    from trader.journal.rows import Row


class Batch(NamedTuple):
    """Bars from a feed, in time order. ``None`` stands for an unreadable row; ``row`` is the
    feed's own position of the bar (a file row, or -1 for a live bar)."""

    kind: BatchKind
    items: list[tuple[Bar | None, int]]


class Feed(Protocol):
    """Bars in time order, in batches (a live feed: batches of one). ``total_bars``: how many
    rows a recorded feed holds (progress displays), None for a live feed."""

    @property
    def total_bars(self) -> int | None: ...

    def batches(self) -> AsyncIterator[Batch]: ...

    def origin(self, row: int) -> str:
        """Where a row came from, for messages and rejected-bar rows ("file.csv:123")."""
        ...

    def resume_after(self, last_ts_ns: int, next_row: int) -> None:
        """Continue a run after its last journaled bar (recovery), before ``batches`` starts."""
        ...

    def health(self) -> ComponentHealth: ...

    async def open(self) -> None:
        """Connect and authenticate now (before READY), so bad credentials fail at start."""
        ...

    async def close(self) -> None: ...


class Broker(Protocol):
    """Routes order intents and reports what happened as events; it never calls the engine.

    Fills, refusals, reconcile reports and problems come back from :meth:`drain_events` in the
    order they happened (paper: simulated on :meth:`on_bar`; live: received from the broker)."""

    name: str

    @property
    def working_stop(self) -> float | None:
        """The protective stop working at the broker, if any."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, intent: OrderIntent) -> None: ...

    async def set_stop(self, stop_price: float | None) -> None:
        """Place, move or (None) cancel the protective stop of the open position."""
        ...

    async def flatten_now(self, intent: OrderIntent, last_bar: Bar) -> None:
        """Close the position between bars (the service stopping with ``on_stop = flatten``)."""
        ...

    async def cancel_entries(self) -> list[str]:
        """Cancel working entry orders not yet sent or filled; returns their client ids."""
        ...

    def on_bar(self, bar: Bar) -> None:
        """Called with every accepted bar before the decision; simulated brokers fill here."""
        ...

    def drain_events(self) -> list[BrokerEvent]: ...

    def health(self) -> ComponentHealth: ...


class Policy(Protocol):
    """Chooses one of the six actions for an observed bar (ONNX or a Python rule)."""

    name: str

    def act(self, o: Observed) -> PolicyChoice: ...


@runtime_checkable
class BatchPolicy(Policy, Protocol):
    """A policy that can also answer many observations in one call (replay evaluates stretches of
    bars ahead: ``trader.policy.batch``). Opt-in for plug-ins: row k of ``act_batch(obs, masks)``
    must be exactly what ``act`` answers for that observation and mask, for every batch size
    ``batch_exact(max_rows)`` says yes to (1, 2, 4 ... ``max_rows``)."""

    def act_batch(self, obs: np.ndarray, masks: np.ndarray) -> Sequence[PolicyChoice]: ...

    def batch_exact(self, max_rows: int) -> bool: ...


class AdviceSource(Protocol):
    """The LLM advisor as the bar path sees it (``trader.llm.advisor.Advisor``).

    ``on_bar`` returns the latest usable advice (confidence already decayed) and may start a query
    in its worker; it never waits for one except in the replay modes that simulate waiting, and
    ``sim_wait_s`` says how long those waits took so they are not counted as decision latency.
    """

    @property
    def sim_wait_s(self) -> float: ...

    @property
    def busy(self) -> bool:
        """A query is in flight."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...

    def continue_after(self, query_id: int) -> None:
        """A continued run: number new queries after the journaled ones."""
        ...

    def reconfigure(self, settings: Settings) -> None:
        """Take the schedule, cache, prompts and log channel of reloaded settings."""
        ...

    def on_bar(
        self,
        i: int,
        ts_ns: int,
        rl_confidence: float,
        snap: PortfolioSnapshot,
        minute: int,
        market: Callable[[], MarketContext],
        entry_decision: bool = False,
    ) -> Advice | None: ...


class FeatureSource(Protocol):
    layout: ObservationLayout
    ready: bool
    atr: float

    def update(self, bar: Bar) -> np.ndarray: ...

    def context(self) -> MarketContext: ...


@runtime_checkable
class FeatureBlock(Protocol):
    """A user feature block: extra named features appended to the market part of the layout."""

    names: tuple[str, ...]

    def update(self, bar: Bar) -> Sequence[float]: ...


class JournalSink(Protocol):
    def record(self, row: Row) -> None: ...

    def commit_point(self) -> None: ...

    def discard_uncommitted(self, keep: tuple[str, ...] = ()) -> None: ...

    def update_config(self, run_id: str, config_json: str) -> None: ...


class RunObserver(Protocol):
    """Watches a run (live dashboard, notifications, progress display). Called on the bar loop for
    every :data:`~trader.domain.RunEvent`, so it only records and returns: no I/O, no waiting, no
    exceptions (the engine logs and drops an observer that raises, once)."""

    def on_event(self, event: RunEvent) -> None: ...


class FusionStrategy(Protocol):
    """Combines the RL choice and (optional) LLM advice into one Decision with its reasons."""

    def fuse(
        self,
        rl_action: Action,
        rl_confidence: float,
        advice: Advice | None,
        mask: np.ndarray,
        market: Callable[[], MarketContext],
    ) -> Decision: ...


class RiskRule(Protocol):
    """A veto rule: returns a reason to block an entry-side action, or None. ``check`` must be a
    pure function of its inputs: the engine may ask more than once per bar (the ``entries`` LLM
    schedule asks whether an entry would pass before fusion decides)."""

    name: str

    def check(self, action: Action, snapshot: PortfolioSnapshot, ctx: RiskContext) -> str | None: ...


class LLMBackend(Protocol):
    name: str

    def complete(self, system: str, user: str, timeout_s: float) -> LLMReply: ...

    def close(self) -> None: ...


def load_object(path: str, key: str = "") -> Any:
    """Import ``package.module:attr`` (or ``package.module.attr``); ``key`` names the config key
    in the error."""
    where = f"{key}: " if key else ""
    mod_name, sep, attr = path.partition(":")
    if not sep:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"{where}{path!r} is not a dotted path 'module:attr'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"{where}cannot import {mod_name!r} for {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{where}{mod_name!r} has no attribute {attr!r} (from {path!r})") from None
