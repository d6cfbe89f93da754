"""Tradovate adapter: authentication, REST, the WebSocket protocol (shared by the market-data feed
in ``trader.feeds.live`` and the broker in ``trader.execution.brokers.tradovate``)."""
