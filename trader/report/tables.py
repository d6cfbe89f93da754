"""Terminal tables (rich): the run report, the per-session table, the effective configuration.

The labels are the report's vocabulary and stay stable (scripts grep them). On a terminal the
tables are coloured; on a pipe they are plain text with the same rows.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trader.report.stats import SessionRow

PIPE_WIDTH = 200  # on a pipe nothing needs to wrap at 80 columns: lines stay whole for grep


def terminal() -> Console:
    """The console the CLI prints its tables to: the terminal's width and colours on a terminal,
    plain text as wide as the rows on a pipe."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def fmt(v: Any) -> str:
    """A report value as text: None as '-', floats with thousands separators, dicts as k=v."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items()) or "-"
    return str(v)


def report_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) of every figure the report shows, in order (terminal and HTML alike)."""
    rows: list[tuple[str, Any]] = [
        ("status", r.get("status")),
        ("bars processed", r.get("bars")),
        ("bars rejected", r.get("bars_rejected")),
        ("  by reason", r.get("bars_rejected_by_reason")),
        ("trades", r.get("trades")),
        ("net P&L (USD)", r.get("net_pnl")),
        ("win rate", r.get("win_rate")),
        ("profit factor", r.get("profit_factor")),
        ("avg trade (USD)", r.get("avg_trade")),
        ("max drawdown (USD)", r.get("max_drawdown")),
        ("Sharpe (daily, ann.)", r.get("sharpe")),
        ("Sortino (daily, ann.)", r.get("sortino")),
        ("trading days", r.get("trading_days")),
        ("exposure", r.get("exposure")),
        ("actions", r.get("actions")),
        ("vetoes by rule", r.get("vetoes")),
        ("fusion methods", r.get("fusion_methods")),
        ("bars per second", r.get("bars_per_second")),
        ("decision latency (us)", r.get("decision_latency_us")),
    ]
    llm = r.get("llm") or {}
    if llm.get("queries") is not None:
        rows += [
            ("LLM mode", llm["mode"]),
            ("LLM queries", llm["queries"]),
            ("  answered", llm["answered"]),
            ("  errors / timeouts", f"{llm['errors']} / {llm['timeouts']}"),
            ("  unparseable", llm["unparseable"]),
            ("  skipped while busy", llm["skipped_busy"]),
            ("  latency (ms)", llm["latency_ms"]),
            ("  agreement with RL", llm["agreement_rate"]),
            ("  LLM overrides", llm["llm_overrides"]),
            (
                "  confidence stated / logits",
                f"{fmt(llm['stated_confidence_avg'])} / {fmt(llm['logit_confidence_avg'])}",
            ),
        ]
    elif llm:
        rows.append(("LLM mode", llm["mode"]))
    return rows


def _signed(v: Any) -> Text:
    text = fmt(v)
    if isinstance(v, int | float) and v:
        return Text(text, style="green" if v > 0 else "red")
    return Text(text)


def report_table(r: dict[str, Any], title: str | None = None) -> Table:
    """The run report as a two-column table (figure, value); P&L coloured by sign."""
    t = Table(title=title, box=box.SIMPLE_HEAVY, show_header=True, header_style="bold", title_justify="left")
    t.add_column("figure", no_wrap=True)
    t.add_column("value", overflow="fold")
    for label, value in report_rows(r):
        signed = label in ("net P&L (USD)", "avg trade (USD)")
        t.add_row(label, _signed(value) if signed else fmt(value))
    return t


def render(table: Table, width: int = 110) -> str:
    """A table as plain text (no colour), e.g. for a log or a test."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(table)
    return buf.getvalue().rstrip("\n")


def format_table(r: dict[str, Any]) -> str:
    """The report table as plain text (what ``trader replay`` prints on a pipe)."""
    return render(report_table(r))


def session_date(session_id: int) -> str:
    """A session id (days since 1970-01-01 of the local date it ends on) as that date."""
    return datetime.fromtimestamp(session_id * 86400, UTC).strftime("%Y-%m-%d %a")


def local_time(ts_ns: int, tz: ZoneInfo, fmt_: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).astimezone(tz).strftime(fmt_)


def sessions_table(rows: Sequence[SessionRow], tz: ZoneInfo) -> Table:
    """One row per trading session: hours, bars, trades, wins, net P&L, drawdown, LLM, vetoes."""
    t = Table(title="sessions", box=box.SIMPLE_HEAVY, header_style="bold", title_justify="left")
    for name, justify in (
        ("session", "left"),
        ("first bar", "left"),
        ("last bar", "left"),
        ("bars", "right"),
        ("trades", "right"),
        ("wins", "right"),
        ("net P&L (USD)", "right"),
        ("max drawdown (USD)", "right"),
        ("LLM decided", "right"),
        ("entries vetoed", "right"),
    ):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for s in rows:
        t.add_row(
            session_date(s.session_id),
            local_time(s.first_ts_ns, tz),
            local_time(s.last_ts_ns, tz),
            str(s.bars),
            str(s.trades),
            str(s.wins),
            _signed(s.net_pnl_usd),
            fmt(s.max_drawdown_usd),
            str(s.llm_decided),
            str(s.entries_vetoed),
        )
    return t


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{key}."))
        else:
            out[key] = v
    return out


def _cell(v: Any, limit: int = 70) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    text = str(v) if not isinstance(v, list) else "[" + ", ".join(map(str, v)) + "]"
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} chars)"


def config_table(settings: Any) -> Table:
    """The effective configuration, one row per key (secrets masked); the keys whose value is not
    the built-in default are highlighted, with that default beside them."""
    values = _leaves(settings.model_dump(mode="json"))
    defaults: dict[str, Any] = {}
    for name, field in type(settings).model_fields.items():
        d = field.default
        defaults.update(_leaves({name: d.model_dump(mode="json") if hasattr(d, "model_dump") else d}))
    changed = sum(1 for k, v in values.items() if k in defaults and defaults[k] != v)
    t = Table(
        title=f"effective configuration: {len(values)} keys, {changed} not at their default (highlighted, "
        "the default beside them)",
        box=box.SIMPLE_HEAVY,
        header_style="bold",
        title_justify="left",
    )
    t.add_column("key", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_column("default", overflow="fold", style="dim")
    keys = list(values)
    for i, key in enumerate(keys):
        v = values[key]
        differs = key in defaults and defaults[key] != v
        section_ends = i + 1 == len(keys) or keys[i + 1].split(".")[0] != key.split(".")[0]
        t.add_row(
            Text(key, style="bold yellow" if differs else ""),
            Text(_cell(v), style="bold yellow" if differs else ""),
            _cell(defaults[key]) if differs else "",
            end_section=section_ends,
        )
    return t
