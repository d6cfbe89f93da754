"""The LLM advisor with real parts: llama.cpp with the small GGUF, HTTP servers on 127.0.0.1, SQLite.

Includes the hybrid-agent guide's eight checks (observation shape, LLM-feature builder, prompt
generation, response parsing, decision fusion, risk veto, context generation, selective querying).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import flat, make_settings
from tests.llm_server import ScriptedChatServer, free_port
from trader.config import ConfigError, LLMModelConfig, load_settings
from trader.decision.fusion import GuideFusion
from trader.decision.risk import RiskContext, RiskEngine
from trader.domain import Action, Advice
from trader.features.clock import SessionClock
from trader.features.layout import RISK_CONTEXT_FEATURES
from trader.features.observation import AccountFeatures, BulkFeatures
from trader.feeds.replay import load_bars
from trader.journal import DECISION_COLUMNS
from trader.llm.advisor import Advisor
from trader.llm.backends import EnsembleBackend, LlamaCppBackend, LLMError, OpenAIBackend, bundled_gguf
from trader.llm.grammar import parse_answer
from trader.llm.prompts import build_context, render
from trader.wiring import build_replay

SHORT = "2023-11-28T10:20:00"  # warm-up ends ~10:00: about 20 decided RTH bars


@pytest.fixture(scope="module")
def llama() -> LlamaCppBackend:
    backend = LlamaCppBackend(LLMModelConfig())
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def bulk() -> BulkFeatures:
    s = make_settings()
    rb = load_bars(s.data)
    cols = {k: getattr(rb, k) for k in ("ts_ns", "open", "high", "low", "close", "volume")}
    return BulkFeatures(s, cols)


def replay(tmp_path: Path, name: str, **advisor: object):
    advisor.setdefault("mode", "sync")
    s = make_settings(
        advisor=advisor, data={"end": SHORT}, fusion={"query_interval": 3}, risk={"enable_risk_veto": False}
    )
    run = build_replay(s, tmp_path / name)
    stats = asyncio.run(run.engine.run())
    run.journal.finish_run(run.run_id, stats.status, stats.bars, 0, {})
    run.journal.close()
    return run, stats, tmp_path / name


def q(db: Path, sql: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# -- the guide's eight checks ------------------------------------------------------------------
def test_guide_check_1_observation_is_261_float32(bulk):
    assert bulk.rows.shape[1] == 261 and bulk.rows.dtype == np.float32
    ready = np.flatnonzero(bulk.ready_col)
    assert ready[0] < 1000 and np.isfinite(bulk.rows[ready]).all()


def test_guide_check_2_llm_context_features_are_built(bulk):
    lay = bulk.layout
    llm_names = lay.names[lay.llm_market] + lay.names[lay.risk_context]
    assert len(llm_names) == 33
    for expected in (
        "ctx_adx_slope",
        "ctx_vwap_distance_atr",
        "ctx_market_regime",
        "mtf_rsi_15m",
        "mtf_rsi_60m",
        "mtf_sr_distance_atr",
        "pat_double_top",
        "pat_breakout",
        *RISK_CONTEXT_FEATURES,
    ):
        assert expected in llm_names
    ready = bulk.ready_col
    block = bulk.rows[ready][:, lay.llm_market]
    assert np.isfinite(block).all() and (block.std(axis=0) > 0).sum() >= 25  # they vary with the market
    s = make_settings()
    snap = flat(consecutive_losses=2, recent_win_rate=0.4, recent_trades=5)
    obs = bulk.rows[np.flatnonzero(ready)[0]].copy()
    AccountFeatures(s, lay).fill(obs, snap, 16000.0, 10.0, 0)
    risk = obs[lay.risk_context]
    assert risk[RISK_CONTEXT_FEATURES.index("risk_consecutive_losses")] == pytest.approx(2 / 3)
    assert risk[RISK_CONTEXT_FEATURES.index("risk_win_rate_10")] == pytest.approx(0.4)


def _context(bulk: BulkFeatures, i: int, snap=None) -> dict:
    s = make_settings()
    return build_context(bulk.context_at(i), snap or flat(), s.instrument, SessionClock(s.instrument))


def test_guide_check_3_prompt_is_rendered_from_config_templates(bulk):
    i = int(np.flatnonzero(bulk.ready_col)[100])
    system, user = render(make_settings().prompts, _context(bulk, i))
    assert "NQ" in system and "ACTION | confidence | reason" in system
    assert f"Price {bulk._ctx['close'][i]:.2f}" in user and "Position flat" in user
    custom = make_settings(
        prompts={"context_template": "RSI={rsi:.1f} px={current_price:.2f} {position_status}"}
    )
    _, user2 = render(custom.prompts, _context(bulk, i))
    assert user2.startswith("RSI=") and user2.endswith("flat")


def test_unknown_placeholder_or_bad_format_spec_is_a_config_error_at_start():
    with pytest.raises(ConfigError, match=r"prompts\.context_template: unknown placeholder \{price\}"):
        load_settings(None, {"prompts": {"context_template": "at {price}"}})
    with pytest.raises(ConfigError, match=r"prompts\.system: bad format spec \{adx:\.2q\}"):
        load_settings(None, {"prompts": {"system": "adx {adx:.2q}"}})
    with pytest.raises(ConfigError, match="positional placeholder"):
        load_settings(None, {"prompts": {"system": "x {}"}})


def test_guide_check_4_grammar_constrained_answers_of_the_real_model_always_parse(llama, bulk):
    prompts = make_settings().prompts
    ready = np.flatnonzero(bulk.ready_col)
    for i in ready[[0, 500, 1500, 3000]]:
        for snap in (
            flat(),
            flat(position=1, avg_entry=float(bulk._ctx["close"][i]) - 5, unrealized_usd=100.0),
        ):
            system, user = render(prompts, _context(bulk, int(i), snap))
            reply = llama.complete(system, user, 30.0)
            parsed = parse_answer(reply.text)
            assert parsed is not None, reply.text
            assert reply.action_probs is not None and sum(reply.action_probs) == pytest.approx(1.0)
            assert len(reply.action_probs) == 6 and reply.completion_tokens > 0


@pytest.mark.parametrize(
    "text, action, conf",
    [
        ("BUY | 0.82 | breakout above VWAP", Action.BUY, 0.82),
        ("  sell|0.9|lower highs", Action.SELL, 0.9),
        ("**Action:** MOVE_TO_BE\n**Confidence:** 75%\nLock in profit.", Action.MOVE_TO_BE, 0.75),
        ("I recommend to hold (confidence 0.55) because the trend is unclear.", Action.HOLD, 0.55),
        ("`ENABLE_TRAIL` | 1.00 | let it run", Action.ENABLE_TRAIL, 1.0),
        ("Disable trailing | .3 | chop", Action.DISABLE_TRAIL, 0.3),
        ("Move to break even, confidence: 0.66", Action.MOVE_TO_BE, 0.66),
    ],
)
def test_tolerant_parser_reads_free_text_from_backends_without_grammar(text, action, conf):
    parsed = parse_answer(text)
    assert parsed is not None and parsed.action == action and parsed.confidence == pytest.approx(conf)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no idea",
        "BUY or SELL, 0.5",
        "BUY | high | yes",
        "SHORT | 0.9 | x",
        "BUY | 1.7 | more than certain",
    ],
)
def test_unreadable_or_ambiguous_answers_are_no_advice(text):
    assert parse_answer(text) is None


def test_guide_check_5_fusion_uses_real_llm_advice(tmp_path):
    run, _, db = replay(tmp_path, "sync.sqlite")
    rows = q(
        db,
        "SELECT llm_action, llm_conf, method FROM decisions WHERE run_id=? AND method != 'warmup'",
        run.run_id,
    )
    with_advice = [r for r in rows if r[0] is not None]
    assert with_advice and all(0.0 <= r[1] <= 1.0 for r in with_advice)
    assert {r[2] for r in with_advice} - {"rl_only"}  # advice went through the fusion rules
    n_q = q(db, "SELECT count(*), count(parsed_action) FROM llm_queries WHERE run_id=?", run.run_id)[0]
    assert n_q[0] == run.engine.advisor.stats.queries > 0 and n_q[1] == n_q[0]  # grammar: every answer parsed


def test_guide_check_6_confident_llm_advice_cannot_bypass_the_risk_veto():
    s = make_settings()
    fused = GuideFusion(s.fusion).fuse(
        Action.HOLD, 0.3, Advice(Action.BUY, 1.0, "all in", 0), np.ones(6, bool), lambda: None
    )  # type: ignore[arg-type, return-value]
    assert fused.action == Action.BUY and fused.method == "llm_override"
    risk = RiskEngine(s, SessionClock(s.instrument))
    verdict = risk.review(fused.action, flat(consecutive_losses=3), RiskContext(0, 600, lambda: None))  # type: ignore
    assert verdict.action == Action.HOLD and verdict.vetoes[0].rule == "consecutive_losses"


def test_guide_check_7_context_values_come_from_market_and_portfolio(bulk):
    i = int(np.flatnonzero(bulk.ready_col)[200])
    snap = flat(
        position=-1,
        avg_entry=16010.0,
        unrealized_usd=-50.0,
        balance_usd=49_900.0,
        equity_usd=49_850.0,
        peak_equity_usd=50_000.0,
        consecutive_losses=2,
        recent_win_rate=0.25,
        recent_trades=4,
    )
    ctx = _context(bulk, i, snap)
    m = bulk.context_at(i)
    assert ctx["current_price"] == m.close and ctx["adx"] == pytest.approx(m.adx) and ctx["rsi"] == m.rsi
    assert ctx["position_status"] == "short 1" and ctx["entry_price"] == "16010.00"
    assert (
        ctx["drawdown"] == pytest.approx(150.0) and ctx["win_rate"] == 0.25 and ctx["consecutive_losses"] == 2
    )
    assert ctx["support"] == m.support and ctx["resistance"] == m.resistance


def _advisor(server: ScriptedChatServer, mode: str = "sync", **fusion: object) -> tuple[Advisor, list]:
    s = make_settings(
        advisor={
            "mode": mode,
            "backend": "openai",
            "openai": {"base_url": server.base_url},
            "query_timeout_s": 2.0,
        },
        fusion=fusion or {"query_interval": 5},
    )
    rows: list = []
    adv = Advisor(
        s,
        OpenAIBackend(s.advisor.openai, s.llm_model),
        mode=mode,
        timing="wall",
        record=lambda row: rows.append(tuple(row)),
        run_id="test",
        clock=SessionClock(s.instrument),
    )
    adv.start()
    return adv, rows


class _Market:
    def __init__(self, ts_ns: int) -> None:
        self.ts_ns, self.close, self.atr, self.adx, self.plus_di, self.minus_di = (
            ts_ns,
            16000.0,
            10.0,
            25.0,
            20.0,
            15.0,
        )
        self.rsi, self.macd, self.vwap, self.vwap_distance_atr, self.momentum_pct = (
            50.0,
            1.0,
            15990.0,
            1.0,
            0.1,
        )
        self.support, self.resistance, self.volatility_regime, self.minute_of_day = 15950.0, 16050.0, 1.0, 600


MIN = 60_000_000_000
T0 = 1_701_181_800 * 1_000_000_000  # 2023-11-28 14:30 UTC = 09:30 ET


def test_guide_check_8_selective_querying_triggers():
    with ScriptedChatServer(lambda body: "HOLD | 0.60 | wait") as server:
        adv, _ = _advisor(server)
        noon = 12 * 60
        triggers = []
        for i in range(12):
            snap = flat() if i < 8 else flat(position=1, avg_entry=16000.0)
            before = dict(adv.stats.triggers)
            adv.on_bar(i, T0 + i * MIN, 0.9, snap, noon, lambda i=i: _Market(T0 + i * MIN))
            new = {k: v - before.get(k, 0) for k, v in adv.stats.triggers.items() if v != before.get(k, 0)}
            triggers.append(next(iter(new), None))
        # flat and confident RL: every query_interval (5) bars; a position change asks at once
        assert triggers[:8] == ["flat", None, None, None, None, "flat", None, None]
        assert triggers[8] == "state_change" and triggers[9:] == [None, None, None]
        before = adv.stats.queries
        adv.on_bar(20, T0 + 20 * MIN, 0.3, flat(position=1, avg_entry=16000.0), noon, lambda: _Market(T0))
        assert adv.stats.queries == before + 1 and adv.stats.triggers.get("rl_uncertain") == 1
        adv.on_bar(
            30, T0 + 30 * MIN, 0.9, flat(), 3 * 60, lambda: _Market(T0)
        )  # flat at 03:00: not actionable
        assert adv.stats.queries == before + 1
        adv.stop()


def test_a_trigger_while_a_query_is_in_flight_is_skipped_and_counted():
    with ScriptedChatServer(lambda body: "BUY | 0.70 | x", delay_s=0.5) as server:
        adv, _ = _advisor(server, mode="async", query_interval=1)
        for i in range(4):
            adv.on_bar(i, T0 + i * MIN, 0.2, flat(), 600, lambda: _Market(T0))
        assert adv.stats.queries == 1 and adv.stats.skipped_busy == 3
        time.sleep(0.8)
        advice = adv.on_bar(4, T0 + 4 * MIN, 0.2, flat(), 600, lambda: _Market(T0))
        assert advice is not None and advice.action == Action.BUY and advice.age_bars == 0
        adv.stop()


# -- cache, decay, TTL ---------------------------------------------------------------------------
def test_cached_advice_decays_per_bar_and_expires_after_the_ttl():
    with ScriptedChatServer(lambda body: "BUY | 0.80 | momentum") as server:
        adv, _ = _advisor(server, query_interval=100, cache_ttl=300.0)
        snap = flat(position=1, avg_entry=16000.0)
        a0 = adv.on_bar(0, T0, 0.9, snap, 600, lambda: _Market(T0))
        a1 = adv.on_bar(1, T0 + MIN, 0.9, snap, 600, lambda: _Market(T0))
        a2 = adv.on_bar(2, T0 + 2 * MIN, 0.9, snap, 600, lambda: _Market(T0))
        assert (a0.confidence, a0.age_bars) == (0.8, 0)
        assert a1.confidence == pytest.approx(0.64) and a1.age_bars == 1
        assert a2.confidence == pytest.approx(0.512) and a2.stated_confidence == 0.8
        assert adv.on_bar(5, T0 + 5 * MIN, 0.9, snap, 600, lambda: _Market(T0)) is not None  # exactly 300 s
        assert adv.on_bar(6, T0 + 6 * MIN, 0.9, snap, 600, lambda: _Market(T0)) is None  # older than the TTL
        adv.stop()


# -- backends ------------------------------------------------------------------------------------
def test_prefix_cache_keeps_the_system_prompt_between_queries(llama):
    system = make_settings().prompts.system.format(market_name="NQ")
    llama.complete(system, "Price 16000.00. Best action?", 30.0)
    llama.complete(system, "Price 16001.25. Best action?", 30.0)
    assert llama.last_reused_tokens > 40
    cold = LlamaCppBackend(LLMModelConfig(), prefix_cache=False)
    cold.complete(system, "Price 16000.00. Best action?", 30.0)
    cold.complete(system, "Price 16001.25. Best action?", 30.0)
    assert cold.last_reused_tokens == 0
    cold.close()


def test_missing_or_corrupt_model_file_fails_at_start_naming_the_path(tmp_path):
    with pytest.raises(LLMError, match=r"LLM model file not found: .*nope\.gguf"):
        LlamaCppBackend(LLMModelConfig(path=tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not a model")
    with pytest.raises(LLMError, match=r"junk\.gguf is not a GGUF file"):
        LlamaCppBackend(LLMModelConfig(path=junk))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bundled_gguf().read_bytes()[:4096])
    with pytest.raises(LLMError, match=r"truncated\.gguf cannot be loaded by llama\.cpp"):
        LlamaCppBackend(LLMModelConfig(path=truncated))


def test_openai_backend_against_a_real_llama_cpp_server():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(bundled_gguf()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
            "--api_key",
            "s3cret-key",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer s3cret-key"}
                )
                urllib.request.urlopen(req, timeout=1).read()
                break
            except OSError:
                time.sleep(0.3)
        s = make_settings(
            advisor={
                "backend": "openai",
                "openai": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key": "s3cret-key"},
            }
        )
        backend = OpenAIBackend(s.advisor.openai, s.llm_model)
        assert "s3cret" not in repr(backend) and "s3cret" not in s.model_dump_json()
        reply = backend.complete(s.prompts.system.format(market_name="NQ"), "Price 16000. Best action?", 30.0)
        assert parse_answer(reply.text) is not None, reply.text  # the server applied our grammar
        wrong = OpenAIBackend(s.advisor.openai.model_copy(update={"api_key": None}), s.llm_model)
        with pytest.raises(LLMError, match="HTTP 401") as e:
            wrong.complete("s", "u", 10.0)
        assert "s3cret" not in str(e.value)
        backend.close()
        wrong.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_ensemble_votes_and_keeps_working_when_a_member_is_dead(llama):
    s = make_settings()
    dead = OpenAIBackend(
        s.advisor.openai.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1"}), s.llm_model
    )
    with ScriptedChatServer(lambda body: "SELL | 0.90 | lower highs") as server:
        http = OpenAIBackend(s.advisor.openai.model_copy(update={"base_url": server.base_url}), s.llm_model)
        ens = EnsembleBackend([(dead, 1.0), (http, 2.0)])
        reply = ens.complete("system", "user", 10.0)
        parsed = parse_answer(reply.text)
        assert parsed is not None and parsed.action == Action.SELL and parsed.confidence == pytest.approx(0.9)
        assert ens.failures == {"openai": 1}
        mixed = EnsembleBackend([(llama, 1.0), (http, 1.0)])
        assert parse_answer(
            mixed.complete(s.prompts.system.format(market_name="NQ"), "Best action?", 30.0).text
        )
        dead.close()
        http.close()


# -- replay modes and faults ---------------------------------------------------------------------
def _digest(db: Path, run_id: str) -> str:
    rows = q(db, f"SELECT {DECISION_COLUMNS} FROM decisions WHERE run_id=? ORDER BY bar_index", run_id)
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def test_recorded_mode_reproduces_a_sync_run_exactly_and_the_dataset_exports(tmp_path):
    first, _, db = replay(tmp_path, "j.sqlite")
    again, _, _ = replay(tmp_path, "j.sqlite", mode="recorded", recorded_journal=str(db))
    assert again.engine.advisor.stats.recorded_misses == 0
    assert _digest(db, first.run_id) == _digest(db, again.run_id)
    from trader.llm.dataset import export_dataset

    out = tmp_path / "ds.jsonl"
    n = export_dataset(db, out, first.run_id, horizon=5)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert n == len(lines) > 0
    assert lines[0]["messages"][0]["role"] == "system" and "hindsight_action" in lines[0]["outcome"]


def test_recorded_mode_with_a_missing_answer_is_an_error_or_a_counted_miss(tmp_path):
    first, _, db = replay(tmp_path, "j.sqlite")
    con = sqlite3.connect(db)
    con.execute("DELETE FROM llm_queries WHERE run_id=? AND query_id=2", (first.run_id,))
    con.commit()
    con.close()
    with pytest.raises(LLMError, match="no recorded answer"):
        replay(tmp_path, "j2.sqlite", mode="recorded", recorded_journal=str(db))
    _, stats, _ = replay(
        tmp_path, "j3.sqlite", mode="recorded", recorded_journal=str(db), on_recorded_miss="skip"
    )
    assert stats.status == "completed"


def test_async_replay_uses_an_answer_only_from_the_bar_after_its_latency(tmp_path):
    run, _, db = replay(tmp_path, "a.sqlite", mode="async")
    rows = q(
        db,
        "SELECT bar_index, available_bar, latency_ms FROM llm_queries WHERE run_id=? AND "
        "available_bar IS NOT NULL",
        run.run_id,
    )
    assert rows and all(avail >= bar + 1 for bar, avail, _ in rows)  # 1-minute bars, answers in < 60 s
    ages = q(db, "SELECT max(llm_age_bars) FROM decisions WHERE run_id=?", run.run_id)[0][0]
    assert ages is not None and ages >= 1


@pytest.mark.parametrize(
    "server_kw, advisor_kw, counter",
    [
        ({"answer": lambda body: "¯\\_(ツ)_/¯ maybe"}, {}, "unparseable"),
        ({"answer": lambda body: "BUY | 0.9 | late", "delay_s": 3.0}, {"query_timeout_s": 0.5}, "timeouts"),
        ({"answer": lambda body: "x", "status": 500}, {}, "errors"),
    ],
)
def test_garbage_slow_and_failing_backends_leave_the_bar_loop_running(
    tmp_path, server_kw, advisor_kw, counter
):
    with ScriptedChatServer(**server_kw) as server:
        run, stats, db = replay(
            tmp_path, "f.sqlite", backend="openai", openai={"base_url": server.base_url}, **advisor_kw
        )
    assert stats.status == "completed" and stats.bars == 980  # every bar decided, LLM or not
    st = run.engine.advisor.stats
    assert getattr(st, counter) >= 1 and st.answered == 0
    methods = {r[0] for r in q(db, "SELECT DISTINCT method FROM decisions WHERE run_id=?", run.run_id)}
    assert methods <= {"warmup", "rl_only"}
    errors = q(
        db,
        "SELECT count(*) FROM llm_queries WHERE run_id=? AND (error IS NOT NULL OR parsed_action IS NULL)",
        run.run_id,
    )[0][0]
    assert errors == st.queries


def test_a_dead_http_backend_leaves_the_bar_loop_running(tmp_path):
    run, stats, _ = replay(
        tmp_path, "d.sqlite", backend="openai", openai={"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    )
    assert (
        stats.status == "completed"
        and run.engine.advisor.stats.errors == run.engine.advisor.stats.queries > 0
    )


def test_the_model_process_fails_clearly_at_start_and_comes_back_after_dying(tmp_path):
    """llm_model.isolation = process: a broken model file is an LLMError naming it, with no child
    left behind; a child that dies is replaced by the next query."""
    import signal as sig

    from trader.config import load_settings as ls
    from trader.llm.backends import build_backend

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(LLMError, match=r"broken\.gguf"):
        build_backend(ls(None, {"llm_model": {"path": str(bad)}}))

    backend = build_backend(ls(None))
    try:
        assert type(backend).__name__ == "ProcessBackend"
        first = backend.complete("You advise a futures trader.", "Price 16000. Answer.", 30.0)
        assert first.text and first.action_probs is not None
        assert backend.pid is not None
        os.kill(backend.pid, sig.SIGKILL)  # the test plays the OOM killer
        end = time.monotonic() + 5
        while backend.alive and time.monotonic() < end:
            time.sleep(0.01)
        again = backend.complete("You advise a futures trader.", "Price 16001. Answer.", 30.0)
        assert again.text and backend.restarts == 1
    finally:
        backend.close()


# -- the entries schedule (advisor.schedule = "entries") ------------------------------------------
def _entries_advisor(
    server: ScriptedChatServer, mode: str = "async", timing: str = "bar", timeout_s: float = 2.0
) -> tuple[Advisor, list]:
    s = make_settings(
        advisor={
            "mode": mode,
            "schedule": "entries",
            "backend": "openai",
            "openai": {"base_url": server.base_url},
            "query_timeout_s": timeout_s,
        },
        fusion={"query_interval": 1},
    )
    rows: list = []
    adv = Advisor(
        s,
        OpenAIBackend(s.advisor.openai, s.llm_model),
        mode=mode,
        timing=timing,
        record=lambda row: rows.append(tuple(row.values)),
        run_id="test",
        clock=SessionClock(s.instrument),
    )
    adv.start()
    return adv, rows


# Columns of an llm_queries row (trader/journal/rows.py: llm_query)
_BAR, _TRIGGER, _PARSED, _ERROR, _AVAILABLE = 2, 4, 10, 18, 19


def test_entries_schedule_asks_only_on_entry_decisions_and_the_entry_bar_fuses_the_answer():
    with ScriptedChatServer(lambda body: "SELL | 0.80 | lower highs", delay_s=0.3) as server:
        adv, rows = _entries_advisor(server)
        entries = [False, True, False, False, True, False]
        advice = []
        for i, entry in enumerate(entries):
            advice.append(
                adv.on_bar(i, T0 + i * MIN, 0.2, flat(), 600, lambda: _Market(T0), entry_decision=entry)
            )
        adv.stop()
    assert adv.stats.queries == len(server.requests) == 2 and adv.stats.triggers == {"entry": 2}
    assert advice[0] is None  # not an entry, and the RL's low confidence asks nothing either
    first = advice[1]
    assert first is not None and first.action == Action.SELL and first.age_bars == 0  # on the entry bar
    assert advice[2] is not None and advice[2].age_bars == 1  # then the cache decays as usual
    assert [(r[_BAR], r[_TRIGGER], r[_PARSED], r[_AVAILABLE]) for r in rows] == [
        (1, "entry", "SELL", 1),
        (4, "entry", "SELL", 4),
    ]
    assert adv.stats.sim_wait_s >= 0.5  # the entry bars waited (simulated time, not latency)
    assert adv.stats.skipped_busy == 0


def test_an_entry_answer_later_than_the_query_timeout_is_abandoned_on_the_entry_bar():
    with ScriptedChatServer(lambda body: "BUY | 0.90 | late", delay_s=1.5) as server:
        adv, rows = _entries_advisor(server, timeout_s=0.4)
        t0 = time.perf_counter()
        advice = adv.on_bar(0, T0, 0.9, flat(), 600, lambda: _Market(T0), entry_decision=True)
        waited = time.perf_counter() - t0
        adv.stop(timeout_s=3.0)
    assert advice is None and adv.stats.timeouts == 1 and not adv.busy
    assert 0.3 <= waited < 1.2  # waited for the timeout, not for the answer
    assert rows[0][_ERROR].startswith("no answer within") and rows[0][_AVAILABLE] == 0


def test_entries_schedule_is_refused_where_the_bar_loop_must_not_wait():
    with (
        ScriptedChatServer() as server,
        pytest.raises(ConfigError, match=r"advisor\.schedule: 'entries'.*only replay"),
    ):
        _entries_advisor(server, timing="wall")


def _entries_replay(tmp_path: Path, name: str, **risk: object):
    s = make_settings(
        advisor={"mode": "async", "schedule": "entries"},
        data={"end": "2023-11-28T11:00:00"},
        risk=risk,
    )
    run = build_replay(s, tmp_path / name)
    stats = asyncio.run(run.engine.run())
    run.journal.finish_run(run.run_id, stats.status, stats.bars, 0, {})
    run.journal.close()
    return run, tmp_path / name


def test_entries_replay_asks_the_real_model_on_each_entry_and_fuses_its_answer_on_that_bar(tmp_path):
    run, db = _entries_replay(tmp_path, "e.sqlite", enable_risk_veto=False)
    asked = q(
        db,
        "SELECT l.bar_index, l.trigger, l.available_bar, l.parsed_action, d.rl_action, d.llm_action, "
        "d.llm_age_bars FROM llm_queries l JOIN decisions d USING (run_id, bar_index) WHERE run_id=? "
        "ORDER BY l.bar_index",
        run.run_id,
    )
    assert len(asked) == run.engine.advisor.stats.queries > 0
    for bar_index, trigger, available, parsed, rl_action, llm_action, age in asked:
        assert trigger == "entry" and available == bar_index  # usable on the bar that asked
        assert rl_action in (Action.BUY, Action.SELL)  # the RL proposed the entry
        assert parsed is not None and llm_action == Action[parsed] and age == 0  # fusion saw it
    # Every entry decision, and only those, was asked about: the RL's BUY or SELL while flat or
    # against the position (the row's position is the one decided on: paper orders fill at the next
    # bar's open). Inside the entry window with the guide's veto off, none is vetoed here.
    decided = q(
        db,
        "SELECT bar_index, rl_action, position FROM decisions WHERE run_id=? AND method != 'warmup'",
        run.run_id,
    )
    entry_bars = [
        i
        for i, a, pos in decided
        if a in (Action.BUY, Action.SELL) and (pos == 0 or (pos > 0) != (a == Action.BUY))
    ]
    assert [r[0] for r in asked] == entry_bars


def test_entries_schedule_does_not_ask_about_an_entry_the_risk_engine_vetoes(tmp_path):
    run, db = _entries_replay(tmp_path, "k.sqlite", kill_switch=True)
    proposed = q(
        db,
        "SELECT count(*) FROM decisions WHERE run_id=? AND method != 'warmup' AND rl_action IN (1, 2)",
        run.run_id,
    )[0][0]
    assert proposed > 0  # the RL did propose entries ...
    assert run.engine.advisor.stats.queries == 0  # ... but none could pass, so none was asked
    assert q(db, "SELECT count(*) FROM llm_queries WHERE run_id=?", run.run_id) == [(0,)]
