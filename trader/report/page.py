"""The run report page: one self-contained HTML file (plotly.js embedded, nothing fetched), built
from the journal alone (plus the run's data files for a replay's candles), so ``trader replay``'s
page and ``trader report --journal F --run ID`` are the same page.

It shows the run (what ran, on what), the report's figures as journaled at the end of the run with
the journal's own recomputation beside them, the figure (:mod:`trader.report.plots`), one row per
trading session, and the trades.
"""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plotly.io as pio

from trader import __version__
from trader.report.plots import build_figure
from trader.report.stats import JOURNAL_FIGURES, SessionRow, journal_figures, session_rows
from trader.report.tables import fmt, local_time, report_rows, session_date
from trader.report.view import RunView, load_run

FIGURE_ID = "report-figure"

# After a zoom or a drag of the range slider, fit each y axis to what is shown (Plotly's autorange
# would keep the whole run's range). Times are the axis's own "YYYY-MM-DD HH:MM:SS" text, which
# compares correctly as text.
RESCALE_JS = """
(function () {
  var gd = document.getElementById('{plot_id}');
  var busy = false;
  function span(lo, hi, axis) {
    var min = Infinity, max = -Infinity;
    gd._fullData.forEach(function (t) {  // decoded arrays (gd.data keeps base64 specs)
      if ((t.yaxis || 'y') !== axis || t.visible === 'legendonly' || t.visible === false) return;
      var xs = t.x || [];
      var lows = t.type === 'candlestick' ? t.low : t.y;
      var highs = t.type === 'candlestick' ? t.high : t.y;
      if (!lows) return;
      for (var i = 0; i < xs.length; i++) {
        var x = xs[i];
        if (x === null || x < lo || x > hi) continue;
        var a = lows[i], b = highs[i];
        if (a === null || b === null || a === undefined || isNaN(a)) continue;
        if (a < min) min = a;
        if (b > max) max = b;
      }
    });
    if (min === Infinity) return null;
    var pad = (max - min) * 0.06 || Math.abs(max) * 0.001 || 1;
    return [min - pad, max + pad];
  }
  gd.on('plotly_relayout', function (ev) {
    if (busy) return;
    var upd = {};
    if (ev['xaxis.autorange']) {
      upd = {'yaxis.autorange': true, 'yaxis2.autorange': true, 'yaxis3.autorange': true};
    } else {
      var r = ev['xaxis.range'] || (ev['xaxis.range[0]'] !== undefined ?
        [ev['xaxis.range[0]'], ev['xaxis.range[1]']] : null);
      if (!r) return;
      [['y', 'yaxis'], ['y2', 'yaxis2'], ['y3', 'yaxis3']].forEach(function (p) {
        var s = span(String(r[0]), String(r[1]), p[0]);
        if (s) upd[p[1] + '.range'] = s;
      });
    }
    busy = true;
    Plotly.relayout(gd, upd).then(function () { busy = false; }, function () { busy = false; });
  });
})();
"""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 24px 40px; color: #222; }
h1 { font-size: 20px; margin: 18px 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
.meta { color: #555; margin: 2px 0; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; position: sticky; top: 0; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; white-space: normal; }
.pos { color: #1b7f1b; } .neg { color: #c62828; }
.ok { color: #1b7f1b; } .bad { color: #c62828; font-weight: bold; }
.notes { color: #555; font-size: 13px; margin: 4px 0; } .notes li { margin: 2px 0; }
tfoot td { font-weight: bold; border-top: 2px solid #bbb; }
.columns { display: flex; gap: 40px; flex-wrap: wrap; align-items: flex-start; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num_cell(v: Any, signed: bool = False) -> str:
    cls = ""
    if signed and isinstance(v, int | float) and v:
        cls = ' class="pos"' if v > 0 else ' class="neg"'
    return f"<td{cls}>{_e(fmt(v))}</td>"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isinf(a) and math.isinf(b):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return bool(a == b)


def _summary(view: RunView, figures: dict[str, Any] | None) -> str:
    report = view.info.report
    if report is None and figures is None:
        return (
            f"<p class='notes'>No report and no decisions in the journal (status {_e(view.info.status)}).</p>"
        )
    if report is None:
        assert figures is not None
        head = (
            f"<p class='notes'>This run has no final report yet (status {_e(view.info.status)}); "
            "the figures below are recomputed from the journal as it stands.</p>"
        )
        rows = "".join(
            f"<tr><td>{_e(k)}</td>{_num_cell(v, k in ('net_pnl', 'avg_trade'))}</tr>"
            for k, v in figures.items()
        )
        return f"{head}<table id='summary-table'><tbody>{rows}</tbody></table>"
    label_of = {
        "bars": "bars processed",
        "trades": "trades",
        "net_pnl": "net P&L (USD)",
        "win_rate": "win rate",
        "profit_factor": "profit factor",
        "avg_trade": "avg trade (USD)",
        "max_drawdown": "max drawdown (USD)",
        "sharpe": "Sharpe (daily, ann.)",
        "sortino": "Sortino (daily, ann.)",
        "trading_days": "trading days",
        "exposure": "exposure",
    }
    key_of = {v: k for k, v in label_of.items()}
    body = []
    for label, value in report_rows(report):
        key = key_of.get(label)
        if figures is None:
            check = ""
        elif key is not None:
            same = _same(value, figures[key])
            mark = "✓" if same else f"✗ journal says {fmt(figures[key])}"
            check = f"<td class='{'ok' if same else 'bad'}'>{_e(mark)}</td>"
        else:
            check = "<td></td>"
        signed = label in ("net P&L (USD)", "avg trade (USD)")
        cell = _num_cell(value, signed)
        if isinstance(value, dict | str):
            cell = f"<td class='text'>{_e(fmt(value))}</td>"
        body.append(f"<tr><td>{_e(label)}</td>{cell}{check}</tr>")
    if figures is None:
        return f"<table id='summary-table'><tbody>{''.join(body)}</tbody></table>"
    mismatches = [k for k in JOURNAL_FIGURES if not _same(report.get(k), figures[k])]
    verdict = (
        "<p class='ok'>Every P&amp;L figure recomputes exactly from the journal's decisions and "
        "trades (✓).</p>"
        if not mismatches
        else f"<p class='bad'>These figures differ from the journal: {_e(', '.join(mismatches))}.</p>"
    )
    return (
        "<table id='summary-table'><thead><tr><th>figure</th><th>value</th><th>journal</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>{verdict}"
    )


def _sessions(view: RunView, rows: list[SessionRow]) -> str:
    body = []
    for s in rows:
        first, last = local_time(s.first_ts_ns, view.tz), local_time(s.last_ts_ns, view.tz)
        body.append(
            "<tr>"
            f"<td>{_e(session_date(s.session_id))}</td>"
            f"<td>{_e(first)}</td><td>{_e(last)}</td>"
            f"<td>{s.bars}</td><td>{s.trades}</td><td>{s.wins}</td>"
            f"{_num_cell(s.net_pnl_usd, True)}{_num_cell(s.max_drawdown_usd)}{_num_cell(s.end_equity_usd)}"
            f"<td>{s.llm_decided}</td><td>{s.entries_vetoed}</td></tr>"
        )
    total = sum(s.net_pnl_usd for s in rows)
    foot = (
        f"<tfoot><tr><td>{len(rows)} sessions</td><td></td><td></td><td>{sum(s.bars for s in rows)}</td>"
        f"<td>{sum(s.trades for s in rows)}</td><td>{sum(s.wins for s in rows)}</td>"
        f"{_num_cell(round(total, 2), True)}<td></td><td></td>"
        f"<td>{sum(s.llm_decided for s in rows)}</td><td>{sum(s.entries_vetoed for s in rows)}</td>"
        "</tr></tfoot>"
    )
    head = (
        "<thead><tr><th>session</th><th>first bar</th><th>last bar</th><th>bars</th><th>trades</th>"
        "<th>wins</th><th>net P&amp;L (USD)</th><th>max drawdown (USD)</th><th>equity at end (USD)</th>"
        "<th>LLM decided</th><th>entries vetoed</th></tr></thead>"
    )
    return f"<table id='session-table'>{head}<tbody>{''.join(body)}</tbody>{foot}</table>"


def _trades(view: RunView) -> str:
    body = []
    for seq, t in view.trades:
        entry = local_time(t.entry_ts_ns, view.tz, "%Y-%m-%d %H:%M:%S")
        exit_ = local_time(t.exit_ts_ns, view.tz, "%Y-%m-%d %H:%M:%S")
        body.append(
            f"<tr><td>{seq}</td><td>{'LONG' if t.side > 0 else 'SHORT'}</td><td>{t.qty}</td>"
            f"<td>{_e(entry)}</td><td>{t.entry_price:,.2f}</td>"
            f"<td>{_e(exit_)}</td><td>{t.exit_price:,.2f}</td>"
            f"<td class='text'>{_e(t.exit_reason)}</td>{_num_cell(t.pnl_usd, True)}</tr>"
        )
    head = (
        "<thead><tr><th>#</th><th>side</th><th>qty</th><th>entry</th><th>price</th><th>exit</th>"
        "<th>price</th><th>exit reason</th><th>P&amp;L (USD)</th></tr></thead>"
    )
    return (
        f"<details><summary>{len(view.trades)} trades</summary>"
        f"<table id='trades-table'>{head}<tbody>{''.join(body)}</tbody></table></details>"
    )


def no_decisions_note(view: RunView) -> str:
    """Why a run's page has no chart: what its journal holds instead."""
    level = (view.info.report or {}).get("journal_level")
    if level in ("trades", "summary"):
        held = "its trades are listed below" if level == "trades" else "only its report was kept"
        return (
            f"This run journaled no per-bar decisions (journal.level = {level}): there is no chart, no "
            f"session table and no check of the figures against the journal; {held}."
        )
    return "This run has no decided bars in the journal: there is no chart and no session table."


def figures_of(view: RunView) -> dict[str, Any]:
    """The report's P&L figures recomputed from the run's journaled decisions and trades."""
    trades = [t for _, t in view.trades]
    return journal_figures(
        view.ts_ns, view.equity_usd, view.position, trades, view.start_balance_usd, view.clock
    )


def sessions_of(view: RunView) -> list[SessionRow]:
    """The run's per-session table."""
    return session_rows(
        view.ts_ns,
        view.equity_usd,
        [t for _, t in view.trades],
        view.start_balance_usd,
        view.clock,
        [d.ts_ns for d in view.llm_decided()],
        [d.ts_ns for d in view.vetoed_entries()],
    )


def render_page(view: RunView) -> str:
    """The whole page as one HTML string."""
    info = view.info
    per_bar = len(view.ts_ns) > 0
    figure_html, notes = "", [no_decisions_note(view)]
    figures: dict[str, Any] | None = None
    sessions_html = f"<p class='notes'>{_e(notes[0])}</p>"
    if per_bar:
        fig, notes = build_figure(view)
        figure_html = pio.to_html(
            fig,
            include_plotlyjs=True,
            full_html=False,
            div_id=FIGURE_ID,
            post_script=RESCALE_JS,
            config={"displaylogo": False, "responsive": True, "scrollZoom": False},
            default_height="980px",
        )
        figures = figures_of(view)
        sessions_html = _sessions(view, sessions_of(view))
    period = ""
    if len(view.ts_ns):
        period = (
            f"{local_time(int(view.ts_ns[0]), view.tz)} .. {local_time(int(view.ts_ns[-1]), view.tz)} "
            f"({view.tz.key})"
        )
    cfg = view.config
    llm_mode = cfg.get("advisor", {}).get("mode", "?")
    files = ", ".join(info.data_files) or "-"
    title = f"trader report · run {info.run_id[:8]}"
    note_items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    inst = cfg.get("instrument", {})
    day = f"{inst.get('session_open', '')} to {inst.get('session_close', '')} {view.tz.key}"
    bars = f"{len(view.ts_ns):,} decided bars"
    balance = f"start balance {view.start_balance_usd:,.2f} USD"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>Run {_e(info.run_id)} · {_e(info.mode)} · {_e(info.status)}</h1>
<p class="meta">{_e(period)} · {bars} · {balance} ·
LLM {_e(llm_mode)} · policy {_e(info.policy_path or "-")}</p>
<p class="meta">data: {_e(files)} · journal: {_e(view.journal_path)} · started {_e(info.started_at)}
· finished {_e(info.finished_at or "-")}</p>
<div class="columns">
<section id="summary"><h2>Report</h2>{_summary(view, figures)}</section>
<section id="sessions"><h2>Sessions</h2>{sessions_html}
<p class="notes">A session is a trading day ({_e(day)}); its net P&amp;L is the change of marked equity
over it, so the sessions add up to the run's net P&amp;L. Trades count where they closed.</p>
</section>
</div>
<section id="chart"><h2>Price, trades, stops, LLM advice and vetoes; equity and drawdown</h2>
<ul class="notes">{note_items}</ul>
{figure_html}
</section>
<section id="trades"><h2>Trades</h2>{_trades(view)}</section>
<p class="notes">trader {_e(__version__)} · written {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}</p>
</body>
</html>
"""


def default_page_path(journal: str | Path, run_id: str) -> Path:
    """Where the page goes unless told: beside the journal, ``report-<run8>.html``."""
    return Path(journal).resolve().parent / f"report-{run_id[:8]}.html"


def write_report_html(journal: str | Path, run_id: str | None = None, out: str | Path | None = None) -> Path:
    """Build the page of run ``run_id`` (default: the journal's latest run) and write it to
    ``out`` (default: :func:`default_page_path`). Returns the path written."""
    return write_page(load_run(journal, run_id), out)


def write_page(view: RunView, out: str | Path | None = None) -> Path:
    """Write a run's page to ``out`` (default: :func:`default_page_path`); returns the path."""
    path = Path(out) if out is not None else default_page_path(view.journal_path, view.info.run_id)
    page = render_page(view)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
