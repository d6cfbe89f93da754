"""sd_notify over a real datagram socket; the watchdog follows the bar loop's health."""

from __future__ import annotations

import os
import socket
import time

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
