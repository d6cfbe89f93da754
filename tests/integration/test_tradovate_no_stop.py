"""execution.stop_mode = "none" at Tradovate (the protocol server on loopback): an entry without a
stop is a plain market order, and the broker keeps zero stops for the position, through fills, a
reversal and a reconcile, instead of the one stop it keeps otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.test_tradovate import BARS, START, Harness, entry, run_harness, working_stops
from tests.tradovate_server import FakeTradovate
from trader.domain import OrderIntent, OrderKind, Side


@pytest.fixture
def fake() -> Iterator[FakeTradovate]:
    f = FakeTradovate(BARS, START, step_s=0.06).start()
    yield f
    f.stop()


def test_an_entry_without_a_stop_is_a_plain_order_and_no_stop_is_ever_placed(fake):
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-5-0", stop_ticks=0))
        await h.pump(lambda: h.position == 1)
        assert await h.broker.settle(5)
        assert working_stops(fake) == [] and h.broker.working_stop is None
        await h.broker.reconcile("test")  # a reconcile puts "the stop the position needs" right
        assert await h.broker.settle(5)
        assert working_stops(fake) == [] and h.mismatch is None
        # a reversal: the exit and the new entry, neither with a stop
        await h.broker.submit(OrderIntent("run00001-6-0", Side.SELL, 1, OrderKind.MARKET, "exit"))
        await h.broker.submit(OrderIntent("run00001-6-1", Side.SELL, 1, OrderKind.MARKET, "reverse", 0))
        await h.pump(lambda: h.position == -1)
        assert await h.broker.settle(5)
        assert working_stops(fake) == []

    run_harness(h, body)
    assert fake.placed("/order/placeoso") == []
    assert [b["clOrdId"] for b in fake.placed("/order/placeorder")] == ["run00001-5-0", "run00001-6-1"]
    assert len(fake.placed("/order/liquidateposition")) == 1  # the exit
    assert h.broker.stops_replaced == 0 and h.broker.rejects == 0 and fake.net_pos == -1


def test_after_a_position_with_a_stop_the_next_one_without_gets_none(fake):
    """The stop price of a closed position is not carried over to a later one that has none."""
    h = Harness(fake)

    async def body(h: Harness) -> None:
        await h.broker.submit(entry("run00001-7-0", stop_ticks=40))
        await h.pump(lambda: h.position == 1 and len(working_stops(fake)) == 1)
        await h.broker.submit(OrderIntent("run00001-8-0", Side.SELL, 1, OrderKind.MARKET, "exit"))
        await h.pump(lambda: h.position == 0 and working_stops(fake) == [])
        await h.broker.submit(entry("run00001-9-0", stop_ticks=0))
        await h.pump(lambda: h.position == 1)
        assert await h.broker.settle(5)
        assert working_stops(fake) == []

    run_harness(h, body)
    assert h.broker.stops_replaced == 0
