"""Hostile control-API input against the real aiohttp server on 127.0.0.1 (issue 11): malformed
headers are a 400 and journaled as refused, a flood of unauthenticated requests is rate-limited
and counted instead of journaled one row each, and no header or body makes it fail (hypothesis)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from trader.service.http import REFUSALS_JOURNALED, ControlServer
from trader.service.operator import Operator
from trader.wiring import build_replay

TOKEN = "tok-" + "x" * 28


class Served:
    """A ControlServer over a paper replay run, on its own loop in a thread."""

    def __init__(self, tmp: Path) -> None:
        s = make_settings(service={"http_enabled": True, "http_port": 0})
        self.journal = tmp / "j.sqlite"
        self.run = build_replay(s, self.journal, mode="paper")
        self.op = Operator(s, self.run, None)
        self.server = ControlServer(self.op, lambda: False)
        self.server.token = TOKEN
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.port = self.server.port

    def raw(self, request: bytes) -> int:
        """Send raw bytes; return the HTTP status (0 if the server closed without one)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
            c.sendall(request)
            data = b""
            while b"\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    return 0
                data += chunk
        return int(data.split(b" ", 2)[1])

    def post(self, path: str, headers: dict[str, bytes] | None = None, body: bytes = b"") -> int:
        lines = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
        lines += [k.encode() + b": " + v for k, v in (headers or {}).items()]
        lines.append(b"Content-Length: " + str(len(body)).encode())
        return self.raw(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    def refused_rows(self) -> list[tuple[str, str]]:
        async def committed() -> None:  # on the server's loop, after the requests it served
            self.run.journal.flush()

        asyncio.run_coroutine_threadsafe(committed(), self.loop).result(60)
        con = sqlite3.connect(self.journal)
        try:
            return con.execute("SELECT action, result FROM control WHERE result LIKE 'refused%'").fetchall()
        finally:
            con.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.run.journal.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


def test_a_malformed_authorization_header_is_a_400_and_journaled_as_refused(served):
    assert served.post("/halt", {"Authorization": b"Bearer \xff\xfe\x80"}) == 400  # not UTF-8
    assert served.post("/halt", {"Authorization": "Bearer tök".encode()}) == 400  # not ASCII
    # control characters: aiohttp's parser answers 400 itself, before any handler
    assert served.post("/halt", {"Authorization": b"Bearer tok\x01en"}) == 400
    assert served.post("/halt", {"Authorization": b"Bearer wrong"}) == 401
    rows = served.refused_rows()
    assert [r[1] for r in rows].count("refused: malformed Authorization header") == 2
    assert ("halt", "refused: bad token") in rows
    assert not served.op.controls.halted  # nothing got through


def test_a_flood_of_unauthenticated_requests_is_rate_limited_and_counted_not_journaled(served):
    statuses = [served.post("/flatten", {"Authorization": b"Bearer nope"}) for _ in range(60)]
    assert statuses[:REFUSALS_JOURNALED] == [401] * REFUSALS_JOURNALED
    assert set(statuses[REFUSALS_JOURNALED:]) == {429}
    assert len(served.refused_rows()) == REFUSALS_JOURNALED  # 60 requests, 5 rows
    lim = served.server.refusals
    assert lim.total["bad token"] == 60 and lim.suppressed_total == 60 - REFUSALS_JOURNALED
    # the right token still works during the flood (refusals do not lock the operator out)
    assert served.post("/halt", {"Authorization": f"Bearer {TOKEN}".encode()}) == 200
    assert served.op.controls.operator_halt


HEADER_BYTES = st.binary(min_size=0, max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/halt", "/resume", "/flatten", "/kill", "/rearm", "/nope", "/state"]),
    auth=st.one_of(st.none(), HEADER_BYTES, HEADER_BYTES.map(lambda b: b"Bearer " + b)),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda r: json.dumps({"reason": r}).encode(), st.one_of(st.text(max_size=40), st.integers())
        ),
    ),
)
def test_no_header_or_body_makes_the_control_api_fail(served, path, auth, body):
    before = len(served.refused_rows())
    status = served.post(path, {} if auth is None else {"Authorization": auth}, body)
    assert status in (200, 400, 401, 403, 404, 405, 413, 429)
    assert len(served.refused_rows()) >= before  # journaled rows are never lost
