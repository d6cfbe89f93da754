"""Live broker: Tradovate order routing over REST, order/fill/position events over the user-data
WebSocket (``user/syncrequest``), reconciliation at start and after every reconnect.

Orders
  * an entry with a protective stop is one OSO request (``order/placeoso``: a market entry and a
    ``bracket1`` stop that the exchange side holds from the moment the entry fills); the stop sits
    ``stop_ticks`` from the decision bar's close;
  * MOVE_TO_BE and trailing modify that stop (``order/modifyorder``); ``None`` cancels it;
  * exits are market orders sized to the broker's position; flatten is ``order/liquidateposition``
    (cancels the contract's working orders and closes the position in one request);
  * every new order carries ``clOrdId`` = the engine's client id, derived from (run, bar, intent),
    so a retried request is recognisable.

Retries
  * a penalty ticket or HTTP 429 means "not executed": wait and resend (``TradovateRest``);
  * a timeout, 5xx or dropped connection on a *new order* is ambiguous: before sending it again the
    broker looks for its ``clOrdId`` in ``command/list``; found = it was placed (adopted, not resent).
    This is what makes a retry unable to open a second position;
  * modify, cancel and liquidate are safe to repeat and are retried with back-off and jitter.

State
  Fills come only from the broker's events (deduplicated by fill id; partial fills are separate
  fills), so the engine's portfolio follows what actually executed. Every order status change goes
  through :class:`OrderBook`, which logs each transition. Reconciliation compares the broker's
  position and working orders with the engine's; a mismatch halts entries (``mismatch``) unless
  ``tradovate.adopt_broker_state``, in which case the broker's position and stop are adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from trader.adapters.tradovate.protocol import iso_to_ns
from trader.adapters.tradovate.rest import (
    PenaltyError,
    RateLimited,
    RejectedError,
    TradovateError,
    TradovateRest,
    TransientError,
)
from trader.adapters.tradovate.socket import RequestFailed, SocketClosed, TradovateSocket
from trader.config import Settings
from trader.domain import (
    Bar,
    BrokerEvent,
    BrokerProblem,
    ComponentHealth,
    Fill,
    OrderIntent,
    OrderRejected,
    ReconcileReport,
    Side,
    TickGrid,
)

log = structlog.get_logger(__name__)

TERMINAL = frozenset({"Filled", "Canceled", "Rejected", "Expired", "Completed"})
# Order status transitions the protocol allows (anything else is logged as unexpected).
ALLOWED: dict[str, frozenset[str]] = {
    "Sent": frozenset({"PendingNew", "Working", "Suspended", "Filled", "Rejected", "Canceled"}),
    "PendingNew": frozenset({"Working", "Suspended", "Filled", "Rejected", "Canceled"}),
    "Suspended": frozenset({"Working", "Canceled", "Filled", "Expired"}),
    "Working": frozenset({"Working", "PendingReplace", "PendingCancel", "Filled", "Canceled", "Expired"}),
    "PendingReplace": frozenset({"Working", "Filled", "Canceled"}),
    "PendingCancel": frozenset({"Canceled", "Filled", "Working"}),
}


@dataclass(slots=True)
class TrackedOrder:
    order_id: int
    client_id: str
    purpose: str  # entry/add/reverse/exit/flatten:*/stop
    side: Side
    qty: int
    status: str = "Sent"
    filled: int = 0


class OrderBook:
    """The broker's orders as this process knows them; the one place statuses change."""

    def __init__(self) -> None:
        self.orders: dict[int, TrackedOrder] = {}
        self.by_client: dict[str, int] = {}
        self.unexpected = 0
        # statuses that arrived on the stream before the REST response named the order
        self._early: dict[int, list[str]] = {}

    def add(self, o: TrackedOrder) -> None:
        self.orders[o.order_id] = o
        self.by_client[o.client_id] = o.order_id
        log.info("order_state", client_id=o.client_id, order_id=o.order_id, purpose=o.purpose, to=o.status)
        for status in self._early.pop(o.order_id, ()):
            self.transition(o.order_id, status)

    def transition(self, order_id: int, status: str) -> TrackedOrder | None:
        o = self.orders.get(order_id)
        if o is None:
            early = self._early.setdefault(order_id, [])
            if len(early) < 16:
                early.append(status)
            return None
        if o.status == status:
            return o
        ok = status in ALLOWED.get(o.status, frozenset())
        if not ok:
            self.unexpected += 1
        (log.info if ok else log.warning)(
            "order_state" if ok else "order_state_unexpected",
            client_id=o.client_id,
            order_id=order_id,
            purpose=o.purpose,
            **{"from": o.status, "to": status},
        )
        o.status = status
        return o

    def working(self) -> list[TrackedOrder]:
        return [o for o in self.orders.values() if o.status not in TERMINAL]


class TradovateBroker:
    name = "tradovate"

    def __init__(
        self,
        settings: Settings,
        rest: TradovateRest,
        run_tag: str,
        known_client_ids: frozenset[str] = frozenset(),
        fills_after_ns: int = -1,
    ) -> None:
        """``known_client_ids``: orders this run sent before a restart (from the journal);
        ``fills_after_ns``: the broker's fills up to this time are already in the journal."""
        self.settings = settings
        self.cfg = settings.tradovate
        self.rest = rest
        self.run_tag = run_tag
        self.known_client_ids = known_client_ids
        self.fills_after_ns = fills_after_ns
        inst = settings.instrument
        self.grid = TickGrid(inst.tick_size)
        self.commission = inst.commission_per_side_usd
        self.book = OrderBook()
        self.working_stop: float | None = None
        self.stop_order_id: int | None = None
        self.position = 0  # the broker's net position (from its position events)
        self.fill_position = 0  # the position after the fills reported so far (reconcile + fills)
        self.disconnected_at: float | None = time.monotonic()
        self.net_price = 0.0
        self.last_price = 0.0
        self.account_id = 0
        self.account_spec = ""
        self.contract_id = 0
        self.connected = False
        self.reconciles = 0
        self.rejects = 0
        self.adopted_orders = 0  # ambiguous sends found placed (not resent)
        self.reconnects = 0
        self._events: list[BrokerEvent] = []
        self._seen_fills: set[int] = set()
        self._stop_seq = 0
        self._children: dict[int, int] = {}  # entry order id → its bracket stop's order id
        self._socket: TradovateSocket | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.rest.start()
        accounts = await self.rest.get("/account/list")
        mine = [a for a in accounts or [] if not self.cfg.account or a.get("name") == self.cfg.account]
        if len(mine) != 1:
            names = [a.get("name") for a in accounts or []]
            raise TradovateError(
                f"tradovate.account: {self.cfg.account!r} does not pick one account of {names}"
                if self.cfg.account
                else f"tradovate.account: the user has {len(names)} accounts {names}; name one"
            )
        self.account_id, self.account_spec = int(mine[0]["id"]), str(mine[0]["name"])
        contract = await self.rest.get("/contract/find", {"name": self.cfg.symbol})
        if not isinstance(contract, dict) or "id" not in contract:
            raise TradovateError(f"tradovate.symbol: contract {self.cfg.symbol!r} not found")
        self.contract_id = int(contract["id"])
        await self._connect()
        await self.reconcile("start")
        self._supervisor = asyncio.create_task(self._supervise(), name="tradovate-user")
        log.info("broker_ready", account=self.account_spec, contract=self.cfg.symbol, position=self.position)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._socket is not None:
            await self._socket.close()
        self.connected = False
        self.disconnected_at = time.monotonic()

    async def _connect(self) -> None:
        tok = self.rest.token
        assert tok is not None
        sock = TradovateSocket(self.rest.ws_url, self.cfg, "user", self._on_event)
        try:
            await sock.connect(self.rest.session, tok.access.get_secret_value())
        except TradovateError:
            await self.rest.authenticate()
            raise
        body = {
            "splitResponses": True,
            "accounts": [self.account_id],
            "entityTypes": ["order", "fill", "position"],
        }
        await sock.request("user/syncrequest", body)
        self._socket = sock
        self.connected = True
        self.disconnected_at = None

    async def _supervise(self) -> None:
        while True:
            sock = self._socket
            assert sock is not None
            await sock.closed.wait()
            self.connected = False
            self.disconnected_at = time.monotonic()
            self.reconnects += 1
            log.warning("user_connection_lost", reason=sock.close_reason)
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((SocketClosed, TransientError, RateLimited, RequestFailed)),
                wait=wait_exponential_jitter(
                    multiplier=self.cfg.reconnect_initial_s,
                    max=self.cfg.reconnect_max_s,
                    jitter=self.cfg.reconnect_initial_s,
                ),
            ):
                with attempt:
                    await self._connect()
            await self.reconcile("reconnect")

    # -- orders -------------------------------------------------------------------------------------
    def in_flight(self) -> list[TrackedOrder]:
        """Market orders sent and not yet completely filled or ended."""
        return [o for o in self.book.working() if o.purpose not in ("stop", "adopted") and o.filled < o.qty]

    async def submit(self, intent: OrderIntent) -> None:
        side = "Buy" if intent.side == Side.BUY else "Sell"
        if intent.purpose.startswith("flatten"):
            await self._liquidate(intent)
            return
        busy = self.in_flight()
        if busy:
            # the position is about to change: acting on the old one could double it
            log.warning("order_skipped_in_flight", client_id=intent.client_id, waiting_for=busy[0].client_id)
            self._events.append(OrderRejected(intent.client_id, f"not sent: {busy[0].client_id} in flight"))
            return
        qty = intent.qty
        if intent.purpose.startswith("exit"):
            # exits close what the broker holds now, never more (a stop may have closed it already)
            qty = min(qty, abs(self.position)) if self.position * int(intent.side) < 0 else 0
            if qty == 0:
                log.info("exit_skipped_flat", client_id=intent.client_id)
                return
        body: dict[str, Any] = {
            "accountSpec": self.account_spec,
            "accountId": self.account_id,
            "clOrdId": intent.client_id,
            "action": side,
            "symbol": self.cfg.symbol,
            "orderQty": qty,
            "orderType": "Market",
            "isAutomated": True,
        }
        path = "/order/placeorder"
        stop_price = None
        if intent.stop_ticks > 0 and self.last_price > 0:
            sgn = int(intent.side)
            stop_price = self.grid.round(self.last_price - sgn * intent.stop_ticks * self.grid.tick_size)
            body["bracket1"] = {
                "action": "Sell" if sgn > 0 else "Buy",
                "orderType": "Stop",
                "stopPrice": stop_price,
            }
            path = "/order/placeoso"
        result = await self._place_new(path, body)
        if result is None:
            return
        self.book.add(
            TrackedOrder(int(result["orderId"]), intent.client_id, intent.purpose, intent.side, qty)
        )
        if result.get("oso1Id"):
            self._track_stop(int(result["oso1Id"]), f"{intent.client_id}-stop", intent, qty, stop_price)

    def _track_stop(
        self, order_id: int, client_id: str, intent: OrderIntent | None, qty: int, price: float | None
    ) -> None:
        side = Side.SELL if (intent.side if intent else Side.BUY) == Side.BUY else Side.BUY
        self.book.add(TrackedOrder(order_id, client_id, "stop", side, qty))
        self.stop_order_id = order_id
        self.working_stop = price

    async def _place_new(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Send a new order at most once in effect. Returns the result, or None if refused."""
        cid = body["clOrdId"]
        if cid in self.known_client_ids:
            # journaled before a restart (a bar that failed after sending): placed already?
            found = await self._find_placed(cid)
            if found is not None:
                self.adopted_orders += 1
                log.warning("order_found_from_before_restart", client_id=cid, order_id=found)
                return {"orderId": found, **self._bracket_of(found)}
        deadline = time.monotonic() + self.cfg.order_retry_s
        attempt = 0
        while True:
            attempt += 1
            try:
                r = await self.rest.post(path, body)
            except RateLimited:
                pass  # not executed
            except TransientError as exc:
                log.warning("order_send_failed", client_id=cid, error=str(exc), ambiguous=exc.ambiguous)
                if exc.ambiguous:
                    found = await self._find_placed(cid)
                    if found is not None:
                        self.adopted_orders += 1
                        log.warning("order_found_after_ambiguous_send", client_id=cid, order_id=found)
                        return {"orderId": found, **self._bracket_of(found)}
            except (PenaltyError, RejectedError) as exc:
                self._refused(cid, str(exc))
                return None
            else:
                if not isinstance(r, dict) or r.get("failureReason") or not r.get("orderId"):
                    why = r.get("failureText") or r.get("failureReason") if isinstance(r, dict) else r
                    self._refused(cid, str(why))
                    return None
                return r
            if time.monotonic() > deadline:
                self._events.append(
                    BrokerProblem(f"order {cid} could not be sent within {self.cfg.order_retry_s}s")
                )
                log.error("order_send_gave_up", client_id=cid, attempts=attempt)
                return None
            await asyncio.sleep(min(2.0, 0.2 * 2 ** (attempt - 1)))

    def _bracket_of(self, order_id: int) -> dict[str, Any]:
        child = self._children.get(order_id)
        return {"oso1Id": child} if child else {}

    async def _find_placed(self, client_id: str) -> int | None:
        """Was an order with this client id placed? (``command/list`` carries ``clOrdId``.)"""
        try:
            commands = await self.rest.get("/command/list")
            orders = await self.rest.get("/order/list")
        except TradovateError as exc:
            log.warning("order_lookup_failed", client_id=client_id, error=str(exc))
            return None
        for c in commands or []:
            if c.get("clOrdId") == client_id and c.get("orderId"):
                oid = int(c["orderId"])
                for o in orders or []:
                    if o.get("parentId") == oid:
                        self._children[oid] = int(o["id"])
                return oid
        return None

    def _refused(self, client_id: str, why: str) -> None:
        self.rejects += 1
        self._events.append(OrderRejected(client_id, why))

    async def _liquidate(self, intent: OrderIntent) -> None:
        body = {"accountId": self.account_id, "contractId": self.contract_id, "admin": False}
        r = await self.rest.retrying(lambda: self.rest.post("/order/liquidateposition", body), safe=True)
        oid = r.get("orderId") if isinstance(r, dict) else None
        if oid:
            self.book.add(
                TrackedOrder(int(oid), intent.client_id, intent.purpose, intent.side, abs(self.position))
            )
        log.warning("position_liquidated", client_id=intent.client_id, reason=intent.purpose, order_id=oid)

    async def set_stop(self, stop_price: float | None) -> None:
        sid = self.stop_order_id
        live = (
            sid is not None
            and self.book.orders.get(sid) is not None
            and self.book.orders[sid].status not in TERMINAL
        )
        if stop_price is None:
            if live:
                assert sid is not None
                await self._safe("/order/cancelorder", {"orderId": sid, "isAutomated": True})
            self.working_stop, self.stop_order_id = None, None
            return
        price = self.grid.round(stop_price)
        qty = abs(self.position)
        if live:
            assert sid is not None
            body = {
                "orderId": sid,
                "orderQty": qty or self.book.orders[sid].qty,
                "orderType": "Stop",
                "stopPrice": price,
                "isAutomated": True,
            }
            if await self._safe("/order/modifyorder", body):
                self.working_stop = price
            return
        if qty == 0:
            return
        self._stop_seq += 1
        cid = f"{self.run_tag}-stop-{self._stop_seq}"
        side = Side.SELL if self.position > 0 else Side.BUY
        body2: dict[str, Any] = {
            "accountSpec": self.account_spec,
            "accountId": self.account_id,
            "clOrdId": cid,
            "action": "Sell" if side == Side.SELL else "Buy",
            "symbol": self.cfg.symbol,
            "orderQty": qty,
            "orderType": "Stop",
            "stopPrice": price,
            "isAutomated": True,
        }
        r = await self._place_new("/order/placeorder", body2)
        if r is not None:
            self.book.add(TrackedOrder(int(r["orderId"]), cid, "stop", side, qty))
            self.stop_order_id, self.working_stop = int(r["orderId"]), price

    async def _safe(self, path: str, body: dict[str, Any]) -> bool:
        """A request that is safe to repeat (modify, cancel): retried on transient errors."""
        try:
            r = await self.rest.retrying(lambda: self.rest.post(path, body), safe=True)
        except TradovateError as exc:
            log.error("order_request_failed", path=path, order_id=body.get("orderId"), error=str(exc))
            return False
        if isinstance(r, dict) and r.get("failureReason"):
            log.warning(
                "order_request_refused", path=path, order_id=body.get("orderId"), reason=r.get("failureText")
            )
            return False
        return True

    async def flatten_now(self, intent: OrderIntent, last_bar: Bar) -> None:
        await self._liquidate(intent)

    async def cancel_entries(self) -> list[str]:
        """Entries are market orders (filled at once); nothing waits to be cancelled."""
        return []

    def on_bar(self, bar: Bar) -> None:
        self.last_price = bar.close

    def drain_events(self) -> list[BrokerEvent]:
        if not self._events:
            return []
        out, self._events = self._events, []
        return out

    def health(self) -> ComponentHealth:
        down = self.disconnected_at
        return ComponentHealth(
            "tradovate",
            self.connected,
            0.0 if down is None else time.monotonic() - down,
            (
                ("reconciles", self.reconciles),
                ("reconnects", self.reconnects),
                ("rejects", self.rejects),
                ("orders_found_after_ambiguous_send", self.adopted_orders),
            ),
        )

    # -- events -------------------------------------------------------------------------------------
    def _on_event(self, m: dict[str, Any]) -> None:
        if m.get("e") != "props":
            return
        d = m["d"]
        entity, kind = d["entity"], d["entityType"]
        if kind == "order" and int(entity.get("accountId", self.account_id)) == self.account_id:
            self.book.transition(int(entity["id"]), str(entity["ordStatus"]))
        elif kind == "fill":
            self._on_fill(entity)
        elif kind == "position" and int(entity.get("contractId", 0)) == self.contract_id:
            self.position = int(entity.get("netPos") or 0)
            self.net_price = float(entity.get("netPrice") or 0.0)

    def _on_fill(self, f: dict[str, Any]) -> None:
        fid = int(f["id"])
        if fid in self._seen_fills or int(f.get("contractId", self.contract_id)) != self.contract_id:
            return
        self._seen_fills.add(fid)
        oid = int(f["orderId"])
        o = self.book.orders.get(oid)
        side = Side.BUY if f["action"] == "Buy" else Side.SELL
        qty = int(f["qty"])
        if o is not None:
            o.filled += qty
            cid, purpose = o.client_id, o.purpose
        else:
            cid, purpose = f"broker-{oid}", "external"
            log.warning("fill_unknown_order", order_id=oid, qty=qty)
        fill = Fill(
            cid,
            iso_to_ns(str(f["timestamp"])),
            side,
            qty,
            self.grid.round(float(f["price"])),
            self.commission * qty,
            purpose,
        )
        self._events.append(fill)
        self.fill_position += int(side) * qty
        if self.fill_position == 0:
            self.working_stop, self.stop_order_id = None, None
        log.info(
            "fill", client_id=cid, order_id=oid, side=int(side), qty=qty, price=fill.price, purpose=purpose
        )

    # -- reconciliation -----------------------------------------------------------------------------
    async def reconcile(self, why: str) -> None:
        """Compare the broker's position, working orders and fills with what this process knows."""
        orders = await self.rest.get("/order/list")
        fills = await self.rest.get("/fill/list")
        commands = await self.rest.get("/command/list")
        positions = await self.rest.get("/position/list")  # last: no fill lands after it unseen
        self.reconciles += 1
        by_order_cid = {int(c["orderId"]): c.get("clOrdId") for c in commands or [] if c.get("orderId")}
        known = self.known_client_ids
        mine = lambda cid: bool(cid) and (cid in known or str(cid).startswith(self.run_tag))  # noqa: E731
        # our orders this process has not tracked yet (placed before a restart, or while a send was
        # ambiguous): take them into the book
        for o in orders or []:
            oid = int(o["id"])
            if int(o.get("contractId", 0)) != self.contract_id or oid in self.book.orders:
                continue
            cid = by_order_cid.get(oid) or by_order_cid.get(int(o.get("parentId") or 0))
            if mine(cid):
                parent = o.get("parentId")
                purpose = "stop" if parent or "-stop" in str(cid) else "entry"
                tracked = TrackedOrder(
                    oid,
                    f"{cid}-stop" if parent else str(cid),
                    purpose,
                    Side.BUY if o["action"] == "Buy" else Side.SELL,
                    0,
                    str(o["ordStatus"]),
                )
                self.book.orders[oid] = tracked
                if purpose == "stop" and tracked.status not in TERMINAL:
                    self.stop_order_id = oid
        # fills of our orders not seen yet (while disconnected)
        for f in sorted(fills or [], key=lambda x: str(x.get("timestamp"))):
            fid = int(f["id"])
            if fid in self._seen_fills:
                continue
            if (
                iso_to_ns(str(f["timestamp"])) <= self.fills_after_ns
                or int(f["orderId"]) not in self.book.orders
            ):
                self._seen_fills.add(fid)  # before this run's journal, or not ours: counted below
                continue
            self._on_fill(f)
        pos = next((p for p in positions or [] if int(p.get("contractId", 0)) == self.contract_id), None)
        broker_pos = int(pos.get("netPos") or 0) if pos else 0
        self.position = self.fill_position = broker_pos
        self.net_price = float(pos.get("netPrice") or 0.0) if pos else 0.0
        unknown = [
            int(o["id"])
            for o in orders or []
            if int(o.get("contractId", 0)) == self.contract_id
            and o.get("ordStatus") not in TERMINAL
            and int(o["id"]) not in self.book.orders
        ]
        if unknown and self.cfg.adopt_broker_state:
            for o in orders or []:
                if int(o["id"]) in unknown:
                    side = Side.BUY if o["action"] == "Buy" else Side.SELL
                    self.book.add(
                        TrackedOrder(
                            int(o["id"]), f"broker-{o['id']}", "adopted", side, 0, str(o["ordStatus"])
                        )
                    )
        stop = self._stop_price_of(orders or [])
        if stop is not None:
            self.working_stop = stop
        self._events.append(
            ReconcileReport(why, broker_pos, self.net_price, self.working_stop, tuple(unknown))
        )
        log.info(
            "broker_report", why=why, position=broker_pos, working=len(self.book.working()), unknown=unknown
        )

    def _stop_price_of(self, orders: list[dict[str, Any]]) -> float | None:
        """The working stop's price as the broker lists it (``stopPrice`` when the list has it)."""
        sid = self.stop_order_id
        for o in orders:
            if sid is not None and int(o["id"]) == sid and o.get("stopPrice") is not None:
                return self.grid.round(float(o["stopPrice"]))
        return None
