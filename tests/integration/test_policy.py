"""The ONNX policy through real onnxruntime: contract checks, layout refusal, masking."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import write_policy
from trader.config import BUNDLED_POLICY
from trader.domain import Action
from trader.features.layout import build_layout
from trader.policy import OnnxPolicy, PolicyError

L261 = build_layout(True)
L228 = build_layout(False)


def test_bundled_policy_loads_on_cpu_and_acts():
    p = OnnxPolicy(BUNDLED_POLICY, L261, "auto")
    assert p.info.provider == "CPUExecutionProvider" and p.info.layout_hash == L261.hash
    a, conf, probs = p.act_on(np.zeros(261, np.float32), np.ones(6, bool))
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
    a, _, probs = p.act_on(np.zeros(261, np.float32), mask)
    assert a != Action.MOVE_TO_BE and probs[3] == probs[4] == probs[5] == 0.0
    assert abs(sum(probs) - 1.0) < 1e-9
    a, _, _ = p.act_on(np.zeros(261, np.float32), np.ones(6, bool))
    assert a == Action.MOVE_TO_BE
