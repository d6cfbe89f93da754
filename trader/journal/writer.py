"""The journal: an append-only SQLite (WAL) record of every run, bar decision, order and fill.

Writes never happen on the bar path: rows go into a queue; a writer thread takes them in batches
(``batch_size`` rows or every ``flush_interval_ms``, and at once for orders and fills), up to the
last bar boundary, and hands each batch as one transaction to the journal's own process
(:mod:`trader.journal.sink`), which commits it off the bar loop's core and GIL. ``close()`` (also
on Ctrl-C) drains the queue and commits, so nothing queued is lost on a clean stop. Schema (all
tables carry ``run_id``):

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

import contextlib
import marshal
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import structlog

from trader.errors import JournalError
from trader.journal import rows, sink
from trader.journal.rows import Row
from trader.llm.isolation import allowed_cores

log = structlog.get_logger(__name__)

_INSERTS = rows.COLUMNS
# bound parameters per statement (SQLite allows 32766 since 3.32, but statements of more rows cost
# more to prepare than they save: measured with callgrind)
_MAX_VARIABLES = 8000
_URGENT = frozenset({"orders", "fills", "trades", "account", "llm_queries", "control"})
_POINT: tuple[str, Any] = ("__point__", None)  # the commit-point marker, compared by identity
_CONTROL = frozenset({"__discard__", "__flush__"})  # markers the writer acts on itself
_first = itemgetter(0)


class Journal:
    """Batched SQLite writer. ``record(table, row)`` is cheap and never blocks on disk.

    Rows go into a deque (appending wakes nobody); the writer thread wakes every
    ``flush_interval_ms``, when ``batch_size`` rows are waiting, or at once for orders and fills.
    Waking the writer for every row would hand the GIL back and forth on each bar.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 512,
        flush_interval_ms: int = 200,
        level: str = "full",
    ) -> None:
        """The writer process may run on any core this process was started with; a run that pins
        its bar loop puts it on the others (:func:`trader.llm.isolation.pin_bar_loop`)."""
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
            max_variables = min(_MAX_VARIABLES, con.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            # The sink's connection, opened now: on the file just checked (it says which file it
            # opened), not on whatever is at the path when the first batch comes.
            self._sink = _Sink(self.path, max_variables, self._identity)
        finally:
            con.close()
        try:
            self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
            self._thread.start()
        except BaseException:
            self._sink.close()
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
        if not self._closed and (gone := self._sink.gone()) is not None:
            return gone
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
    def writer_pid(self) -> int:
        """The process that commits the journal's rows (it ignores SIGINT and SIGTERM and ends
        when this process closes the journal or is gone)."""
        return self._sink.proc.pid

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
    def _writer(self) -> None:
        sink = self._sink
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
                items = [popleft() for _ in range(len(buf))]
                ready: list[tuple[str, Any]]  # recorded before the last commit point
                if _CONTROL.isdisjoint(map(_first, items)):
                    # rows and commit points (the rule): everything up to the last point is ready,
                    # points included (the sink passes over them); no step per row here, where
                    # every step holds the GIL and the core the bar loop needs
                    k = len(items)
                    while k and items[k - 1] is not _POINT:
                        k -= 1
                    if k == 0:
                        ready = []
                        staged += items
                    else:
                        ready = staged + items[:k] if staged else items[:k]
                        staged = items[k:]
                else:
                    ready = []
                    for item in items:
                        if item is _POINT:
                            if staged:
                                ready += staged
                                staged = []
                        elif item[0] == "__discard__":
                            staged = [r for r in staged if r[0] in item[1]]
                        elif item[0] == "__flush__":
                            flushes.append(item[1])
                        else:  # a row, or "__sql__": staged like a row, run after the inserts
                            staged.append(item)
                if flushes or stopping:  # a flush or the end commits everything recorded so far
                    ready += staged
                    staged = []
                # the transaction sent last time is committed by now, as a rule: its answer is
                # read when the writer wakes anyway (no wake-up, no GIL hand-over of its own)
                self.coerced += sink.answers()
                if ready:
                    sink.send(ready)
                if flushes or stopping:
                    self.coerced += sink.answers()  # committed: the flushes may return
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
            sink.close()


class _Sink:
    """The process that commits the writer's transactions (:mod:`trader.journal.sink`), seen from
    the writer thread: ``commit`` sends one transaction and waits (without the GIL) until it is
    committed, or raises :class:`JournalError` with the sink's reason."""

    def __init__(self, path: Path, max_variables: int, identity: tuple[int, int]) -> None:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", sink.__file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,  # a terminal's Ctrl-C or hang-up is the service's to handle
                env={k: v for k, v in os.environ.items() if k in _SINK_ENV},  # no broker secrets
            )
        except OSError as exc:
            raise JournalError(f"journal {path}: the writer process could not start: {exc}") from exc
        if hasattr(os, "sched_setaffinity"):
            # not where the thread that started it happens to be pinned (a bar loop before)
            with contextlib.suppress(OSError):  # refused by a system-call filter: stays put
                os.sched_setaffinity(self.proc.pid, allowed_cores())
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        self.path = path
        self._sent: list[tuple[str, Any]] | None = None  # the transaction not answered yet
        self._coerced = 0  # values of the transaction sent made plain here
        try:
            widths = dict(_INSERTS)
            self._send(marshal.dumps(("open", str(path), widths, max_variables)))
            reply = self._receive()
            if reply[0] != "ready":
                raise JournalError(f"journal {path}: {reply[1]}")
            if (reply[1], reply[2]) != identity:
                raise JournalError(f"journal {path} was replaced while it was being opened")
        except BaseException:
            self.close()
            raise

    def _send(self, payload: bytes) -> None:
        try:
            sink.write_message(self._in, payload)
        except (BrokenPipeError, ValueError) as exc:
            raise JournalError(self._why_gone() or f"journal writer process: {exc}") from exc

    def _receive(self) -> Any:
        reply = sink.read_message(self._out)
        if reply is None:
            raise JournalError(self._why_gone() or "journal writer process closed its output")
        return reply

    def _why_gone(self) -> str | None:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None
        return f"journal writer process exited with code {code}"

    def gone(self) -> str | None:
        """Why the sink cannot commit any more (it exited), or None."""
        code = self.proc.poll()
        return None if code is None else f"journal writer failed: its process exited with code {code}"

    def send(self, items: list[tuple[str, Any]]) -> None:
        """Send a transaction: rows (``(table, values)``), statements (``("__sql__", (sql,
        params))``, run after the rows) and commit points (passed over); :meth:`answers` says when
        it is committed. One at a time: the previous one must have been answered. The list is kept
        until then (it may be sent again)."""
        assert self._sent is None, "the previous transaction is not answered yet"
        try:
            # rows are Row named tuples: marshal carries exact tuples only (one C pass copies them)
            payload = marshal.dumps(("tx", list(map(tuple, items)), False))
            self._coerced = 0
        except ValueError:  # an object marshal refuses (an IntEnum, say): made plain first
            payload, self._coerced = _plain_payload(items)
        self._send(payload)
        self._sent = items

    def answers(self) -> int:
        """Wait until the transaction sent is committed (raises the sink's reason if it could not
        be). Returns how many values were stored as something else than given (plain Python
        values for numpy scalars, text for what SQLite cannot bind)."""
        if self._sent is None:
            return 0
        while True:
            reply = self._receive()
            if reply[0] != "plain":
                break
            # values of other than the plain types (marshal carries a numpy scalar as its bytes, a
            # float subclass too): the sink asked for them made plain; rare, so not checked here
            # on every row (it costs the bar loop's core)
            payload, self._coerced = _plain_payload(self._sent)
            self._send(payload)
        self._sent = None
        if reply[0] != "ok":
            raise JournalError(f"journal {self.path}: {reply[1]}")
        for warning in reply[2]:
            log.warning("journal_values_stored_as_text", error=warning)
        return self._coerced + int(reply[1])

    def close(self) -> None:
        """Ask the sink to finish (everything sent is committed by then) and wait for it."""
        with contextlib.suppress(OSError, ValueError):
            sink.write_message(self._in, marshal.dumps(("close",)))
        for stream in (self._in, self._out):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.error("journal_writer_process_killed", path=str(self.path))
            self.proc.kill()
            self.proc.wait()


# what the writer process may need of the environment (SQLite's temporary files, the locale)
_SINK_ENV = frozenset({"PATH", "TMPDIR", "SQLITE_TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "TZ"})

# what SQLite binds as itself (bool as an integer)
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _plain_payload(items: list[tuple[str, Any]]) -> tuple[bytes, int]:
    """A transaction's message with every value made plain (:func:`_plain`), and how many were
    changed."""
    coerced = 0
    plain: list[tuple[str, Any]] = []
    for table, values in items:
        if table == "__sql__":
            sql, params = values
            fixed: Any = (sql, tuple(map(_plain, params)))
            coerced += sum(type(a) is not type(b) for a, b in zip(params, fixed[1], strict=True))
        elif values is None:  # a commit point
            fixed = None
        else:
            fixed = tuple(map(_plain, values))
            coerced += sum(type(a) is not type(b) for a, b in zip(values, fixed, strict=True))
        plain.append((table, fixed))
    return marshal.dumps(("tx", plain, True)), coerced


def _plain(v: Any) -> Any:
    """``v`` as a value of exactly one of the types ``marshal`` carries and SQLite binds as
    itself: an int or float subclass (an IntEnum, numpy's float64) as the int or float it is, a
    numpy scalar as its Python value, anything else as text (never dropped)."""
    if type(v) in _PLAIN:
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str.__str__(v)  # the text itself, not a str enum's "Cls.MEMBER"
    if isinstance(v, bytes):
        return bytes(v)
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError):
            pass
    return str(v)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
