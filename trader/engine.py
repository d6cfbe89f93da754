"""The engine: the bar loop. One bar in ─▶ validated, featurised, decided, risk-reviewed, executed,
journaled, in DESIGN's numbered steps (see :meth:`Engine.on_bar`).

The same code serves replay, paper and live; every component arrives built and complete from
:mod:`trader.wiring`. The hot path never waits on the disk (the journal writes in its own thread)
or the LLM (advice is read from a cache). The broker never calls back: it reports fills,
refusals and reconcile results as events, which the engine applies at the start of each bar.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, overload

import numpy as np
import structlog

from trader.config import Settings
from trader.controls import Controls
from trader.decision.mask import ActionMasker
from trader.decision.risk import RiskContext, RiskEngine
from trader.domain import (
    ACTION_NAMES,
    N_ACTIONS,
    Action,
    Advice,
    Bar,
    BarDecided,
    BatchDone,
    BatchKind,
    BrokerBlocked,
    BrokerEvent,
    BrokerProblem,
    Decision,
    Fill,
    FillApplied,
    HaltChanged,
    Observed,
    OrderIntent,
    OrderKind,
    OrderRejected,
    PolicyChoice,
    ReconcileReport,
    RunEvent,
    SessionEnded,
    Side,
    StopMoved,
    Verdict,
)
from trader.execution import reconcile
from trader.execution.planner import ExecutionPlanner, Plan
from trader.execution.portfolio import Portfolio
from trader.features.observation import AccountFeatures
from trader.features.validation import BarValidator
from trader.features.warmup import warmup_bars
from trader.journal import rows
from trader.journal.rows import Row
from trader.logs import BAR as _BAR_CLOCK
from trader.policy.batch import LookAhead, look_ahead
from trader.ports import (
    AdviceSource,
    Broker,
    FeatureSource,
    Feed,
    FusionStrategy,
    JournalSink,
    Policy,
    RunObserver,
)

log = structlog.get_logger(__name__)

ACTIONS = tuple(Action)
WARMUP_CHOICE = PolicyChoice(0, 1.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
_WARMUP = Decision(Action.HOLD, "warmup", Action.HOLD, 1.0, None, None, ("warmup",))
_REDRIVE = tuple(Decision(a, "redrive", a, 1.0, None, None, ("redrive",)) for a in Action)


def _usable(c: object) -> bool:
    """A policy answer the decision can use: (action, confidence, probabilities) with a legal
    action index (an int, an ``Action``), a confidence and six probabilities in [0, 1]."""
    if not isinstance(c, tuple) or len(c) < 3:
        return False
    a, conf, p = c[0], c[1], c[2]
    if isinstance(a, bool) or not isinstance(a, int | np.integer):
        return False
    try:
        if len(p) != N_ACTIONS:
            return False
        total = sum(p)  # NaN and inf propagate through a sum: one C call instead of six checks
        return bool(
            0 <= a < N_ACTIONS
            and 0.0 <= conf <= 1.0
            and 0.0 <= total < math.inf
            and min(p) >= 0.0
            and max(p) <= 1.0
        )
    except TypeError:  # probabilities that are not numbers
        return False


_observed = partial(tuple.__new__, Observed)  # Observed(...) built in C: one per bar
_ONE_HOT = tuple([1.0 if k == a else 0.0 for k in range(N_ACTIONS)] for a in range(N_ACTIONS))


class NullJournal:
    """Discards records (training environments)."""

    def record(self, row: Row) -> None:
        pass

    def commit_point(self) -> None:
        pass

    def discard_uncommitted(self, keep: tuple[str, ...] = ()) -> None:
        pass

    def update_config(self, run_id: str, config_json: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class DecisionParts:
    """What a config reload may change, swapped together (:meth:`Engine.reload`)."""

    settings: Settings
    fusion: FusionStrategy
    risk: RiskEngine


class Column:
    """A per-bar statistic as a growable typed numpy buffer (capacity doubles), read like a list:
    ``len()``, ``[i]`` (a Python number), ``[a:b]`` (numpy), iteration, ``==`` with any sequence,
    and ``np.asarray`` (no copy). 8 bytes a bar instead of a Python object and a list slot.

    Appends go to a short Python list first (a list append is several times cheaper than a numpy
    item assignment) and move into the buffer every ``FLUSH`` values."""

    __slots__ = ("_data", "_n", "_tail", "dtype", "push")
    FLUSH = 1024

    def __init__(self, dtype: Any, values: Iterable[Any] = ()) -> None:
        self.dtype = np.dtype(dtype)
        self._data = np.zeros(0, dtype=self.dtype)
        self._n = 0
        self._tail: list[Any] = []
        # append without the flush check (the tail's own list.append): for an owner that calls
        # flush() itself every FLUSH values, as RunStats.add_bar does
        self.push = self._tail.append
        self.extend(values)

    def append(self, value: Any) -> None:
        tail = self._tail
        tail.append(value)
        if len(tail) >= self.FLUSH:
            self.flush()

    def extend(self, values: Iterable[Any]) -> None:
        self._tail.extend(values)
        self.flush()

    def flush(self) -> None:
        """Move the appended values into the numpy buffer."""
        tail, n = self._tail, self._n
        k = len(tail)
        if not k:
            return
        if n + k > len(self._data):
            grown = np.zeros(max(2 * len(self._data), n + k, self.FLUSH), dtype=self.dtype)
            grown[:n] = self._data[:n]
            self._data = grown
        self._data[n : n + k] = tail
        self._n = n + k
        tail.clear()

    def __len__(self) -> int:
        return self._n + len(self._tail)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if self._tail:
            out = np.concatenate((self._data[: self._n], np.asarray(self._tail, dtype=self.dtype)))
        else:
            out = self._data[: self._n]
            if copy:
                out = out.copy()
            else:
                out = out.view()
                out.flags.writeable = False  # a view of the buffer: reading only
        return out if dtype is None else out.astype(dtype, copy=False)

    def tolist(self) -> list[Any]:
        return np.asarray(self).tolist()

    def set_last(self, value: Any) -> None:
        """Replace the last value (there must be one)."""
        if self._tail:
            self._tail[-1] = value
        elif self._n:
            self._data[self._n - 1] = value
        else:
            raise IndexError("set_last on an empty column")

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> np.ndarray: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return np.asarray(self)[i]
        n = len(self)
        k = i + n if i < 0 else i
        if not 0 <= k < n:
            raise IndexError(f"column index {i} out of range ({n} values)")
        if k >= self._n:
            return self.dtype.type(self._tail[k - self._n]).item()
        return self._data[k].item()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Column | np.ndarray | list | tuple):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Column({np.asarray(self)!r})"


@dataclass(slots=True)
class RunStats:
    bars: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    actions: list[int] = field(default_factory=lambda: [0] * N_ACTIONS)
    vetoes: dict[str, int] = field(default_factory=dict)
    fusion_methods: dict[str, int] = field(default_factory=dict)
    # per decided bar, as typed columns (bounded memory per bar; np.asarray reads them)
    latencies_ns: Column = field(default_factory=lambda: Column(np.int64))
    ts_ns: Column = field(default_factory=lambda: Column(np.int64))
    equity: Column = field(default_factory=lambda: Column(np.float64))
    position: Column = field(default_factory=lambda: Column(np.int32))
    wall_s: float = 0.0
    status: str = "running"
    with_advice: int = 0  # decisions that had usable LLM advice
    agreements: int = 0  # ... of which RL and LLM named the same action
    orders: int = 0  # order intents sent to the broker
    fills: int = 0  # fills applied (the journal's fill sequence)
    order_rejects: int = 0  # orders the broker refused
    policy_invalid: int = 0  # bars whose policy answer was unusable (NaN ...): decided as HOLD
    # per decided bar (runs with an advisor): an LLM query was in flight
    llm_busy: Column = field(default_factory=lambda: Column(np.bool_))
    _unflushed: int = field(default=0, repr=False, compare=False)

    def end_at(self, equity: float) -> None:
        """The account's equity at the end of the run, after its last bar: what happened then (a
        close at the end of a replay, fills that came in after the last bar) counts as the last
        bar's, so the figures built from the equity column (net P&L, the last session's, drawdown)
        are the account's final ones. The position column keeps what the last bar held (exposure).
        The journal's reader does the same from the run's ``run_end`` account row."""
        if len(self.equity):
            self.equity.set_last(equity)

    def add_bar(
        self, ts_ns: int, equity: float, position: int, latency_ns: int, llm_busy: bool | None
    ) -> None:
        """One decided bar's columns (``llm_busy``: None without an advisor): plain list appends,
        moved into the numpy buffers every ``Column.FLUSH`` bars."""
        self.ts_ns.push(ts_ns)
        self.equity.push(equity)
        self.position.push(position)
        self.latencies_ns.push(latency_ns)
        if llm_busy is not None:
            self.llm_busy.push(llm_busy)
        self._unflushed += 1
        if self._unflushed >= Column.FLUSH:
            self._unflushed = 0
            for column in (self.ts_ns, self.equity, self.position, self.latencies_ns, self.llm_busy):
                column.flush()


class Engine:
    """The bar loop. Public surface: :meth:`run`, :meth:`on_bar` (and its halves :meth:`observe`
    / :meth:`decide`, which the training environment drives), :meth:`prime`, :meth:`redrive`
    (recovery), :meth:`apply_broker_events`, :meth:`flatten_now`, :meth:`close`,
    :meth:`reload`, :meth:`journal_control` and read-only properties for /state and metrics."""

    def __init__(
        self,
        settings: Settings,
        *,
        feed: Feed,
        broker: Broker,
        policy: Policy,
        features: FeatureSource,
        journal: JournalSink,
        run_id: str,
        fusion: FusionStrategy,
        risk: RiskEngine,
        controls: Controls,
        advisor: AdviceSource | None = None,
        journal_bars: bool = False,
        adopt_broker_state: bool = False,
        real_broker: bool = False,
        first_index: int = 0,
        observers: Sequence[RunObserver] = (),
    ) -> None:
        self.settings = settings
        self.feed = feed
        self.broker = broker
        self.policy = policy
        # a policy that vouches for its own output (the ONNX one checks it) skips the engine's check
        self._check_choices = not getattr(policy, "validated_output", False)
        # a rule policy with indicators of its own sees the warm-up bars too (its answer unused)
        self._warm_policy = bool(getattr(policy, "sees_warmup", False))
        self.features = features
        self.journal = journal
        self.run_id = run_id
        self.fusion = fusion
        self.risk = risk
        self.controls = controls
        self.advisor = advisor
        self.journal_bars = journal_bars  # service runs journal every bar (the recovery source)
        self.adopt_broker_state = adopt_broker_state
        self.real_broker = real_broker  # orders reach a market (live): they are kept on abort
        self.clock = features.clock  # type: ignore[attr-defined]
        self.portfolio = Portfolio(settings)
        self.masker = ActionMasker(settings)
        self.account_features = AccountFeatures(settings, features.layout)
        self.planner = ExecutionPlanner(settings, run_id)
        self.validator = BarValidator()
        self.warmup = warmup_bars(settings, getattr(features, "blocks", None))  # "auto" resolved
        self.stats = RunStats()
        self.bar_index = first_index  # index of the next decided bar
        self.primed = 0  # warm-up bars taken before the first decided bar (live history)
        # watchers of the run (dashboard, notifications, progress): told of every RunEvent
        self._observers: list[RunObserver] = list(observers)
        self._halt_seen: tuple[str, ...] = ()
        self._stop_seen: float | None = None
        self._session_announced = -1  # the last session whose end the observers were told
        self.busy_since = 0.0  # monotonic time the current bar started (0 = between bars)
        self.last_bar_at = 0.0  # monotonic time the last bar finished
        self.last_bar: Bar | None = None
        self._trade_seq = 0
        self._flatten_seq = 0
        self._invalid_reason = ""  # this bar's policy answer could not be used (why)
        self._reject_seq = 0
        self._bar_seq = 0
        self._stop_requested = False
        self._in_bar = False  # between observe() and the bar's commit
        self._pending_controls: list[tuple[Row, str | None]] = []
        self._catching_up = False
        self._first_index = first_index
        self._redriving = False  # recovery: no journal, no advisor
        # recovery of a live run: the journaled fills, each with the stop it left working
        self._given_fills: list[tuple[Fill, float | None]] | None = None
        # the action mask an Observed points at (the observation is the feature source's buffer)
        self._mask: np.ndarray = np.ones(N_ACTIONS, dtype=np.bool_)
        # replay: the policy evaluated for stretches of coming bars at once (None: bar by bar)
        self._ahead = look_ahead(policy, features, settings.policy.batch_bars)
        # journal.level below "full" keeps no per-bar decision rows (the journal drops the rest)
        self._journal_decisions = rows.LEVEL_TABLES[settings.journal.level] >= {"decisions"}

    # -- run ----------------------------------------------------------------------------------------
    @property
    def look_ahead(self) -> LookAhead | None:
        """The replay's batched policy evaluation (with its counters), or None: bar by bar."""
        return self._ahead

    def request_stop(self) -> None:
        """Stop after the current bar (signal handlers call this)."""
        self._stop_requested = True

    async def run(self) -> RunStats:
        """Consume the feed until it ends or a stop is requested. The broker is started here and
        stopped by :meth:`close`."""
        stats = self.stats
        t0 = time.perf_counter()
        await self.broker.start()
        self.apply_broker_events()  # the reconcile report at start, fills missed while down
        if self.advisor is not None:
            self.advisor.start()
        try:
            async with contextlib.aclosing(self.feed.batches()) as batches:  # type: ignore[type-var]
                async for batch in batches:
                    kind = batch.kind
                    self._catching_up = kind is BatchKind.CATCH_UP
                    for bar, row in batch.items:
                        if bar is None:
                            self._reject(None, row, "bad_timestamp")
                        elif kind is BatchKind.PRIME:
                            self.prime(bar)
                        else:
                            self.busy_since = time.monotonic()
                            await self.on_bar(bar, row)
                            self.last_bar_at = time.monotonic()
                            self.busy_since = 0.0
                        if self._stop_requested:
                            break
                    if self._observers:
                        self._publish(BatchDone(stats.bars, self.feed.total_bars))
                    if self._stop_requested:
                        stats.status = "stopped"
                        break
                else:
                    stats.status = "completed"
        except BaseException:
            stats.status = "failed"
            raise
        finally:
            stats.wall_s = time.perf_counter() - t0
            if self.advisor is not None:
                self.advisor.stop()
        return stats

    async def close(self, flatten: bool = False, reason: str = "flatten:on_stop") -> None:
        """End of a run: apply late fills, cancel working entry orders (exits stay), flatten if
        asked, stop the broker, journal the final account."""
        self.apply_broker_events()
        for cid in await self.broker.cancel_entries():
            log.info("entry_cancelled", client_id=cid)
        if flatten and self.portfolio.position != 0:
            await self.flatten_now(reason)
        elif self.portfolio.position != 0:
            log.warning(
                "stopping_with_open_position",
                position=self.portfolio.position,
                stop=self.portfolio.stop_price,
            )
        await self.broker.stop()
        self.apply_broker_events()
        ts = self.stats.ts_ns[-1] if self.stats.ts_ns else 0
        pf = self.portfolio
        self.stats.end_at(pf.balance_usd + pf.unrealized_usd)
        self._record(rows.account(self.run_id, ts, pf.snapshot(), "run_end"))
        self._commit()

    async def abort(self) -> None:
        """End of a failed run: the half-done bar is dropped, so the journal ends at the last
        complete bar as after a crash and a restart re-drives to exactly there; nothing else is
        sent. With a real broker the bar's orders and fills are kept: they happened, and the broker
        recognises a journaled order id instead of sending it again. The broker is stopped."""
        keep = ("orders", "fills", "trades", "account") if self.real_broker else ()
        self.journal.discard_uncommitted(keep)
        self._in_bar = False
        self._flush_controls()
        await self.broker.stop()

    # -- one bar ------------------------------------------------------------------------------------
    async def on_bar(self, bar: Bar, row: int = -1) -> None:
        """DESIGN's steps: 1-4 :meth:`observe` (validate, fills, features, snapshot, mask);
        5 the policy; 6-11 :meth:`decide` (advice, fusion, risk, plan, broker, journal)."""
        o = self.observe(bar, row)
        if o is None:
            return
        if not o.ready:
            if self._warm_policy:
                self.policy.act(o)  # its indicators start with the data, as the features' do
            choice = WARMUP_CHOICE
        elif self._ahead is not None:
            choice = self._ahead.act(o)  # 5, answered from a batch over the coming bars (replay)
        else:
            choice = self.policy.act(o)  # 5
        await self.decide(o, choice)

    def prime(self, bar: Bar) -> bool:
        """Warm the indicators with a history bar (live start): validated and featurised, counted
        toward ``features.warmup_bars``, never decided on or traded."""
        reason = self.validator.check(bar)
        if reason is not None:
            self._reject(bar, -1, reason)
            return False
        _BAR_CLOCK.ts_ns = bar.ts_ns
        obs = self.features.update(bar)
        local_s = self.clock.local_s(bar.ts_ns)
        pf = self.portfolio
        pf.mark_bar(bar, self.clock.session_of_local(local_s))
        pf.held_over = False  # history bars never flatten what the broker holds
        if self._warm_policy:  # a rule policy's indicators start with the history, as in a replay
            self.policy.act(
                _observed(
                    (self.bar_index, bar, (local_s // 60) % 1440, pf.snapshot(), obs, self._mask, False, 0)
                )
            )
        self.primed += 1
        self.last_bar = bar
        if self.journal_bars:
            self._journal_bar("prime", None, bar)
            self._commit()
        return True

    def observe(self, bar: Bar, row: int = -1) -> Observed | None:
        """Steps 1-4: validate the bar, apply the broker's events, mark the account, build the
        observation and the action mask. None for a rejected bar (counted, journaled)."""
        reason = self.validator.check(bar)  # 1
        if reason is not None:
            self._reject(bar, row, reason)
            return None
        t0 = time.perf_counter_ns()
        self._in_bar = True
        i = self.bar_index
        self.bar_index = i + 1
        prev_bar = self.last_bar
        self.last_bar = bar
        ts = _BAR_CLOCK.ts_ns = bar.ts_ns
        clock, pf = self.clock, self.portfolio
        given = self._given_fills
        if given is None:
            self.broker.on_bar(bar)
            self.apply_broker_events()
        elif given:
            self._apply_given(given)
        self.controls.bar_arrived()
        if self.journal_bars:
            self._journal_bar("bar", i, bar)
        local_s = clock.local_s(ts)
        session = clock.session_of_local(local_s)
        if self._observers and session != pf.session_id and not self._redriving:
            self._session_ended(prev_bar)  # its last bar was not at the close (an early close, a gap)
        pf.mark_bar(bar, session)
        obs = self.features.update(bar)  # 2
        snap = pf.snapshot()  # 3
        self.account_features.fill(obs, snap, bar.close, self.features.atr, pf.daily_trades)
        ready = self.features.ready and i + self.primed >= self.warmup
        if ready:
            self._mask = self.masker.mask(snap, bar.close)  # 4
        return _observed((i, bar, (local_s // 60) % 1440, snap, obs, self._mask, ready, t0))

    async def decide(self, o: Observed, choice: PolicyChoice) -> None:
        """Steps 6-11 for an observed bar and the policy's choice: advice, fusion, risk review,
        orders, trailing stop, statistics and journal. During warm-up the choice is ignored."""
        i, bar, snap = o.bar_index, o.bar, o.snapshot
        problem = getattr(choice, "problem", "")
        if o.ready and (problem or (self._check_choices and not _usable(choice))):
            a, conf, probs = 0, 0.0, WARMUP_CHOICE.probs
            self._policy_invalid(i, problem or f"policy answer unusable: {choice!r}"[:300])
        else:
            a, conf, probs = choice[0], choice[1], choice[2]
        pf, stats = self.portfolio, self.stats
        waited = 0.0
        advice: Advice | None = None
        advisor = self.advisor
        busy = advisor is not None and advisor.busy  # a query in flight while this bar is decided
        if o.ready:
            if advisor is not None and not self._invalid_reason:  # 6 (no question on a broken bar)
                before = advisor.sim_wait_s
                # only the entries schedule needs it: a second risk review per bar costs time
                entry = self.settings.advisor.schedule == "entries" and self._entry_decision(ACTIONS[a], o)
                advice = advisor.on_bar(
                    i, bar.ts_ns, conf, snap, o.minute_of_day, self.features.context, entry_decision=entry
                )
                waited = advisor.sim_wait_s - before
                if advice is not None:
                    stats.with_advice += 1
                    stats.agreements += advice.action == a
            if self._invalid_reason:
                decision = Decision(
                    Action.HOLD, "policy_invalid", Action.HOLD, 0.0, None, None, (self._invalid_reason,)
                )
                self._invalid_reason = ""
            else:
                decision = self.fusion.fuse(ACTIONS[a], conf, advice, o.mask, self.features.context)  # 7
        else:
            probs = WARMUP_CHOICE.probs
            decision = _WARMUP
        ctx = self.controls.risk_context(bar.ts_ns, o.minute_of_day, self.features.context, self._catching_up)
        if pf.held_over and self._still_held_over(i):  # rare: flattened as on an operator's request
            ctx = RiskContext(
                ctx.ts_ns,
                ctx.minute_of_day,
                ctx.market,
                ctx.halted,
                ctx.halt_reason,
                ctx.catching_up,
                flatten="held_over_session_close",
                kill_switch=ctx.kill_switch,
            )
        verdict = self.risk.review(decision.action, snap, ctx)  # 8
        if verdict.action == Action.HOLD and not verdict.flatten:
            plan = None  # 9: what the planner plans for a HOLD that flattens nothing (most bars)
        else:
            plan = self.planner.plan(verdict, snap, self.features.atr, i)  # 9
        if plan is not None or pf.trailing:  # most bars have nothing to send
            await self._carry_out(o, plan)  # 10
        if ctx.flatten and pf.position == 0:
            self.controls.flat()  # an operator's flatten request is done once flat
        latency = time.perf_counter_ns() - o.t0_ns - int(waited * 1e9)
        self._account_for(i, bar, probs, decision, advice, verdict, latency, busy)  # 11

    def _still_held_over(self, i: int) -> bool:
        """Whether the position Portfolio.mark_bar marked held over a session's end still is, at
        decided bar ``i``: not once flat, nor a position adopted before the first bar. Clears the
        mark otherwise."""
        pf = self.portfolio
        pf.held_over = pf.position != 0 and i != self._first_index
        return pf.held_over

    def _entry_decision(self, rl_action: Action, o: Observed) -> bool:
        """The RL proposes to open, reverse or close a position (BUY or SELL while flat, or against
        the position) and the risk engine would let it through: the decision an ``entries`` LLM
        schedule asks about (a vetoed entry is HOLD whatever the advice, so it is not asked)."""
        if rl_action not in (Action.BUY, Action.SELL):
            return False
        snap = o.snapshot
        pos = snap.position
        if pos != 0 and (rl_action == Action.BUY) == (pos > 0):
            return False  # adding to the position: not an entry decision
        ctx = self.controls.risk_context(
            o.bar.ts_ns, o.minute_of_day, self.features.context, self._catching_up
        )
        return self.risk.review(rl_action, snap, ctx).action == rl_action

    def _policy_invalid(self, i: int, reason: str) -> None:
        """The policy's answer cannot be used: this bar is HOLD, counted, its reason journaled (the
        decision's method ``policy_invalid``); a warning once per run."""
        self.stats.policy_invalid += 1
        self._invalid_reason = reason
        if self.stats.policy_invalid == 1 and not self._redriving:
            log.warning("policy_output_invalid_bars_hold", bar=i, reason=reason)

    async def _carry_out(self, o: Observed, plan: Plan | None) -> None:
        """Step 10: the plan's orders and stop changes, then the trailing stop."""
        pf = self.portfolio
        if plan is not None:
            await self._execute(plan, o.bar.ts_ns, o.bar_index)
        if pf.trailing:
            new_stop = self.planner.trail(pf.position, pf.stop_price, pf.trail_ticks, o.bar.close)
            if new_stop is not None:
                await self._set_stop(new_stop)

    def _account_for(
        self,
        i: int,
        bar: Bar,
        probs: Sequence[float],
        decision: Decision,
        advice: Advice | None,
        verdict: Verdict,
        latency_ns: int,
        llm_busy: bool,
    ) -> None:
        stats, pf, logs = self.stats, self.portfolio, self.settings.logging
        final = verdict.action
        vetoes = verdict.vetoes
        stats.bars += 1
        stats.actions[final] += 1
        m = decision.method
        stats.fusion_methods[m] = stats.fusion_methods.get(m, 0) + 1
        vtxt = None
        if logs.log_decision_fusion and m not in ("warmup", "rl_only") and not self._redriving:
            log.info(
                "decision_fusion",
                bar=i,
                method=m,
                action=ACTION_NAMES[decision.action],
                rl=ACTION_NAMES[decision.rl_action],
                reasons=";".join(decision.reasons),
            )
        if vetoes:
            counts = stats.vetoes
            for v in vetoes:
                counts[v.rule] = counts.get(v.rule, 0) + 1
            if len(vetoes) == 1:  # most vetoed bars (no generator and join for one text)
                vtxt = f"{v.rule}:{v.reason}"
            else:
                vtxt = ";".join(f"{v.rule}:{v.reason}" for v in vetoes)
            if logs.log_risk_veto and not self._redriving:
                log.info("risk_veto", bar=i, action=ACTION_NAMES[decision.action], vetoes=vtxt)
        equity = pf.balance_usd + pf.unrealized_usd
        # llm_busy only with an advisor, aligned with latencies_ns
        stats.add_bar(
            bar.ts_ns, equity, pf.position, latency_ns, llm_busy if self.advisor is not None else None
        )
        if self._journal_decisions:
            self._record(
                rows.decision(
                    self.run_id,
                    i,
                    bar,
                    probs,
                    decision,
                    advice,
                    verdict,
                    vtxt,
                    pf.position,
                    pf.balance_usd,
                    equity,
                    pf.threshold_usd,
                    latency_ns / 1000.0,
                )
            )
        self._commit()  # this bar's rows are committed together or not at all
        self._in_bar = False
        if self._pending_controls:
            self._flush_controls()
        if self._observers and not self._redriving:
            self._publish(
                BarDecided(
                    i,
                    bar,
                    decision.method != "warmup",
                    probs,
                    decision,
                    advice,
                    verdict,
                    pf.position,
                    equity,
                    pf.stop_price,
                    latency_ns / 1000.0,
                    llm_busy,
                )
            )
            self.watch_controls()
            self._watch_stop(bar.ts_ns)
            # the session closes with this bar: its summary now, not at the next session's first
            # bar (an hour later for NQ)
            bar_min = max(1, self.settings.data.bar_seconds // 60)
            if 0 < (self.clock.session_close_min - self.clock.minute_of_day(bar.ts_ns)) % 1440 <= bar_min:
                self._session_ended(bar)

    # -- recovery -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _redrive_mode(self, fills: list[tuple[Fill, float | None]] | None = None) -> Iterator[None]:
        """Nothing journaled, no advisor; with ``fills`` the broker is not called at all."""
        self._redriving, self._given_fills = True, fills
        try:
            yield
        finally:
            self._redriving, self._given_fills = False, None
            # watchers hear of what happens after the re-drive, not of the history it replayed
            self._stop_seen = self.portfolio.stop_price

    async def redrive(
        self,
        bar: Bar | None,
        row: int,
        verdict: Verdict,
        fills: list[tuple[Fill, float | None]] | None = None,
    ) -> bool:
        """Re-do a journaled bar with its journaled final verdict (crash recovery): the same orders
        and stop changes follow, whatever the controls, the advisor or a reload said then; nothing
        is journaled. ``fills``: a live run's journaled fills for this bar with the stop each left
        working, applied instead of asking the broker (which is not called at all); None = the
        broker (paper) simulates them again. Returns False for a rejected bar."""
        with self._redrive_mode(fills):
            if bar is None:
                self._reject(None, row, "bad_timestamp")
                return False
            o = self.observe(bar, row)
            if o is None:
                return False
            if self.portfolio.held_over:  # as decide() leaves it (the journaled verdict has its flatten)
                self._still_held_over(o.bar_index)
            if self._warm_policy:  # its indicators see every bar, as in the run (answer unused)
                self.policy.act(o)
            await self._carry_out(o, self.planner.plan(verdict, o.snapshot, self.features.atr, o.bar_index))
            latency = time.perf_counter_ns() - o.t0_ns
            a = verdict.action
            self._account_for(o.bar_index, bar, _ONE_HOT[a], _REDRIVE[a], None, verdict, latency, False)
            return True

    def redrive_prime(self, bar: Bar) -> None:
        with self._redrive_mode():
            self.prime(bar)

    async def redrive_shutdown(self, between_bar_orders: Sequence[str]) -> None:
        """What a graceful stop did after its last bar (paper broker): entries cancelled, and the
        journaled between-bar flatten done again."""
        with self._redrive_mode():
            await self.broker.cancel_entries()
            for purpose in between_bar_orders:
                await self.flatten_now(purpose)

    def redrive_fills(self, fills: list[tuple[Fill, float | None]]) -> None:
        """Apply journaled fills that arrived after the last bar (recovery of a live run)."""
        with self._redrive_mode():
            self._apply_given(fills)

    # -- between bars -------------------------------------------------------------------------------
    def apply_broker_events(self) -> None:
        """Apply what the broker reported since the last call, in order."""
        events = self.broker.drain_events()
        if events:
            self._apply_events(events)
            if self._observers and not self._redriving:
                self.watch_controls()
                self._watch_stop(self.last_bar.ts_ns if self.last_bar is not None else 0)

    async def flatten_now(self, reason: str) -> None:
        """Close the position now, between bars (the service stopping with ``on_stop =
        flatten``): one market order, journaled; a paper broker fills it at the last close."""
        pf, bar = self.portfolio, self.last_bar
        if pf.position == 0 or bar is None:
            return
        side = Side.SELL if pf.position > 0 else Side.BUY
        self._flatten_seq += 1  # re-driven flattens count too: ids stay unique across restarts
        cid = f"{self.run_id[:8]}-{self.bar_index}-flat{self._flatten_seq}"
        intent = OrderIntent(
            cid, side, abs(pf.position), OrderKind.MARKET, reason, position_before=pf.position
        )
        self._record(rows.order(self.run_id, intent, self.bar_index - 1, bar.ts_ns))
        self.stats.orders += 1
        await self.broker.flatten_now(intent, bar)
        self.apply_broker_events()
        self._commit()
        if not self._redriving:
            log.warning("flattened", reason=reason, position=pf.position)

    def journal_control(
        self, action: str, source: str, result: str, reason: str = "", config_json: str | None = None
    ) -> None:
        """Journal a control request at the bar it takes effect on. Between bars it is committed
        at once; during a bar (an HTTP request served while the bar awaits the broker) it waits for
        the bar's own commit, so a bar's rows are never committed half done. ``config_json``: an
        accepted reload's configuration, which becomes the run's (a restart compares with it)."""
        from datetime import UTC, datetime

        at = datetime.now(UTC).isoformat()
        self._pending_controls.append(
            (rows.control(self.run_id, at, action, source, reason, result, self.bar_index), config_json)
        )
        if not self._in_bar:
            self._flush_controls()

    def _flush_controls(self) -> None:
        pending, self._pending_controls = self._pending_controls, []
        for row, config_json in pending:
            self.journal.record(row)
            if config_json is not None:
                self.journal.update_config(self.run_id, config_json)
        if pending:
            self.journal.commit_point()

    def reload(self, parts: DecisionParts) -> None:
        """Swap the reloadable parts all at once (a reload built and validated them first)."""
        self.settings = parts.settings
        self.fusion = parts.fusion
        self.risk = parts.risk

    # -- watchers -----------------------------------------------------------------------------------
    def watch_controls(self) -> None:
        """Tell the observers when the reasons entries are halted changed (the engine calls it after
        each bar and broker event; the service after it changed a control between bars)."""
        if not self._observers:
            return
        reasons = tuple(self.controls.halt_reasons())
        if reasons != self._halt_seen:
            self._halt_seen = reasons
            ts = self.last_bar.ts_ns if self.last_bar is not None else 0
            self._publish(HaltChanged(ts, reasons))

    def end_of_run(self) -> None:
        """The run is over: the last session's summary goes to the observers."""
        if self._observers:
            self._session_ended(self.last_bar)
            self.watch_controls()

    def _session_ended(self, last_bar: Bar | None) -> None:
        """The portfolio's current session is over; ``last_bar``: its last bar."""
        pf = self.portfolio
        if pf.session_id < 0 or last_bar is None or pf.session_id == self._session_announced:
            return
        self._session_announced = pf.session_id
        equity = pf.balance_usd + pf.unrealized_usd
        self._publish(
            SessionEnded(
                pf.session_id,
                last_bar.ts_ns,
                equity - pf.session_start_equity,
                pf.daily_trades,
                equity,
            )
        )

    def _watch_stop(self, ts_ns: int) -> None:
        pf = self.portfolio
        if pf.stop_price != self._stop_seen:
            old, self._stop_seen = self._stop_seen, pf.stop_price
            self._publish(StopMoved(ts_ns, old, pf.stop_price, pf.position))

    def _publish(self, event: RunEvent) -> None:
        for obs in tuple(self._observers):
            try:
                obs.on_event(event)
            except Exception:
                # a watcher must never stop trading: it is dropped, once, loudly
                log.exception("run_observer_failed_dropped", observer=type(obs).__name__)
                self._observers.remove(obs)

    # -- internals ----------------------------------------------------------------------------------
    def _record(self, row: Row) -> None:
        if not self._redriving:
            self.journal.record(row)

    def _commit(self) -> None:
        if not self._redriving:
            self.journal.commit_point()

    def _reject(self, bar: Bar | None, row: int, reason: str) -> None:
        if bar is not None:
            _BAR_CLOCK.ts_ns = bar.ts_ns  # the log line's bar time is the rejected bar's
        rej = self.stats.rejected
        rej[reason] = rej.get(reason, 0) + 1
        self._reject_seq += 1
        origin = self.feed.origin(row)
        self._record(rows.bar_rejected(self.run_id, self._reject_seq, bar, origin, reason))
        if not self._redriving:
            log.warning("bar_rejected", reason=reason, origin=origin)

    def _journal_bar(self, kind: str, i: int | None, b: Bar) -> None:
        self._bar_seq += 1
        self._record(rows.bar(self.run_id, self._bar_seq, kind, i, b, self.stats.fills))

    async def _execute(self, plan: Plan, ts: int, i: int) -> None:
        pf = self.portfolio
        for o in plan.orders:
            self._record(rows.order(self.run_id, o, i, ts))
            self.stats.orders += 1
            if self._given_fills is None:
                await self.broker.submit(o)
        if plan.move_stop is not None:
            await self._set_stop(plan.move_stop)
        if plan.break_even:
            pf.set_break_even()
        if plan.trailing is not None:
            pf.set_trailing(plan.trailing, plan.trail_ticks)

    async def _set_stop(self, price: float) -> None:
        if self._given_fills is None:
            await self.broker.set_stop(price)
        moved = price != self.portfolio.stop_price
        self.portfolio.set_stop(price)
        if moved:  # the stop's path over time (the report's stop line); a fill's row has its own
            ts = self.last_bar.ts_ns if self.last_bar is not None else 0
            self._record(rows.account(self.run_id, ts, self.portfolio.snapshot(), "stop_moved"))
        if self._observers and not self._redriving:
            self._watch_stop(self.last_bar.ts_ns if self.last_bar is not None else 0)

    def _apply_events(self, events: list[BrokerEvent]) -> None:
        for e in events:
            if isinstance(e, Fill):
                self._apply_fills([e])
            elif isinstance(e, OrderRejected):
                self.stats.order_rejects += 1
                log.warning("order_rejected", client_id=e.client_id, reason=e.reason[:200])
            elif isinstance(e, ReconcileReport):
                self._reconciled(e)
            elif isinstance(e, BrokerProblem):
                self.controls.set_mismatch(e.text)
                log.error("broker_problem_entries_halted", problem=e.text)
            elif isinstance(e, BrokerBlocked):
                self.controls.set_broker_blocked(e.reason)

    def _reconciled(self, r: ReconcileReport) -> None:
        pf = self.portfolio
        outcome = reconcile.compare(r, pf.position, self.adopt_broker_state)
        if outcome.kind == "adopt":
            ts = self.last_bar.ts_ns if self.last_bar is not None else 0
            pf.adopt_position(r.position, r.avg_price, ts)
            pf.set_stop(r.working_stop if r.position else None)
            self._record(rows.account(self.run_id, ts, pf.snapshot(), f"adopt:{r.why}"))
            self._commit()
            self.controls.set_mismatch("")
            log.warning("reconcile_adopted", why=r.why, problems=outcome.text, position=r.position)
        elif outcome.kind == "mismatch":
            self.controls.set_mismatch(f"reconcile ({r.why}): {outcome.text}")
            log.error("reconcile_mismatch", why=r.why, problems=outcome.text)
        else:
            if r.working_stop is not None and pf.position:
                pf.set_stop(r.working_stop)  # the broker's stop is the truth (after a restart)
            if self.controls.reconcile_mismatch:
                log.info("reconcile_ok_entries_allowed", why=r.why)
            self.controls.set_mismatch("")
            log.info("reconciled", why=r.why, position=r.position)

    def _apply_fills(self, fills: list[Fill]) -> None:
        for f in fills:
            self._apply_fill(f, self.broker.working_stop)

    def _apply_given(self, fills: list[tuple[Fill, float | None]]) -> None:
        for f, stop in fills:
            self._apply_fill(f, stop)

    def _apply_fill(self, f: Fill, working_stop: float | None) -> None:
        """One fill into the portfolio; the stop is the one working at the broker after it."""
        pf = self.portfolio
        self.stats.fills += 1
        self._record(rows.fill(self.run_id, self.stats.fills, f))
        closed = pf.apply_fill(f)
        for t in closed:
            self._trade_seq += 1
            self._record(rows.trade(self.run_id, self._trade_seq, t))
        pf.set_stop(working_stop if pf.position else None)
        self._record(rows.account(self.run_id, f.ts_ns, pf.snapshot(), f"fill:{f.purpose}"))
        if self._observers and not self._redriving:
            self._publish(FillApplied(f, pf.position, pf.avg_entry, pf.stop_price, tuple(closed)))
            self._watch_stop(f.ts_ns)
