"""`trader report`, the replay's progress and `check-config` as a user runs them (a subprocess;
a pseudo-terminal where a terminal is what is being tested)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import sqlite3
import struct
import subprocess
import sys
import termios
from pathlib import Path

SHORT = ("--llm", "off", "--to", "2023-11-28T12:00:00")


def trader(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRADER_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trader", *args], cwd=cwd, capture_output=True, text=True, env=e, timeout=300
    )


def _run_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY rowid")]


def test_report_prints_the_runs_tables_and_writes_the_page_of_the_latest_or_named_run(tmp_path):
    for _ in range(2):
        r = trader("replay", *SHORT, "--journal", "j.sqlite", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    first, second = _run_ids(tmp_path / "j.sqlite")
    assert f"page: {tmp_path / f'report-{second[:8]}.html'}" in r.stdout  # the replay wrote its page

    latest = trader("report", "--journal", "j.sqlite", cwd=tmp_path)
    assert latest.returncode == 0, latest.stderr
    assert f"run {second} (replay, completed)" in latest.stdout
    assert "net P&L (USD)" in latest.stdout and "sessions" in latest.stdout
    assert re.search(r"2023-11-28 Tue\s+2023-11-27 18:00\s+2023-11-28 11:59\s+1080", latest.stdout)
    page = tmp_path / f"report-{second[:8]}.html"
    assert latest.stdout.strip().endswith(f"page: {page}")
    assert f"Run {second}" in page.read_text()

    named = trader(
        "report", "--journal", "j.sqlite", "--run", first[:6], "--out", "x/first.html", cwd=tmp_path
    )
    assert named.returncode == 0, named.stderr
    assert f"run {first} (replay, completed)" in named.stdout
    assert f"Run {first}" in (tmp_path / "x" / "first.html").read_text()


def test_report_exits_2_naming_a_missing_or_damaged_journal_or_listing_the_runs(tmp_path):
    r = trader("replay", *SHORT, "--journal", "j.sqlite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run_id,) = _run_ids(tmp_path / "j.sqlite")
    unknown = trader("report", "--journal", "j.sqlite", "--run", "0000dead", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "run '0000dead' is not in journal j.sqlite" in unknown.stderr and run_id in unknown.stderr
    missing = trader("report", "--journal", "nope.sqlite", cwd=tmp_path)
    assert missing.returncode == 2 and "journal not found: nope.sqlite" in missing.stderr
    (tmp_path / "bad.sqlite").write_bytes(b"this is not SQLite at all\n" * 100)
    bad = trader("report", "--journal", "bad.sqlite", cwd=tmp_path)
    assert bad.returncode == 2 and "journal bad.sqlite is not a trader journal" in bad.stderr
    for r in (unknown, missing, bad):
        assert "Traceback" not in r.stderr and r.stdout == ""


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (160 columns): (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADER_")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trader", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read().decode() if proc.stdout else ""
    code = proc.wait(timeout=60)
    os.close(master)
    return code, out, seen.decode(errors="replace")


def test_replay_progress_is_drawn_on_a_terminal_and_nothing_extra_goes_to_a_pipe(tmp_path):
    code, out, term = _on_a_terminal(["replay", *SHORT, "--journal", "t.sqlite"], tmp_path)
    assert code == 0, term
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term)
    final = [line for line in plain.replace("\r", "\n").splitlines() if "1,080/1,080 bars" in line]
    assert final, plain[-2000:]
    assert re.search(
        r"100\.0% 1,080/1,080 bars [\d,]+ bars/s  ETA 00:00:00 \d+ trades  net P&L [+-][\d,.]+ USD", final[-1]
    )
    assert "net P&L (USD)" in out and "bars/s" not in out  # the table on stdout, progress on the terminal
    piped = trader("replay", *SHORT, "--journal", "p.sqlite", cwd=tmp_path)
    assert piped.returncode == 0
    assert "bars/s" not in piped.stderr and "ETA" not in piped.stderr and "\x1b[" not in piped.stderr
    assert "\x1b[" not in piped.stdout  # no colour codes on a pipe


def test_check_config_prints_a_table_marking_what_differs_from_the_default_and_toml_on_request(tmp_path):
    env = {"TRADER_FUSION__LLM_WEIGHT": "0.4"}
    table = trader("check-config", cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stderr
    assert re.search(r"fusion\.llm_weight\s+0\.4\s+0\.3\s*$", table.stdout, re.M)  # value, then default
    assert re.search(r"fusion\.confidence_threshold\s+0\.\d+\s*$", table.stdout, re.M)  # default: no column
    assert "1 not at their default" in table.stdout
    toml = trader("check-config", "--toml", cwd=tmp_path, env=env)
    assert toml.returncode == 0 and "[fusion]" in toml.stdout and "llm_weight = 0.4" in toml.stdout
