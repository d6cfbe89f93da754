"""sd_notify over a real datagram socket; the watchdog follows the bar loop's health."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.conftest import make_settings
from trader.service.notify import LoopWatchdog, Notifier
from trader.service.operator import Operator
from trader.wiring import build_replay


def _receiver(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)  # the abstract namespace: $NOTIFY_SOCKET starts with "@"
    s.settimeout(1.0)
    return s


def test_notifier_speaks_the_datagram_protocol_and_is_silent_outside_systemd(monkeypatch):
    name = f"trader-test-{os.getpid()}"
    rx = _receiver(name)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier("@" + name)
    assert n.watchdog_s == 4.0
    assert n.ready("paper: position +0")
    assert rx.recv(1024) == b"READY=1\nSTATUS=paper: position +0"
    assert n.stopping()
    assert rx.recv(1024) == b"STOPPING=1\nSTATUS=stopping"
    n.close()
    rx.close()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    quiet = Notifier()
    assert not quiet.enabled and not quiet.ready()


def test_watchdog_pings_only_while_healthy(monkeypatch):
    name = f"trader-wd-{os.getpid()}"
    rx = _receiver(name)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    n = Notifier("@" + name)
    problem: list[str | None] = ["stuck in one bar for 12.0s"]
    wd = LoopWatchdog(n, lambda: problem[0])
    assert wd.interval_s == 1.0
    wd.tick()
    rx.settimeout(0.2)
    try:
        rx.recv(1024)
        raise AssertionError("a ping was sent while unhealthy")
    except TimeoutError:
        pass
    problem[0] = None
    wd.tick()
    assert rx.recv(1024) == b"WATCHDOG=1"
    assert (wd.pings, wd.withheld) == (1, 1)
    rx.close()


def test_a_stuck_bar_or_stale_data_is_unhealthy_and_stale_data_halts_entries(tmp_path):
    s = make_settings(service={"http_enabled": False, "stuck_bar_s": 5.0, "bar_interval_s": 1.0})
    run = build_replay(s, tmp_path / "j.sqlite", mode="paper")
    op = Operator(s, run, None)
    eng, controls = run.engine, run.controls
    eng.last_bar_at = time.monotonic()
    assert op.unhealthy() is None and not controls.halted
    eng.busy_since = time.monotonic() - 6.0
    assert op.unhealthy().startswith("stuck in one bar")
    eng.busy_since = 0.0
    eng.last_bar_at = time.monotonic() - 4.0  # > 3 bar intervals
    assert op.unhealthy().startswith("stale data")  # the watchdog and /healthz say so ...
    assert controls.stale and controls.halted  # ... and entries stop
    assert op.health(stopping=False)["stale_data"] is True
    eng.last_bar_at = time.monotonic()
    assert op.unhealthy() is None
    assert not controls.stale and not controls.halted  # data back: trading resumes by itself
    run.journal.close()


def _reload_setup(tmp_path, toml: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    from trader.config import load_settings

    overrides = {"advisor": {"mode": "sync"}, "service": {"http_enabled": False}}
    s = load_settings(cfg, overrides)
    run = build_replay(s, tmp_path / "j.sqlite", mode="paper")
    return cfg, run, Operator(s, run, cfg, overrides)


def _controls_rows(path):  # type: ignore[no-untyped-def]
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT action, result, reason FROM control ORDER BY rowid").fetchall()
    finally:
        con.close()


def test_reload_swaps_fusion_risk_and_the_advisor_schedule_together(tmp_path):
    cfg, run, op = _reload_setup(tmp_path, "[fusion]\nquery_interval = 5\n")
    eng = run.engine
    assert eng.advisor.interval == 5
    fusion_before, risk_before = eng.fusion, eng.risk
    cfg.write_text("[fusion]\nquery_interval = 7\nllm_weight = 0.5\n[risk]\nmax_consecutive_losses = 4\n")
    out = op.reload()
    assert "fusion.query_interval" in out["applied"] and "risk.max_consecutive_losses" in out["applied"]
    assert eng.advisor.interval == 7  # the advisor's schedule follows the reload
    assert eng.fusion is not fusion_before and eng.fusion.w == 0.5
    assert eng.risk is not risk_before and eng.settings.risk.max_consecutive_losses == 4
    run.journal.flush()
    assert _controls_rows(run.journal.path)[-1][:2] == ("reload", "accepted")
    run.journal.close()


def test_a_reload_naming_a_missing_plugin_changes_nothing_and_is_journaled(tmp_path):
    cfg, run, op = _reload_setup(tmp_path, "[fusion]\nquery_interval = 5\n")
    eng = run.engine
    before = (eng.fusion, eng.risk, eng.settings, eng.advisor.interval, eng.advisor.settings)
    cfg.write_text('[fusion]\nquery_interval = 9\nstrategy = "strategies.nope:Missing"\n')
    out = op.reload()
    assert "strategies.nope" in out["error"] and out["applied"] == {}
    assert (eng.fusion, eng.risk, eng.settings, eng.advisor.interval, eng.advisor.settings) == before
    cfg.write_text('[risk]\nrules = ["strategies.risk_rules:Nope"]\n')
    assert "Nope" in op.reload()["error"]
    assert eng.risk is before[1]
    run.journal.flush()
    rows = _controls_rows(run.journal.path)
    assert [r[:2] for r in rows] == [("reload", "rejected"), ("reload", "rejected")]
    assert "strategies.nope" in rows[0][2]
    run.journal.close()


def test_the_journal_reports_when_it_cannot_be_written(tmp_path):
    from trader.journal import Journal
    from trader.journal.rows import Row

    j = Journal(tmp_path / "j.sqlite", flush_interval_ms=10)
    assert j.health() is None
    (tmp_path / "j.sqlite").rename(tmp_path / "moved.sqlite")
    assert "is gone" in j.health()
    (tmp_path / "j.sqlite").write_bytes(b"")  # another file at the path
    assert "was replaced" in j.health()
    j.close()

    j = Journal(tmp_path / "k.sqlite", flush_interval_ms=10)
    j.record(Row("fills", ("run", 1)))  # a row the table cannot take: the writer fails
    j.commit_point()
    end = time.monotonic() + 5
    while j.health() is None and time.monotonic() < end:
        time.sleep(0.01)
    assert "journal writer failed" in (j.health() or "")


def test_a_lost_journal_or_a_long_broker_outage_makes_the_service_unhealthy(tmp_path):
    from tests.tradovate_server import FakeTradovate, shared_bars
    from trader.wiring import build_live

    s = make_settings(service={"http_enabled": False, "broker_down_limit_s": 0.2})
    run = build_replay(s, tmp_path / "j.sqlite", mode="paper")
    op = Operator(s, run, None)
    run.engine.last_bar_at = time.monotonic()
    assert op.unhealthy() is None
    (tmp_path / "j.sqlite").unlink()
    assert "is gone" in op.unhealthy() and op.health(stopping=False)["ok"] is False
    run.journal.close()

    fake = FakeTradovate(shared_bars(), 1000)
    cfg = fake.config() | {"password": "x", "sec": "y"}
    s = make_settings(tradovate=cfg, service={"http_enabled": False, "broker_down_limit_s": 0.2})
    live = build_live(s, tmp_path / "live.sqlite", "live")
    op = Operator(s, live, None)
    live.engine.last_bar_at = time.monotonic()
    time.sleep(0.3)  # the broker never connected
    assert op.unhealthy().startswith("broker tradovate disconnected for")
    live.journal.close()


def test_a_reload_becomes_the_runs_configuration_so_a_restart_continues(tmp_path):
    from trader.config import load_settings
    from trader.journal import reader
    from trader.wiring import config_differences

    cfg, run, op = _reload_setup(tmp_path, "[fusion]\nquery_interval = 5\n")
    cfg.write_text("[fusion]\nquery_interval = 7\n")
    assert op.reload()["applied"] == {"fusion.query_interval": 7}
    run.journal.flush()
    journaled = reader.latest_run(run.journal.path, "paper")
    assert journaled is not None
    now = load_settings(cfg, {"advisor": {"mode": "sync"}, "service": {"http_enabled": False}})
    assert config_differences(journaled.config_json, now) == []  # the restart may continue
    run.journal.close()


def test_a_control_during_a_bar_is_journaled_with_the_bar_never_before_it(tmp_path):
    import asyncio
    import sqlite3

    from trader.engine import WARMUP_CHOICE

    s = make_settings(service={"http_enabled": False})
    run = build_replay(s, tmp_path / "j.sqlite", mode="paper")
    eng = run.engine
    o = eng.observe(run.recorded.bar(0), 0)  # the bar is under way (as while it awaits a broker)
    eng.journal_control("halt", "127.0.0.1", "accepted", "mid-bar")
    run.journal.flush()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    assert con.execute("SELECT count(*) FROM control").fetchone()[0] == 0  # not committed half way
    asyncio.run(eng.decide(o, WARMUP_CHOICE))
    run.journal.flush()
    assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 1
    assert con.execute("SELECT action, bar_index FROM control").fetchall() == [("halt", 1)]
    con.close()
    run.journal.close()


def test_discarding_a_half_done_bar_keeps_what_a_real_broker_did(tmp_path):
    import sqlite3

    from trader.journal import Journal
    from trader.journal.rows import Row

    j = Journal(tmp_path / "j.sqlite")
    j.record(Row("control", ("r", "t", "halt", "x", "", "accepted", 0)))
    j.commit_point()
    j.record(Row("orders", ("r", "r-5-0", 5, 1, 1, 1, "market", "entry", 40)))
    j.record(Row("bars", ("r", 1, "bar", 5, 1, 1.0, 1.0, 1.0, 1.0, 1.0, 0)))
    j.discard_uncommitted(("orders", "fills"))
    j.record(Row("bars", ("r", 2, "bar", 6, 2, 1.0, 1.0, 1.0, 1.0, 1.0, 0)))  # never committed
    j.close()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    assert con.execute("SELECT client_id FROM orders").fetchall() == [("r-5-0",)]
    assert con.execute("SELECT count(*) FROM control").fetchone()[0] == 1
    # a close commits what was recorded; the discarded bar row is gone, the later one is there
    assert con.execute("SELECT seq FROM bars").fetchall() == [(2,)]
    con.close()


def test_a_broker_lockout_halts_entries_and_is_degraded_not_unhealthy(tmp_path):
    """A 429 lockout or a captcha penalty: entries halt with the reason in /state and /metrics,
    /healthz says "degraded" but the watchdog keeps being fed (a restart would only knock again);
    when the lockout ends, entries are allowed again by themselves."""
    from tests.tradovate_server import FakeTradovate, shared_bars
    from trader.service.http import EngineCollector
    from trader.wiring import build_live

    fake = FakeTradovate(shared_bars(), 1000)
    cfg = fake.config() | {"password": "x", "sec": "y"}
    s = make_settings(tradovate=cfg, service={"http_enabled": False})
    live = build_live(s, tmp_path / "live.sqlite", "live")
    op = Operator(s, live, None)
    eng, broker = live.engine, live.engine.broker
    broker.connected, broker.disconnected_at = True, None  # type: ignore[attr-defined]
    eng.last_bar_at = time.monotonic()
    op.ready = True

    def metric(name: str) -> float:
        fam = next(m for m in EngineCollector(op).collect() if m.name == name)
        return fam.samples[0].value

    broker.rest.gate.lock("HTTP 429 on POST /order/placeoso", 60.0)  # type: ignore[attr-defined]
    eng.apply_broker_events()
    health = op.health(stopping=False)
    assert op.unhealthy() is None and health["ok"] is True and health["status"] == "degraded"
    assert "429" in health["degraded"][0] and "429" in health["broker"]["blocked"]
    assert any("429" in r for r in op.state()["entries_halted_by"]) and op.controls.halted
    assert metric("trader_broker_blocked") == 1.0 and metric("trader_halted") == 1.0

    broker.rest.gate.locked_until = 0.0  # type: ignore[attr-defined]  # the lockout is over
    eng.apply_broker_events()
    assert op.health(stopping=False)["status"] == "ok" and not op.controls.halted
    assert metric("trader_broker_blocked") == 0.0
    live.journal.close()


def test_a_journal_from_before_a_new_key_continues_while_the_key_is_at_its_default():
    """An upgrade adds keys (their defaults keep the old behaviour): the old run's configuration,
    which lacks them, still matches; a non-default value of a new key, or a changed old key, does
    not."""
    import json

    from trader.config import load_settings
    from trader.wiring import config_differences

    now = load_settings(None, {})
    old = json.loads(now.model_dump_json())
    del old["execution"]["allow_no_stop_live"]
    del old["policy"]["batch_bars"]
    old.pop("notifications", None)
    assert config_differences(json.dumps(old), now) == []
    assert config_differences(json.dumps(old), load_settings(None, {"policy": {"batch_bars": 0}})) == [
        "policy.batch_bars"
    ]
    assert config_differences(json.dumps(old), load_settings(None, {"risk": {"max_contracts": 2}})) == [
        "risk.max_contracts"
    ]


def test_live_trading_without_a_protective_stop_is_refused_unless_meant(tmp_path):
    import asyncio

    from trader.errors import ConfigError
    from trader.wiring import open_service_run

    s = make_settings(execution={"stop_mode": "none"})
    with pytest.raises(ConfigError, match=r"execution.allow_no_stop_live"):
        asyncio.run(open_service_run(s, "live", tmp_path / "j.sqlite", fresh=False))
    assert not (tmp_path / "j.sqlite").exists()
