"""Every journal table: its schema, and the one typed builder of its rows, side by side.

A row is a :class:`Row` (table name + values in column order). Nothing outside this module builds
one, so a column added here is added everywhere. Values are plain SQLite types; prices and money
are floats on the tick grid, times UTC epoch nanoseconds (``ts_ns``) or ISO text (``at``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

from trader.domain import Advice, Bar, Decision, Fill, OrderIntent, PortfolioSnapshot, Trade, Verdict


class Row(NamedTuple):
    table: str
    values: tuple[Any, ...]


_new_row = partial(tuple.__new__, Row)  # Row(table, values) without the Python-level __new__


def _num(x: float) -> float | None:
    """A finite float, or NULL (a rejected bar's NaN/inf values)."""
    return x if math.isfinite(x) else None


# -- runs ------------------------------------------------------------------------------------------
RUNS = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, mode TEXT NOT NULL,
    status TEXT NOT NULL, config_json TEXT NOT NULL, policy_path TEXT, layout_hash TEXT,
    data_files TEXT, bars INTEGER, bars_rejected INTEGER, report_json TEXT
);"""
INSERT_RUN = (
    "INSERT INTO runs (run_id, started_at, mode, status, config_json, policy_path, layout_hash, "
    "data_files) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)"
)
FINISH_RUN = "UPDATE runs SET finished_at=?, status=?, bars=?, bars_rejected=?, report_json=? WHERE run_id=?"
RESUME_RUN = "UPDATE runs SET status='running', finished_at=NULL WHERE run_id=?"
ABANDON_RUN = "UPDATE runs SET status='abandoned' WHERE run_id=?"
UPDATE_CONFIG = "UPDATE runs SET config_json=? WHERE run_id=?"


def run_params(
    run_id: str,
    started_at: str,
    mode: str,
    config_json: str,
    policy_path: str,
    layout_hash: str,
    data_files: Sequence[str],
) -> tuple[Any, ...]:
    return (run_id, started_at, mode, config_json, policy_path, layout_hash, json.dumps(list(data_files)))


def finish_params(
    run_id: str, finished_at: str, status: str, bars: int, bars_rejected: int, report: dict[str, Any]
) -> tuple[Any, ...]:
    return (finished_at, status, bars, bars_rejected, json.dumps(report, default=str), run_id)


# -- bars_rejected ---------------------------------------------------------------------------------
BARS_REJECTED = """
CREATE TABLE IF NOT EXISTS bars_rejected (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, ts_ns INTEGER, origin TEXT, reason TEXT NOT NULL,
    open REAL, high REAL, low REAL, close REAL, volume REAL
);"""


def bar_rejected(run_id: str, seq: int, bar: Bar | None, origin: str, reason: str) -> Row:
    if bar is None:
        return Row("bars_rejected", (run_id, seq, None, origin, reason, None, None, None, None, None))
    b = bar
    return Row(
        "bars_rejected",
        (
            run_id,
            seq,
            b.ts_ns,
            origin,
            reason,
            _num(b.open),
            _num(b.high),
            _num(b.low),
            _num(b.close),
            _num(b.volume),
        ),
    )


# -- decisions -------------------------------------------------------------------------------------
DECISIONS = """
CREATE TABLE IF NOT EXISTS decisions (
    run_id TEXT NOT NULL, bar_index INTEGER NOT NULL, ts_ns INTEGER NOT NULL, close REAL NOT NULL,
    p_hold REAL, p_buy REAL, p_sell REAL, p_move_to_be REAL, p_enable_trail REAL, p_disable_trail REAL,
    rl_action INTEGER, rl_conf REAL, llm_action INTEGER, llm_conf REAL, llm_age_bars INTEGER,
    method TEXT NOT NULL, reasons TEXT, fused_action INTEGER NOT NULL, final_action INTEGER NOT NULL,
    vetoes TEXT, flatten_reason TEXT, position INTEGER NOT NULL, balance_usd REAL NOT NULL,
    equity_usd REAL NOT NULL, threshold_usd REAL NOT NULL, latency_us REAL,
    PRIMARY KEY (run_id, bar_index)
);"""

# Columns that must be identical between two replays of the same inputs (determinism check).
DECISION_COLUMNS = (
    "bar_index, ts_ns, close, p_hold, p_buy, p_sell, p_move_to_be, p_enable_trail, p_disable_trail, "
    "rl_action, rl_conf, llm_action, llm_conf, llm_age_bars, method, reasons, fused_action, final_action, "
    "vetoes, flatten_reason, position, balance_usd, equity_usd, threshold_usd"
)


def decision(
    run_id: str,
    index: int,
    bar: Bar,
    probs: Sequence[float],
    d: Decision,
    advice: Advice | None,
    verdict: Verdict,
    vetoes_text: str | None,
    position: int,
    balance_usd: float,
    equity_usd: float,
    threshold_usd: float,
    latency_us: float,
) -> Row:
    la = d.llm_action
    return _new_row(  # Row("decisions", (...)), built in C: one of these per bar
        (
            "decisions",
            (
                run_id,
                index,
                bar.ts_ns,
                bar.close,
                probs[0],
                probs[1],
                probs[2],
                probs[3],
                probs[4],
                probs[5],
                int(d.rl_action),
                d.rl_confidence,
                None if la is None else int(la),
                d.llm_confidence,
                None if advice is None else advice.age_bars,
                d.method,
                ";".join(d.reasons),
                int(d.action),
                int(verdict.action),
                vetoes_text,
                verdict.flatten_reason or None,
                position,
                balance_usd,
                equity_usd,
                threshold_usd,
                latency_us,
            ),
        )
    )


# -- orders ----------------------------------------------------------------------------------------
ORDERS = """
CREATE TABLE IF NOT EXISTS orders (
    run_id TEXT NOT NULL, client_id TEXT NOT NULL, bar_index INTEGER, ts_ns INTEGER, side INTEGER,
    qty INTEGER, kind TEXT, purpose TEXT, stop_ticks INTEGER, PRIMARY KEY (run_id, client_id)
);"""


def order(run_id: str, o: OrderIntent, bar_index: int, ts_ns: int) -> Row:
    return Row(
        "orders",
        (run_id, o.client_id, bar_index, ts_ns, int(o.side), o.qty, o.kind.value, o.purpose, o.stop_ticks),
    )


# -- fills -----------------------------------------------------------------------------------------
FILLS = """
CREATE TABLE IF NOT EXISTS fills (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, client_id TEXT, ts_ns INTEGER, side INTEGER, qty INTEGER,
    price REAL, commission_usd REAL, purpose TEXT, PRIMARY KEY (run_id, seq)
);"""


def fill(run_id: str, seq: int, f: Fill) -> Row:
    return Row(
        "fills",
        (run_id, seq, f.client_id, f.ts_ns, int(f.side), f.qty, f.price, f.commission_usd, f.purpose),
    )


# -- trades ----------------------------------------------------------------------------------------
TRADES = """
CREATE TABLE IF NOT EXISTS trades (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, entry_ts_ns INTEGER, exit_ts_ns INTEGER, side INTEGER,
    qty INTEGER, entry_price REAL, exit_price REAL, pnl_usd REAL, exit_reason TEXT,
    PRIMARY KEY (run_id, seq)
);"""


def trade(run_id: str, seq: int, t: Trade) -> Row:
    return Row(
        "trades",
        (
            run_id,
            seq,
            t.entry_ts_ns,
            t.exit_ts_ns,
            int(t.side),
            t.qty,
            t.entry_price,
            t.exit_price,
            t.pnl_usd,
            t.exit_reason,
        ),
    )


# -- account ---------------------------------------------------------------------------------------
ACCOUNT = """
CREATE TABLE IF NOT EXISTS account (
    run_id TEXT NOT NULL, ts_ns INTEGER, position INTEGER, avg_entry REAL, stop_price REAL,
    balance_usd REAL, equity_usd REAL, peak_equity_usd REAL, threshold_usd REAL, daily_pnl_usd REAL,
    consecutive_losses INTEGER, reason TEXT
);"""


def account(run_id: str, ts_ns: int, s: PortfolioSnapshot, reason: str) -> Row:
    return Row(
        "account",
        (
            run_id,
            ts_ns,
            s.position,
            s.avg_entry,
            s.stop_price,
            s.balance_usd,
            s.equity_usd,
            s.peak_equity_usd,
            s.drawdown_threshold_usd,
            s.daily_pnl_usd,
            s.consecutive_losses,
            reason,
        ),
    )


# -- llm_queries -----------------------------------------------------------------------------------
LLM_QUERIES = """
CREATE TABLE IF NOT EXISTS llm_queries (
    run_id TEXT NOT NULL, query_id INTEGER NOT NULL, bar_index INTEGER, ts_ns INTEGER, trigger TEXT,
    backend TEXT, prompt_hash TEXT, system_prompt TEXT, user_prompt TEXT, raw_answer TEXT,
    parsed_action TEXT, stated_conf REAL, logit_conf REAL, action_probs TEXT, used_conf REAL,
    latency_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER, error TEXT, available_bar INTEGER,
    PRIMARY KEY (run_id, query_id)
);"""


def llm_query(
    run_id: str,
    query_id: int,
    bar_index: int,
    ts_ns: int,
    trigger: str,
    backend: str,
    prompt_hash: str,
    system_prompt: str,
    user_prompt: str,
    raw_answer: str | None,
    parsed_action: str | None,
    stated_conf: float | None,
    logit_conf: float | None,
    action_probs: Sequence[float] | None,
    used_conf: float | None,
    latency_ms: float | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    error: str | None,
    available_bar: int | None,
) -> Row:
    return Row(
        "llm_queries",
        (
            run_id,
            query_id,
            bar_index,
            ts_ns,
            trigger,
            backend,
            prompt_hash,
            system_prompt,
            user_prompt,
            raw_answer,
            parsed_action,
            stated_conf,
            logit_conf,
            json.dumps([round(p, 6) for p in action_probs]) if action_probs else None,
            used_conf,
            latency_ms,
            prompt_tokens,
            completion_tokens,
            error,
            available_bar,
        ),
    )


# -- bars ------------------------------------------------------------------------------------------
BARS = """
CREATE TABLE IF NOT EXISTS bars (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, bar_index INTEGER, ts_ns INTEGER NOT NULL,
    open REAL, high REAL, low REAL, close REAL, volume REAL, fills_through INTEGER,
    PRIMARY KEY (run_id, seq)
);"""


def bar(run_id: str, seq: int, kind: str, index: int | None, b: Bar, fills_through: int) -> Row:
    return Row(
        "bars", (run_id, seq, kind, index, b.ts_ns, b.open, b.high, b.low, b.close, b.volume, fills_through)
    )


# -- control ---------------------------------------------------------------------------------------
CONTROL = """
CREATE TABLE IF NOT EXISTS control (
    run_id TEXT NOT NULL, at TEXT NOT NULL, action TEXT NOT NULL, source TEXT, reason TEXT, result TEXT,
    bar_index INTEGER
);"""
# journals written before bar_index existed get the column on open
MIGRATIONS = (("control", "bar_index", "ALTER TABLE control ADD COLUMN bar_index INTEGER"),)


def control(run_id: str, at: str, action: str, source: str, reason: str, result: str, bar_index: int) -> Row:
    """A control request (halt, resume, flatten, kill, rearm, reload, stop, recover) and its result;
    ``bar_index`` is the first bar it applies to."""
    return Row("control", (run_id, at, action, source, reason, result, bar_index))


SCHEMA = "\n".join(
    (RUNS, BARS_REJECTED, DECISIONS, ORDERS, FILLS, TRADES, ACCOUNT, LLM_QUERIES, BARS, CONTROL)
)

# The tables each ``journal.level`` keeps (the runs row, with its report, always): full = all;
# trades = all but the per-bar ones (decisions; bars is a live run's recovery source, and live
# runs journal in full); summary = none.
TABLES = frozenset(
    ("bars_rejected", "decisions", "orders", "fills", "trades", "account", "llm_queries", "bars", "control")
)
LEVEL_TABLES = {
    "full": TABLES,
    "trades": TABLES - {"decisions", "bars"},
    "summary": frozenset[str](),
}

COLUMNS = {
    "bars_rejected": 10,
    "decisions": 26,
    "orders": 9,
    "fills": 9,
    "trades": 10,
    "account": 12,
    "llm_queries": 20,
    "control": 7,
    "bars": 11,
}
