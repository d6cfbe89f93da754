"""The broker seam: what the engine needs from any broker, paper or live."""

from __future__ import annotations

from typing import Protocol

from trader.domain import Bar, Fill, OrderIntent


class Broker(Protocol):
    """Routes order intents. Fills come back through :meth:`drain_fills` (paper: simulated on
    :meth:`on_bar`; live: received from the broker's user-data stream)."""

    name: str
    working_stop: float | None  # the protective stop working at the broker, if any

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, intent: OrderIntent) -> None: ...

    async def set_stop(self, stop_price: float | None) -> None:
        """Place, move or (None) cancel the protective stop of the open position."""
        ...

    def on_bar(self, bar: Bar) -> None:
        """Called with every accepted bar before the decision; simulated brokers fill here."""
        ...

    def drain_fills(self) -> list[Fill]: ...
