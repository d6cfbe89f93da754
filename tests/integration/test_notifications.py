"""Notifications (trader/service/alerts.py) through apprise's real json:// client to a real webhook
receiver on 127.0.0.1: what a service run or a replay sends matches its journal, halts and stale
feeds are announced when they happen, a failing or stalled endpoint costs neither a bar nor the
run, the rate limit and the queue count what they hold back, and the URL stays a secret."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from tests.conftest import NQ, make_settings
from tests.llm_server import ScriptedChatServer, free_port
from trader.config import Settings, load_settings
from trader.domain import BarDecided, FillApplied, RunEvent
from trader.errors import ConfigError
from trader.replay import ReplayOutcome, replay
from trader.service.alerts import (
    Alert,
    AlertSender,
    NotificationCollector,
    RateLimit,
    RunAlerts,
    build_alerts,
    notification_targets,
)
from trader.service.supervisor import run_service
from trader.wiring import build_replay

SECRET = "hunter2-webhook-secret"  # the password in the URL: must never leave the environment
TOKEN = "control-token-for-notification-tests"
ENV = "TRADER_TEST_NOTIFY_URLS"


class Webhook:
    """A webhook receiver on 127.0.0.1 (aiohttp in its own thread): keeps every JSON post apprise
    makes; can answer an error status, or hold requests until released."""

    def __init__(self, status: int = 200, stall: bool = False) -> None:
        self.status = status
        self.port = free_port()
        self.posts: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.answered = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._stall = stall
        self._released: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, path: str = "/hook", params: str = "") -> str:
        return f"json://alerts:{SECRET}@127.0.0.1:{self.port}{path}{params}"

    @property
    def messages(self) -> list[str]:
        with self._lock:
            return [p["message"] for p in self.posts]

    def of(self, title_part: str) -> list[str]:
        with self._lock:
            return [p["message"] for p in self.posts if title_part in p["title"]]

    def wait_for(self, pred: Callable[[list[str]], bool], timeout_s: float = 30.0) -> list[str]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if pred(self.messages):
                return self.messages
            time.sleep(0.02)
        raise AssertionError(f"not received within {timeout_s} s; got {self.messages}")

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self._stall = False
        if self._released is not None:
            self._released.set()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.posts.append(body)
            self.auth.append(request.headers.get("Authorization", ""))
        if self._stall:
            assert self._released is not None
            await self._released.wait()
        self.answered += 1
        return web.Response(status=self.status, text="ok" if self.status == 200 else "scripted failure")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Webhook:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _notifications(**kw: Any) -> dict[str, Any]:
    # no rate limit to speak of unless a test sets one
    return {
        "urls_env": ENV,
        "per_minute": 600.0,
        "burst": 1000,
        "queue_size": 10_000,
        "flush_timeout_s": 10.0,
        **kw,
    }


def _replay_with_alerts(
    tmp_path: Path, env: dict[str, str], **notifications: Any
) -> tuple[ReplayOutcome, RunAlerts]:
    """A replay of three days of NQ with notifications as a run observer; (outcome, alerts)."""
    s = make_settings(
        data={"paths": [str(NQ)], "end": "2023-11-22T17:00:00"}, notifications=_notifications(**notifications)
    )
    alerts = build_alerts(s, "replay", env)
    assert alerts is not None
    alerts.start()
    try:
        out = replay(s, journal_path=tmp_path / "j.sqlite", observers=(alerts,))
    finally:
        alerts.close()
    return out, alerts


def _journal(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


FILL = re.compile(
    r"NQ fill: (BUY|SELL) (\d+) @ (\d+\.\d\d) \(([^)]+)\) position ([+-]\d+)(?:, stop (\d+\.\d\d))?"
)
SESSION = re.compile(
    r"NQ session (\d{4}-\d\d-\d\d)( \(to the service's stop\))?: "
    r"net ([+-])\$([\d,]+\.\d\d), (\d+) trades?, equity \$([\d,]+\.\d\d)"
)


# -- a service run --------------------------------------------------------------------------------


def _service_settings(port: int = 0, **over: Any) -> Settings:
    service = {
        "feed": "recorded",
        "http_port": port,
        "http_enabled": port != 0,
        "control_token_env": "TRADER_TEST_TOKEN",
        "stop_timeout_s": 10.0,
        **over.pop("service", {}),
    }
    return make_settings(service=service, **over)


def test_a_service_run_sends_every_fill_and_session_summary_as_the_journal_has_them(tmp_path, monkeypatch):
    with Webhook() as hook:
        monkeypatch.setenv(ENV, hook.url())
        s = _service_settings(
            data={"paths": [str(NQ)], "end": "2023-11-22T06:00:00"},
            notifications=_notifications(kinds=["fill", "stop_moved", "daily_summary"]),
        )
        journal = tmp_path / "j.sqlite"
        assert asyncio.run(run_service(s, None, {}, "paper", str(journal))) == 0

        fills = _journal(journal, "SELECT side, qty, price, purpose FROM fills ORDER BY seq")
        stops = _journal(
            journal, "SELECT position, stop_price FROM account WHERE reason LIKE 'fill:%' ORDER BY rowid"
        )
        assert len(fills) > 4
        said = [FILL.fullmatch(m.split("; closed")[0]) for m in hook.of("· fill")]
        assert all(said), hook.of("· fill")
        assert [(m[1], int(m[2]), float(m[3]), m[4]) for m in said if m] == [
            ("BUY" if side == 1 else "SELL", qty, price, purpose) for side, qty, price, purpose in fills
        ]
        # the position and the stop working after each fill, as the account rows have them
        assert [(int(m[5]), float(m[6]) if m[6] else None) for m in said if m] == [
            (pos, stop if pos else None) for pos, stop in stops
        ]
        # an exit says what the trade made, as the trades table has it
        trades = _journal(journal, "SELECT pnl_usd, exit_ts_ns FROM trades ORDER BY seq")
        closed = [
            re.search(r"; closed (?:long|short) \d+ [\d.]+ -> [\d.]+: ([+-])\$([\d,.]+)", m)
            for m in hook.of("· fill")
        ]
        made = [(1 if c[1] == "+" else -1) * float(c[2].replace(",", "")) for c in closed if c]
        assert made == pytest.approx([round(p, 2) for p, _ in trades], abs=0.005)

        # stop moves chain from the stop the entry placed, and land on the tick grid
        moves = [
            re.fullmatch(r"NQ stop moved: ([\d.]+) -> ([\d.]+) \(position ([+-]\d+)\)", m)
            for m in hook.of("· stop moved")
        ]
        assert moves and all(moves)
        assert all(float(m[2]) % 0.25 == 0 and float(m[1]) != float(m[2]) for m in moves if m)

        # one summary per session, its P&L and trade count those of the trades that closed in it
        tz = ZoneInfo("America/New_York")
        by_day: dict[str, list[float]] = {}
        for pnl, exit_ns in trades:
            by_day.setdefault(datetime.fromtimestamp(exit_ns / 1e9, tz).date().isoformat(), []).append(pnl)
        summaries = [SESSION.fullmatch(m) for m in hook.of("· session summary")]
        assert summaries and all(summaries), hook.of("· session summary")
        equity = s.account.starting_balance_usd
        for m in summaries:
            assert m is not None
            day_pnl = sum(by_day.get(m[1], []))
            equity += day_pnl
            net = (1 if m[3] == "+" else -1) * float(m[4].replace(",", ""))
            assert net == pytest.approx(day_pnl, abs=0.01), m[0]
            assert int(m[5]) == len(by_day.get(m[1], [])), m[0]
            assert float(m[6].replace(",", "")) == pytest.approx(equity, abs=0.01), m[0]
        assert {m[1] for m in summaries if m} >= set(by_day)
        assert summaries[-1] is not None and summaries[-1][2]  # the stop cut the last one short
        assert hook.auth and all(
            a == "Basic " + base64.b64encode(f"alerts:{SECRET}".encode()).decode() for a in hook.auth
        )


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


async def _post(session: aiohttp.ClientSession, url: str, reason: str = "") -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(url, headers=headers, json={"reason": reason} if reason else None) as r:
        return r.status


async def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


def test_an_operator_halt_and_resume_are_announced_and_the_url_never_shows(
    tmp_path, monkeypatch, capsys, caplog
):
    caplog.set_level("DEBUG")
    port = free_port()
    with Webhook() as hook:
        monkeypatch.setenv(ENV, hook.url())
        monkeypatch.setenv("TRADER_TEST_TOKEN", TOKEN)
        s = _service_settings(
            port,
            data={"paths": [str(NQ)], "speed": 600.0},
            notifications=_notifications(),
        )
        journal = tmp_path / "j.sqlite"
        base = f"http://127.0.0.1:{port}"

        async def session() -> tuple[int, str, str]:
            service = asyncio.create_task(run_service(s, None, {}, "paper", str(journal)))
            async with aiohttp.ClientSession() as http:

                async def ready() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        return (await _get(http, f"{base}/healthz"))[0] == 200
                    return False

                end = time.monotonic() + 60
                while not await ready():
                    assert not service.done() and time.monotonic() < end
                    await asyncio.sleep(0.1)
                assert await _post(http, f"{base}/halt", "lunch break") == 200
                await asyncio.to_thread(hook.wait_for, lambda ms: any("lunch break" in m for m in ms))
                assert await _post(http, f"{base}/resume") == 200
                await asyncio.to_thread(hook.wait_for, lambda ms: any("resumed" in m for m in ms))
                await _until(lambda: hook.answered >= 2)
                _, state = await _get(http, f"{base}/state")
                metrics = ""
                for _ in range(100):  # counted once apprise has its answer
                    _, metrics = await _get(http, f"{base}/metrics")
                    if 'trader_notifications_sent_total{kind="resume"} 1.0' in metrics:
                        break
                    await asyncio.sleep(0.05)
            assert not service.done()
            os.kill(os.getpid(), signal.SIGTERM)  # the service's own handler: a graceful stop
            return await service, state, metrics

        with structlog.testing.capture_logs() as logs:
            code, state, metrics = asyncio.run(session())
    assert code == 0
    assert hook.of("· halted") == ["NQ halted by the operator: lunch break"]
    assert hook.of("· resumed") == ["NQ resumed: lunch break lifted; entries allowed again"]
    assert 'trader_notifications_sent_total{kind="halt"} 1.0' in metrics
    assert 'trader_notifications_sent_total{kind="resume"} 1.0' in metrics
    assert not re.search(r"^trader_notifications_(failed|dropped)_total\{", metrics, re.M)
    # the URL (and its password) is nowhere: not in /state, the journal's config, the logs
    started = [e for e in logs if e["event"] == "notifications_on"]
    assert started and started[0]["services"] == ["JSON #1"]
    assert SECRET not in state and str(hook.port) not in state
    (config_json,) = _journal(journal, "SELECT config_json FROM runs")[0]
    assert f'"urls_env":"{ENV}"' in config_json  # the variable's name, never its value
    assert SECRET not in config_json and f"127.0.0.1:{hook.port}" not in config_json
    assert SECRET not in repr(logs)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert SECRET not in caplog.text


def test_a_stale_feed_is_announced_when_bars_stop_and_again_when_they_return(tmp_path, monkeypatch):
    # the daily break (17:00 to 18:00) played at 1000x is 3.6 s without a bar; the limit is 1 s
    with Webhook() as hook:
        monkeypatch.setenv(ENV, hook.url())
        s = _service_settings(
            service={"bar_interval_s": 0.5, "stale_bar_multiple": 2.0},
            data={
                "paths": [str(NQ)],
                "start": "2023-11-20T16:45:00",
                "end": "2023-11-20T18:05:00",
                "speed": 1000.0,
            },
            notifications=_notifications(kinds=["stale_feed"]),
        )
        assert asyncio.run(run_service(s, None, {}, "paper", str(tmp_path / "j.sqlite"))) == 0
    said = hook.of("· stale feed")
    stale = [
        i
        for i, m in enumerate(said)
        if re.fullmatch(r"NQ halted: stale data \(no bar for \d+ s, limit 1 s\)", m)
    ]
    back = [i for i, m in enumerate(said) if m == "NQ data back: bars arriving again; entries allowed again"]
    assert stale and back and stale[0] < back[-1], said


def test_a_lost_journal_is_announced_as_an_error_as_the_service_stops(tmp_path, monkeypatch):
    port = free_port()
    with Webhook() as hook:
        monkeypatch.setenv(ENV, hook.url())
        s = _service_settings(port, data={"paths": [str(NQ)], "speed": 600.0}, notifications=_notifications())
        journal = tmp_path / "j.sqlite"

        async def session() -> int:
            service = asyncio.create_task(run_service(s, None, {}, "paper", str(journal)))
            async with aiohttp.ClientSession() as http:
                end = time.monotonic() + 60
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        if (await _get(http, f"http://127.0.0.1:{port}/healthz"))[0] == 200:
                            break
                    assert not service.done() and time.monotonic() < end
                    await asyncio.sleep(0.1)
            journal.unlink()  # the recovery source is gone: trading must stop
            return await asyncio.wait_for(service, 60)

        assert asyncio.run(session()) == 2
    assert hook.of("· error") == [f"NQ journal lost: journal file {journal} is gone; trading stops"]


def test_a_service_that_cannot_start_says_why(tmp_path, monkeypatch):
    with Webhook() as hook:
        monkeypatch.setenv(ENV, hook.url())
        s = _service_settings(notifications=_notifications())
        with pytest.raises(ConfigError, match="live mode needs the live feed"):
            asyncio.run(run_service(s, None, {}, "live", str(tmp_path / "j.sqlite")))
        # sent before run_service returned: close() flushed it
        assert hook.of("· error") == [
            "NQ error: the service failed: ConfigError: service.feed: live mode needs the live feed "
            "(tradovate), not recorded bars"
        ]


# -- replays with notifications as an observer ----------------------------------------------------


def test_an_endpoint_that_fails_or_is_down_counts_failures_and_the_run_goes_on(tmp_path):
    plain = replay(
        make_settings(data={"paths": [str(NQ)], "end": "2023-11-22T17:00:00"}),
        journal_path=tmp_path / "p.sqlite",
    )
    with Webhook(status=500) as failing:
        down = f"json://127.0.0.1:{free_port()}/hook"  # nothing listens there
        with structlog.testing.capture_logs() as logs:
            out, alerts = _replay_with_alerts(tmp_path, {ENV: f"{failing.url()} {down}"}, kinds=["fill"])
    assert out.status == "completed" and out.trades == plain.trades and out.stats.equity == plain.stats.equity
    messages = out.stats.fills
    assert len(failing.posts) == messages and failing.answered == messages
    st = alerts.stats
    assert st.sent == {}
    assert sum(st.failed.values()) == 2 * messages  # each message, each URL
    failed = [e for e in logs if e["event"] == "notification_failed"]
    assert {e["service"] for e in failed} == {"JSON #1", "JSON #2"} and len(failed) == 2 * messages
    assert SECRET not in repr(logs)
    registry = CollectorRegistry()
    registry.register(NotificationCollector(st))
    text = generate_latest(registry).decode()
    assert f'trader_notifications_failed_total{{kind="fill"}} {2 * out.stats.fills}.0' in text
    assert "trader_notifications_queued 0.0" in text


def test_a_burst_beyond_the_rate_limit_becomes_one_suppressed_count(tmp_path):
    with Webhook() as hook:
        out, alerts = _replay_with_alerts(
            tmp_path, {ENV: hook.url()}, kinds=["fill"], burst=2, per_minute=0.01
        )
    fills = out.stats.fills
    assert fills > 10
    said = hook.messages
    assert len(said) == 3 and all(FILL.match(m) for m in said[:2])
    assert (
        said[2]
        == f"NQ: {fills - 2} more fill notifications suppressed (rate limit: 2 at once, 0.01 a minute)"
    )
    assert alerts.stats.suppressed == {"fill": fills - 2}
    assert alerts.stats.sent == {"fill": 3}


def test_a_kind_switched_off_sends_nothing(tmp_path):
    with Webhook() as hook:
        out, alerts = _replay_with_alerts(tmp_path, {ENV: hook.url()}, kinds=["daily_summary"])
    assert out.stats.fills > 0
    assert hook.messages and all(SESSION.fullmatch(m) for m in hook.messages)
    assert not any("fill" in p["title"] for p in hook.posts)
    assert set(alerts.stats.sent) == {"daily_summary"}


def test_a_stalled_endpoint_fills_the_queue_not_the_bar_loop(tmp_path):
    with Webhook(stall=True) as hook:
        s = make_settings(
            data={"paths": [str(NQ)], "end": "2023-11-22T17:00:00"},
            notifications=_notifications(kinds=["fill"], queue_size=5),
        )
        # apprise's read timeout set long: the sender stays stuck on the message the endpoint holds
        alerts = build_alerts(s, "replay", {ENV: hook.url(params="?rto=60")})
        assert alerts is not None
        alerts.start()
        assert alerts.sender.offer(Alert("fill", "NQ replay · fill", "before the run"))
        hook.wait_for(lambda ms: ms == ["before the run"])
        out = replay(s, journal_path=tmp_path / "j.sqlite", observers=(alerts,))
        # every bar was decided while the endpoint held that message unanswered
        assert out.status == "completed" and out.stats.fills > 10
        assert out.stats.bars == len(out.stats.equity) > 1000 and hook.answered == 0
        st = alerts.stats
        assert st.queued == 5  # the run's last five fills wait; the older ones were dropped
        assert st.dropped == {"queue_full": out.stats.fills - 5}
        hook.release()
        alerts.close()
    said = hook.messages
    assert len(said) == 6 and st.sent == {"fill": 6} and st.queued == 0
    # the first message after the drops says how many were lost; the rest are the run's last fills
    assert said[1].endswith(f"({out.stats.fills - 5} earlier notifications dropped: queue full)")
    last = _journal(tmp_path / "j.sqlite", "SELECT side, price FROM fills ORDER BY seq DESC LIMIT 5")[::-1]
    assert [FILL.match(m)[3] for m in said[1:]] == [f"{price:.2f}" for _, price in last]  # type: ignore[index]


def test_the_llm_going_down_and_coming_back_is_announced(tmp_path):
    with ScriptedChatServer() as llm, Webhook() as hook:
        s = make_settings(
            data={"paths": [str(NQ)], "end": "2023-11-21T17:00:00"},
            advisor={"mode": "sync", "backend": "openai", "openai": {"base_url": llm.base_url}},
            notifications=_notifications(kinds=["llm_down"]),
        )

        class Outage:
            """The LLM server fails from its 5th question to its 12th (between bars, as a real one would)."""

            def on_event(self, event: RunEvent) -> None:
                if isinstance(event, BarDecided):
                    n = len(llm.requests)
                    llm.status = 500 if 4 <= n < 12 else 200

        alerts = build_alerts(s, "replay", {ENV: hook.url()})
        assert alerts is not None
        run = build_replay(s, tmp_path / "j.sqlite", observers=(Outage(), alerts))
        alerts.attach(run)
        alerts.start()

        async def go() -> None:
            await run.engine.run()
            await run.engine.close()

        try:
            asyncio.run(go())
        finally:
            run.journal.close()
            alerts.close()
        assert len(llm.requests) > 14
    assert hook.messages == [
        "NQ LLM advice down: 3 queries in a row failed (3 errors, 0 timeouts); the RL policy decides alone",
        "NQ LLM advice back: answering again after 8 failed queries",
    ]


def test_an_observer_that_fails_is_announced_as_an_error(tmp_path):
    class Exploding:
        def on_event(self, event: RunEvent) -> None:
            if isinstance(event, FillApplied):
                raise RuntimeError("a dashboard bug")

    with Webhook() as hook:
        s = make_settings(
            data={"paths": [str(NQ)], "end": "2023-11-21T17:00:00"},
            notifications=_notifications(kinds=["error"]),
        )
        alerts = build_alerts(s, "replay", {ENV: hook.url()})
        assert alerts is not None
        alerts.start()
        out = replay(s, journal_path=tmp_path / "j.sqlite", observers=(alerts, alerts.guard(Exploding())))
        alerts.close()
    assert out.status == "completed"
    assert hook.messages == [
        "NQ error: run observer Exploding failed and was dropped "
        "(RuntimeError (details in the service log)); trading goes on"
    ]


# -- the sender, the rate limit and the URLs, on their own -----------------------------------------


def test_the_stop_sends_what_it_can_within_its_bound_then_counts_the_rest_dropped():
    with Webhook(stall=True) as hook:
        cfg = make_settings(notifications=_notifications(flush_timeout_s=0.3)).notifications
        sender = AlertSender(notification_targets(cfg, {ENV: hook.url(params="?rto=60")}), cfg, "NQ")
        sender.start()
        for i in range(4):
            assert sender.offer(Alert("fill", "NQ replay · fill", f"fill {i}"))
        hook.wait_for(lambda ms: ms == ["fill 0"])
        sender.close()  # the endpoint holds "fill 0": the flush gives up on the other three
        assert sender.stats.dropped == {"shutdown": 3} and sender.stats.queued == 0
        assert not sender.offer(Alert("fill", "NQ replay · fill", "too late"))
        assert sender.stats.dropped == {"shutdown": 4}
        hook.release()
        hook.wait_for(lambda ms: hook.answered == 1)
    assert hook.messages == ["fill 0"]


def test_the_rate_limit_is_per_kind_refills_over_time_and_reports_what_it_held_back():
    now = [0.0]
    limit = RateLimit(per_minute=6.0, burst=2, clock=lambda: now[0])
    assert [limit.take("fill") for _ in range(4)] == [True, True, False, False]
    assert limit.take("halt")  # another kind has its own bucket
    assert limit.due() == []  # no token yet: the count waits
    now[0] = 10.0  # 6 a minute: one token every 10 s
    assert limit.due() == [("fill", 2)]  # the held-back count goes out, spending the token
    assert not limit.take("fill") and limit.held == {"fill": 1}
    now[0] = 20.0
    assert limit.take("fill") and limit.fold("fill") == 1  # folded into the message that goes
    now[0] = 1000.0
    assert [limit.take("fill") for _ in range(3)] == [True, True, False]  # never more than the burst
    assert limit.drain() == [("fill", 1)] and limit.held == {}


def test_notification_urls_are_refused_in_a_config_file_without_being_repeated(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(f'[notifications]\nurls = "tgram://123456:{SECRET}/789"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    assert "notifications.urls: notification URLs are secrets" in str(err.value)
    assert "TRADER_NOTIFY_URLS" in str(err.value) and SECRET not in str(err.value)
    f.write_text(f'[notifications]\nurls_env = "json://u:{SECRET}@host/x"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    assert "notifications.urls_env" in str(err.value) and "not a URL" in str(err.value)
    assert SECRET not in str(err.value)


def test_a_url_apprise_cannot_use_fails_at_start_named_by_position_not_text():
    s = make_settings(notifications={"urls_env": ENV})
    with pytest.raises(ConfigError) as err:
        build_alerts(s, "paper", {ENV: f"json://127.0.0.1:9/hook , nosuchservice://{SECRET}@x"})
    assert f"{ENV}: URL 2 of 2 (scheme 'nosuchservice')" in str(err.value)
    assert SECRET not in str(err.value)
    assert build_alerts(s, "paper", {}) is None  # unset: no notifications
    assert build_alerts(s, "paper", {ENV: "  "}) is None
    two = build_alerts(s, "paper", {ENV: "json://127.0.0.1:9/a,ntfy://ntfy.sh/topic"})
    assert two is not None and two.sender.services == ["JSON #1", "ntfy #2"]


def test_an_error_message_keeps_a_brokers_response_text_out_of_the_chat():
    """A broker's error may quote its server's response (account details): only its type goes to
    the chat service; our own configuration and data errors keep their text (it names the key)."""
    from trader.adapters.tradovate.rest import RejectedError
    from trader.errors import ConfigError
    from trader.service.alerts import describe_error

    leaked = RejectedError("order/placeorder refused: {'accountSpec': 'DEMO123456', 'balance': 51234.5}")
    text = describe_error(leaked)
    assert "DEMO123456" not in text and "51234" not in text
    assert text.startswith("RejectedError")
    assert describe_error(ConfigError("risk.max_contracts: must be >= 1")) == (
        "ConfigError: risk.max_contracts: must be >= 1"
    )
    assert "secret-host" not in describe_error(OSError("cannot reach https://user:pw@secret-host/"))
