"""Training: the environment is the engine (parity with replay), MaskablePPO trains and exports a
policy the daemon serves (torch vs onnxruntime parity), and held-out evaluation runs the baselines."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import NQ, ROOT, make_settings
from trader.config import BUNDLED_POLICY
from trader.features.layout import build_layout
from trader.journal import Journal
from trader.policy import OnnxPolicy, PolicyError
from trader.train.env import RewardConfig, TradingEnv
from trader.train.evaluate import evaluate
from trader.train.ppo import ExportError, TrainConfig, export_onnx, train
from trader.wiring import build_replay

FIRST_SESSION_END = "2023-11-28T17:00:00"  # bundled slice: warm-up ends ~10:00, then one session
ACCOUNT_COLS = "bar_index, ts_ns, close, final_action, position, balance_usd, equity_usd, threshold_usd"


class SpyPolicy:
    """The real ONNX policy behind the policy port (a Python policy by dotted path), recording
    what it was shown and what it chose."""

    name = "spy"
    last: SpyPolicy | None = None

    def __init__(self, settings, onnx: str) -> None:
        layout = build_layout(settings.features.use_llm_features, ())
        self.inner = OnnxPolicy(onnx, layout)
        self.seen: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        SpyPolicy.last = self

    def act(self, o):
        choice = self.inner.act(o)
        if o.ready:
            self.seen[o.bar_index] = (o.obs.copy(), o.mask.copy(), choice.action)
        return choice


def test_environment_reproduces_replay_observations_and_account_states(tmp_path):
    s = make_settings(
        data={"end": FIRST_SESSION_END},
        policy={
            "path": "tests.integration.test_training:SpyPolicy",
            "options": {"onnx": str(BUNDLED_POLICY)},
        },
    )
    run = build_replay(s, tmp_path / "replay.sqlite")
    asyncio.run(run.engine.run())
    run.journal.close()
    spy = SpyPolicy.last
    assert spy is not None
    assert len(spy.seen) > 300

    journal = Journal(tmp_path / "env.sqlite")
    env = TradingEnv(s, journal=journal, shuffle=False)
    assert env.n_episodes == 1
    obs, info = env.reset(seed=0)
    steps, done = 0, False
    while not done:
        i = info["bar_index"]
        seen_obs, seen_mask, a = spy.seen[i]
        assert np.array_equal(obs, seen_obs), f"observation differs at bar {i}"
        assert np.array_equal(env.action_masks(), seen_mask), f"mask differs at bar {i}"
        obs, _, done, _, info = env.step(a)
        steps += 1
    journal.close()
    assert steps > 300

    def rows(db: Path, run_id: str) -> list[tuple]:
        con = sqlite3.connect(db)
        q = f"SELECT {ACCOUNT_COLS} FROM decisions WHERE run_id=? AND bar_index >= 960 ORDER BY bar_index"
        out = con.execute(q, (run_id,)).fetchall()
        con.close()
        return out

    def fills(db: Path, run_id: str) -> list[tuple]:
        con = sqlite3.connect(db)
        out = con.execute(
            "SELECT ts_ns, side, qty, price, commission_usd, purpose FROM fills WHERE run_id=? ORDER BY seq",
            (run_id,),
        ).fetchall()
        con.close()
        return out

    replayed = rows(tmp_path / "replay.sqlite", run.run_id)
    trained = rows(tmp_path / "env.sqlite", env.run_id)
    assert len(replayed) == len(trained) == 420  # 10:00 .. 16:59
    assert replayed == trained
    assert fills(tmp_path / "replay.sqlite", run.run_id) == fills(tmp_path / "env.sqlite", env.run_id)
    assert len(fills(tmp_path / "env.sqlite", env.run_id)) > 0


def test_reward_is_the_equity_change_net_of_costs_minus_the_drawdown_penalty():
    s = make_settings()
    rng = np.random.default_rng(3)
    totals = {}
    for penalty in (0.0, 1.0):
        env = TradingEnv(s, reward=RewardConfig(scale_usd=100.0, drawdown_penalty=penalty), shuffle=False)
        _, info = env.reset(seed=0, options={"episode": 1})
        start, total, done, steps = info["equity"], 0.0, False, 0
        while not done:
            legal = np.flatnonzero(env.action_masks())
            minute = (env.clock.local_s(info["ts_ns"]) // 60) % 1440
            assert env.engine.portfolio.position != 0 or env.clock.in_entry_window(minute)
            _, r, done, _, info = env.step(int(rng.choice(legal)))
            total += r
            steps += 1
        totals[penalty] = (total, (info["equity"] - start) / 100.0, env.engine.portfolio.trades)
        rng = np.random.default_rng(3)  # same actions for the second pass
    total0, change0, trades = totals[0.0]
    assert total0 == pytest.approx(change0, abs=1e-9)  # every fee and slippage is in the equity
    assert len(trades) > 3 and all(t.pnl_usd != 0 for t in trades)
    assert totals[1.0][0] < total0  # drawdown costs extra


def test_illegal_actions_are_hold_and_the_episode_ends_at_the_session_end():
    env = TradingEnv(make_settings(), shuffle=False)
    obs, info = env.reset(seed=0, options={"episode": 0})
    assert obs.shape == (261,) and obs.dtype == np.float32
    assert not env.action_masks()[3]  # MOVE_TO_BE while flat
    _, _, _, _, info2 = env.step(3)
    assert info2["position"] == 0 and env.engine.stats.actions[0] == 1
    done = False
    while not done:
        _, _, done, _, info = env.step(0)
    assert env.engine.last_bar.ts_ns == info["ts_ns"]
    last = env.bars.ts_ns[env.sessions[0][1] - 1]
    assert info["ts_ns"] == last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real training run through the script, as CI can afford (a few thousand steps)."""
    d = tmp_path_factory.mktemp("train")
    args = ["--timesteps", "3072", "--n-steps", "1024", "--batch-size", "128", "--epochs", "3"]
    args += ["--checkpoint-every", "2048", "--data", str(NQ), "--quiet"]
    outs = []
    for k in (1, 2):  # twice: same seed, same policy
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "train_policy"),
                *args,
                "--out",
                str(d / f"p{k}.onnx"),
                "--run-dir",
                str(d / f"run{k}"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    return d, outs


def test_training_writes_logs_checkpoints_and_an_onnx_policy_with_its_provenance(trained):
    d, outs = trained
    assert "export check: probabilities max abs diff" in outs[0]
    assert "held-out 2023-11-27T18:00:00-05:00" in outs[0] and "ema_cross" in outs[0]
    ev = json.loads((d / "run1" / "evaluation.json").read_text())
    assert set(ev["results"]) == {"policy", "flat", "buy_and_hold", "ema_cross"}
    log = (d / "run1" / "progress.csv").read_text().splitlines()
    header = log[0].split(",")
    for col in ("rollout/ep_rew_mean", "train/entropy_loss", "train/explained_variance"):
        assert col in header
    assert len(log) >= 4  # one row per update
    assert sorted(p.name for p in (d / "run1" / "checkpoints").iterdir())[0].startswith("ppo_")
    sess = ort.InferenceSession(str(d / "p1.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    outs_ = {o.name: o for o in sess.get_outputs()}
    assert ins["obs"].shape[1] == 261 and ins["action_mask"].shape[1] == 6
    assert isinstance(ins["obs"].shape[0], str)  # dynamic batch
    assert outs_["probs"].shape[1] == 6 and outs_["value"].shape[1] == 1
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    for key in ("layout_hash", "feature_names", "action_names", "train_range", "timesteps", "seed", "opset"):
        assert key in meta
    assert json.loads(meta["export_check"])["probs_max_abs_diff"] <= 1e-5
    assert meta["package_version"] and meta["git_revision"]
    assert json.loads(meta["timesteps"]) == 3072 and json.loads(meta["seed"]) == 7
    assert json.loads(meta["data_files"]) == {NQ.name: hashlib.sha256(NQ.read_bytes()).hexdigest()}
    assert len(json.loads(meta["feature_names"])) == 261
    assert meta["train_range"] == "2023-11-19T18:00:00 .. 2023-11-27T18:00:00"
    obs = np.random.default_rng(0).normal(size=(5, 261)).astype(np.float32)
    mask = np.ones((5, 6), dtype=bool)
    mask[:, 3:] = False
    p, v = sess.run(["probs", "value"], {"obs": obs, "action_mask": mask})
    assert p.shape == (5, 6) and v.shape == (5, 1)
    assert np.allclose(p.sum(1), 1.0, atol=1e-6) and (p[:, 3:] == 0).all()


def test_the_same_seed_trains_the_same_policy(trained):
    d, _ = trained
    obs = np.random.default_rng(1).normal(size=(64, 261)).astype(np.float32)
    mask = np.ones((64, 6), dtype=bool)
    res = []
    for k in (1, 2):
        sess = ort.InferenceSession(str(d / f"p{k}.onnx"), providers=["CPUExecutionProvider"])
        res.append(sess.run(["probs"], {"obs": obs, "action_mask": mask})[0])
    assert np.array_equal(res[0], res[1])


def test_the_daemon_serves_the_trained_policy(trained, tmp_path):
    d, _ = trained
    s = make_settings(policy={"path": str(d / "p1.onnx")}, data={"end": FIRST_SESSION_END})
    run = build_replay(s, tmp_path / "j.sqlite")
    stats = asyncio.run(run.engine.run())
    run.journal.close()
    assert stats.status == "completed" and stats.bars == 1380
    con = sqlite3.connect(tmp_path / "j.sqlite")
    n = con.execute("SELECT count(DISTINCT rl_action) FROM decisions WHERE bar_index >= 960").fetchone()[0]
    assert n >= 1


def test_a_policy_trained_on_228_features_is_refused_by_a_261_feature_config(tmp_path):
    s = make_settings(features={"use_llm_features": False})
    cfg = TrainConfig(timesteps=256, n_steps=256, batch_size=64, n_epochs=1, checkpoint_every=0)
    model, env, sample = train(s, cfg, tmp_path / "run", [NQ])
    assert env.layout.dim == 228
    out = tmp_path / "p228.onnx"
    export_onnx(model, env.layout, out, sample, {"timesteps": 256})
    assert OnnxPolicy(out, build_layout(False)).info.metadata["layout_dim"] == "228"
    with pytest.raises(PolicyError, match=r"trained on 228 features.*configured layout has 261"):
        OnnxPolicy(out, build_layout(True))
    s228 = make_settings(
        features={"use_llm_features": False}, policy={"path": str(out)}, data={"end": FIRST_SESSION_END}
    )
    run = build_replay(s228, tmp_path / "j.sqlite")  # and a 228-feature config serves it
    assert asyncio.run(run.engine.run()).status == "completed"
    run.journal.close()

    import trader.train.ppo as ppo

    tight = tmp_path / "tight.onnx"
    old = ppo.EXPORT_TOLERANCE
    ppo.EXPORT_TOLERANCE = 0.0  # float32 graph vs torch never agree to the last bit on every input
    try:
        with pytest.raises(ExportError, match="max abs diff"):
            export_onnx(model, env.layout, tight, sample, {})
    finally:
        ppo.EXPORT_TOLERANCE = old
    assert not tight.exists() and not tight.with_suffix(".tmp.onnx").exists()


def test_held_out_evaluation_runs_the_policy_and_baselines_on_the_same_bars():
    s = make_settings()
    ev = evaluate(s, s.policy.path, [NQ], "2023-11-29T18:00:00", "2023-12-01T17:00:00")
    r = ev["results"]
    assert list(r) == ["policy", "flat", "buy_and_hold", "ema_cross"]
    assert ev["from"].startswith("2023-11-29T18:00") and ev["bars"] == 2 * 1380
    assert r["flat"]["net_pnl"] == 0 and r["flat"]["trades"] == 0 and r["flat"]["max_drawdown"] == 0
    assert r["ema_cross"]["trades"] > 0 and r["buy_and_hold"]["trades"] == 1
    for name in r:
        assert r[name]["sessions"] == 2
    # buy-and-hold by hand: first close + 1 tick in, last close - 1 tick out, $2.25 a side, $20/pt
    import polars as pl

    df = pl.read_csv(NQ).filter(
        (pl.col("timestamp") >= "2023-11-29 18:00:00") & (pl.col("timestamp") < "2023-12-01 17:00:00")
    )
    c = df["close"].to_numpy()
    expected = ((c[-1] - 0.25) - (c[0] + 0.25)) * 20.0 - 4.5
    assert r["buy_and_hold"]["net_pnl"] == pytest.approx(expected)
