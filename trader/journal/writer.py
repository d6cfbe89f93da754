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

import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import structlog

from trader.errors import JournalError
from trader.journal import rows
from trader.journal.rows import Row

log = structlog.get_logger(__name__)

_INSERTS = rows.COLUMNS
# bound parameters per statement (SQLite allows 32766 since 3.32, but statements of more rows cost
# more to prepare than they save: measured with callgrind)
_MAX_VARIABLES = 8000
_URGENT = frozenset({"orders", "fills", "trades", "account", "llm_queries", "control"})
_POINT: tuple[str, Any] = ("__point__", None)  # the commit-point marker, compared by identity
_CONTROL = frozenset({"__discard__", "__flush__", "__sql__"})  # the writer's other markers


class Journal:
    """Batched, threaded SQLite writer. ``record(table, row)`` is cheap and never blocks on disk.

    Rows go into a deque (appending wakes nobody); the writer thread wakes every
    ``flush_interval_ms``, when ``batch_size`` rows are waiting, or at once for orders and fills.
    Waking the writer for every row would hand the GIL back and forth on each bar.
    """

    def __init__(
        self, path: str | Path, batch_size: int = 512, flush_interval_ms: int = 200, level: str = "full"
    ) -> None:
        if level not in rows.LEVEL_TABLES:
            raise JournalError(f"journal.level {level!r}: expected one of {', '.join(rows.LEVEL_TABLES)}")
        self.level = level
        self._keep = rows.LEVEL_TABLES[level]  # the tables this level writes (runs: always)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.flush_interval = flush_interval_ms / 1000.0
        self._buf: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self.coerced = 0  # values the journal could only store as text
        self._stopping = False
        con = self._connect()
        try:
            con.executescript(rows.SCHEMA)
            for table, column, sql in rows.MIGRATIONS:
                if column not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                    con.execute(sql)
            con.commit()
            # bound parameters per statement: as many as this SQLite takes, up to _MAX_VARIABLES
            self._max_variables = min(_MAX_VARIABLES, con.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
            # The writer thread's connection, opened here: on the file just checked, not on
            # whatever is at the path when the thread gets to run (a file moved or replaced).
            self._con = con
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
            self._thread.start()
        except BaseException:
            con.close()
            raise
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        # statements: a few power-of-two sizes per table and NULL pattern, prepared once each
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, cached_statements=512)
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
        params = rows.run_params(run_id, _now(), mode, config_json, policy_path, layout_hash, data_files)
        self._execute_now(rows.INSERT_RUN, params)

    def _execute_now(self, sql: str, params: tuple[Any, ...]) -> None:
        """One statement outside the batches (run bookkeeping before the first bar)."""
        con = self._connect()
        try:
            with con:
                con.execute(sql, params)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {exc}") from exc
        finally:
            con.close()

    def commit_point(self) -> None:
        """Everything recorded before this point may be committed together; rows after it wait
        for the next point (or a flush). The engine sets one after each bar, so a crash leaves the
        journal at a bar boundary: a bar's decision, orders, fills, trades and account rows are
        committed all together or not at all."""
        buf = self._buf
        try:
            if buf[-1] is _POINT:
                return  # nothing recorded since the last point (a bar with no rows at this level)
        except IndexError:  # empty: the writer took everything (maybe rows not yet committed)
            pass
        buf.append(_POINT)

    def discard_uncommitted(self, keep: tuple[str, ...] = ()) -> None:
        """Drop the rows recorded since the last commit point, but those of the ``keep`` tables
        (a bar that failed half way: the journal stays at the last complete bar, as after a
        crash, with what really happened at a broker kept)."""
        self._buf.append(("__discard__", frozenset(keep)))
        self.commit_point()

    def update_config(self, run_id: str, config_json: str) -> None:
        """The run's configuration from now on (an accepted reload), with the next commit."""
        self._buf.append(("__sql__", (rows.UPDATE_CONFIG, (config_json, run_id))))

    def record(self, row: Row) -> None:
        if self._error is not None:
            raise JournalError(f"journal writer failed: {self._error}") from self._error
        table = row[0]
        if table not in self._keep:
            return  # not journaled at this journal.level
        buf = self._buf
        buf.append(row)
        if (table in _URGENT or len(buf) >= self.batch_size) and not self._wake.is_set():
            self._wake.set()

    def finish_run(
        self, run_id: str, status: str, bars: int, bars_rejected: int, report: dict[str, Any]
    ) -> None:
        """Mark the run finished in the same transaction as its last rows (a crash leaves either
        both or neither)."""
        params = rows.finish_params(run_id, _now(), status, bars, bars_rejected, report)
        self._buf.append(("__sql__", (rows.FINISH_RUN, params)))
        self.flush()

    def resume_run(self, run_id: str) -> None:
        """Mark a stopped, failed or crashed run running again (it continues)."""
        self._execute_now(rows.RESUME_RUN, (run_id,))

    @staticmethod
    def mark_abandoned(path: str | Path, run_id: str) -> None:
        """``--fresh``: the old run stays in the journal, marked abandoned, and is never continued."""
        con = sqlite3.connect(path)
        try:
            with con:
                con.execute(rows.ABANDON_RUN, (run_id,))
        except sqlite3.Error as exc:
            raise JournalError(f"journal {path}: {exc}") from exc
        finally:
            con.close()

    def health(self) -> str | None:
        """Why this journal cannot take more rows, or None: the writer failed or died, or the file
        was deleted, replaced or cannot be written any more."""
        if self._error is not None:
            return f"journal writer failed: {self._error}"
        if not self._closed and not self._thread.is_alive():
            return "journal writer thread is not running"
        try:
            st = os.stat(self.path)
        except OSError:
            return f"journal file {self.path} is gone"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"journal file {self.path} was replaced"
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            return f"journal file {self.path} is not writable"
        return None

    @property
    def backlog(self) -> int:
        """Rows and commit points queued for the writer thread: how far behind it is."""
        return len(self._buf)

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
        # hand the GIL back and forth with the bar loop on every bar. Chunks have power-of-two
        # sizes: a handful of statements per table, each prepared once (the connection's statement
        # cache keeps them). Binding is most of the writer's work, so what is the same in every row
        # of a chunk goes into the statement's text instead: a column NULL throughout (binding None
        # costs an adapter lookup) and the run id. The chunk's values are walked as one flat list
        # (no transposing into columns and back): every Python step here holds the GIL the bar
        # loop needs.
        width = _INSERTS[table]
        per = 1 << ((self._max_variables // width).bit_length() - 1)
        s = 0
        while s < len(rows):
            size = min(per, 1 << ((len(rows) - s).bit_length() - 1))
            chunk = rows[s : s + size]
            s += size
            bad = next((r for r in chunk if len(r) != width), None)
            if bad is not None:  # its values would land in the neighbouring rows' columns
                raise JournalError(f"journal: a {table} row has {len(bad)} values, expected {width}")
            params = list(chain.from_iterable(chunk))
            if set(map(type, params)) <= _PLAIN:
                text = _constant_columns(chunk[0], params, size, width)
                w = width
                for j in range(width - 1, -1, -1):  # from the right: the stride shrinks as we go
                    if text[j] is not None:
                        del params[j::w]
                        w -= 1
            else:  # numpy scalars and the like would bind as bytes: stored as what they are
                text = (None,) * width
                raw = params
                params = [_storable(v) for v in raw]
                self.coerced += sum(type(a) is not type(b) for a, b in zip(raw, params, strict=True))
            key = (table, size, text)
            sql = self._sql.get(key)
            if sql is None:
                if len(self._sql) >= 512:  # bounded, whatever mix of NULLs a long run brings
                    self._sql.clear()
                one = "(" + ", ".join(t or "?" for t in text) + ")"
                sql = self._sql[key] = f"INSERT INTO {table} VALUES " + ", ".join([one] * size)
            try:
                con.execute(sql, params)
            except (OverflowError, ValueError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
                # a value SQLite cannot bind (an integer past 64 bits, a lone surrogate): stored as
                # text rather than losing the transaction's rows
                fixed = [_storable(v) for v in params]
                self.coerced += sum(a is not b for a, b in zip(params, fixed, strict=True))
                con.execute(sql, fixed)
                log.warning("journal_values_stored_as_text", table=table, error=str(exc)[:200])

    def _writer(self) -> None:
        con = self._con
        self._sql: dict[tuple[str, int, tuple[str | None, ...]], str] = {}
        # rows waiting for the next transaction, per table ("__sql__": statements, run after them)
        pending: dict[str, list[Any]] = {t: [] for t in (*_INSERTS, "__sql__")}
        statements = pending["__sql__"]
        staged: list[tuple[str, Any]] = []  # recorded after the last commit point
        buf = self._buf
        popleft = buf.popleft
        flushes: list[threading.Event] = []  # flushes taken from the queue, set once committed
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                stopping = self._stopping
                flushes.clear()
                ready: list[tuple[str, Any]] = []  # recorded before the last commit point
                for item in [popleft() for _ in range(len(buf))]:
                    if item is _POINT:
                        if staged:
                            ready += staged
                            staged.clear()
                    elif item[0] in _CONTROL:
                        if item[0] == "__discard__":
                            staged[:] = [r for r in staged if r[0] in item[1]]
                        elif item[0] == "__flush__":
                            flushes.append(item[1])
                        else:  # "__sql__": staged like a row, run after the transaction's inserts
                            staged.append(item)
                    else:
                        staged.append(item)
                if flushes or stopping:  # a flush or the end commits everything recorded so far
                    ready += staged
                    staged.clear()
                for table, row in ready:
                    pending[table].append(row)
                if ready:
                    con.execute("BEGIN")
                    for t in _INSERTS:
                        if rows := pending[t]:
                            self._insert(con, t, rows)
                            rows.clear()
                    for sql, params in statements:
                        con.execute(sql, params)
                    statements.clear()
                    con.execute("COMMIT")
                for done in flushes:
                    done.set()
                if stopping and not buf:
                    break
        except BaseException as exc:  # surfaced to the engine on its next record()
            self._error = exc
            for done in flushes:  # taken before the failure: their callers get the error now
                done.set()
            while buf:  # release anyone waiting on a flush
                table, row = buf.popleft()
                if table == "__flush__":
                    row.set()
        finally:
            con.close()


_INT64 = (-(2**63), 2**63 - 1)


# what SQLite binds as itself (bool as an integer)
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _constant_columns(
    first: tuple[Any, ...], flat: list[Any], size: int, width: int
) -> tuple[str | None, ...]:
    """Per column of a chunk (``flat``: its rows' values one after the other, ``size`` rows of
    ``width``), the SQL literal for a column whose rows all hold the same value when the
    statement's text gives SQLite exactly what binding would: NULL, or in the first column (the
    run id) the same plain ASCII text in every row; None: bind the values."""
    text: list[str | None] = [None] * width
    for j, v in enumerate(first):
        if v is None and flat[j::width].count(None) == size:
            text[j] = "NULL"
    v = first[0]
    if type(v) is str and v.isascii() and "\x00" not in v and flat[0::width].count(v) == size:
        text[0] = "'" + v.replace("'", "''") + "'"
    return tuple(text)


def _storable(v: Any) -> Any:
    """A value SQLite can bind: as it is when it can, else as text (never dropped)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (an emoji cut in two): replaced, kept
            return v.encode("utf-8", "replace").decode("utf-8")
        return v
    if v is None or isinstance(v, bytes | float):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v if _INT64[0] <= v <= _INT64[1] else str(v)
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _storable(item())
        except (TypeError, ValueError):
            pass
    return str(v)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
