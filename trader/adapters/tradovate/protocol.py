"""Tradovate's WebSocket framing.

Client → server: one text message per request, four newline-separated fields
``endpoint\\nrequest_id\\nquery\\nbody`` (``authorize\\n0\\n\\n<token>``; a heartbeat is the text
``[]``). Server → client: a one-letter frame type, then JSON: ``o`` (socket open), ``h``
(heartbeat), ``a[...]`` (an array of messages: responses ``{"i": id, "s": status, "d": data}``
and events ``{"e": "chart"|"props"|"md"|..., "d": ...}``) and ``c[code, "reason"]`` (closing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

HEARTBEAT = "[]"


class FrameError(ValueError):
    """A frame that does not follow the protocol (counted and skipped by the readers)."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: str  # "o" | "h" | "a" | "c"
    messages: tuple[dict[str, Any], ...] = ()
    close_code: int | None = None
    close_reason: str = ""


def encode_request(endpoint: str, request_id: int, body: object | None = None, query: str = "") -> str:
    if "\n" in endpoint or "\n" in query:
        raise ValueError("endpoint and query must not contain newlines")
    text = "" if body is None else body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return f"{endpoint}\n{request_id}\n{query}\n{text}"


def parse_frame(text: str) -> Frame:
    if not text:
        raise FrameError("empty frame")
    kind, rest = text[0], text[1:]
    if kind in ("o", "h"):
        return Frame(kind)
    if kind == "a":
        try:
            data = json.loads(rest)
        except ValueError as exc:
            raise FrameError(f"data frame is not JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
            raise FrameError("data frame is not an array of objects")
        return Frame("a", tuple(data))
    if kind == "c":
        try:
            data = json.loads(rest) if rest else []
        except ValueError:
            data = []
        code = data[0] if data and isinstance(data[0], int) else None
        reason = data[1] if len(data) > 1 and isinstance(data[1], str) else ""
        return Frame("c", close_code=code, close_reason=reason)
    raise FrameError(f"unknown frame type {kind!r}")


def parse_request(text: str) -> tuple[str, int, str, str]:
    """Server side (the test server): split a client request into its four fields."""
    parts = text.split("\n", 3)
    if len(parts) != 4:
        raise FrameError(f"request has {len(parts)} fields, expected 4 (endpoint, id, query, body)")
    try:
        rid = int(parts[1])
    except ValueError:
        raise FrameError(f"request id {parts[1]!r} is not an integer") from None
    return parts[0], rid, parts[2], parts[3]


def iso_to_ns(ts: str) -> int:
    """``2017-04-13T11:00:00.000Z`` → UTC epoch nanoseconds."""
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def ns_to_iso(ts_ns: int) -> str:
    dt = datetime.fromtimestamp(ts_ns // 1_000_000_000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")
