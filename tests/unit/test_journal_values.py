"""Values SQLite cannot bind never cost the journal its rows (issue 11): an integer past 64 bits,
a numpy scalar or another odd type is stored (as text where it must), the writer stays alive and
every row of the transaction is kept."""

from __future__ import annotations

import sqlite3

import numpy as np

from trader.domain import Fill, Side
from trader.journal import rows
from trader.journal.writer import Journal


def test_a_value_the_journal_cannot_bind_is_stored_as_text_and_no_row_is_lost(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j.start_run("r1", "replay", "{}", "policy.onnx", "hash", ("src",))
    ok = Fill("c-1", 1_700_000_000 * 10**9, Side.BUY, 1, 16000.25, 2.5, "entry")
    huge = Fill("c-2", 10**30, Side.SELL, 1, 1e20, 2.5, "exit")  # ts past int64
    odd = Fill("c-3", np.int64(1_700_000_060 * 10**9), Side.SELL, np.int32(1), np.float32(16001.0), 2.5, "x")  # type: ignore[arg-type]
    for seq, f in enumerate((ok, huge, odd), 1):
        j.record(rows.fill("r1", seq, f))
    j.commit_point()
    j.flush()
    assert j.health() is None and j.coerced >= 1
    j.record(
        rows.fill("r1", 4, ok._replace(client_id="c-4"))
        if hasattr(ok, "_replace")
        else rows.fill("r1", 4, ok)
    )
    j.commit_point()
    j.close()
    con = sqlite3.connect(path)
    got = con.execute("SELECT seq, client_id, ts_ns, price FROM fills ORDER BY seq").fetchall()
    con.close()
    assert [g[0] for g in got] == [1, 2, 3, 4]  # every row kept, the writer survived
    # bound as text, kept (an INTEGER column's affinity turns numeric text into a REAL)
    assert float(got[1][2]) == 1e30 and got[1][3] == 1e20
    assert got[2][2] == 1_700_000_060 * 10**9 and got[2][3] == 16001.0


def test_text_with_a_lone_surrogate_is_kept_with_a_replacement_character(tmp_path):
    """An LLM answer cut inside an emoji (a lone surrogate from JSON) must not kill the writer."""
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j.start_run("r1", "replay", "{}", "policy.onnx", "hash", ("src",))
    f = Fill("c-\ud83d", 1_700_000_000 * 10**9, Side.BUY, 1, 16000.25, 2.5, "entry up \ud83d")
    j.record(rows.fill("r1", 1, f))
    j.commit_point()
    j.flush()
    assert j.health() is None
    j.record(rows.fill("r1", 2, Fill("c-2", f.ts_ns, Side.SELL, 1, 16000.5, 2.5, "exit")))
    j.commit_point()
    j.close()
    con = sqlite3.connect(path)
    got = con.execute("SELECT seq, client_id, purpose FROM fills ORDER BY seq").fetchall()
    con.close()
    assert [g[0] for g in got] == [1, 2] and got[0][1] == "c-?" and got[0][2] == "entry up ?"


def test_rows_of_the_wrong_width_fail_the_writer_loudly_and_a_waiting_flush_gets_the_error(tmp_path):
    """A row one value short next to one a value long adds up to two good rows; stored, each
    value would sit in its neighbour's column. The writer refuses them, and a flush that was
    waiting for that transaction hears why at once (not after its 60 s timeout)."""
    import time

    import pytest

    from trader.errors import JournalError
    from trader.journal.rows import Row

    j = Journal(tmp_path / "j.sqlite")
    good = rows.fill("r1", 1, Fill("c-1", 1_700_000_000 * 10**9, Side.BUY, 1, 16000.25, 2.5, "entry"))
    j.record(Row("fills", (*good.values, "extra")))
    j.record(Row("fills", good.values[:-1]))
    j.commit_point()
    t0 = time.monotonic()
    with pytest.raises(JournalError, match="fills row has 10 values, expected 9"):
        j.flush()
    assert time.monotonic() - t0 < 10
    assert "journal writer failed" in (j.health() or "")
    with pytest.raises(JournalError):
        j.close()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    assert con.execute("SELECT count(*) FROM fills").fetchone() == (0,)
    con.close()
