"""RunStats' per-bar columns: typed numpy buffers that read like the lists they replaced."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trader.engine import Column, RunStats


@given(st.lists(st.floats(allow_nan=False), max_size=3000))
def test_a_column_reads_back_what_was_appended_across_its_flushes(values):
    col = Column(np.float64)
    for v in values:
        col.append(v)
    assert len(col) == len(values)
    assert col == values and values == col and list(col) == values
    assert col.tolist() == values
    if values:
        assert (
            col[0] == values[0]
            and col[-1] == values[-1]
            and col[len(values) // 2] == values[len(values) // 2]
        )
        assert isinstance(col[-1], float)
    arr = np.asarray(col)
    assert arr.dtype == np.float64 and arr.tolist() == values
    assert np.asarray(col[-10:]).tolist() == values[-10:]


def test_a_column_keeps_its_type_and_refuses_indexes_past_its_end():
    pos = Column(np.int32, [1, -1, 0])
    assert np.asarray(pos).dtype == np.int32 and pos[1] == -1 and isinstance(pos[1], int)
    busy = Column(np.bool_)
    busy.append(True)
    assert busy[0] is True and np.asarray(busy, dtype=bool).tolist() == [True]
    with pytest.raises(IndexError):
        pos[3]
    with pytest.raises(IndexError):
        pos[-4]
    assert not Column(np.int64) and Column(np.int64, [0])


def test_asarray_of_a_flushed_column_is_a_read_only_view_not_a_copy():
    col = Column(np.int64, range(5000))  # extend moves everything into the buffer
    a, b = np.asarray(col), np.asarray(col)
    assert np.shares_memory(a, b) and not a.flags.writeable
    col.append(5000)  # a later append does not change what was read
    assert a.tolist() == list(range(5000)) and col[-1] == 5000


def test_run_stats_compare_by_content():
    a, b = RunStats(), RunStats()
    for s in (a, b):
        s.equity.extend([50_000.0, 50_012.5])
        s.ts_ns.extend([1, 2])
    assert a == b and a.equity == [50_000.0, 50_012.5]
    b.equity.append(1.0)
    assert a != b


def test_add_bar_fills_every_column_across_flushes():
    s = RunStats()
    n = 3 * Column.FLUSH + 7
    for i in range(n):
        s.add_bar(1_700_000_000_000_000_000 + i, 50_000.0 + i / 4, i % 3 - 1, 1000 + i, i % 2 == 0)
    assert len(s.ts_ns) == len(s.equity) == len(s.position) == len(s.latencies_ns) == len(s.llm_busy) == n
    assert s.equity[-1] == 50_000.0 + (n - 1) / 4 and s.position.tolist()[:4] == [-1, 0, 1, -1]
    assert np.asarray(s.llm_busy).tolist() == [i % 2 == 0 for i in range(n)]
    without_advisor = RunStats()
    without_advisor.add_bar(1, 1.0, 0, 1, None)
    assert len(without_advisor.llm_busy) == 0 and len(without_advisor.ts_ns) == 1
