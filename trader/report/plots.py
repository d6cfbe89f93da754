"""The run's figure (Plotly): candles with trades, stops, LLM and veto markers; equity and drawdown
below on the same time axis, with a range slider.

Long runs are drawn with at most :data:`MAX_CANDLES` candles: consecutive 1-bar candles are merged
into k-bar candles (first open, highest high, lowest low, last close), k as small as fits, never
across a market closure, and every bar with a fill keeps its own candle, so an entry or exit marker
always sits on the bar it happened in. Markers are never merged, except runs of consecutive bars
vetoed for the same rules, which are one marker that says how many bars it covers. Equity is drawn
at the last bar of each candle and drawdown as its deepest point inside the candle, so the
maximum drawdown the report states is on the chart.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import polars as pl

from trader.domain import ACTION_NAMES, Action, Side
from trader.journal.reader import MarkedDecision
from trader.report.stats import drawdown_usd
from trader.report.view import RunView

MAX_CANDLES = 5_000
GAP_NS = 30 * 60 * 1_000_000_000  # a pause between bars this long is a market closure
VETO_RUN_BARS = 15  # vetoed entries of the same rules closer than this are one marker
SCHEDULE_RULES = {"trading_hours", "flatten_before_close"}  # routine vetoes: hidden until asked
PROB_NAMES = ("HOLD", "BUY", "SELL", "BE", "TRAIL+", "TRAIL-")
GREEN, RED, BLUE, ORANGE, PURPLE, GREY = "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#7f7f7f"


def local_strings(ts_ns: np.ndarray, tz: str) -> list[str]:
    """Bar times as exchange-local wall-clock text (what the time axis shows)."""
    if not len(ts_ns):
        return []
    s = pl.Series("t", np.asarray(ts_ns, dtype=np.int64)).cast(pl.Datetime("ns", "UTC"))
    return s.dt.convert_time_zone(tz).dt.strftime("%Y-%m-%d %H:%M:%S").to_list()


def candle_starts(
    ts_ns: np.ndarray, keep: np.ndarray, max_candles: int = MAX_CANDLES
) -> tuple[np.ndarray, int]:
    """First bar of each candle, and k (bars per merged candle; 1 = every bar its own candle).
    ``keep``: indices of bars that keep a candle of their own (bars with a fill)."""
    n = len(ts_ns)
    if n <= max_candles:
        return np.arange(n), 1
    fixed = np.flatnonzero(np.diff(ts_ns) > GAP_NS) + 1  # a candle never spans a closure
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    if 2 * len(keep) + len(fixed) < max_candles // 2:
        fixed = np.concatenate((fixed, keep, keep + 1))
    k = max(2, math.ceil(n / max_candles))
    while True:
        starts = np.unique(np.concatenate(([0], np.arange(0, n, k), fixed)))
        starts = starts[starts < n]
        if len(starts) <= max_candles or k >= n:
            return starts, k
        k = max(k + 1, int(k * 1.2))


@dataclass(frozen=True, slots=True)
class Candles:
    starts: np.ndarray
    ends: np.ndarray  # exclusive
    k: int


def _trade_bars(view: RunView) -> np.ndarray:
    times = [t.entry_ts_ns for _, t in view.trades] + [t.exit_ts_ns for _, t in view.trades]
    if not times or not len(view.ts_ns):
        return np.zeros(0, dtype=np.int64)
    idx = np.searchsorted(view.ts_ns, np.asarray(times, dtype=np.int64), side="right") - 1
    return np.clip(idx, 0, len(view.ts_ns) - 1)


def _money(v: float) -> str:
    return f"{'+' if v > 0 else ''}{v:,.2f}"


def _esc(text: object) -> str:
    """Text from the journal (LLM answers are untrusted) made safe for Plotly's hover HTML."""
    return html.escape(str(text), quote=False)  # Plotly's hover HTML decodes &lt; &gt; &amp; only


def _action(a: int | None) -> str:
    return "-" if a is None else ACTION_NAMES[int(a)]


def decision_hover(d: MarkedDecision, when: str, view: RunView, title: str) -> str:
    """Hover text of a decision marker: RL probabilities, the LLM's answer and confidence, fusion
    method and reasons, risk verdict and vetoes."""
    probs = " ".join(f"{n} {p:.2f}" for n, p in zip(PROB_NAMES, d.probs, strict=True))
    lines = [
        f"<b>{_esc(title)}</b> · bar {d.bar_index} · {when} · close {d.close:,.2f}",
        f"method <b>{_esc(d.method)}</b>: {_esc(d.reasons.replace(';', '; '))}",
        f"RL {_action(d.rl_action)} {d.rl_conf:.2f} · {probs}",
    ]
    if d.llm_action is not None:
        age = d.llm_age_bars or 0
        lines.append(
            f"LLM {_action(d.llm_action)} {(d.llm_conf or 0.0):.2f} (advice {age} bar{'s' * (age != 1)} old)"
        )
        ans = view.answers.get(d.bar_index - age)
        if ans is not None:
            raw = " ".join(ans.raw_answer.split())
            lines.append(f"answer (query {ans.query_id}, {_esc(ans.trigger)}): “{_esc(raw[:140])}”")
    lines.append(
        f"fused {_action(d.fused_action)} → final {_action(d.final_action)} · position {d.position:+d}"
    )
    if d.vetoes:
        lines.append("vetoes: " + "; ".join(_esc(v) for v in d.vetoes.split(";")))
    return "<br>".join(lines)


def _decision_trace(
    view: RunView,
    found: Sequence[MarkedDecision],
    name: str,
    symbol: str,
    color: str,
    counts: Sequence[tuple[int, str]] | None = None,
    visible: bool | str = True,
) -> go.Scatter:
    when = local_strings(np.asarray([d.ts_ns for d in found], dtype=np.int64), view.tz.key)
    texts = []
    for j, d in enumerate(found):
        text = decision_hover(d, when[j], view, name)
        if counts is not None and counts[j][0] > 1:
            text += f"<br><i>{counts[j][0]} consecutive bars vetoed alike, until {counts[j][1]}</i>"
        texts.append(text)
    return go.Scatter(
        x=when,
        y=[d.close for d in found],
        mode="markers",
        name=name,
        visible=visible,
        marker={"symbol": symbol, "size": 10, "color": color, "line": {"width": 1, "color": "#333"}},
        hovertext=texts,
        hoverinfo="text",
        customdata=[
            [
                d.bar_index,
                d.method,
                _action(d.rl_action),
                _action(d.llm_action),
                d.llm_conf,
                _action(d.fused_action),
                _action(d.final_action),
                d.vetoes or "",
            ]
            for d in found
        ],
    )


def veto_rules(d: MarkedDecision) -> str:
    """The rules that vetoed a decision, sorted and joined with '+' (the veto trace it belongs to)."""
    return "+".join(sorted({v.split(":", 1)[0] for v in (d.vetoes or "").split(";") if v}))


def veto_runs(
    vetoed: Sequence[MarkedDecision], tz: str, within_bars: int = VETO_RUN_BARS
) -> tuple[list[MarkedDecision], list[tuple[int, str]]]:
    """Vetoed entries of the same rules on the same action less than ``within_bars`` bars apart,
    as runs: (first decision of each run, (vetoed bars in the run, the last one's time))."""
    firsts: list[MarkedDecision] = []
    lasts: list[int] = []
    counts: list[int] = []
    prev: MarkedDecision | None = None
    for d in vetoed:
        if (
            prev is not None
            and d.bar_index - prev.bar_index < within_bars
            and d.fused_action == prev.fused_action
            and veto_rules(d) == veto_rules(prev)
        ):
            lasts[-1] = d.ts_ns
            counts[-1] += 1
        else:
            firsts.append(d)
            lasts.append(d.ts_ns)
            counts.append(1)
        prev = d
    until = local_strings(np.asarray(lasts, dtype=np.int64), tz)
    return firsts, list(zip(counts, until, strict=True))


def _trade_traces(view: RunView) -> list[go.Scatter]:
    tz = view.tz.key
    seqs = [s for s, _ in view.trades]
    trades = [t for _, t in view.trades]
    entry = local_strings(np.asarray([t.entry_ts_ns for t in trades], dtype=np.int64), tz)
    exit_ = local_strings(np.asarray([t.exit_ts_ns for t in trades], dtype=np.int64), tz)

    def side(t: Any) -> str:
        return "LONG" if t.side == Side.BUY else "SHORT"

    def hover(j: int) -> str:
        t = trades[j]
        return "<br>".join(
            (
                f"<b>trade #{seqs[j]}</b> {side(t)} {t.qty} · P&L <b>{_money(t.pnl_usd)} USD</b>",
                f"entry {entry[j]} @ {t.entry_price:,.2f}",
                f"exit {exit_[j]} @ {t.exit_price:,.2f} ({_esc(t.exit_reason)})",
            )
        )

    def custom(j: int) -> list[Any]:
        t = trades[j]
        return [seqs[j], side(t), entry[j], exit_[j], t.pnl_usd, t.entry_price, t.exit_price, t.exit_reason]

    out = []
    for name, want, symbol, color in (
        ("entry long", Side.BUY, "triangle-up", GREEN),
        ("entry short", Side.SELL, "triangle-down", RED),
    ):
        js = [j for j, t in enumerate(trades) if t.side == want]
        out.append(
            go.Scatter(
                x=[entry[j] for j in js],
                y=[trades[j].entry_price for j in js],
                mode="markers",
                name=name,
                marker={"symbol": symbol, "size": 12, "color": color, "line": {"width": 1, "color": "#222"}},
                hovertext=[hover(j) for j in js],
                hoverinfo="text",
                customdata=[custom(j) for j in js],
            )
        )
    js = list(range(len(trades)))
    out.append(
        go.Scatter(
            x=exit_,
            y=[t.exit_price for t in trades],
            mode="markers",
            name="exit (colour: P&L)",
            marker={
                "symbol": "x-thin-open",
                "size": 11,
                "line": {"width": 2.5, "color": [GREEN if t.pnl_usd > 0 else RED for t in trades]},
            },
            hovertext=[hover(j) for j in js],
            hoverinfo="text",
            customdata=[custom(j) for j in js],
        )
    )
    for won in (True, False):
        xs: list[str | None] = []
        ys: list[float | None] = []
        for j, t in enumerate(trades):
            if (t.pnl_usd > 0) == won:
                xs += [entry[j], exit_[j], None]
                ys += [t.entry_price, t.exit_price, None]
        out.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name="winning trade" if won else "losing trade",
                line={"color": GREEN if won else RED, "width": 1.5, "dash": "dot"},
                hoverinfo="skip",
                showlegend=False,
            )
        )
    return out


def _stop_trace(view: RunView) -> go.Scatter:
    """The protective stop over time as a step line; gaps while flat."""
    xs: list[int] = []
    ys: list[float | None] = []
    prev: float | None = None
    for ts, stop in view.stops:
        if stop is None and prev is not None:
            xs.append(ts)  # the stop held until this moment
            ys.append(prev)
        xs.append(ts)
        ys.append(stop)
        prev = stop
    return go.Scatter(
        x=local_strings(np.asarray(xs, dtype=np.int64), view.tz.key),
        y=ys,
        mode="lines",
        line={"shape": "hv", "color": ORANGE, "width": 1.5},
        name="protective stop",
        connectgaps=False,
        hovertemplate="stop %{y:,.2f}<extra>protective stop</extra>",
    )


def closures(ts_ns: np.ndarray, tz: str, bar_seconds: int) -> list[dict[str, Any]]:
    """Plotly rangebreaks cutting market closures (pauses over 30 minutes) from the time axis: from
    one bar after the last bar before the pause to the first bar after it, in local wall-clock time
    (the axis's own)."""
    gaps = np.flatnonzero(np.diff(ts_ns) > GAP_NS)
    if not len(gaps):
        return []
    begin = local_strings(ts_ns[gaps] + bar_seconds * 1_000_000_000, tz)
    end = local_strings(ts_ns[gaps + 1], tz)
    out = []
    for b, e in zip(begin, end, strict=True):
        length = np.datetime64(e.replace(" ", "T"), "ms") - np.datetime64(b.replace(" ", "T"), "ms")
        length_ms = int(length / np.timedelta64(1, "ms"))
        if length_ms > 0:
            out.append({"values": [b], "dvalue": length_ms})
    return out


def build_figure(view: RunView, max_candles: int = MAX_CANDLES) -> tuple[go.Figure, list[str]]:
    """The figure and the notes the page prints under it (how it was drawn)."""
    tz = view.tz.key
    n = len(view.ts_ns)
    notes: list[str] = []
    x = local_strings(view.ts_ns, tz)
    starts, k = candle_starts(view.ts_ns, _trade_bars(view), max_candles)
    ends = np.append(starts[1:], n).astype(np.int64)
    last = ends - 1
    fig = go.Figure()
    if n and view.open is not None and view.high is not None and view.low is not None:
        merged = k > 1
        fig.add_trace(
            go.Candlestick(
                x=[x[i] for i in starts.tolist()],
                open=view.open[starts],
                high=np.maximum.reduceat(view.high, starts),
                low=np.minimum.reduceat(view.low, starts),
                close=view.close[last],
                name=f"{view.config.get('instrument', {}).get('symbol', '')} candles".strip(),
                increasing={"line": {"color": "#26a69a", "width": 1}, "fillcolor": "#26a69a"},
                decreasing={"line": {"color": "#ef5350", "width": 1}, "fillcolor": "#ef5350"},
                hovertext=[f"{int(b - a)} bar(s) from {x[a]}" for a, b in zip(starts, ends, strict=True)]
                if merged
                else None,
                yaxis="y",
            )
        )
        notes.append(f"Candles from {view.candles_from}.")
        if merged:
            notes.append(
                f"{n:,} bars drawn as {len(starts):,} candles: up to {k} consecutive bars merged into one "
                "(first open, highest high, lowest low, last close), never across a market closure; every "
                "bar with an entry or exit keeps a candle of its own; markers are exact bar times. Equity is "
                "drawn at each candle's last bar, drawdown at its deepest point inside the candle."
            )
    elif n:
        fig.add_trace(
            go.Scatter(x=x, y=view.close, mode="lines", name="close", line={"color": GREY, "width": 1})
        )
        notes.append(f"No candles ({view.candles_from}): the journaled closes are drawn instead.")
    fig.add_trace(_stop_trace(view))
    for trace in _trade_traces(view):
        fig.add_trace(trace)
    decided = view.llm_decided()
    agreed = [
        d
        for d in view.marked
        if d.method == "agreement" and d.fused_action != int(Action.HOLD) and d.fused_action == d.rl_action
    ]
    kept = [
        d
        for d in view.marked
        if d.llm_action is not None
        and d.method in ("rl_override", "weighted_rl")
        and d.llm_action != d.rl_action
    ]
    fig.add_trace(_decision_trace(view, decided, "LLM overrode RL", "star", ORANGE))
    fig.add_trace(_decision_trace(view, agreed, "LLM agreed (not HOLD)", "diamond", PURPLE))
    fig.add_trace(
        _decision_trace(view, kept, "RL kept over LLM", "circle-open", PURPLE, visible="legendonly")
    )
    by_rules: dict[str, list[MarkedDecision]] = {}
    for d in view.vetoed_entries():
        by_rules.setdefault(veto_rules(d), []).append(d)
    for rules, found in sorted(by_rules.items(), key=lambda kv: -len(kv[1])):
        firsts, counts = veto_runs(found, tz)
        routine = set(rules.split("+")) <= SCHEDULE_RULES
        trace = _decision_trace(
            view,
            firsts,
            f"veto: {rules} ({len(found)} entries)",
            "x-thin-open",
            GREY if routine else "#8c564b",
            counts=counts,
            visible="legendonly" if routine else True,
        )
        trace.marker.size = 7
        trace.legendgroup = "vetoes"
        fig.add_trace(trace)
    # equity and drawdown: the last bar of each candle / the deepest point inside it
    dd = drawdown_usd(view.equity_usd, view.start_balance_usd)
    xe = [x[i] for i in last.tolist()]
    fig.add_trace(
        go.Scatter(
            x=xe,
            y=view.equity_usd[last] if n else [],
            mode="lines",
            name="equity",
            line={"color": BLUE, "width": 1.5},
            yaxis="y2",
            hovertemplate="equity %{y:,.2f} USD<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=xe,
            y=-np.maximum.reduceat(dd, starts) if n else [],
            mode="lines",
            name="drawdown",
            fill="tozeroy",
            line={"color": RED, "width": 1},
            yaxis="y3",
            hovertemplate="drawdown %{y:,.2f} USD<extra></extra>",
        )
    )
    if n and dd.max() > 0:
        j = int(dd.argmax())
        fig.add_annotation(
            x=x[j],
            y=-float(dd[j]),
            xref="x",
            yref="y3",
            text=f"max drawdown {float(dd[j]):,.2f} USD",
            showarrow=True,
            arrowhead=2,
            ax=40,
            ay=-25,
            font={"size": 11},
        )
    fig.update_layout(
        template="plotly_white",
        height=980,
        hovermode="closest",
        hoverlabel={"align": "left", "font": {"size": 12}},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.01, "x": 0},
        margin={"l": 80, "r": 30, "t": 30, "b": 30},
        xaxis={
            "type": "date",
            "anchor": "y3",
            "range": [x[0], x[-1]] if n else None,
            "rangeslider": {"visible": True, "thickness": 0.05, "range": [x[0], x[-1]] if n else None},
            "rangebreaks": closures(view.ts_ns, tz, view.bar_seconds) if n else [],
            "showspikes": True,
            "spikemode": "across",
            "spikethickness": 1,
            "title": {"text": f"time ({tz})"},
        },
        yaxis={"domain": [0.44, 1.0], "title": {"text": "price"}, "tickformat": ",.2f"},
        yaxis2={"domain": [0.23, 0.41], "title": {"text": "equity (USD)"}, "tickformat": ",.0f"},
        yaxis3={"domain": [0.0, 0.2], "title": {"text": "drawdown (USD)"}, "tickformat": ",.0f"},
    )
    if view.notes:
        notes += view.notes
    if by_rules:
        notes.append(
            "A veto marker (×) is an entry (a fused BUY or SELL) a risk rule turned into HOLD, one trace per "
            f"set of rules; entries vetoed alike less than {VETO_RUN_BARS} bars apart are one marker whose "
            "hover says how many and until when. Vetoes by the schedule alone (trading hours, the flatten "
            "before the close) are hidden until clicked in the legend."
        )
    notes.append(
        "Market closures (pauses over 30 minutes) are cut from the time axis. Drag the range slider "
        "or zoom to look closer: the price, equity and drawdown axes rescale to what is shown."
    )
    return fig, notes
