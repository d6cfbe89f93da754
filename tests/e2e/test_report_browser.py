"""The replay's report page in a real browser (Debian's Chromium driven by Playwright): `trader
replay` as a user runs it, its LLM a scripted OpenAI-compatible server on loopback. The page
loads from a file with no console error and no request at all (plotly.js is inside it), draws
candles, equity and drawdown, its trade markers name the journal's trades when hovered, zooming
fits the price axis to what is shown, and the LLM's text cannot put markup into the page."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from tests.browser import launch, needs_chromium
from tests.llm_server import ScriptedChatServer
from trader.config import BUNDLED_DATA

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api")

HOSTILE = 'lower highs <img src="x" onerror="alert(1)">'
TZ = ZoneInfo("America/New_York")
UI_TIMEOUT_MS = 20_000  # a bound on waiting for the page, never a timing assertion
FIGURE = "document.getElementById('report-figure')"
TRADER = (sys.executable, "-m", "trader")
ARGS = ("--llm", "sync", "--llm-schedule", "interval", "--to", "2023-11-28T16:00:00", "--journal", "j.sqlite")
ARGS += ("--report", "out/r.json")


@dataclass
class Replayed:
    page: Path
    journal: Path
    report: dict[str, Any]
    run_id: str


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Replayed:
    """`trader replay` of the bundled NQ slice to 16:00 on Nov 28 (1,320 bars) with the LLM asked
    on the service's interval schedule; the page goes beside --report."""
    tmp = tmp_path_factory.mktemp("report")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADER_")}
    with ScriptedChatServer(lambda body: f"SELL | 0.95 | {HOSTILE}") as server:
        env.update(TRADER_ADVISOR__BACKEND="openai", TRADER_ADVISOR__OPENAI__BASE_URL=server.base_url)
        r = subprocess.run(
            [*TRADER, "replay", *ARGS],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr
    page = tmp / "out" / "r.html"
    assert "page: out/r.html" in r.stdout
    report = json.loads((tmp / "out" / "r.json").read_text())
    return Replayed(page, tmp / "j.sqlite", report, report["run_id"])


@dataclass
class Opened:
    page: Any
    errors: list[str]
    requests: list[str]
    failed: list[str]


@pytest.fixture
def opened(replayed: Replayed) -> Iterator[Opened]:
    with sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            o = Opened(page, [], [], [])
            page.on("console", lambda m: o.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: o.errors.append(str(e)))
            page.on("dialog", lambda d: (o.errors.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda req: o.requests.append(req.url))
            page.on("requestfailed", lambda req: o.failed.append(req.url))
            page.goto(replayed.page.as_uri())
            page.wait_for_function(f"{FIGURE} && {FIGURE}._fullLayout", timeout=UI_TIMEOUT_MS)
            yield o
        finally:
            browser.close()


def _traces(page: Any) -> dict[str, dict[str, Any]]:
    """Every trace of the figure by name: type, visibility, point count, customdata, hover text."""
    return {
        t["name"]: t
        for t in page.evaluate(
            f"""() => {FIGURE}._fullData.map(t => ({{
                name: t.name, type: t.type, visible: t.visible, n: (t.x || []).length,
                x: Array.from(t.x || []).slice(0, 2000), customdata: t.customdata || null,
                hovertext: t.hovertext || null,
                y_last: t.y && t.y.length ? t.y[t.y.length - 1] : null,
                y_min: t.y && t.y.length ? Math.min(...Array.from(t.y).filter(v => v !== null)) : null }}))"""
        )
    }


def _local(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).astimezone(TZ).strftime("%Y-%m-%d %H:%M:%S")


def _hover_point(page: Any, trace: str, k: int, minutes: int = 45) -> str:
    """Zoom to ``minutes`` around point k of a trace, move the real mouse onto it, return the
    hover label's text."""
    x = page.evaluate(f"() => {FIGURE}._fullData.find(t => t.name === {json.dumps(trace)}).x[{k}]")
    t = datetime.fromisoformat(x)
    lo = (t.timestamp() - minutes * 60) * 1000
    hi = (t.timestamp() + minutes * 60) * 1000
    page.evaluate(
        f"""() => Plotly.relayout({FIGURE}, {{'xaxis.range': [
            new Date({lo}).toISOString().slice(0, 19).replace('T', ' '),
            new Date({hi}).toISOString().slice(0, 19).replace('T', ' ')]}})"""
    )
    page.evaluate(f"() => {FIGURE}.scrollIntoView()")
    pos = page.evaluate(
        f"""() => {{ const gd = {FIGURE}, xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const t = gd._fullData.find(t => t.name === {json.dumps(trace)});
            const r = gd.getBoundingClientRect();
            return [r.left + xa._offset + xa.l2p(xa.d2l(t.x[{k}])),
                    r.top + ya._offset + ya.l2p(t.y[{k}])]; }}"""
    )
    page.mouse.move(pos[0], pos[1])
    page.wait_for_selector(".hoverlayer .hovertext", timeout=UI_TIMEOUT_MS)
    return str(page.evaluate("() => document.querySelector('.hoverlayer .hovertext').textContent"))


def test_the_page_loads_offline_with_no_error_and_draws_candles_equity_and_drawdown(opened, replayed):
    traces = _traces(opened.page)
    assert opened.errors == [] and opened.failed == []
    assert opened.requests == [replayed.page.as_uri()]  # nothing fetched: plotly.js is in the page
    candles = traces["NQ candles"]
    assert candles["type"] == "candlestick" and candles["n"] == replayed.report["bars"] == 1320
    assert traces["equity"]["n"] == traces["drawdown"]["n"] == 1320
    assert traces["equity"]["y_last"] == pytest.approx(50_000 + replayed.report["net_pnl"])
    assert -traces["drawdown"]["y_min"] == pytest.approx(replayed.report["max_drawdown"])
    drawn = opened.page.evaluate(
        f"""() => Array.from({FIGURE}.querySelectorAll('.boxlayer .trace.boxes path'))
            .filter(p => !p.closest('.rangeslider-container')).length"""
    )
    assert drawn == 1320  # drawn as candles (the range slider draws them again, smaller)
    assert opened.page.locator("#session-table tbody tr").count() == replayed.report["trading_days"]
    assert "recomputes exactly from the journal" in opened.page.locator("#summary").inner_text()


def test_a_trade_markers_hover_names_the_journaled_trade(opened, replayed):
    with sqlite3.connect(replayed.journal) as con:
        trades = con.execute(
            "SELECT seq, entry_ts_ns, exit_ts_ns, side, entry_price, exit_price, pnl_usd FROM trades "
            "WHERE run_id=? ORDER BY seq",
            (replayed.run_id,),
        ).fetchall()
    assert trades, "the replay should trade"
    traces = _traces(opened.page)
    exits = traces["exit (colour: P&L)"]
    assert [c[0] for c in exits["customdata"]] == [t[0] for t in trades]
    for c, (_, ets, xts, side, ep, xp, pnl) in zip(exits["customdata"], trades, strict=True):
        assert c[1:7] == ["LONG" if side == 1 else "SHORT", _local(ets), _local(xts), pnl, ep, xp]
    k = len(trades) - 1
    seq, ets, xts, side, ep, xp, pnl = trades[k]
    text = _hover_point(opened.page, "exit (colour: P&L)", k)
    assert f"trade #{seq} {'LONG' if side == 1 else 'SHORT'} 1" in text
    assert f"P&L {pnl:+,.2f} USD".replace("+-", "-") in text
    assert f"entry {_local(ets)} @ {ep:,.2f}" in text and f"exit {_local(xts)} @ {xp:,.2f}" in text
    assert opened.errors == []


def test_zooming_fits_the_price_axis_to_the_bars_shown(opened, replayed):
    full = opened.page.evaluate(f"() => {FIGURE}._fullLayout.yaxis.range")
    lo, hi = "2023-11-28 10:00:00", "2023-11-28 11:00:00"
    opened.page.evaluate(f"() => Plotly.relayout({FIGURE}, {{'xaxis.range': ['{lo}', '{hi}']}})")
    span = f"{FIGURE}._fullLayout.yaxis.range[1] - {FIGURE}._fullLayout.yaxis.range[0]"
    opened.page.wait_for_function(
        f"() => {span} < {full[1] - full[0]}",
        timeout=UI_TIMEOUT_MS,
    )
    got = opened.page.evaluate(f"() => {FIGURE}._fullLayout.yaxis.range")
    bars = pl.read_csv(BUNDLED_DATA).filter(  # its naive times are New York's, as on the axis
        (pl.col("timestamp") >= lo) & (pl.col("timestamp") <= hi)
    )
    assert len(bars) == 61
    assert got[0] <= bars["low"].min() < bars["high"].max() <= got[1]
    assert got[1] - got[0] < (bars["high"].max() - bars["low"].min()) * 1.5  # fits what is shown
    assert opened.errors == []


def test_an_llm_override_hover_shows_the_decision_trail_and_the_llms_text_stays_text(opened, replayed):
    traces = _traces(opened.page)
    llm = traces["LLM overrode RL"]
    assert llm["n"] > 0 and llm["visible"] is True
    text = _hover_point(opened.page, "LLM overrode RL", 0)
    assert "LLM overrode RL" in text and "method " in text
    assert "LLM SELL 0.95" in text and "RL BUY" in text and "HOLD " in text  # answer, RL probabilities
    assert HOSTILE in text  # shown as the text it is
    assert opened.page.locator(".hoverlayer img, #report-figure img").count() == 0
    assert any(n.startswith("veto: ") for n in traces)
    assert opened.errors == [] and opened.failed == []
    assert opened.requests == [replayed.page.as_uri()]
