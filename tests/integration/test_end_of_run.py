"""What happens after a run's last bar counts in its figures: with ``data.close_at_end`` the closing
fill's commission and slippage are in the report's net P&L, in its last session's P&L, in the
figures and session table recomputed from the journal, and in ``trader compare``'s per-session P&L,
all equal to the account's final balance less the starting one (they stopped at the last bar's
marked equity, a closing commission and a tick of slippage away)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import NQ, make_settings
from trader.replay import replay
from trader.report import JOURNAL_FIGURES
from trader.report.page import figures_of, sessions_of
from trader.report.view import load_run
from trader.research.compare import run_compare

START_BALANCE = 50_000.0


@pytest.fixture(scope="module")
def open_at_end(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An end time at which the shared data's replay (LLM off) holds a position: two bars after
    the entry of a trade held for longer."""
    out = replay(
        make_settings(data={"paths": [str(NQ)]}), journal_path=tmp_path_factory.mktemp("p") / "j.sqlite"
    )
    held = next(t for t in out.trades if t.exit_ts_ns - t.entry_ts_ns >= 4 * 60 * 10**9)
    return datetime.fromtimestamp(held.entry_ts_ns / 1e9 + 120, UTC).isoformat()


def settings(end: str):
    return make_settings(data={"paths": [str(NQ)], "end": end, "close_at_end": True})


def final_account(journal: Path, run_id: str) -> tuple[int, float, float]:
    con = sqlite3.connect(journal)
    try:
        return con.execute(
            "SELECT position, balance_usd, equity_usd FROM account WHERE run_id=? AND reason='run_end'",
            (run_id,),
        ).fetchone()
    finally:
        con.close()


def test_the_close_at_the_end_is_in_the_reports_net_pnl_and_in_the_journals(tmp_path, open_at_end):
    out = replay(settings(open_at_end), journal_path=tmp_path / "j.sqlite")
    position, balance, equity = final_account(out.journal_path, out.run_id)
    assert position == 0 and out.trades[-1].exit_reason == "flatten:end_of_replay"
    con = sqlite3.connect(out.journal_path)
    (marked,) = con.execute("SELECT equity_usd FROM decisions ORDER BY bar_index DESC LIMIT 1").fetchone()
    con.close()
    assert abs(marked - balance) > 1.0, "the close costs what the last bar's mark does not have"
    net = round(balance - START_BALANCE, 2)
    assert out.report["net_pnl"] == net == pytest.approx(sum(t.pnl_usd for t in out.trades), abs=0.005)
    assert out.stats.equity[-1] == pytest.approx(equity, abs=1e-9)
    view = load_run(out.journal_path, out.run_id)
    recomputed = figures_of(view)
    assert {k: recomputed[k] for k in JOURNAL_FIGURES} == {k: out.report[k] for k in JOURNAL_FIGURES}
    sessions = sessions_of(view)
    assert sum(s.net_pnl_usd for s in sessions) == pytest.approx(net, abs=0.005)
    assert sessions[-1].end_equity_usd == pytest.approx(balance, abs=1e-9)


def test_without_close_at_end_the_figures_are_the_open_positions_marked_equity(tmp_path, open_at_end):
    kept = make_settings(data={"paths": [str(NQ)], "end": open_at_end})
    out = replay(kept, journal_path=tmp_path / "j.sqlite")
    position, _, equity = final_account(out.journal_path, out.run_id)
    assert position != 0
    assert out.report["net_pnl"] == round(equity - START_BALANCE, 2)
    recomputed = figures_of(load_run(out.journal_path, out.run_id))
    assert {k: recomputed[k] for k in JOURNAL_FIGURES} == {k: out.report[k] for k in JOURNAL_FIGURES}


def test_compares_per_session_pnl_includes_the_close_at_the_end(tmp_path, open_at_end):
    result = run_compare(
        settings(open_at_end),
        arms=("rl_only", "flat"),
        data_paths=[NQ],
        out_dir=tmp_path / "cmp",
        run_id="end",
    )
    (seg,) = result.arms["rl_only"].segments
    position, balance, _ = final_account(result.journal, seg.run_id)
    assert position == 0
    assert float(result.pnl["rl_only"].sum()) == pytest.approx(balance - START_BALANCE, abs=1e-6)
    assert seg.net_pnl == pytest.approx(balance - START_BALANCE, abs=1e-6)
