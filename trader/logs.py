"""structlog configuration, in one place.

``logging.format``: ``console`` (and ``auto``, the default) renders human-readable lines with
key=value fields, without colours, whether or not the stream is a terminal; ``json`` renders one
JSON object per line, for journald and log shippers (the systemd units set it). Child processes
(the isolated LLM) render the same way: :func:`child_logging_args` carries the choice to them.
"""

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
_configured: LoggingConfig | None = None  # the last configuration, format resolved


def resolved_format(cfg: LoggingConfig) -> str:
    """``json`` only when asked for; ``auto`` and ``console`` are human-readable lines."""
    return "json" if cfg.format == "json" else "console"


def configure_logging(cfg: LoggingConfig, stream: object = None) -> None:
    """Render structlog events to ``stream`` (default stderr) as ``cfg`` says."""
    global _configured
    out = stream or sys.stderr
    fmt = resolved_format(cfg)
    _configured = cfg.model_copy(update={"format": fmt})
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
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


def child_logging_args() -> list[str]:
    """The logging configuration for a child process's command line (``[]`` when this process
    never configured logging): the child passes it to :func:`configure_child_logging`."""
    return [] if _configured is None else [_configured.model_dump_json()]


def configure_child_logging(arg: str | None) -> None:
    """In a child process: log as the parent does (to stderr), from :func:`child_logging_args`."""
    if arg:
        configure_logging(LoggingConfig.model_validate_json(arg))
