"""The CLI as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import polars as pl

from tests.child import Child

ROOT = Path(__file__).resolve().parents[2]


def trader(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRADER_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trader", *args], cwd=cwd, capture_output=True, text=True, env=e, timeout=900
    )


def test_replay_with_no_arguments_runs_the_bundled_demo_and_reports(tmp_path):
    r = trader("replay", "--report", "out/report.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "net P&L (USD)" in r.stdout and "bars per second" in r.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in (
        "bars",
        "bars_rejected",
        "trades",
        "net_pnl",
        "win_rate",
        "profit_factor",
        "max_drawdown",
        "sharpe",
        "vetoes",
        "fusion_methods",
        "bars_per_second",
    ):
        assert key in report
    assert report["bars"] == 5520 and report["bars_rejected"] == 0
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!doctype html>")
    con = sqlite3.connect(tmp_path / "runs" / "journal.sqlite")
    assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 5520
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "completed"
    # the demo still asks the LLM, on entry decisions only, and each entry is fused with its answer
    asked, on_entries, usable_there = con.execute(
        "SELECT count(*), sum(trigger = 'entry'), sum(available_bar = bar_index) FROM llm_queries"
    ).fetchone()
    assert asked == report["llm"]["queries"] > 0 and asked == on_entries == usable_there
    assert con.execute("SELECT count(*) FROM decisions WHERE llm_action IS NOT NULL").fetchone()[0] > 0
    assert "out/report.html" in r.stdout  # the output says where the HTML report is


LOG_SLICE = ("--to", "2023-11-28T10:10:00")  # warm-up ends ~10:00: a few decided bars


def test_replay_logs_key_value_lines_when_its_output_is_not_a_terminal(tmp_path):
    r = trader("replay", "--llm", "off", *LOG_SLICE, cwd=tmp_path)  # stderr is a pipe here
    assert r.returncode == 0, r.stderr
    (ready,) = [line for line in r.stderr.splitlines() if "replay_ready" in line]
    assert not ready.lstrip().startswith("{") and "\x1b[" not in ready
    assert "[info" in ready and "bars=" in ready and "run_id=" in ready and "policy=" in ready
    assert not [line for line in r.stderr.splitlines() if line.startswith("{")]  # no JSON anywhere


def test_logging_format_json_makes_json_lines_also_in_the_model_process(tmp_path):
    env = {"TRADER_LOGGING__FORMAT": "json"}
    r = trader("replay", "--llm", "sync", *LOG_SLICE, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    events = {}
    for line in r.stderr.splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            events[e["event"]] = e
    assert {"replay_ready", "llm_loaded", "llm_process_started"} <= set(events)  # llm_loaded: the child
    assert events["replay_ready"]["bars"] > 0 and events["llm_loaded"]["device"] == "cpu"


def test_check_config_prints_the_effective_config_and_rejects_bad_values(tmp_path):
    ok = trader("check-config", "--toml", cwd=tmp_path, env={"TRADER_FUSION__LLM_WEIGHT": "0.4"})
    assert ok.returncode == 0 and "llm_weight = 0.4" in ok.stdout  # the table: tests/e2e/test_report_cli.py
    bad = trader("check-config", cwd=tmp_path, env={"TRADER_FUSION__LLM_WEIGHT": "1.7"})
    assert bad.returncode == 2
    assert "fusion.llm_weight: 1.7 is not within [0, 1]" in bad.stderr


def test_features_command_writes_named_columns(tmp_path):
    r = trader("features", "--to", "2023-11-28T12:00:00", "--out", "f.parquet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    df = pl.read_parquet(tmp_path / "f.parquet")
    assert df.width == 2 + 261 and df.columns[:3] == ["timestamp", "ready", "bar_body_atr"]
    assert df["ready"][-1] and not df["ready"][0]


def test_a_bad_data_file_is_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "x.csv").write_text("time,open\n1,2\n")
    r = trader("replay", "--data", "x.csv", cwd=tmp_path)
    assert r.returncode == 2 and "missing required column 'timestamp'" in r.stderr
    assert "Traceback" not in r.stderr


def test_ctrl_c_stops_after_the_current_bar_and_flushes_the_journal(tmp_path):
    import signal
    import time

    e = {k: v for k, v in os.environ.items() if not k.startswith("TRADER_")}
    proc = Child([sys.executable, "-m", "trader", "replay", "--speed", "3000"], cwd=tmp_path, env=e)
    db = tmp_path / "runs" / "journal.sqlite"
    deadline = time.monotonic() + 60
    seen = 0
    while time.monotonic() < deadline and seen < 50:  # wait until bars are flowing
        time.sleep(0.2)
        if db.exists():
            try:
                con = sqlite3.connect(db)
                seen = con.execute("SELECT count(*) FROM decisions").fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out
    con = sqlite3.connect(db)
    status, bars = con.execute("SELECT status, bars FROM runs").fetchone()
    n = con.execute("SELECT count(*) FROM decisions").fetchone()[0]
    assert status == "stopped" and 50 <= bars < 5520 and n == bars


def test_llm_sync_then_recorded_reproduces_every_decision_and_exports_a_dataset(tmp_path):
    from trader.journal import DECISION_COLUMNS

    short = ("--to", "2023-11-28T10:40:00", "--speed", "0")
    sync = trader(
        "replay", "--llm", "sync", "--journal", "a.sqlite", "--report", "a.json", *short, cwd=tmp_path
    )
    assert sync.returncode == 0, sync.stderr
    assert "LLM queries" in sync.stdout and "agreement with RL" in sync.stdout
    llm = json.loads((tmp_path / "a.json").read_text())["llm"]
    assert (
        llm["mode"] == "sync"
        and llm["queries"] > 0
        and llm["answered"] + llm["unparseable"] == llm["queries"]
    )
    assert llm["latency_ms"]["p50"] > 0

    rec_args = (
        "--llm",
        "recorded",
        "--llm-journal",
        "a.sqlite",
        "--journal",
        "b.sqlite",
        "--report",
        "b.json",
    )
    rec = trader("replay", *rec_args, *short, cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    assert json.loads((tmp_path / "b.json").read_text())["llm"]["recorded_misses"] == 0

    def decisions(db: str) -> list[tuple[object, ...]]:
        con = sqlite3.connect(tmp_path / db)
        return con.execute(f"SELECT {DECISION_COLUMNS} FROM decisions ORDER BY bar_index").fetchall()

    a, b = decisions("a.sqlite"), decisions("b.sqlite")
    assert len(a) == len(b) > 960 and a == b
    assert any(row[11] is not None for row in a)  # llm_action: advice reached fusion

    ds = trader("llm-dataset", "--journal", "a.sqlite", "--out", "ds.jsonl", cwd=tmp_path)
    assert ds.returncode == 0, ds.stderr
    lines = [json.loads(x) for x in (tmp_path / "ds.jsonl").read_text().splitlines()]
    assert 0 < len(lines) <= llm["answered"] + llm["unparseable"]  # those with a full outcome window
    assert {"messages", "outcome"} <= set(lines[0])


def test_a_missing_model_file_is_a_clear_error_at_start(tmp_path):
    r = trader(
        "replay", "--llm", "sync", cwd=tmp_path, env={"TRADER_LLM_MODEL__PATH": str(tmp_path / "no.gguf")}
    )
    assert r.returncode == 2 and "no.gguf" in r.stderr and "not found" in r.stderr
    assert "Traceback" not in r.stderr
