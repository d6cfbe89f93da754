"""The one place that builds a run from config, for every mode.

``build_replay`` (replay; recorded-paper service), ``build_live`` (live feed with the paper or the
Tradovate broker), ``open_service_run`` (the service: continue the journal's run of this mode or
start one, then re-drive it), ``decision_parts`` (fusion + risk, also for a reload),
``build_training_engine`` (the gymnasium environment). Every component is built complete before
the engine, which receives them all at construction: the broker exists before the engine, and
nothing is swapped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from trader.config import Settings
from trader.controls import Controls
from trader.decision.fusion import build_fusion
from trader.decision.risk import RiskEngine, load_rules
from trader.engine import DecisionParts, Engine
from trader.errors import ConfigError
from trader.execution.brokers.paper import PaperBroker
from trader.features.clock import SessionClock
from trader.features.observation import BulkFeatures, load_feature_blocks
from trader.feeds.replay import RecordedBars, ReplayFeed, load_bars
from trader.journal import Journal, reader
from trader.policy import build_policy
from trader.ports import AdviceSource, Broker, FeatureSource, Feed, JournalSink, Policy, RiskRule, RunObserver

log = structlog.get_logger(__name__)


@dataclass
class Run:
    """A built run: the engine and what its owner (CLI, service) needs beside it."""

    engine: Engine
    journal: Journal
    run_id: str
    mode: str
    controls: Controls
    recorded: RecordedBars | None  # None: a live feed
    continues: reader.RunRecord | None = None  # the journaled run this one continues


def decision_parts(settings: Settings, clock: SessionClock) -> DecisionParts:
    """Fusion and risk from config (plug-ins loaded and checked): what a reload swaps."""
    fusion = build_fusion(settings.fusion, settings.fusion.strategy_options)
    rules: list[RiskRule] = load_rules(settings.risk.rules, settings.risk.rule_options, settings)
    return DecisionParts(settings, fusion, RiskEngine(settings, clock, rules))


def build_advisor(
    settings: Settings, journal: JournalSink, run_id: str, clock: SessionClock, timing: str
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


def bulk_features(settings: Settings, recorded: RecordedBars) -> BulkFeatures:
    blocks = load_feature_blocks(settings.features.custom_blocks)
    # the vectorised verdicts: a tenth of a second less per replay than asking the validator bar
    # by bar; were they ever to differ from the engine's, BulkFeatures.update refuses the bar that
    # is out of step (loudly), so no decision is made on another bar's features
    accepted = recorded.accepted()
    cols = {k: getattr(recorded, k)[accepted] for k in ("ts_ns", "open", "high", "low", "close", "volume")}
    return BulkFeatures(settings, cols, blocks)


def _open_journal(
    settings: Settings,
    path: str | Path | None,
    run_id: str,
    resume: bool,
    mode: str,
    layout_hash: str,
    sources: tuple[str, ...],
) -> Journal:
    journal = Journal(
        path or settings.journal.path,
        settings.journal.batch_size,
        settings.journal.flush_interval_ms,
        settings.journal.level,
    )
    try:
        if resume:
            journal.resume_run(run_id)
        else:
            journal.start_run(
                run_id, mode, settings.model_dump_json(), str(settings.policy.path), layout_hash, sources
            )
    except BaseException:
        journal.close()
        raise
    return journal


def _assemble(
    settings: Settings,
    *,
    mode: str,
    feed: Feed,
    broker: Broker,
    policy: Policy,
    features: FeatureSource,
    journal: Journal,
    run_id: str,
    advisor_timing: str,
    journal_bars: bool,
    recorded: RecordedBars | None,
    observers: Sequence[RunObserver] = (),
) -> Run:
    """The engine and its run from built parts; the journal is closed if this fails."""
    clock: SessionClock = features.clock  # type: ignore[attr-defined]
    controls = Controls(settings.risk.kill_switch)
    try:
        parts = decision_parts(settings, clock)
        advisor = build_advisor(settings, journal, run_id, clock, advisor_timing)
    except BaseException:
        journal.close()
        raise
    engine = Engine(
        settings,
        feed=feed,
        broker=broker,
        policy=policy,
        features=features,
        journal=journal,
        run_id=run_id,
        fusion=parts.fusion,
        risk=parts.risk,
        controls=controls,
        advisor=advisor,
        journal_bars=journal_bars,
        adopt_broker_state=settings.tradovate.adopt_broker_state,
        real_broker=broker.name != "paper",
        observers=observers,
    )
    structlog.contextvars.bind_contextvars(run_id=run_id[:8], mode=mode)
    return Run(engine, journal, run_id, mode, controls, recorded)


def build_replay(
    settings: Settings,
    journal_path: str | Path | None = None,
    data_paths: list[Path] | None = None,
    advisor_timing: str = "bar",
    mode: str = "replay",
    run_id: str | None = None,
    resume: bool = False,
    observers: Sequence[RunObserver] = (),
) -> Run:
    """Recorded bars ─▶ bulk features, paper broker, policy, journal (replay, and the service's
    paper trading on recorded bars)."""
    recorded = load_bars(
        settings.data, data_paths, tick_size=settings.instrument.tick_size, symbol=settings.instrument.symbol
    )
    features = bulk_features(settings, recorded)
    policy = build_policy(settings, features.layout)
    run_id = run_id or uuid.uuid4().hex
    journal = _open_journal(
        settings, journal_path, run_id, resume, mode, features.layout.hash, recorded.files
    )
    run = _assemble(
        settings,
        mode=mode,
        feed=ReplayFeed(recorded, settings.data.speed),
        broker=PaperBroker(settings),
        policy=policy,
        features=features,
        journal=journal,
        run_id=run_id,
        advisor_timing=advisor_timing,
        journal_bars=False,
        recorded=recorded,
        observers=observers,
    )
    log.info(
        "replay_ready",
        bars=len(recorded),
        files=list(recorded.files),
        layout_hash=features.layout.hash,
        policy=str(settings.policy.path),
    )
    return run


def build_live(
    settings: Settings,
    journal_path: str | Path,
    mode: str,
    run_id: str | None = None,
    resume: bool = False,
    observers: Sequence[RunObserver] = (),
) -> Run:
    """Tradovate market data ─▶ incremental features, the paper (``paper``) or Tradovate
    (``live``) broker; every bar journaled (the recovery source)."""
    from trader.adapters.tradovate.broker import TradovateBroker
    from trader.adapters.tradovate.feed import TradovateFeed
    from trader.adapters.tradovate.rest import TradovateRest
    from trader.features.observation import IncrementalFeatures

    features = IncrementalFeatures(settings, load_feature_blocks(settings.features.custom_blocks))
    policy = build_policy(settings, features.layout)
    run_id = run_id or uuid.uuid4().hex
    tv = settings.tradovate
    source = f"tradovate:{tv.environment}:{tv.symbol}"
    rest = TradovateRest(tv)
    broker: Broker
    if mode == "live":
        broker = TradovateBroker(
            settings,
            rest,
            run_id[:8],
            known_client_ids=frozenset(reader.client_ids(journal_path, run_id)) if resume else frozenset(),
            fills_after_ns=reader.last_fill_ns(journal_path, run_id) if resume else -1,
        )
    else:
        broker = PaperBroker(settings)
    journal = _open_journal(settings, journal_path, run_id, resume, mode, features.layout.hash, (source,))
    run = _assemble(
        settings,
        mode=mode,
        feed=TradovateFeed(settings, rest),
        broker=broker,
        policy=policy,
        features=features,
        journal=journal,
        run_id=run_id,
        advisor_timing="wall",
        journal_bars=True,
        recorded=None,
        observers=observers,
    )
    log.info("live_ready", source=source, layout_hash=features.layout.hash, broker=broker.name)
    return run


async def open_service_run(
    settings: Settings,
    mode: str,
    journal_path: Path,
    fresh: bool,
    observers: Sequence[RunObserver] = (),
) -> Run:
    """The service's run: the journal's latest run of this mode continues (after a crash, a
    graceful stop, a failed run or a restart: same account, position, stops and operator
    state), re-driven from the journal; a new account only with ``fresh`` or a new journal."""
    from trader.recovery import recover

    if settings.journal.level != "full":
        raise ConfigError(
            f"journal.level = {settings.journal.level!r}: `trader run` journals every decision "
            '(crash recovery re-drives the run from them); set journal.level = "full" (the lower '
            "levels are for replays and sweeps)"
        )
    if (
        mode == "live"
        and settings.execution.stop_mode == "none"
        and not settings.execution.allow_no_stop_live
    ):
        raise ConfigError(
            'execution.stop_mode = "none" in live mode: positions would have no stop at the broker, and '
            "the loss limits act only on bars (a crash, a disconnect or an overnight gap is unbounded); "
            "set execution.allow_no_stop_live = true if that is meant"
        )
    previous = reader.latest_run(journal_path, mode)
    resume = None
    if previous is not None:
        if fresh:
            Journal.mark_abandoned(journal_path, previous.run_id)
            log.warning("previous_run_abandoned", run_id=previous.run_id, status=previous.status)
        else:
            diffs = config_differences(previous.config_json, settings)
            if diffs:
                raise ConfigError(
                    f"journal {journal_path} has a {mode} run {previous.run_id} ({previous.status}) made "
                    f"with a different configuration (differs in: {', '.join(diffs[:10])}); restore that "
                    "configuration to continue its account, or start a new account with --fresh"
                )
            resume = previous
    live_feed = settings.service.feed == "tradovate"
    if not live_feed and mode == "live":
        raise ConfigError("service.feed: live mode needs the live feed (tradovate), not recorded bars")
    run_id = None if resume is None else resume.run_id
    if live_feed:
        run = build_live(settings, journal_path, mode, run_id, resume is not None, observers)
    else:
        run = build_replay(
            settings,
            journal_path,
            mode=mode,
            advisor_timing="wall",
            run_id=run_id,
            resume=resume is not None,
            observers=observers,
        )
    run.continues = resume
    if resume is not None:
        try:
            await recover(run)
        except BaseException:
            await run.engine.feed.close()
            run.journal.close()
            raise
    return run


# Sections that may differ between the run being continued and the restart.
MAY_DIFFER = ("service", "notifications", "logging", "journal", "cpu")


def config_differences(old_json: str, settings: Settings) -> list[str]:
    import json

    old = json.loads(old_json)
    new = json.loads(settings.model_dump_json())
    # a key the old run's version did not have yet, now at its default, is no difference: a new
    # key's default keeps the behaviour the old run had (that is how keys are added)
    defaults = json.loads(Settings.model_construct().model_dump_json())
    out = []
    for section in sorted(set(old) | set(new)):
        if section in MAY_DIFFER or old.get(section) == new.get(section):
            continue
        a, b = old.get(section), new.get(section)
        if a is None and b == defaults.get(section):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            dflt = defaults.get(section) or {}
            out += [
                f"{section}.{k}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and not (k not in a and k in dflt and b.get(k) == dflt[k])
            ]
        else:
            out.append(section)
    return out


def build_training_engine(
    settings: Settings,
    features: FeatureSource,
    journal: JournalSink,
    run_id: str,
    first_index: int,
    feed: Feed,
    policy: Policy,
    rules: list[Any],
) -> Engine:
    """The engine a training environment drives through ``observe``/``decide`` (no advisor)."""
    clock: SessionClock = features.clock  # type: ignore[attr-defined]
    return Engine(
        settings,
        feed=feed,
        broker=PaperBroker(settings),
        policy=policy,
        features=features,
        journal=journal,
        run_id=run_id,
        fusion=build_fusion(settings.fusion, settings.fusion.strategy_options),
        risk=RiskEngine(settings, clock, rules),
        controls=Controls(settings.risk.kill_switch),
        first_index=first_index,
    )
