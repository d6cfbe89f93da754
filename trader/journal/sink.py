"""The journal's SQLite side: a process of its own that commits the writer's transactions.

Why a process: binding a row's values to SQLite, and the Python around it, holds the GIL, and
the bar loop waits for every microsecond of it. Measured on the shared NQ replay (14,714 bars, full
journal, this 2-core VM): the writer thread used about 95 ms of CPU and the bar loop's wall time
exceeded its own CPU time by about 90 ms, whatever the switch interval, so the writer's work ran
as if in series with the loop. Handing each transaction to this process as one ``marshal`` blob
(C, a few ms for the whole run) lets SQLite's work run beside the loop, on the other core.

Run as a script (``python -I -S sink.py``): the standard library only, so it starts in a few
tens of milliseconds and needs nothing from the package.

Protocol over the child's stdin and stdout, both binary; every message is a 4-byte little-endian
length and a ``marshal`` payload of plain values:

  parent → sink   ("open", path, widths, max_variables)   once, first
                  ("tx", items, checked)                  items: the journal's queue between two
                                                          commit points, in order: rows (table,
                                                          values), statements ("__sql__", (sql,
                                                          params)), run after the rows, and bar
                                                          boundaries ("__point__", None), passed
                                                          over; checked: every value was made
                                                          plain by the parent
                  ("close",)
  sink → parent   ("ready", st_dev, st_ino)               the file it opened (the parent compares it
                                                          with the file it checked)
                  ("plain",)                              a value is not of a plain type: send
                                                          the transaction again, made plain
                  ("ok", coerced, warnings)               the transaction is committed
                  ("error", text)                         nothing of it is; the sink exits

End of input (the parent gone, even by ``kill -9``) ends the sink: a transaction received whole
is committed, a partial one never. It runs in a session of its own (a terminal's signals do not
reach it) and ignores SIGINT, SIGTERM and SIGHUP (systemd's stop reaches every process of the
service): the parent decides when the journal closes.
"""

from __future__ import annotations

import marshal
import os
import signal
import sqlite3
import struct
import sys
from itertools import chain
from typing import IO, Any

_LEN = struct.Struct("<I")
_INT64 = (-(2**63), 2**63 - 1)


def read_message(stream: IO[bytes]) -> Any:
    """One message, or None at the end of input (a partial message counts as the end)."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = _LEN.unpack(head)
    body = stream.read(n)
    if len(body) < n:
        return None
    return marshal.loads(body)


def write_message(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_LEN.pack(len(payload)) + payload)
    stream.flush()


def connect(path: str) -> sqlite3.Connection:
    # statements: a few power-of-two sizes per table and NULL pattern, prepared once each
    con = sqlite3.connect(path, isolation_level=None, cached_statements=512)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA busy_timeout=5000")
    return con


class Inserter:
    """Multi-row INSERTs of a transaction's rows, table by table."""

    def __init__(self, widths: dict[str, int], max_variables: int) -> None:
        self.widths = widths
        self.max_variables = max_variables
        self.sql: dict[tuple[str, int, tuple[str | None, ...]], str] = {}
        self.coerced = 0
        self.warnings: list[str] = []

    def insert(self, con: sqlite3.Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
        # One multi-row INSERT per chunk: SQLite runs it in one step. Chunks have power-of-two
        # sizes: a handful of statements per table, each prepared once (the connection's
        # statement cache keeps them). What is the same in every row of a chunk goes into the
        # statement's text instead of being bound: a column NULL throughout and the run id.
        width = self.widths[table]
        per = 1 << ((self.max_variables // width).bit_length() - 1)
        s = 0
        while s < len(rows):
            size = min(per, 1 << ((len(rows) - s).bit_length() - 1))
            chunk = rows[s : s + size]
            s += size
            bad = next((r for r in chunk if len(r) != width), None)
            if bad is not None:  # its values would land in the neighbouring rows' columns
                raise ValueError(f"journal: a {table} row has {len(bad)} values, expected {width}")
            params = list(chain.from_iterable(chunk))
            text = constant_columns(chunk[0], params, size, width)
            w = width
            for j in range(width - 1, -1, -1):  # from the right: the stride shrinks as we go
                if text[j] is not None:
                    del params[j::w]
                    w -= 1
            key = (table, size, text)
            sql = self.sql.get(key)
            if sql is None:
                if len(self.sql) >= 512:  # bounded, whatever mix of NULLs a long run brings
                    self.sql.clear()
                one = "(" + ", ".join(t or "?" for t in text) + ")"
                sql = self.sql[key] = f"INSERT INTO {table} VALUES " + ", ".join([one] * size)
            try:
                con.execute(sql, params)
            except (OverflowError, ValueError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
                # a value SQLite cannot bind (an integer past 64 bits, a lone surrogate): stored
                # as text rather than losing the transaction's rows
                fixed = [storable(v) for v in params]
                self.coerced += sum(a is not b for a, b in zip(params, fixed, strict=True))
                con.execute(sql, fixed)
                self.warnings.append(f"{table}: {str(exc)[:200]}")


def constant_columns(
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


_PLAIN = frozenset({int, float, str, bool, type(None)})


def plain(tables: dict[str, list[tuple[Any, ...]]], statements: list[tuple[str, Any]]) -> bool:
    """Every value is of a plain type. Anything else came from an object that is not one: a
    numpy scalar or a float subclass arrives as its raw bytes (marshal writes what has the buffer
    protocol as bytes; the journal has no BLOB column), a tuple as a tuple."""
    for rows in tables.values():
        if not set(map(type, chain.from_iterable(rows))) <= _PLAIN:
            return False
    return all(set(map(type, params)) <= _PLAIN for _, params in statements)


def storable(v: Any) -> Any:
    """A plain value SQLite can bind: as it is when it can, else as text (never dropped)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (an emoji cut in two): replaced, kept
            return v.encode("utf-8", "replace").decode("utf-8")
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return v if _INT64[0] <= v <= _INT64[1] else str(v)
    return v


def serve(inp: IO[bytes], out: IO[bytes]) -> int:
    hello = read_message(inp)
    if hello is None:
        return 0
    _, path, widths, max_variables = hello
    try:
        con = connect(path)
        st = os.stat(path)
    except Exception as exc:  # the parent raises it as the journal's error
        write_message(out, marshal.dumps(("error", f"{type(exc).__name__}: {exc}")))
        return 1
    write_message(out, marshal.dumps(("ready", st.st_dev, st.st_ino)))
    inserter = Inserter(widths, max_variables)
    try:
        while (msg := read_message(inp)) is not None and msg[0] == "tx":
            _, items, checked = msg
            tables: dict[str, list[tuple[Any, ...]]] = {t: [] for t in widths}
            statements: list[tuple[str, Any]] = []
            for table, values in items:
                if table in tables:
                    tables[table].append(values)
                elif table == "__sql__":
                    statements.append(values)
                elif table != "__point__":  # a bar boundary: nothing to store; else a bug, loudly
                    raise ValueError(f"journal: rows for an unknown table {table!r}")
            if not checked and not plain(tables, statements):
                write_message(out, marshal.dumps(("plain",)))
                continue
            inserter.coerced, inserter.warnings = 0, []
            try:
                con.execute("BEGIN")
                for table, rows in tables.items():
                    if rows:
                        inserter.insert(con, table, rows)
                for sql, params in statements:
                    con.execute(sql, params)
                con.execute("COMMIT")
            except Exception as exc:
                write_message(out, marshal.dumps(("error", f"{type(exc).__name__}: {exc}")))
                return 1
            write_message(out, marshal.dumps(("ok", inserter.coerced, inserter.warnings)))
    finally:
        con.close()
    return 0


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        code = serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the parent is gone while an answer was on its way: nothing to tell
        code = 1
    sys.exit(code)
