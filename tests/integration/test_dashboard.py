"""The live dashboard's server side (issue 13) on a real service run: recorded NQ bars paced through
the engine, the real aiohttp server on 127.0.0.1, real SQLite. An update for each decided bar
reaches ``GET /events`` and equals the journal's decision row; a client that never reads does not
stall the bar loop or grow the service's memory; stopping the service closes the streams."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import NQ, make_settings
from trader.domain import ACTION_NAMES
from trader.service.dashboard import DashboardHub, EquityCurve
from trader.service.supervisor import Service
from trader.wiring import open_service_run

GUARD_S = 60.0  # a hung test fails instead of hanging; never a timing assertion


def _settings(end: str, speed: float) -> Any:
    return make_settings(
        data={"paths": [str(NQ)], "end": end, "speed": speed},
        service={"feed": "recorded", "http_port": 0, "stop_timeout_s": 10.0},
    )


class Served:
    def __init__(self, svc: Service, hub: DashboardHub, task: asyncio.Task[int]) -> None:
        self.svc, self.hub, self.task = svc, hub, task
        assert svc.http is not None
        self.url = f"http://127.0.0.1:{svc.http.port}"
        self.journal = svc.run.journal.path


@asynccontextmanager
async def serving(tmp_path: Path, settings: Any, hub: DashboardHub) -> AsyncIterator[Served]:
    """A service run as ``trader run`` builds it (see ``run_service``), with our hub as observer."""
    run = await open_service_run(settings, "paper", tmp_path / "j.sqlite", False, observers=[hub])
    await run.engine.feed.open()
    svc = Service(settings, run, None, {}, dashboard=hub)
    task = asyncio.create_task(svc.main())
    while not svc.operator.ready:
        assert not task.done(), task.result()
        await asyncio.sleep(0.01)
    served = Served(svc, hub, task)
    try:
        yield served
    finally:
        svc.request_stop("test over")
        await asyncio.wait_for(task, GUARD_S)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each server-sent event, until the server ends the stream."""
    name, data = "message", ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield name, json.loads(data)
            name, data = "message", ""
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]


def slow_link(hub: DashboardHub, client: socket.socket) -> Any:
    """The server's stream to ``client``, its socket's send buffer made small: a slow link, since
    loopback would otherwise buffer megabytes for a client that never reads before the server
    notices."""
    port = client.getsockname()[1]
    (stream,) = [s for s in hub.streams if s.transport and s.transport.get_extra_info("peername")[1] == port]
    stream.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return stream


def journal_decisions(path: Path) -> dict[int, tuple]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(
            "SELECT bar_index, ts_ns, close, p_hold, p_buy, p_sell, p_move_to_be, p_enable_trail, "
            "p_disable_trail, rl_action, rl_conf, llm_action, llm_conf, llm_age_bars, method, reasons, "
            "fused_action, final_action, vetoes, flatten_reason, position, equity_usd, latency_us "
            "FROM decisions"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: r for r in rows}


def as_row(d: dict[str, Any]) -> tuple:
    """The journal's decision row as the dashboard's bar event tells it."""

    def action(name: str | None) -> int | None:
        return None if name is None else ACTION_NAMES.index(name)

    vetoes = ";".join(f"{v['rule']}:{v['reason']}" for v in d["vetoes"]) or None
    advice_age = None if d["advice"] is None else d["advice"]["age_bars"]
    return (
        d["bar_index"],
        d["ts_ns"],
        d["close"],
        *d["probs"],
        action(d["rl_action"]),
        d["rl_confidence"],
        action(d["llm_action"]),
        d["llm_confidence"],
        advice_age,
        d["method"],
        ";".join(d["reasons"]),
        action(d["fused_action"]),
        action(d["final_action"]),
        vetoes,
        d["flatten_reason"],
        d["position"],
        d["equity_usd"],
        d["latency_us"],
    )


def test_each_decided_bar_reaches_the_stream_as_the_journal_records_it_and_stop_closes_it(
    tmp_path, monkeypatch
):
    """1260 bars (960 warm-up) at 20000x: the stream starts with a snapshot, then one ``bar`` event
    per decided bar in order, each equal to its journal row; the service's stop ends the stream
    with ``bye`` even while a second client never reads."""
    monkeypatch.delenv("TRADER_CONTROL_TOKEN", raising=False)  # no token: a read-only dashboard
    got: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    names: list[str] = []
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def scenario() -> Served:
        hub = DashboardHub()
        async with serving(tmp_path, _settings("2023-11-20T15:00:00", 20000.0), hub) as srv:
            async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/events") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                events = sse_events(resp)
                async for name, data in events:
                    names.append(name)
                    if name == "snapshot":
                        snapshots.append(data)
                    elif name == "bar":
                        got.append(data)
                        if sum(d["ready"] for d in got) >= 20:
                            break
                # a second client that never reads is open when the service stops
                stalled.connect(("127.0.0.1", srv.svc.http.port))  # type: ignore[union-attr]
                stalled.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                while len(hub.streams) < 2:
                    await asyncio.sleep(0.01)
                stuck = slow_link(hub, stalled)
                # it has stopped taking data: the server's buffer is full, its events wait
                while stuck.transport.get_write_buffer_size() < 65536 or len(stuck.backlog) < 5:
                    assert not srv.task.done(), "the run ended before the client stalled"
                    await asyncio.sleep(0.01)
                srv.svc.request_stop("test")
                async for name, _ in events:  # the rest, up to the server's goodbye
                    names.append(name)
                assert names[-1] == "bye"
            await asyncio.wait_for(srv.task, GUARD_S)
            assert not hub.streams  # both streams ended, the stalled one too
            assert hub.slow_disconnects == 0  # closed by the stop, not by its write timeout
            return srv

    srv = asyncio.run(asyncio.wait_for(scenario(), GUARD_S))
    stalled.settimeout(5)  # closed by the server: EOF (after its bye) or a reset, never a hang
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := stalled.recv(65536):
            received += chunk
    stalled.close()
    assert received.startswith(b"HTTP/1.1 200")

    first = snapshots[0]
    assert names[0] == "snapshot"
    assert {"decisions", "equity", "state", "health", "llm", "control_enabled"} <= first.keys()
    assert first["state"]["mode"] == "paper" and first["control_enabled"] is False
    assert first["health"]["feed"]["kind"] and "journal" in first["health"]
    # one event per bar, in order, with no gap unless a snapshot (a resync) came between
    indices = [d["bar_index"] for d in got]
    assert indices == sorted(indices)
    if len(snapshots) == 1:
        assert indices == list(range(indices[0], indices[0] + len(indices)))
    ready = [d for d in got if d["ready"]]
    assert len(ready) >= 20
    assert all(abs(sum(d["probs"]) - 1.0) < 1e-4 for d in ready)
    assert all(d["rl_action"] in ACTION_NAMES and d["final_action"] in ACTION_NAMES for d in ready)
    rows = journal_decisions(srv.journal)
    for d in got:
        assert as_row(d) == rows[d["bar_index"]]
    assert got[-1]["bar_index"] < max(rows)  # the run went on after we stopped reading


def test_a_client_that_never_reads_neither_stalls_the_bar_loop_nor_grows_the_backlog(tmp_path):
    """A browser tab that stops reading: its events wait in a bounded backlog (the oldest dropped,
    a snapshot sent instead when it catches up) and, once its socket takes nothing for the write
    timeout, it is disconnected. Meanwhile every bar is decided and a reading client sees them all
    to the end of the data."""
    hub = DashboardHub(backlog=32, write_timeout_s=1.0)
    seen: list[int] = []
    worst_backlog = 0
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def watch_backlog() -> None:
        nonlocal worst_backlog
        while True:
            for s in tuple(hub.streams):
                worst_backlog = max(worst_backlog, len(s.backlog))
            await asyncio.sleep(0.005)

    async def scenario() -> tuple[Served, int]:
        async with serving(tmp_path, _settings("2023-11-20T06:00:00", 20000.0), hub) as srv:
            slow.connect(("127.0.0.1", srv.svc.http.port))  # type: ignore[union-attr]
            slow.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never reads
            while not hub.streams:
                await asyncio.sleep(0.01)
            slow_link(hub, slow)
            watcher = asyncio.create_task(watch_backlog())
            async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/events") as resp:
                async for name, data in sse_events(resp):
                    if name == "bar":
                        seen.append(data["bar_index"])
                    elif name == "snapshot" and data["decisions"]:
                        seen.extend(d["bar_index"] for d in data["decisions"])
            # the data ran out: the service stopped by itself and said bye to the reader
            status = await asyncio.wait_for(srv.task, GUARD_S)
            watcher.cancel()
            return srv, status

    srv, exit_code = asyncio.run(asyncio.wait_for(scenario(), GUARD_S))
    slow.close()
    assert exit_code == 0
    assert srv.svc.engine.stats.status == "completed"
    bars = srv.svc.engine.stats.bars
    assert bars == 720  # 18:00 to 06:00: every recorded bar was decided
    assert len(journal_decisions(srv.journal)) == bars
    assert seen[-1] == bars - 1  # the reader got the last bar
    assert hub.slow_disconnects == 1  # the client that never read was dropped ...
    assert 0 < worst_backlog <= 32  # ... and its events never piled up beyond the bound


def test_the_page_and_its_files_carry_a_strict_policy_and_nothing_else_is_served(tmp_path):
    """``GET /`` and its two files (packaged, same origin, CSP and nosniff), the snapshot as JSON,
    an operator's halt on the stream at once, and refusals as JSON: an unknown or traversing file
    name, too many streams, a POST."""
    hub = DashboardHub(max_streams=1)

    async def scenario() -> None:
        async with (
            serving(tmp_path, _settings("2023-11-19T20:00:00", 600.0), hub) as srv,
            aiohttp.ClientSession() as http,
        ):
            async with http.get(f"{srv.url}/") as r:
                page = await r.text()
                assert r.status == 200 and r.content_type == "text/html"
                assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
                assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert '<script src="/static/dashboard.js"' in page and "<script>" not in page
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing off-site
            for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
                async with http.get(f"{srv.url}/static/{name}") as r:
                    assert r.status == 200 and r.content_type == kind and len(await r.read()) > 1000
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            for bad in ("nope.js", "..%2Fhttp.py", "dashboard.html", "%2E%2E%2F%2E%2E%2Fconfig.py"):
                async with http.get(f"{srv.url}/static/{bad}") as r:
                    assert r.status == 404 and "error" in await r.json()
            while not hub.decisions:
                await asyncio.sleep(0.01)
            async with http.get(f"{srv.url}/dashboard/state") as r:
                snap = await r.json()
            assert snap["decisions"] and snap["state"]["run_id"] == srv.svc.run.run_id
            indices = [d["bar_index"] for d in snap["decisions"]]
            assert indices == list(range(indices[0], indices[0] + len(indices)))
            assert snap["equity"]["points"][-1][0] == indices[-1]  # the curve reaches the last bar
            assert snap["health"]["journal"]["problem"] is None and snap["streams"]["max"] == 1
            async with http.get(f"{srv.url}/events") as first:
                assert first.status == 200
                async with http.get(f"{srv.url}/events") as second:
                    assert second.status == 503 and "too many" in (await second.json())["error"]
                # an operator's halt reaches the stream as it happens, not at the next bar
                srv.svc.http.token = "t0ken"  # type: ignore[union-attr]
                auth = {"Authorization": "Bearer t0ken"}
                async with http.post(f"{srv.url}/halt", json={"reason": "lunch"}, headers=auth) as r:
                    assert r.status == 200
                async for name, data in sse_events(first):
                    if name == "halt":
                        assert data["reasons"] == ["lunch"]
                        break
                srv.svc.operator.control("resume", "127.0.0.1")  # no bar can come between these
                assert hub.halt_reasons == ()
            async with http.post(f"{srv.url}/events") as r:
                assert r.status == 405

    asyncio.run(asyncio.wait_for(scenario(), GUARD_S))


def test_the_equity_curve_stays_bounded_and_restarts_with_each_session():
    curve = EquityCurve(max_points=100)
    for i in range(10_000):
        curve.add(i, i * 60_000_000_000, 50_000.0 + i)
    assert len(curve.points) < 100
    idx = [p[0] for p in curve.points]
    assert idx[0] == 0 and idx == sorted(idx)
    gaps = {b - a for a, b in itertools.pairwise(idx)}
    assert gaps == {curve.stride}  # evenly thinned
    assert 10_000 - idx[-1] <= curve.stride
    curve.reset()
    curve.add(5, 0, 1.0)
    assert curve.points == [(5, 0, 1.0)] and curve.stride == 1
