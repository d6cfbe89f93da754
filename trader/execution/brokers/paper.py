"""Paper broker: simulated fills on recorded or live bars.

Market orders fill at the *next* bar's open plus slippage (against the trader). The protective
stop triggers inside a bar when the low (long) or high (short) touches it and fills at the stop
minus slippage; a bar that opens through the stop (a gap) fills at the open minus slippage.
Commission is charged per side per contract. All fill prices are on the tick grid.
"""

from __future__ import annotations

from trader.config import Settings
from trader.domain import Bar, BrokerEvent, ComponentHealth, Fill, OrderIntent, Side, TickGrid


class PaperBroker:
    name = "paper"

    def __init__(self, settings: Settings) -> None:
        inst = settings.instrument
        self.grid = TickGrid(inst.tick_size)
        self.slip = inst.slippage_ticks * inst.tick_size
        self.commission = inst.commission_per_side_usd
        self.pending: list[OrderIntent] = []
        self.working_stop: float | None = None
        self.position = 0  # the broker's own view, to size the stop
        self._events: list[BrokerEvent] = []
        self._stop_seq = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.pending.clear()

    async def submit(self, intent: OrderIntent) -> None:
        self.pending.append(intent)

    async def set_stop(self, stop_price: float | None) -> None:
        self.working_stop = None if stop_price is None else self.grid.round(stop_price)

    def _fill(self, client_id: str, ts: int, side: Side, qty: int, price: float, purpose: str) -> Fill:
        f = Fill(client_id, ts, side, qty, self.grid.round(price), self.commission * qty, purpose)
        self.position += int(side) * qty
        if self.position == 0:
            self.working_stop = None  # the stop is part of the position's bracket
        self._events.append(f)
        return f

    def on_bar(self, bar: Bar) -> None:
        if self.pending:
            orders, self.pending = self.pending, []
            for o in orders:
                qty = o.qty
                if o.purpose.startswith(("exit", "flatten")):
                    # exits close what is open now, never more (a stop may have closed it already)
                    qty = min(qty, abs(self.position)) if self.position * int(o.side) < 0 else 0
                    if qty == 0:
                        continue
                price = bar.open + self.slip * int(o.side)
                f = self._fill(o.client_id, bar.ts_ns, o.side, qty, price, o.purpose)
                if o.stop_ticks and self.position != 0:
                    side = 1 if self.position > 0 else -1
                    self.working_stop = self.grid.round(f.price - side * o.stop_ticks * self.grid.tick_size)
        stop, pos = self.working_stop, self.position
        if stop is None or pos == 0:
            return
        if pos > 0 and bar.low <= stop:
            price = min(bar.open, stop) - self.slip
            self._stop_seq += 1
            self._fill(f"stop-{bar.ts_ns}-{self._stop_seq}", bar.ts_ns, Side.SELL, pos, price, "stop")
        elif pos < 0 and bar.high >= stop:
            price = max(bar.open, stop) + self.slip
            self._stop_seq += 1
            self._fill(f"stop-{bar.ts_ns}-{self._stop_seq}", bar.ts_ns, Side.BUY, -pos, price, "stop")

    async def flatten_now(self, intent: OrderIntent, bar: Bar) -> None:
        """Close the position now at this bar's close, slippage against us (a market order
        sent between bars, e.g. when the service stops with ``on_stop = flatten``)."""
        qty = min(intent.qty, abs(self.position))
        if qty and self.position * int(intent.side) < 0:
            price = bar.close + self.slip * int(intent.side)
            self._fill(intent.client_id, bar.ts_ns, intent.side, qty, price, intent.purpose)

    async def cancel_entries(self) -> list[str]:
        """Drop entry orders not yet filled (exits and flattens stay)."""
        kept = [o for o in self.pending if o.purpose.startswith(("exit", "flatten"))]
        dropped = [o.client_id for o in self.pending if o not in kept]
        self.pending = kept
        return dropped

    def drain_events(self) -> list[BrokerEvent]:
        if not self._events:
            return []
        out, self._events = self._events, []
        return out

    def health(self) -> ComponentHealth:
        return ComponentHealth("paper", True)
