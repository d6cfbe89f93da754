"""Replay evaluates the policy for stretches of coming bars in one onnxruntime call: every
decision, probability, order, fill and trade is what bar-by-bar evaluation gives."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from tests.conftest import NQ, make_settings, write_policy
from trader.domain import PolicyChoice
from trader.features.layout import build_layout
from trader.journal import DECISION_COLUMNS
from trader.policy import OnnxPolicy, metadata_for
from trader.wiring import build_replay

L261 = build_layout(True)
RUN_ID = "0123456789abcdef0123456789abcdef"  # the same in both runs: same client ids
TABLES = {
    "decisions": f"SELECT {DECISION_COLUMNS} FROM decisions ORDER BY bar_index",
    "orders": "SELECT * FROM orders ORDER BY client_id",
    "fills": "SELECT * FROM fills ORDER BY seq",
    "trades": "SELECT * FROM trades ORDER BY seq",
    "account": "SELECT * FROM account ORDER BY rowid",
}


def _replay(tmp_path: Path, name: str, **overrides):
    overrides.setdefault("data", {"paths": [str(NQ)]})
    settings = make_settings(**overrides)
    run = build_replay(settings, tmp_path / f"{name}.sqlite", run_id=RUN_ID)

    async def go():
        stats = await run.engine.run()
        await run.engine.close()
        return stats

    stats = asyncio.run(go())
    run.journal.close()
    con = sqlite3.connect(tmp_path / f"{name}.sqlite")
    try:
        tables = {t: con.execute(sql).fetchall() for t, sql in TABLES.items()}
    finally:
        con.close()
    return run.engine, stats, tables


def _account_sensitive_policy(path: Path) -> Path:
    """A policy that trades on 5-minute momentum, exits on its position side, and whose every
    probability moves with every account and risk-context feature: each fill changes its answers."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, L261.dim)) * 0.01
    for c in (
        *range(L261.account.start, L261.account.stop),
        *range(L261.risk_context.start, L261.risk_context.stop),
    ):
        w[:, c] = rng.normal(size=6)
    mom, side = L261.index("ret_5m_pct"), L261.index("pos_side")
    w[1, mom], w[2, mom] = 100.0, -100.0
    w[2, side], w[1, side] = 4.0, -4.0
    w[0, L261.index("acct_daily_trades")] = 2.0
    return write_policy(path, L261, weights=w, bias=[2.0, 0, 0, 0, 0, 0])


def _assert_same_run(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> None:
    for table in TABLES:
        assert len(a[table]) == len(b[table]), table
        for k, (x, y) in enumerate(zip(a[table], b[table], strict=True)):
            assert x == y, f"{table} row {k} differs:\n batch    {x}\n per bar  {y}"


def test_batch_evaluation_decides_every_bar_of_the_shared_data_as_per_bar_evaluation(tmp_path):
    batch, b_stats, b = _replay(tmp_path, "batch")
    per_bar, p_stats, p = _replay(tmp_path, "per_bar", policy={"batch_bars": 0})
    assert per_bar.look_ahead is None and batch.look_ahead is not None
    ahead = batch.look_ahead
    assert b_stats.bars == p_stats.bars == len(b["decisions"]) > 14_000
    assert b["fills"], "the replay should trade"
    _assert_same_run(b, p)
    decided = sum(r[14] != "warmup" for r in b["decisions"])  # warm-up bars ask no policy
    assert ahead.answered == decided > 13_000
    assert ahead.evaluations < decided / 10  # most bars were answered from a batch


def test_an_account_sensitive_policy_is_re_evaluated_where_the_account_changes(tmp_path):
    policy = str(_account_sensitive_policy(tmp_path / "acct.onnx"))
    overrides = {"risk": {"enable_risk_veto": False}}
    batch, _, b = _replay(tmp_path, "batch", policy={"path": policy}, **overrides)
    _, _, p = _replay(tmp_path, "per_bar", policy={"path": policy, "batch_bars": 0}, **overrides)
    _assert_same_run(b, p)
    assert len(b["fills"]) > 100
    ahead = batch.look_ahead
    assert ahead is not None and ahead.reevaluations > 20  # stretches cut short by fills
    # the account part moved the probabilities: flat bars before and after a trade differ
    flat_probs = {r[3:9] for r in b["decisions"] if r[14] == "rl_only" and r[20] == 0}
    assert len(flat_probs) > 1000


@pytest.mark.parametrize("batch_bars", [1, 4])
def test_short_stretches_change_nothing_either(tmp_path, batch_bars):
    policy = str(_account_sensitive_policy(tmp_path / "acct.onnx"))
    overrides = {
        "risk": {"enable_risk_veto": False},
        "data": {"paths": [str(NQ)], "end": "2023-11-24T00:00:00"},
    }
    batch, _, b = _replay(tmp_path, "batch", policy={"path": policy, "batch_bars": batch_bars}, **overrides)
    _, _, p = _replay(tmp_path, "per_bar", policy={"path": policy, "batch_bars": 0}, **overrides)
    _assert_same_run(b, p)
    assert batch.look_ahead is not None and batch.look_ahead.evaluations > 0


def _identity_policy(path: Path, output_kind: str) -> Path:
    """A real ONNX graph whose output is the first six features as given: the daemon's own
    post-processing (mask, normalisation, argmax) sees exactly the values a test chooses."""
    nodes = [
        helper.make_node(
            "Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [0])
        ),
        helper.make_node(
            "Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [6])
        ),
        helper.make_node(
            "Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])
        ),
        helper.make_node("Slice", ["obs", "starts", "ends", "axes"], ["sliced"]),
        helper.make_node("Identity", ["sliced"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "identity",
        [
            helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["N", L261.dim]),
            helper.make_tensor_value_info("action_mask", TensorProto.BOOL, ["N", 6]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in metadata_for(L261, output_kind=output_kind).items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


_VALUES = st.one_of(
    st.sampled_from(
        [0.0, -0.0, 1.0, 0.5, 0.25, 1e-45, 1e-38, -1.0, 3.4e38, float("nan"), float("inf"), -float("inf")]
    ),
    st.floats(-10.0, 10.0, width=32),
    st.floats(0.0, 1.0, width=32),
)


def _rows(min_size: int, max_size: int) -> st.SearchStrategy:
    row = st.tuples(
        st.lists(_VALUES, min_size=6, max_size=6), st.lists(st.booleans(), min_size=6, max_size=6)
    )
    return st.lists(row, min_size=min_size, max_size=max_size)


@pytest.fixture(scope="module")
def identity_policies(tmp_path_factory):
    d = tmp_path_factory.mktemp("identity")
    return {k: OnnxPolicy(_identity_policy(d / f"{k}.onnx", k), L261, "cpu") for k in ("probs", "logits")}


@settings(max_examples=150, deadline=None)
@given(
    rows=st.one_of(_rows(1, 15), _rows(16, 64)),  # small batches in plain Python, larger in numpy
    kind=st.sampled_from(["probs", "logits"]),
)
def test_a_batch_answers_each_row_as_act_on_does_whatever_the_graph_outputs(identity_policies, rows, kind):
    """Masked, zero, negative, tiny, huge, non-finite outputs, rows summing to exactly 1 or not:
    the batch's choices equal the single-row path's, probabilities bit for bit."""
    policy = identity_policies[kind]
    obs = np.zeros((len(rows), L261.dim), dtype=np.float32)
    masks = np.zeros((len(rows), 6), dtype=bool)
    for k, (values, legal) in enumerate(rows):
        obs[k, :6] = values
        masks[k] = legal
        masks[k, 0] = True  # HOLD is always legal
    together = policy.act_batch(obs, masks)
    alone = [policy.act_on(obs[k], masks[k]) for k in range(len(rows))]
    assert len(together) == len(alone)
    for t, a in zip(together, alone, strict=True):
        assert isinstance(t, PolicyChoice)
        assert (t.action, t.problem) == (a.action, a.problem)
        assert np.array_equal(np.float64(t.probs).view(np.uint64), np.float64(a.probs).view(np.uint64))
        assert np.float64(t.confidence).view(np.uint64) == np.float64(a.confidence).view(np.uint64)


def test_the_bundled_policy_answers_batches_bit_for_bit():
    from trader.config import BUNDLED_POLICY

    policy = OnnxPolicy(BUNDLED_POLICY, L261, "cpu")
    assert policy.batch_exact(256)
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(100, L261.dim)).astype(np.float32)
    masks = rng.random((100, 6)) < 0.5
    masks[:, 0] = True
    assert policy.act_batch(obs, masks) == [policy.act_on(obs[k], masks[k]) for k in range(100)]


class BatchRefusingPolicy:
    """A plug-in that offers batches but says they are not exact: the replay must not use them."""

    name = "refuses-batches"

    def __init__(self, settings: object, **options: object) -> None:
        self.asked: list[int] = []

    def act(self, o):
        return PolicyChoice(0, 1.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])

    def act_batch(self, obs, masks):
        raise AssertionError("a batch was used although batch_exact said no")

    def batch_exact(self, max_rows: int) -> bool:
        self.asked.append(max_rows)
        return False


def test_a_plugin_whose_batches_are_not_exact_acts_bar_by_bar(tmp_path):
    overrides = {"data": {"paths": [str(NQ)], "end": "2023-11-22T00:00:00"}}
    engine, stats, _ = _replay(
        tmp_path,
        "plugin",
        policy={"path": "tests.integration.test_batch_policy:BatchRefusingPolicy"},
        **overrides,
    )
    assert engine.policy.asked == [256]  # asked once
    assert engine.look_ahead is not None and engine.look_ahead.evaluations == 0
    assert engine.look_ahead.answered == stats.bars - 960 > 0


def test_a_plugin_without_batches_acts_bar_by_bar(tmp_path):
    engine, stats, _ = _replay(
        tmp_path,
        "rules",
        policy={"path": "tests.integration.test_policy:TuplePolicy"},
        data={"paths": [str(NQ)], "end": "2023-11-22T00:00:00"},
    )
    assert engine.look_ahead is None
    assert engine.policy.n == stats.bars - 960 > 0


def test_live_features_act_bar_by_bar():
    from trader.config import BUNDLED_POLICY
    from trader.features.observation import IncrementalFeatures
    from trader.policy.batch import look_ahead

    settings = make_settings()
    policy = OnnxPolicy(BUNDLED_POLICY, L261, "cpu")
    assert look_ahead(policy, IncrementalFeatures(settings), 256) is None  # nothing known ahead


def test_a_policy_exported_with_a_fixed_batch_of_one_replays_bar_by_bar(tmp_path):
    """Third-party exporters often fix the batch axis at 1: such a model cannot take a stretch of
    bars in one call, so the replay asks it bar by bar instead of failing on its first ready bar."""
    path = write_policy(tmp_path / "fixed.onnx", L261)
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    onnx.save(model, str(path))
    overrides = {"data": {"paths": [str(NQ)], "end": "2023-11-23T00:00:00"}}
    batch, b_stats, b = _replay(tmp_path, "batch", policy={"path": str(path)}, **overrides)
    _, _, p = _replay(tmp_path, "per_bar", policy={"path": str(path), "batch_bars": 0}, **overrides)
    _assert_same_run(b, p)
    assert b_stats.status == "completed" and b_stats.bars > 2000
    assert batch.look_ahead is None or batch.look_ahead.evaluations == 0  # no batch was ever run
