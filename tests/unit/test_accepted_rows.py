"""A replay precomputes its features over the rows the engine will accept, decided in one
vectorised pass (``RecordedBars.accepted``); the engine then validates each bar again as it plays
it. The two must agree on every row of every file, or the features belong to other bars."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trader.features.validation import ROW_REASONS, SOURCE_REASONS, BarValidator
from trader.feeds.replay import RecordedBars

_PRICES = st.one_of(
    st.sampled_from([16000.0, 16000.25, 16001.0, 15999.75, 0.0, -1.0, float("nan"), float("inf")]),
    st.floats(min_value=-10.0, max_value=20000.0),
)


@st.composite
def recorded_bars(draw: st.DrawFn) -> RecordedBars:
    n = draw(st.integers(min_value=0, max_value=40))
    # times that repeat, go back, jump and cannot be read (< 0), in any order
    ts = draw(st.lists(st.sampled_from([-1, 0, 60, 120, 180, 240, 300, 3600]), min_size=n, max_size=n))
    cols = [draw(st.lists(_PRICES, min_size=n, max_size=n)) for _ in range(4)]
    volume = draw(st.lists(st.sampled_from([0.0, 5.0, -1.0, float("nan")]), min_size=n, max_size=n))
    refused = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(min_value=0, max_value=len(SOURCE_REASONS)), min_size=n, max_size=n),
        )
    )
    return RecordedBars(
        ts_ns=np.array([t * 1_000_000_000 if t >= 0 else -1 for t in ts], dtype=np.int64),
        open=np.array(cols[0], dtype=np.float64),
        high=np.array(cols[1], dtype=np.float64),
        low=np.array(cols[2], dtype=np.float64),
        close=np.array(cols[3], dtype=np.float64),
        volume=np.array(volume, dtype=np.float64),
        origin_file=np.zeros(n, dtype=np.int32),
        origin_line=np.arange(2, n + 2, dtype=np.int64),
        files=("bars.csv",),
        refused=None if refused is None else np.array(refused, dtype=np.int8),
    )


@settings(max_examples=400, deadline=None)
@given(rb=recorded_bars())
def test_the_vectorised_verdicts_are_the_validators_bar_by_bar(rb: RecordedBars) -> None:
    validator, says = BarValidator(), []
    for bar, _ in rb.items():  # exactly what the engine is handed, in order
        says.append("bad_timestamp" if bar is None else validator.check(bar) or "")
    assert [ROW_REASONS[c] for c in rb.reason_codes()] == says
    assert rb.accepted().tolist() == [s == "" for s in says]
