"""structlog configuration, in one place: JSON lines for journald, console rendering on a TTY."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog

from trader.config import LoggingConfig


class _BarClock:
    """The time of the bar being processed, stamped on every log line (set by the engine)."""

    __slots__ = ("ts_ns",)

    def __init__(self) -> None:
        self.ts_ns = 0


BAR = _BarClock()


def _add_bar_time(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ts = BAR.ts_ns
    if ts and "bar_time" not in event:
        event["bar_time"] = datetime.fromtimestamp(ts / 1e9, tz=UTC).isoformat()
    return event


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(cfg: LoggingConfig, stream: object = None) -> None:
    out = stream or sys.stderr
    fmt = cfg.format
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_bar_time,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[cfg.level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
