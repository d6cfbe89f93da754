"""A sweep's end: the ranked table in the terminal and a self-contained HTML page (Plotly inline,
no CDN) with the metric against each parameter and a parallel-coordinates plot."""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from trader.research.space import Mode

SHOWN_METRICS = ("net_pnl", "sharpe", "trades", "win_rate", "max_drawdown")


def ranked(frame: Any, metric: str, mode: Mode) -> Any:
    """The ok trials best first by the searcher's objective (the metric, undefined values last),
    ties by trial key so the order is stable."""
    import polars as pl

    ok = frame.filter(pl.col("status") == "ok")
    return ok.sort(["objective", "trial_key"], descending=[mode == "max", False], nulls_last=True)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def print_ranked(frame: Any, params: Sequence[str], metric: str, mode: Mode, top: int, out: TextIO) -> None:
    """The top ``top`` trials by ``metric`` as a rich table, then the failed count and first error."""
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=None if out.isatty() else 160)
    best = ranked(frame, metric, mode).head(top)
    shown = [metric, *(m for m in SHOWN_METRICS if m != metric)]
    table = Table(title=f"top {min(top, best.height)} by {metric} ({mode})")
    table.add_column("#", justify="right")
    table.add_column("trial")
    for p in params:
        table.add_column(p, justify="right")
    for m in shown:
        table.add_column(m, justify="right", style="bold" if m == metric else None)
    for i, row in enumerate(best.iter_rows(named=True), 1):
        table.add_row(
            str(i), row["trial_key"], *(_cell(row.get(p)) for p in params), *(_cell(row[m]) for m in shown)
        )
    console.print(table)
    failed = frame.filter(pl.col("status") == "failed")
    ok_count = frame.height - failed.height
    line = f"{ok_count} ok, {failed.height} failed"
    if failed.height:
        line += f"; first error ({failed['trial_key'][0]}): {' '.join(str(failed['error'][0]).split())}"
    console.print(line, markup=False, highlight=False)


def _axis(values: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Numbers as they are; anything else as category codes with its labels as ticks."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values, {}
    labels = sorted({json.dumps(v) if not isinstance(v, str) else v for v in values})
    code = {label: i for i, label in enumerate(labels)}
    coded = [code[json.dumps(v) if not isinstance(v, str) else v] for v in values]
    return coded, {"tickvals": list(range(len(labels))), "ticktext": labels}


def write_page(path: Path, frame: Any, params: Sequence[str], metric: str, mode: Mode, sweep_id: str) -> Path:
    """Write ``sweep.html``: metric vs each parameter (one scatter each), a parallel-coordinates
    plot of every ok trial, the top trials and the failed ones with their errors."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    best = ranked(frame, metric, mode)
    rows = [r for r in best.iter_rows(named=True) if _finite(r.get(metric))]
    undefined = best.height - len(rows)
    parsed = [json.loads(r["params_json"]) for r in rows]
    hover = [
        f"{r['trial_key']}<br>"
        + "<br>".join(f"{k} = {v}" for k, v in p.items())
        + f"<br>{metric} = {r[metric]}"
        for r, p in zip(rows, parsed, strict=True)
    ]
    y = [r[metric] for r in rows]
    ncols = min(len(params), 2) or 1
    nrows = math.ceil(len(params) / ncols) or 1
    scatter = make_subplots(rows=nrows, cols=ncols, subplot_titles=list(params))
    for i, name in enumerate(params):
        xs = [p.get(name) for p in parsed]
        x = [v if isinstance(v, int | float) and not isinstance(v, bool) else str(v) for v in xs]
        scatter.add_trace(
            go.Scatter(x=x, y=y, mode="markers", text=hover, hoverinfo="text", name=name, showlegend=False),
            row=i // ncols + 1,
            col=i % ncols + 1,
        )
        scatter.update_yaxes(title_text=metric, row=i // ncols + 1, col=i % ncols + 1)
    note = f" ({undefined} trials with no {metric} not shown)" if undefined else ""
    scatter.update_layout(title=f"{metric} vs each parameter{note}", height=360 * nrows)

    dims = []
    for name in params:
        values, ticks = _axis([p.get(name) for p in parsed])
        dims.append({"label": name, "values": values, **ticks})
    dims.append({"label": metric, "values": y})
    parallel = go.Figure(
        go.Parcoords(
            line={"color": y, "colorscale": "Viridis", "showscale": True, "reversescale": mode == "min"},
            dimensions=dims,
        )
    )
    parallel.update_layout(title=f"parallel coordinates, coloured by {metric}", height=480)

    import polars as pl

    failed = frame.filter(pl.col("status") == "failed")
    head_cols = ["trial_key", *params, "net_pnl", "sharpe", "sortino", "max_drawdown", "trades"]
    head_cols += ["win_rate", "profit_factor", "run_id", "wall_s"]
    top_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in head_cols) + "</tr>"
        for r in best.head(20).iter_rows(named=True)
    )
    failed_rows = "".join(
        f"<tr><td>{html.escape(r['trial_key'])}</td><td>{html.escape(r['params_json'] or '')}</td>"
        f"<td><pre>{html.escape(r['error'] or '')}</pre></td></tr>"
        for r in failed.iter_rows(named=True)
    )
    header = "".join(f"<th>{html.escape(c)}</th>" for c in head_cols)
    failed_block = (
        f"<h2>failed trials ({failed.height})</h2><table><tr><th>trial</th><th>params</th>"
        f"<th>error</th></tr>{failed_rows}</table>"
        if failed.height
        else ""
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>sweep {html.escape(sweep_id)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
pre{{white-space:pre-wrap;text-align:left;margin:0}}</style>
</head><body>
<h1>sweep {html.escape(sweep_id)}</h1>
<p>{best.height} ok, {failed.height} failed; ranked by {html.escape(metric)} ({mode}).</p>
{scatter.to_html(include_plotlyjs=True, full_html=False)}
{parallel.to_html(include_plotlyjs=False, full_html=False)}
<h2>top trials</h2><table><tr>{header}</tr>{top_rows}</table>
{failed_block}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
