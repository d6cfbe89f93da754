"""Does the LLM help? ``trader compare``: the bootstrap against an independent oracle, its verdicts
on synthetic differences, and a real comparison on two sessions of the shared NQ data with LLM
answers recorded from the small GGUF (llama.cpp) and replayed to every LLM arm."""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest

from tests.conftest import NQ, flat, make_settings
from trader.domain import Action, Bar, Observed, Side
from trader.errors import ConfigError, DataError
from trader.policy.rules import BuyAndHold
from trader.replay import replay
from trader.research import stats
from trader.research.compare import ARMS, arm_settings, run_compare
from trader.research.stats import MIN_SESSIONS, bootstrap_mean_ci

NY = ZoneInfo("America/New_York")
START, END = "2023-11-30T13:00:00", "2023-12-01T11:00:00"  # two sessions: 11-30 afternoon, 12-01 morning
START_BALANCE = 50_000.0


# -- the bootstrap ------------------------------------------------------------------------------------------
def oracle_ci(x: list[float], resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """A slow pure-Python percentile bootstrap with the same resampling (one index at a time from
    one seeded stream) and numpy's linear quantile, written out."""
    rng = np.random.default_rng(seed)
    n = len(x)
    means = []
    for _ in range(resamples):
        total = 0.0
        for _ in range(n):
            total += x[int(rng.integers(0, n))]
        means.append(total / n)
    means.sort()

    def quantile(p: float) -> float:
        h = (resamples - 1) * p
        lo = math.floor(h)
        hi = min(lo + 1, resamples - 1)
        return means[lo] + (h - lo) * (means[hi] - means[lo])

    alpha = 1.0 - confidence
    return sum(x) / n, quantile(alpha / 2), quantile(1 - alpha / 2)


def test_the_vectorised_bootstrap_equals_a_pure_python_oracle():
    x = np.random.default_rng(3).normal(40.0, 300.0, size=11).round(2).tolist()
    ci = bootstrap_mean_ci(x, resamples=10_000, confidence=0.95, seed=11)
    mean, low, high = oracle_ci(x, 10_000, 0.95, 11)
    assert ci.mean == pytest.approx(mean, abs=1e-9)
    assert ci.low == pytest.approx(low, abs=1e-9)
    assert ci.high == pytest.approx(high, abs=1e-9)
    assert (ci.n, ci.resamples, ci.seed, ci.confidence) == (11, 10_000, 11, 0.95)


def test_the_bootstrap_does_not_depend_on_its_block_size(monkeypatch):
    x = np.random.default_rng(5).normal(0.0, 1.0, size=17)
    whole = bootstrap_mean_ci(x, resamples=2_000, seed=2)
    monkeypatch.setattr(stats, "BLOCK_CELLS", 17 * 3)  # three resamples per block
    blocked = bootstrap_mean_ci(x, resamples=2_000, seed=2)
    assert (blocked.low, blocked.high) == (whole.low, whole.high)


def test_a_clear_positive_shift_is_above_zero_and_a_negative_one_below():
    rng = np.random.default_rng(0)
    up = bootstrap_mean_ci(rng.normal(250.0, 100.0, size=30), seed=1)
    down = bootstrap_mean_ci(rng.normal(-250.0, 100.0, size=30), seed=1)
    assert up.low > 0 and not up.contains_zero and up.verdict == "above zero"
    assert down.high < 0 and down.verdict == "below zero"
    assert up.statement().endswith("above zero")


def test_zero_mean_noise_is_not_distinguishable_from_zero():
    d = np.random.default_rng(7).normal(0.0, 300.0, size=30)
    d -= d.mean()  # exactly zero mean: the interval must straddle 0
    ci = bootstrap_mean_ci(d, seed=4)
    assert ci.low < 0 < ci.high and ci.contains_zero
    assert ci.statement("rl_llm - rl_only per session").endswith("not distinguishable from zero")


def test_too_few_sessions_draw_no_conclusion_whatever_the_interval():
    ci = bootstrap_mean_ci([100.0, 120.0, 90.0], seed=0)
    assert ci.n < MIN_SESSIONS and not ci.contains_zero
    assert ci.verdict == "too few sessions"
    assert "too few sessions to tell" in ci.statement()
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_mean_ci([5.0])


# -- arms ---------------------------------------------------------------------------------------------------
def test_each_arm_is_the_base_config_with_its_overrides():
    base = make_settings(fusion={"llm_weight": 0.4, "strategy": "strategies.fusion:RegimeAwareFusion"})
    j = Path("/tmp/j.sqlite")
    rl = arm_settings(base, "rl_only", policy="p.onnx")
    llm = arm_settings(base, "rl_llm", policy="p.onnx", advisor_mode="recorded", recorded_journal=j)
    lo = arm_settings(base, "llm_only", policy="p.onnx", advisor_mode="recorded", recorded_journal=j)
    bh = arm_settings(base, "buy_and_hold", policy="p.onnx")
    ema = arm_settings(base, "ema_cross", policy="p.onnx", ema=(5, 30))
    assert rl.advisor.mode == "off" and str(rl.policy.path) == "p.onnx"
    assert llm.advisor.mode == "recorded" and llm.advisor.on_recorded_miss == "error"
    assert llm.fusion == base.fusion  # RL + LLM under the base config's fusion
    assert str(lo.policy.path) == "trader.policy.rules:Flat"
    assert (lo.fusion.strategy, lo.fusion.llm_weight, lo.advisor.schedule) == ("default", 1.0, "interval")
    assert str(bh.policy.path) == "trader.policy.rules:BuyAndHold" and bh.execution.stop_mode == "none"
    assert ema.policy.options == {"fast": 5, "slow": 30}
    with pytest.raises(ConfigError, match="needs the LLM"):
        arm_settings(base, "rl_llm", policy="p.onnx")


def test_buy_and_hold_buys_when_flat_inside_the_entry_window_and_holds_otherwise():
    s = make_settings()
    policy = BuyAndHold(s)
    legal = np.ones(6, dtype=bool)

    def act(minute: int, position: int = 0, mask: np.ndarray = legal) -> int:
        o = Observed(
            0, Bar(0, 1.0, 1.0, 1.0, 1.0, 1.0), minute, flat(position=position), np.zeros(1), mask, True, 0
        )
        return policy.act(o).action

    assert act(9 * 60 + 30) == Action.BUY
    assert act(15 * 60 + 44) == Action.BUY
    assert act(15 * 60 + 45) == Action.HOLD  # the entry window has ended
    assert act(9 * 60 + 29) == Action.HOLD
    assert act(11 * 60, position=1) == Action.HOLD  # holds what it has
    no_buy = legal.copy()
    no_buy[Action.BUY] = False
    assert act(11 * 60, mask=no_buy) == Action.HOLD


def oracle_ema(closes: np.ndarray, n: int) -> np.ndarray:
    """EMA written out: NaN until the n-th value, the SMA of the first n there, then k = 2/(n+1)."""
    out = np.full(len(closes), np.nan)
    if len(closes) >= n:
        out[n - 1] = closes[:n].mean()
        k = 2.0 / (n + 1)
        for t in range(n, len(closes)):
            out[t] = out[t - 1] + k * (closes[t] - out[t - 1])
    return out


@pytest.mark.parametrize(
    ("fast", "slow", "end"), [(5, 30, "2023-11-21T17:00:00"), (20, 50, "2023-11-22T12:00:00")]
)
def test_ema_cross_trades_exactly_the_crosses_of_an_ema_over_every_bar_warm_up_included(
    tmp_path, fast, slow, end
):
    """The rule's EMAs started cold at the first decided bar (it was not shown the warm-up bars)
    and counted the first bar where EMA(slow) exists as a cross: it missed crosses and traded
    where there was none. An EMA written out over every bar the engine took is the oracle."""
    s = make_settings(
        data={"paths": [str(NQ)], "end": end},
        policy={"path": "trader.policy.rules:EmaCross", "options": {"fast": fast, "slow": slow}},
    )
    out = replay(s, journal_path=tmp_path / "j.sqlite")
    got = rows(
        out.journal_path,
        "SELECT close, rl_action, position, method FROM decisions WHERE run_id=? ORDER BY bar_index",
        out.run_id,
    )
    closes = np.array([g[0] for g in got])
    diff = oracle_ema(closes, fast) - oracle_ema(closes, slow)
    side = np.sign(diff)
    decided = 0
    for t, (_, rl_action, position, method) in enumerate(got):
        if method == "warmup":
            continue
        decided += 1
        known = t > 0 and not np.isnan(diff[t]) and not np.isnan(diff[t - 1])
        want = Action.HOLD
        if known and side[t] > 0 and side[t - 1] <= 0 and position < s.risk.max_contracts:
            want = Action.BUY
        elif known and side[t] < 0 and side[t - 1] >= 0 and -position < s.risk.max_contracts:
            want = Action.SELL
        assert rl_action == want, f"bar {t}: {rl_action} != {want.name}"
    assert decided > 300 and len(got) > decided  # warm-up bars came first
    assert sum(1 for g in got if g[1] in (Action.BUY, Action.SELL)) >= 4


def test_the_cli_offers_the_arms_compare_runs():
    from trader.research import oos_cli

    assert oos_cli.ARMS == ARMS


def test_llm_arms_without_a_recording_or_record_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--record"):
        run_compare(make_settings(), data_paths=[NQ], out_dir=tmp_path, start=START, end=END)


# -- a real comparison ---------------------------------------------------------------------------------------
def base_settings():
    # The RL arms run the EMA-cross rule through the policy port (it trades a few times a session,
    # so the LLM is asked ~20 times in all); llm_weight 0.8 lets confident advice (>= 0.7) win.
    return make_settings(fusion={"query_interval": 120, "llm_weight": 0.8})


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = run_compare(
        base_settings(),
        data_paths=[NQ],
        start=START,
        end=END,
        policy="trader.policy.rules:EmaCross",
        out_dir=out / "first",
        record=True,
        run_id="first",
    )
    # again, from the recordings alone: nothing is asked, the same answers are replayed
    again = run_compare(
        base_settings(),
        data_paths=[NQ],
        start=START,
        end=END,
        policy="trader.policy.rules:EmaCross",
        out_dir=out / "again",
        llm_journal=result.llm_journal,
        run_id="again",
    )
    return result, again


def rows(journal: Path, sql: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(journal)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def session_of(ts_ns: int) -> str:
    """The session a bar belongs to, written out: sessions open at 18:00 New York time and are
    named by the day they end."""
    local = datetime.fromtimestamp(ts_ns / 1e9, NY)
    return (local + timedelta(hours=6)).date().isoformat()


@pytest.mark.slow
def test_every_arm_is_compared_on_the_same_sessions(compared):
    result, _ = compared
    assert list(result.arms) == list(ARMS)
    assert result.days == ["2023-11-30", "2023-12-01"]
    assert set(result.pnl) == set(ARMS) and all(len(v) == 2 for v in result.pnl.values())


@pytest.mark.slow
def test_each_arms_per_session_pnl_equals_its_own_journal(compared):
    result, _ = compared
    for arm, ar in result.arms.items():
        (seg,) = ar.segments
        decided = rows(
            result.journal,
            "SELECT ts_ns, equity_usd FROM decisions WHERE run_id=? AND method != 'warmup' "
            "ORDER BY bar_index",
            seg.run_id,
        )
        ends: dict[str, float] = {}
        for ts, equity in decided:
            ends[session_of(ts)] = equity  # the last bar of each session wins
        prev, expected = START_BALANCE, []
        for day in sorted(ends):
            expected.append(ends[day] - prev)
            prev = ends[day]
        assert sorted(ends) == result.days
        assert result.pnl[arm].tolist() == pytest.approx(expected, abs=1e-9), arm
        (report_json,) = rows(result.journal, "SELECT report_json FROM runs WHERE run_id=?", seg.run_id)[0]
        assert json.loads(report_json)["net_pnl"] == pytest.approx(result.pnl[arm].sum(), abs=0.005)


@pytest.mark.slow
def test_the_flat_arm_makes_nothing(compared):
    result, _ = compared
    assert result.pnl["flat"].tolist() == [0.0, 0.0]
    assert not result.arms["flat"].segments[0].trades


@pytest.mark.slow
def test_the_llm_arms_replay_exactly_the_recorded_answers(compared):
    result, _ = compared
    assert result.llm_journal is not None
    for arm in ("rl_llm", "llm_only"):
        (seg,) = result.arms[arm].segments
        (rec_id,) = result.arms[arm].recordings
        q = (
            "SELECT query_id, bar_index, prompt_hash, raw_answer FROM llm_queries WHERE run_id=? "
            "ORDER BY query_id"
        )
        recorded = rows(result.llm_journal, q, rec_id)
        replayed = rows(result.journal, q, seg.run_id)
        assert len(recorded) >= 3, f"{arm}: the LLM was asked {len(recorded)} times"
        assert all(r[3] for r in recorded), "every recorded query has a real answer"
        assert replayed == recorded, arm
        d = (
            "SELECT bar_index, llm_action, llm_conf, method, final_action FROM decisions WHERE run_id=? "
            "ORDER BY bar_index"
        )
        assert rows(result.journal, d, seg.run_id) == rows(result.llm_journal, d, rec_id)
        assert result.arms[arm].llm()["recorded_misses"] == 0
        assert result.arms[arm].recording_net_pnl == [seg.net_pnl]
    assert result.arms["rl_llm"].llm()["decisions_with_advice"] > 0
    assert result.arms["rl_only"].segments[0].llm == {"mode": "off"}  # RL only never heard the LLM


@pytest.mark.slow
def test_llm_only_takes_the_llms_action_at_or_above_the_threshold_and_holds_otherwise(compared):
    result, _ = compared
    (seg,) = result.arms["llm_only"].segments
    decided = rows(
        result.journal,
        "SELECT method, llm_action, llm_conf, fused_action FROM decisions "
        "WHERE run_id=? AND method != 'warmup'",
        seg.run_id,
    )
    s = base_settings().fusion
    took = 0
    for method, llm_action, llm_conf, fused in decided:
        if llm_action is None or method == "rl_only":  # no fresh advice, or advice the mask forbids
            assert fused == 0
        elif llm_conf >= s.confidence_threshold and llm_conf >= s.low_confidence:
            assert fused == llm_action
            took += llm_action != 0
        else:
            assert fused == 0, (method, llm_action, llm_conf)
    assert took >= 1, "the LLM-only arm acted on its advice at least once"


@pytest.mark.slow
def test_buy_and_hold_is_long_from_the_entry_window_to_the_flatten(compared):
    result, _ = compared
    (seg,) = result.arms["buy_and_hold"].segments
    assert seg.trades and all(t.side == Side.BUY for t in seg.trades)
    for t in seg.trades:
        entry = datetime.fromtimestamp(t.entry_ts_ns / 1e9, NY)
        assert (9, 30) <= (entry.hour, entry.minute) < (15, 46)
        assert t.exit_reason.startswith("flatten"), t.exit_reason  # no stop: only the flatten ends it


@pytest.mark.slow
def test_a_second_comparison_reuses_the_recordings_and_gives_the_same_pnl(compared):
    result, again = compared
    assert again.llm_journal == result.llm_journal
    for arm in ARMS:
        assert again.pnl[arm].tolist() == result.pnl[arm].tolist(), arm
    for arm in ("rl_llm", "llm_only"):
        assert again.arms[arm].recordings == result.arms[arm].recordings
        assert again.arms[arm].recording_net_pnl == []  # nothing recorded the second time
    runs = rows(result.llm_journal, "SELECT run_id, status FROM runs")
    assert sorted(runs) == sorted(
        (r, "completed") for a in ("rl_llm", "llm_only") for r in result.arms[a].recordings
    )


@pytest.mark.slow
def test_the_outputs_hold_the_per_session_pnl_the_differences_and_the_verdicts(compared):
    result, _ = compared
    summary = json.loads(result.files["summary"].read_text())
    assert [s["session"] for s in summary["sessions"]] == result.days
    for i, s in enumerate(summary["sessions"]):
        for arm in ARMS:
            assert s["pnl"][arm] == pytest.approx(result.pnl[arm][i], abs=0.005)
    diff = summary["difference_to_rl_only"]["rl_llm"]
    expect = (result.pnl["rl_llm"] - result.pnl["rl_only"]).mean()
    assert diff["mean_per_session"] == pytest.approx(expect, abs=0.005)
    assert diff["verdict"] == "too few sessions"  # two sessions: no conclusion drawn
    assert summary["bootstrap"]["resamples"] == 10_000
    df = pl.read_parquet(result.files["sessions"])
    assert df["session"].to_list() == result.days
    assert df["pnl_flat"].to_list() == [0.0, 0.0]
    page = result.files["plot"].read_text()
    assert "<script src=" not in page and "llm_only" in page  # plotly.js inline: no network needed


def test_walk_forward_windows_that_split_or_share_a_session_are_refused():
    """A hand-edited walkforward.json whose windows meet inside a session counted that session
    twice (six sessions of five) in the bootstrap."""
    from trader.research.compare import windows_from_walk_forward
    from trader.research.walkforward import index_data

    index = index_data(make_settings(data={"paths": [str(NQ)]}))

    def summary(*bounds: tuple[str, str | None]) -> dict:
        return {
            "windows": [
                {"window": k, "test_from": a, "test_to": b, "policy": "p.onnx"}
                for k, (a, b) in enumerate(bounds)
            ]
        }

    apart = windows_from_walk_forward(
        index, summary(("2023-11-27T18:00:00", "2023-11-29T18:00:00"), ("2023-11-29T18:00:00", None))
    )
    assert [w.index for w in apart] == [0, 1]
    for bounds in (
        (("2023-11-27T18:00:00", "2023-11-29T12:00:00"), ("2023-11-29T12:00:00", None)),  # split
        (("2023-11-27T18:00:00", "2023-11-30T12:00:00"), ("2023-11-29T18:00:00", None)),  # overlap
    ):
        with pytest.raises(DataError, match=r"overlap or share a session"):
            windows_from_walk_forward(index, summary(*bounds))
