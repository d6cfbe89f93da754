"""Notifications to a phone or a chat: fills, stop moves, halts and resumes, a reconcile mismatch,
a stale feed, the LLM down, errors and a summary at each session's end, sent through apprise
(Telegram, Discord, Slack, e-mail, ntfy, webhooks: one URL each). Not to be confused with
:mod:`trader.service.notify`, the systemd ``sd_notify`` client.

Two halves, so the bar loop never waits on the network:

- :class:`RunAlerts` is a run observer. On the bar loop it turns an event into one short message
  (:class:`Alert`) and offers it to the sender: a string format and an append under a lock.
- :class:`AlertSender` rate-limits per kind (a token bucket; what it holds back becomes one
  "N more ... suppressed" message), keeps a bounded queue (full: the oldest is dropped), and owns
  the thread that sends with apprise's blocking ``notify``, one URL at a time. At stop it sends
  what is queued for at most ``notifications.flush_timeout_s`` and drops the rest.

Failures, drops and suppressed messages are counted (``trader_notifications_*`` on /metrics, see
:class:`NotificationCollector`) and logged by service name, never with the URL; none of them stops
the service. The URLs come from the environment variable named by ``notifications.urls_env``: they
are secrets, parsed here and handed to apprise, never logged, journaled or shown in /state, and
apprise's own log (which can print a URL) is kept out of the process's output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from trader.config import NotificationsConfig, Settings
from trader.domain import (
    BarDecided,
    FillApplied,
    HaltChanged,
    RunEvent,
    SessionEnded,
    Side,
    StopMoved,
)
from trader.errors import BrokerError, ConfigError, TraderError
from trader.ports import RunObserver

if TYPE_CHECKING:
    import apprise

    from trader.controls import Controls
    from trader.engine import Engine
    from trader.wiring import Run

log = structlog.get_logger(__name__)

POLL_S = 0.5  # how often the sender looks for suppressed counts it may report
STOPPING = "stopping"  # a halt reason every stop adds: not worth a message of its own

# Titles: "<symbol> <mode> · <this>"
TITLES = {
    "fill": "fill",
    "stop_moved": "stop moved",
    "halt": "halted",
    "resume": "resumed",
    "reconcile_mismatch": "reconcile mismatch",
    "stale_feed": "stale feed",
    "llm_down": "LLM advice",
    "error": "error",
    "daily_summary": "session summary",
}

# apprise's notification types (plain strings, the same in every apprise version)
INFO, SUCCESS, WARNING, FAILURE = "info", "success", "warning", "failure"


@dataclass(frozen=True, slots=True)
class Alert:
    """One message: its kind (a ``notifications.kinds`` name), title, text and apprise type."""

    kind: str
    title: str
    body: str
    level: str = INFO


@dataclass(slots=True)
class NotificationStats:
    """Counters behind ``trader_notifications_*``; written by the sender and the bar loop, read
    at scrape time."""

    sent: dict[str, int] = field(default_factory=dict)  # kind -> deliveries (message x URL)
    failed: dict[str, int] = field(default_factory=dict)  # kind -> failed deliveries
    suppressed: dict[str, int] = field(default_factory=dict)  # kind -> held back by the rate limit
    dropped: dict[str, int] = field(default_factory=dict)  # reason (queue_full, shutdown) -> messages
    queued: int = 0


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """An error as a message to a chat service: our own errors' text (it names a config key, a file,
    a component), but only the type of a broker's or a library's error, whose text may quote a
    server's response (account details) or a URL; the service log has the rest."""
    if isinstance(exc, TraderError) and not isinstance(exc, BrokerError):
        return f"{type(exc).__name__}: {str(exc)[:limit]}"
    return f"{type(exc).__name__} (details in the service log)"


def _bump(d: dict[str, int], key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


class NotificationCollector(Collector):
    """The notification counters on a Prometheus registry (the service's /metrics). With no
    notifier the families are still served, at zero, so alerts on them watch a real series."""

    def __init__(self, stats: NotificationStats | None = None) -> None:
        self.stats = stats or NotificationStats()

    def collect(self) -> Iterator[Any]:
        st = self.stats

        def labelled(name: str, doc: str, label: str, items: dict[str, int]) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=[label])
            for k, v in sorted(dict(items).items()):
                c.add_metric([k], v)
            return c

        yield labelled(
            "trader_notifications_sent", "Notifications delivered (one per message and URL)", "kind", st.sent
        )
        yield labelled(
            "trader_notifications_failed",
            "Notifications not delivered: the service refused them or could not be reached",
            "kind",
            st.failed,
        )
        yield labelled(
            "trader_notifications_dropped",
            "Notifications never sent: the queue was full (oldest dropped) or the stop's flush ran out",
            "reason",
            st.dropped,
        )
        yield labelled(
            "trader_notifications_suppressed",
            "Notifications held back by the per-kind rate limit (reported as one count)",
            "kind",
            st.suppressed,
        )
        yield GaugeMetricFamily(
            "trader_notifications_queued", "Notifications waiting to be sent", value=st.queued
        )


class RateLimit:
    """Per-kind token buckets: up to ``burst`` messages at once, refilled at ``per_minute``. What
    a bucket holds back is counted per kind until it is reported (:meth:`fold`, :meth:`due`,
    :meth:`drain`). Not thread-safe: the sender calls it under its lock."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # kind -> (tokens, at)
        self.held: dict[str, int] = {}

    def _refill(self, kind: str) -> float:
        now = self.clock()
        tokens, at = self._tokens.get(kind, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_s)
        self._tokens[kind] = (tokens, now)
        return tokens

    def _spend(self, kind: str) -> bool:
        tokens = self._refill(kind)
        if tokens < 1.0:
            return False
        self._tokens[kind] = (tokens - 1.0, self._tokens[kind][1])
        return True

    def take(self, kind: str) -> bool:
        """A message of this kind may go now; otherwise it is counted as held back."""
        if self._spend(kind):
            return True
        self.held[kind] = self.held.get(kind, 0) + 1
        return False

    def fold(self, kind: str) -> int:
        """The held-back count of a kind whose next message is going anyway (it says so)."""
        return self.held.pop(kind, 0)

    def due(self) -> list[tuple[str, int]]:
        """Held-back counts whose bucket has a token again: each spends one, as its own message."""
        out = []
        for kind in list(self.held):
            if self._spend(kind):
                out.append((kind, self.held.pop(kind)))
        return out

    def drain(self) -> list[tuple[str, int]]:
        """Every held-back count, tokens or not (the stop's flush)."""
        out, self.held = list(self.held.items()), {}
        return out


Target = tuple[str, "apprise.Apprise"]  # (service label such as "Telegram #1", one URL)

# several URLs: separated by whitespace, or by a comma that starts the next URL (a comma inside a
# URL, e.g. a list of e-mail recipients, stays)
_URL_SPLIT = re.compile(r"\s+|,\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,19}")


def notification_targets(cfg: NotificationsConfig, environ: Mapping[str, str] | None = None) -> list[Target]:
    """The apprise URLs in the environment variable ``cfg.urls_env``, one apprise object each
    (so a failure is counted per service). Empty when the variable is unset or blank. A URL apprise
    cannot use is a ConfigError naming its position and scheme, never its text."""
    raw = (os.environ if environ is None else environ).get(cfg.urls_env, "").strip()
    if not raw:
        return []
    import apprise  # only where notifications are configured

    # apprise logs through the standard library, where a warning can carry a URL (a bot token in
    # its path): nothing of it reaches the process's output; failures are logged here, by name
    logging.getLogger("apprise").propagate = False
    urls = [u for u in _URL_SPLIT.split(raw) if u]
    out: list[Target] = []
    for n, url in enumerate(urls, 1):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        ap = apprise.Apprise()
        if not scheme or not ap.add(url) or len(ap) == 0:
            named = f"scheme {scheme!r}" if _SCHEME.fullmatch(scheme) else "no scheme"
            raise ConfigError(
                f"{cfg.urls_env}: URL {n} of {len(urls)} ({named}) is not a URL apprise can send to "
                "(e.g. tgram://BOT_TOKEN/CHAT_ID, discord://WEBHOOK_ID/WEBHOOK_TOKEN, "
                "ntfy://ntfy.sh/TOPIC, json://host:port/path; see the apprise wiki); the URLs are not "
                "repeated here: they are secrets"
            )
        out.append((f"{ap[0].service_name} #{n}", ap))
    return out


class AlertSender:
    """The rate limit, the bounded queue and the thread that sends (see the module docstring).
    :meth:`offer` is called on the bar loop and never blocks on the network; :meth:`close` returns
    within ``flush_timeout_s`` (plus a moment), whatever the services do."""

    def __init__(
        self,
        targets: Sequence[Target],
        cfg: NotificationsConfig,
        symbol: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = list(targets)
        self.symbol = symbol
        self.per_minute, self.burst = cfg.per_minute, cfg.burst
        self.limit = RateLimit(cfg.per_minute, cfg.burst, clock)
        self.queue_size = cfg.queue_size
        self.flush_timeout_s = cfg.flush_timeout_s
        self.stats = NotificationStats()
        self._queue: deque[Alert] = deque()
        self._cv = threading.Condition()
        self._titles: dict[str, str] = {}
        self._dropped_unreported = 0
        self._closing = False
        self._abandoned = False  # the stop's flush gave up: the thread ends after its current send
        self._thread: threading.Thread | None = None

    @property
    def services(self) -> list[str]:
        return [label for label, _ in self.targets]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
            self._thread.start()

    def offer(self, alert: Alert) -> bool:
        """Queue ``alert`` unless its kind's rate limit holds it back (counted). True if queued."""
        with self._cv:
            if self._closing:
                _bump(self.stats.dropped, "shutdown")
                return False
            if not self.limit.take(alert.kind):
                _bump(self.stats.suppressed, alert.kind)
                return False
            held = self.limit.fold(alert.kind)
            if held:
                alert = dataclasses.replace(alert, body=f"{alert.body} ({self._more(alert.kind, held)})")
            self._titles[alert.kind] = alert.title
            self._put(alert)
            self._cv.notify()
        return True

    def close(self) -> None:
        """Report what the rate limit held back, send what is queued for at most
        ``flush_timeout_s``, then give up: what is left is dropped and counted."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            for kind, n in self.limit.drain():
                self._put(self._suppressed(kind, n))
            self._cv.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(self.flush_timeout_s)
        if thread is None or thread.is_alive():
            with self._cv:
                left = len(self._queue)
                self._queue.clear()
                self.stats.queued = 0
                self._abandoned = True
            if left:
                _bump(self.stats.dropped, "shutdown", left)
            if thread is not None:
                log.warning("notifications_flush_gave_up", dropped=left, timeout_s=self.flush_timeout_s)

    # -- inside the lock ---------------------------------------------------------------------------
    def _put(self, alert: Alert) -> None:
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()  # the oldest goes: the newest says most about now
            _bump(self.stats.dropped, "queue_full")
            self._dropped_unreported += 1
        self._queue.append(alert)
        self.stats.queued = len(self._queue)

    def _more(self, kind: str, n: int) -> str:
        what = kind.replace("_", " ")
        return f"+{n} more {what} notification{'s' if n != 1 else ''} suppressed"

    def _suppressed(self, kind: str, n: int) -> Alert:
        title = self._titles.get(kind, self.symbol)
        body = (
            f"{self.symbol}: {n} more {kind.replace('_', ' ')} notification{'s' if n != 1 else ''} "
            f"suppressed (rate limit: {self.burst} at once, {self.per_minute:g} a minute)"
        )
        return Alert(kind, title, body, INFO)

    def _next(self) -> Alert | None:
        with self._cv:
            if not self._queue and not self._closing:
                self._cv.wait(POLL_S)
            if not self._closing:
                for kind, n in self.limit.due():
                    self._put(self._suppressed(kind, n))
            if not self._queue:
                return None
            alert = self._queue.popleft()
            self.stats.queued = len(self._queue)
            if self._dropped_unreported:
                n, self._dropped_unreported = self._dropped_unreported, 0
                dropped = f"{n} earlier notification{'s' if n != 1 else ''} dropped: queue full"
                alert = dataclasses.replace(alert, body=f"{alert.body} ({dropped})")
            return alert

    # -- the sender thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            alert = self._next()
            if alert is None:
                if self._closing:
                    return
                continue
            self._deliver(alert)
            if self._abandoned:
                return

    def _deliver(self, alert: Alert) -> None:
        for label, ap in self.targets:
            try:
                ok = bool(
                    ap.notify(body=alert.body, title=alert.title, notify_type=alert.level, body_format="text")
                )
                why = "" if ok else "not accepted (see the service's status)"
            except Exception as exc:  # an apprise or plug-in bug: counted, never fatal
                ok, why = False, type(exc).__name__  # not str(exc): it may quote the URL
            if ok:
                _bump(self.stats.sent, alert.kind)
            else:
                _bump(self.stats.failed, alert.kind)
                log.warning("notification_failed", kind=alert.kind, service=label, why=why)


class GuardedObserver:
    """Another run observer, whose failure (the engine then drops it) is also sent as an error."""

    __slots__ = ("alerts", "inner")

    def __init__(self, inner: RunObserver, alerts: RunAlerts) -> None:
        self.inner, self.alerts = inner, alerts

    def on_event(self, event: RunEvent) -> None:
        try:
            self.inner.on_event(event)
        except Exception as exc:
            self.alerts.error(
                f"run observer {type(self.inner).__name__} failed and was dropped "
                f"({describe_error(exc, 160)}); trading goes on"
            )
            raise

    def __repr__(self) -> str:
        return f"GuardedObserver({self.inner!r})"


class _LLMHealth:
    """Down after ``down_after`` failed queries (errors, timeouts) with no answer between them;
    back at the next answer (parsed or not: the backend replied)."""

    def __init__(self, down_after: int) -> None:
        self.down_after = down_after
        self.down = False
        self.errors = self.timeouts = 0  # in the current streak of failures
        self.last_streak = 0  # failures before the answer that ended the streak
        self._seen: tuple[int, int, int] | None = None

    def update(self, errors: int, timeouts: int, answers: int) -> str | None:
        if self._seen is None:
            self._seen = (errors, timeouts, answers)
            return None
        e0, t0, a0 = self._seen
        self._seen = (errors, timeouts, answers)
        if answers > a0:
            self.last_streak = self.errors + self.timeouts
            self.errors = self.timeouts = 0
            if self.down:
                self.down = False
                return "back"
            return None
        self.errors += errors - e0
        self.timeouts += timeouts - t0
        if not self.down and self.errors + self.timeouts >= self.down_after:
            self.down = True
            return "down"
        return None


class RunAlerts:
    """Run events as notifications (a :class:`~trader.ports.RunObserver`): on the bar loop it
    formats the event's message (a halt change: one per cause) and offers it to the
    :class:`AlertSender`; kinds not in ``notifications.kinds`` are not even formatted. It never
    raises into the engine."""

    def __init__(self, settings: Settings, mode: str, sender: AlertSender) -> None:
        cfg = settings.notifications
        self.kinds = frozenset(cfg.kinds)
        self.symbol = settings.instrument.symbol
        self.mode = mode
        self.sender = sender
        self.stats = sender.stats
        self._tz = ZoneInfo(settings.instrument.timezone)
        self._decimals = _decimals(settings.instrument.tick_size)
        self._stale_limit_s = settings.service.stale_bar_multiple * settings.service.bar_interval_s
        self._llm = _LLMHealth(cfg.llm_down_after)
        self._controls: Controls | None = None
        self._engine: Engine | None = None
        self._reasons: tuple[str, ...] = ()
        self._reason_kind: dict[str, str] = {}
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def attach(self, run: Run) -> None:
        """The run these messages describe: its controls name a halt's cause, its advisor's
        counters tell the LLM's health, its last bar time a stale feed's age. (Observers are given
        to the run when it is built, so this comes just after.)"""
        self._controls = run.controls
        self._engine = run.engine

    def start(self) -> None:
        self.sender.start()

    def close(self) -> None:
        """Flush, bounded by ``notifications.flush_timeout_s``."""
        self.sender.close()

    def service_stopping(self) -> None:
        """Session summaries from here on are of a session cut short by the stop."""
        self._stopped = True

    def guard(self, observer: RunObserver) -> GuardedObserver:
        return GuardedObserver(observer, self)

    # -- messages from the service -----------------------------------------------------------------
    def error(self, text: str) -> None:
        self._offer("error", f"{self.symbol} error: {text}", FAILURE)

    # -- run events --------------------------------------------------------------------------------
    def on_event(self, event: RunEvent) -> None:
        try:
            if isinstance(event, BarDecided):
                self._check_llm()
            elif isinstance(event, FillApplied):
                self._fill(event)
            elif isinstance(event, StopMoved):
                self._stop_moved(event)
            elif isinstance(event, HaltChanged):
                self._halt_changed(event)
            elif isinstance(event, SessionEnded):
                self._session_ended(event)
        except Exception:  # a message that cannot be built must not cost the others (nor a bar)
            log.exception("notification_not_built", event=type(event).__name__)

    def _offer(self, kind: str, body: str, level: str = INFO) -> None:
        if kind in self.kinds:
            self.sender.offer(Alert(kind, f"{self.symbol} {self.mode} · {TITLES[kind]}", body, level))

    def _px(self, price: float) -> str:
        return f"{price:.{self._decimals}f}"

    def _fill(self, e: FillApplied) -> None:
        if "fill" not in self.kinds:
            return
        f = e.fill
        text = (
            f"{self.symbol} fill: {f.side.name} {f.qty} @ {self._px(f.price)} ({f.purpose}) "
            f"position {e.position:+d}"
        )
        if e.position and e.stop_price is not None:
            text += f", stop {self._px(e.stop_price)}"
        for t in e.trades:
            side = "long" if t.side == Side.BUY else "short"
            text += (
                f"; closed {side} {t.qty} {self._px(t.entry_price)} -> {self._px(t.exit_price)}: "
                f"{_signed_usd(t.pnl_usd)}"
            )
        self._offer("fill", text)

    def _stop_moved(self, e: StopMoved) -> None:
        # the stop placed with an entry is in the fill's message, a stop gone with the position too
        if "stop_moved" not in self.kinds or e.old is None or e.new is None or not e.position:
            return
        self._offer(
            "stop_moved",
            f"{self.symbol} stop moved: {self._px(e.old)} -> {self._px(e.new)} (position {e.position:+d})",
        )

    def _session_ended(self, e: SessionEnded) -> None:
        if "daily_summary" not in self.kinds:
            return
        day = datetime.fromtimestamp(e.last_ts_ns / 1e9, self._tz).date().isoformat()
        cut = " (to the service's stop)" if self._stopped else ""
        trades = _n(e.trades, "trade")
        self._offer(
            "daily_summary",
            f"{self.symbol} session {day}{cut}: net {_signed_usd(e.net_pnl_usd)}, {trades}, "
            f"equity {_usd(e.equity_usd)}",
        )

    def _check_llm(self) -> None:
        eng = self._engine
        stats = getattr(eng.advisor, "stats", None) if eng is not None else None
        if stats is None:
            return
        llm = self._llm
        change = llm.update(stats.errors, stats.timeouts, stats.answered + stats.unparseable)
        if change == "down":
            self._offer(
                "llm_down",
                f"{self.symbol} LLM advice down: {llm.errors + llm.timeouts} queries in a row failed "
                f"({_n(llm.errors, 'error')}, {_n(llm.timeouts, 'timeout')}); the RL policy decides alone",
                WARNING,
            )
        elif change == "back":
            self._offer(
                "llm_down",
                f"{self.symbol} LLM advice back: answering again after {_n(llm.last_streak, 'failed query')}",
                SUCCESS,
            )

    # -- halts -------------------------------------------------------------------------------------
    def _halt_changed(self, e: HaltChanged) -> None:
        now = tuple(r for r in e.reasons if r != STOPPING)
        before, self._reasons = self._reasons, now
        added = [r for r in now if r not in before]
        removed = [r for r in before if r not in now]
        for reason in added:
            kind, text, level = self._halt_text(reason)
            self._reason_kind[reason] = kind
            self._offer(kind, text, level)
        if not removed:
            return
        after = f"still halted: {'; '.join(now)}" if now else "entries allowed again"
        by_kind: dict[str, list[str]] = {}
        for reason in removed:
            by_kind.setdefault(self._reason_kind.pop(reason, "halt"), []).append(reason)
        for kind, reasons in by_kind.items():
            if kind == "stale_feed":
                self._offer(kind, f"{self.symbol} data back: bars arriving again; {after}", SUCCESS)
            elif kind == "reconcile_mismatch":
                self._offer(kind, f"{self.symbol} reconcile mismatch cleared; {after}", SUCCESS)
            elif kind == "halt":
                self._offer("resume", f"{self.symbol} resumed: {'; '.join(reasons)} lifted; {after}", SUCCESS)

    def _halt_text(self, reason: str) -> tuple[str, str, str]:
        """(kind, message, level) for a reason entries became halted."""
        sym, c = self.symbol, self._controls
        if reason == "stale data":
            return "stale_feed", f"{sym} halted: stale data ({self._bar_age()})", WARNING
        if reason.startswith("journal lost: "):
            return "error", f"{sym} {reason}; trading stops", FAILURE
        if c is None:  # not attached to a run: the reason as it is
            kind = "reconcile_mismatch" if reason.startswith("reconcile") else "halt"
            return kind, f"{sym} halted: {reason}", FAILURE if kind != "halt" else WARNING
        if reason == c.reconcile_mismatch:
            return "reconcile_mismatch", f"{sym} halted: broker and journal disagree: {reason}", FAILURE
        if reason == c.broker_blocked:
            return "halt", f"{sym} halted: the broker takes no orders: {reason}", WARNING
        if c.kill_switch and reason in (c.kill_reason, "kill switch (config)"):
            return "halt", f"{sym} kill switch: {reason}; flattening, no entries until rearmed", FAILURE
        if reason == c.operator_halt:
            flat = " and flattening" if c.flatten_request else ""
            return "halt", f"{sym} halted{flat} by the operator: {reason}", WARNING
        return "halt", f"{sym} halted: {reason}", WARNING

    def _bar_age(self) -> str:
        eng = self._engine
        limit = f"limit {self._stale_limit_s:.0f} s"
        if eng is None:
            return f"no bar within the {limit}"
        if not eng.last_bar_at:
            return f"no bar since the start; {limit}"
        return f"no bar for {time.monotonic() - eng.last_bar_at:.0f} s, {limit}"


def build_alerts(settings: Settings, mode: str, environ: Mapping[str, str] | None = None) -> RunAlerts | None:
    """The service's notifications, or None when ``notifications.urls_env`` is unset or empty.
    A URL apprise cannot use fails here, at start (ConfigError)."""
    cfg = settings.notifications
    targets = notification_targets(cfg, environ)
    if not targets:
        log.info("notifications_off", env=cfg.urls_env)
        return None
    sender = AlertSender(targets, cfg, settings.instrument.symbol)
    log.info("notifications_on", services=sender.services, kinds=sorted(cfg.kinds))
    return RunAlerts(settings, mode, sender)


def _decimals(tick_size: float) -> int:
    exponent = Decimal(str(tick_size)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 2


def _n(count: int, what: str) -> str:
    """``1 trade``, ``2 trades``, ``3 failed queries``."""
    if count == 1:
        return f"1 {what}"
    return f"{count} {what[:-1] + 'ies' if what.endswith('y') else what + 's'}"


def _usd(v: float) -> str:
    return f"{'-' if v < 0 else ''}${abs(v):,.2f}"


def _signed_usd(v: float) -> str:
    return f"{'-' if v < 0 else '+'}${abs(v):,.2f}"
