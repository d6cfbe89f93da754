"""The ONNX policy through real onnxruntime: contract checks, layout refusal, masking."""

from __future__ import annotations

import asyncio
import sqlite3

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.conftest import make_settings, write_policy
from trader.config import BUNDLED_POLICY
from trader.domain import Action, PolicyChoice
from trader.features.layout import build_layout
from trader.policy import OnnxPolicy, PolicyError

L261 = build_layout(True)
L228 = build_layout(False)


def test_bundled_policy_loads_on_cpu_and_acts():
    p = OnnxPolicy(BUNDLED_POLICY, L261, "auto")
    assert p.info.provider == "CPUExecutionProvider" and p.info.layout_hash == L261.hash
    a, conf, probs, _ = p.act_on(np.zeros(261, np.float32), np.ones(6, bool))
    assert 0 <= a < 6 and conf == max(probs) and abs(sum(probs) - 1) < 1e-6


def test_a_policy_for_another_layout_hash_is_refused(tmp_path):
    path = write_policy(tmp_path / "p.onnx", L261, layout_hash="deadbeefdeadbeef")
    with pytest.raises(PolicyError, match="layout hash deadbeefdeadbeef differs"):
        OnnxPolicy(path, L261)


def test_a_228_feature_policy_is_refused_by_a_261_feature_config(tmp_path):
    path = write_policy(tmp_path / "p228.onnx", L228)
    with pytest.raises(
        PolicyError, match=r"trained on 228 features.*configured layout has 261.*use_llm_features"
    ):
        OnnxPolicy(path, L261)
    assert OnnxPolicy(path, L228).info.layout_hash == L228.hash


def test_missing_metadata_inputs_or_file_are_named(tmp_path):
    with pytest.raises(PolicyError, match="no layout_hash"):
        OnnxPolicy(write_policy(tmp_path / "a.onnx", L261, layout_hash=""), L261)
    with pytest.raises(PolicyError, match="missing input 'obs'"):
        OnnxPolicy(write_policy(tmp_path / "b.onnx", L261, input_names=("x", "action_mask")), L261)
    with pytest.raises(PolicyError, match="not found"):
        OnnxPolicy(tmp_path / "none.onnx", L261)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(PolicyError, match="not a loadable ONNX model"):
        OnnxPolicy(junk, L261)


def test_cuda_provider_is_used_when_present_and_refused_clearly_when_not():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert OnnxPolicy(BUNDLED_POLICY, L261, "cuda").info.provider == "CUDAExecutionProvider"
    else:
        with pytest.raises(PolicyError, match="no CUDAExecutionProvider"):
            OnnxPolicy(BUNDLED_POLICY, L261, "cuda")


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_masked_actions_get_zero_probability_even_if_the_graph_does_not_mask(tmp_path, kind):
    # The graph strongly prefers MOVE_TO_BE and does not mask: the daemon must still never pick it.
    path = write_policy(
        tmp_path / f"{kind}.onnx", L261, bias=[0, 0, 0, 50, 0, 0], output_kind=kind, mask_in_graph=False
    )
    p = OnnxPolicy(path, L261)
    mask = np.array([True, True, True, False, False, False])
    a, _, probs, _ = p.act_on(np.zeros(261, np.float32), mask)
    assert a != Action.MOVE_TO_BE and probs[3] == probs[4] == probs[5] == 0.0
    assert abs(sum(probs) - 1.0) < 1e-9
    a, _, _, _ = p.act_on(np.zeros(261, np.float32), np.ones(6, bool))
    assert a == Action.MOVE_TO_BE


class NanPolicy:
    """A plug-in policy (``module:attr``) whose answer is NaN from bar 300 on."""

    name = "nan-plugin"

    def __init__(self, settings: object, **options: object) -> None:
        self.n = 0

    def act(self, o: object) -> PolicyChoice:
        self.n += 1
        if self.n < 300:
            return PolicyChoice(1, 0.9, [0.05, 0.9, 0.05, 0.0, 0.0, 0.0])
        return PolicyChoice(1, float("nan"), [float("nan")] * 6)


def _replay_decisions(tmp_path, policy_path: str) -> tuple[list[tuple[str, str, int]], int, list[dict]]:
    from trader.wiring import build_replay

    s = make_settings(policy={"path": policy_path})
    run = build_replay(s, tmp_path / "j.sqlite")
    with capture_logs() as logs:
        asyncio.run(run.engine.run())
        asyncio.run(run.engine.close())
    run.journal.close()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    rows = con.execute("SELECT method, reasons, final_action FROM decisions ORDER BY bar_index").fetchall()
    con.close()
    warnings = [e for e in logs if e["event"] == "policy_output_invalid_bars_hold"]
    return rows, run.engine.stats.policy_invalid, warnings


@pytest.mark.parametrize("kind", ["onnx_probs", "onnx_logits", "plugin"])
def test_a_policy_output_that_is_nan_holds_with_the_reason_journaled_and_one_warning(tmp_path, kind):
    if kind == "plugin":
        path = "tests.integration.test_policy:NanPolicy"
    else:
        out = kind.removeprefix("onnx_")
        path = str(
            write_policy(tmp_path / "nan.onnx", L261, bias=[float("nan"), 0, 0, 0, 0, 0], output_kind=out)
        )
    rows, invalid, warnings = _replay_decisions(tmp_path, path)
    bad = [r for r in rows if r[0] == "policy_invalid"]
    assert bad and invalid == len(bad)
    assert all(r[2] == Action.HOLD for r in bad)  # decided as HOLD, never a guess
    assert all(("not finite" in r[1]) if kind != "plugin" else ("unusable" in r[1]) for r in bad)
    assert len(warnings) == 1  # once per run, not once per bar


def test_a_policy_trained_for_another_market_is_refused_or_warned_about(tmp_path):
    """Metadata naming another symbol, tick size or bar interval: its features and stops would
    mean something else here, so it is refused naming both values, unless the config allows it."""
    from trader.policy import build_policy

    other = write_policy(
        tmp_path / "es.onnx", L261, extra_meta={"symbol": "ES", "tick_size": "0.25", "bar_seconds": "300"}
    )
    s = make_settings(policy={"path": str(other)})
    with pytest.raises(PolicyError) as err:
        build_policy(s, L261)
    msg = str(err.value)
    assert "symbol ES (config instrument.symbol = NQ)" in msg
    assert "bar_seconds 300 (config data.bar_seconds = 60)" in msg and "tick_size" not in msg
    with capture_logs() as logs:
        build_policy(make_settings(policy={"path": str(other), "allow_other_market": True}), L261)
    assert any(e["event"] == "policy_trained_for_another_market" for e in logs)
    same = write_policy(
        tmp_path / "nq.onnx", L261, extra_meta={"symbol": "NQ", "tick_size": "0.25", "bar_seconds": "60"}
    )
    assert build_policy(make_settings(policy={"path": str(same)}), L261).name == "onnx"


class TuplePolicy:
    """A plug-in that answers with a plain tuple and an ``Action`` (an IntEnum), as older ones do."""

    name = "tuple-plugin"

    def __init__(self, settings: object, **options: object) -> None:
        self.n = 0

    def act(self, o: object) -> tuple[Action, float, list[float]]:
        self.n += 1
        a = Action.BUY if self.n % 200 == 0 else Action.HOLD
        return a, 1.0, [1.0 if k == a else 0.0 for k in range(6)]


@pytest.mark.parametrize("path", ["strategies.rules:EmaCross", "tests.integration.test_policy:TuplePolicy"])
def test_valid_plugin_answers_are_never_taken_for_invalid_ones(tmp_path, path):
    """An ``Action`` is an int, a plain 3-tuple is an answer: both trade, none is policy_invalid."""
    rows, invalid, warnings = _replay_decisions(tmp_path, path)
    assert invalid == 0 and not warnings and not [r for r in rows if r[0] == "policy_invalid"]
    assert any(r[2] == Action.BUY for r in rows)
