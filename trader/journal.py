"""The journal: an append-only SQLite (WAL) record of every run, bar decision, order and fill.

Writes never happen on the bar path: rows go into a queue and a dedicated writer thread
inserts them in batches (``batch_size`` rows or every ``flush_interval_ms``, and at once for
orders and fills). ``close()`` (also on Ctrl-C) drains the queue and commits, so nothing queued
is lost on a clean stop. Schema (all tables carry ``run_id``):

runs            one row per run: mode, config (JSON), policy, layout hash, data files, status, counts
bars_rejected   a rejected bar: where it came from, why, its raw values
decisions       one row per accepted bar: RL probabilities (p_*), RL and LLM choice and confidence,
                advice age, fusion method and reasons, vetoes, final action, account state, latency
orders          every order intent sent to the broker, with its deterministic client id
fills           every fill: price, quantity, commission, purpose
trades          closed round trips with net P&L
account         account snapshots (after each fill and at the end of the run)
llm_queries     every LLM query: trigger, backend, prompts and their hash, raw answer, parsed action,
                stated and logit confidence, the six-action distribution, latency, tokens, error,
                and the bar from which the answer was usable
bars            live/paper runs: every bar taken from the live feed (``prime`` = warm-up history,
                ``bar`` = decided on) and how many fills had been applied after it, so a restart
                can re-drive the run exactly
control         every control request (halt, resume, flatten, reload, stop): when, from where,
                why, and whether it was accepted
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, mode TEXT NOT NULL,
    status TEXT NOT NULL, config_json TEXT NOT NULL, policy_path TEXT, layout_hash TEXT,
    data_files TEXT, bars INTEGER, bars_rejected INTEGER, report_json TEXT
);
CREATE TABLE IF NOT EXISTS bars_rejected (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, ts_ns INTEGER, origin TEXT, reason TEXT NOT NULL,
    open REAL, high REAL, low REAL, close REAL, volume REAL
);
CREATE TABLE IF NOT EXISTS decisions (
    run_id TEXT NOT NULL, bar_index INTEGER NOT NULL, ts_ns INTEGER NOT NULL, close REAL NOT NULL,
    p_hold REAL, p_buy REAL, p_sell REAL, p_move_to_be REAL, p_enable_trail REAL, p_disable_trail REAL,
    rl_action INTEGER, rl_conf REAL, llm_action INTEGER, llm_conf REAL, llm_age_bars INTEGER,
    method TEXT NOT NULL, reasons TEXT, fused_action INTEGER NOT NULL, final_action INTEGER NOT NULL,
    vetoes TEXT, flatten_reason TEXT, position INTEGER NOT NULL, balance_usd REAL NOT NULL,
    equity_usd REAL NOT NULL, threshold_usd REAL NOT NULL, latency_us REAL,
    PRIMARY KEY (run_id, bar_index)
);
CREATE TABLE IF NOT EXISTS orders (
    run_id TEXT NOT NULL, client_id TEXT NOT NULL, bar_index INTEGER, ts_ns INTEGER, side INTEGER,
    qty INTEGER, kind TEXT, purpose TEXT, stop_ticks INTEGER, PRIMARY KEY (run_id, client_id)
);
CREATE TABLE IF NOT EXISTS fills (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, client_id TEXT, ts_ns INTEGER, side INTEGER, qty INTEGER,
    price REAL, commission_usd REAL, purpose TEXT, PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS trades (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, entry_ts_ns INTEGER, exit_ts_ns INTEGER, side INTEGER,
    qty INTEGER, entry_price REAL, exit_price REAL, pnl_usd REAL, exit_reason TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS llm_queries (
    run_id TEXT NOT NULL, query_id INTEGER NOT NULL, bar_index INTEGER, ts_ns INTEGER, trigger TEXT,
    backend TEXT, prompt_hash TEXT, system_prompt TEXT, user_prompt TEXT, raw_answer TEXT,
    parsed_action TEXT, stated_conf REAL, logit_conf REAL, action_probs TEXT, used_conf REAL,
    latency_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER, error TEXT, available_bar INTEGER,
    PRIMARY KEY (run_id, query_id)
);
CREATE TABLE IF NOT EXISTS account (
    run_id TEXT NOT NULL, ts_ns INTEGER, position INTEGER, avg_entry REAL, stop_price REAL,
    balance_usd REAL, equity_usd REAL, peak_equity_usd REAL, threshold_usd REAL, daily_pnl_usd REAL,
    consecutive_losses INTEGER, reason TEXT
);
CREATE TABLE IF NOT EXISTS bars (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, bar_index INTEGER, ts_ns INTEGER NOT NULL,
    open REAL, high REAL, low REAL, close REAL, volume REAL, fills_through INTEGER,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS control (
    run_id TEXT NOT NULL, at TEXT NOT NULL, action TEXT NOT NULL, source TEXT, reason TEXT, result TEXT
);
"""

_INSERTS = {
    "bars_rejected": 10,
    "decisions": 26,
    "orders": 9,
    "fills": 9,
    "trades": 10,
    "account": 12,
    "llm_queries": 20,
    "control": 6,
    "bars": 11,
}
_MAX_VARIABLES = 8000  # bound parameters per statement (SQLite allows 32766 since 3.32)
_URGENT = frozenset({"orders", "fills", "trades", "account", "llm_queries", "control"})

# Columns that must be identical between two replays of the same inputs (determinism check).
DECISION_COLUMNS = (
    "bar_index, ts_ns, close, p_hold, p_buy, p_sell, p_move_to_be, p_enable_trail, p_disable_trail, "
    "rl_action, rl_conf, llm_action, llm_conf, llm_age_bars, method, reasons, fused_action, final_action, "
    "vetoes, flatten_reason, position, balance_usd, equity_usd, threshold_usd"
)


class JournalError(RuntimeError):
    pass


class Journal:
    """Batched, threaded SQLite writer. ``record(table, row)`` is cheap and never blocks on disk.

    Rows go into a deque (appending wakes nobody); the writer thread wakes every
    ``flush_interval_ms``, when ``batch_size`` rows are waiting, or at once for orders and fills.
    Waking the writer for every row would hand the GIL back and forth on each bar.
    """

    def __init__(self, path: str | Path, batch_size: int = 512, flush_interval_ms: int = 200) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.flush_interval = flush_interval_ms / 1000.0
        self._buf: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        con = self._connect()
        con.executescript(SCHEMA)
        con.commit()
        con.close()
        self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
        self._thread.start()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA busy_timeout=5000")
        return con

    # -- API used by the engine ----------------------------------------------------------------
    def start_run(
        self,
        run_id: str,
        mode: str,
        config_json: str,
        policy_path: str,
        layout_hash: str,
        data_files: Sequence[str],
    ) -> None:
        con = self._connect()
        with con:
            con.execute(
                "INSERT INTO runs (run_id, started_at, mode, status, config_json, policy_path, layout_hash, "
                "data_files) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                (run_id, _now(), mode, config_json, policy_path, layout_hash, json.dumps(list(data_files))),
            )
        con.close()

    def commit_point(self) -> None:
        """Everything recorded before this point may be committed together; rows after it wait
        for the next point (or a flush). The engine sets one after each bar, so a crash leaves the
        journal at a bar boundary: a bar's decision, orders, fills, trades and account rows are
        committed all together or not at all."""
        self._buf.append(("__point__", None))

    def record(self, table: str, row: tuple[Any, ...]) -> None:
        if self._error is not None:
            raise JournalError(f"journal writer failed: {self._error}") from self._error
        buf = self._buf
        buf.append((table, row))
        if (table in _URGENT or len(buf) >= self.batch_size) and not self._wake.is_set():
            self._wake.set()

    def finish_run(
        self, run_id: str, status: str, bars: int, bars_rejected: int, report: dict[str, Any]
    ) -> None:
        """Mark the run finished in the same transaction as its last rows (a crash leaves either
        both or neither)."""
        self._buf.append(
            (
                "__sql__",
                (
                    "UPDATE runs SET finished_at=?, status=?, bars=?, bars_rejected=?, report_json=? "
                    "WHERE run_id=?",
                    (_now(), status, bars, bars_rejected, json.dumps(report, default=str), run_id),
                ),
            )
        )
        self.flush()

    def resume_run(self, run_id: str) -> None:
        con = self._connect()
        with con:
            con.execute("UPDATE runs SET status='running', finished_at=NULL WHERE run_id=?", (run_id,))
        con.close()

    @staticmethod
    def unfinished_run(path: str | Path, mode: str) -> tuple[str, str] | None:
        """The latest run of this mode still marked running (the process died): (run_id, config)."""
        if not Path(path).exists():
            return None
        con = sqlite3.connect(path)
        try:
            row = con.execute(
                "SELECT run_id, config_json FROM runs WHERE mode=? AND status='running' "
                "ORDER BY started_at DESC, rowid DESC LIMIT 1",
                (mode,),
            ).fetchone()
        except sqlite3.OperationalError:
            row = None
        finally:
            con.close()
        return None if row is None else (str(row[0]), str(row[1]))

    def flush(self) -> None:
        """Block until everything recorded so far is committed."""
        done = threading.Event()
        self._buf.append(("__flush__", done))
        self._wake.set()
        if not done.wait(timeout=60):
            raise JournalError("journal flush timed out after 60 s")
        if self._error is not None:
            raise JournalError(f"journal writer failed: {self._error}") from self._error

    def close(self) -> None:
        """Write everything recorded and stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=60)
        if self._error is not None:
            raise JournalError(f"journal writer failed: {self._error}") from self._error

    # -- writer thread -------------------------------------------------------------------------
    def _insert(self, con: sqlite3.Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
        # One multi-row INSERT per chunk: SQLite runs it in one step, so the GIL is released and
        # re-taken once per chunk instead of once per row (executemany), which would otherwise
        # hand the GIL back and forth with the bar loop on every bar.
        n = _INSERTS[table]
        per = max(1, _MAX_VARIABLES // n)
        for s in range(0, len(rows), per):
            chunk = rows[s : s + per]
            sql = self._sql.get((table, len(chunk)))
            if sql is None:
                one = "(" + ", ".join("?" * n) + ")"
                sql = self._sql[(table, len(chunk))] = f"INSERT INTO {table} VALUES " + ", ".join(
                    [one] * len(chunk)
                )
            con.execute(sql, list(chain.from_iterable(chunk)))

    def _writer(self) -> None:
        con = self._connect()
        self._sql: dict[tuple[str, int], str] = {}
        pending: dict[str, list[tuple[Any, ...]]] = {t: [] for t in _INSERTS}
        staged: list[tuple[str, Any]] = []  # recorded after the last commit point
        buf = self._buf
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                stopping = self._stopping
                flushes = []
                statements: list[tuple[str, tuple[Any, ...]]] = []
                while buf:
                    item = buf.popleft()
                    table = item[0]
                    if table == "__point__":
                        _release(staged, pending, statements)
                    elif table == "__flush__":
                        flushes.append(item[1])
                    else:
                        staged.append(item)
                if flushes or stopping:  # a flush or the end commits everything recorded so far
                    _release(staged, pending, statements)
                if any(pending.values()) or statements:
                    con.execute("BEGIN")
                    for t, rows in pending.items():
                        if rows:
                            self._insert(con, t, rows)
                            rows.clear()
                    for sql, params in statements:
                        con.execute(sql, params)
                    con.execute("COMMIT")
                for done in flushes:
                    done.set()
                if stopping and not buf:
                    break
        except BaseException as exc:  # surfaced to the engine on its next record()
            self._error = exc
            while buf:  # release anyone waiting on a flush
                table, row = buf.popleft()
                if table == "__flush__":
                    row.set()
        finally:
            con.close()


def _release(
    staged: list[tuple[str, Any]],
    pending: dict[str, list[tuple[Any, ...]]],
    statements: list[tuple[str, tuple[Any, ...]]],
) -> None:
    """Move rows recorded before a commit point into the next transaction."""
    for table, row in staged:
        if table == "__sql__":
            statements.append(row)
        else:
            pending[table].append(row)
    staged.clear()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
