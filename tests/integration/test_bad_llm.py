"""Hostile LLM answers (issue 11): bad input never crashes the daemon and never trades silently
wrong. One test per class of bad answer, against real parts: the OpenAI-compatible backend over
a real HTTP server on 127.0.0.1 (``tests/llm_server.py``), llama.cpp with the small GGUF where a
real model is needed, replays writing real SQLite journals. Plus hypothesis properties over the
answer parser and over the shape of the server's JSON.

No test asserts wall-clock time: speed is the benchmarks' business. Timing behaviour is asserted
as what the bar loop did (on which bar an answer became usable, how many bars were decided while
it was pending) and what was journaled (bytes, counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import flat, make_settings
from tests.integration.test_llm import q
from tests.llm_server import ScriptedChatServer
from trader.config import LLMModelConfig, Settings
from trader.domain import Action, Advice, MarketContext
from trader.features.clock import SessionClock
from trader.journal.rows import Row
from trader.llm.advisor import Advisor
from trader.llm.backends import LlamaCppBackend, LLMBackend, OpenAIBackend
from trader.llm.grammar import ANSWER_MAX_CHARS, REASON_MAX_CHARS, TRUNCATED_MARK, parse_answer
from trader.llm.prompts import build_context, render
from trader.wiring import build_replay

SHORT = "2023-11-28T10:20:00"  # warm-up ends ~10:00: about 20 decided RTH bars
T0 = 1_701_181_800 * 1_000_000_000  # 2023-11-28 14:30 UTC = 09:30 ET
NOON = 12 * 60
TEN_MB = 10 * 1024 * 1024


def market(ts_ns: int) -> MarketContext:
    return MarketContext(
        ts_ns, 16000.0, 10.0, 25.0, 20.0, 15.0, 50.0, 1.0, 15990.0, 1.0, 0.1, 15950.0, 16050.0, 1.0, 600
    )


def advisor_settings(base_url: str, mode: str = "sync", timeout_s: float = 2.0, **fusion: Any) -> Settings:
    return make_settings(
        advisor={
            "mode": mode,
            "backend": "openai",
            "openai": {"base_url": base_url},
            "query_timeout_s": timeout_s,
        },
        fusion={"query_interval": 2, "cache_ttl": 3600.0, **fusion},
    )


def make_advisor(
    s: Settings, backend: LLMBackend, mode: str = "sync", timing: str = "wall"
) -> tuple[Advisor, list[tuple]]:
    """A started advisor whose journal rows land in the returned list."""
    rows: list[tuple] = []

    def record(row: Row) -> None:
        rows.append(tuple(row.values))

    adv = Advisor(
        s, backend, mode=mode, timing=timing, record=record, run_id="t", clock=SessionClock(s.instrument)
    )
    adv.start()
    return adv, rows


def http_advisor(
    server: ScriptedChatServer, mode: str = "sync", timing: str = "wall", **kw: Any
) -> tuple[Advisor, list[tuple]]:
    s = advisor_settings(server.base_url, mode, **kw)
    return make_advisor(s, OpenAIBackend(s.advisor.openai, s.llm_model), mode, timing)


def bar(adv: Advisor, i: int, ts_ns: int | None = None, rl_conf: float = 0.9, **snap: Any) -> Advice | None:
    ts = T0 + i * 60_000_000_000 if ts_ns is None else ts_ns
    return adv.on_bar(i, ts, rl_conf, flat(**snap), NOON, lambda: market(ts))


# Columns of an llm_queries row (trader/journal/rows.py: llm_query)
RAW, PARSED, STATED, ERROR, AVAILABLE = 9, 10, 11, 18, 19


def replay(tmp_path: Path, name: str, **advisor: Any) -> tuple[Any, Any, Path]:
    advisor.setdefault("mode", "sync")
    s = make_settings(
        advisor=advisor, data={"end": SHORT}, fusion={"query_interval": 3}, risk={"enable_risk_veto": False}
    )
    db = tmp_path / name
    run = build_replay(s, db)
    stats = asyncio.run(run.engine.run())
    run.journal.finish_run(run.run_id, stats.status, stats.bars, 0, {})
    run.journal.close()
    return run, stats, db


def methods(db: Path, run_id: str) -> set[str]:
    return {r[0] for r in q(db, "SELECT DISTINCT method FROM decisions WHERE run_id=?", run_id)}


@pytest.fixture
def llama_backend() -> Iterator[LlamaCppBackend]:
    """A fresh in-process llama.cpp with the small GGUF. An advisor's worker closes the backend it
    was given when it stops: a test stops its advisor with a bound long enough for a query still
    running to end, so the model is never freed under it."""
    backend = LlamaCppBackend(LLMModelConfig(isolation="thread"))
    yield backend
    backend.close()  # idempotent after the advisor closed it


# -- 1. content that is not text -------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, counter",
    [
        ({"action": "BUY", "confidence": 0.9}, "errors"),
        (["BUY", 0.9, "breakout"], "errors"),
        (0.9, "errors"),
        (7, "errors"),
        (True, "errors"),
        (None, "unparseable"),  # no text at all: an empty answer
        ([{"type": "text", "text": "SELL | 0.80 | lower highs"}], "answered"),  # text parts: text
    ],
    ids=["dict", "list", "float", "int", "bool", "null", "text_parts"],
)
def test_content_that_is_not_text_is_a_counted_failure_and_the_replay_completes(tmp_path, content, counter):
    with ScriptedChatServer(lambda body: content) as server:
        run, stats, db = replay(tmp_path, "c.sqlite", backend="openai", openai={"base_url": server.base_url})
    st_ = run.engine.advisor.stats
    assert stats.status == "completed" and stats.bars == 980  # every bar decided; nothing raised
    assert st_.queries > 0 and getattr(st_, counter) == st_.queries
    rows = q(db, "SELECT parsed_action, error FROM llm_queries WHERE run_id=?", run.run_id)
    assert len(rows) == st_.queries
    if counter == "errors":
        assert st_.answered == 0 and methods(db, run.run_id) <= {"warmup", "rl_only"}
        assert all(p is None and "not text" in e for p, e in rows)
    elif counter == "answered":
        assert {p for p, _ in rows} == {"SELL"}


# -- 2. a 10 MB answer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, chunked",
    [(TEN_MB, False), (TEN_MB, True), (20_000, False)],
    ids=["10MB_with_length", "10MB_streamed", "20KB_text"],
)
def test_an_oversized_answer_is_cut_before_parsing_and_journaling_and_counted_truncated(
    tmp_path, size, chunked
):
    # a valid answer up front: a parser that saw the whole text would trade on it
    text = "BUY | 0.95 | " + "x" * size
    with ScriptedChatServer(lambda body: text, chunked=chunked) as server:
        run, stats, db = replay(
            tmp_path, "big.sqlite", backend="openai", openai={"base_url": server.base_url}
        )
    st_ = run.engine.advisor.stats
    assert stats.status == "completed" and stats.bars == 980
    assert st_.queries > 0 and st_.truncated == st_.queries and st_.answered == 0
    assert methods(db, run.run_id) <= {"warmup", "rl_only"}
    raw_chars, error_chars, longest = q(
        db,
        "SELECT total(length(raw_answer)), total(length(error)), max(length(raw_answer)) "
        "FROM llm_queries WHERE run_id=?",
        run.run_id,
    )[0]
    assert raw_chars + error_chars <= st_.queries * (ANSWER_MAX_CHARS + len(TRUNCATED_MARK))
    if size == TEN_MB:  # the HTTP body is refused past its limit: a failed answer
        assert st_.errors == st_.queries and raw_chars == 0
    else:  # the text is cut, journaled marked as cut, and is no advice
        assert st_.unparseable == st_.queries and longest == ANSWER_MAX_CHARS + len(TRUNCATED_MARK)


# -- 3. negative, out-of-range and NaN confidences --------------------------------------------------
@pytest.mark.parametrize(
    "confidence, expected",
    [
        ("0.50", 0.5),  # the control: the same answer, a readable confidence
        ("-0.5", None),
        ("\u22120.5", None),  # a Unicode minus
        ("-50%", None),
        ("1.5", None),
        ("150%", None),
        ("NaN", None),
        ("inf", None),
        ("-1e-1", None),
    ],
)
def test_a_negative_out_of_range_or_nan_confidence_is_unparseable_never_folded_into_range(
    confidence, expected
):
    with ScriptedChatServer(lambda body: f"BUY | {confidence} | breakout") as server:
        adv, rows = http_advisor(server)
        advice = bar(adv, 0)
        adv.stop()
    if expected is None:
        assert advice is None and adv.stats.unparseable == 1 and adv.stats.answered == 0
        assert rows[0][PARSED] is None and rows[0][STATED] is None
    else:
        assert advice is not None and advice.action == Action.BUY and advice.confidence == expected
    assert rows[0][RAW] == f"BUY | {confidence} | breakout"  # journaled as it came


# -- 4. a failed answer clears the cached advice ---------------------------------------------------
FAILURES: dict[str, Callable[[ScriptedChatServer], None]] = {
    "unparseable": lambda s: setattr(s, "answer", lambda body: "the market is a mystery"),
    "negative_confidence": lambda s: setattr(s, "answer", lambda body: "BUY | -0.80 | x"),
    "dict_content": lambda s: setattr(s, "answer", lambda body: {"action": "BUY"}),
    "http_500": lambda s: setattr(s, "status", 500),
    "timeout": lambda s: setattr(s, "delay_s", 3.0),
    "10MB_body": lambda s: setattr(s, "answer", lambda body: "BUY | 0.9 | " + "x" * TEN_MB),
}


@pytest.mark.parametrize("failure", [*FAILURES, "llama_cpp_timed_out"])
def test_an_unparseable_or_failed_answer_clears_the_cached_advice(failure, request):
    with contextlib.ExitStack() as stack:
        if failure == "llama_cpp_timed_out":  # the real model, stopped at its deadline mid-answer
            s = make_settings(
                advisor={"mode": "sync", "query_timeout_s": 30.0},
                fusion={"query_interval": 2, "cache_ttl": 3600.0},
            )
            adv, rows = make_advisor(s, request.getfixturevalue("llama_backend"))
            break_it: Callable[[], None] = lambda: setattr(adv, "timeout_s", 1e-4)  # noqa: E731
        else:
            server = stack.enter_context(ScriptedChatServer(lambda body: "BUY | 0.80 | momentum"))
            adv, rows = http_advisor(server, timeout_s=1.0)
            break_it = lambda: FAILURES[failure](server)  # noqa: E731
        stack.callback(adv.stop, 120.0)  # a query still running ends before the model is freed
        first = bar(adv, 0)
        assert first is not None  # grammar-constrained or scripted: this answer parses
        reused = bar(adv, 1)  # no query on this bar: the cached answer, decayed
        assert reused is not None and reused.action == first.action and reused.age_bars == 1
        break_it()
        assert bar(adv, 2) is None  # asked again, and the answer failed: no advice
        assert bar(adv, 3) is None  # and none is resurrected on the next bar
        st_ = adv.stats
        assert st_.queries == 2 and st_.answered == 1 and st_.unparseable + st_.errors + st_.timeouts == 1
        assert rows[1][PARSED] is None and rows[1][AVAILABLE] == 2


# -- 5. no trades yet ------------------------------------------------------------------------------
def test_no_trades_yet_reads_as_such_in_the_prompt_never_as_a_0_percent_win_rate():
    with ScriptedChatServer(lambda body: "HOLD | 0.60 | wait") as server:
        adv, _ = http_advisor(server)
        bar(adv, 0)  # a fresh account: no trade in the win-rate window
        bar(adv, 2, position=1, avg_entry=16000.0, recent_win_rate=0.0, recent_trades=4)
        adv.stop()
    fresh, losing = (r["messages"][1]["content"] for r in server.requests)
    assert "win rate n/a (no trades yet)" in fresh and "win rate 0%" not in fresh
    assert "win rate 0%" in losing  # four trades, none won: that is a 0% win rate
    s = make_settings()
    ctx = build_context(market(T0), flat(), s.instrument, SessionClock(s.instrument))
    for template in ("{win_rate}", "{win_rate:.2f}", "{win_rate:>8.1%}", "{win_rate!r}"):
        custom = make_settings(prompts={"context_template": f"win rate {template}"})
        assert render(custom.prompts, ctx)[1] == "win rate n/a (no trades yet)", template


# -- 6. async replay waits only as long as simulated time allows -----------------------------------
def test_async_replay_waits_only_as_long_as_simulated_time_allows(request):
    """Bars closer together in simulated time than the answer takes: the answer is pending over
    several bars and becomes usable on the first bar its latency allows, as live would see it. A
    query that outlives the query timeout is given up on the bar the timeout passes in simulated
    time, even when the backend (llama.cpp evaluating a long prompt) cannot stop that soon."""
    # (a) an HTTP answer that takes 1 s, bars 0.25 s apart, a generous query timeout
    step_ns = 250_000_000
    with ScriptedChatServer(lambda body: "SELL | 0.70 | x", delay_s=1.0) as server:
        adv, rows = http_advisor(server, mode="async", timing="bar", timeout_s=10.0, query_interval=1000)
        pending = 0
        first_usable = None
        for i in range(12):
            busy = adv.busy
            advice = bar(adv, i, ts_ns=T0 + i * step_ns)
            if i > 0 and busy and advice is None:
                pending += 1
            if advice is not None and first_usable is None:
                first_usable = i
        adv.stop()
    assert adv.stats.answered == 1 and len(rows) == 1
    latency_s = rows[0][15] / 1000.0  # latency_ms
    usable_from = math.ceil(latency_s * 1e9 / step_ns)
    assert usable_from >= 4  # the answer took at least 1 s: not before bar 4
    assert first_usable == rows[0][AVAILABLE] and usable_from <= first_usable <= usable_from + 1
    assert pending == first_usable - 1 >= 3  # bars 1..3 at least were decided while it was pending

    # (b) llama.cpp with a prompt it needs far longer than the query timeout to read; it cannot be
    # interrupted while it reads. Bars 10 ms apart, query timeout 50 ms of simulated time.
    backend = request.getfixturevalue("llama_backend")
    s = make_settings(
        advisor={"mode": "async", "query_timeout_s": 0.05},
        fusion={"query_interval": 1000},
        prompts={"context_template": "Price {current_price:.2f}, RSI {rsi:.0f}. " * 60 + "Best action?"},
    )
    adv, rows = make_advisor(s, backend, mode="async", timing="bar")
    step_ns = 10_000_000
    for i in range(20):
        bar(adv, i, ts_ns=T0 + i * step_ns)
    adv.stop(timeout_s=120.0)  # the abandoned query is still being read: let it end
    assert adv.stats.timeouts == 1 and adv.stats.answered == 0
    assert rows[0][AVAILABLE] == 5  # given up at 50 ms of simulated time: bar 5, not when llama.cpp ended
    assert "no answer within" in rows[0][ERROR]


# -- properties ------------------------------------------------------------------------------------
_ACTION_WORDS = st.sampled_from(
    ["HOLD", "buy", "Sell", "MOVE_TO_BE", "move to break even", "ENABLE_TRAIL", "disable trailing", "SHORT"]
)
_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-2, 2).map(lambda x: f"{x:.2f}"),
    st.integers(-200, 200).map(str),
    st.integers(-200, 200).map(lambda n: f"{n}%"),
    st.sampled_from(["-0.5", "\u22120.5", "NaN", "-inf", "Infinity", "1e400", "5e-1", ".3", "-.3", "0."]),
)
_WELL_FORMED = st.builds(
    lambda a, c, r: f"{a} | {c:.2f} | {r}",
    _ACTION_WORDS,
    st.floats(0, 1),
    st.text(alphabet=st.characters(exclude_characters="|\n"), max_size=80),
)
_ANSWERS = st.one_of(
    st.text(max_size=200),
    _WELL_FORMED,
    st.builds(
        lambda a, sep, n, r: f"{a}{sep}{n}{sep}{r}",
        _ACTION_WORDS,
        st.sampled_from([" | ", "|", ", confidence ", " - ", "\n", " "]),
        _NUMBERS,
        st.text(max_size=120),
    ),
)


def _valid(parsed: Any) -> bool:
    return (
        isinstance(parsed.action, Action)
        and isinstance(parsed.confidence, float)
        and math.isfinite(parsed.confidence)
        and 0.0 <= parsed.confidence <= 1.0
        and len(parsed.reason) <= REASON_MAX_CHARS
    )


@settings(max_examples=100, deadline=None)
@given(_ANSWERS)
def test_property_the_parser_never_raises_and_gives_valid_advice_or_none(text):
    parsed = parse_answer(text)
    assert parsed is None or _valid(parsed)


@settings(max_examples=100, deadline=None)
@given(_ACTION_WORDS.filter(lambda a: a != "SHORT"), _NUMBERS)
def test_property_a_stated_confidence_is_read_as_written_or_not_at_all(action, number):
    parsed = parse_answer(f"{action} | {number} | reason")
    if parsed is None:
        return
    value = float(number.rstrip("%").replace("\u2212", "-"))
    if number.endswith("%") or (value > 1 and value.is_integer()):
        value /= 100
    assert not number.lstrip().startswith(("-", "\u2212"))  # a negative is never read
    assert parsed.confidence == pytest.approx(value, abs=1e-4) and 0.0 <= parsed.confidence <= 1.0


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | _ANSWERS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_CONTENT = st.one_of(
    _JSON, _ANSWERS, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _ANSWERS}), max_size=3)
)
_RESPONSES = st.one_of(
    _JSON,
    st.fixed_dictionaries({"choices": _JSON}),
    st.fixed_dictionaries(
        {
            "choices": st.lists(
                st.fixed_dictionaries({"message": st.fixed_dictionaries({"content": _CONTENT})}),
                min_size=1,
                max_size=2,
            )
        },
        optional={"usage": _JSON},
    ),
)


@pytest.fixture(scope="module")
def shape_server() -> Iterator[ScriptedChatServer]:
    with ScriptedChatServer(response=lambda body: None) as server:
        yield server


@settings(max_examples=100, deadline=None)
@given(_RESPONSES)
def test_property_any_openai_response_json_gives_valid_advice_or_a_counted_failure(shape_server, response):
    shape_server.response = lambda body: response
    adv, rows = http_advisor(shape_server)
    try:
        advice = bar(adv, 0)  # nothing may escape to the bar path
    finally:
        adv.stop()
    st_ = adv.stats
    assert st_.queries == 1 and len(rows) == 1  # journaled, whatever came
    assert st_.answered + st_.unparseable + st_.errors + st_.timeouts == 1
    if advice is None:
        assert st_.answered == 0 and rows[0][PARSED] is None
    else:
        assert st_.answered == 1 and 0.0 <= advice.confidence <= 1.0 and isinstance(advice.action, Action)
    raw = rows[0][RAW]
    assert raw is None or len(raw) <= ANSWER_MAX_CHARS + len(TRUNCATED_MARK)


@pytest.mark.parametrize(
    ("text", "conf"),
    [
        ("BUY | breakout above resistance | 0.8", 0.8),  # reason first, a bare confidence last
        ("BUY | breakout | 80%", 0.8),
        ("SELL | high | 2 reasons", None),  # a reason's number is never a confidence
        ("BUY | up | -0.5", None),
        ("BUY | 0.7 | 2 lower highs", 0.7),
    ],
)
def test_a_piped_answer_with_its_confidence_last_is_read_and_a_reasons_number_is_not(text, conf):
    from trader.llm.grammar import parse_answer

    got = parse_answer(text)
    assert (got.confidence if got else None) == conf
