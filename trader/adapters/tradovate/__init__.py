"""Tradovate adapter: protocol (frames), rest (auth, penalties, rate limits), socket (the
WebSocket connection), feed (chart bars for the engine's Feed port) and broker (orders, fills and
reconcile reports for the engine's Broker port)."""
