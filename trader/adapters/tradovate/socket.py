"""One Tradovate WebSocket connection (market data or user data): open, authorize, heartbeats,
request/response by id, events to a callback, and a dead-connection detector.

The server must send *something* (``h`` heartbeats at least) every ``server_timeout_s``; a silent
connection is closed and reported as lost, like a dropped one, so the owner reconnects. The client
sends ``[]`` every ``heartbeat_s`` as the protocol requires. Malformed frames are counted, logged
and skipped; they never end the connection by themselves.

The server ends a connection with a ``c[code, "reason"]`` frame, and may announce it first with a
``shutdown`` event (``{"e": "shutdown", "d": {"reasonCode": "Maintenance" | "ConnectionQuotaReached"
| "IPQuotaReached", "reason": ...}}``, WebSocket message protocol): either closes the connection
here with the reason, and the owner reconnects with back-off. Requests pass the user's
:class:`~trader.adapters.tradovate.rest.RequestGate` (the request limits are per user, REST and
sockets together); ``s: 429`` locks it, ``s: 423`` slows it down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from trader.adapters.tradovate.protocol import HEARTBEAT, FrameError, encode_request, parse_frame
from trader.adapters.tradovate.rest import (
    AuthError,
    PenaltyError,
    RateLimited,
    RequestGate,
    TradovateError,
)
from trader.config import TradovateConfig

log = structlog.get_logger(__name__)


class SocketClosed(TradovateError):
    """The connection ended (dropped, closed by the server, or silent too long)."""


class RequestFailed(TradovateError):
    def __init__(self, endpoint: str, status: int, detail: object) -> None:
        super().__init__(f"{endpoint}: status {status}: {str(detail)[:200]}")
        self.status = status


class TradovateSocket:
    def __init__(
        self,
        url: str,
        cfg: TradovateConfig,
        name: str,
        on_event: Callable[[dict[str, Any]], None],
        gate: RequestGate | None = None,
    ) -> None:
        self.url, self.cfg, self.name, self.on_event = url, cfg, name, on_event
        self.gate = gate or RequestGate(cfg)
        self.shutdown_reason = ""  # the server's shutdown event, if it sent one
        self._closing = False  # close() called: the end of the connection is ours
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._reader: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.malformed_frames = 0
        self.heartbeats_rx = 0

    async def connect(self, session: aiohttp.ClientSession, token: str) -> None:
        """Open, wait for the ``o`` frame, authorize with ``token``; then heartbeats run."""
        timeout = self.cfg.request_timeout_s
        try:
            self._ws = await asyncio.wait_for(session.ws_connect(self.url, autoping=True), timeout)
            msg = await asyncio.wait_for(self._ws.receive(), timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            await self._abort()
            raise SocketClosed(f"{self.name}: cannot open {self.url}: {type(exc).__name__}") from None
        if msg.type != aiohttp.WSMsgType.TEXT or not str(msg.data).startswith("o"):
            await self._abort()
            raise SocketClosed(f"{self.name}: expected the open frame 'o', got {str(msg.data)[:40]!r}")
        self.closed.clear()
        self._reader = asyncio.create_task(self._read(), name=f"{self.name}-reader")
        try:
            await self.request("authorize", token, rid=0)
        except RequestFailed as exc:
            await self.close()
            raise AuthError(f"{self.name}: WebSocket authorization refused (status {exc.status})") from None
        except BaseException:
            await self.close()
            raise
        self._heart = asyncio.create_task(self._heartbeat(), name=f"{self.name}-heartbeat")
        log.info("ws_connected", socket=self.name)

    async def request(self, endpoint: str, body: object | None = None, query: str = "", rid: int = -1) -> Any:
        """Send one request and wait for its response; returns its ``d``. A penalty ticket in the
        response is answered (wait ``p-time``, resend with the ticket) as on REST."""
        ws = self._ws
        if ws is None or self.closed.is_set():
            raise SocketClosed(f"{self.name}: not connected")
        while True:
            await self.gate.wait(f"{self.name} {endpoint}")
            if rid < 0:
                self._next_id += 1
                req_id = self._next_id
            else:
                req_id = rid
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[req_id] = fut
            try:
                await ws.send_str(encode_request(endpoint, req_id, body, query))
                resp = await asyncio.wait_for(fut, self.cfg.request_timeout_s)
            except TimeoutError:
                raise SocketClosed(f"{self.name}: {endpoint} got no response") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise SocketClosed(f"{self.name}: {endpoint}: {type(exc).__name__}") from None
            finally:
                self._pending.pop(req_id, None)
            status = int(resp.get("s", 0))
            data = resp.get("d")
            if status == 429:
                until = self.gate.lock(f"s:429 on {self.name} {endpoint}")
                raise RateLimited(f"{self.name}: {endpoint}: status 429 (locked out)", until, lockout=True)
            if status == 423:
                until = self.gate.slow(f"s:423 on {self.name} {endpoint}")
                raise RateLimited(f"{self.name}: {endpoint}: status 423 (slow down)", until, lockout=False)
            if status != 200:
                raise RequestFailed(endpoint, status, data)
            if isinstance(data, dict) and "p-ticket" in data and isinstance(body, dict):
                if data.get("p-captcha"):
                    until = self.gate.lock(f"penalty with captcha on {self.name} {endpoint}")
                    raise PenaltyError(
                        f"{self.name}: {endpoint}: penalty needs a captcha", until, lockout=True
                    )
                await asyncio.sleep(float(data.get("p-time") or 1))
                body = {**body, "p-ticket": data["p-ticket"]}
                continue
            return data

    async def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), self.cfg.server_timeout_s)
                except TimeoutError:
                    self.close_reason = f"no frame from the server for {self.cfg.server_timeout_s}s"
                    log.warning("ws_silent", socket=self.name, timeout_s=self.cfg.server_timeout_s)
                    return
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    self.close_reason = "closed by the server"
                    return
                if msg.type == aiohttp.WSMsgType.ERROR:
                    self.close_reason = f"error: {ws.exception()!r}"
                    return
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    frame = parse_frame(msg.data)
                except FrameError as exc:
                    self.malformed_frames += 1
                    log.warning(
                        "ws_malformed_frame", socket=self.name, error=str(exc), frame=str(msg.data)[:80]
                    )
                    continue
                if frame.kind == "h":
                    self.heartbeats_rx += 1
                elif frame.kind == "c":
                    self.close_reason = f"close frame {frame.close_code} {frame.close_reason}"
                    return
                elif frame.kind == "a":
                    for m in frame.messages:
                        if m.get("e") == "shutdown":
                            self._shutdown(m.get("d"))
                            return
                        self._dispatch(m)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(SocketClosed(f"{self.name}: connection lost"))
            if self._heart is not None:
                self._heart.cancel()
            with contextlib.suppress(Exception):
                await ws.close()
            if self._closing:
                log.info("ws_closed", socket=self.name)
            else:
                log.warning("ws_disconnected", socket=self.name, reason=self.close_reason)

    def _shutdown(self, d: object) -> None:
        code = reason = ""
        if isinstance(d, dict):
            code, reason = str(d.get("reasonCode") or ""), str(d.get("reason") or "")
        self.shutdown_reason = f"{code} {reason}".strip() or "no reason given"
        self.close_reason = f"server shutdown: {self.shutdown_reason}"
        log.warning("ws_server_shutdown", socket=self.name, reason_code=code, reason=reason)

    def _dispatch(self, m: dict[str, Any]) -> None:
        if "i" in m and "s" in m:
            fut = self._pending.get(m["i"]) if isinstance(m["i"], int) else None
            if fut is not None and not fut.done():
                fut.set_result(m)
            return
        if "e" in m:
            try:
                self.on_event(m)
            except (KeyError, TypeError, ValueError) as exc:
                self.malformed_frames += 1
                log.warning("ws_bad_event", socket=self.name, event=m.get("e"), error=repr(exc)[:120])
            return
        self.malformed_frames += 1
        log.warning("ws_unknown_message", socket=self.name, message=str(m)[:80])

    async def _heartbeat(self) -> None:
        ws = self._ws
        assert ws is not None
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
            while not self.closed.is_set():
                await asyncio.sleep(self.cfg.heartbeat_s)
                await ws.send_str(HEARTBEAT)

    async def close(self) -> None:
        self._closing = True
        for t in (self._heart, self._reader):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        await self._abort()
        self.closed.set()

    async def _abort(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
