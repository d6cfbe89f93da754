"""kill -9 at random moments during a paper run on recorded bars; each restart continues the run
from the journal. The final journal must equal an uninterrupted run's, row for row."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

TABLES = {
    "decisions": "bar_index, ts_ns, close, p_hold, p_buy, p_sell, p_move_to_be, p_enable_trail, "
    "p_disable_trail, rl_action, rl_conf, fused_action, final_action, vetoes, flatten_reason, position, "
    "balance_usd, equity_usd, threshold_usd",
    "orders": "substr(client_id, 34), bar_index, ts_ns, side, qty, kind, purpose, stop_ticks",
    "fills": "seq, substr(client_id, 34), ts_ns, side, qty, price, commission_usd, purpose",
    "trades": "seq, entry_ts_ns, exit_ts_ns, side, qty, entry_price, exit_price, pnl_usd, exit_reason",
    "account": "ts_ns, position, avg_entry, stop_price, balance_usd, equity_usd, peak_equity_usd, "
    "threshold_usd, daily_pnl_usd, consecutive_losses, reason",
    "bars_rejected": "seq, ts_ns, origin, reason",
}


def _cmd(tmp: Path, journal: str) -> list[str]:
    cfg = tmp / "c.toml"
    # ~1 ms per bar: the run lasts ~6 s, long enough to be killed many times at random points
    cfg.write_text(
        '[advisor]\nmode = "off"\n[service]\nhttp_enabled = false\nfeed = "recorded"\n'
        "[data]\nspeed = 60000.0\n"
    )
    return [sys.executable, "-m", "trader", "run", "--config", str(cfg), "--journal", str(tmp / journal)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRADER_", "NOTIFY_", "WATCHDOG_"))}
    env["TRADER_LOGGING__FORMAT"] = "json"
    return env


def _rows(db: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(db)
    (run_id,) = con.execute("SELECT run_id FROM runs").fetchone()
    out = {}
    for t, cols in TABLES.items():
        order = "rowid" if t in ("account",) else "1"
        out[t] = con.execute(f"SELECT {cols} FROM {t} WHERE run_id=? ORDER BY {order}", (run_id,)).fetchall()
    out["status"] = con.execute("SELECT status, bars FROM runs").fetchall()
    con.close()
    return out


def _status(db: Path) -> str | None:
    if not db.exists():
        return None
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT status FROM runs").fetchone()
    except sqlite3.OperationalError:
        row = None
    con.close()
    return None if row is None else row[0]


def test_kill_9_at_random_points_then_restart_gives_the_uninterrupted_journal(tmp_path):
    ref = subprocess.run(
        _cmd(tmp_path, "ref.sqlite"), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert ref.returncode == 0, ref.stderr
    expected = _rows(tmp_path / "ref.sqlite")
    assert expected["status"] == [("completed", 5520)]
    assert len(expected["fills"]) > 20 and len(expected["trades"]) > 10

    rng = random.Random(20231127)
    db = tmp_path / "killed.sqlite"
    kills, resumed_after = 0, []
    for _ in range(80):
        p = subprocess.Popen(_cmd(tmp_path, "killed.sqlite"), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            _, err = p.communicate(timeout=rng.uniform(0.7, 2.2))
            assert p.returncode == 0, err
            break
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            kills += 1
        if _status(db) == "completed":  # killed while exiting, after the run was complete
            break
    else:
        raise AssertionError("the run never completed")
    assert kills >= 5, f"only {kills} kills: the random points did not land inside the run"
    got = _rows(db)
    con = sqlite3.connect(db)
    resumed_after = [r for (r,) in con.execute("SELECT reason FROM control WHERE action='recover'")]
    con.close()
    assert len(resumed_after) >= 3, resumed_after
    assert any(int(r.rsplit(" ", 1)[1]) > 960 for r in resumed_after)  # resumed while trading
    for table in TABLES:
        assert got[table] == expected[table], f"{table} differs after {kills} kills ({resumed_after})"
    assert got["status"] == [("completed", 5520)]


def test_an_unfinished_run_with_another_config_is_not_continued_silently(tmp_path):
    db = tmp_path / "j.sqlite"
    p = subprocess.Popen(
        _cmd(tmp_path, "j.sqlite"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        p.communicate(timeout=2.5)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert _status(db) == "running"  # the paced run takes > 5 s: it was killed mid-run
    env = _env() | {"TRADER_FUSION__LLM_WEIGHT": "0.5"}
    r = subprocess.run(_cmd(tmp_path, "j.sqlite"), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "different configuration (differs in: fusion.llm_weight)" in r.stderr
    assert "--fresh" in r.stderr
    r = subprocess.run(
        [*_cmd(tmp_path, "j.sqlite"), "--fresh"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(db)
    assert sorted(s for (s,) in con.execute("SELECT status FROM runs")) == ["abandoned", "completed"]
