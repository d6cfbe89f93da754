"""A local Tradovate: REST and WebSocket (market data + user data) on 127.0.0.1, speaking the
documented protocol, with a market replayed from recorded bars and fault injection.

Protocol as documented (partner.tradovate.com, tradovate/example-api-js):
- POST /v1/auth/accesstokenrequest {name, password, appId, appVersion, cid, sec, deviceId}
  → {accessToken, mdAccessToken, expirationTime, userId, userStatus, name} or {errorText};
  time penalty: HTTP 200 {"p-ticket", "p-time", "p-captcha"}; resend with "p-ticket" added.
- GET /v1/auth/renewaccesstoken (Bearer) → a new token and expirationTime.
- GET /v1/{account,position,order,fill,command}/list, /v1/contract/find?name=,
  POST /v1/order/{placeorder,placeoso,modifyorder,cancelorder,liquidateposition}
  (results carry orderId / commandId, or failureReason + failureText).
- WebSocket: server "o" on open; client "authorize\\n0\\n\\n<token>" → a[{"i":0,"s":200}];
  requests "endpoint\\nid\\nquery\\nbody" → a[{"i":id,"s":200,"d":...}]; server "h" heartbeats;
  client "[]" heartbeats (a client silent too long is dropped); events a[{"e":"chart"|"props",..}].
- md/getChart {symbol, chartDescription, timeRange} → {historicalId, realtimeId}, then chart
  packets {"charts":[{"id":..,"td":..,"bars":[{timestamp, open, high, low, close, upVolume,
  downVolume, ...}]}]}, the history ending with {"id":historicalId,"eoh":true}.
- user/syncrequest {users|accounts, splitResponses, entityTypes} → the current entities, then
  "props" events {entityType, eventType: Created|Updated|Deleted, entity}.

The real servers' shapes and limits, which a client must survive (issue 14):
- a successful order result may carry ``failureReason: "Success"`` (the spec's enum has it) or no
  failureReason at all: both shapes are sent, alternately;
- a props event's ``entity`` is an object or an array of objects (both are sent; the fills of a
  split market order arrive as one array);
- a penalty on ``auth/accesstokenrequest`` always needs a captcha (``p-captcha: true``); time
  penalties on other endpoints do not;
- HTTP 429 / WebSocket ``s: 429`` lock the user out for ``lockout_s`` (an hour on the real
  servers, scaled down here): every request answers 429 until it ends; HTTP 423 warns first
  when the request budget (``hour_limit`` per ``hour_s``) is nearly spent;
- at most two sessions per user: a third access token request closes the oldest (its tokens
  stop working, its sockets get a ``c`` close frame); renewal keeps the session;
- orders carry ``timeInForce``; one without it is a Day order (the default is not documented, so
  the pessimistic reading), and :meth:`FakeTradovate.session_end` expires every Day order;
- a working stop is an order like any other: it stays working when the position goes flat and
  fills its full quantity when touched, whatever the position;
- ``md/getChart`` can fail (``faults.chart_errors``), the server can send a ``shutdown`` event
  and a ``c`` frame (:meth:`FakeTradovate.shutdown`), and a fill can be busted (``active:
  false``, :meth:`FakeTradovate.bust_fill`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from trader.adapters.tradovate.protocol import FrameError, iso_to_ns, ns_to_iso, parse_request
from trader.domain import Bar

_THROTTLE_TEXT = {429: "Too Many Requests", 423: "Locked: request budget nearly spent"}

USER = "trader-test"
PASSWORD = "pw-SECRET-7f3a"
SEC = "sec-SECRET-91bc"
CID = 42
ACCOUNT_ID, ACCOUNT_NAME, USER_ID = 1001, "DEMO1001", 7
CONTRACT_ID, SYMBOL = 3001, "NQZ3"
TICK = 0.25


@dataclass
class Faults:
    """Set from the test's thread; read by the server."""

    auth_penalties: int = 0  # next N token requests get a p-ticket
    http_5xx: dict[str, int] = field(default_factory=dict)  # path → next N requests get 503
    http_429: dict[str, int] = field(default_factory=dict)
    penalties: dict[str, int] = field(default_factory=dict)  # path → next N get a p-ticket
    slow_after_execute: dict[str, int] = field(default_factory=dict)  # executed, answered too late
    reject_orders: int = 0  # next N new orders refused (failureReason)
    partial_fills: int = 0  # next N market orders fill in two parts
    stop_heartbeats: bool = False  # md: every connection goes silent (no heartbeats, no data)
    malformed: int = 0  # next N md steps also send a malformed frame
    duplicate_bar: int = 0  # next N completed bars are sent again afterwards
    out_of_order: int = 0  # next N steps also send an old bar
    response_delay_s: float = 0.0
    refuse_ws: set[str] = field(default_factory=set)  # "md"/"user": connections refused (503)
    chart_errors: int = 0  # next N md/getChart requests fail (s: 400)
    ws_429: dict[str, int] = field(default_factory=dict)  # ws endpoint → next N answer s: 429
    # path → the market trades at this price just before the next such request is executed
    # (working stops there fill first): the races of a live market, made to happen on cue
    trade_before: dict[str, float] = field(default_factory=dict)


class FakeTradovate:
    def __init__(
        self,
        bars: Sequence[Bar],
        start_index: int,
        *,
        step_s: float = 0.05,
        updates_per_bar: int = 2,
        heartbeat_s: float = 0.5,
        client_timeout_s: float = 3.0,
        token_ttl_s: float = 4800.0,
        slow_s: float = 3.0,
        lockout_s: float = 2.0,
        hour_limit: int = 100_000,
        hour_s: float = 3600.0,
        max_sessions: int = 2,
    ) -> None:
        self.bars = list(bars)
        self.k = start_index  # index of the forming bar
        self.step_s, self.updates = step_s, updates_per_bar
        self.heartbeat_s, self.client_timeout_s = heartbeat_s, client_timeout_s
        self.token_ttl_s, self.slow_s = token_ttl_s, slow_s
        self.faults = Faults()
        self.lockout_s, self.hour_limit, self.hour_s = lockout_s, hour_limit, hour_s
        self.max_sessions = max_sessions
        self.locked_until = 0.0  # a 429 lockout lasts until then (monotonic)
        self.lockouts = 0
        self.requests_in_lockout = 0
        self.warnings_423 = 0
        self.request_times: list[float] = []  # every request (REST and WebSocket), for the budget
        self.tokens: dict[str, float] = {}
        self.token_session: dict[str, int] = {}  # token → session id
        self.sessions: list[int] = []  # open sessions, oldest first
        self.sessions_closed = 0
        self.socket_session: dict[web.WebSocketResponse, int] = {}
        self._success_shape = itertools.cycle((True, False))  # failureReason "Success" or absent
        self._array_shape = itertools.cycle((False, True))  # props entity: object or array
        self._fill_after_answer = itertools.cycle((False, True))  # market fills before/after the answer
        self.token_requests = 0
        self.renewals = 0
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body) every REST call
        self.ws_requests: list[tuple[str, str]] = []  # (socket, endpoint)
        self.client_heartbeats = 0
        self.md_connections = 0
        self.md_sockets: set[web.WebSocketResponse] = set()
        self.user_sockets: set[web.WebSocketResponse] = set()
        self.orders: dict[int, dict[str, Any]] = {}
        self.versions: dict[int, dict[str, Any]] = {}
        self.commands: list[dict[str, Any]] = []
        self.fills: list[dict[str, Any]] = []
        self.net_pos, self.net_price = 0, 0.0
        self.price = self.bars[self.k].open
        self._ids = itertools.count(50_000)
        self._tickets: set[str] = set()
        self.market_running = True
        self._md_subs: dict[web.WebSocketResponse, tuple[int, int]] = {}
        self._dup_pending: Bar | None = None
        self.silent: set[web.WebSocketResponse] = set()  # md connections that went silent
        self._outbox: dict[web.WebSocketResponse, asyncio.Queue[str]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.port = 0

    # -- lifecycle (from the test's thread) --------------------------------------------------------
    def start(self) -> FakeTradovate:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake tradovate did not start")
        return self

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/websocket"

    @property
    def md_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/md/v1/websocket"

    def config(self) -> dict[str, Any]:
        return {
            "rest_url": self.rest_url,
            "ws_url": self.ws_url,
            "md_url": self.md_url,
            "username": USER,
            "cid": CID,
            "symbol": SYMBOL,
            "heartbeat_s": 0.3,
            "server_timeout_s": 1.5,
            "request_timeout_s": 1.0,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 0.5,
            "order_retry_s": 8.0,
        }

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the server's loop (thread-safe) and return its result."""
        assert self._loop is not None

        async def wrap() -> Any:
            r = fn(*args)
            return await r if asyncio.iscoroutine(r) else r

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(10)

    def drop_md(self) -> None:
        self.call(self._drop, self.md_sockets)

    def silence_md(self) -> None:
        """The current market-data connections stop sending anything (a dead line that stays open)."""
        self.call(lambda: self.silent.update(self.md_sockets))

    def drop_user(self) -> None:
        self.call(self._drop, self.user_sockets)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def placed(self, path: str) -> list[Any]:
        return [b for m, p, b in self.requests if p == path]

    # -- server -------------------------------------------------------------------------------------
    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_route("*", "/v1/{path:(?!websocket).*}", self._rest)
        app.router.add_get("/v1/websocket", lambda r: self._ws(r, "user"))
        app.router.add_get("/md/v1/websocket", lambda r: self._ws(r, "md"))
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        market = loop.create_task(self._market())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            market.cancel()
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _drop(self, socks: set[web.WebSocketResponse]) -> None:
        for ws in list(socks):
            if ws._req is not None and ws._req.transport is not None:  # type: ignore[union-attr]
                ws._req.transport.abort()  # type: ignore[union-attr]  # no close frame: a dead line
        socks.clear()

    # -- REST ---------------------------------------------------------------------------------------
    async def _rest(self, req: web.Request) -> web.Response:
        path = "/" + req.match_info["path"].lower()
        body = await req.json() if req.can_read_body else None
        self.requests.append((req.method, path, body))
        f = self.faults
        if f.response_delay_s:
            await asyncio.sleep(f.response_delay_s)
        if f.http_5xx.get(path, 0) > 0:
            f.http_5xx[path] -= 1
            return web.Response(status=503, text="Service Unavailable")
        if f.http_429.get(path, 0) > 0:
            f.http_429[path] -= 1
            self._lock_out()
            return web.Response(status=429, text=_THROTTLE_TEXT[429])
        throttled = self._throttle()
        if throttled is not None:
            return web.Response(status=throttled, text=_THROTTLE_TEXT[throttled])
        if path == "/auth/accesstokenrequest":
            return self._json(self._token_request(body or {}))
        token = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not self._authorized(token):
            return web.Response(status=401, text="Access is denied")
        if f.penalties.get(path, 0) > 0 and not (body or {}).get("p-ticket"):
            f.penalties[path] -= 1
            return self._json(self._ticket())
        if body and body.get("p-ticket"):
            if body["p-ticket"] not in self._tickets:
                return self._json({"errorText": "invalid p-ticket"})
            self._tickets.discard(body["p-ticket"])
        if path == "/auth/renewaccesstoken":
            self.renewals += 1
            return self._json(self._new_token(self.token_session[token]))
        if path in f.trade_before:
            price = f.trade_before.pop(path)
            self.price = price
            self._check_stops({"low": price, "high": price, "close": price})
        handler = {
            "/account/list": lambda b: [self._account()],
            "/position/list": lambda b: [self._position()],
            "/order/list": lambda b: list(self.orders.values()),
            "/fill/list": lambda b: list(self.fills),
            "/command/list": lambda b: list(self.commands),
            "/contract/find": lambda b: self._contract(req.query.get("name", "")),
            "/order/item": lambda b: self.orders.get(int(req.query.get("id", "0"))),
            "/order/placeorder": self._place_order,
            "/order/placeoso": self._place_oso,
            "/order/modifyorder": self._modify,
            "/order/cancelorder": self._cancel,
            "/order/liquidateposition": self._liquidate,
        }.get(path)
        if handler is None:
            return web.Response(status=404, text=f"no endpoint {path}")
        result = handler(body or {})
        if f.slow_after_execute.get(path, 0) > 0:
            f.slow_after_execute[path] -= 1
            await asyncio.sleep(self.slow_s)  # executed, but the client has given up waiting
        return self._json(result)

    @staticmethod
    def _json(data: Any) -> web.Response:
        return web.Response(text=json.dumps(data), content_type="application/json")

    def _ticket(self, captcha: bool = False) -> dict[str, Any]:
        t = f"ticket-{next(self._ids)}"
        self._tickets.add(t)
        return {"p-ticket": t, "p-time": 1, "p-captcha": captcha}

    # -- limits -------------------------------------------------------------------------------------
    def _lock_out(self) -> None:
        if time.monotonic() >= self.locked_until:
            self.lockouts += 1
        self.locked_until = time.monotonic() + self.lockout_s

    def _throttle(self) -> int | None:
        """429 while locked out; the request budget spent starts a lockout; 423 warns first."""
        now = time.monotonic()
        if now < self.locked_until:
            # knocking during a lockout extends it ("repeated violations may extend the wait")
            self.requests_in_lockout += 1
            self.locked_until = now + self.lockout_s
            return 429
        self.request_times = [t for t in self.request_times if now - t < self.hour_s]
        self.request_times.append(now)
        n = len(self.request_times)
        if n > self.hour_limit:
            self._lock_out()
            return 429
        if n > 0.9 * self.hour_limit:
            self.warnings_423 += 1
            return 423
        return None

    def locked_out(self) -> bool:
        return time.monotonic() < self.locked_until

    # -- sessions -----------------------------------------------------------------------------------
    def _open_session(self) -> int:
        sid = next(self._ids)
        self.sessions.append(sid)
        while len(self.sessions) > self.max_sessions:
            self._close_session(self.sessions[0], "Session closed: a newer session was opened")
        return sid

    def _close_session(self, sid: int, reason: str) -> None:
        if sid in self.sessions:
            self.sessions.remove(sid)
        self.sessions_closed += 1
        for tok, s in list(self.token_session.items()):
            if s == sid:
                self.tokens.pop(tok, None)
        for ws, s in list(self.socket_session.items()):
            if s == sid and not ws.closed:
                task = asyncio.ensure_future(self._close_ws(ws, 1000, reason))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _close_ws(self, ws: web.WebSocketResponse, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str("c" + json.dumps([code, reason]))
            await ws.close(code=code, message=reason.encode())

    def external_login(self) -> None:
        """Someone logs in as this user elsewhere (another app, the web trader): a new session,
        which closes the oldest one when the limit is reached."""
        self.call(self._open_session)

    def session_end(self) -> list[int]:
        """The trading session closes: every Day order expires. Returns the expired ids."""

        def expire() -> list[int]:
            out = []
            for o in self.orders.values():
                if o["ordStatus"] in ("Working", "Suspended") and self.versions[o["id"]]["tif"] == "Day":
                    self._status(o, "Expired")
                    out.append(o["id"])
            return out

        return self.call(expire)

    def shutdown(self, kind: str, reason: str = "Server maintenance") -> None:
        """The server announces a shutdown on every socket of ``kind`` and closes them."""

        async def go() -> None:
            socks = self.md_sockets if kind == "md" else self.user_sockets
            for ws in list(socks):
                shutdown = {"e": "shutdown", "d": {"reasonCode": "Maintenance", "reason": reason}}
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str("a" + json.dumps([shutdown]))
                await self._close_ws(ws, 1001, reason)

        self.call(go)

    def bust_fill(self, fill_id: int) -> None:
        """The exchange busts a trade: the fill becomes inactive and the position is undone."""

        def bust() -> None:
            f = next(x for x in self.fills if x["id"] == fill_id)
            f["active"] = False
            side = 1 if f["action"] == "Buy" else -1
            self.net_pos -= side * f["qty"]
            if self.net_pos == 0:
                self.net_price = 0.0
            self._emit("fill", "Updated", f)
            self._emit("position", "Updated", self._position())

        self.call(bust)

    def _token_request(self, b: dict[str, Any]) -> dict[str, Any]:
        self.token_requests += 1
        f = self.faults
        if f.auth_penalties > 0 and not b.get("p-ticket"):
            f.auth_penalties -= 1
            return self._ticket(captcha=True)  # a token penalty always asks for a captcha
        if b.get("p-ticket"):
            if b["p-ticket"] not in self._tickets:
                return {"errorText": "invalid p-ticket"}
            self._tickets.discard(b["p-ticket"])
        if (b.get("name"), b.get("password"), b.get("sec"), b.get("cid")) != (USER, PASSWORD, SEC, CID):
            return {"errorText": "Incorrect username or password."}
        for k in ("appId", "appVersion", "deviceId"):
            if not b.get(k):
                return {"errorText": f"{k} is required"}
        return self._new_token(self._open_session())

    def _new_token(self, session: int) -> dict[str, Any]:
        tok = f"tok-{next(self._ids)}"
        exp = time.time() + self.token_ttl_s
        self.tokens[tok] = exp
        self.token_session[tok] = session
        iso = datetime.fromtimestamp(exp, UTC).isoformat().replace("+00:00", "Z")
        return {
            "accessToken": tok,
            "mdAccessToken": tok,
            "expirationTime": iso,
            "userId": USER_ID,
            "userStatus": "Active",
            "name": USER,
            "hasLive": False,
        }

    def _authorized(self, tok: str) -> bool:
        return self.tokens.get(tok, 0) > time.time()

    def _account(self) -> dict[str, Any]:
        return {
            "id": ACCOUNT_ID,
            "name": ACCOUNT_NAME,
            "userId": USER_ID,
            "accountType": "Customer",
            "active": True,
        }

    def _contract(self, name: str) -> Any:
        return {"id": CONTRACT_ID, "name": SYMBOL} if name == SYMBOL else None

    def _position(self) -> dict[str, Any]:
        return {
            "id": 9001,
            "accountId": ACCOUNT_ID,
            "contractId": CONTRACT_ID,
            "timestamp": self._now_iso(),
            "netPos": self.net_pos,
            "netPrice": self.net_price if self.net_pos else None,
        }

    def _now_iso(self) -> str:
        return ns_to_iso(self.bars[min(self.k, len(self.bars) - 1)].ts_ns)

    # -- orders -------------------------------------------------------------------------------------
    def _new_order(self, b: dict[str, Any], parent: int | None = None) -> dict[str, Any]:
        oid = next(self._ids)
        o = {
            "id": oid,
            "accountId": ACCOUNT_ID,
            "contractId": CONTRACT_ID,
            "timestamp": self._now_iso(),
            "action": b["action"],
            "ordStatus": "PendingNew",
            "parentId": parent,
            "admin": False,
        }
        self.orders[oid] = o
        self.versions[oid] = {
            "orderId": oid,
            "orderQty": int(b.get("orderQty", 1)),
            "orderType": b["orderType"],
            "stopPrice": b.get("stopPrice"),
            "tif": b.get("timeInForce") or "Day",  # the server default is not documented: Day
        }
        cmd = {
            "id": next(self._ids),
            "orderId": oid,
            "timestamp": o["timestamp"],
            "clOrdId": b.get("clOrdId"),
            "commandType": "New",
            "commandStatus": "RiskPassed",
        }
        self.commands.append(cmd)
        self._emit("command", "Created", cmd)
        self._emit("order", "Created", o)
        return o

    def _status(self, o: dict[str, Any], status: str) -> None:
        o["ordStatus"] = status
        self._emit("order", "Updated", o)

    def _check_new(self, b: dict[str, Any]) -> dict[str, Any] | None:
        for k in ("accountId", "action", "symbol", "orderQty", "orderType"):
            if k not in b:
                return {"failureReason": "UnknownReason", "failureText": f"{k} is required"}
        if b["symbol"] != SYMBOL or b["accountId"] != ACCOUNT_ID:
            return {"failureReason": "InvalidContract", "failureText": "unknown contract or account"}
        if b.get("isAutomated") is not True:
            return {"failureReason": "UnknownReason", "failureText": "isAutomated must be true"}
        if b["orderType"] == "Stop" and self._through_market(b["action"], b.get("stopPrice")):
            return {
                "failureReason": "InvalidPrice",
                "failureText": "Stop price is on the wrong side of the market",
            }
        if self.faults.reject_orders > 0:
            self.faults.reject_orders -= 1
            return {"failureReason": "MaxPosLimitReached", "failureText": "Max position limit reached"}
        return None

    def _place_order(self, b: dict[str, Any]) -> dict[str, Any]:
        bad = self._check_new(b)
        if bad:
            return bad
        o = self._new_order(b)
        self._status(o, "Working")
        if b["orderType"] == "Market":
            self._fill_soon(o)
        return self._ok({"orderId": o["id"]})

    def _fill_soon(self, o: dict[str, Any]) -> None:
        """A market order fills at once: its events reach the client before the answer or just
        after it (both happen on the real servers)."""
        if next(self._fill_after_answer):
            asyncio.get_running_loop().call_later(0.03, self._fill_market, o)
        else:
            self._fill_market(o)

    def _through_market(self, action: str, stop: Any) -> bool:
        """A stop on the wrong side of the market (a sell stop at or above it): refused."""
        if stop is None:
            return False
        return float(stop) >= self.price if action == "Sell" else float(stop) <= self.price

    def _ok(self, result: dict[str, Any]) -> dict[str, Any]:
        """A successful result in one of its documented shapes (with failureReason "Success" or
        without a failureReason)."""
        return {**result, "failureReason": "Success"} if next(self._success_shape) else result

    def _place_oso(self, b: dict[str, Any]) -> dict[str, Any]:
        bad = self._check_new(b)
        if bad:
            return bad
        o = self._new_order(b)
        br = dict(b["bracket1"])
        br.setdefault("orderQty", b["orderQty"])
        child = self._new_order(br, parent=o["id"])
        self._status(child, "Suspended")  # sent once the entry fills
        self._status(o, "Working")
        if b["orderType"] == "Market":
            self._fill_soon(o)
        return self._ok({"orderId": o["id"], "oso1Id": child["id"]})

    def _fill_market(self, o: dict[str, Any]) -> None:
        qty = self.versions[o["id"]]["orderQty"]
        side = 1 if o["action"] == "Buy" else -1
        price = round((self.price + side * TICK) / TICK) * TICK  # one tick of slippage
        parts = [qty]
        if self.faults.partial_fills > 0 and qty > 1:
            self.faults.partial_fills -= 1
            parts = [qty // 2, qty - qty // 2]
        fills = [self._fill(o, q, price, emit=False) for q in parts if q]
        self._emit_many("fill", "Created", fills)  # one event, an array when split
        self._emit("position", "Updated", self._position())
        self._status(o, "Filled")
        for child in self.orders.values():
            if child.get("parentId") == o["id"] and child["ordStatus"] == "Suspended":
                self.versions[child["id"]]["orderQty"] = qty
                self._status(child, "Working")

    def _fill(self, o: dict[str, Any], qty: int, price: float, emit: bool = True) -> dict[str, Any]:
        side = 1 if o["action"] == "Buy" else -1
        f = {
            "id": next(self._ids),
            "orderId": o["id"],
            "contractId": CONTRACT_ID,
            "timestamp": self._now_iso(),
            "action": o["action"],
            "qty": qty,
            "price": price,
            "active": True,
        }
        self.fills.append(f)
        old = self.net_pos
        new = old + side * qty
        if old == 0 or (old > 0) == (side > 0):
            self.net_price = (self.net_price * abs(old) + price * qty) / abs(new) if new else 0.0
        elif new == 0:
            self.net_price = 0.0
        elif (new > 0) != (old > 0):
            self.net_price = price
        self.net_pos = new
        if emit:
            self._emit("fill", "Created", f)
            self._emit("position", "Updated", self._position())
        # a working stop is an order like any other: a flat position does not cancel it
        return f

    def _working(self, oid: Any) -> dict[str, Any] | None:
        o = self.orders.get(oid) if isinstance(oid, int) else None
        return o if o is not None and o["ordStatus"] in ("Working", "Suspended") else None

    def _modify(self, b: dict[str, Any]) -> dict[str, Any]:
        o = self._working(b.get("orderId"))
        if o is None:
            return {"failureReason": "UnknownReason", "failureText": "order is not working"}
        v = self.versions[o["id"]]
        if v["orderType"] == "Stop" and self._through_market(o["action"], b.get("stopPrice")):
            return {
                "failureReason": "InvalidPrice",
                "failureText": "Stop price is on the wrong side of the market",
            }
        for k in ("orderQty", "orderType", "stopPrice"):
            if k in b:
                v[k] = b[k]
        if "timeInForce" in b:
            v["tif"] = b["timeInForce"]
        cmd = {
            "id": next(self._ids),
            "orderId": o["id"],
            "clOrdId": b.get("clOrdId"),
            "commandType": "Modify",
        }
        self.commands.append(cmd)
        self._emit("order", "Updated", o)
        return self._ok({"commandId": cmd["id"]})

    def _cancel(self, b: dict[str, Any]) -> dict[str, Any]:
        o = self._working(b.get("orderId"))
        if o is None:
            return {"failureReason": "UnknownReason", "failureText": "order is not working"}
        self._status(o, "Canceled")
        cmd = {"id": next(self._ids), "orderId": o["id"], "commandType": "Cancel"}
        self.commands.append(cmd)
        return self._ok({"commandId": cmd["id"]})

    def _liquidate(self, b: dict[str, Any]) -> dict[str, Any]:
        if b.get("accountId") != ACCOUNT_ID or b.get("contractId") != CONTRACT_ID:
            return {"failureReason": "UnknownReason", "failureText": "unknown account or contract"}
        if b.get("isAutomated") is not True:
            return {"failureReason": "UnknownReason", "failureText": "isAutomated must be true"}
        if self.faults.reject_orders > 0:
            self.faults.reject_orders -= 1
            return {"failureReason": "TradingLocked", "failureText": "Trading is locked"}
        for w in list(self.orders.values()):
            if w["ordStatus"] in ("Working", "Suspended"):
                self._status(w, "Canceled")
        if self.net_pos == 0:
            return self._ok({})
        o = self._new_order(
            {
                "action": "Sell" if self.net_pos > 0 else "Buy",
                "orderQty": abs(self.net_pos),
                "orderType": "Market",
            }
        )
        self._status(o, "Working")
        self._fill_market(o)
        return self._ok({"orderId": o["id"]})

    def _emit(self, entity_type: str, event: str, entity: dict[str, Any]) -> None:
        """One entity; sent as an object or as a one-element array (both shapes occur)."""
        self._send_props(entity_type, event, [entity] if next(self._array_shape) else entity)

    def _emit_many(self, entity_type: str, event: str, entities: list[dict[str, Any]]) -> None:
        if len(entities) == 1:
            self._emit(entity_type, event, entities[0])
        elif entities:
            self._send_props(entity_type, event, entities)

    def _send_props(self, entity_type: str, event: str, entity: Any) -> None:
        msg = "a" + json.dumps(
            [{"e": "props", "d": {"entityType": entity_type, "eventType": event, "entity": entity}}]
        )
        for ws in list(self.user_sockets):
            q = self._outbox.get(ws)
            if q is not None and not ws.closed:
                q.put_nowait(msg)  # one sender per socket keeps the events in order

    # -- market -------------------------------------------------------------------------------------
    def _partial(self, bar: Bar, j: int) -> dict[str, Any]:
        n = self.updates
        if j == n - 1:
            o, h, lo, c, v = bar.open, bar.high, bar.low, bar.close, bar.volume
        else:
            frac = (j + 1) / n
            c = round((bar.open + (bar.close - bar.open) * frac) / TICK) * TICK
            o, h, lo, v = bar.open, max(bar.open, c), min(bar.open, c), bar.volume * frac
        return self._raw(Bar(bar.ts_ns, o, h, lo, c, v))

    @staticmethod
    def _raw(b: Bar) -> dict[str, Any]:
        return {
            "timestamp": ns_to_iso(b.ts_ns),
            "open": b.open,
            "high": b.high,
            "low": b.low,
            "close": b.close,
            "upVolume": b.volume / 2,
            "downVolume": b.volume / 2,
            "upTicks": 1,
            "downTicks": 1,
            "bidVolume": 0,
            "offerVolume": 0,
        }

    async def _market(self) -> None:
        while self.k < len(self.bars):
            bar = self.bars[self.k]
            for j in range(self.updates):
                await asyncio.sleep(self.step_s / self.updates)
                if not self.market_running:
                    continue
                raw = self._partial(bar, j)
                self.price = raw["close"]
                self._check_stops(raw)
                if self.faults.stop_heartbeats:
                    continue
                f = self.faults
                malformed = old_bar = None
                if f.malformed > 0:
                    f.malformed -= 1
                    malformed = 'a[{"e":"chart","d":'  # truncated JSON
                if f.out_of_order > 0 and self.k >= 5:
                    f.out_of_order -= 1
                    old_bar = self._raw(self.bars[self.k - 3])
                for ws, (_, rid) in list(self._md_subs.items()):
                    if ws.closed or ws in self.silent:
                        continue
                    if malformed:
                        await ws.send_str(malformed)
                    if old_bar:
                        await ws.send_str(self._chart_frame(rid, [old_bar]))
                    await ws.send_str(self._chart_frame(rid, [raw]))
            if self.faults.duplicate_bar > 0:
                self.faults.duplicate_bar -= 1
                self._dup_pending = bar
            self.k += 1
            dup = self._dup_pending
            if dup is not None and self.k < len(self.bars):
                self._dup_pending = None
                # the next bar opens first, then the completed bar arrives again
                nxt = self._partial(self.bars[self.k], 0)
                for ws, (_, rid) in list(self._md_subs.items()):
                    if not ws.closed:
                        await ws.send_str(self._chart_frame(rid, [nxt]))
                        await ws.send_str(self._chart_frame(rid, [self._raw(dup)]))

    @staticmethod
    def _chart_frame(rid: int, bars: list[dict[str, Any]], eoh: bool = False) -> str:
        pkt: dict[str, Any] = {"id": rid}
        if eoh:
            pkt["eoh"] = True
        else:
            pkt["td"] = 20231128
            pkt["bars"] = bars
        return "a" + json.dumps([{"e": "chart", "d": {"charts": [pkt]}}])

    def _check_stops(self, raw: dict[str, Any]) -> None:
        for o in list(self.orders.values()):
            if o["ordStatus"] != "Working":
                continue
            v = self.versions[o["id"]]
            if v["orderType"] != "Stop" or v.get("stopPrice") is None:
                continue
            stop = float(v["stopPrice"])
            # a touched stop fills its whole quantity whatever the position (it can open one)
            if o["action"] == "Sell" and raw["low"] <= stop:
                self._fill(o, v["orderQty"], min(stop, raw["close"]))
                self._status(o, "Filled")
            elif o["action"] == "Buy" and raw["high"] >= stop:
                self._fill(o, v["orderQty"], max(stop, raw["close"]))
                self._status(o, "Filled")

    # -- WebSocket ----------------------------------------------------------------------------------
    async def _ws(self, req: web.Request, kind: str) -> web.StreamResponse:
        if kind in self.faults.refuse_ws:
            return web.Response(status=503, text="unavailable")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(req)
        await ws.send_str("o")
        authorized = False
        last_rx = time.monotonic()
        if kind == "md":
            self.md_connections += 1
            self.md_sockets.add(ws)
        else:
            self.user_sockets.add(ws)

        async def heartbeats() -> None:
            while not ws.closed:
                await asyncio.sleep(self.heartbeat_s)
                if kind == "md" and (self.faults.stop_heartbeats or ws in self.silent):
                    continue
                if time.monotonic() - last_rx > self.client_timeout_s:
                    await ws.close(code=1000, message=b"client heartbeat timeout")
                    return
                await ws.send_str("h")

        hb = asyncio.ensure_future(heartbeats())
        outbox: asyncio.Queue[str] = asyncio.Queue()
        self._outbox[ws] = outbox

        async def sender() -> None:
            while not ws.closed:
                await ws.send_str(await outbox.get())

        snd = asyncio.ensure_future(sender())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                last_rx = time.monotonic()
                if msg.data == "[]":
                    self.client_heartbeats += 1
                    continue
                try:
                    endpoint, rid, _query, body = parse_request(msg.data)
                except FrameError as exc:
                    await ws.send_str("a" + json.dumps([{"s": 400, "i": None, "d": str(exc)}]))
                    continue
                self.ws_requests.append((kind, endpoint))
                throttled = self._throttle()
                if throttled is None and self.faults.ws_429.get(endpoint, 0) > 0:
                    self.faults.ws_429[endpoint] -= 1
                    self._lock_out()
                    throttled = 429
                if throttled is not None:
                    text = _THROTTLE_TEXT[throttled]
                    await ws.send_str("a" + json.dumps([{"i": rid, "s": throttled, "d": text}]))
                    continue
                if endpoint == "authorize":
                    tok = body.strip()
                    authorized = self.tokens.get(tok, 0) > time.time()
                    status = 200 if authorized else 401
                    resp: dict[str, Any] = {"i": rid, "s": status}
                    if authorized:
                        self.socket_session[ws] = self.token_session[tok]
                    else:
                        resp["d"] = "Invalid access token"
                    await ws.send_str("a" + json.dumps([resp]))
                    continue
                if not authorized:
                    await ws.send_str("a" + json.dumps([{"i": rid, "s": 401, "d": "Not authorized"}]))
                    continue
                await self._ws_request(ws, kind, endpoint, rid, json.loads(body) if body else {})
        finally:
            hb.cancel()
            snd.cancel()
            self._outbox.pop(ws, None)
            self.md_sockets.discard(ws)
            self.user_sockets.discard(ws)
            self._md_subs.pop(ws, None)
            self.socket_session.pop(ws, None)
        return ws

    async def _ws_request(
        self, ws: web.WebSocketResponse, kind: str, endpoint: str, rid: int, b: Any
    ) -> None:
        if kind == "md" and endpoint == "md/getChart":
            if self.faults.chart_errors > 0:
                self.faults.chart_errors -= 1
                err = {"s": 400, "i": rid, "d": f"Unknown symbol {b.get('symbol')!r}"}
                await ws.send_str("a" + json.dumps([err]))
                return
            hid, rtid = next(self._ids), next(self._ids)
            await ws.send_str(
                "a" + json.dumps([{"s": 200, "i": rid, "d": {"historicalId": hid, "realtimeId": rtid}}])
            )
            tr = b.get("timeRange", {})
            hist = self.bars[: self.k]
            if "asFarAsTimestamp" in tr:
                since = iso_to_ns(tr["asFarAsTimestamp"])
                hist = [x for x in hist if x.ts_ns >= since]
            hist = hist[-int(tr.get("asMuchAsElements", 1000)) :]
            raws = [self._raw(x) for x in hist]
            for i in range(0, len(raws), 500):
                await ws.send_str(self._chart_frame(hid, raws[i : i + 500]))
            await ws.send_str(self._chart_frame(hid, [], eoh=True))
            self._md_subs[ws] = (hid, rtid)
            return
        if kind == "md" and endpoint == "md/cancelChart":
            self._md_subs.pop(ws, None)
            await ws.send_str("a" + json.dumps([{"s": 200, "i": rid}]))
            return
        if kind == "user" and endpoint == "user/syncrequest":
            d = {
                "users": [{"id": USER_ID, "name": USER}],
                "accounts": [self._account()],
                "positions": [self._position()],
                "orders": list(self.orders.values()),
                "fills": list(self.fills),
                "commands": list(self.commands),
            }
            await ws.send_str("a" + json.dumps([{"s": 200, "i": rid, "d": d}]))
            return
        await ws.send_str("a" + json.dumps([{"s": 404, "i": rid, "d": f"unknown endpoint {endpoint}"}]))


def shared_bars(n: int | None = None) -> list[Bar]:
    """The bundled NQ minute bars (the market the fake plays)."""
    from trader.config import Settings
    from trader.feeds.replay import load_bars

    rb = load_bars(Settings().data)
    out = [b for b, _ in rb.items() if b is not None]
    return out if n is None else out[:n]
