"""Live broker: Tradovate order routing over REST, order/fill/position events over the user-data
WebSocket (``user/syncrequest``), reconciliation at start, after every reconnect and after any
surprise.

Off the bar loop
  ``submit``, ``set_stop`` and a flatten only queue a job and return: one worker task sends the
  jobs in order, with their retries and back-off, beside the bar loop, and the engine learns the
  outcome as events (fills, refusals, problems, blocks) at its next ``drain_events``. A slow or
  refused request never delays a later decision (issue 14, item 8).

Orders (Tradovate OpenAPI spec 2026-08; partner docs "best practices")
  * an entry with a protective stop is one OSO request (``order/placeoso``: a market entry and a
    ``bracket1`` stop the server holds from the moment the entry fills); the stop sits
    ``stop_ticks`` from the decision bar's close; an add to a position sends no second stop
    (the one stop's quantity is modified instead);
  * MOVE_TO_BE and trailing modify that stop (``order/modifyorder``); ``None`` cancels it;
  * exits and flatten are ``order/liquidateposition``: one request that cancels the contract's
    working orders (our stop among them) and closes the position, its result checked. A market
    exit beside a working stop could fill both; a stop cancelled first would leave the position
    bare if the exit were then refused or rate limited. So a trader's own orders on this contract
    are cancelled too: the account's contract is the daemon's (see reconciliation);
  * an entry, add or reversal carries the position it was decided on; one that finds the
    position changed when it can go out (a fill that was on its way, a stop) is not sent;
  * every order carries ``isAutomated: true`` ("MUST include isAutomated: true for all automated
    orders"; the bracket object has no such field) and an explicit ``timeInForce``: the server's
    default is not documented and Tradovate's own C# sample always sets it; protective stops use
    ``tradovate.stop_time_in_force`` (GTC by default, so a stop does not expire at the session
    close; a stop that expires anyway is replaced), market orders Day;
  * a result is a success when ``failureReason`` is absent, empty or ``"Success"`` (the spec's
    enum contains ``Success``; both shapes occur), and a refusal for any other value;
  * every new order carries ``clOrdId`` = the engine's client id, derived from (run, bar, intent),
    so a retried request is recognisable.

One protective stop
  A working stop is an order like any other: it stays working when the position goes flat and
  fills whatever the position is. So after every fill and every change of a stop, the worker
  makes the broker hold exactly what the position needs: flat = no stop of ours; otherwise one
  stop on the closing side, for the position's size, at the engine's price; any other stop of
  ours (the bracket of a closed or reversed position, one left from before a restart) is
  cancelled, and an expired or missing stop is placed again. The sync waits for a market order
  on its way (it sets the stops for the position that order leaves), and the broker's stop runs
  it once more, so a flat position never leaves a stop of ours working unwatched.

Retries
  * a penalty ticket: wait and resend with the ticket; HTTP 423: wait ``warning_backoff_s``;
    HTTP 429 or a captcha: a lockout (about an hour): nothing is sent, entries halt
    (:class:`~trader.domain.BrokerBlocked`), working stops stay at the broker, and after it a
    reconcile resyncs and entries resume by themselves;
  * a timeout, 5xx or dropped connection on a *new order* is ambiguous: before sending it again the
    broker looks for its ``clOrdId`` in ``command/list``; found = it was placed (adopted, not
    resent). This is what makes a retry unable to open a second position;
  * modify, cancel and liquidate are safe to repeat and are retried with back-off and jitter.

State
  Fills come only from the broker's events (deduplicated by fill id; partial fills are separate
  fills; ``entity`` may be one object or an array; a fill with ``active: false`` is a busted trade:
  never applied, and one already applied raises a problem and a reconcile), so the engine's
  portfolio follows what actually executed. Every order status change goes through
  :class:`OrderBook`, which logs each transition. Reconciliation compares the broker's position
  and working orders with the engine's; a mismatch halts entries (``mismatch``) unless
  ``tradovate.adopt_broker_state``, in which case the broker's position and stop are adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from trader.adapters.tradovate.protocol import iso_to_ns
from trader.adapters.tradovate.rest import (
    AuthError,
    RateLimited,
    RejectedError,
    TradovateError,
    TradovateRest,
    TransientError,
    reconnecting,
)
from trader.adapters.tradovate.socket import SocketClosed, TradovateSocket
from trader.config import Settings
from trader.domain import (
    Bar,
    BrokerBlocked,
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
    price: float | None = None  # a stop's price as last sent
    parent: int | None = None  # a bracket stop's entry order


class OrderBook:
    """The broker's orders as this process knows them; the one place statuses change."""

    def __init__(self) -> None:
        self.orders: dict[int, TrackedOrder] = {}
        self.by_client: dict[str, int] = {}
        self.unexpected = 0
        # statuses that arrived on the stream before the REST response named the order
        self._early: dict[int, list[str]] = {}

    def add(self, o: TrackedOrder) -> None:
        old = self.orders.get(o.order_id)
        if old is not None:  # taken in by a reconcile meanwhile: keep what it learned
            o.filled = max(o.filled, old.filled)
            if old.status != "Sent":
                o.status = old.status
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


SUCCESS = (None, "", "Success")  # failureReason of an accepted request (absent, empty or "Success")
Job = Callable[[], Awaitable[None]]


def accepted(result: object) -> bool:
    """A PlaceOrderResult / PlaceOsoResult / CommandResult that reports success."""
    return isinstance(result, dict) and result.get("failureReason") in SUCCESS


def refusal(result: object) -> str:
    if not isinstance(result, dict):
        return f"unexpected result {str(result)[:120]!r}"
    return str(result.get("failureText") or result.get("failureReason") or "refused")


def entities(d: dict[str, Any]) -> list[dict[str, Any]]:
    """A props event's ``entity``: one object or an array of them."""
    e = d["entity"]
    items = e if isinstance(e, list) else [e]
    if not all(isinstance(x, dict) for x in items):
        raise TypeError("props entity is not an object or an array of objects")
    return items


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
        self.stops_cancelled = 0  # stops of ours left over (closed or reversed position) cancelled
        self.stops_replaced = 0  # a protective stop missing (expired, say) placed again
        self.busted_fills = 0
        self.problems = 0
        self._events: list[BrokerEvent] = []
        self._seen_fills: set[int] = set()
        self._stop_seq = 0
        self._bar_seq = 0  # bars seen: an order decided on an older bar is not sent
        self._stop_target: float | None = None  # the engine's stop price for the open position
        self._children: dict[int, int] = {}  # entry order id → its bracket stop's order id
        self._early_fills: dict[int, list[dict[str, Any]]] = {}  # fills before their order's result
        self._sending = False
        self._socket: TradovateSocket | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._jobs: asyncio.Queue[tuple[str, Job]] = asyncio.Queue()
        self._sync_queued = False
        self._resync = False  # a limit stopped a job: reconcile and resync when it has passed
        self._reconcile_queued = False
        self._reconcile_why = ""
        self._fill_seq = 0  # fills applied (a reconcile notices fills that arrive during it)
        self._blocked_sent = ""

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
        self._worker = asyncio.create_task(self._work(), name="tradovate-orders")
        self._watcher = asyncio.create_task(self._watch_lockout(), name="tradovate-lockout")
        self._want_sync()
        log.info("broker_ready", account=self.account_spec, contract=self.cfg.symbol, position=self.position)

    async def settle(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued job has been done (False if ``timeout_s`` passed first)."""
        if self._worker is None:
            return True
        try:
            await asyncio.wait_for(self._jobs.join(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        """Finish the queued jobs (bounded), then stop the worker, the supervisor and the socket."""
        if not await self.settle(self.cfg.order_retry_s + 2 * self.cfg.request_timeout_s):
            log.error("broker_jobs_unfinished_at_stop", queued=self._jobs.qsize())
        # a market order just sent fills at once, but its fill can come after the answer: wait
        # for it (bounded) so the journal gets it now rather than at the next start's reconcile
        await self._wait_in_flight()
        if self.in_flight():
            log.warning(
                "broker_stopped_with_orders_in_flight", orders=[o.client_id for o in self.in_flight()]
            )
        # the fills just waited for queue a stop sync: a flat position must not leave a stop of
        # ours working at the broker while nobody watches it (it would open a position)
        if not await self.settle(2 * self.cfg.request_timeout_s):
            log.error("broker_jobs_unfinished_at_stop", queued=self._jobs.qsize())
        left = [o.order_id for o in self.book.working() if o.purpose == "stop"]
        if self.fill_position == 0 and left:
            log.error("stopped_with_a_stop_and_no_position", stops=left)
        for name in ("_worker", "_watcher", "_supervisor"):
            task = getattr(self, name)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                setattr(self, name, None)
        if self._socket is not None:
            await self._socket.close()
        self.connected = False
        self.disconnected_at = time.monotonic()

    async def _connect(self) -> None:
        self.rest.gate.check("user connect")
        tok = self.rest.token or await self.rest.authenticate()
        sock = TradovateSocket(self.rest.ws_url, self.cfg, "user", self._on_event, self.rest.gate)
        try:
            await sock.connect(self.rest.session, tok.access.get_secret_value())
        except AuthError:
            # refused (a session closed from outside): one refresh, shared with the md socket
            await self.rest.refresh(tok)
            raise SocketClosed("user: authorization refused; token refreshed") from None
        body = {
            "splitResponses": True,
            "accounts": [self.account_id],
            "entityTypes": ["order", "fill", "position"],
        }
        try:
            await sock.request("user/syncrequest", body)
        except BaseException:
            await sock.close()
            raise
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
            # anything: user data must come back (a bad answer is retried, logged, not fatal)
            async for attempt in reconnecting(self.cfg, "user_reconnect_wait", Exception):
                with attempt:
                    await self._connect()
            # on the worker, like every other broker call: never beside a send in progress
            self._queue_reconcile("reconnect")

    # -- the worker ---------------------------------------------------------------------------------
    def _queue(self, label: str, job: Job) -> None:
        self._jobs.put_nowait((label, job))

    def _want_sync(self) -> None:
        """Make the broker's stops match the position (after a fill, a stop's end, a reconcile)."""
        if not self._sync_queued:
            self._sync_queued = True
            self._queue("sync_stops", self._sync_stops)

    async def _work(self) -> None:
        while True:
            label, job = await self._jobs.get()
            try:
                if label == "sync_stops":
                    self._sync_queued = False
                await job()
            except asyncio.CancelledError:
                raise
            except RateLimited as exc:
                self._resync = True  # redone when the limit has passed
                log.error("broker_job_not_sent", job=label, error=str(exc))
            except Exception as exc:
                self._problem(f"{label}: {type(exc).__name__}: {exc}")
                log.exception("broker_job_failed", job=label)
            finally:
                self._jobs.task_done()

    def _limited(self) -> bool:
        """A lockout or a 423 back-off is in force: nothing can be sent now."""
        now, gate = time.monotonic(), self.rest.gate
        return now < gate.locked_until or now < gate.slow_until

    async def _watch_lockout(self) -> None:
        """Once a second: when a limit (lockout, 423 back-off) stopped a job, reconcile once it
        has passed (what happened meanwhile) and put the stop right; entries resume with the
        cleared block."""
        while True:
            await asyncio.sleep(1.0)
            if self._resync and not self._limited() and self.connected:
                self._resync = False
                log.info("tradovate_limit_over_reconciling")
                self._queue_reconcile("lockout_end")

    def _queue_reconcile(self, why: str) -> None:
        """A reconcile on the worker; at most one waiting at a time (problems can come in bursts)."""
        self._reconcile_why = why  # the latest reason names the one waiting
        if self._reconcile_queued:
            return
        self._reconcile_queued = True

        async def job() -> None:
            self._reconcile_queued = False
            await self.reconcile(self._reconcile_why)

        self._queue("reconcile", job)

    def _problem(self, text: str) -> None:
        """Something left the broker's state uncertain: entries halt until a reconcile agrees,
        and one is queued now."""
        self.problems += 1
        self._events.append(BrokerProblem(text))
        self._queue_reconcile("problem")

    # -- orders -------------------------------------------------------------------------------------
    def in_flight(self) -> list[TrackedOrder]:
        """Market orders sent and not yet completely filled or ended."""
        return [o for o in self.book.working() if o.purpose not in ("stop", "adopted") and o.filled < o.qty]

    async def _wait_in_flight(self, bar: int | None = None) -> None:
        """Wait (at most ``request_timeout_s``) until no market order is in flight: while the
        user socket is up to tell, and, given the bar an order was decided on, while it is the
        latest."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            if (bar is None and not self.connected) or (bar is not None and bar != self._bar_seq):
                return
            await asyncio.sleep(0.02)

    async def submit(self, intent: OrderIntent) -> None:
        """Queue the order (sent by the worker, in order); the outcome comes back as events."""
        if intent.purpose.startswith("flatten"):
            self._queue(f"liquidate {intent.client_id}", lambda: self._liquidate(intent))
            return
        stop_price = None
        if intent.stop_ticks > 0 and self.last_price > 0:
            sgn = int(intent.side)
            stop_price = self.grid.round(self.last_price - sgn * intent.stop_ticks * self.grid.tick_size)
        bar = self._bar_seq
        self._queue(f"order {intent.client_id}", lambda: self._send_order(intent, stop_price, bar))

    def _stale(self, cid: str, bar: int | None) -> bool:
        """A newer bar arrived before this order could go out (the worker was busy with a retry):
        the decision was made on prices that are gone, and the engine decides again on this bar."""
        if bar is None or bar == self._bar_seq:
            return False
        log.warning("order_not_sent_stale", client_id=cid, bars_late=self._bar_seq - bar)
        self._refused(cid, f"not sent: decided {self._bar_seq - bar} bar(s) ago")
        return True

    async def _send_order(self, intent: OrderIntent, stop_price: float | None, bar: int) -> None:
        cid = intent.client_id
        # a market order sent just before (an exit ahead of a same-bar entry) is still filling:
        # wait for its fill, briefly, rather than act on a position that is about to change
        await self._wait_in_flight(bar)
        if self._stale(cid, bar):
            return
        busy = self.in_flight()
        if busy:
            # the position is about to change: acting on the old one could double it
            log.warning("order_skipped_in_flight", client_id=cid, waiting_for=busy[0].client_id)
            self._refused(cid, f"not sent: {busy[0].client_id} in flight")
            return
        qty, sgn = intent.qty, int(intent.side)
        if intent.purpose.startswith("exit"):
            # An exit closes the position the broker holds (a stop may have closed it already),
            # and the contract's working orders, our stop among them, go in the same request
            # (order/liquidateposition). A market exit beside a working stop can fill both, a stop
            # filling whatever the position; cancelling the stop first would leave the position
            # bare whenever the exit is then refused or rate limited (an hour's lockout).
            held = self.fill_position
            if held * sgn >= 0:
                log.info("exit_skipped_flat", client_id=cid)
                self._refused(cid, "not sent: the broker's position is already flat")
                self._want_sync()
                return
            await self._liquidate(intent)
            return
        if intent.position_before is not None and self.fill_position != intent.position_before:
            # decided on a position that has changed since (a fill that was on its way, a stop):
            # this order would be a guess; the engine decides again on the next bar
            log.warning(
                "order_skipped_position_changed",
                client_id=cid,
                decided_at=intent.position_before,
                position=self.fill_position,
            )
            self._refused(
                cid,
                f"not sent: the position is {self.fill_position}, "
                f"the decision was made at {intent.position_before}",
            )
            return
        body: dict[str, Any] = {
            "accountSpec": self.account_spec,
            "accountId": self.account_id,
            "clOrdId": cid,
            "action": "Buy" if sgn > 0 else "Sell",
            "symbol": self.cfg.symbol,
            "orderQty": qty,
            "orderType": "Market",
            "timeInForce": "Day",
            "isAutomated": True,
        }
        path = "/order/placeorder"
        adding = self.fill_position * sgn > 0 and self._live_stop() is not None
        if stop_price is not None and not adding:
            body["bracket1"] = {
                "action": "Sell" if sgn > 0 else "Buy",
                "orderType": "Stop",
                "stopPrice": stop_price,
                "timeInForce": self.cfg.stop_time_in_force,
            }
            path = "/order/placeoso"
        result = await self._sending_new(path, body, bar)
        if result is None:
            self._flush_early_fills()
            return
        if result.get("oso1Id"):
            stop_side = Side.SELL if sgn > 0 else Side.BUY
            self._track_stop(
                int(result["oso1Id"]),
                f"{cid}-stop",
                stop_side,
                qty,
                stop_price,
                parent=int(result["orderId"]),
            )
            self._stop_target = stop_price
        self.book.add(TrackedOrder(int(result["orderId"]), cid, intent.purpose, intent.side, qty))
        self._flush_early_fills()

    async def _sending_new(self, path: str, body: dict[str, Any], bar: int | None) -> dict[str, Any] | None:
        """:meth:`_place_new` with the fills that arrive before its answer held for it."""
        self._sending = True
        try:
            return await self._place_new(path, body, bar)
        except BaseException:
            self._sending = False
            self._flush_early_fills()
            raise
        finally:
            self._sending = False

    def _flush_early_fills(self) -> None:
        """Fills held while a send was in progress: those of orders now known are applied; any
        other (another app's order, a send that failed) is applied as an outside fill and checked
        by a reconcile, never dropped."""
        held, self._early_fills = self._early_fills, {}
        strangers = False
        for oid, fills in held.items():
            strangers = strangers or oid not in self.book.orders
            for f in fills:
                self._on_fill(f)
        if strangers:
            self._queue_reconcile("fills_of_unknown_orders")

    def _track_stop(
        self,
        order_id: int,
        client_id: str,
        side: Side,
        qty: int,
        price: float | None,
        parent: int | None = None,
    ) -> None:
        self.book.add(TrackedOrder(order_id, client_id, "stop", side, qty, price=price, parent=parent))
        self.stop_order_id = order_id
        self.working_stop = price

    async def _place_new(
        self, path: str, body: dict[str, Any], bar: int | None = None
    ) -> dict[str, Any] | None:
        """Send a new order at most once in effect. Returns the result, or None if refused or
        not sent. ``bar``: the bar it was decided on (an entry or exit is not sent late)."""
        cid = body["clOrdId"]
        if cid in self.known_client_ids:
            # journaled before a restart (a bar that failed after sending): placed already?
            known, found = await self._lookup(cid)
            if not known:
                return None
            if found is not None:
                self.adopted_orders += 1
                log.warning("order_found_from_before_restart", client_id=cid, order_id=found)
                return {"orderId": found, **self._bracket_of(found)}
        deadline = time.monotonic() + self.cfg.order_retry_s
        attempt = 0
        while True:
            attempt += 1
            pause = min(2.0, 0.2 * 2 ** (attempt - 1))
            if self._stale(cid, bar):
                return None
            try:
                r = await self.rest.post(path, body)
            except RateLimited as exc:  # not executed
                if exc.lockout or exc.retry_at > deadline:
                    self._refused(cid, f"not sent: {exc}")
                    raise  # the worker resyncs once the limit has passed
                pause = max(pause, exc.retry_at - time.monotonic())
            except TransientError as exc:
                log.warning("order_send_failed", client_id=cid, error=str(exc), ambiguous=exc.ambiguous)
                if exc.ambiguous:
                    known, found = await self._lookup(cid)
                    if not known:
                        return None
                    if found is not None:
                        self.adopted_orders += 1
                        log.warning("order_found_after_ambiguous_send", client_id=cid, order_id=found)
                        return {"orderId": found, **self._bracket_of(found)}
            except RejectedError as exc:
                self._refused(cid, str(exc))
                return None
            else:
                if not accepted(r):
                    self._refused(cid, refusal(r))
                    return None
                if not r.get("orderId"):
                    # a success without an order id: look the client id up rather than guess
                    known, found = await self._lookup(cid)
                    if not known:
                        return None
                    if found is None:
                        self._refused(cid, f"accepted without an orderId and not found: {str(r)[:120]}")
                        return None
                    return {"orderId": found, **self._bracket_of(found)}
                return r
            if time.monotonic() + pause > deadline:
                self._problem(f"order {cid} could not be sent within {self.cfg.order_retry_s}s")
                log.error("order_send_gave_up", client_id=cid, attempts=attempt)
                return None
            await asyncio.sleep(pause)

    async def _lookup(self, cid: str) -> tuple[bool, int | None]:
        """(known, order id) from :meth:`_find_placed`; not known when the broker cannot say: then
        the order is never sent again (it may be working); a problem halts entries and a
        reconcile takes it into the book by its client id if it was placed."""
        try:
            return True, await self._find_placed(cid)
        except TradovateError as exc:
            log.error("order_lookup_failed", client_id=cid, error=str(exc))
            self._problem(f"order {cid}: sent, outcome unknown (lookup failed: {exc}); not sent again")
            return False, None

    def _bracket_of(self, order_id: int) -> dict[str, Any]:
        child = self._children.get(order_id)
        return {"oso1Id": child} if child else {}

    async def _find_placed(self, client_id: str) -> int | None:
        """Was an order with this client id placed? (``command/list`` carries ``clOrdId``.)
        Raises when the broker cannot be asked."""
        commands = await self.rest.get("/command/list")
        orders = await self.rest.get("/order/list")
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
        body = {
            "accountId": self.account_id,
            "contractId": self.contract_id,
            "admin": False,
            "isAutomated": True,
        }
        self._sending = True
        try:
            r = await self.rest.retrying(lambda: self.rest.post("/order/liquidateposition", body), safe=True)
        except TradovateError as exc:
            self._refused(intent.client_id, f"liquidation not sent: {exc}")
            self._problem(f"{intent.purpose} {intent.client_id} could not be sent: {exc}")
            if isinstance(exc, RateLimited):
                self._resync = True
            return
        finally:
            self._sending = False
        if not accepted(r):
            self._refused(intent.client_id, f"liquidation refused: {refusal(r)}")
            self._problem(f"{intent.purpose} {intent.client_id} refused by the broker: {refusal(r)}")
            self._flush_early_fills()
            return
        oid = r.get("orderId")
        if oid:
            self.book.add(
                TrackedOrder(int(oid), intent.client_id, intent.purpose, intent.side, abs(self.fill_position))
            )
        self._flush_early_fills()
        (log.warning if intent.purpose.startswith("flatten") else log.info)(
            "position_liquidated", client_id=intent.client_id, reason=intent.purpose, order_id=oid
        )

    async def set_stop(self, stop_price: float | None) -> None:
        """Queue: move the protective stop to ``stop_price`` (None: cancel it)."""
        price = None if stop_price is None else self.grid.round(stop_price)
        self._stop_target = price
        self.working_stop = price
        if price is None:
            self._queue("cancel_stop", self._cancel_stop)
        else:
            self._want_sync()

    async def _cancel_stop(self) -> None:
        for o in self._our_stops():
            await self._cancel(o, "stop cancelled")
        self.stop_order_id = None

    def _our_stops(self) -> list[TrackedOrder]:
        """Our protective stops that can trigger: not a bracket whose entry has not filled yet
        (the server holds it suspended until then)."""
        return [
            o
            for o in self.book.working()
            if o.purpose == "stop" and not self._pending_bracket(o) and not (o.qty and o.filled >= o.qty)
        ]

    def _pending_bracket(self, o: TrackedOrder) -> bool:
        if o.status == "Suspended":
            return True
        entry = self.book.orders.get(o.parent) if o.parent is not None else None
        return entry is not None and entry.status not in TERMINAL and entry.filled < entry.qty

    def _live_stop(self) -> TrackedOrder | None:
        sid = self.stop_order_id
        o = self.book.orders.get(sid) if sid is not None else None
        return o if o is not None and o.status not in TERMINAL else None

    async def _sync_stops(self) -> None:
        """Make the broker hold exactly the stop the position needs (see the module docstring)."""
        if self._socket is None:
            return
        if self._limited():
            self._resync = True  # redone when the limit has passed
            return
        # a market order on its way changes the position: set the stops for the one it leaves
        # (its fill or its end queues another sync; waited for briefly, as an order is)
        await self._wait_in_flight()
        if self.in_flight():
            log.info("sync_stops_deferred", waiting_for=[o.client_id for o in self.in_flight()])
            return
        pos = self.fill_position
        closing = Side.SELL if pos > 0 else Side.BUY
        keep = self._live_stop() if pos else None
        if keep is not None and keep.side != closing:
            keep = None
        for o in self._our_stops():
            if o is not keep:
                await self._cancel(o, "flat" if pos == 0 else "not the position's stop")
                self.stops_cancelled += 1
                if o.order_id == self.stop_order_id:
                    self.stop_order_id = None
        if pos == 0:
            if self.stop_order_id is None:
                self.working_stop = None
            return
        if keep is None or self._pending_bracket(keep):
            if keep is None and self._stop_target is not None:
                await self._place_stop(self._stop_target, closing, abs(pos))
            return
        target = self._stop_target if self._stop_target is not None else keep.price
        if target is not None and (keep.price != target or keep.qty != abs(pos)):
            body = {
                "orderId": keep.order_id,
                "orderQty": abs(pos),
                "orderType": "Stop",
                "stopPrice": target,
                "timeInForce": self.cfg.stop_time_in_force,
                "isAutomated": True,
            }
            outcome = await self._safe("/order/modifyorder", body)
            if outcome == "ok":
                keep.price, keep.qty = target, abs(pos)
                self.working_stop = target
            elif outcome == "refused":
                # not applied (a stop through the market, say): the working stop is the old one,
                # and the engine hears so from the reconcile the problem queued; not sent again
                self._stop_target = keep.price
                self.working_stop = keep.price

    async def _place_stop(self, price: float, side: Side, qty: int) -> None:
        self._stop_seq += 1
        cid = f"{self.run_tag}-stop-{self._stop_seq}"
        body: dict[str, Any] = {
            "accountSpec": self.account_spec,
            "accountId": self.account_id,
            "clOrdId": cid,
            "action": "Sell" if side == Side.SELL else "Buy",
            "symbol": self.cfg.symbol,
            "orderQty": qty,
            "orderType": "Stop",
            "stopPrice": price,
            "timeInForce": self.cfg.stop_time_in_force,
            "isAutomated": True,
        }
        r = await self._sending_new("/order/placeorder", body, None)
        if r is None:
            self._flush_early_fills()
        else:
            self._track_stop(int(r["orderId"]), cid, side, qty, price)
            self._flush_early_fills()
            self.stops_replaced += 1  # a stop placed on its own: the bracket's was missing
            log.info("stop_placed", client_id=cid, order_id=r["orderId"], price=price, qty=qty)

    async def _cancel(self, o: TrackedOrder, why: str) -> None:
        # refused = it is no longer working (filled or cancelled meanwhile): what a cancel wants,
        # unless it filled, which its fill event says; a reconcile checks either way
        outcome = await self._safe("/order/cancelorder", {"orderId": o.order_id, "isAutomated": True}, False)
        log.info("stop_cancel", order_id=o.order_id, client_id=o.client_id, why=why, outcome=outcome)

    async def _safe(self, path: str, body: dict[str, Any], refusal_is_problem: bool = True) -> str:
        """A request that is safe to repeat (modify, cancel): retried on transient errors and a
        423; a failure (and, for a modify, a refusal) raises a problem (entries halt until a
        reconcile agrees) rather than a guess. Returns "ok", "refused" or "failed"; a limit
        (lockout, 423 beyond the retry time) is raised for the worker to resync after it."""
        try:
            r = await self.rest.retrying(lambda: self.rest.post(path, body), safe=True)
        except RateLimited:
            raise
        except TradovateError as exc:
            self._problem(f"{path} for order {body.get('orderId')} failed: {exc}")
            return "failed"
        if not accepted(r):
            # the order may have just filled or been cancelled: the reconcile will tell
            log.warning("order_request_refused", path=path, order_id=body.get("orderId"), reason=refusal(r))
            if refusal_is_problem:
                self._problem(f"{path} for order {body.get('orderId')} refused: {refusal(r)}")
            else:
                self._queue_reconcile("refused")
            return "refused"
        return "ok"

    async def flatten_now(self, intent: OrderIntent, last_bar: Bar) -> None:
        """Between bars (the service stopping): liquidate and wait for it (bounded)."""
        self._queue(f"liquidate {intent.client_id}", lambda: self._liquidate(intent))
        await self.settle(self.cfg.order_retry_s + 2 * self.cfg.request_timeout_s)

    async def cancel_entries(self) -> list[str]:
        """Entries are market orders (filled at once); nothing waits to be cancelled."""
        return []

    def on_bar(self, bar: Bar) -> None:
        self.last_price = bar.close
        self._bar_seq += 1

    def drain_events(self) -> list[BrokerEvent]:
        blocked = self.rest.blocked()
        if blocked != self._blocked_sent:
            self._blocked_sent = blocked
            self._events.append(BrokerBlocked(blocked))
            (log.error if blocked else log.info)(
                "broker_blocked" if blocked else "broker_unblocked", reason=blocked
            )
        if not self._events:
            return []
        out, self._events = self._events, []
        return out

    def health(self) -> ComponentHealth:
        down = self.disconnected_at
        gate = self.rest.gate
        return ComponentHealth(
            "tradovate",
            self.connected,
            0.0 if down is None else time.monotonic() - down,
            (
                ("reconciles", self.reconciles),
                ("reconnects", self.reconnects),
                ("rejects", self.rejects),
                ("orders_found_after_ambiguous_send", self.adopted_orders),
                ("stops_cancelled", self.stops_cancelled),
                ("stops_replaced", self.stops_replaced),
                ("busted_fills", self.busted_fills),
                ("problems", self.problems),
                ("lockouts", gate.lockouts),
                ("rate_warnings", gate.warnings),
                ("penalties", self.rest.penalties),
                ("token_requests", self.rest.token_requests),
                ("token_renewals", self.rest.renewals),
                ("queued_jobs", self._jobs.qsize()),
            ),
            self.rest.blocked(),
        )

    # -- events -------------------------------------------------------------------------------------
    def _on_event(self, m: dict[str, Any]) -> None:
        if m.get("e") != "props":
            return
        d = m["d"]
        kind = d["entityType"]
        for entity in entities(d):
            if (
                kind == "order"
                and int(entity.get("accountId", self.account_id)) == self.account_id
                and int(entity.get("contractId", self.contract_id)) == self.contract_id
            ):
                o = self.book.transition(int(entity["id"]), str(entity["ordStatus"]))
                if o is not None and o.status in TERMINAL:
                    self._want_sync()  # a stop filled, was cancelled or expired; an order ended
                elif o is not None and o.purpose == "stop" and o.status == "Working":
                    self._want_sync()  # a bracket went live: the old stop, if any, goes
            elif kind == "fill":
                self._on_fill(entity)
            elif kind == "position" and int(entity.get("contractId", 0)) == self.contract_id:
                self.position = int(entity.get("netPos") or 0)
                self.net_price = float(entity.get("netPrice") or 0.0)

    def _on_fill(self, f: dict[str, Any]) -> None:
        fid = int(f["id"])
        if int(f.get("contractId", self.contract_id)) != self.contract_id:
            return
        if f.get("active") is False:
            self._busted(f)
            return
        if fid in self._seen_fills:
            return
        oid = int(f["orderId"])
        o = self.book.orders.get(oid)
        if o is None and self._sending:
            # the fill of the order being sent, ahead of its result: held until the result names it
            self._early_fills.setdefault(oid, []).append(f)
            return
        self._seen_fills.add(fid)
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
        self._fill_seq += 1
        self.fill_position += int(side) * qty
        if self.fill_position == 0:
            self.working_stop = None
            self._stop_target = None  # the next position's stop comes with it
        self._want_sync()
        log.info(
            "fill", client_id=cid, order_id=oid, side=int(side), qty=qty, price=fill.price, purpose=purpose
        )

    def _busted(self, f: dict[str, Any]) -> None:
        """``active: false``: the exchange busted the trade. Never applied; one already applied
        leaves the position uncertain: a problem (entries halt) and a reconcile."""
        fid = int(f["id"])
        self.busted_fills += 1
        if fid in self._seen_fills:
            side = 1 if f.get("action") == "Buy" else -1
            self.fill_position -= side * int(f.get("qty") or 0)
            self._fill_seq += 1
            log.error("fill_busted_after_applied", fill_id=fid, order_id=f.get("orderId"))
            self._problem(f"fill {fid} of order {f.get('orderId')} was busted by the exchange")
        else:
            self._seen_fills.add(fid)
            log.warning("fill_busted", fill_id=fid, order_id=f.get("orderId"))

    # -- reconciliation -----------------------------------------------------------------------------
    async def reconcile(self, why: str) -> None:
        """Compare the broker's position, working orders and fills with what this process knows."""
        orders = await self.rest.get("/order/list")
        fills = await self.rest.get("/fill/list")
        commands = await self.rest.get("/command/list")
        seq = self._fill_seq
        positions = await self.rest.get("/position/list")  # last: no fill lands after it unseen
        if self._fill_seq != seq:
            # a fill arrived while the position was being read: it may or may not be in it, so
            # this snapshot cannot be trusted; read again rather than guess
            log.info("reconcile_raced_a_fill", why=why)
            self._queue_reconcile(why)
            return
        self.reconciles += 1
        by_order_cid = {int(c["orderId"]): c.get("clOrdId") for c in commands or [] if c.get("orderId")}
        known = self.known_client_ids
        mine = lambda cid: bool(cid) and (cid in known or str(cid).startswith(self.run_tag))  # noqa: E731
        pos = next((p for p in positions or [] if int(p.get("contractId", 0)) == self.contract_id), None)
        broker_pos = int(pos.get("netPos") or 0) if pos else 0
        # our orders this process has not tracked yet (placed before a restart, or while a send was
        # ambiguous): take them into the book
        for o in orders or []:
            oid = int(o["id"])
            if int(o.get("contractId", 0)) != self.contract_id:
                continue
            if oid in self.book.orders:
                self.book.transition(oid, str(o["ordStatus"]))  # a status missed while away
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
                    abs(broker_pos) if purpose == "stop" else 0,
                    str(o["ordStatus"]),
                )
                self.book.orders[oid] = tracked
                if purpose == "stop" and tracked.status not in TERMINAL:
                    self.stop_order_id = oid
        # fills of our orders not seen yet (while disconnected); busted ones never count
        for f in sorted(fills or [], key=lambda x: str(x.get("timestamp"))):
            fid = int(f["id"])
            if fid in self._seen_fills or f.get("active") is False:
                continue
            if (
                iso_to_ns(str(f["timestamp"])) <= self.fills_after_ns
                or int(f["orderId"]) not in self.book.orders
            ):
                self._seen_fills.add(fid)  # before this run's journal, or not ours: counted below
                continue
            self._on_fill(f)
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
            if self.stop_order_id is not None and self.stop_order_id in self.book.orders:
                self.book.orders[self.stop_order_id].price = stop
        if broker_pos == 0:
            self.working_stop = None
        self._events.append(
            ReconcileReport(why, broker_pos, self.net_price, self.working_stop, tuple(unknown))
        )
        log.info(
            "broker_report", why=why, position=broker_pos, working=len(self.book.working()), unknown=unknown
        )
        if self._worker is not None:
            self._want_sync()  # the position may differ from what the stops were set for

    def _stop_price_of(self, orders: list[dict[str, Any]]) -> float | None:
        """The working stop's price as the broker lists it (``stopPrice`` when the list has it)."""
        sid = self.stop_order_id
        for o in orders:
            if sid is not None and int(o["id"]) == sid and o.get("stopPrice") is not None:
                return self.grid.round(float(o["stopPrice"]))
        return None
