"""The Tradovate adapter against a local server speaking Tradovate's protocol over real sockets
(tests/tradovate_server.py), with faults injected through it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from tests.tradovate_server import PASSWORD, SEC, SYMBOL, FakeTradovate, shared_bars
from trader.adapters.tradovate.broker import TradovateBroker
from trader.adapters.tradovate.feed import BarAssembler, ChartRefused, TradovateFeed
from trader.adapters.tradovate.protocol import ns_to_iso
from trader.adapters.tradovate.rest import AuthError, PenaltyError, RateLimited, RequestGate, TradovateRest
from trader.config import load_settings
from trader.domain import (
    Bar,
    BrokerBlocked,
    BrokerProblem,
    Fill,
    OrderIntent,
    OrderKind,
    OrderRejected,
    ReconcileReport,
    Side,
)
from trader.execution import reconcile

BARS = shared_bars()
START = next(i for i, b in enumerate(BARS) if ns_to_iso(b.ts_ns) >= "2023-11-28T14:35")


@pytest.fixture
def fake():
    f = FakeTradovate(BARS, START, step_s=0.06).start()
    yield f
    f.stop()


def settings(fake: FakeTradovate, **tv: Any) -> Any:
    cfg = fake.config() | {"password": PASSWORD, "sec": SEC, "history_bars": 300} | tv
    return load_settings(None, {"tradovate": cfg, "advisor": {"mode": "off"}})


async def collect(feed: TradovateFeed, n_live: int, during: Any = None) -> list[tuple[str, Bar]]:
    out: list[tuple[str, Bar]] = []
    live = 0
    try:
        async with contextlib.aclosing(feed.batches()) as batches:
            async for batch in batches:
                out += [(batch.kind.value, b) for b, _ in batch.items if b is not None]
                if batch.kind.value == "live":
                    live += 1
                    if during is not None:
                        await during(live)
                if live >= n_live:
                    break
    finally:
        await feed.rest.close()
    return out


def assert_continuous(bars: list[Bar]) -> None:
    ts = [b.ts_ns for b in bars]
    assert ts == sorted(set(ts)), "bars not unique and in order"
    i0 = next(i for i, b in enumerate(BARS) if b.ts_ns == ts[0])
    assert bars == BARS[i0 : i0 + len(bars)], "bars differ from the market's or have gaps"


# -- auth ----------------------------------------------------------------------------------------------


def test_a_time_penalty_is_waited_out_and_answered_with_the_ticket(fake):
    fake.faults.penalties["/account/list"] = 1
    rest = TradovateRest(settings(fake).tradovate)

    async def go() -> Any:
        await rest.start()
        try:
            return await rest.get("/account/list")
        finally:
            await rest.close()

    t0 = time.monotonic()
    accounts = asyncio.run(go())
    assert accounts[0]["name"] == "DEMO1001" and rest.penalties == 1
    assert time.monotonic() - t0 >= 1.0  # p-time honoured
    tries = [b for m, p, b in fake.requests if p == "/account/list"]
    assert len(tries) == 2 and tries[1]["p-ticket"].startswith("ticket-")


def test_a_captcha_penalty_on_the_token_request_is_not_retried_and_locks_requests(fake):
    """The real token penalty always needs a captcha: no program can answer it, and asking again
    only extends it. The client stops, says so, and sends nothing until the lockout ends."""
    fake.faults.auth_penalties = 1
    rest = TradovateRest(settings(fake, lockout_s=30.0).tradovate)

    async def go() -> str:
        try:
            with pytest.raises(PenaltyError, match="captcha"):
                await rest.start()
            with pytest.raises(RateLimited, match="locked out"):
                await rest.get("/account/list")  # refused here, never sent
            return rest.blocked()
        finally:
            await rest.close()

    blocked = asyncio.run(go())
    assert fake.token_requests == 1 and len(fake.requests) == 1
    assert "lockout" in blocked and "captcha" in blocked


def test_bad_credentials_fail_with_the_user_named_and_no_secret(fake):
    rest = TradovateRest(settings(fake, password="wrong-PASS-123").tradovate)

    async def go() -> None:
        try:
            await rest.start()
        finally:
            await rest.close()

    with pytest.raises(AuthError) as err:
        asyncio.run(go())
    msg = str(err.value)
    assert "trader-test" in msg and "Incorrect username or password" in msg
    assert "wrong-PASS-123" not in msg and SEC not in msg


def test_missing_credentials_name_the_environment_variables(fake):
    rest = TradovateRest(settings(fake, password=None).tradovate)
    with pytest.raises(AuthError, match="TRADER_TRADOVATE__PASSWORD"):
        asyncio.run(rest.authenticate())


def test_token_is_renewed_before_it_expires(fake):
    fake.token_ttl_s = 2.5
    rest = TradovateRest(settings(fake, renew_before_s=1.5).tradovate)

    async def go() -> list[Any]:
        await rest.start()
        first = rest.token
        await asyncio.sleep(2.5)
        accounts = await rest.get("/account/list")  # the original token has expired by now
        await rest.close()
        return [first, accounts]

    first, accounts = asyncio.run(go())
    assert fake.renewals >= 1 and rest.renewals >= 1 and rest.token is not first
    assert accounts[0]["name"] == "DEMO1001"


# -- market data ---------------------------------------------------------------------------------------


def test_feed_primes_with_history_then_hands_on_only_completed_bars_in_order(fake):
    s = settings(fake)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))
    got = asyncio.run(collect(feed, 12))
    kinds = [k for k, _ in got]
    assert kinds[0] == "prime" and kinds.count("prime") == 299 and set(kinds[299:]) == {"live"}
    assert_continuous([b for _, b in got])
    # the bars handed on are the market's complete bars, never a forming one
    assert got[-1][1].ts_ns < BARS[fake.k].ts_ns
    assert fake.client_heartbeats >= 1  # "[]" frames sent


def test_dropped_socket_reconnects_resubscribes_and_backfills_the_gap(fake):
    s = settings(fake)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))

    async def fault(live: int) -> None:
        if live == 5:
            fake.faults.refuse_ws.add("md")
            fake.drop_md()
            await asyncio.sleep(0.8)  # the market moves on (~13 bars) while we are away
            fake.faults.refuse_ws.discard("md")

    got = asyncio.run(collect(feed, 12, fault))
    assert feed.reconnects == 1 and fake.md_connections == 2
    catch_up = [b for k, b in got if k == "catch_up"]
    assert len(catch_up) >= 5
    assert_continuous([b for _, b in got])  # no gap and no repeat across the outage
    assert [e for k, e in fake.ws_requests if k == "md"].count("md/getChart") == 2


def test_silent_server_is_detected_and_the_feed_reconnects(fake):
    s = settings(fake)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))

    async def fault(live: int) -> None:
        if live == 3:
            fake.silence_md()  # open but silent: no heartbeats, no data

    got = asyncio.run(collect(feed, 10, fault))
    assert feed.reconnects == 1 and fake.md_connections == 2
    assert any(k == "catch_up" for k, _ in got)
    assert_continuous([b for _, b in got])


def test_malformed_frames_duplicates_and_out_of_order_bars_are_dropped_and_counted(fake):
    s = settings(fake)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))

    async def fault(live: int) -> None:
        if live == 2:
            fake.faults.malformed = 2
            fake.faults.duplicate_bar = 2
            fake.faults.out_of_order = 2

    got = asyncio.run(collect(feed, 14, fault))
    assert feed.malformed + (feed._socket.malformed_frames if feed._socket else 0) >= 2
    assert feed.duplicates >= 2 and feed.out_of_order >= 2
    assert feed.reconnects == 0  # a bad frame does not end the connection
    assert_continuous([b for _, b in got])


def test_assembler_holds_the_forming_bar_and_counts_late_updates():
    a = BarAssembler()
    b0, b1, b2 = (Bar(t, 1.0, 2.0, 0.5, 1.5, 10.0) for t in (60, 120, 180))
    assert a.update(b0) is None  # forming
    assert a.update(Bar(60, 1.0, 2.5, 0.5, 2.0, 12.0)) is None  # revised
    done = a.update(b1)
    assert done is not None and done.high == 2.5  # the last revision completes
    assert a.update(b0) is None and a.duplicates == 1
    assert a.update(Bar(0, 1, 1, 1, 1, 1)) is None and a.out_of_order == 1
    assert a.update(b2) == b1


# -- orders --------------------------------------------------------------------------------------------


class Harness:
    """A broker with a minimal position book fed by its own events (what the engine does: fills
    move the position; a reconcile report is compared with it by the pure reconcile rule)."""

    def __init__(self, fake: FakeTradovate, **tv: Any) -> None:
        self.fake = fake
        fake.market_running = False  # prices hold still: fills and stops happen when a test says
        self.s = settings(fake, **tv)
        self.rest = TradovateRest(self.s.tradovate)
        self.position = 0
        self.fills: list[Any] = []
        self.broker = TradovateBroker(self.s, self.rest, "run00001")
        self.broker.last_price = fake.price
        self.mismatch: str | None = None
        self.adopted: list[tuple[int, float]] = []
        self.events: list[Any] = []

    def drain(self) -> list[Fill]:
        fills = []
        for e in self.broker.drain_events():
            self.events.append(e)
            if isinstance(e, Fill):
                fills.append(e)
                self.position += int(e.side) * e.qty
            elif isinstance(e, ReconcileReport):
                out = reconcile.compare(e, self.position, self.s.tradovate.adopt_broker_state)
                self.mismatch = out.text if out.kind == "mismatch" else None
                if out.kind == "adopt":
                    self.position = e.position
                    self.adopted.append((e.position, e.avg_price))
        self.fills += fills
        return fills

    async def pump(self, until: Any, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.drain()
            if until():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached")


def entry(cid: str, qty: int = 1, side: Side = Side.BUY, stop_ticks: int = 40) -> OrderIntent:
    return OrderIntent(cid, side, qty, OrderKind.MARKET, "entry", stop_ticks)


def run_harness(h: Harness, body: Any) -> None:
    async def go() -> None:
        await h.broker.start()
        try:
            await body(h)
        finally:
            await h.broker.stop()
            await h.rest.close()

    asyncio.run(go())


def test_bracket_entry_fills_then_the_stop_is_moved_and_cancelled(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-5-0"))
        await h.pump(lambda: h.position == 1 and stop_live(h))
        assert h.broker.working_stop == fake.placed("/order/placeoso")[0]["bracket1"]["stopPrice"]
        sid = h.broker.stop_order_id
        assert sid is not None and fake.orders[sid]["ordStatus"] == "Working"
        new = h.broker.working_stop + 2.0  # break-even / trailing
        await h.broker.set_stop(new)
        assert await h.broker.settle(5)
        assert fake.versions[sid]["stopPrice"] == new and h.broker.working_stop == new
        await h.broker.set_stop(None)
        assert await h.broker.settle(5)
        assert fake.orders[sid]["ordStatus"] == "Canceled" and h.broker.working_stop is None

    run_harness(h, body)
    oso = fake.placed("/order/placeoso")
    assert len(oso) == 1 and oso[0]["clOrdId"] == "run00001-5-0" and oso[0]["bracket1"]["orderType"] == "Stop"
    assert h.fills[0].client_id == "run00001-5-0" and h.fills[0].purpose == "entry"
    assert h.broker.book.unexpected == 0


@pytest.mark.parametrize("fault", ["timeout_after_execute", "http_503", "penalty"])
def test_a_retried_order_never_opens_a_second_position(fake, fault):
    path = "/order/placeoso"
    if fault == "timeout_after_execute":
        fake.faults.slow_after_execute[path] = 1  # executed, answered after the client gave up
    elif fault == "http_503":
        fake.faults.http_5xx[path] = 2
    else:
        fake.faults.penalties[path] = 1
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-9-0"))
        await h.pump(lambda: h.position == 1)
        await asyncio.sleep(0.3)
        h.drain()

    run_harness(h, body)
    placed = [c for c in fake.commands if c.get("clOrdId") == "run00001-9-0"]
    assert len(placed) == 1, f"{len(placed)} orders for one intent"
    assert fake.net_pos == 1 and h.position == 1
    assert (h.broker.adopted_orders == 1) == (fault == "timeout_after_execute")
    if fault == "penalty":
        assert any(b.get("p-ticket") for b in fake.placed(path))
    assert h.broker.stop_order_id is not None  # the bracket stop is known even after a lost answer


def test_rejected_order_is_counted_and_leaves_no_position(fake):
    fake.faults.reject_orders = 1
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-3-0"))
        assert await h.broker.settle(5)

    run_harness(h, body)
    assert h.broker.rejects == 1 and fake.net_pos == 0 and not h.drain()
    assert [e.client_id for e in h.events if isinstance(e, OrderRejected)] == ["run00001-3-0"]
    assert h.broker.book.orders == {}


def test_partial_fills_each_reach_the_portfolio(fake):
    fake.faults.partial_fills = 1
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-4-0", qty=2))
        await h.pump(lambda: h.position == 2)

    run_harness(h, body)
    mine = [f for f in h.fills if f.client_id == "run00001-4-0"]
    assert [f.qty for f in mine] == [1, 1] and fake.net_pos == 2


def test_an_order_while_another_is_in_flight_is_not_sent(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-6-0"))
        await h.pump(lambda: h.position == 1)
        await quiet(h)  # every event in: none can end what is faked next
        # as if its fill had not arrived yet: a second entry now could double the position
        first = h.broker.book.orders[h.broker.book.by_client["run00001-6-0"]]
        first.filled, first.status = 0, "Working"
        await h.broker.submit(entry("run00001-7-0"))
        assert await h.broker.settle(5)

    run_harness(h, body)
    sent = [c.get("clOrdId") for c in fake.commands]
    assert "run00001-6-0" in sent and "run00001-7-0" not in sent


def test_flatten_liquidates_the_position_at_the_broker(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-1-0"))
        await h.pump(lambda: h.position == 1)
        await h.broker.submit(OrderIntent("run00001-2-0", Side.SELL, 1, OrderKind.MARKET, "flatten:operator"))
        await h.pump(lambda: h.position == 0)

    run_harness(h, body)
    assert fake.net_pos == 0 and len(fake.placed("/order/liquidateposition")) == 1
    assert all(o["ordStatus"] in ("Filled", "Canceled") for o in fake.orders.values())


# -- reconciliation ------------------------------------------------------------------------------------


def _foreign_position(fake: FakeTradovate) -> None:
    """Someone else (another app, a human) opened a position and left a stop working."""

    def place() -> None:
        fake._place_oso(
            {
                "accountId": 1001,
                "action": "Buy",
                "symbol": SYMBOL,
                "orderQty": 1,
                "orderType": "Market",
                "isAutomated": True,
                "clOrdId": "manual-1",
                "bracket1": {"action": "Sell", "orderType": "Stop", "stopPrice": 15000.0},
            }
        )

    fake.call(place)


def test_an_unknown_position_halts_entries_with_the_reason(fake):
    _foreign_position(fake)
    h = Harness(fake)

    async def body(h: Harness) -> None:
        h.drain()
        assert h.mismatch is not None

    run_harness(h, body)
    assert "broker position +1 != journal +0" in (h.mismatch or "")
    assert "working order(s) unknown" in (h.mismatch or "")


def test_adopt_takes_the_brokers_position(fake):
    _foreign_position(fake)
    h = Harness(fake, adopt_broker_state=True)

    async def body(h: Harness) -> None:
        h.drain()

    run_harness(h, body)
    assert h.mismatch is None and h.adopted and h.adopted[0][0] == 1 and h.position == 1


def test_fills_missed_while_disconnected_are_picked_up_once_on_reconnect(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-8-0"))
        await h.pump(lambda: h.position == 1)
        sid = h.broker.stop_order_id
        fake.faults.refuse_ws.add("user")
        fake.drop_user()
        await asyncio.sleep(0.2)
        # the stop triggers while we are away
        fake.call(
            lambda: (fake._fill(fake.orders[sid], 1, 15990.0), fake._status(fake.orders[sid], "Filled"))
        )
        fake.faults.refuse_ws.discard("user")
        await h.pump(lambda: h.position == 0 and h.broker.connected and h.broker.reconciles >= 2)
        await asyncio.sleep(0.3)
        h.drain()

    run_harness(h, body)
    stops = [f for f in h.fills if f.purpose == "stop"]
    assert len(stops) == 1 and stops[0].price == 15990.0
    assert h.broker.reconnects == 1 and h.mismatch is None


# -- the real servers' shapes and limits (issue 14) ----------------------------------------------------


def stop_live(h: Harness) -> bool:
    """The broker knows its bracket stop is working (its entry filled and the server said so)."""
    sid = h.broker.stop_order_id
    return sid is not None and h.broker.book.orders[sid].status == "Working"


def working_stops(fake: FakeTradovate) -> list[dict[str, Any]]:
    return [
        o
        for o in fake.orders.values()
        if o["ordStatus"] in ("Working", "Suspended") and fake.versions[o["id"]]["orderType"] == "Stop"
    ]


def test_success_results_are_accepted_in_both_shapes_and_stop_updates_keep_one_stop(fake):
    """A result with ``failureReason: "Success"`` is an accepted order: its bracket stop is tracked
    and later stop updates modify that one stop (before: "refused", and each update placed a new
    stop)."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        for n in range(3):  # the server alternates the two success shapes
            await h.broker.submit(entry(f"run00001-{10 + n}-0"))
            await h.pump(lambda: h.position == 1 and stop_live(h))
            for k in range(3):
                await h.broker.set_stop(h.broker.working_stop + 0.25 * (k + 1))
                assert await h.broker.settle(5)
                assert len(working_stops(fake)) == 1
            await h.broker.submit(
                OrderIntent(f"run00001-{10 + n}-1", Side.SELL, 1, OrderKind.MARKET, "exit:signal")
            )
            await h.pump(lambda: h.position == 0)
            assert await h.broker.settle(5)

    run_harness(h, body)
    assert h.broker.rejects == 0 and not [e for e in h.events if isinstance(e, OrderRejected)]
    assert fake.placed("/order/placeorder") == []  # no standalone stops
    assert len(fake.placed("/order/liquidateposition")) == 3  # the three exits
    assert len(fake.placed("/order/modifyorder")) == 9
    assert working_stops(fake) == []


def test_props_entity_arrays_reach_the_portfolio(fake):
    """``entity`` may be an array: a split market order's two fills arrive in one event, orders and
    positions as one-element arrays; none is dropped or counted as malformed."""
    fake.faults.partial_fills = 1
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-4-0", qty=2))
        await h.pump(lambda: h.position == 2)
        assert await h.broker.settle(5)
        assert h.broker._socket is not None and h.broker._socket.malformed_frames == 0
        assert h.broker.position == 2  # from the position events
        assert h.broker.book.unexpected == 0

    run_harness(h, body)
    assert [f.qty for f in h.fills] == [1, 1] and h.broker.reconnects == 0


def test_flatten_is_automated_and_its_refusal_is_reported(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-1-0"))
        await h.pump(lambda: h.position == 1)
        fake.faults.reject_orders = 1
        await h.broker.submit(OrderIntent("run00001-2-0", Side.SELL, 1, OrderKind.MARKET, "flatten:operator"))
        assert await h.broker.settle(5)
        h.drain()
        await h.broker.submit(OrderIntent("run00001-3-0", Side.SELL, 1, OrderKind.MARKET, "flatten:operator"))
        await h.pump(lambda: h.position == 0)

    run_harness(h, body)
    bodies = fake.placed("/order/liquidateposition")
    assert len(bodies) == 2 and all(b["isAutomated"] is True for b in bodies)
    refused = [e for e in h.events if isinstance(e, OrderRejected)]
    assert [e.client_id for e in refused] == ["run00001-2-0"] and "liquidation refused" in refused[0].reason
    assert any(isinstance(e, BrokerProblem) and "flatten" in e.text for e in h.events)
    assert fake.net_pos == 0


@pytest.mark.parametrize("tif", ["GTC", "Day"])
def test_the_protective_stop_outlives_the_session_close(fake, tif):
    """Every order states its time in force. A GTC stop survives the session close; a Day stop
    that expires is replaced at once, so the position is never left without a stop."""
    h = Harness(fake, stop_time_in_force=tif)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-5-0"))
        await h.pump(lambda: h.position == 1 and stop_live(h))
        price = h.broker.working_stop
        expired = fake.session_end()
        assert bool(expired) == (tif == "Day")
        await h.pump(lambda: len([o for o in working_stops(fake) if o["ordStatus"] == "Working"]) == 1)
        assert await h.broker.settle(5)
        (stop,) = working_stops(fake)
        assert fake.versions[stop["id"]]["stopPrice"] == price and fake.versions[stop["id"]]["orderQty"] == 1

    run_harness(h, body)
    oso = fake.placed("/order/placeoso")[0]
    assert oso["timeInForce"] == "Day" and oso["bracket1"]["timeInForce"] == tif
    assert h.broker.stops_replaced == (1 if tif == "Day" else 0)


def test_an_exit_takes_the_bracket_stop_with_it_so_it_cannot_open_a_position_later(fake):
    """A working stop fills whatever the position: the exit's liquidation cancels the bracket at
    the server, so a later touch of its price opens nothing, and the next entry has one stop."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-20-0"))
        await h.pump(lambda: h.position == 1)
        old = h.broker.working_stop
        await h.broker.submit(OrderIntent("run00001-21-0", Side.SELL, 1, OrderKind.MARKET, "exit:signal"))
        await h.pump(lambda: h.position == 0)
        await h.pump(lambda: working_stops(fake) == [])
        # the market falls through the old stop's price: nothing may fill
        fake.call(lambda: fake._check_stops({"low": old - 10, "high": old, "close": old - 10}))
        await asyncio.sleep(0.2)
        assert fake.net_pos == 0
        await h.broker.submit(entry("run00001-22-0"))
        await h.pump(lambda: h.position == 1)
        assert await h.broker.settle(5)
        assert len(working_stops(fake)) == 1

    run_harness(h, body)
    assert h.broker.stops_cancelled == 0 and fake.net_pos == 1  # none left for the broker to cancel


def test_a_reversal_leaves_one_stop_on_the_new_side(fake):
    """The planner's reversal: an exit and a new entry in the same bar. The entry waits for the
    exit's fill (which may come after the exit's answer), then one stop on the new side."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-30-0"))
        await h.pump(lambda: h.position == 1)
        await h.broker.submit(OrderIntent("run00001-31-0", Side.SELL, 1, OrderKind.MARKET, "exit"))
        await h.broker.submit(OrderIntent("run00001-31-1", Side.SELL, 1, OrderKind.MARKET, "reverse", 40))
        await h.pump(lambda: h.position == -1)
        await h.pump(lambda: len(working_stops(fake)) == 1)
        assert await h.broker.settle(5)

    run_harness(h, body)
    (stop,) = working_stops(fake)
    assert stop["action"] == "Buy" and fake.versions[stop["id"]]["orderQty"] == 1
    assert h.broker.rejects == 0


def exit_(cid: str, qty: int, position_before: int) -> OrderIntent:
    side = Side.SELL if position_before > 0 else Side.BUY
    return OrderIntent(cid, side, qty, OrderKind.MARKET, "exit:signal", position_before=position_before)


async def long_with_its_stop(h: Harness, cid: str, qty: int = 1) -> float:
    """An entry that has filled, with its bracket stop working; returns the stop's price."""
    await h.broker.submit(entry(cid, qty=qty))
    await h.pump(lambda: h.position == qty and stop_live(h))
    assert await h.broker.settle(5)
    assert h.broker.working_stop is not None
    return h.broker.working_stop


async def quiet(h: Harness) -> None:
    """Every queued job done and every event in: what the broker did is over."""
    assert await h.broker.settle(10)
    await asyncio.sleep(0.3)
    assert await h.broker.settle(10)
    h.drain()


def test_the_market_through_the_stop_as_the_exit_arrives_closes_the_position_once(fake):
    """A stop fills whatever the position: were it still working beside a market exit, a trade
    through its price would fill both and leave a short nobody decided. The exit is one
    liquidation (the server cancels the contract's working orders and closes the position), so
    whichever comes first closes the long and nothing more."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        stop = await long_with_its_stop(h, "run00001-40-0")
        fake.faults.trade_before["/order/liquidateposition"] = stop - 1.0
        await h.broker.submit(exit_("run00001-41-0", 1, position_before=1))
        await quiet(h)

    run_harness(h, body)
    assert fake.net_pos == 0 and h.position == 0 and h.broker.fill_position == 0
    assert [(f.purpose, int(f.side)) for f in h.fills] == [("entry", 1), ("stop", -1)]
    assert working_stops(fake) == [] and not fake.placed("/order/placeorder")


def test_an_exit_is_one_liquidation_that_takes_the_stop_with_it(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await long_with_its_stop(h, "run00001-42-0")
        await h.broker.submit(exit_("run00001-43-0", 1, position_before=1))
        await quiet(h)

    run_harness(h, body)
    assert fake.net_pos == 0 and h.position == 0
    assert [(f.purpose, f.client_id) for f in h.fills][1] == ("exit:signal", "run00001-43-0")
    (liquidation,) = fake.placed("/order/liquidateposition")
    assert liquidation["isAutomated"] is True and liquidation["contractId"] == 3001
    assert working_stops(fake) == [] and not fake.placed("/order/cancelorder")


@pytest.mark.parametrize("fault", ["refused", "locked_out"])
def test_an_exit_that_cannot_go_out_leaves_the_position_with_its_stop(fake, fault):
    """Refused (trading locked) or rate limited (an hour's lockout on the real servers): nothing
    was cancelled before, so the position keeps the very stop it had."""
    h = Harness(fake, lockout_s=1.0)

    async def body(h: Harness) -> None:
        await long_with_its_stop(h, "run00001-44-0")
        (before,) = working_stops(fake)
        if fault == "refused":
            fake.faults.reject_orders = 1
        else:
            fake.faults.http_429["/order/liquidateposition"] = 1
        await h.broker.submit(exit_("run00001-45-0", 1, position_before=1))
        await h.pump(lambda: any(isinstance(e, OrderRejected) for e in h.events))
        assert working_stops(fake) == [before] and fake.net_pos == 1
        await quiet(h)

    run_harness(h, body)
    (stop,) = working_stops(fake)
    assert stop["action"] == "Sell" and fake.net_pos == 1 and h.position == 1
    assert h.broker.stops_replaced == 0 and not fake.placed("/order/cancelorder")
    (refused,) = [e for e in h.events if isinstance(e, OrderRejected)]
    assert refused.client_id == "run00001-45-0" and "liquidation" in refused.reason


def test_an_exit_closes_all_the_broker_holds_when_a_late_fill_made_it_more(fake):
    """The engine decided to exit one contract; a fill it had not seen yet made it two. The exit
    closes the position, not one contract of it beside a stop for two."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await long_with_its_stop(h, "run00001-46-0", qty=2)
        await h.broker.submit(exit_("run00001-47-0", 1, position_before=1))
        await quiet(h)

    run_harness(h, body)
    assert fake.net_pos == 0 and h.position == 0 and working_stops(fake) == []


def test_an_entry_decided_on_a_position_that_has_changed_is_not_sent(fake):
    """The engine decided flat while a fill was on its way; by the time the order could go out the
    position is long. A short "entry" now would only close the long, and its bracket stop would
    then open a position: it is refused, and the engine decides again on the next bar."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await long_with_its_stop(h, "run00001-48-0")
        late = OrderIntent("run00001-49-0", Side.SELL, 1, OrderKind.MARKET, "entry", 40, position_before=0)
        await h.broker.submit(late)
        await quiet(h)

    run_harness(h, body)
    assert "run00001-49-0" not in [c.get("clOrdId") for c in fake.commands]
    (refused,) = [e for e in h.events if isinstance(e, OrderRejected)]
    assert refused.client_id == "run00001-49-0" and "position is 1" in refused.reason
    assert fake.net_pos == 1 and len(working_stops(fake)) == 1


def test_stopping_right_after_an_exit_leaves_no_stop_of_ours_working(fake):
    """The service stops with the exit just queued: when the broker has stopped, nothing of ours
    is left working that could open a position while nobody is watching."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await long_with_its_stop(h, "run00001-50-0")
        await h.broker.submit(exit_("run00001-51-0", 1, position_before=1))

    run_harness(h, body)
    assert fake.net_pos == 0 and working_stops(fake) == []


def test_a_position_closed_elsewhere_just_before_the_stop_leaves_no_stop_of_ours(fake):
    """Someone closes the position from another app as the service stops: the fill's stop sync
    still runs before the broker stops, so our stop does not stay behind to open a position
    while nobody watches."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await long_with_its_stop(h, "run00001-52-0")

        def close_elsewhere() -> None:
            order = {
                "accountId": 1001,
                "action": "Sell",
                "symbol": SYMBOL,
                "orderQty": 1,
                "orderType": "Market",
                "isAutomated": True,
            }
            o = fake._new_order(order)
            fake._status(o, "Working")
            fake._fill_market(o)

        fake.call(close_elsewhere)
        await h.pump(lambda: h.broker.fill_position == 0)  # then the broker stops at once

    run_harness(h, body)
    assert fake.net_pos == 0 and working_stops(fake) == []


def test_a_refused_stop_move_is_not_sent_again_and_the_old_stop_stays_known(fake):
    """A stop moved through the market is refused (InvalidPrice): the broker reports it once,
    keeps the stop that is really working, and does not resend the same move in a loop."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-90-0"))
        await h.pump(lambda: h.position == 1 and stop_live(h))
        assert await h.broker.settle(5)
        old = h.broker.working_stop
        await h.broker.set_stop(fake.price + 5.0)  # above the market for a long: refused
        await h.pump(lambda: any(isinstance(e, ReconcileReport) and e.why == "problem" for e in h.events))
        await asyncio.sleep(1.5)
        assert await h.broker.settle(5)
        h.drain()
        assert h.broker.working_stop == old
        (stop,) = working_stops(fake)
        assert fake.versions[stop["id"]]["stopPrice"] == old

    run_harness(h, body)
    assert len(fake.placed("/order/modifyorder")) == 1
    assert len([e for e in h.events if isinstance(e, BrokerProblem)]) == 1
    report = [e for e in h.events if isinstance(e, ReconcileReport) and e.why == "problem"][-1]
    assert report.working_stop == h.broker.working_stop  # the engine is told the real stop


def test_a_bracket_stop_filled_before_the_entrys_answer_is_not_lost(fake):
    """The entry fills, its bracket stop triggers and fills, all before the placeoso answer
    arrives: both fills reach the portfolio and no stop is placed for a position that is gone."""
    fake.slow_s = 0.6
    fake.faults.slow_after_execute["/order/placeoso"] = 1
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-95-0"))
        await asyncio.sleep(0.25)  # executed; the answer is still on its way
        child = next(o for o in fake.orders.values() if o["parentId"] is not None)
        stop = fake.versions[child["id"]]["stopPrice"]
        fake.call(lambda: fake._check_stops({"low": stop - 1, "high": stop, "close": stop - 1}))
        await h.pump(lambda: len(h.fills) == 2)
        assert await h.broker.settle(5)
        await asyncio.sleep(0.3)
        h.drain()

    run_harness(h, body)
    assert h.position == 0 and fake.net_pos == 0 and h.broker.fill_position == 0
    assert [f.purpose for f in h.fills] == ["entry", "stop"]
    assert working_stops(fake) == [] and not fake.placed("/order/placeorder")


def test_broker_calls_return_at_once_and_retries_run_beside_the_bar_loop(fake):
    """submit and set_stop only queue: a slow or failing request is retried by the broker's own
    task, and the caller (the bar loop) is back before the server has answered."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-40-0"))
        await h.pump(lambda: h.position == 1 and stop_live(h))
        assert await h.broker.settle(5)
        fake.faults.http_5xx["/order/modifyorder"] = 3
        fake.faults.response_delay_s = 0.3
        await h.broker.set_stop(h.broker.working_stop + 1.0)
        assert not await h.broker.settle(0.05)  # still at work after the caller is back
        assert await h.broker.settle(10)
        fake.faults.response_delay_s = 0.0

    run_harness(h, body)
    (stop,) = working_stops(fake)
    assert fake.versions[stop["id"]]["stopPrice"] == h.broker.working_stop
    assert len(fake.placed("/order/modifyorder")) == 4  # three 503s, then done


def test_a_429_locks_out_halts_entries_keeps_the_stop_and_resumes_by_itself(fake):
    fake.lockout_s = 1.5
    h = Harness(fake, lockout_s=1.5)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-50-0"))
        await h.pump(lambda: h.position == 1 and stop_live(h))
        assert await h.broker.settle(5)
        stop_id, price = h.broker.stop_order_id, h.broker.working_stop
        fake.faults.http_429["/order/modifyorder"] = 1
        await h.broker.set_stop(price + 1.0)
        assert await h.broker.settle(5)
        blocked = [e for e in h.broker.drain_events() if isinstance(e, BrokerBlocked)]
        assert blocked and "429" in blocked[-1].reason
        sent = len(fake.requests)
        await h.broker.submit(entry("run00001-51-0"))  # as if the engine had not halted yet
        assert await h.broker.settle(5)
        assert len(fake.requests) == sent  # nothing sent during the lockout
        assert fake.orders[stop_id]["ordStatus"] == "Working"  # the stop stays at the broker
        assert fake.versions[stop_id]["stopPrice"] == price
        await h.pump(lambda: any(isinstance(e, BrokerBlocked) and not e.reason for e in h.events), 6)
        await h.pump(lambda: fake.versions[stop_id]["stopPrice"] == price + 1.0, 6)

    run_harness(h, body)
    refused = [e for e in h.events if isinstance(e, OrderRejected)]
    assert [e.client_id for e in refused] == ["run00001-51-0"] and "locked out" in refused[0].reason
    assert any(isinstance(e, ReconcileReport) and e.why == "lockout_end" for e in h.events)
    assert fake.net_pos == 1 and fake.lockouts == 1 and fake.requests_in_lockout == 0


def test_a_423_warning_slows_down_instead_of_refusing(fake):
    """HTTP 423 comes before a lockout: the request was not executed, nothing is refused; the
    client waits ``warning_backoff_s`` and sends it again."""
    fake.hour_limit, fake.hour_s = 100, 1.0  # the window rolls over within the back-off
    h = Harness(fake, warning_backoff_s=1.2)

    async def body(h: Harness) -> None:
        fake.call(lambda: fake.request_times.extend([time.monotonic()] * 95))
        await h.broker.submit(entry("run00001-60-0"))
        await h.pump(lambda: h.position == 1, 8)

    run_harness(h, body)
    assert fake.warnings_423 >= 1 and h.rest.gate.warnings >= 1
    assert fake.lockouts == 0 and h.broker.rejects == 0


def test_the_request_gate_keeps_to_the_hourly_budget():
    cfg = load_settings(
        None, {"tradovate": {"max_requests_per_hour": 10, "max_requests_per_s": 50}}
    ).tradovate
    gate = RequestGate(cfg)

    async def go() -> tuple[int, str]:
        sent = 0
        for _ in range(12):
            try:
                await asyncio.wait_for(gate.wait("GET /x"), 0.5)
            except TimeoutError:
                break
            sent += 1
        return sent, gate.blocked()

    sent, blocked = asyncio.run(go())
    assert sent == 10 and "budget" in blocked and gate.budget_waits >= 1


def test_a_session_closed_from_outside_costs_one_token_request_and_both_sockets_recover(fake):
    """Two logins elsewhere close our session (two sessions at most): both sockets get a close
    frame at once. One refresh serves both (renewal fails for a closed session, so one new token
    request), user data comes back (reconcile, fills), and the bars go on without a gap."""
    h = Harness(fake, token_request_spacing_s=0.5)
    fake.market_running = True
    feed = TradovateFeed(h.s, h.rest)

    async def body(h: Harness) -> None:
        got: list[Bar] = []

        async def bars() -> None:
            async with contextlib.aclosing(feed.batches()) as batches:
                async for batch in batches:
                    got.extend(b for b, _ in batch.items if b is not None and batch.kind.value != "prime")

        task = asyncio.create_task(bars())
        await h.pump(lambda: len(got) >= 3)
        before = fake.token_requests
        fake.external_login()
        fake.external_login()  # the third session: ours, the oldest, is closed
        await h.pump(lambda: h.broker.reconnects == 1 and h.broker.connected and h.broker.reconciles >= 2, 10)
        await h.pump(lambda: feed.reconnects == 1 and feed.connected, 10)
        n = len(got)
        await h.pump(lambda: len(got) >= n + 3, 10)
        assert fake.token_requests == before + 1
        await h.broker.submit(entry("run00001-70-0"))
        await h.pump(lambda: h.position == 1)  # fills flow on the new user socket
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert_continuous(got)

    run_harness(h, body)
    # ours (the oldest of three), then, when we logged in again, the oldest outside one
    assert fake.sessions_closed == 2 and len(fake.sessions) == 2


def test_chart_errors_are_retried_then_end_the_feed_with_the_servers_reason(fake):
    fake.faults.chart_errors = 100
    s = settings(fake, chart_error_limit=3)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))
    with pytest.raises(ChartRefused, match=r"tradovate.symbol 'NQZ3'.*refused 3 times.*Unknown symbol"):
        asyncio.run(collect(feed, 3))
    assert [e for k, e in fake.ws_requests if k == "md"].count("md/getChart") == 3


def test_one_chart_error_is_retried(fake):
    fake.faults.chart_errors = 1
    s = settings(fake)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))
    got = asyncio.run(collect(feed, 4))
    assert feed.chart_errors == 0 and feed.connects == 1
    assert_continuous([b for _, b in got])


def test_a_shutdown_event_closes_and_reconnects_both_sockets(fake):
    h = Harness(fake)
    fake.market_running = True
    feed = TradovateFeed(h.s, h.rest)

    async def body(h: Harness) -> None:
        async def during(live: int) -> None:
            if live == 3:
                fake.shutdown("md")
                fake.shutdown("user")

        got = await collect_open(feed, 9, during)
        assert feed.reconnects == 1 and h.broker.reconnects == 1
        await h.pump(lambda: h.broker.connected and h.broker.reconciles >= 2)
        assert_continuous([b for k, b in got if k != "prime"])

    run_harness(h, body)


async def collect_open(feed: TradovateFeed, n_live: int, during: Any) -> list[tuple[str, Bar]]:
    """``collect`` for a feed whose REST session another component still uses."""
    out: list[tuple[str, Bar]] = []
    live = 0
    async with contextlib.aclosing(feed.batches()) as batches:
        async for batch in batches:
            out += [(batch.kind.value, b) for b, _ in batch.items if b is not None]
            if batch.kind.value == "live":
                live += 1
                await during(live)
            if live >= n_live:
                break
    return out


def test_a_busted_fill_is_never_applied_and_halts_entries_until_reconciled(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-80-0"))
        await h.pump(lambda: h.position == 1)
        assert await h.broker.settle(5)
        fid = fake.fills[-1]["id"]
        fake.bust_fill(fid)
        await h.pump(lambda: any(isinstance(e, BrokerProblem) and "busted" in e.text for e in h.events))
        await h.pump(lambda: h.mismatch is not None)  # the reconcile: broker flat, journal +1
        assert "broker position +0 != journal +1" in (h.mismatch or "")
        await h.pump(lambda: working_stops(fake) == [])  # flat at the broker: no stop left

    run_harness(h, body)
    assert h.broker.busted_fills == 1 and len(h.fills) == 1


def test_a_websocket_429_is_a_lockout_waited_out_without_knocking(fake):
    """``s: 429`` on a socket request locks the user out like HTTP 429: the feed sends nothing
    until the lockout is over (knocking would extend it), then resubscribes and goes on."""
    fake.lockout_s = 1.0
    fake.faults.ws_429["md/getChart"] = 1
    s = settings(fake, lockout_s=1.0)
    feed = TradovateFeed(s, TradovateRest(s.tradovate))
    got = asyncio.run(collect(feed, 3))
    assert fake.lockouts == 1 and fake.requests_in_lockout == 0
    assert feed.rest.gate.lockouts == 1 and feed.connects == 1
    assert_continuous([b for _, b in got])
