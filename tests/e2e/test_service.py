"""`trader run` as systemd runs it: a real notify socket, real HTTP, real signals; and the units."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.child import Child
from tests.llm_server import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def pump(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for m in self.messages:
                if key in m:
                    return m
            self.pump(min(end, time.monotonic() + 0.5))
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")


def http(method: str, url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, (
                json.loads(raw)
                if r.headers.get_content_type() == "application/json"
                else {"text": raw.decode()}
            )
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_service_lifecycle_notify_watchdog_http_control_reload_and_stop(tmp_path):
    port = free_port()
    cfg = tmp_path / "trader.toml"
    base = f"""
[advisor]
mode = "off"
[service]
http_port = {port}
stop_timeout_s = 10.0
feed = "recorded"
[data]
end = "2023-11-29T06:00:00"
speed = 3000.0
"""
    cfg.write_text(base)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRADER_", "NOTIFY_", "WATCHDOG_"))}
    env.update(
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="2000000",
        TRADER_CONTROL_TOKEN=TOKEN,
        TRADER_LOGGING__FORMAT="json",
    )
    proc = Child(
        [
            sys.executable,
            "-m",
            "trader",
            "run",
            "--config",
            str(cfg),
            "--journal",
            str(tmp_path / "j.sqlite"),
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = notify.wait_for("READY", 60)
        assert ready["READY"] == "1" and ready["STATUS"].startswith("paper: position")
        notify.wait_for("WATCHDOG", 5)  # pinged from the loop's health, every WATCHDOG_USEC/2
        url = f"http://127.0.0.1:{port}"

        code, health = http("GET", f"{url}/healthz")
        assert code == 200 and health["ok"] and health["ready"] and not health["halted"]
        code, metrics = http("GET", f"{url}/metrics")
        text = metrics["text"]
        assert code == 200 and "trader_bars_total" in text
        assert 'trader_decision_latency_seconds_bucket{le="+Inf"}' in text
        assert re.search(r"trader_equity_usd \d", text)
        assert re.search(r"trader_fills_total \d", text) and "trader_vetoes_total" in text
        code, state = http("GET", f"{url}/state")
        assert code == 200 and state["mode"] == "paper" and state["bars"] > 0

        assert http("POST", f"{url}/halt")[0] == 401  # no token
        assert http("POST", f"{url}/halt", token="wrong")[0] == 401
        assert http("POST", f"{url}/halt", token=TOKEN, body=b"{not json")[0] == 400
        assert http("POST", f"{url}/nothing", token=TOKEN)[0] == 404
        assert http("GET", f"{url}/halt")[0] == 405
        code, res = http("POST", f"{url}/halt", token=TOKEN, body=b'{"reason": "test halt"}')
        assert code == 200 and res["halted"] is True
        assert http("GET", f"{url}/state")[1]["halted"] is True
        code, res = http("POST", f"{url}/resume", token=TOKEN)
        assert code == 200 and res["halted"] is False

        # SIGHUP: llm_weight is safe to change live; the tick size is not
        cfg.write_text(base + "[fusion]\nllm_weight = 0.45\n[instrument]\ntick_size = 0.5\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert time.monotonic() - t0 < 10.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    notify.pump(time.monotonic() + 0.5)
    assert any("STOPPING" in m for m in notify.messages)
    assert sum("WATCHDOG" in m for m in notify.messages) >= 1
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    reload = next(x for x in lines if x.get("event") == "config_reloaded")
    assert reload["applied"] == {"fusion.llm_weight": 0.45}
    assert reload["restart_required"] == ["instrument.tick_size"]
    assert all(x.get("run_id") and x.get("mode") == "paper" for x in lines if x.get("event") == "ready")
    assert reload["run_id"] and reload["mode"] == "paper" and reload["bar_time"].startswith("2023-11-")
    assert TOKEN not in out  # the token never reaches the logs

    con = sqlite3.connect(tmp_path / "j.sqlite")
    assert con.execute("SELECT mode, status FROM runs").fetchone() == ("paper", "stopped")
    control = con.execute("SELECT action, source, reason, result FROM control ORDER BY rowid").fetchall()
    results = [(a, r.split(":")[0]) for a, _, _, r in control]
    assert results == [
        ("halt", "refused"),
        ("halt", "refused"),
        ("halt", "accepted"),
        ("resume", "accepted"),
        ("reload", "accepted"),
        ("stop", "accepted"),
    ]
    assert control[4][2] == "applied ['fusion.llm_weight']; restart needed for ['instrument.tick_size']"
    assert control[2][1] == "127.0.0.1" and control[2][2] == "test halt"
    n = con.execute("SELECT count(*) FROM decisions").fetchone()[0]
    assert 0 < n < 5520  # stopped early, every decided bar journaled


def test_flatten_on_stop_closes_the_position_at_the_last_price(tmp_path):
    """on_stop = flatten with a position open: the shutdown closes it at the last close (paper)."""
    import asyncio

    from tests.conftest import make_settings
    from trader.service.supervisor import Service
    from trader.wiring import build_replay

    s = make_settings(service={"http_enabled": False, "on_stop": "flatten"})
    run = build_replay(s, tmp_path / "j.sqlite", mode="paper")
    svc, eng = Service(s, run, None), run.engine
    loop = asyncio.new_event_loop()
    for i in range(len(run.recorded)):
        loop.run_until_complete(eng.on_bar(run.recorded.bar(i), i))
        if eng.portfolio.position != 0:
            break
    pos, last = eng.portfolio.position, eng.last_bar
    assert pos != 0
    loop.run_until_complete(svc._shutdown("stopped"))
    loop.close()
    assert eng.portfolio.position == 0
    con = sqlite3.connect(tmp_path / "j.sqlite")
    side, qty, price = con.execute(
        "SELECT side, qty, price FROM fills WHERE purpose = 'flatten:on_stop'"
    ).fetchone()
    assert side == (-1 if pos > 0 else 1) and qty == abs(pos)
    assert price == last.close + 0.25 * side  # one tick of slippage against us
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "stopped"
    assert con.execute("SELECT position FROM account ORDER BY rowid DESC LIMIT 1").fetchone()[0] == 0


# -- unit files ----------------------------------------------------------------------------------
def _installed_units(tmp_path: Path, *args: str) -> Path:
    """Stage the units with scripts/install-service, this checkout as the prefix (its venv exists)."""
    stage = tmp_path / "stage"
    script = str(ROOT / "scripts" / "install-service")
    r = subprocess.run(
        ["bash", script, "--root", str(stage), "--prefix", str(ROOT), "--skip-venv", *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    env = (stage / "etc" / "trader").glob("*.env")
    for f in env:
        assert f.stat().st_mode & 0o777 == 0o600 and "TRADER_CONTROL_TOKEN=" in f.read_text()
    return stage / "etc" / "systemd" / "system"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (scripts/setup)")
@pytest.mark.parametrize("unit", ["trader.service", "trader@.service"])
def test_units_verify_and_pass_the_security_check(tmp_path, unit):
    d = _installed_units(tmp_path, *(["--instance", "paper"] if "@" in unit else []))
    target = d / unit if "@" not in unit else d / "trader@paper.service"
    if "@" in unit:
        shutil.copy(d / unit, target)
    assert str(ROOT / ".venv" / "bin" / "trader") in target.read_text()
    r = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
    problems = [x for x in r.stderr.splitlines() if "trader" in x and "sysinit" not in x]
    assert not problems, r.stderr
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(target)], capture_output=True, text=True
    )
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout).group(1))
    assert level <= 2.0, sec.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (scripts/setup)")
def test_the_gpu_drop_in_opens_only_the_nvidia_devices(tmp_path):
    d = _installed_units(tmp_path, "--gpu")
    assert (d / "trader.service.d" / "gpu.conf").exists()
    sec = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(d / "trader.service")],
        capture_output=True,
        text=True,
    )
    assert re.search(r"✗ MemoryDenyWriteExecute=", sec.stdout)  # the drop-in is applied
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout).group(1))
    assert level <= 2.0, sec.stdout
    text = (ROOT / "systemd" / "gpu.conf").read_text()
    assert "DeviceAllow=/dev/nvidiactl rw" in text and "MemoryDenyWriteExecute=no" in text
