"""The live dashboard's side of the service: a run observer that keeps a bounded view of the run
and streams it to browsers as server-sent events (``GET /events``).

:class:`DashboardHub` is a :class:`~trader.ports.RunObserver`: the engine calls
:meth:`DashboardHub.on_event` on the bar loop, where it only appends to bounded deques (the last
``DECISIONS_KEPT`` decisions, the session's equity curve of at most ``EQUITY_POINTS`` points,
recent fills and sessions) and hands the event to each open stream's bounded backlog. Encoding to
JSON and writing happen in the streams' own handler tasks, never on the bar path.

A stream that falls behind (a slow or stalled browser) loses its oldest events, and is sent a fresh
snapshot instead of the ones it missed; one whose socket takes no data for ``WRITE_TIMEOUT_S`` is
disconnected. So no client can block the bar loop or grow the service's memory. When the HTTP
server stops, every stream gets a ``bye`` event and is closed (a stalled one is aborted), so an
open browser never holds up the service's shutdown.

Stream messages (``event:`` name, ``data:`` one JSON object): ``snapshot`` (first, and after a
stream fell behind), ``bar`` (one decided bar), ``fill``, ``stop``, ``halt``, ``session``,
``progress`` (recorded feeds), ``status`` (account, controls, health, LLM: at most once a second
while bars arrive and every ``STATUS_IDLE_S`` without them, which keeps the connection alive),
``bye``. Prices are in points, money in USD, times in UTC epoch nanoseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from trader.domain import (
    ACTION_NAMES,
    BarDecided,
    BatchDone,
    FillApplied,
    HaltChanged,
    RunEvent,
    SessionEnded,
    StopMoved,
    Trade,
)

if TYPE_CHECKING:
    from trader.service.operator import Operator

log = structlog.get_logger(__name__)

DECISIONS_KEPT = 50
EQUITY_POINTS = 2000  # the session's curve is thinned to stay within this many points
FILLS_KEPT = 20
SESSIONS_KEPT = 10
STREAM_BACKLOG = 256  # events waiting for one stream; beyond it the stream gets a new snapshot
MAX_STREAMS = 8
STATUS_EVERY_S = 1.0  # status with events at most this often
STATUS_IDLE_S = 5.0  # and this often without them (the stream's keep-alive)
WRITE_TIMEOUT_S = 10.0  # a client that takes no data for this long is disconnected
CLOSE_GRACE_S = 1.0  # at server stop, streams get this long to say bye before they are aborted

# The page's own files only: no inline script or style, nothing from another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS = {  # name under trader/service/static -> content type
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def asset(name: str) -> tuple[bytes, str]:
    """A packaged static file of the dashboard (``ASSETS``) and its content type; KeyError for any
    other name, so a request path never reaches the file system."""
    content_type = ASSETS[name]
    return (resources.files("trader.service") / "static" / name).read_bytes(), content_type


# -- JSON views of the events ------------------------------------------------------------------------
def _num(x: float | None) -> float | None:
    """A float JSON (and the browser) can take: NaN and infinities become null."""
    return x if x is not None and math.isfinite(x) else None


def _name(action: int | None) -> str | None:
    return None if action is None else ACTION_NAMES[action]


def decision_view(e: BarDecided) -> dict[str, Any]:
    """One decided bar as the dashboard shows it: the journal's decision row (RL probabilities,
    RL and LLM choice, advice and its age, fusion method and reasons, vetoes, final action) with
    the bar and the account after it."""
    d, v, a, bar = e.decision, e.verdict, e.advice, e.bar
    return {
        "bar_index": e.bar_index,
        "ts_ns": bar.ts_ns,
        "open": bar.open,
        "high": bar.high,
        "low": bar.low,
        "close": bar.close,
        "volume": bar.volume,
        "ready": e.ready,
        "probs": [_num(p) for p in e.probs],
        "rl_action": _name(d.rl_action),
        "rl_confidence": _num(d.rl_confidence),
        "llm_action": _name(d.llm_action),
        "llm_confidence": _num(d.llm_confidence),
        "advice": None
        if a is None
        else {
            "action": _name(a.action),
            "confidence": _num(a.confidence),
            "reason": a.reason[:300],  # LLM text: the page shows it as text, never as markup
            "age_bars": a.age_bars,
            "asked_bar": a.asked_bar,
        },
        "method": d.method,
        "reasons": list(d.reasons),
        "fused_action": _name(d.action),
        "final_action": _name(v.action),
        "vetoes": [{"rule": x.rule, "reason": x.reason} for x in v.vetoes],
        "flatten_reason": v.flatten_reason or None,
        "position": e.position,
        "equity_usd": _num(e.equity_usd),
        "stop_price": _num(e.stop_price),
        "latency_us": _num(e.latency_us),
        "llm_busy": e.llm_busy,
    }


def _trade_view(t: Trade) -> dict[str, Any]:
    return {
        "entry_ts_ns": t.entry_ts_ns,
        "exit_ts_ns": t.exit_ts_ns,
        "side": "long" if t.side > 0 else "short",
        "qty": t.qty,
        "entry_price": t.entry_price,
        "exit_price": t.exit_price,
        "pnl_usd": _num(t.pnl_usd),
        "exit_reason": t.exit_reason,
    }


def fill_view(e: FillApplied) -> dict[str, Any]:
    f = e.fill
    return {
        "ts_ns": f.ts_ns,
        "client_id": f.client_id,
        "side": "BUY" if f.side > 0 else "SELL",
        "qty": f.qty,
        "price": f.price,
        "commission_usd": _num(f.commission_usd),
        "purpose": f.purpose,
        "position": e.position,
        "avg_entry": _num(e.avg_entry) if e.position else None,
        "stop_price": _num(e.stop_price),
        "trades": [_trade_view(t) for t in e.trades],
    }


def session_view(e: SessionEnded) -> dict[str, Any]:
    return {
        "session_id": e.session_id,
        "last_ts_ns": e.last_ts_ns,
        "net_pnl_usd": _num(e.net_pnl_usd),
        "trades": e.trades,
        "equity_usd": _num(e.equity_usd),
    }


def event_message(event: RunEvent) -> tuple[str, dict[str, Any]]:
    """(stream event name, JSON object) for one run event."""
    if isinstance(event, BarDecided):
        return "bar", decision_view(event)
    if isinstance(event, FillApplied):
        return "fill", fill_view(event)
    if isinstance(event, StopMoved):
        return "stop", {
            "ts_ns": event.ts_ns,
            "old": _num(event.old),
            "new": _num(event.new),
            "position": event.position,
        }
    if isinstance(event, HaltChanged):
        return "halt", {"ts_ns": event.ts_ns, "reasons": list(event.reasons)}
    if isinstance(event, SessionEnded):
        return "session", session_view(event)
    return "progress", {"bars": event.bars, "total_bars": event.total_bars}


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(data: Any) -> str:
    """JSON a browser can parse: a NaN or infinity anywhere (the status part is not built here)
    becomes null instead of the invalid ``NaN`` token."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), allow_nan=False)


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: ``event: name`` and the object as one ``data:`` line (JSON escapes
    newlines, so it cannot break the framing)."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(data).encode() + b"\n\n"


# -- the status part (not event-driven: account, controls, health, LLM) ---------------------------
def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def llm_view(operator: Operator) -> dict[str, Any]:
    """The advisor's counters and its recent answer latency (seconds); ``mode`` off = no LLM."""
    mode = operator.settings.advisor.mode
    adv = operator.engine.advisor
    stats = getattr(adv, "stats", None) if adv is not None else None
    if stats is None:
        return {"mode": mode if adv is not None else "off"}
    recent = sorted(stats.latencies_s[-200:])
    eng = operator.engine.stats
    return {
        "mode": mode,
        "queries": stats.queries,
        "answered": stats.answered,
        "errors": stats.errors,
        "timeouts": stats.timeouts,
        "unparseable": stats.unparseable,
        "skipped_busy": stats.skipped_busy,
        "last_latency_s": _num(stats.latencies_s[-1]) if stats.latencies_s else None,
        "p50_latency_s": _num(_quantile(recent, 0.5)),
        "p95_latency_s": _num(_quantile(recent, 0.95)),
        "agreement": _num(eng.agreements / eng.with_advice) if eng.with_advice else None,
    }


def service_status(operator: Operator, stopping: bool, control_enabled: bool) -> dict[str, Any]:
    """What /state and /healthz say, with the LLM's numbers and whether controls are possible."""
    s = operator.settings
    return {
        "state": operator.state(),
        "health": operator.health(stopping),
        "llm": llm_view(operator),
        "control_enabled": control_enabled,
        "instrument": {
            "symbol": s.instrument.symbol,
            "tick_size": s.instrument.tick_size,
            "timezone": s.instrument.timezone,
        },
        "server_time_ns": time.time_ns(),
    }


# -- the hub -----------------------------------------------------------------------------------------
class EquityCurve:
    """The session's equity, at most ``max_points`` points (bar index, ts_ns, equity USD): when
    full, every other point is dropped and later bars are sampled half as often."""

    def __init__(self, max_points: int = EQUITY_POINTS) -> None:
        self.max_points = max(4, max_points)
        self.points: list[tuple[int, int, float]] = []
        self.stride = 1  # one point kept every ``stride`` bars

    def add(self, bar_index: int, ts_ns: int, equity_usd: float) -> None:
        if self.points and bar_index - self.points[-1][0] < self.stride:
            return
        self.points.append((bar_index, ts_ns, equity_usd))
        if len(self.points) >= self.max_points:
            self.points = self.points[::2]  # still evenly spaced, ``stride`` apart
            self.stride *= 2

    def reset(self) -> None:
        self.points.clear()
        self.stride = 1


class _Stream:
    """One open event stream: its bounded backlog of (event, encoded message) slots."""

    __slots__ = ("backlog", "behind", "transport", "wake")

    def __init__(self, backlog: int, transport: asyncio.Transport | None) -> None:
        self.backlog: deque[list[Any]] = deque(maxlen=backlog)
        self.behind = False  # the backlog overflowed: the next write is a snapshot instead
        self.wake = asyncio.Event()
        self.transport = transport

    def push(self, slot: list[Any]) -> None:
        if len(self.backlog) == self.backlog.maxlen:
            self.behind = True  # the oldest event is dropped; the client resyncs from a snapshot
        self.backlog.append(slot)
        self.wake.set()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


def _unsent(sub: _Stream) -> int:
    """Bytes the stream's connection still holds for its client (0 without a transport)."""
    return 0 if sub.transport is None else sub.transport.get_write_buffer_size()


class DashboardHub:
    """Run observer and stream fan-out for the live dashboard (see the module docstring)."""

    def __init__(
        self,
        *,
        decisions: int = DECISIONS_KEPT,
        equity_points: int = EQUITY_POINTS,
        backlog: int = STREAM_BACKLOG,
        max_streams: int = MAX_STREAMS,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.decisions: deque[BarDecided] = deque(maxlen=decisions)
        self.fills: deque[FillApplied] = deque(maxlen=FILLS_KEPT)
        self.sessions: deque[SessionEnded] = deque(maxlen=SESSIONS_KEPT)
        self.equity = EquityCurve(equity_points)
        self.halt_reasons: tuple[str, ...] | None = None  # None until the engine announced any
        self.stop: StopMoved | None = None
        self.progress: BatchDone | None = None
        self.events = 0
        self.backlog = backlog
        self.max_streams = max_streams
        self.write_timeout_s = write_timeout_s
        self.streams: set[_Stream] = set()
        self.resyncs = 0  # snapshots sent to streams that fell behind
        self.slow_disconnects = 0
        self.closed = False

    # -- RunObserver: on the bar loop, record and return ----------------------------------------------
    def on_event(self, event: RunEvent) -> None:
        self.events += 1
        if isinstance(event, BarDecided):
            self.decisions.append(event)
            self.equity.add(event.bar_index, event.bar.ts_ns, event.equity_usd)
        elif isinstance(event, FillApplied):
            self.fills.append(event)
        elif isinstance(event, StopMoved):
            self.stop = event
        elif isinstance(event, HaltChanged):
            self.halt_reasons = event.reasons
        elif isinstance(event, SessionEnded):
            self.sessions.append(event)
            self.equity.reset()  # the curve is the session's
        elif isinstance(event, BatchDone):
            self.progress = event
        if self.streams:
            slot = [event, None]  # encoded once, by the first stream that writes it
            for s in self.streams:
                s.push(slot)

    # -- views -----------------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """The run as the dashboard shows it on (re)connect: last decisions (oldest first), the
        session's equity curve, recent fills and sessions, the working stop and halt reasons."""
        points = [[i, ts, _num(eq)] for i, ts, eq in self.equity.points]
        last = self.decisions[-1] if self.decisions else None
        if last is not None and points and points[-1][0] != last.bar_index:  # thinned: add the newest
            points.append([last.bar_index, last.bar.ts_ns, _num(last.equity_usd)])
        return {
            "decisions": [decision_view(e) for e in self.decisions],
            "equity": {"points": points, "stride": self.equity.stride, "max_points": self.equity.max_points},
            "fills": [fill_view(e) for e in self.fills],
            "sessions": [session_view(e) for e in self.sessions],
            "halt_reasons": None if self.halt_reasons is None else list(self.halt_reasons),
            "stop": None
            if self.stop is None
            else {"ts_ns": self.stop.ts_ns, "new": _num(self.stop.new), "position": self.stop.position},
            "progress": None
            if self.progress is None
            else {"bars": self.progress.bars, "total_bars": self.progress.total_bars},
            "events": self.events,
            "streams": {
                "open": len(self.streams),
                "max": self.max_streams,
                "resyncs": self.resyncs,
                "slow_disconnects": self.slow_disconnects,
            },
        }

    def snapshot(self, status: dict[str, Any]) -> dict[str, Any]:
        return {**self.view(), **status}

    # -- streams ---------------------------------------------------------------------------------------
    async def stream(self, request: web.Request, status: Callable[[], dict[str, Any]]) -> web.StreamResponse:
        """``GET /events``: a snapshot, then the run's events as they happen, until the client goes
        away, falls too far behind, or the server stops."""
        if self.closed:
            raise web.HTTPServiceUnavailable(reason="the service is stopping")
        if len(self.streams) >= self.max_streams:
            raise web.HTTPServiceUnavailable(reason=f"too many dashboard streams (max {self.max_streams})")
        resp = web.StreamResponse(
            headers={
                **SECURITY_HEADERS,
                "Content-Type": "text/event-stream; charset=utf-8",
                "X-Accel-Buffering": "no",
            }
        )
        resp.force_close()  # a stream ends its connection: no keep-alive to linger after the bye
        sub = _Stream(self.backlog, request.transport)
        self.streams.add(sub)  # counted from here, so concurrent requests cannot pass the limit
        source = request.remote or "?"
        log.info("dashboard_stream_opened", source=source, streams=len(self.streams))
        why = "closed by client"
        try:
            await resp.prepare(request)
            await self._write(resp, b"retry: 3000\n\n" + sse("snapshot", self.snapshot(status())))
            last_status = time.monotonic()
            while not self.closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.wake.wait(), STATUS_IDLE_S)
                sub.wake.clear()
                if self.closed:
                    break
                out = self._drain(sub, status)
                now = time.monotonic()
                if now - last_status >= (STATUS_EVERY_S if out else STATUS_IDLE_S):
                    out.append(sse("status", status()))
                    last_status = now
                if out:
                    await self._write(resp, b"".join(out))
            why = "server stopping"
            await self._write(resp, sse("bye", {"reason": "the service is stopping"}))
            # A client that stopped reading leaves the bye in the write buffer, and a closing
            # connection waits for its buffer to go out: give it the grace, then end it for good
            # (close_streams aborts what is still here after the grace too).
            end = time.monotonic() + CLOSE_GRACE_S
            while _unsent(sub) and time.monotonic() < end:
                await asyncio.sleep(0.02)
            if _unsent(sub):
                why = "aborted at server stop"
                sub.abort()
        except TimeoutError:
            why = f"took no data for {self.write_timeout_s:.0f}s"
            self.slow_disconnects += 1
            sub.abort()
        except ConnectionError:  # the client went away, or the server's stop aborted a stalled stream
            if self.closed:
                why = "aborted at server stop"
        except Exception as exc:  # the response has started: end the stream, never the service
            why = f"error: {exc!r}"
            log.exception("dashboard_stream_failed")
            sub.abort()
        finally:
            self.streams.discard(sub)
            (log.warning if why.startswith("took no data") else log.info)(
                "dashboard_stream_closed", source=source, why=why, streams=len(self.streams)
            )
        return resp

    def _drain(self, sub: _Stream, status: Callable[[], dict[str, Any]]) -> list[bytes]:
        """The stream's pending events, encoded (each event once for all streams); a stream whose
        backlog overflowed gets one fresh snapshot instead of what it missed."""
        if sub.behind:
            sub.behind = False
            sub.backlog.clear()
            self.resyncs += 1
            return [sse("snapshot", self.snapshot(status()))]
        out: list[bytes] = []
        progress: bytes | None = None
        while sub.backlog:
            slot = sub.backlog.popleft()
            if slot[1] is None:
                slot[1] = sse(*event_message(slot[0]))
            if isinstance(slot[0], BatchDone):
                progress = slot[1]  # only the latest progress matters
            else:
                out.append(slot[1])
        if progress is not None:
            out.append(progress)
        return out

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        await asyncio.wait_for(resp.write(data), self.write_timeout_s)

    async def close_streams(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Server stop: every stream says bye and ends; one that cannot (a stalled client) is
        aborted after ``grace_s``, so an open dashboard never holds up the shutdown."""
        self.closed = True
        for s in tuple(self.streams):
            s.wake.set()
        end = time.monotonic() + grace_s
        while self.streams and time.monotonic() < end:
            await asyncio.sleep(0.02)
        for s in tuple(self.streams):
            s.abort()
        end = time.monotonic() + grace_s
        while self.streams and time.monotonic() < end:
            await asyncio.sleep(0.02)
