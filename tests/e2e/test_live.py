"""`trader run --mode paper|live` and `trader record` as a user runs them, against the local
Tradovate protocol server (tests/tradovate_server.py) on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.child import Child
from tests.tradovate_server import PASSWORD, SEC, FakeTradovate, shared_bars
from trader.adapters.tradovate.protocol import ns_to_iso

BARS = shared_bars()
START = next(i for i, b in enumerate(BARS) if ns_to_iso(b.ts_ns) >= "2023-11-28T14:40")


def write_config(tmp: Path, fake: FakeTradovate, extra: str = "") -> Path:
    tv = fake.config()
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in tv.items())
    cfg = tmp / "trader.toml"
    cfg.write_text(
        f'[advisor]\nmode = "off"\n[service]\nhttp_enabled = false\nstop_timeout_s = 10.0\n'
        f"[tradovate]\n{lines}\nhistory_bars = 1000\n{extra}\n"
    )
    return cfg


def start(
    cfg: Path, journal: Path, mode: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    secrets = {"TRADER_TRADOVATE__PASSWORD": PASSWORD, "TRADER_TRADOVATE__SEC": SEC}
    # JSON lines, as the systemd units ask for them (the tests read events from stdout)
    env = os.environ | secrets | {"TRADER_LOGGING__FORMAT": "json"} | (env or {})
    cmd = [
        sys.executable,
        "-m",
        "trader",
        "run",
        "--mode",
        mode,
        "--config",
        str(cfg),
        "--journal",
        str(journal),
    ]
    return Child([*cmd, *extra], env=env)


def decided(journal: Path) -> int:
    if not journal.exists():
        return 0
    con = sqlite3.connect(journal)
    try:
        return con.execute("SELECT count(*) FROM decisions").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def run_until(
    proc: subprocess.Popen[str],
    journal: Path,
    bars: int,
    during: object = None,
    market: FakeTradovate | None = None,
) -> tuple[str, str]:
    """Run until ``bars`` decisions are journaled, then SIGTERM. With ``market``, the market
    stops trading first: a protective stop left working on purpose (a position held through a
    restart) cannot fill after the service is gone, so the broker's fills are all the service's
    to journal."""
    end = time.monotonic() + 120
    fired = False
    while decided(journal) < bars and time.monotonic() < end and proc.poll() is None:
        if during is not None and not fired and decided(journal) >= bars // 2:
            during()  # type: ignore[operator]
            fired = True
        time.sleep(0.2)
    if market is not None:
        market.market_running = False
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def test_paper_mode_trades_live_bars_and_a_restart_continues_the_paper_account(tmp_path):
    fake = FakeTradovate(BARS, START, step_s=0.08).start()
    try:
        cfg = write_config(tmp_path, fake)
        journal = tmp_path / "paper.sqlite"
        run_until(start(cfg, journal, "paper"), journal, 60)
        con = sqlite3.connect(journal)
        ((run_id, status),) = con.execute("SELECT run_id, status FROM runs").fetchall()
        first_bars = con.execute("SELECT count(*) FROM decisions").fetchone()[0]
        primed = con.execute("SELECT count(*) FROM bars WHERE kind='prime'").fetchone()[0]
        con.close()
        assert status == "stopped" and START - 1 <= primed < 1000 and first_bars >= 60
        assert fake.placed("/order/placeorder") == [] and fake.placed("/order/placeoso") == []  # paper

        # kill -9 in the middle of a second run, then start again: the same paper run continues
        con = sqlite3.connect(journal)
        con.execute("UPDATE runs SET status='running'")  # as if the first run had been killed
        con.commit()
        con.close()
        out, _ = run_until(start(cfg, journal, "paper"), journal, first_bars + 40)
        con = sqlite3.connect(journal)
        runs = con.execute("SELECT run_id, status FROM runs").fetchall()
        ts = [r[0] for r in con.execute("SELECT ts_ns FROM decisions ORDER BY bar_index")]
        idx = [r[0] for r in con.execute("SELECT bar_index FROM decisions ORDER BY bar_index")]
        catch_up = con.execute("SELECT count(*) FROM decisions WHERE vetoes LIKE '%catching_up%'").fetchone()[
            0
        ]
        con.close()
        assert runs == [(run_id, "stopped")]  # one run, continued
        assert '"event": "recovered"' in out
        assert ts == sorted(set(ts)) and idx == list(range(len(idx)))  # no bar twice, none lost
        i0 = next(i for i, b in enumerate(BARS) if b.ts_ns == ts[0])
        assert ts == [b.ts_ns for b in BARS[i0 : i0 + len(ts)]]  # the bars missed while down were caught up
        assert catch_up >= 1
    finally:
        fake.stop()


def test_live_mode_routes_orders_survives_drops_and_never_logs_credentials(tmp_path):
    fake = FakeTradovate(BARS, START, step_s=0.1).start()
    try:
        cfg = write_config(tmp_path, fake)
        journal = tmp_path / "live.sqlite"

        def faults() -> None:
            fake.drop_md()
            fake.drop_user()
            fake.faults.http_5xx["/order/placeoso"] = 1
            fake.faults.penalties["/order/placeorder"] = 1

        out, err = run_until(start(cfg, journal, "live"), journal, 120, faults, market=fake)
        con = sqlite3.connect(journal)
        orders = {r[0] for r in con.execute("SELECT client_id FROM orders")}
        fills = con.execute("SELECT client_id, side, qty, price FROM fills ORDER BY seq").fetchall()
        last_pos = con.execute("SELECT position FROM decisions ORDER BY bar_index DESC LIMIT 1").fetchone()[0]
        journal_text = "\n".join(
            str(r) for t in ("runs", "control") for r in con.execute(f"SELECT * FROM {t}")
        )
        con.close()
        sent = [c["clOrdId"] for c in fake.commands if c.get("clOrdId")]
        entries = [c for c in sent if "-stop" not in c]  # protective stops are the broker's
        assert entries, "no orders reached the broker"
        assert len(entries) == len(set(entries))  # no client id placed twice
        assert set(entries) <= orders  # every order at the broker is journaled
        broker_fills = [f for f in fake.fills]
        assert len(fills) == len(broker_fills)  # every execution reached the journal
        assert sum(s * q for _, s, q, _ in fills) == fake.net_pos
        # a protective stop only ever closes: none fills beside an exit, or after its position
        # has gone, to open one nobody decided
        pos = 0
        for f in fake.fills:
            side = 1 if f["action"] == "Buy" else -1
            if fake.versions[f["orderId"]]["orderType"] == "Stop":
                assert pos * side < 0 and f["qty"] <= abs(pos), f"stop fill {f} at position {pos}"
            pos += side * f["qty"]
        assert abs(last_pos) <= 1
        assert '"event": "md_connection_lost"' in out and '"event": "user_connection_lost"' in out
        assert '"why": "reconnect"' in out  # reconciled after the reconnect
        tokens = list(fake.tokens)
        for text in (out, err, journal_text):
            for secret in (PASSWORD, SEC, *tokens):
                assert secret not in text
    finally:
        fake.stop()


def test_live_mode_with_bad_credentials_exits_2_naming_the_user(tmp_path):
    fake = FakeTradovate(BARS, START).start()
    try:
        cfg = write_config(tmp_path, fake)
        env = os.environ | {"TRADER_TRADOVATE__PASSWORD": "not-the-password", "TRADER_TRADOVATE__SEC": SEC}
        cmd = [sys.executable, "-m", "trader", "run", "--mode", "live", "--config", str(cfg)]
        cmd += ["--journal", str(tmp_path / "j.sqlite")]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2
        assert "trader-test" in p.stderr and "Incorrect username or password" in p.stderr
        assert "not-the-password" not in p.stderr + p.stdout
    finally:
        fake.stop()


def test_record_writes_daily_parquet_that_replay_reads(tmp_path):
    fake = FakeTradovate(BARS, START, step_s=0.03).start()
    try:
        cfg = write_config(tmp_path, fake)
        env = os.environ | {"TRADER_TRADOVATE__PASSWORD": PASSWORD, "TRADER_TRADOVATE__SEC": SEC}
        out_dir = tmp_path / "rec"
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "trader",
                "record",
                "--config",
                str(cfg),
                "--out",
                str(out_dir),
                "--max-bars",
                "1030",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        files = sorted(out_dir.glob("NQZ3_*.parquet"))
        assert len(files) == 2  # the history crosses midnight (exchange time)
        import polars as pl

        df = pl.concat([pl.read_parquet(f) for f in files])
        ts = df["timestamp"].dt.epoch("ns").to_list()
        assert len(ts) >= 1030 and ts == sorted(set(ts))
        i0 = next(i for i, b in enumerate(BARS) if b.ts_ns == ts[0])
        assert [b.close for b in BARS[i0 : i0 + len(ts)]] == df["close"].to_list()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "trader",
                "replay",
                "--llm",
                "off",
                "--journal",
                str(tmp_path / "r.sqlite"),
                "--data",
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        con = sqlite3.connect(tmp_path / "r.sqlite")
        n = con.execute("SELECT bars FROM runs").fetchone()[0]
        assert n == len(ts)
    finally:
        fake.stop()


@pytest.mark.parametrize(("mode", "kind"), [("paper", "sigterm"), ("live", "sigterm"), ("live", "kill9")])
def test_a_restart_on_the_live_feed_continues_the_account_and_an_operator_halt(tmp_path, mode, kind):
    from tests.e2e.test_service import TOKEN, http
    from tests.llm_server import free_port

    fake = FakeTradovate(BARS, START, step_s=0.08).start()
    port = free_port()
    try:
        cfg = write_config(tmp_path, fake)
        cfg.write_text(cfg.read_text().replace("http_enabled = false", f"http_port = {port}"))
        journal = tmp_path / "j.sqlite"
        env = {"TRADER_CONTROL_TOKEN": TOKEN}
        p = start(cfg, journal, mode, env=env)
        end = time.monotonic() + 120
        while decided(journal) < 40 and time.monotonic() < end and p.poll() is None:
            time.sleep(0.1)
        code, _ = http("POST", f"http://127.0.0.1:{port}/halt", TOKEN, b'{"reason": "operator says no"}')
        assert code == 200
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        p.communicate(timeout=60)
        con = sqlite3.connect(journal)
        ((run_id,),) = con.execute("SELECT run_id FROM runs").fetchall()
        _pos, _bal, thr = con.execute(
            "SELECT position, balance_usd, threshold_usd FROM decisions ORDER BY bar_index DESC LIMIT 1"
        ).fetchone()
        # the position the journal ends with: a fill can come after the last decision (a stop that
        # filled while the service stopped is journaled with its account row, no decision follows);
        # no account row at all after a kill -9: no fill yet, flat
        last = con.execute("SELECT position FROM account ORDER BY rowid DESC LIMIT 1").fetchone()
        pos = last[0] if last is not None else 0
        con.close()

        p = start(cfg, journal, mode, env=env)
        state: dict = {}
        end = time.monotonic() + 60
        while time.monotonic() < end and not state:
            try:
                code, body = http("GET", f"http://127.0.0.1:{port}/state")
                state = body if code == 200 else {}
            except OSError:
                time.sleep(0.1)
        assert state["run_id"] == run_id  # the same account continues
        assert state["halted"] is True and state["halt_reason"] == "operator says no"
        assert state["position"] == pos and state["drawdown_threshold_usd"] >= round(thr, 2) - 0.01
        n = decided(journal)
        end = time.monotonic() + 60
        while decided(journal) < n + 15 and time.monotonic() < end:
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        con = sqlite3.connect(journal)
        resumed_at = con.execute("SELECT max(bar_index) FROM control WHERE action='recover'").fetchone()[0]
        new_entries = con.execute(
            "SELECT count(*) FROM orders WHERE purpose IN ('entry', 'add', 'reverse') AND bar_index >= ?",
            (resumed_at,),
        ).fetchone()[0]
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        con.close()
        assert runs == 1 and new_entries == 0

        # a third start re-drives bars decided while catching up and halted: the journaled
        # verdicts are replayed, whatever the controls and the backfill say now
        p = start(cfg, journal, mode, env=env)
        state = {}
        end = time.monotonic() + 60
        while time.monotonic() < end and not state:
            try:
                code, body = http("GET", f"http://127.0.0.1:{port}/state")
                state = body if code == 200 else {}
            except OSError:
                time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        assert state["run_id"] == run_id and state["halted"] is True
        # (the restart re-drove the journal and checked the account to the cent, or it would have
        # exited 2 and /state would never have answered)
    finally:
        fake.stop()


def _check(cfg: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TRADER_TRADOVATE__PASSWORD": PASSWORD, "TRADER_TRADOVATE__SEC": SEC} | (env or {})
    cmd = [sys.executable, "-m", "trader", "tradovate-check", "--config", str(cfg), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_tradovate_check_runs_every_stage_and_places_and_cancels_a_test_order(tmp_path):
    fake = FakeTradovate(BARS, START, step_s=0.1).start()
    try:
        cfg = write_config(tmp_path, fake)
        r = _check(cfg, "--seconds", "1", "--place-test-order")
        assert r.returncode == 0, r.stdout + r.stderr
        for stage in ("auth", "renew", "accounts", "contract", "user-socket", "chart", "test-order"):
            assert f"PASS {stage}:" in r.stdout
        assert "7/7 stages passed" in r.stdout
        assert '"accessToken": "***"' in r.stdout  # raw responses printed, secrets masked
        for secret in (PASSWORD, SEC, *fake.tokens):
            assert secret not in r.stdout + r.stderr
        (body,) = fake.placed("/order/placeorder")
        assert body["isAutomated"] is True and body["orderType"] == "Limit" and body["timeInForce"] == "Day"
        assert body["price"] < fake.price * 0.6  # far from the market
        (order,) = fake.orders.values()
        assert order["ordStatus"] == "Canceled" and fake.net_pos == 0 and not fake.fills
    finally:
        fake.stop()


def test_tradovate_check_reports_a_failing_stage_and_exits_1(tmp_path):
    fake = FakeTradovate(BARS, START, step_s=0.1).start()
    try:
        cfg = write_config(tmp_path, fake)
        fake.faults.chart_errors = 10
        r = _check(cfg, "--seconds", "0.5")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "PASS accounts:" in r.stdout and "FAIL chart:" in r.stdout and "Unknown symbol" in r.stdout
        assert "5/6 stages passed" in r.stdout
    finally:
        fake.stop()


def test_tradovate_check_exits_2_when_the_servers_cannot_be_reached_or_live_is_asked(tmp_path):
    fake = FakeTradovate(BARS, START).start()
    cfg = write_config(tmp_path, fake)
    fake.stop()  # nothing listens there any more
    r = _check(cfg, "--seconds", "0.5")
    assert r.returncode == 2 and "cannot reach the Tradovate servers" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    r = _check(cfg, "--place-test-order", env={"TRADER_TRADOVATE__ENVIRONMENT": "live"})
    assert r.returncode == 2 and "only runs on tradovate.environment = demo" in r.stderr
    r = _check(cfg, env={"TRADER_TRADOVATE__PASSWORD": ""})
    assert r.returncode == 2 and "TRADER_TRADOVATE__PASSWORD" in r.stderr
