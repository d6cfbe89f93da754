"""``journal.level``: what a replay journals at full, trades and summary, and who refuses less than
full (the service: its crash recovery re-drives from the decisions)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import make_settings
from trader.domain import Bar
from trader.errors import ConfigError, JournalError
from trader.journal import Journal, rows
from trader.replay import replay

RUN_ID = "fedcba9876543210fedcba9876543210"
SLICE_END = "2023-11-29T16:00:00"  # ~2,700 bars of the bundled slice: past warm-up, some trading


def _level_run(tmp_path: Path, level: str) -> tuple[dict[str, list[tuple]], dict, object]:
    settings = make_settings(
        journal={"level": level}, data={"end": SLICE_END}, risk={"enable_risk_veto": False}
    )
    out = replay(settings, journal_path=tmp_path / f"{level}.sqlite", run_id=RUN_ID)
    con = sqlite3.connect(tmp_path / f"{level}.sqlite")
    try:
        tables = {t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in sorted(rows.TABLES)}
        (report_json,) = con.execute("SELECT report_json FROM runs WHERE run_id=?", (RUN_ID,)).fetchone()
    finally:
        con.close()
    return tables, json.loads(report_json), out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("levels")
    return {level: _level_run(d, level) for level in ("full", "trades", "summary")}


def test_full_journals_every_table_a_replay_writes(runs):
    tables, report, out = runs["full"]
    assert len(tables["decisions"]) == out.stats.bars > 2000
    assert {r[12:15] for r in tables["decisions"]} == {(None, None, None)}  # no advice: NULLs
    assert tables["orders"] and tables["fills"] and tables["trades"] and tables["account"]
    assert report["journal_level"] == "full"


def test_trades_keeps_everything_but_the_per_bar_decisions(runs):
    full, _, _ = runs["full"]
    tables, report, out = runs["trades"]
    assert tables["decisions"] == [] and tables["bars"] == []
    for t in ("orders", "fills", "trades", "account", "bars_rejected", "control", "llm_queries"):
        assert tables[t] == full[t], t  # the same rows, value for value
    assert report["journal_level"] == "trades"
    assert out.stats.bars == len(full["decisions"])  # the run itself is the same


def test_summary_keeps_only_the_run_row_and_its_report(runs):
    _, full_report, _ = runs["full"]
    tables, report, out = runs["summary"]
    assert all(r == [] for r in tables.values()), {t: len(r) for t, r in tables.items() if r}
    assert report["journal_level"] == "summary"
    same = ("bars", "trades", "net_pnl", "max_drawdown", "win_rate", "actions", "fusion_methods")
    assert {k: report[k] for k in same} == {k: full_report[k] for k in same}
    assert out.status == "completed"


def test_the_levels_are_nested():
    assert (
        rows.LEVEL_TABLES["summary"] < rows.LEVEL_TABLES["trades"] < rows.LEVEL_TABLES["full"] == rows.TABLES
    )
    assert "decisions" not in rows.LEVEL_TABLES["trades"] and "fills" in rows.LEVEL_TABLES["trades"]


def test_an_unknown_level_is_refused_by_config_and_by_the_journal(tmp_path):
    with pytest.raises(ConfigError, match=r"journal\.level"):
        make_settings(journal={"level": "some"})
    with pytest.raises(JournalError, match=r"journal\.level 'some'"):
        Journal(tmp_path / "j.sqlite", level="some")


@pytest.mark.parametrize("level", ["trades", "summary"])
def test_the_service_refuses_a_level_below_full(tmp_path, level):
    from trader.wiring import open_service_run

    settings = make_settings(journal={"level": level}, service={"feed": "recorded"})
    with pytest.raises(ConfigError, match=r"journal\.level = '\w+': `trader run` journals every decision"):
        asyncio.run(open_service_run(settings, "paper", tmp_path / "j.sqlite", fresh=False))
    assert not (tmp_path / "j.sqlite").exists()  # refused before anything was written


def test_a_bar_with_nothing_to_journal_adds_no_commit_point(tmp_path):
    """Consecutive commit points (bars that journal nothing at this level) cost one marker."""
    j = Journal(tmp_path / "j.sqlite", level="summary", flush_interval_ms=3_600_000)
    try:
        j.start_run(RUN_ID, "replay", "{}", "p", "h", [])
        for _ in range(1000):
            j.record(rows.bar(RUN_ID, 1, "bar", 0, Bar(1, 1.0, 1.0, 1.0, 1.0, 1.0), 0))  # dropped
            j.commit_point()
        assert j.backlog == 1
    finally:
        j.close()


def test_rows_read_back_exactly_whatever_is_null_or_shared_across_a_batch(tmp_path):
    """The writer puts what every row of a batch shares (a NULL column, the run id) into the
    statement instead of binding it: what is read back is what was recorded, value and type."""
    run_id = "it's a run — ünïcode"  # quoted, not ASCII: bound as it is
    j = Journal(tmp_path / "j.sqlite", flush_interval_ms=3_600_000)
    recorded = []
    try:
        j.start_run(RUN_ID, "replay", "{}", "p", "h", [])
        for rid in (RUN_ID, run_id, "x'; DROP TABLE fills; --"):
            for k in range(700):  # several power-of-two chunks, the last ones short
                reason = None if k % 300 else "veto'd"
                stop = None if k < 650 else 7
                row = rows.order(rid, _intent(f"c{k}", stop), k, 10**18 + k)
                values = (*row.values[:7], reason or row.values[7], row.values[8])
                recorded.append(values)
                j.record(rows.Row("orders", values))
                j.commit_point()
        j.flush()
    finally:
        j.close()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    try:
        got = con.execute("SELECT * FROM orders ORDER BY rowid").fetchall()
        types = con.execute("SELECT DISTINCT typeof(stop_ticks), typeof(run_id) FROM orders").fetchall()
        assert con.execute("SELECT count(*) FROM fills").fetchone() == (0,)  # a run id is only text
    finally:
        con.close()
    assert got == recorded
    assert set(types) == {("null", "text"), ("integer", "text")}


def _intent(cid: str, stop_ticks: int | None):
    from trader.domain import OrderIntent, OrderKind, Side

    return OrderIntent(cid, Side.BUY, 1, OrderKind.MARKET, "entry", stop_ticks)


def test_a_numpy_number_is_stored_as_a_number_never_as_bytes(tmp_path):
    """numpy scalars bind as their raw bytes (a BLOB) unless the writer converts them; a plug-in
    policy's probabilities may well be np.float32."""
    import numpy as np

    j = Journal(tmp_path / "j.sqlite")
    try:
        j.start_run(RUN_ID, "replay", "{}", "p", "h", [])
        plain = rows.order(RUN_ID, _intent("plain", 3), 1, 10**18)
        j.record(plain)
        j.record(
            rows.Row(
                "orders",
                (
                    RUN_ID,
                    "np",
                    np.int64(2),
                    np.int64(10**18 + 1),
                    1,
                    np.int32(1),
                    "market",
                    "entry",
                    np.float32(2.5),
                ),
            )
        )
        j.commit_point()
        j.flush()
    finally:
        j.close()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    try:
        got = con.execute(
            "SELECT bar_index, ts_ns, qty, stop_ticks, typeof(stop_ticks) FROM orders ORDER BY rowid"
        ).fetchall()
    finally:
        con.close()
    assert got == [(1, 10**18, 1, 3, "integer"), (2, 10**18 + 1, 1, 2.5, "real")]
