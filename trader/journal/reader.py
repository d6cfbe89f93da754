"""Every read of the journal: the one place that SELECTs.

Readers open the file on their own connection (read-only where nothing is written), so they never
touch the writer thread's connection. Each function returns plain values or domain types.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trader.domain import Bar, Fill, Side, Trade
from trader.errors import JournalError


@contextmanager
def _open(path: str | Path, readonly: bool = True) -> Iterator[sqlite3.Connection]:
    p = Path(path)
    if not p.exists():
        raise JournalError(f"journal not found: {p}")
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True) if readonly else sqlite3.connect(p)
    except sqlite3.Error as exc:
        raise JournalError(f"journal {p}: {exc}") from exc
    try:
        yield con
    except sqlite3.OperationalError as exc:
        raise JournalError(f"journal {p} is not a trader journal (or is damaged): {exc}") from exc
    finally:
        con.close()


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    mode: str
    status: str
    config_json: str


def latest_run(path: str | Path, mode: str) -> RunRecord | None:
    """The latest run of this mode that may be continued (any status but ``abandoned``)."""
    if not Path(path).exists():
        return None
    with _open(path) as con:
        try:
            row = con.execute(
                "SELECT run_id, mode, status, config_json FROM runs WHERE mode=? AND status!='abandoned' "
                "ORDER BY started_at DESC, rowid DESC LIMIT 1",
                (mode,),
            ).fetchone()
        except sqlite3.OperationalError:
            return None  # an empty file: no tables yet
    return None if row is None else RunRecord(str(row[0]), str(row[1]), str(row[2]), str(row[3]))


@dataclass(frozen=True, slots=True)
class JournaledBar:
    kind: str  # "prime" (warm-up history) or "bar" (decided on)
    index: int | None
    bar: Bar
    fills_through: int  # fills applied by the end of this bar


@dataclass(frozen=True, slots=True)
class AccountCheck:
    """The account as the journal last saw it, to check a re-drive against."""

    bar_index: int
    position: int
    balance_usd: float
    equity_usd: float
    threshold_usd: float


@dataclass(frozen=True, slots=True)
class RunHistory:
    """What a re-drive needs from the journal (see :mod:`trader.recovery`)."""

    # bar index -> (final action, flatten reason, vetoes text): what the run did at that bar
    verdicts: dict[int, tuple[int, str | None, str | None]]
    bars: list[JournaledBar]  # live/paper-service runs; empty for a run without journaled bars
    fills: list[tuple[Fill, float | None]]  # every fill with the stop working after it
    last_decision: AccountCheck | None
    # the final account row of a run that ended (graceful stop or failure): position, balance, threshold
    end_account: tuple[int, float, float] | None
    max_query_id: int
    between_bar_orders: dict[int, list[str]]  # bar index -> purposes of orders sent after that bar
    controls: list[tuple[int, str, str]]  # accepted controls in order: (first bar, action, reason)


def run_history(path: str | Path, run_id: str) -> RunHistory:
    with _open(path) as con:
        verdicts = {
            int(i): (int(a), fr, v)
            for i, a, fr, v in con.execute(
                "SELECT bar_index, final_action, flatten_reason, vetoes FROM decisions WHERE run_id=?",
                (run_id,),
            )
        }
        bars = [
            JournaledBar(str(k), None if i is None else int(i), Bar(int(ts), o, h, lo, c, v), int(ft or 0))
            for k, i, ts, o, h, lo, c, v, ft in con.execute(
                "SELECT kind, bar_index, ts_ns, open, high, low, close, volume, fills_through FROM bars "
                "WHERE run_id=? ORDER BY seq",
                (run_id,),
            )
        ]
        stops = [
            None if r[0] is None else float(r[0])
            for r in con.execute(
                "SELECT stop_price FROM account WHERE run_id=? AND reason LIKE 'fill:%' ORDER BY rowid",
                (run_id,),
            )
        ]
        fills = [
            Fill(cid, int(ts), Side(side), int(qty), float(price), float(comm), purpose)
            for cid, ts, side, qty, price, comm, purpose in con.execute(
                "SELECT client_id, ts_ns, side, qty, price, commission_usd, purpose FROM fills "
                "WHERE run_id=? ORDER BY seq",
                (run_id,),
            )
        ]
        if len(stops) != len(fills):
            raise JournalError(f"run {run_id}: {len(fills)} fills but {len(stops)} account rows after fills")
        last = con.execute(
            "SELECT bar_index, position, balance_usd, equity_usd, threshold_usd FROM decisions "
            "WHERE run_id=? ORDER BY bar_index DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        acct = con.execute(
            "SELECT position, balance_usd, threshold_usd, reason FROM account WHERE run_id=? "
            "ORDER BY rowid DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        max_qid = con.execute("SELECT max(query_id) FROM llm_queries WHERE run_id=?", (run_id,)).fetchone()[0]
        between: dict[int, list[str]] = {}
        for i, purpose in con.execute(
            "SELECT bar_index, purpose FROM orders WHERE run_id=? AND purpose LIKE 'flatten:on_stop%' "
            "ORDER BY rowid",
            (run_id,),
        ):
            between.setdefault(int(i), []).append(str(purpose))
        controls = [
            (-1 if i is None else int(i), str(a), str(r or ""))
            for i, a, r in con.execute(
                "SELECT bar_index, action, reason FROM control WHERE run_id=? AND result='accepted' "
                "ORDER BY rowid",
                (run_id,),
            )
        ]
    return RunHistory(
        verdicts,
        bars,
        list(zip(fills, stops, strict=True)),
        None if last is None else AccountCheck(int(last[0]), int(last[1]), last[2], last[3], last[4]),
        None if acct is None or acct[3] != "run_end" else (int(acct[0]), float(acct[1]), float(acct[2])),
        int(max_qid or 0),
        between,
        controls,
    )


def client_ids(path: str | Path, run_id: str) -> set[str]:
    """Client ids of every order the run has sent (a live broker recognises its own orders)."""
    if not Path(path).exists():
        return set()
    with _open(path) as con:
        try:
            return {str(r[0]) for r in con.execute("SELECT client_id FROM orders WHERE run_id=?", (run_id,))}
        except sqlite3.OperationalError:
            return set()


def last_fill_ns(path: str | Path, run_id: str) -> int:
    """Time of the run's last journaled fill (-1: none): broker fills up to it are already applied."""
    if not Path(path).exists():
        return -1
    with _open(path) as con:
        try:
            row = con.execute("SELECT max(ts_ns) FROM fills WHERE run_id=?", (run_id,)).fetchone()
        except sqlite3.OperationalError:
            return -1
    return -1 if row is None or row[0] is None else int(row[0])


@dataclass(frozen=True, slots=True)
class RecordedAnswer:
    raw: str
    action_probs: tuple[float, ...] | None
    latency_s: float
    prompt_tokens: int
    completion_tokens: int


def recorded_answers(path: str | Path, run_id: str | None) -> tuple[str, str, dict[str, RecordedAnswer]]:
    """LLM answers of an earlier run by prompt hash: (run id, that run's advisor mode, answers).
    ``run_id`` None = the run with the latest query."""
    with _open(path) as con:
        if run_id is None:
            row = con.execute(
                "SELECT run_id FROM llm_queries GROUP BY run_id ORDER BY max(rowid) DESC LIMIT 1"
            ).fetchone()
            if row is None:
                raise JournalError(f"{path} has no recorded LLM queries")
            run_id = str(row[0])
        cfg = con.execute("SELECT config_json FROM runs WHERE run_id=?", (run_id,)).fetchone()
        mode = json.loads(cfg[0])["advisor"]["mode"] if cfg else "sync"
        answers = {
            str(phash): RecordedAnswer(
                raw, tuple(json.loads(probs)) if probs else None, latency_ms / 1000.0, pt, ct
            )
            for phash, raw, probs, latency_ms, pt, ct in con.execute(
                "SELECT prompt_hash, raw_answer, action_probs, latency_ms, prompt_tokens, completion_tokens "
                "FROM llm_queries WHERE run_id=? AND raw_answer IS NOT NULL",
                (run_id,),
            )
        }
    return run_id, mode, answers


def llm_runs(path: str | Path) -> list[str]:
    with _open(path) as con:
        return [str(r[0]) for r in con.execute("SELECT DISTINCT run_id FROM llm_queries ORDER BY run_id")]


def decision_closes(path: str | Path, run_id: str) -> dict[int, float]:
    with _open(path) as con:
        return {
            int(i): float(c)
            for i, c in con.execute("SELECT bar_index, close FROM decisions WHERE run_id=?", (run_id,))
        }


def answered_queries(path: str | Path, run_id: str) -> list[tuple[Any, ...]]:
    """(query_id, bar_index, ts_ns, trigger, system, user, raw, action, stated, logit, probs,
    latency_ms, error) of every query with an answer, in order."""
    with _open(path) as con:
        return list(
            con.execute(
                "SELECT query_id, bar_index, ts_ns, trigger, system_prompt, user_prompt, raw_answer, "
                "parsed_action, stated_conf, logit_conf, action_probs, latency_ms, error "
                "FROM llm_queries WHERE run_id=? AND raw_answer IS NOT NULL ORDER BY query_id",
                (run_id,),
            )
        )


# -- the run report (trader/report): one run read back, table by table -----------------------------
@contextmanager
def _read(path: str | Path) -> Iterator[sqlite3.Connection]:
    """:func:`_open` read-only, and a file that is not SQLite at all named as such too."""
    try:
        with _open(path) as con:
            yield con
    except sqlite3.DatabaseError as exc:  # "file is not a database": garbage or a truncated file
        raise JournalError(f"journal {path} is not a trader journal (or is damaged): {exc}") from exc


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run's row: what ran, on what, how it ended (``report`` None until it finished)."""

    run_id: str
    started_at: str
    finished_at: str | None
    mode: str
    status: str
    config_json: str
    policy_path: str | None
    data_files: tuple[str, ...]
    bars: int | None
    report: dict[str, Any] | None


def runs(path: str | Path) -> list[RunInfo]:
    """Every run in the journal, oldest first."""
    with _read(path) as con:
        rows_ = con.execute(
            "SELECT run_id, started_at, finished_at, mode, status, config_json, policy_path, data_files, "
            "bars, report_json FROM runs ORDER BY started_at, rowid"
        ).fetchall()
    return [
        RunInfo(
            str(rid),
            str(started),
            finished,
            str(mode),
            str(status),
            str(cfg),
            policy,
            tuple(json.loads(files)) if files else (),
            None if bars is None else int(bars),
            json.loads(report) if report else None,
        )
        for rid, started, finished, mode, status, cfg, policy, files, bars, report in rows_
    ]


@dataclass(frozen=True, slots=True)
class DecisionSeries:
    """Per decided bar of a run, in bar order (parallel lists): the account after the decision;
    the last bar's equity is the account's at the end of the run (its ``run_end`` row: a close at
    the end of a replay, fills after the last bar), as the engine's own statistics have it."""

    bar_index: list[int]
    ts_ns: list[int]
    close: list[float]
    position: list[int]
    equity_usd: list[float]
    method: list[str]


def decision_series(path: str | Path, run_id: str) -> DecisionSeries:
    with _read(path) as con:
        cols = list(
            zip(
                *con.execute(
                    "SELECT bar_index, ts_ns, close, position, equity_usd, method FROM decisions "
                    "WHERE run_id=? ORDER BY bar_index",
                    (run_id,),
                ),
                strict=True,
            )
        )
        end = con.execute(
            "SELECT ts_ns, equity_usd FROM account WHERE run_id=? AND reason='run_end' "
            "ORDER BY rowid DESC LIMIT 1",
            (run_id,),
        ).fetchone()
    if not cols:
        return DecisionSeries([], [], [], [], [], [])
    series = DecisionSeries(*(list(c) for c in cols))
    if end is not None and end[0] == series.ts_ns[-1] and end[1] is not None:
        # the run ended after its last bar (a restart's later bars come after an earlier run_end)
        series.equity_usd[-1] = end[1]
    return series


@dataclass(frozen=True, slots=True)
class MarkedDecision:
    """A decided bar the report marks: one with LLM advice, or a vetoed BUY/SELL."""

    bar_index: int
    ts_ns: int
    close: float
    probs: tuple[float, ...]  # the RL policy's six action probabilities
    rl_action: int
    rl_conf: float
    llm_action: int | None
    llm_conf: float | None
    llm_age_bars: int | None
    method: str
    reasons: str
    fused_action: int
    final_action: int
    vetoes: str | None
    position: int


def marked_decisions(path: str | Path, run_id: str) -> list[MarkedDecision]:
    """Decisions that had LLM advice, and those whose BUY or SELL was vetoed, in bar order."""
    with _read(path) as con:
        found = con.execute(
            "SELECT bar_index, ts_ns, close, p_hold, p_buy, p_sell, p_move_to_be, p_enable_trail, "
            "p_disable_trail, rl_action, rl_conf, llm_action, llm_conf, llm_age_bars, method, reasons, "
            "fused_action, final_action, vetoes, position FROM decisions WHERE run_id=? AND "
            "(llm_action IS NOT NULL OR (vetoes IS NOT NULL AND fused_action IN (1, 2))) ORDER BY bar_index",
            (run_id,),
        ).fetchall()
    return [
        MarkedDecision(
            int(r[0]),
            int(r[1]),
            float(r[2]),
            tuple(float(p or 0.0) for p in r[3:9]),
            int(r[9] or 0),
            float(r[10] or 0.0),
            r[11],
            r[12],
            r[13],
            str(r[14]),
            str(r[15] or ""),
            int(r[16]),
            int(r[17]),
            r[18],
            int(r[19]),
        )
        for r in found
    ]


def run_trades(path: str | Path, run_id: str) -> list[tuple[int, Trade]]:
    """(seq, trade) of every closed trade, in the order they closed."""
    with _read(path) as con:
        found = con.execute(
            "SELECT seq, entry_ts_ns, exit_ts_ns, side, qty, entry_price, exit_price, pnl_usd, exit_reason "
            "FROM trades WHERE run_id=? ORDER BY seq",
            (run_id,),
        ).fetchall()
    return [
        (
            int(seq),
            Trade(int(ets), int(xts), Side(side), int(qty), float(ep), float(xp), float(pnl), str(why)),
        )
        for seq, ets, xts, side, qty, ep, xp, pnl, why in found
    ]


def stop_levels(path: str | Path, run_id: str) -> list[tuple[int, float | None]]:
    """(ts_ns, protective stop working after it) from the account rows (fills, stop moves, the
    run's end), in journal order; None = no stop (flat)."""
    with _read(path) as con:
        return [
            (int(ts or 0), None if stop is None else float(stop))
            for ts, stop in con.execute(
                "SELECT ts_ns, stop_price FROM account WHERE run_id=? ORDER BY rowid", (run_id,)
            )
        ]


def journaled_bars(path: str | Path, run_id: str) -> dict[int, Bar]:
    """Decided bars journaled with their OHLC (service runs), by bar index; empty for a replay."""
    with _read(path) as con:
        return {
            int(i): Bar(int(ts), o, h, lo, c, v)
            for i, ts, o, h, lo, c, v in con.execute(
                "SELECT bar_index, ts_ns, open, high, low, close, volume FROM bars "
                "WHERE run_id=? AND kind='bar' ORDER BY seq",
                (run_id,),
            )
        }


@dataclass(frozen=True, slots=True)
class AdviceAnswer:
    """An LLM answer that became advice: the query, what it said, when it became usable."""

    query_id: int
    asked_bar: int
    trigger: str
    raw_answer: str
    parsed_action: str
    used_conf: float | None
    latency_ms: float | None


def advice_answers(path: str | Path, run_id: str) -> dict[int, AdviceAnswer]:
    """Parsed LLM answers by the bar at which they became usable (``available_bar``); a decision
    at bar i with advice of age a used the answer available at bar i - a."""
    with _read(path) as con:
        return {
            int(avail): AdviceAnswer(int(qid), int(asked), str(trig), str(raw), str(act), conf, lat)
            for qid, asked, trig, raw, act, conf, lat, avail in con.execute(
                "SELECT query_id, bar_index, trigger, raw_answer, parsed_action, used_conf, latency_ms, "
                "available_bar FROM llm_queries WHERE run_id=? AND parsed_action IS NOT NULL "
                "AND available_bar IS NOT NULL ORDER BY query_id",
                (run_id,),
            )
        }
