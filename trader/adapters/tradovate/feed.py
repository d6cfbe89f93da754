"""Live 1-minute bars from Tradovate's market-data WebSocket (``md/getChart``).

Only completed bars leave this module: chart updates revise the forming bar until a bar with a
later timestamp starts, and only then is the forming one handed on. Updates for a bar already
handed on are dropped and counted (``duplicates``), as are updates older than the forming bar
(``out_of_order``).

Each :class:`~trader.ports.Batch` carries a kind (:class:`~trader.domain.BatchKind`):

* ``prime``: the history fetched at the first subscription (``tradovate.history_bars``): it warms
  the indicators and is never traded on;
* ``catch_up``: bars missed while disconnected (or since the journal's last bar after a restart),
  fetched through the same chart request from the last bar handed on: the engine decides on them
  so indicators, stops and statistics stay continuous, but enters nothing on them;
* ``live``: a bar that just completed.

Any drop (socket error, close frame, a ``shutdown`` event, server silence) leads to a reconnect
with exponential back-off and jitter (tenacity), re-authorization with the token the broker shares
(refreshed once, for both sockets, when it is refused) and re-subscription. During a lockout
(429, captcha) nothing is sent until it ends. ``md/getChart`` refusals (an unknown or expired
symbol, say) are retried ``chart_error_limit`` times in a row, then the feed fails with the
server's reason instead of looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import structlog

from trader.adapters.tradovate.protocol import iso_to_ns, ns_to_iso
from trader.adapters.tradovate.rest import (
    AuthError,
    RateLimited,
    TradovateError,
    TradovateRest,
    TransientError,
    reconnecting,
)
from trader.adapters.tradovate.socket import RequestFailed, SocketClosed, TradovateSocket
from trader.config import Settings
from trader.domain import Bar, BatchKind, ComponentHealth
from trader.ports import Batch

log = structlog.get_logger(__name__)

RECONNECTABLE = (SocketClosed, TransientError, RateLimited, RequestFailed, AuthError)


class ChartRefused(TradovateError):
    """``md/getChart`` refused ``chart_error_limit`` times in a row: not retried further."""


class BarAssembler:
    """Chart updates ─▶ completed bars, each exactly once and in time order."""

    def __init__(self, last_ts_ns: int = -1) -> None:
        self.last_ts = last_ts_ns  # the last completed bar handed on
        self.forming: Bar | None = None
        self.duplicates = 0
        self.out_of_order = 0

    def update(self, bar: Bar, count: bool = True) -> Bar | None:
        """Feed one update; returns the bar it completed, if any. ``count=False`` for history
        (overlap with what was already handed on is expected there)."""
        if bar.ts_ns <= self.last_ts:
            if count:
                if bar.ts_ns == self.last_ts:
                    self.duplicates += 1
                else:
                    self.out_of_order += 1
            return None
        f = self.forming
        if f is None or bar.ts_ns == f.ts_ns:
            self.forming = bar
            return None
        if bar.ts_ns < f.ts_ns:
            if count:
                self.out_of_order += 1
            return None
        self.forming = bar
        self.last_ts = f.ts_ns
        return f


def chart_bar(raw: dict[str, Any]) -> Bar:
    """One element of a chart packet's ``bars`` ─▶ Bar (volume = up + down volume)."""
    return Bar(
        iso_to_ns(str(raw["timestamp"])),
        float(raw["open"]),
        float(raw["high"]),
        float(raw["low"]),
        float(raw["close"]),
        float(raw.get("upVolume", 0.0)) + float(raw.get("downVolume", 0.0)),
    )


class TradovateFeed:
    """The engine's Feed for live bars. ``resume_after_ns``: continue after this bar (a restart)."""

    def __init__(self, settings: Settings, rest: TradovateRest, resume_after_ns: int | None = None) -> None:
        self.cfg = settings.tradovate
        self.total_bars: int | None = None  # a live feed has no end
        self.bar_s = settings.data.bar_seconds
        self.rest = rest
        self.assembler = BarAssembler(-1 if resume_after_ns is None else resume_after_ns)
        self.connected = False
        self.disconnected_at: float | None = time.monotonic()
        self.connects = 0
        self.reconnects = 0
        self.malformed = 0
        self.bad_bars = 0
        self.bars_out = 0
        self.chart_errors = 0  # md/getChart refusals in a row
        self._queue: asyncio.Queue[tuple[str, list[Bar]]] = asyncio.Queue()
        self._socket: TradovateSocket | None = None
        self._hist_id: int | None = None
        self._rt_id: int | None = None
        self._history: list[Bar] = []
        self._in_history = False
        self._resumed = resume_after_ns is not None
        self.on_connect: Callable[[], None] | None = None

    def resume_after(self, last_ts_ns: int, next_row: int = -1) -> None:
        """Continue after this bar (a restart): the first subscription fetches what came since."""
        self.assembler.last_ts = last_ts_ns
        self._resumed = True

    def origin(self, row: int) -> str:
        return f"tradovate:{self.cfg.environment}:{self.cfg.symbol}"

    def health(self) -> ComponentHealth:
        down = self.disconnected_at
        return ComponentHealth(
            "tradovate",
            self.connected,
            0.0 if down is None or self.connected else time.monotonic() - down,
            (
                ("reconnects", self.reconnects),
                ("chart_errors", self.chart_errors),
                ("duplicates", self.duplicates),
                ("out_of_order", self.out_of_order),
                ("malformed", self.malformed + self.bad_bars),
            ),
            self.rest.blocked(),
        )

    async def open(self) -> None:
        await self.rest.start()

    async def close(self) -> None:
        await self.rest.close()

    # -- Feed ---------------------------------------------------------------------------------------
    async def batches(self) -> AsyncGenerator[Batch, None]:
        task = asyncio.create_task(self._maintain(), name="tradovate-md")
        getter: asyncio.Task[tuple[str, list[Bar]]] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    task.result()  # the connection task ended: raise its error
                    return
                kind, bars = getter.result()
                self.bars_out += len(bars)
                yield Batch(BatchKind(kind), [(b, -1) for b in bars])
        finally:
            if getter is not None:
                getter.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await self._close_socket()

    @property
    def duplicates(self) -> int:
        return self.assembler.duplicates

    @property
    def out_of_order(self) -> int:
        return self.assembler.out_of_order

    # -- connection ---------------------------------------------------------------------------------
    async def _maintain(self) -> None:
        await self.rest.start()
        while True:
            async for attempt in reconnecting(self.cfg, "md_reconnect_wait", RECONNECTABLE):
                with attempt:
                    await self._connect_and_subscribe()
            sock = self._socket
            assert sock is not None
            await sock.closed.wait()
            self.connected = False
            self.disconnected_at = time.monotonic()
            self.malformed += sock.malformed_frames
            self.reconnects += 1
            log.warning("md_connection_lost", reason=sock.close_reason, last_bar=self._last_iso())

    async def _connect_and_subscribe(self) -> None:
        await self._close_socket()
        self.rest.gate.check("md connect")  # during a lockout: wait, do not knock
        tok = self.rest.token or await self.rest.authenticate()
        sock = TradovateSocket(self.rest.md_url, self.cfg, "md", self._on_event, self.rest.gate)
        self._socket = sock
        try:
            await sock.connect(self.rest.session, tok.md_access.get_secret_value())
        except AuthError:
            # the token was refused (a session closed from outside): one refresh, shared with the
            # user-data socket, then the next attempt authorizes with it
            await self.rest.refresh(tok)
            raise SocketClosed("md: authorization refused; token refreshed") from None
        first = self.assembler.last_ts < 0
        time_range: dict[str, Any] = {"asMuchAsElements": self.cfg.history_bars}
        if not first:
            time_range["asFarAsTimestamp"] = ns_to_iso(self.assembler.last_ts)
        self._history = []
        self._in_history = True
        self._hist_id = self._rt_id = None
        try:
            d = await self._get_chart(sock, time_range)
        except RequestFailed as exc:
            self.chart_errors += 1
            log.warning(
                "md_chart_refused", symbol=self.cfg.symbol, error=str(exc), in_a_row=self.chart_errors
            )
            if self.chart_errors >= self.cfg.chart_error_limit:
                raise ChartRefused(
                    f"tradovate.symbol {self.cfg.symbol!r}: md/getChart refused {self.chart_errors} times "
                    f"in a row: {exc}"
                ) from None
            raise
        if not isinstance(d, dict) or "realtimeId" not in d:
            raise RequestFailed("md/getChart", 200, f"no subscription ids in {str(d)[:80]}")
        self.chart_errors = 0
        self._hist_id, self._rt_id = d.get("historicalId"), d["realtimeId"]
        self.connected = True
        self.disconnected_at = None
        self.connects += 1
        log.info(
            "md_subscribed",
            symbol=self.cfg.symbol,
            after=self._last_iso(),
            reconnect=self.connects > 1,
        )
        if self.on_connect is not None:
            self.on_connect()

    async def _get_chart(self, sock: TradovateSocket, time_range: dict[str, Any]) -> Any:
        return await sock.request(
            "md/getChart",
            {
                "symbol": self.cfg.symbol,
                "chartDescription": {
                    "underlyingType": "MinuteBar",
                    "elementSize": self.bar_s // 60 or 1,
                    "elementSizeUnit": "UnderlyingUnits",
                    "withHistogram": False,
                },
                "timeRange": time_range,
            },
        )

    async def _close_socket(self) -> None:
        sock = self._socket
        if sock is None:
            return
        if not sock.closed.is_set() and self._rt_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sock.request("md/cancelChart", {"subscriptionId": self._rt_id}), 1.0)
        await sock.close()
        self.malformed += sock.malformed_frames
        sock.malformed_frames = 0

    # -- events -------------------------------------------------------------------------------------
    def _on_event(self, m: dict[str, Any]) -> None:
        if m.get("e") != "chart":
            return
        for packet in m["d"]["charts"]:
            pid = packet.get("id")
            # one chart subscription per socket; its packets can arrive before the response that
            # names their ids has been read, so unknown ids are accepted until the ids are known
            if self._rt_id is not None and pid not in (self._hist_id, self._rt_id):
                continue
            if packet.get("eoh"):
                self._end_of_history()
                continue
            for raw in packet.get("bars", ()):
                try:
                    bar = chart_bar(raw)
                except (KeyError, TypeError, ValueError) as exc:
                    self.bad_bars += 1
                    log.warning("md_bad_bar", error=repr(exc)[:120], bar=str(raw)[:120])
                    continue
                if self._in_history:
                    self._history.append(bar)
                else:
                    done = self.assembler.update(bar)
                    if done is not None:
                        self._queue.put_nowait(("live", [done]))

    def _end_of_history(self) -> None:
        if not self._in_history:
            return
        self._in_history = False
        kind = "prime" if self.assembler.last_ts < 0 and not self._resumed else "catch_up"
        out = []
        for bar in sorted(self._history, key=lambda b: b.ts_ns):
            done = self.assembler.update(bar, count=False)
            if done is not None:
                out.append(done)
        self._history = []
        log.info("md_history", kind=kind, bars=len(out), last_bar=self._last_iso())
        if out:
            self._queue.put_nowait((kind, out))

    def _last_iso(self) -> str | None:
        return None if self.assembler.last_ts < 0 else ns_to_iso(self.assembler.last_ts)
