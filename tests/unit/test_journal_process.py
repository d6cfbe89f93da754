"""The journal's rows are committed by a process of its own (trader/journal/sink.py): what that
changes must not change what a journal promises. Values that are not plain Python ones still
arrive as what they are, signals meant for the service do not end it, its death is seen at once
and a dead parent ends it."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trader.domain import Fill, Side
from trader.errors import JournalError
from trader.journal import rows
from trader.journal.writer import Journal


class Tag(enum.IntEnum):
    ONE = 1


def fill(seq: int, **kw: object) -> rows.Row:
    f = Fill(f"c-{seq}", 1_700_000_000 * 10**9 + seq, Side.BUY, 1, 16000.25, 2.5, "entry")
    return rows.fill("r1", seq, dataclasses.replace(f, **kw))  # type: ignore[arg-type]


def stored(path: Path) -> list[tuple[object, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT seq, ts_ns, qty, price, typeof(price) FROM fills ORDER BY seq").fetchall()
    finally:
        con.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False


def test_numpy_scalars_and_int_enums_are_stored_as_the_numbers_they_are(tmp_path):
    """marshal carries a numpy scalar (and a float subclass like numpy's float64) as its raw
    bytes: were that committed, the journal would hold blobs where prices were."""
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j.record(fill(1, price=np.float64(16000.5), qty=np.int64(2), ts_ns=np.int64(1)))
    j.commit_point()
    j.flush()  # a transaction of numpy values only (marshal sends them, as bytes)
    j.record(fill(2, price=np.float32(16001.0), qty=Tag.ONE))  # marshal refuses the IntEnum
    j.record(fill(3))
    j.commit_point()
    j.flush()
    assert j.health() is None
    j.close()
    got = stored(path)
    assert got[0] == (1, 1, 2, 16000.5, "real") and got[1][2:] == (1, 16001.0, "real")
    assert got[2][3:] == (16000.25, "real")


def test_the_writer_process_ignores_the_signals_meant_for_the_service(tmp_path):
    """Ctrl-C in a terminal and systemd's stop reach every process of the group: the service
    decides when its journal closes, with everything recorded committed."""
    path = tmp_path / "j.sqlite"
    j = Journal(path, flush_interval_ms=10)
    os.kill(j.writer_pid, signal.SIGINT)
    os.kill(j.writer_pid, signal.SIGTERM)
    time.sleep(0.3)
    assert alive(j.writer_pid) and j.health() is None
    j.record(fill(1))
    j.commit_point()
    j.flush()
    j.close()
    assert [r[0] for r in stored(path)] == [1]
    assert not alive(j.writer_pid)


def test_a_dead_writer_process_is_unhealthy_at_once_and_the_next_rows_fail_loudly(tmp_path):
    j = Journal(tmp_path / "j.sqlite", flush_interval_ms=10)
    os.kill(j.writer_pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while j.health() is None and time.monotonic() < end:
        time.sleep(0.01)
    assert "journal writer failed" in (j.health() or "")
    with pytest.raises(JournalError):
        for seq in range(1, 100):  # the writer hears it at its next batch; record() says so after
            j.record(fill(seq))
            j.commit_point()
            time.sleep(0.02)
    with pytest.raises(JournalError):
        j.close()


def test_the_writer_process_ends_with_its_parent_keeping_what_was_committed(tmp_path):
    """kill -9 of the service: the writer process sees its input end and exits; the rows of every
    flushed transaction are in the file."""
    path = tmp_path / "j.sqlite"
    code = (
        "import sys, time\n"
        "from tests.unit.test_journal_process import fill\n"
        "from trader.journal.writer import Journal\n"
        f"j = Journal({str(path)!r})\n"
        "j.record(fill(1)); j.commit_point(); j.flush()\n"
        "print(j.writer_pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        pid = int(p.stdout.readline())
        p.kill()
        p.wait(10)
        end = time.monotonic() + 10
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
        assert not alive(pid)
    finally:
        if p.poll() is None:
            p.kill()
    assert [r[0] for r in stored(path)] == [1]


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores"
)
def test_a_pinned_bar_loop_keeps_the_writer_process_off_its_core(tmp_path):
    """The point of the writer process: SQLite's work beside the bar loop, not on its core. Run in
    a child (pinning moves every thread of the process that asks)."""
    code = (
        "import json, os\n"
        "from trader.config import load_settings\n"
        "from trader.journal.writer import Journal\n"
        "from trader.llm.isolation import pin_bar_loop\n"
        "s = load_settings(None, {'cpu': {'bar_loop_cores': 'first'}})\n"
        f"j = Journal({str(tmp_path / 'j.sqlite')!r})\n"
        "loop = pin_bar_loop(s.cpu, beside=(j.writer_pid,))\n"
        "mine, its = os.sched_getaffinity(0), os.sched_getaffinity(j.writer_pid)\n"
        "print(json.dumps([loop, sorted(mine), sorted(its)]))\n"
        "j.close()\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loop, main_thread, writer = json.loads(out.stdout.strip().splitlines()[-1])
    assert loop == main_thread == sorted(os.sched_getaffinity(0))[:1]
    assert writer and not set(writer) & set(loop)
