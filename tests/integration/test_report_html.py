"""The run report page, built from a real replay's journal (real onnxruntime, real SQLite, the
real data file; the LLM a scripted OpenAI-compatible server on loopback): its figures recompute
from the journal, its candles, stops and markers are the journal's, long runs stay drawable."""

from __future__ import annotations

import itertools
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import NQ, make_settings
from tests.llm_server import ScriptedChatServer
from trader.config import BUNDLED_DATA
from trader.domain import RunEvent, SessionEnded, StopMoved
from trader.errors import JournalError
from trader.journal import reader
from trader.replay import replay
from trader.report import JOURNAL_FIGURES, format_table
from trader.report.page import figures_of, render_page, sessions_of, write_report_html
from trader.report.plots import GAP_NS, MAX_CANDLES, _trade_bars, build_figure, candle_starts
from trader.report.view import load_run, pick_run

HOSTILE = 'lower highs <img src="x" onerror="alert(1)">'


class Recorder:
    def __init__(self) -> None:
        self.events: list[RunEvent] = []

    def on_event(self, event: RunEvent) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def nq_run(tmp_path_factory):
    """The shared 14,714-bar NQ file replayed once (about 3 s): the long run of these tests."""
    journal = tmp_path_factory.mktemp("nq") / "j.sqlite"
    rec = Recorder()
    out = replay(make_settings(data={"paths": [str(NQ)]}), journal_path=journal, observers=(rec,))
    assert out.status == "completed" and out.stats.bars > MAX_CANDLES
    return out, journal, rec


def test_every_figure_of_the_report_recomputes_exactly_from_the_journal(nq_run):
    out, journal, _ = nq_run
    view = load_run(journal)
    assert view.info.run_id == out.run_id and view.info.report is not None
    figures = figures_of(view)
    for key in JOURNAL_FIGURES:
        assert figures[key] == out.report[key] == view.info.report[key], key
    assert [t for _, t in view.trades] == out.trades
    page = render_page(view)
    assert "Every P&amp;L figure recomputes exactly from the journal" in page
    assert "differ from the journal" not in page
    text = format_table(out.report)  # the terminal table: same labels and values
    assert "net P&L (USD)" in text and f"{out.report['net_pnl']:,.2f}" in text
    assert "max drawdown (USD)" in text and f"{out.report['max_drawdown']:,.2f}" in text


def test_sessions_add_up_to_the_run_and_agree_with_the_engines_session_summaries(nq_run):
    out, journal, rec = nq_run
    view = load_run(journal)
    rows = sessions_of(view)
    assert len(rows) == out.report["trading_days"] > 5
    assert round(sum(r.net_pnl_usd for r in rows), 2) == out.report["net_pnl"]
    assert sum(r.trades for r in rows) == out.report["trades"]
    assert sum(r.bars for r in rows) == out.report["bars"]
    assert sum(r.entries_vetoed for r in rows) == len(view.vetoed_entries()) > 0
    ended = [e for e in rec.events if isinstance(e, SessionEnded)]
    by_id = {e.session_id: e for e in ended}
    for r in rows:
        e = by_id[r.session_id]
        assert r.trades == e.trades
        assert r.end_equity_usd == pytest.approx(e.equity_usd, abs=0.005)


def test_the_stop_line_holds_every_stop_the_engine_set_including_trailing_moves(nq_run):
    _, journal, rec = nq_run
    view = load_run(journal)
    moved = [e.new for e in rec.events if isinstance(e, StopMoved)]
    assert len(moved) > out_fills(journal)  # break-even and trailing moves, not only fills
    journaled = [k for k, _ in itertools.groupby(s for _, s in view.stops)]
    announced = [k for k, _ in itertools.groupby(moved)]
    assert journaled == announced and None in journaled  # stops come and go with positions


def out_fills(journal: Path) -> int:
    with sqlite3.connect(journal) as con:
        return int(con.execute("SELECT count(*) FROM fills").fetchone()[0])


def test_a_long_run_is_drawn_with_at_most_5000_candles_and_each_fill_keeps_its_own(nq_run):
    out, journal, _ = nq_run
    view = load_run(journal)
    n = len(view.ts_ns)
    keep = _trade_bars(view)
    starts, k = candle_starts(view.ts_ns, keep)
    assert len(starts) <= MAX_CANDLES < n and k >= 2
    start_set = set(starts.tolist())
    for i in keep.tolist():  # the bar of every entry and exit is a candle of its own
        assert i in start_set and (i + 1 in start_set or i + 1 == n)
    ends = np.append(starts[1:], n)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):  # none spans a market closure
        assert b - a <= k and (b - a == 1 or np.diff(view.ts_ns[a:b]).max() <= GAP_NS)
    fig, notes = build_figure(view)
    traces = {t.name: t for t in fig.data}
    candles = traces["NQ candles"]
    assert len(candles.x) == len(starts)
    assert max(candles.high) == view.high.max() and min(candles.low) == view.low.min()
    assert list(candles.close)[-1] == view.close[-1]
    assert traces["equity"].y[-1] == pytest.approx(out.report["net_pnl"] + view.start_balance_usd)
    assert -min(traces["drawdown"].y) == pytest.approx(out.report["max_drawdown"])
    assert any(f"{n:,} bars drawn as {len(starts):,} candles" in note for note in notes)
    assert len(traces["entry long"].x) + len(traces["entry short"].x) == out.report["trades"]


def test_candles_come_from_the_data_file_and_a_missing_file_leaves_the_closes_as_a_line(tmp_path):
    data = tmp_path / "nq.csv"
    shutil.copy(BUNDLED_DATA, data)
    settings = make_settings(data={"paths": [str(data)], "end": "2023-11-28T16:00:00"})
    out = replay(settings, journal_path=tmp_path / "j.sqlite")
    view = load_run(tmp_path / "j.sqlite", out.run_id)
    assert view.open is not None and view.high is not None and view.low is not None
    assert "nq.csv" in view.candles_from
    assert (view.high >= np.maximum(view.open, view.close)).all()
    assert (view.low <= np.minimum(view.open, view.close)).all()
    fig, _ = build_figure(view)
    assert [t.type for t in fig.data].count("candlestick") == 1
    data.unlink()
    gone = load_run(tmp_path / "j.sqlite", out.run_id)
    assert gone.open is None and gone.candles_from == f"data file not found: {data}"
    fig, notes = build_figure(gone)
    assert "candlestick" not in [t.type for t in fig.data]
    assert list(next(t for t in fig.data if t.name == "close").y) == list(view.close)
    assert any(note.startswith(f"No candles (data file not found: {data})") for note in notes)
    page = write_report_html(tmp_path / "j.sqlite", out.run_id[:6], tmp_path / "p.html")
    assert page.read_text().startswith("<!doctype html>")


def test_llm_overrides_and_vetoed_entries_are_marked_with_their_reasons_and_escaped(tmp_path):
    with ScriptedChatServer(lambda body: f"SELL | 0.95 | {HOSTILE}") as server:
        settings = make_settings(
            advisor={
                "mode": "sync",
                "backend": "openai",
                "openai": {"base_url": server.base_url},
                "schedule": "interval",
            },
            data={"end": "2023-11-28T16:00:00"},
        )
        out = replay(settings, journal_path=tmp_path / "j.sqlite")
    view = load_run(tmp_path / "j.sqlite")
    with sqlite3.connect(tmp_path / "j.sqlite") as con:
        overrides = [
            r[0]
            for r in con.execute(
                "SELECT bar_index FROM decisions WHERE llm_action IS NOT NULL AND fused_action != rl_action "
                "AND method IN ('llm_override', 'weighted_llm', 'uncertainty_hold') ORDER BY bar_index"
            )
        ]
        vetoed = [
            r[0]
            for r in con.execute(
                "SELECT bar_index FROM decisions WHERE vetoes IS NOT NULL AND fused_action IN (1, 2) "
                "AND final_action != fused_action ORDER BY bar_index"
            )
        ]
    assert overrides and vetoed, "the scripted SELL at 0.95 overrides an unsure RL; losses bring vetoes"
    fig, _ = build_figure(view)
    traces = {t.name: t for t in fig.data}
    llm = traces["LLM overrode RL"]
    assert [c[0] for c in llm.customdata] == overrides
    hover = llm.hovertext[0]
    assert "llm_override" in hover or "weighted_llm" in hover or "uncertainty_hold" in hover
    assert "LLM SELL 0.95" in hover and "HOLD " in hover and "BUY " in hover  # answer + RL probabilities
    assert '&lt;img src="x" onerror="alert(1)"&gt;' in hover and "<img" not in hover
    veto_traces = [t for name, t in traces.items() if name.startswith("veto: ")]
    marked = [c[0] for t in veto_traces for c in t.customdata]
    assert set(marked) <= set(vetoed)
    counted = sum(int(t.name.rsplit("(", 1)[1].split()[0]) for t in veto_traces)
    assert counted == len(vetoed)  # every vetoed entry is in exactly one trace
    first = next(t for t in veto_traces if t.visible is True)
    assert "vetoes: " in first.hovertext[0] and first.customdata[0][7]
    assert out.report["llm"]["llm_overrides"] >= sum(1 for c in llm.customdata if c[1] != "uncertainty_hold")
    assert "<img" not in render_page(view)


def test_a_run_is_picked_by_id_or_prefix_and_an_unknown_id_lists_the_journals_runs(tmp_path):
    journal = tmp_path / "j.sqlite"
    settings = make_settings(data={"end": "2023-11-28T12:00:00"})
    a = replay(settings, journal_path=journal)
    b = replay(settings, journal_path=journal)
    assert pick_run(journal, None).run_id == b.run_id  # the latest
    assert pick_run(journal, a.run_id[:6]).run_id == a.run_id
    with pytest.raises(JournalError) as exc:
        pick_run(journal, "nope")
    assert "'nope' is not in journal" in str(exc.value)
    assert a.run_id in str(exc.value) and b.run_id in str(exc.value)
    assert [r.run_id for r in reader.runs(journal)] == [a.run_id, b.run_id]


def test_a_run_journaled_without_decisions_gets_a_page_that_says_so_and_lists_its_trades(tmp_path):
    settings = make_settings(data={"end": "2023-11-28T16:00:00"}, journal={"level": "trades"})
    out = replay(settings, journal_path=tmp_path / "j.sqlite")
    assert out.report["journal_level"] == "trades" and out.report["trades"] > 0
    page = write_report_html(tmp_path / "j.sqlite").read_text()
    assert "journaled no per-bar decisions (journal.level = trades)" in page
    assert "report-figure" not in page and "Plotly" not in page  # no chart to draw, no plotly.js
    assert f"{out.report['trades']} trades</summary>" in page
    assert page.count("<tr><td>") >= out.report["trades"]
