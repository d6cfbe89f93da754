"""The engine: one bar in ─▶ validated, featurised, decided, risk-reviewed, executed, journaled.

The same code serves replay, paper and live; only the feed, broker and feature source differ,
and :func:`build_replay` wires them for replay in one place. The hot path never waits on the
disk (the journal writes in its own thread) or the LLM (advice is read from a cache).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog

from trader.config import Settings
from trader.decision.fusion import FusionStrategy, build_fusion
from trader.decision.mask import ActionMasker
from trader.decision.risk import RiskContext, RiskEngine, load_rules
from trader.domain import (
    ACTION_NAMES,
    N_ACTIONS,
    Action,
    Advice,
    Bar,
    Decision,
    Fill,
    PortfolioSnapshot,
    Trade,
)
from trader.execution.brokers.base import Broker
from trader.execution.brokers.paper import PaperBroker
from trader.execution.planner import ExecutionPlanner, Plan
from trader.execution.portfolio import Portfolio
from trader.features.observation import (
    AccountFeatures,
    BulkFeatures,
    FeatureSource,
    MarketContext,
    load_feature_blocks,
)
from trader.features.validation import BarValidator
from trader.feeds.replay import RecordedBars, ReplayFeed, load_bars
from trader.journal import Journal
from trader.logs import BAR as _BAR_CLOCK
from trader.policy import OnnxPolicy

log = structlog.get_logger(__name__)

ACTIONS = tuple(Action)
_WARMUP_PROBS = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
_WARMUP = Decision(Action.HOLD, "warmup", Action.HOLD, 1.0, None, None, ("warmup",))


class Feed(Protocol):
    """Bars in time order, in batches (a live feed: batches of one). ``None`` = an unreadable row."""

    def batches(self) -> AsyncGenerator[list[tuple[Bar | None, int]], None]: ...


class AdviceSource(Protocol):
    """The LLM advisor as the bar path sees it (``trader.llm.advisor.Advisor``).

    ``on_bar`` returns the latest usable advice (confidence already decayed) and may start a query
    in its worker thread; it never waits for one except in the replay modes that simulate waiting,
    and ``sim_wait_s`` says how long those waits took so they are not counted as decision latency.
    """

    @property
    def sim_wait_s(self) -> float: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...

    def on_bar(
        self,
        i: int,
        ts_ns: int,
        rl_confidence: float,
        snap: PortfolioSnapshot,
        minute: int,
        market: Callable[[], MarketContext],
    ) -> Advice | None: ...


class JournalSink(Protocol):
    def record(self, table: str, row: tuple[object, ...]) -> None: ...

    def commit_point(self) -> None: ...


class NullJournal:
    """Discards records (training environments, crash-recovery re-drives)."""

    def record(self, table: str, row: tuple[object, ...]) -> None:
        pass

    def commit_point(self) -> None:
        pass


class Policy(Protocol):
    def act(self, obs: np.ndarray, mask: np.ndarray) -> tuple[int, float, list[float]]: ...


@dataclass(slots=True)
class RunStats:
    bars: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    actions: list[int] = field(default_factory=lambda: [0] * N_ACTIONS)
    vetoes: dict[str, int] = field(default_factory=dict)
    fusion_methods: dict[str, int] = field(default_factory=dict)
    latencies_ns: list[int] = field(default_factory=list)
    ts_ns: list[int] = field(default_factory=list)
    equity: list[float] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    status: str = "running"
    with_advice: int = 0  # decisions that had usable LLM advice
    agreements: int = 0  # ... of which RL and LLM named the same action


class Engine:
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
        fusion: FusionStrategy | None = None,
        risk: RiskEngine | None = None,
        advisor: AdviceSource | None = None,
        origin: Callable[[int], str] | None = None,
    ) -> None:
        self.settings = settings
        self.feed, self.broker, self.policy, self.features, self.journal = (
            feed,
            broker,
            policy,
            features,
            journal,
        )
        self.run_id = run_id
        self.clock = features.clock  # type: ignore[attr-defined]
        self.portfolio = Portfolio(settings)
        self.masker = ActionMasker(settings)
        self.account_features = AccountFeatures(settings, features.layout)
        self.fusion = fusion or build_fusion(settings.fusion, settings.fusion.strategy_options)
        self.risk = risk or RiskEngine(settings, self.clock)
        self.planner = ExecutionPlanner(settings, run_id)
        self.advisor = advisor
        self.validator = BarValidator()
        self.origin = origin or (lambda i: f"row {i}")
        self.warmup = settings.features.warmup_bars
        self.ctx = RiskContext(0, 0, features.context)
        self.stats = RunStats()
        self.bar_index = 0
        self._fill_seq = 0
        self._trade_seq = 0
        self._reject_seq = 0
        self._stop_requested = False
        self.progress: Callable[[int], None] | None = None
        self.primed = 0  # warm-up bars taken before the first decided bar (live history)
        self.journal_bars = False  # live/paper: journal every bar (the recovery source)
        self._bar_seq = 0
        self.busy_since = 0.0  # monotonic time the current bar started (0 = between bars)
        self.last_bar_at = 0.0  # monotonic time the last bar finished
        # the bar between observe() and decide()
        self.obs: np.ndarray = np.zeros(features.layout.dim, dtype=np.float32)
        self.mask: np.ndarray = np.ones(N_ACTIONS, dtype=np.bool_)
        self.ready = False
        self._t0 = 0
        self._i = -1
        self._bar = Bar(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        self._snap: PortfolioSnapshot = self.portfolio.snapshot()
        self._minute = 0

    def request_stop(self) -> None:
        """Stop after the current bar (signal handlers call this)."""
        self._stop_requested = True

    async def run(self) -> RunStats:
        stats = self.stats
        t0 = time.perf_counter()
        await self.broker.start()
        if self.advisor is not None:
            self.advisor.start()
        try:
            async with contextlib.aclosing(self.feed.batches()) as batches:
                async for batch in batches:
                    kind = getattr(self.feed, "batch_kind", "live")
                    self.ctx.catching_up = kind == "catch_up"
                    for bar, row in batch:
                        if bar is None:
                            self._reject(None, row, "bad_timestamp")
                        elif kind == "prime":
                            self.prime(bar)
                        else:
                            self.busy_since = time.monotonic()
                            await self.on_bar(bar, row)
                            self.last_bar_at = time.monotonic()
                            self.busy_since = 0.0
                        if self._stop_requested:
                            break
                    if self.progress is not None:
                        self.progress(stats.bars)
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
            await self.broker.stop()
            self._journal_account(stats.ts_ns[-1] if stats.ts_ns else 0, "run_end")
        return stats

    def _reject(self, bar: Bar | None, row: int, reason: str) -> None:
        rej = self.stats.rejected
        rej[reason] = rej.get(reason, 0) + 1
        self._reject_seq += 1
        origin = self.origin(row)
        if bar is None:
            self.journal.record(
                "bars_rejected",
                (self.run_id, self._reject_seq, None, origin, reason, None, None, None, None, None),
            )
        else:
            self.journal.record(
                "bars_rejected",
                (
                    self.run_id,
                    self._reject_seq,
                    bar.ts_ns,
                    origin,
                    reason,
                    _num(bar.open),
                    _num(bar.high),
                    _num(bar.low),
                    _num(bar.close),
                    _num(bar.volume),
                ),
            )
        log.warning("bar_rejected", reason=reason, origin=origin)

    def prime(self, bar: Bar) -> bool:
        """Warm the indicators with a history bar (live start): validated and featurised, counted
        toward ``features.warmup_bars``, never decided on or traded."""
        reason = self.validator.check(bar)
        if reason is not None:
            self._reject(bar, -1, reason)
            return False
        _BAR_CLOCK.ts_ns = bar.ts_ns
        self.features.update(bar)
        self.portfolio.mark_bar(bar, self.clock.session_of_local(self.clock.local_s(bar.ts_ns)))
        self.primed += 1
        self._bar = bar
        if self.journal_bars:
            self._journal_bar("prime", None, bar)
            self.journal.commit_point()
        return True

    def _journal_bar(self, kind: str, i: int | None, b: Bar) -> None:
        self._bar_seq += 1
        self.journal.record(
            "bars",
            (
                self.run_id,
                self._bar_seq,
                kind,
                i,
                b.ts_ns,
                b.open,
                b.high,
                b.low,
                b.close,
                b.volume,
                self._fill_seq,
            ),
        )

    async def on_bar(self, bar: Bar, row: int = -1) -> None:
        if not self.observe(bar, row):
            return
        if self.ready:
            a, conf, probs = self.policy.act(self.obs, self.mask)
            await self.decide(a, conf, probs)
        else:
            await self.decide(0, 1.0, _WARMUP_PROBS)

    def observe(self, bar: Bar, row: int = -1) -> bool:
        """First half of a bar: validate, apply fills and stops, mark the account, build the
        observation and the action mask. Returns False for a rejected bar (counted, journaled).

        Afterwards ``obs``, ``mask`` and ``ready`` describe the bar awaiting :meth:`decide`; the
        training environment calls these two halves directly, with its agent's action between them.
        """
        reason = self.validator.check(bar)
        if reason is not None:
            self._reject(bar, row, reason)
            return False
        self._t0 = time.perf_counter_ns()
        i = self._i = self.bar_index
        self.bar_index = i + 1
        self._bar = bar
        ts = _BAR_CLOCK.ts_ns = bar.ts_ns
        clock, pf = self.clock, self.portfolio
        self.broker.on_bar(bar)
        fills = self.broker.drain_fills()
        if fills:
            self._apply_fills(fills)
        if self.journal_bars:
            self._journal_bar("bar", i, bar)
        local_s = clock.local_s(ts)
        pf.mark_bar(bar, clock.session_of_local(local_s))
        obs = self.obs = self.features.update(bar)
        snap = self._snap = pf.snapshot()
        self.account_features.fill(obs, snap, bar.close, self.features.atr, pf.daily_trades)
        self.ready = self.features.ready and i + self.primed >= self.warmup
        self._minute = (local_s // 60) % 1440
        if self.ready:
            self.mask = self.masker.mask(snap, bar.close)
        return True

    async def decide(self, a: int, conf: float, probs: list[float]) -> None:
        """Second half of a bar: the policy's choice (``a`` with confidence ``conf``) ─▶ advice,
        fusion, risk review, orders, trailing stop, statistics and journal. Ignored during warm-up."""
        i, bar, snap, minute = self._i, self._bar, self._snap, self._minute
        ts, close = bar.ts_ns, bar.close
        pf, broker, stats = self.portfolio, self.broker, self.stats
        atr = self.features.atr
        waited = 0.0
        if self.ready:
            mask = self.mask
            advisor = self.advisor
            if advisor is not None:
                before = advisor.sim_wait_s
                advice = advisor.on_bar(i, ts, conf, snap, minute, self.features.context)
                waited = advisor.sim_wait_s - before
                if advice is not None:
                    stats.with_advice += 1
                    stats.agreements += advice.action == a
            else:
                advice = None
            decision = self.fusion.fuse(ACTIONS[a], conf, advice, mask, self.features.context)
        else:
            probs = _WARMUP_PROBS
            advice = None
            decision = _WARMUP
        ctx = self.ctx
        ctx.ts_ns = ts
        ctx.minute_of_day = minute
        verdict = self.risk.review(decision.action, snap, ctx)
        if ctx.flatten and pf.position == 0:
            ctx.flatten = ""  # an operator's flatten request is done once flat
        plan = self.planner.plan(verdict, snap, atr, i)
        if plan is not None:
            await self._execute(plan, ts, i)
        if pf.trailing:
            new_stop = self.planner.trail(pf.position, pf.stop_price, pf.trail_ticks, close)
            if new_stop is not None:
                await broker.set_stop(new_stop)
                pf.set_stop(new_stop)
        latency = time.perf_counter_ns() - self._t0 - int(waited * 1e9)
        final = verdict.action
        vetoes = verdict.vetoes
        stats.bars += 1
        stats.actions[final] += 1
        m = decision.method
        stats.fusion_methods[m] = stats.fusion_methods.get(m, 0) + 1
        vtxt = None
        if self.settings.logging.log_decision_fusion and decision.method not in ("warmup", "rl_only"):
            log.info(
                "decision_fusion",
                bar=i,
                method=decision.method,
                action=ACTION_NAMES[decision.action],
                rl=ACTION_NAMES[decision.rl_action],
                reasons=";".join(decision.reasons),
            )
        if vetoes:
            for v in vetoes:
                stats.vetoes[v.rule] = stats.vetoes.get(v.rule, 0) + 1
            vtxt = ";".join(f"{v.rule}:{v.reason}" for v in vetoes)
            if self.settings.logging.log_risk_veto:
                log.info("risk_veto", bar=i, action=ACTION_NAMES[decision.action], vetoes=vtxt)
        stats.latencies_ns.append(latency)
        stats.ts_ns.append(ts)
        equity = pf.balance_usd + pf.unrealized_usd
        stats.equity.append(equity)
        stats.position.append(pf.position)
        la = decision.llm_action
        self.journal.record(
            "decisions",
            (
                self.run_id,
                i,
                ts,
                close,
                probs[0],
                probs[1],
                probs[2],
                probs[3],
                probs[4],
                probs[5],
                int(decision.rl_action),
                decision.rl_confidence,
                None if la is None else int(la),
                decision.llm_confidence,
                None if advice is None else advice.age_bars,
                m,
                ";".join(decision.reasons),
                int(decision.action),
                int(final),
                vtxt,
                verdict.flatten_reason or None,
                pf.position,
                pf.balance_usd,
                equity,
                pf.threshold_usd,
                latency / 1000.0,
            ),
        )
        self.journal.commit_point()  # this bar's rows are committed together or not at all

    async def _execute(self, plan: Plan, ts: int, i: int) -> None:
        pf, broker = self.portfolio, self.broker
        for o in plan.orders:
            self.journal.record(
                "orders",
                (self.run_id, o.client_id, i, ts, int(o.side), o.qty, o.kind.value, o.purpose, o.stop_ticks),
            )
            await broker.submit(o)
        if plan.move_stop is not None:
            await broker.set_stop(plan.move_stop)
            pf.set_stop(plan.move_stop)
        if plan.break_even:
            pf.set_break_even()
        if plan.trailing is not None:
            pf.set_trailing(plan.trailing, plan.trail_ticks)

    def _apply_fills(self, fills: list[Fill]) -> None:
        pf = self.portfolio
        for f in fills:
            self._fill_seq += 1
            self.journal.record(
                "fills",
                (
                    self.run_id,
                    self._fill_seq,
                    f.client_id,
                    f.ts_ns,
                    int(f.side),
                    f.qty,
                    f.price,
                    f.commission_usd,
                    f.purpose,
                ),
            )
            for t in pf.apply_fill(f):
                self._journal_trade(t)
            pf.set_stop(self.broker.working_stop if pf.position else None)
            self._journal_account(f.ts_ns, f"fill:{f.purpose}")

    def _journal_trade(self, t: Trade) -> None:
        self._trade_seq += 1
        self.journal.record(
            "trades",
            (
                self.run_id,
                self._trade_seq,
                t.entry_ts_ns,
                t.exit_ts_ns,
                int(t.side),
                t.qty,
                t.entry_price,
                t.exit_price,
                t.pnl_usd,
                t.exit_reason,
            ),
        )

    def _journal_account(self, ts: int, reason: str) -> None:
        pf = self.portfolio
        s = pf.snapshot()
        self.journal.record(
            "account",
            (
                self.run_id,
                ts,
                s.position,
                s.avg_entry,
                s.stop_price,
                s.balance_usd,
                s.equity_usd,
                s.peak_equity_usd,
                s.drawdown_threshold_usd,
                s.daily_pnl_usd,
                s.consecutive_losses,
                reason,
            ),
        )


def _num(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


@dataclass
class ReplayRun:
    engine: Engine
    journal: Journal
    recorded: RecordedBars | None  # None: a live feed
    run_id: str


def build_replay(
    settings: Settings,
    journal_path: str | Path | None = None,
    data_paths: list[Path] | None = None,
    advisor_timing: str = "bar",
    mode: str = "replay",
    resume_run_id: str | None = None,
) -> ReplayRun:
    """Wire a replay from config: data ─▶ bulk features, paper broker, ONNX policy, journal."""
    recorded = load_bars(settings.data, data_paths)
    blocks = load_feature_blocks(settings.features.custom_blocks)
    accepted = _accepted_rows(recorded)
    cols = {k: getattr(recorded, k)[accepted] for k in ("ts_ns", "open", "high", "low", "close", "volume")}
    features = BulkFeatures(settings, cols, blocks)
    policy = OnnxPolicy(
        settings.policy.path, features.layout, settings.policy.provider, settings.policy.intra_op_threads
    )
    run_id = resume_run_id or uuid.uuid4().hex
    journal = Journal(
        journal_path or settings.journal.path, settings.journal.batch_size, settings.journal.flush_interval_ms
    )
    if resume_run_id:
        journal.resume_run(run_id)
    else:
        journal.start_run(
            run_id,
            mode,
            settings.model_dump_json(),
            str(settings.policy.path),
            features.layout.hash,
            recorded.files,
        )
    rules = load_rules(settings.risk.rules, settings.risk.rule_options, settings)
    try:
        advisor = build_advisor(settings, journal, run_id, features.clock, timing=advisor_timing)
    except BaseException:
        journal.close()
        raise
    engine = Engine(
        settings,
        feed=ReplayFeed(recorded, settings.data.speed),
        broker=PaperBroker(settings),
        policy=policy,
        features=features,
        journal=journal,
        run_id=run_id,
        risk=RiskEngine(settings, features.clock, rules),
        origin=recorded.origin,
        advisor=advisor,
    )
    structlog.contextvars.bind_contextvars(run_id=run_id[:8], mode=mode)
    log.info(
        "replay_ready",
        bars=len(recorded),
        accepted=int(accepted.sum()),
        files=list(recorded.files),
        layout_hash=features.layout.hash,
        policy=str(settings.policy.path),
    )
    return ReplayRun(engine, journal, recorded, run_id)


def build_advisor(
    settings: Settings, journal: Journal, run_id: str, clock: object, timing: str
) -> AdviceSource | None:
    """The LLM advisor for ``advisor.mode`` (None when off). Loads the model or recorded answers."""
    mode = settings.advisor.mode
    if mode == "off":
        return None
    from trader.llm.advisor import Advisor, RecordedAnswers
    from trader.llm.backends import build_backend

    recorded = None
    backend = None
    if mode == "recorded":
        path = settings.advisor.recorded_journal
        assert path is not None  # checked by config
        recorded = RecordedAnswers(Path(path), settings.advisor.recorded_run_id)
    else:
        backend = build_backend(settings)
    return Advisor(
        settings,
        backend,
        mode=mode,
        timing=timing,
        record=journal.record,
        run_id=run_id,
        clock=clock,
        recorded=recorded,
    )


def _accepted_rows(rb: RecordedBars) -> np.ndarray:
    """The rows the engine's validator will accept (same validator, same order)."""
    v = BarValidator()
    ok = np.zeros(len(rb), dtype=bool)
    for bar, i in rb.items():
        if bar is not None:
            ok[i] = v.check(bar) is None
    return ok


def config_json(settings: Settings) -> str:
    return json.dumps(settings.model_dump(mode="json"), sort_keys=True)
