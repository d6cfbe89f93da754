"""`trader run`: the engine as a long-running service (systemd ``Type=notify``).

Start: config, model, policy and broker come up, the HTTP server listens, then ``READY=1``.
While running: ``WATCHDOG=1`` only while the bar loop is healthy (see :meth:`Service.unhealthy`),
``STATUS=`` with mode, position and last bar age. Bars stop arriving for
``service.stale_bar_multiple`` bar intervals → entries are halted until bars return.

SIGTERM/SIGINT: stop after the current bar, no new entries, cancel working entry orders, keep or
flatten the position (``service.on_stop``), flush and close the journal, ``STOPPING=1``, exit 0,
all within ``service.stop_timeout_s``. SIGHUP: re-read the config file and apply the values that
are safe to change live (fusion weights and thresholds, risk thresholds, prompts, log channels);
any other difference is logged as needing a restart and left as it was.

The feed is Tradovate's market data (``service.feed = "tradovate"``, wired in
:mod:`trader.service.live`), or recorded bars paced at ``data.speed`` (``"recorded"``: paper
trading on a replayed market). Entries are halted while data is stale, while the operator says so,
and while the live broker reports a reconciliation mismatch; each is logged, in /state and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from trader.config import ConfigError, Settings, load_settings
from trader.decision.fusion import build_fusion
from trader.decision.risk import RiskEngine
from trader.engine import ReplayRun, build_replay
from trader.service.http import ControlServer
from trader.service.notify import LoopWatchdog, Notifier

log = structlog.get_logger(__name__)

# Config values that may change while running (SIGHUP); everything else needs a restart.
RELOADABLE = {
    "fusion": None,  # the whole section
    "prompts": None,
    "logging": ("log_llm_queries", "log_decision_fusion", "log_risk_veto", "log_latency"),
    "risk": (
        "enable_risk_veto",
        "max_consecutive_losses",
        "min_win_rate_threshold",
        "win_rate_min_trades",
        "dd_buffer_threshold",
        "daily_loss_limit_usd",
        "kill_switch",
    ),
}


class Service:
    def __init__(
        self,
        settings: Settings,
        run: ReplayRun,
        mode: str,
        config_path: Path | None,
        overrides: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.run = run
        self.engine = run.engine
        self.journal = run.journal
        self.mode = mode
        self.config_path = config_path
        self.overrides = overrides or {}
        self.notifier = notifier or Notifier()
        self.http = ControlServer(self) if settings.service.http_enabled else None
        self.halted = False
        self.halt_reason = ""
        self.stale = False
        self.ready = False
        self.stopping = False
        self.started_at = time.monotonic()
        self.orders = self.order_rejects = 0
        self.reloads = 0
        self._stop_event = asyncio.Event()
        self.watchdog = LoopWatchdog(self.notifier, self.unhealthy, self.status_line)

    # -- health -------------------------------------------------------------------------------------
    def last_bar_age_s(self) -> float | None:
        last = self.engine.last_bar_at
        return None if not last else time.monotonic() - last

    def unhealthy(self) -> str | None:
        """Why the bar loop is not healthy, or None. Feeds the watchdog and /healthz."""
        cfg = self.settings.service
        busy = self.engine.busy_since
        if busy and time.monotonic() - busy > cfg.stuck_bar_s:
            return f"stuck in one bar for {time.monotonic() - busy:.1f}s"
        self._check_stale()
        return None

    def _check_stale(self) -> None:
        cfg = self.settings.service
        age = self.last_bar_age_s()
        since_start = time.monotonic() - self.started_at
        limit = cfg.stale_bar_multiple * cfg.bar_interval_s
        stale = (age if age is not None else since_start) > limit
        if stale != self.stale:
            self.stale = stale
            if stale:
                log.warning("stale_data_entries_halted", last_bar_age_s=age, limit_s=limit)
            else:
                log.info("data_resumed_entries_allowed")
        self._update_halt()

    def halt_reasons(self) -> list[str]:
        out = []
        if self.halted:
            out.append(self.halt_reason or "operator halt")
        if self.stale:
            out.append("stale data")
        mismatch = getattr(self.engine.broker, "mismatch", None)
        if mismatch:
            out.append(str(mismatch))
        return out

    def _update_halt(self) -> None:
        reasons = self.halt_reasons()
        ctx = self.engine.ctx
        ctx.halted = bool(reasons)
        ctx.halt_reason = "; ".join(reasons)

    def health(self) -> dict[str, Any]:
        reason = self.unhealthy()
        adv = self.engine.advisor
        return {
            "ok": self.ready and reason is None and not self.stopping,
            "ready": self.ready,
            "stopping": self.stopping,
            "problem": reason,
            "last_bar_age_s": self.last_bar_age_s(),
            "stale_data": self.stale,
            "halted": self.halted,
            "halt_reasons": self.halt_reasons(),
            "feed": self._feed_health(),
            "broker": {
                "name": self.engine.broker.name,
                "connected": bool(getattr(self.engine.broker, "connected", self.ready and not self.stopping)),
                "mismatch": getattr(self.engine.broker, "mismatch", None),
            },
            "llm": None if adv is None else self._llm_health(adv),
        }

    def _feed_health(self) -> dict[str, Any]:
        f: Any = self.engine.feed
        if not hasattr(f, "reconnects"):
            return {"kind": "recorded", "connected": self.ready and not self.stopping}
        return {
            "kind": "tradovate",
            "connected": f.connected,
            "reconnects": f.reconnects,
            "duplicates": f.duplicates,
            "out_of_order": f.out_of_order,
            "malformed": f.malformed + f.bad_bars,
        }

    def _llm_health(self, adv: Any) -> dict[str, Any]:
        a = adv.stats
        return {
            "mode": self.settings.advisor.mode,
            "queries": a.queries,
            "errors": a.errors,
            "timeouts": a.timeouts,
        }

    def state(self) -> dict[str, Any]:
        pf = self.engine.portfolio
        return {
            "mode": self.mode,
            "run_id": self.run.run_id,
            "bars": self.engine.stats.bars,
            "position": pf.position,
            "avg_entry": pf.avg_entry if pf.position else None,
            "stop_price": pf.stop_price,
            "trailing": pf.trailing,
            "balance_usd": round(pf.balance_usd, 2),
            "equity_usd": round(pf.balance_usd + pf.unrealized_usd, 2),
            "drawdown_threshold_usd": round(pf.threshold_usd, 2),
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "entries_halted_by": self.halt_reasons(),
            "stale_data": self.stale,
            "last_bar_age_s": self.last_bar_age_s(),
            "reloads": self.reloads,
        }

    def status_line(self) -> str:
        age = self.last_bar_age_s()
        pos = self.engine.portfolio.position
        halt = " halted" if self.halt_reasons() else ""
        return f"{self.mode}: position {pos:+d}, last bar {'-' if age is None else f'{age:.0f}s'} ago{halt}"

    # -- control ------------------------------------------------------------------------------------
    def journal_control(self, action: str, source: str, result: str, reason: str = "") -> None:
        at = datetime.now(UTC).isoformat()
        self.journal.record("control", (self.run.run_id, at, action, source, reason, result))
        self.journal.commit_point()  # between bars: the journal is consistent here

    def control(self, action: str, source: str, reason: str = "") -> dict[str, Any]:
        ctx = self.engine.ctx
        if action == "halt":
            self.halted, self.halt_reason = True, reason or "operator halt"
        elif action == "resume":
            self.halted, self.halt_reason = False, ""
        elif action == "flatten":
            self.halted, self.halt_reason = True, reason or "operator flatten"
            ctx.flatten = "operator_flatten"
        self._update_halt()
        self.journal_control(action, source, "accepted", reason)
        log.warning("control", action=action, source=source, reason=reason)
        return {"halted": self.halted, "position": self.engine.portfolio.position}

    def reload(self) -> dict[str, Any]:
        """SIGHUP: apply safe changes from the config file; report the rest."""
        try:
            new = load_settings(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload_rejected", error=str(exc))
            self.journal_control("reload", "SIGHUP", "rejected: invalid config", str(exc)[:200])
            return {"applied": {}, "restart_required": [], "error": str(exc)}
        old = self.settings
        applied: dict[str, Any] = {}
        restart: list[str] = []
        old_d, new_d = old.model_dump(mode="json"), new.model_dump(mode="json")
        for section, values in new_d.items():
            if values == old_d.get(section):
                continue
            keys = RELOADABLE.get(section, ())
            if isinstance(values, dict):
                for k, v in values.items():
                    if v == old_d[section].get(k):
                        continue
                    if keys is None or (keys and k in keys):
                        applied[f"{section}.{k}"] = v
                    else:
                        restart.append(f"{section}.{k}")
            else:
                restart.append(section)
        if applied:
            self._apply(new, applied)
        self.reloads += 1
        log.info("config_reloaded", applied=applied, restart_required=restart)
        self.journal_control("reload", "SIGHUP", f"applied {sorted(applied)}; restart needed for {restart}")
        return {"applied": applied, "restart_required": restart}

    def _apply(self, new: Settings, applied: dict[str, Any]) -> None:
        merged = self.settings.model_copy(
            update={
                "fusion": new.fusion,
                "prompts": new.prompts,
                "logging": self.settings.logging.model_copy(
                    update={k: getattr(new.logging, k) for k in RELOADABLE["logging"] or ()}
                ),
                "risk": self.settings.risk.model_copy(
                    update={k: getattr(new.risk, k) for k in RELOADABLE["risk"] or ()}
                ),
            }
        )
        self.settings = merged
        eng = self.engine
        eng.settings = merged
        if any(k.startswith("fusion.") for k in applied):
            eng.fusion = build_fusion(merged.fusion, merged.fusion.strategy_options)
        eng.risk = RiskEngine(merged, eng.clock, eng.risk.extra_rules)  # stateless: rebuilt whole
        if eng.advisor is not None:
            eng.advisor.settings = merged  # type: ignore[attr-defined]

    # -- lifecycle ----------------------------------------------------------------------------------
    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("stop_requested", signal=why)
            self.stopping = True
            self.notifier.stopping(f"stopping ({why})")
            self.engine.request_stop()
            self._stop_event.set()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        eng = self.engine
        orig_submit = eng.broker.submit

        async def counted_submit(intent: Any) -> None:
            if self.stopping and not intent.purpose.startswith(("exit", "flatten")):
                log.info("entry_cancelled_stopping", client_id=intent.client_id)
                return
            self.orders += 1
            await orig_submit(intent)

        eng.broker.submit = counted_submit  # type: ignore[method-assign]
        status = "failed"
        watchdog = monitor = None
        try:
            if self.http is not None:
                await self.http.start()
            self.ready = True
            self.notifier.ready(self.status_line())
            log.info("ready", mode=self.mode, run_id=self.run.run_id)
            watchdog = asyncio.create_task(self.watchdog.run())
            monitor = asyncio.create_task(self._monitor())
            task = asyncio.create_task(eng.run())
            stop = asyncio.create_task(self._stop_event.wait())
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                # the engine stops after the current bar; a paced feed may be waiting for the next
                # bar, so give it a moment and then interrupt the wait
                done, _ = await asyncio.wait({task}, timeout=self.settings.service.stop_timeout_s / 4)
                if not done:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            stop.cancel()
            if not task.cancelled():
                stats = task.result()
                status = "stopped" if self.stopping else stats.status
            else:
                status = "stopped"
        finally:
            for t in (watchdog, monitor):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            await self._shutdown(status)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    async def _monitor(self) -> None:
        """Stale data and broker mismatches become entry halts within a second, watchdog or not."""
        last: list[str] = []
        while True:
            await asyncio.sleep(0.5)
            self._check_stale()
            now = self.halt_reasons()
            if now != last:
                log.warning("entries_halted", reasons=now) if now else log.info("entries_allowed")
                last = now

    async def _shutdown(self, status: str) -> None:
        self.stopping = True
        eng = self.engine
        pf = eng.portfolio
        broker = eng.broker
        late = broker.drain_fills()  # fills that arrived after the last bar: journal them too
        if late:
            eng._apply_fills(late)
        # working entry orders are cancelled; exits stay
        pending = getattr(broker, "pending", None)
        if pending:
            kept = [o for o in pending if o.purpose.startswith(("exit", "flatten"))]
            for o in pending:
                if o not in kept:
                    log.info("entry_cancelled", client_id=o.client_id)
            pending[:] = kept
        if self.settings.service.on_stop == "flatten" and pf.position != 0:
            await self._flatten_now()
        elif pf.position != 0:
            log.warning("stopping_with_open_position", position=pf.position, stop=pf.stop_price)
        if self.http is not None:
            await self.http.stop()
        rest = getattr(eng.feed, "rest", None)
        if rest is not None:
            await rest.close()
        from trader.report import build_report

        report = build_report(eng.stats, pf.trades, self.settings.account.starting_balance_usd, eng.clock)
        self.journal.finish_run(self.run.run_id, status, eng.stats.bars, report["bars_rejected"], report)
        self.journal.close()
        self.notifier.close()
        log.info("stopped", status=status, position=pf.position)

    async def _flatten_now(self) -> None:
        """on_stop = flatten: close at the last price now (the paper broker's market fill)."""
        eng = self.engine
        pf = eng.portfolio
        bar = eng._bar
        from trader.domain import OrderIntent, OrderKind, Side

        side = Side.SELL if pf.position > 0 else Side.BUY
        intent = OrderIntent(
            f"{self.run.run_id}-{eng.bar_index}-stop",
            side,
            abs(pf.position),
            OrderKind.MARKET,
            "flatten:on_stop",
        )
        row = (self.run.run_id, intent.client_id, eng._i, bar.ts_ns, int(side), intent.qty, "market")
        eng.journal.record("orders", (*row, intent.purpose, 0))
        flatten_at = getattr(eng.broker, "flatten_at", None)
        if flatten_at is not None:
            flatten_at(intent, bar)
            eng._apply_fills(eng.broker.drain_fills())
        else:
            await eng.broker.submit(intent)
        log.warning("flattened_on_stop", position=pf.position)


async def run_service(
    settings: Settings,
    config_path: Path | None,
    overrides: dict[str, Any],
    mode: str,
    journal: str | None,
    fresh: bool = False,
) -> int:
    """Start, or continue the unfinished run of this mode in the journal (crash recovery)."""
    from trader.journal import Journal
    from trader.service.recovery import config_differences, recover

    jpath = Path(journal or settings.journal.path)
    unfinished = Journal.unfinished_run(jpath, mode)
    resume = None
    if unfinished is not None:
        run_id, old_config = unfinished
        if fresh:
            _abandon(jpath, run_id)
            log.warning("unfinished_run_abandoned", run_id=run_id)
        else:
            diffs = config_differences(old_config, settings)
            if diffs:
                raise ConfigError(
                    f"journal {jpath} has an unfinished {mode} run {run_id} made with a different "
                    f"configuration (differs in: {', '.join(diffs[:10])}); restore that configuration "
                    "to continue it, or start a new run with --fresh"
                )
            resume = run_id
    live_feed = settings.service.feed == "tradovate"
    if live_feed:
        from trader.service.live import build_live, recover_live

        run = build_live(settings, jpath, mode, resume)
        try:
            await run.engine.feed.rest.start()  # type: ignore[attr-defined]  # bad credentials: fail now
        except BaseException:
            await run.engine.feed.rest.close()  # type: ignore[attr-defined]
            run.journal.close()
            raise
    else:
        if mode == "live":
            raise ConfigError("service.feed: live mode needs the live feed (tradovate), not recorded bars")
        run = build_replay(settings, jpath, mode=mode, advisor_timing="wall", resume_run_id=resume)
    if resume is not None:
        try:
            rec = await (recover_live(run, mode) if live_feed else recover(run))
        except BaseException:
            run.journal.close()
            raise
    svc = Service(settings, run, mode, config_path, overrides)
    if resume is not None:
        svc.journal_control("recover", "restart", "accepted", f"continued after bar {rec.last_bar}")
        svc.journal.commit_point()
    try:
        return await svc.main()
    except BaseException:
        svc.notifier.stopping("failed")
        raise


def _abandon(path: Path, run_id: str) -> None:
    import sqlite3

    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE runs SET status='abandoned' WHERE run_id=?", (run_id,))
    con.close()
