"""Wiring for `trader run` on the live feed: Tradovate market data into the same engine, with the
paper broker (``--mode paper``) or the Tradovate broker (``--mode live``), and the restart path.

Every bar taken from the feed is journaled (``bars``: warm-up history and decided bars, with the
fill count after each), so a restart re-drives the run exactly from its own journal:

* paper: the journaled bars and fused actions go through a fresh engine with a fresh paper broker,
  which rebuilds the paper account, its working orders and stop (the paper account lives in the
  journal, so a restart continues it);
* live: the same, but fills are the journaled ones (what the broker really executed), handed back
  bar by bar; then the broker reconciles its position and orders against the rebuilt portfolio.

The feed then continues after the last journaled bar: the bars missed while the process was down
arrive as a ``catch_up`` batch (decided on, no entries).
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import structlog

from trader.config import Settings
from trader.decision.risk import RiskEngine, load_rules
from trader.domain import Bar, Fill, OrderIntent, Side
from trader.engine import Engine, NullJournal, ReplayRun, build_advisor
from trader.execution.brokers.paper import PaperBroker
from trader.execution.brokers.tradovate import TradovateBroker
from trader.features.observation import IncrementalFeatures, load_feature_blocks
from trader.feeds.live import TradovateFeed
from trader.journal import Journal
from trader.policy import OnnxPolicy
from trader.service.recovery import Recovered, RecoveryError
from trader.tradovate.rest import TradovateRest

log = structlog.get_logger(__name__)


def build_live(
    settings: Settings, journal_path: str | Path, mode: str, resume_run_id: str | None = None
) -> ReplayRun:
    blocks = load_feature_blocks(settings.features.custom_blocks)
    features = IncrementalFeatures(settings, blocks)
    policy = OnnxPolicy(
        settings.policy.path, features.layout, settings.policy.provider, settings.policy.intra_op_threads
    )
    run_id = resume_run_id or uuid.uuid4().hex
    journal = Journal(journal_path, settings.journal.batch_size, settings.journal.flush_interval_ms)
    tv = settings.tradovate
    source = f"tradovate:{tv.environment}:{tv.symbol}"
    if resume_run_id:
        journal.resume_run(run_id)
    else:
        journal.start_run(
            run_id,
            mode,
            settings.model_dump_json(),
            str(settings.policy.path),
            features.layout.hash,
            (source,),
        )
    rules = load_rules(settings.risk.rules, settings.risk.rule_options, settings)
    try:
        advisor = build_advisor(settings, journal, run_id, features.clock, timing="wall")
    except BaseException:
        journal.close()
        raise
    rest = TradovateRest(tv)
    feed = TradovateFeed(settings, rest)
    engine = Engine(
        settings,
        feed=feed,
        broker=PaperBroker(settings),
        policy=policy,
        features=features,
        journal=journal,
        run_id=run_id,
        risk=RiskEngine(settings, features.clock, rules),
        origin=lambda i: source,
        advisor=advisor,
    )
    if mode == "live":
        known = _known_client_ids(Path(journal_path), run_id)
        broker = TradovateBroker(
            settings,
            rest,
            run_id[:8],
            engine_position=lambda: engine.portfolio.position,
            known_client_ids=lambda: known,
            fills_after_ns=_last_fill_ns(Path(journal_path), run_id),
        )

        def adopt(position: int, avg: float, stop: float | None) -> None:
            engine.portfolio.adopt_position(position, avg, engine._bar.ts_ns)
            engine.portfolio.set_stop(broker.working_stop if position else None)

        broker.on_adopt = adopt
        engine.broker = broker
    engine.journal_bars = True
    structlog.contextvars.bind_contextvars(run_id=run_id[:8], mode=mode)
    log.info("live_ready", source=source, layout_hash=features.layout.hash, broker=engine.broker.name)
    return ReplayRun(engine, journal, None, run_id)


class JournaledFills:
    """Re-drive broker for a live run: hands back the journaled fills, bar by bar."""

    name = "journaled"

    def __init__(self, fills: list[Fill], through: list[int]) -> None:
        self.fills, self.through = fills, through
        self.working_stop: float | None = None
        self._k = 0
        self._given = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def submit(self, intent: OrderIntent) -> None:
        return None

    async def set_stop(self, stop_price: float | None) -> None:
        self.working_stop = stop_price

    def on_bar(self, bar: Bar) -> None:
        return None

    def drain_fills(self) -> list[Fill]:
        upto = self.through[self._k] if self._k < len(self.through) else self._given
        self._k += 1
        out = self.fills[self._given : upto]
        self._given = max(self._given, upto)
        return out


async def recover_live(run: ReplayRun, mode: str) -> Recovered:
    """Rebuild the engine of an unfinished live/paper run from its journal (see the module doc)."""
    eng, journal = run.engine, run.journal
    con = sqlite3.connect(journal.path)
    try:
        bars = con.execute(
            "SELECT kind, bar_index, ts_ns, open, high, low, close, volume, fills_through FROM bars "
            "WHERE run_id=? ORDER BY seq",
            (run.run_id,),
        ).fetchall()
        actions = dict(
            con.execute(
                "SELECT bar_index, fused_action FROM decisions WHERE run_id=?", (run.run_id,)
            ).fetchall()
        )
        last_row = con.execute(
            "SELECT bar_index, position, balance_usd, equity_usd, threshold_usd FROM decisions "
            "WHERE run_id=? ORDER BY bar_index DESC LIMIT 1",
            (run.run_id,),
        ).fetchone()
        fills = [
            Fill(cid, ts, Side(side), qty, price, comm, purpose)
            for cid, ts, side, qty, price, comm, purpose in con.execute(
                "SELECT client_id, ts_ns, side, qty, price, commission_usd, purpose FROM fills "
                "WHERE run_id=? ORDER BY seq",
                (run.run_id,),
            )
        ]
        max_qid = con.execute(
            "SELECT max(query_id) FROM llm_queries WHERE run_id=?", (run.run_id,)
        ).fetchone()[0]
    finally:
        con.close()
    decided = [b for b in bars if b[0] == "bar"]
    if len(decided) != len(actions):
        raise RecoveryError(f"run {run.run_id}: journal has {len(decided)} bars but {len(actions)} decisions")
    saved = eng.journal, eng.advisor, eng.broker
    replay_broker = (
        PaperBroker(run.engine.settings)
        if mode == "paper"
        else JournaledFills(fills, [int(b[8]) for b in decided])
    )
    eng.journal, eng.advisor, eng.broker = NullJournal(), None, replay_broker
    try:
        for kind, _i, ts, o, h, lo, c, v, _through in bars:
            bar = Bar(int(ts), o, h, lo, c, v)
            if kind == "prime":
                eng.prime(bar)
            elif eng.observe(bar):
                a = int(actions[eng._i])
                await eng.decide(a, 1.0, [1.0 if k == a else 0.0 for k in range(6)])
    finally:
        eng.journal, eng.advisor = saved[0], saved[1]
        eng.broker = replay_broker if mode == "paper" else saved[2]
    pf = eng.portfolio
    if last_row is not None:
        _, pos, bal, eq, thr = last_row
        got = (pf.position, pf.balance_usd, pf.balance_usd + pf.unrealized_usd, pf.threshold_usd)
        if got[0] != pos or any(abs(x - y) > 1e-6 for x, y in zip(got[1:], (bal, eq, thr), strict=True)):
            raise RecoveryError(
                f"run {run.run_id}: re-driving {len(decided)} journaled bars gives position {got[0]}, "
                f"balance {got[1]:.2f}, equity {got[2]:.2f}; the journal says {pos}, {bal:.2f}, {eq:.2f}"
            )
    if mode == "live":
        broker = eng.broker
        broker.working_stop = pf.stop_price
    if eng.advisor is not None and max_qid is not None:
        eng.advisor._qid = int(max_qid)  # type: ignore[attr-defined]
    last_ts = int(bars[-1][2]) if bars else None
    feed = eng.feed
    if last_ts is not None and isinstance(feed, TradovateFeed):
        feed.resume_after(last_ts)
    log.warning(
        "recovered",
        run_id=run.run_id,
        bars=len(bars),
        decided=len(decided),
        position=pf.position,
        stop=pf.stop_price,
        balance=round(pf.balance_usd, 2),
    )
    last = -1 if last_row is None else int(last_row[0])
    return Recovered(run.run_id, last, len(bars), pf.position, pf.balance_usd)


def _known_client_ids(path: Path, run_id: str) -> set[str]:
    if not path.exists():
        return set()
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT client_id FROM orders WHERE run_id=?", (run_id,))}
    except sqlite3.OperationalError:
        return set()
    finally:
        con.close()


def _last_fill_ns(path: Path, run_id: str) -> int:
    if not path.exists():
        return -1
    con = sqlite3.connect(path)
    try:
        row = con.execute("SELECT max(ts_ns) FROM fills WHERE run_id=?", (run_id,)).fetchone()
        return -1 if row is None or row[0] is None else int(row[0])
    except sqlite3.OperationalError:
        return -1
    finally:
        con.close()
