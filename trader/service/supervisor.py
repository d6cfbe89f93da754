"""`trader run`: the engine as a long-running service (systemd ``Type=notify``).

Start: the journal's run of this mode continues (re-driven from the journal, see
:mod:`trader.recovery`) or a new one starts; config, model, policy and broker come up, the HTTP
server listens, then ``READY=1``. While running: ``WATCHDOG=1`` only while the service is healthy
(:meth:`Operator.unhealthy`: bar loop not stuck, journal writable, data not stale, broker not down
beyond its limit), ``STATUS=`` with mode, position and last bar age. Losing the journal (the
recovery source) halts entries and stops the service with exit status 2 and the reason.

SIGTERM/SIGINT: stop after the current bar, no new entries, cancel working entry orders, keep or
flatten the position (``service.on_stop``), flush and close the journal, ``STOPPING=1``, exit 0,
all within ``service.stop_timeout_s``. SIGHUP: an atomic reload (:meth:`Operator.reload`).

Every long-lived task (engine, watchdog, monitor) is owned here and cancelled and awaited on the
way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from trader.config import Settings
from trader.errors import JournalError
from trader.llm.isolation import pin_bar_loop
from trader.ports import RunObserver
from trader.service.alerts import RunAlerts, build_alerts, describe_error
from trader.service.dashboard import DashboardHub
from trader.service.http import ControlServer
from trader.service.notify import LoopWatchdog, Notifier
from trader.service.operator import Operator
from trader.wiring import Run, open_service_run

log = structlog.get_logger(__name__)

EXIT_JOURNAL_LOST = 2


class Service:
    def __init__(
        self,
        settings: Settings,
        run: Run,
        config_path: Path | None,
        overrides: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
        dashboard: DashboardHub | None = None,
        alerts: RunAlerts | None = None,
    ) -> None:
        self.settings = settings
        self.run = run
        self.engine = run.engine
        self.alerts = alerts  # phone/chat notifications (owned by run_service, which closes them)
        self.operator = Operator(settings, run, config_path, overrides)
        self.notifier = notifier or Notifier()
        self.http = (
            ControlServer(self.operator, lambda: self.stopping, dashboard, alerts.stats if alerts else None)
            if settings.service.http_enabled
            else None
        )
        self.stopping = False
        self.exit_code = 0
        self._engine_failed = False
        self._stop_event = asyncio.Event()
        self.watchdog = LoopWatchdog(self.notifier, self.operator.unhealthy, self.operator.status_line)

    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("stop_requested", signal=why)
            self.stopping = True
            self.run.controls.stopping = True
            self.notifier.stopping(f"stopping ({why})")
            self.engine.request_stop()
            self._stop_event.set()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, self.operator.reload)
        status = "failed"
        self._engine_failed = False
        tasks: list[asyncio.Task[Any]] = []
        try:
            if self.http is not None:
                await self.http.start()
            self.operator.ready = True
            self.notifier.ready(self.operator.status_line())
            log.info("ready", mode=self.run.mode, run_id=self.run.run_id)
            tasks = [
                asyncio.create_task(self.watchdog.run(), name="watchdog"),
                asyncio.create_task(self._monitor(), name="monitor"),
            ]
            engine = asyncio.create_task(self.engine.run(), name="engine")
            stop = asyncio.create_task(self._stop_event.wait(), name="stop")
            tasks += [engine, stop]
            await asyncio.wait({engine, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not engine.done():
                # the engine stops after the current bar; a paced feed may be waiting for the next
                # bar, so give it a moment and then interrupt the wait
                done, _ = await asyncio.wait({engine}, timeout=self.settings.service.stop_timeout_s / 4)
                if not done and self.engine.busy_since:  # inside a bar (a slow broker): let it finish
                    done, _ = await asyncio.wait({engine}, timeout=self.settings.service.stop_timeout_s / 4)
                if not done:
                    mid_bar = bool(self.engine.busy_since)
                    engine.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await engine
                    if mid_bar:  # a half-done bar: end as a failed run, the journal at the last bar
                        log.error("stop_interrupted_a_bar")
                        if self.alerts is not None:
                            self.alerts.error("a stop interrupted a bar: the run ends failed at its last bar")
                        self._engine_failed = True
            if engine.cancelled():
                status = "failed" if self._engine_failed else "stopped"
            else:
                self._engine_failed = engine.exception() is not None
                stats = engine.result()  # a failed engine raises here
                status = "stopped" if self.stopping else stats.status
            if self.exit_code:
                status = "failed"
        finally:
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self._shutdown(status)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return self.exit_code

    async def _monitor(self) -> None:
        """Stale data and a lost journal are noticed within a second, watchdog or not."""
        last: list[str] = []
        while True:
            await asyncio.sleep(0.5)
            problem = self.operator.journal_problem()
            if problem is not None and not self.run.controls.journal_problem:
                self.run.controls.journal_lost(problem)
                self.engine.watch_controls()  # observers (notifications) hear of it now
                log.error("journal_lost_stopping", problem=problem)
                print(f"trader: stopping: {problem}; the journal is the recovery source", file=sys.stderr)
                self.exit_code = EXIT_JOURNAL_LOST
                self.request_stop("journal lost")
            self.operator.check_stale()
            now = self.run.controls.halt_reasons()
            if now != last:
                log.warning("entries_halted", reasons=now) if now else log.info("entries_allowed")
                last = now

    async def _shutdown(self, status: str) -> None:
        """Whatever went wrong before, the journal is finished and closed here."""
        self.stopping = True
        self.run.controls.stopping = True
        eng = self.engine
        journal = self.run.journal
        try:
            if self._engine_failed:
                await eng.abort()
            else:
                eng.journal_control("stop", "service", "accepted", status)
                await eng.close(flatten=self.settings.service.on_stop == "flatten")
                if self.alerts is not None:
                    self.alerts.service_stopping()
                    eng.end_of_run()  # the summary of the session the stop cut short
        except Exception as exc:  # a broker or journal failure must not skip finishing the journal
            status = "failed"
            log.error("shutdown_step_failed", error=repr(exc))
            if self.alerts is not None:
                self.alerts.error(f"stopping failed: {describe_error(exc, 200)}")
        finally:
            if self.http is not None:
                await self.http.stop()
            with contextlib.suppress(Exception):
                await eng.feed.close()
        from trader.report import build_report

        report = build_report(
            eng.stats, eng.portfolio.trades, self.settings.account.starting_balance_usd, eng.clock
        )
        try:
            journal.finish_run(self.run.run_id, status, eng.stats.bars, report["bars_rejected"], report)
            journal.close()
        except JournalError as exc:
            log.error("journal_finish_failed", error=str(exc))
        self.notifier.close()
        log.info("stopped", status=status, position=eng.portfolio.position)


async def run_service(
    settings: Settings,
    config_path: Path | None,
    overrides: dict[str, Any],
    mode: str,
    journal: str | None,
    fresh: bool = False,
) -> int:
    """Continue the journal's run of this mode (any end: crash, stop, failure) or start one."""
    jpath = Path(journal or settings.journal.path)
    # the live dashboard watches the run from its first bar (served at GET / when HTTP is on)
    dashboard = DashboardHub() if settings.service.http_enabled else None
    observers: list[RunObserver] = [dashboard] if dashboard is not None else []
    # phone/chat notifications (None unless notifications.urls_env holds URLs); another observer
    # that fails is announced as an error
    alerts = build_alerts(settings, mode)
    if alerts is not None:
        observers = [alerts, *(alerts.guard(o) for o in observers)]
        alerts.start()
    try:
        run = await open_service_run(settings, mode, jpath, fresh, observers=observers)
        if alerts is not None:
            alerts.attach(run)
        try:
            await run.engine.feed.open()  # bad credentials fail here, before READY
        except BaseException:
            await run.engine.feed.close()
            run.journal.close()
            raise
        if settings.cpu.bar_loop_cores != "auto":
            # pinned only when configured: with "auto" the service's threads stay where the OS puts
            # them (a local LLM still keeps off the core the service started on); a live test whose
            # local server stalled did not stop within 60 s with every thread on one core
            # the run is built: its threads keep their core(s) from here on, its journal's writer
            # process the others
            pin_bar_loop(settings.cpu, beside=(run.journal.writer_pid,))
        svc = Service(settings, run, config_path, overrides, dashboard=dashboard, alerts=alerts)
        try:
            return await svc.main()
        except BaseException:
            svc.notifier.stopping("failed")
            raise
    except Exception as exc:
        if alerts is not None:
            alerts.error(f"the service failed: {describe_error(exc)}")
        raise
    finally:
        if alerts is not None:
            alerts.close()  # what is queued goes out, within notifications.flush_timeout_s
