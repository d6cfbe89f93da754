"""State survives every restart (SIGTERM, a failed run, kill -9), operator halts included; losing
the journal stops the service; `trader replay --policy module:attr` runs a Python policy."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_crash_recovery import TABLES, _rows
from tests.e2e.test_service import TOKEN, http
from tests.llm_server import free_port

FAILING_POLICY = "tests.e2e.test_continuity:FailingPolicy"


class FailingPolicy:
    """The bundled ONNX policy, failing at bar ``$TRADER_TEST_FAIL_AT`` when that is set."""

    name = "failing"

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        from trader.config import BUNDLED_POLICY
        from trader.features.layout import build_layout
        from trader.policy import OnnxPolicy

        self.inner = OnnxPolicy(BUNDLED_POLICY, build_layout(settings.features.use_llm_features, ()))
        self.fail_at = int(os.environ.get("FAIL_AT_BAR", "-1"))
        self.fail_at_loss = float(os.environ.get("FAIL_AT_DAILY_LOSS", "inf"))

    def act(self, o):  # type: ignore[no-untyped-def]
        if o.bar_index == self.fail_at or -o.snapshot.daily_pnl_usd >= self.fail_at_loss:
            raise RuntimeError(f"injected failure at bar {o.bar_index}")
        return self.inner.act(o)


def _cfg(tmp: Path, port: int, extra: str = "") -> Path:
    cfg = tmp / "c.toml"
    cfg.write_text(
        f'[advisor]\nmode = "off"\n[service]\nhttp_port = {port}\nfeed = "recorded"\nstop_timeout_s = 10.0\n'
        f'[data]\nspeed = 60000.0\n[policy]\npath = "{FAILING_POLICY}"\n{extra}'
    )
    return cfg


def _start(cfg: Path, journal: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    e = {
        k: v for k, v in os.environ.items() if not k.startswith(("TRADER_", "NOTIFY_", "WATCHDOG_", "FAIL_"))
    }
    e |= {"TRADER_LOGGING__FORMAT": "json", "TRADER_CONTROL_TOKEN": TOKEN, "PYTHONPATH": str(Path.cwd())}
    e |= env or {}
    cmd = [sys.executable, "-m", "trader", "run", "--config", str(cfg), "--journal", str(journal)]
    return subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_state(port: int, until, timeout: float = 60.0) -> dict:  # type: ignore[no-untyped-def, type-arg]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            code, body = http("GET", f"http://127.0.0.1:{port}/state")
            if code == 200 and until(body):
                return body
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("state not reached")


def _q(db: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_sigterm_with_a_halt_then_restart_continues_the_account_and_the_halt(tmp_path):
    port = free_port()
    cfg, db = _cfg(tmp_path, port), tmp_path / "j.sqlite"
    p = _start(cfg, db)
    _wait_state(port, lambda s: s["bars"] > 2600)  # trading for a while
    code, _ = http("POST", f"http://127.0.0.1:{port}/halt", TOKEN, b'{"reason": "news"}')
    assert code == 200
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ((run_id, status),) = _q(db, "SELECT run_id, status FROM runs")
    assert status == "stopped"
    ((pos, bal, thr),) = _q(
        db, "SELECT position, balance_usd, threshold_usd FROM account ORDER BY rowid DESC LIMIT 1"
    )
    assert bal != 50_000.0  # it traded before the stop

    p = _start(cfg, db)
    state = _wait_state(port, lambda s: True)
    assert state["run_id"] == run_id  # the same account continues
    assert state["halted"] is True and state["halt_reason"] == "news"
    assert (state["position"], state["balance_usd"]) == (pos, round(bal, 2))
    assert state["drawdown_threshold_usd"] == round(thr, 2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    entries_after = _q(
        db,
        "SELECT count(*) FROM orders WHERE purpose='entry' AND bar_index > "
        "(SELECT max(bar_index) FROM control WHERE action='recover')",
    )
    assert entries_after == [(0,)]  # halted across the restart: no new entries
    assert _q(db, "SELECT count(*) FROM runs") == [(1,)]


def test_a_failed_run_restarted_gives_the_uninterrupted_journal(tmp_path):
    port = free_port()
    ref_db = tmp_path / "ref.sqlite"
    (tmp_path / "ref").mkdir()
    ref = _start(_cfg(tmp_path / "ref", free_port()), ref_db)
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    expected = _rows(ref_db)

    db = tmp_path / "j.sqlite"
    cfg = _cfg(tmp_path, port)
    p = _start(cfg, db, {"FAIL_AT_BAR": "2500"})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "injected failure at bar 2500" in err
    assert _q(db, "SELECT status FROM runs") == [("failed",)]
    assert _q(db, "SELECT max(bar_index) FROM decisions") == [(2499,)]
    p = _start(cfg, db)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    got = _rows(db)
    for table in TABLES:
        if table != "account":  # run_end rows differ: one per process
            assert got[table] == expected[table], table
    assert got["status"] == expected["status"] == [("completed", 5520)]


def test_deleting_the_journal_mid_run_fails_health_and_stops_the_service(tmp_path):
    port = free_port()
    cfg, db = _cfg(tmp_path, port), tmp_path / "j.sqlite"
    p = _start(cfg, db)
    _wait_state(port, lambda s: s["bars"] > 100)
    for f in tmp_path.glob("j.sqlite*"):
        f.unlink()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert "journal file" in err and "is gone" in err and "recovery source" in err


def test_replay_runs_a_python_policy_by_dotted_path(tmp_path):
    cmd = [sys.executable, "-m", "trader", "replay", "--llm", "off", "--journal", str(tmp_path / "j.sqlite")]
    r = subprocess.run(
        [*cmd, "--policy", "strategies.rules:EmaCross"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "trades" in r.stdout
    ((path,),) = _q(tmp_path / "j.sqlite", "SELECT policy_path FROM runs")
    assert path == "strategies.rules:EmaCross"
    orders = _q(tmp_path / "j.sqlite", "SELECT count(*) FROM orders WHERE purpose='entry'")[0][0]
    assert orders > 5
    r = subprocess.run(
        [*cmd, "--policy", "strategies.rules:Nope"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "policy.path" in r.stderr and "Nope" in r.stderr


def _stop(p: subprocess.Popen[str], kind: str) -> None:
    if kind == "failed":  # the injected failure ends it
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and "injected failure" in err, err[-2000:]
        return
    p.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert kind == "kill9" or p.returncode == 0, err[-2000:]


@pytest.mark.parametrize("kind", ["sigterm", "kill9", "failed"])
def test_each_restart_kind_keeps_an_operator_halt(tmp_path, kind):
    port = free_port()
    cfg, db = _cfg(tmp_path, port), tmp_path / "j.sqlite"
    p = _start(cfg, db, {"FAIL_AT_BAR": "3300"} if kind == "failed" else None)
    _wait_state(port, lambda s: s["bars"] > 2600)
    assert http("POST", f"http://127.0.0.1:{port}/halt", TOKEN, b'{"reason": "desk says stop"}')[0] == 200
    time.sleep(0.3)
    _stop(p, kind)
    ((run_id,),) = _q(db, "SELECT run_id FROM runs")
    p = _start(cfg, db)
    state = _wait_state(port, lambda s: True)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    assert state["run_id"] == run_id and state["halted"] is True and state["halt_reason"] == "desk says stop"
    entries = _q(
        db,
        "SELECT count(*) FROM orders WHERE purpose='entry' AND bar_index >= "
        "(SELECT max(bar_index) FROM control WHERE action='recover')",
    )
    assert entries == [(0,)]


@pytest.mark.parametrize("kind", ["sigterm", "kill9", "failed"])
def test_each_restart_kind_keeps_the_daily_loss_limit(tmp_path, kind):
    port = free_port()
    cfg, db = _cfg(tmp_path, port, "[risk]\ndaily_loss_limit_usd = 150.0\n"), tmp_path / "j.sqlite"
    p = _start(cfg, db, {"FAIL_AT_DAILY_LOSS": "150"} if kind == "failed" else None)
    if kind != "failed":
        _wait_state(port, lambda s: s["daily_pnl_usd"] <= -150.0)
    _stop(p, kind)
    ((last,),) = _q(db, "SELECT max(bar_index) FROM decisions")
    p = _start(cfg, db)
    state = _wait_state(port, lambda s: True)
    assert state["daily_pnl_usd"] <= -150.0  # the day's loss came back with the account
    end = time.monotonic() + 30
    while (
        time.monotonic() < end
        and _q(db, f"SELECT count(*) FROM decisions WHERE bar_index > {last}")[0][0] < 5
    ):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    rows = _q(db, f"SELECT flatten_reason FROM decisions WHERE bar_index > {last} ORDER BY bar_index LIMIT 5")
    assert len(rows) == 5 and all(r == ("daily_loss_limit",) for r in rows)
