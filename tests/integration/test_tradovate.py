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
from trader.adapters.tradovate.feed import BarAssembler, TradovateFeed
from trader.adapters.tradovate.protocol import ns_to_iso
from trader.adapters.tradovate.rest import AuthError, TradovateRest
from trader.config import load_settings
from trader.domain import Bar, Fill, OrderIntent, OrderKind, OrderRejected, ReconcileReport, Side
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


def test_access_token_penalty_is_waited_out_and_answered_with_the_ticket(fake):
    fake.faults.auth_penalties = 1
    rest = TradovateRest(settings(fake).tradovate)

    async def go() -> None:
        await rest.start()
        await rest.close()

    t0 = time.monotonic()
    asyncio.run(go())
    assert rest.token is not None and rest.penalties == 1
    assert time.monotonic() - t0 >= 1.0  # p-time honoured
    bodies = fake.placed("/auth/accesstokenrequest")
    assert len(bodies) == 2 and "p-ticket" not in bodies[0] and bodies[1]["p-ticket"].startswith("ticket-")
    assert {k: v for k, v in bodies[1].items() if k != "p-ticket"} == bodies[0]  # identical body resent


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
        await h.pump(lambda: h.position == 1)
        assert h.broker.working_stop == fake.placed("/order/placeoso")[0]["bracket1"]["stopPrice"]
        sid = h.broker.stop_order_id
        assert sid is not None and fake.orders[sid]["ordStatus"] == "Working"
        new = h.broker.working_stop + 2.0  # break-even / trailing
        await h.broker.set_stop(new)
        assert fake.versions[sid]["stopPrice"] == new and h.broker.working_stop == new
        await h.broker.set_stop(None)
        assert fake.orders[sid]["ordStatus"] == "Canceled" and h.broker.working_stop is None

    run_harness(h, body)
    oso = fake.placed("/order/placeoso")
    assert len(oso) == 1 and oso[0]["clOrdId"] == "run00001-5-0" and oso[0]["bracket1"]["orderType"] == "Stop"
    assert h.fills[0].client_id == "run00001-5-0" and h.fills[0].purpose == "entry"
    assert h.broker.book.unexpected == 0


@pytest.mark.parametrize(
    "fault",
    ["timeout_after_execute", "http_503", "penalty", "http_429"],
)
def test_a_retried_order_never_opens_a_second_position(fake, fault):
    path = "/order/placeoso"
    if fault == "timeout_after_execute":
        fake.faults.slow_after_execute[path] = 1  # executed, answered after the client gave up
    elif fault == "http_503":
        fake.faults.http_5xx[path] = 2
    elif fault == "penalty":
        fake.faults.penalties[path] = 1
    else:
        fake.faults.http_429[path] = 1
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
        await asyncio.sleep(0.3)

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
        # as if its fill had not arrived yet: a second entry now could double the position
        first = h.broker.book.orders[h.broker.book.by_client["run00001-6-0"]]
        first.filled, first.status = 0, "Working"
        await h.broker.submit(entry("run00001-7-0"))

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
