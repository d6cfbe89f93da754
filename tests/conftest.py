"""Shared test helpers: data locations, settings, and small real ONNX policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trader.config import BUNDLED_DATA, Settings, load_settings
from trader.domain import PortfolioSnapshot
from trader.features.layout import ObservationLayout, build_layout
from trader.policy import metadata_for

ROOT = Path(__file__).resolve().parent.parent
SHARED_NQ = ROOT.parent / "shared" / "data" / "NQ_1min_2023-11-19_2023-12-04.csv"
NQ = SHARED_NQ if SHARED_NQ.exists() else BUNDLED_DATA


def make_settings(**overrides: Any) -> Settings:
    """Settings from defaults + overrides; the LLM advisor is off unless a test asks for it."""
    overrides.setdefault("advisor", {"mode": "off"})
    return load_settings(None, overrides)


def write_policy(
    path: Path,
    layout: ObservationLayout | None = None,
    *,
    dim: int | None = None,
    layout_hash: str | None = None,
    bias: list[float] | None = None,
    output_kind: str = "probs",
    input_names: tuple[str, str] = ("obs", "action_mask"),
    mask_in_graph: bool = True,
    seed: int = 0,
    extra_meta: dict[str, str] | None = None,
    weights: np.ndarray | None = None,
) -> Path:
    """A real ONNX MLP with the daemon's contract (or a deliberately broken variant of it).
    ``weights``: the [6, dim] matrix of the logits (default: small random weights from ``seed``)."""
    layout = layout or build_layout(True)
    dim = dim or layout.dim
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(6, dim)) * 0.01).astype(np.float32)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float32).reshape(6, dim)
    b = np.asarray(bias if bias is not None else [0.0] * 6, dtype=np.float32)
    obs_name, mask_name = input_names
    nodes = [helper.make_node("Gemm", [obs_name, "W", "B"], ["logits"], transB=1)]
    out = "logits"
    if mask_in_graph:
        nodes += [
            helper.make_node(
                "Constant", [], ["neg"], value=numpy_helper.from_array(np.array(-1e9, np.float32))
            ),
            helper.make_node("Where", [mask_name, "logits", "neg"], ["masked"]),
        ]
        out = "masked"
    if output_kind == "probs":
        nodes.append(helper.make_node("Softmax", [out], ["probs"], axis=-1))
        out_name = "probs"
    else:
        nodes.append(helper.make_node("Identity", [out], ["logits_out"]))
        out_name = "logits_out"
    graph = helper.make_graph(
        nodes,
        "policy",
        [
            helper.make_tensor_value_info(obs_name, TensorProto.FLOAT, ["N", dim]),
            helper.make_tensor_value_info(mask_name, TensorProto.BOOL, ["N", 6]),
        ],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = metadata_for(layout, output_kind=output_kind, **(extra_meta or {}))
    if layout_hash is not None:
        meta["layout_hash"] = layout_hash
    if layout_hash == "":
        del meta["layout_hash"]
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def flat(**kw: Any) -> PortfolioSnapshot:
    """A flat account at the default start (override any field)."""
    base = dict(
        position=0,
        avg_entry=0.0,
        stop_price=None,
        trailing=False,
        at_break_even=False,
        bars_in_trade=0,
        unrealized_usd=0.0,
        balance_usd=50_000.0,
        equity_usd=50_000.0,
        peak_equity_usd=50_000.0,
        drawdown_threshold_usd=47_500.0,
        daily_pnl_usd=0.0,
        consecutive_losses=0,
        recent_win_rate=None,
        recent_trades=0,
        mae_usd=0.0,
        mfe_usd=0.0,
    )
    base.update(kw)
    return PortfolioSnapshot(**base)


@pytest.fixture
def nq_path() -> Path:
    return NQ
