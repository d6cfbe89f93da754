"""The RL policy: an ONNX graph run by onnxruntime on every bar.

Contract (checked at load, refused with a message that says which part differs):
inputs ``obs`` float32[N, dim] and ``action_mask`` bool[N, 6]; first output action
probabilities or logits float32[N, 6] (metadata ``output_kind`` = probs|logits, else inferred
from the output name); metadata ``layout_hash`` equal to the configured layout's hash.
Masked actions always get probability 0, whatever the graph does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from trader.domain import ACTION_NAMES, N_ACTIONS, Observed, PolicyChoice
from trader.errors import PolicyError
from trader.features.layout import ObservationLayout

log = structlog.get_logger(__name__)
_HOLD = PolicyChoice(0, 1.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    path: str
    provider: str
    output_kind: str
    layout_hash: str
    metadata: dict[str, str]


def choose_providers(requested: str) -> list[str]:
    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise PolicyError(
                "policy.provider = 'cuda' but onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install the gpu extra (onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxPolicy:
    """Greedy masked policy. ``act`` returns (action, confidence, probabilities)."""

    name = "onnx"
    validated_output = True  # act_on refuses a non-finite output itself (PolicyChoice.problem)

    def __init__(
        self, path: str | Path, layout: ObservationLayout, provider: str = "auto", intra_op_threads: int = 1
    ) -> None:
        path = Path(path)
        if not path.exists():
            raise PolicyError(f"policy file not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=choose_providers(provider))
        except PolicyError:
            raise
        except Exception as exc:
            raise PolicyError(f"policy file {path} is not a loadable ONNX model: {exc}") from exc
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.output_kind = self._check_contract(path, layout, meta)
        chosen = self.session.get_providers()[0]
        self.info = PolicyInfo(str(path), chosen, self.output_kind, meta["layout_hash"], meta)
        log.info(
            "policy_loaded",
            path=str(path),
            provider=chosen,
            output_kind=self.output_kind,
            dim=layout.dim,
            layout_hash=layout.hash,
        )
        self._obs = np.zeros((1, layout.dim), dtype=np.float32)
        self._mask = np.ones((1, N_ACTIONS), dtype=np.bool_)
        self._out_name = self.session.get_outputs()[0].name
        self._binding = self.session.io_binding()
        self._obs_ort = ort.OrtValue.ortvalue_from_numpy(self._obs)
        self._mask_ort = ort.OrtValue.ortvalue_from_numpy(self._mask)
        self._out = np.zeros((1, N_ACTIONS), dtype=np.float32)
        self._out_ort = ort.OrtValue.ortvalue_from_numpy(self._out)
        self._binding.bind_ortvalue_input("obs", self._obs_ort)
        self._binding.bind_ortvalue_input("action_mask", self._mask_ort)
        self._binding.bind_ortvalue_output(self._out_name, self._out_ort)
        self._cpu = chosen == "CPUExecutionProvider"

    def _check_contract(self, path: Path, layout: ObservationLayout, meta: dict[str, str]) -> str:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = self.session.get_outputs()
        for name in ("obs", "action_mask"):
            if name not in ins:
                raise PolicyError(f"policy {path}: missing input {name!r} (inputs are {sorted(ins)})")
        obs, mask = ins["obs"], ins["action_mask"]
        if obs.type != "tensor(float)":
            raise PolicyError(f"policy {path}: input 'obs' has type {obs.type}, expected tensor(float)")
        if mask.type != "tensor(bool)":
            raise PolicyError(
                f"policy {path}: input 'action_mask' has type {mask.type}, expected tensor(bool)"
            )
        if len(obs.shape) != 2 or obs.shape[1] != layout.dim:
            trained = meta.get("layout_dim", obs.shape[1] if len(obs.shape) == 2 else obs.shape)
            raise PolicyError(
                f"policy {path}: input 'obs' has shape {obs.shape} (trained on {trained} features) but the "
                f"configured layout has {layout.dim} features "
                f"(features.use_llm_features = {str(layout.use_llm_features).lower()}); "
                "use a policy trained on this layout"
            )
        if len(mask.shape) != 2 or mask.shape[1] != N_ACTIONS:
            raise PolicyError(f"policy {path}: input 'action_mask' has shape {mask.shape}, expected [N, 6]")
        if not outs or len(outs[0].shape) != 2 or outs[0].shape[1] != N_ACTIONS:
            raise PolicyError(f"policy {path}: first output must be [N, 6] action probabilities or logits")
        if outs[0].type != "tensor(float)":
            raise PolicyError(
                f"policy {path}: output {outs[0].name!r} has type {outs[0].type}, expected float"
            )
        got = meta.get("layout_hash")
        if got is None:
            raise PolicyError(
                f"policy {path}: metadata has no layout_hash; re-export it with scripts/train_policy"
            )
        if got != layout.hash:
            raise PolicyError(
                f"policy {path}: layout hash {got} differs from the configured layout's {layout.hash}; "
                "it was trained on a different observation layout"
            )
        kind = meta.get("output_kind") or ("logits" if "logit" in outs[0].name.lower() else "probs")
        if kind not in ("probs", "logits"):
            raise PolicyError(f"policy {path}: metadata output_kind = {kind!r}, expected probs or logits")
        return kind

    def act(self, o: Observed) -> PolicyChoice:
        """Greedy action under the mask (nothing to do during warm-up)."""
        if not o.ready:
            return _HOLD
        return self.act_on(o.obs, o.mask)

    def act_on(self, obs: np.ndarray, mask: np.ndarray) -> PolicyChoice:
        """Greedy action under the mask: (action, its probability, the six probabilities)."""
        self._obs[0] = obs
        self._mask[0] = mask
        if self._cpu:
            self.session.run_with_iobinding(self._binding)
            raw = self._out[0].tolist()
        else:
            raw = self.session.run([self._out_name], {"obs": self._obs, "action_mask": self._mask})[0][
                0
            ].tolist()
        if not math.isfinite(sum(raw)):  # NaN and inf propagate through the sum
            bad = ", ".join(f"{ACTION_NAMES[k]}={r}" for k, r in enumerate(raw) if not math.isfinite(r))
            return PolicyChoice(0, 0.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], f"policy output not finite: {bad}")
        legal = mask.tolist()
        # Six numbers: plain Python is several times cheaper here than numpy scalar operations.
        if self.output_kind == "logits":
            top = max(r for r, ok in zip(raw, legal, strict=True) if ok)
            p = [math.exp(r - top) if ok else 0.0 for r, ok in zip(raw, legal, strict=True)]
        else:
            p = [r if ok and r > 0.0 else 0.0 for r, ok in zip(raw, legal, strict=True)]
        total = sum(p)
        if not 0.0 < total < math.inf:
            p = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # HOLD is always legal
        elif total != 1.0:
            p = [x / total for x in p]
        a = p.index(max(p))
        return PolicyChoice(a, p[a], p)


def metadata_for(layout: ObservationLayout, **extra: object) -> dict[str, str]:
    """The metadata props every exported policy carries."""
    from trader.domain import ACTION_NAMES

    meta = {
        "layout_hash": layout.hash,
        "layout_dim": str(layout.dim),
        "feature_names": json.dumps(layout.names),
        "action_names": json.dumps(ACTION_NAMES),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta
