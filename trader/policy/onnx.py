"""The RL policy: an ONNX graph run by onnxruntime on every bar.

Contract (checked at load, refused with a message that says which part differs):
inputs ``obs`` float32[N, dim] and ``action_mask`` bool[N, 6]; first output action
probabilities or logits float32[N, 6] (metadata ``output_kind`` = probs|logits, else inferred
from the output name); metadata ``layout_hash`` equal to the configured layout's hash.
Masked actions always get probability 0, whatever the graph does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from trader.domain import ACTION_NAMES, N_ACTIONS, Observed, PolicyChoice
from trader.errors import PolicyError
from trader.features.layout import ObservationLayout

log = structlog.get_logger(__name__)
_HOLD = PolicyChoice(0, 1.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
_VECTOR_ROWS = 16  # from this many rows numpy post-processing beats six numbers in plain Python
_new_choice = partial(tuple.__new__, PolicyChoice)
_EXACT_SIZES: dict[tuple[str, str, int], dict[int, bool]] = {}


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
        # batch size ─▶ rows bit-identical to act_on's; shared by the sessions of the same model
        # bytes, provider and threads in this process (a sweep's replays check once)
        key = (hashlib.sha256(path.read_bytes()).hexdigest(), chosen, intra_op_threads)
        self._exact_sizes: dict[int, bool] = _EXACT_SIZES.setdefault(key, {})

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
        return self._choose(self._raw_one(obs, mask), mask.tolist())

    def act_batch(self, obs: np.ndarray, masks: np.ndarray) -> list[PolicyChoice]:
        """``act_on`` for each row of ``obs`` float32[N, dim] and ``masks`` bool[N, 6], in one
        onnxruntime call. Row k equals ``act_on(obs[k], masks[k])`` exactly when the session's
        rows do not depend on the batch they are in (:meth:`batch_exact` checks that)."""
        raw = self._raw_batch(obs, masks)
        if self.output_kind == "probs" and len(raw) >= _VECTOR_ROWS:
            return _choices_from_probs(raw, masks)
        return [self._choose(r, m) for r, m in zip(raw.tolist(), masks.tolist(), strict=True)]

    def batch_exact(self, max_rows: int) -> bool:
        """Whether this session answers every row of a batch of 1, 2, 4 ... ``max_rows`` rows bit
        for bit as it answers that row alone (``act_on``). Checked once per size on random
        observations: onnxruntime may pick other kernels for other batch sizes (a GPU, several
        threads), and the journal keeps the probabilities, so a batch must change nothing."""
        sizes = batch_sizes(max_rows)
        batch_axes = {i.shape[0] for i in self.session.get_inputs() if i.shape}
        if any(isinstance(d, int) and d > 0 for d in batch_axes):
            # a model exported with a fixed batch size (1) takes one row per call: bar by bar
            log.info(
                "policy_batch_fixed_per_bar", path=self.info.path, batch_axes=sorted(map(str, batch_axes))
            )
            return False
        unchecked = [n for n in sizes if n not in self._exact_sizes]
        if not unchecked:
            return all(self._exact_sizes[n] for n in sizes)
        n_max = max(unchecked)
        rng = np.random.default_rng(20231119)
        obs = (rng.standard_normal((n_max, self._obs.shape[1])) * 3.0).astype(np.float32)
        masks = rng.random((n_max, N_ACTIONS)) < 0.6
        masks[:, 0] = True  # HOLD is always legal
        alone = np.stack([np.array(self._raw_one(obs[k], masks[k]), dtype=np.float32) for k in range(n_max)])
        for n in unchecked:
            try:
                together = self._raw_batch(obs[:n], masks[:n])
            except Exception as exc:  # the model refuses batches of n rows: bar by bar it is
                log.warning(
                    "policy_batch_refused_per_bar", path=self.info.path, rows=n, error=repr(exc)[:200]
                )
                self._exact_sizes[n] = False
                continue
            self._exact_sizes[n] = bool(np.array_equal(together.view(np.uint32), alone[:n].view(np.uint32)))
        exact = all(self._exact_sizes[n] for n in sizes)
        if not exact:
            log.warning(
                "policy_batch_inexact_per_bar",
                path=self.info.path,
                provider=self.info.provider,
                sizes=[n for n in sizes if not self._exact_sizes[n]],
            )
        return exact

    def _raw_one(self, obs: np.ndarray, mask: np.ndarray) -> list[float]:
        self._obs[0] = obs
        self._mask[0] = mask
        if self._cpu:
            self.session.run_with_iobinding(self._binding)
            return self._out[0].tolist()
        return self.session.run([self._out_name], {"obs": self._obs, "action_mask": self._mask})[0][
            0
        ].tolist()

    def _raw_batch(self, obs: np.ndarray, masks: np.ndarray) -> np.ndarray:
        out = self.session.run([self._out_name], {"obs": obs, "action_mask": masks})[0]
        return np.asarray(out, dtype=np.float32)

    def _choose(self, raw: list[float], legal: list[bool]) -> PolicyChoice:
        """One row of the graph's output under its mask ─▶ the choice (plain Python: six numbers)."""
        if not math.isfinite(sum(raw)):  # NaN and inf propagate through the sum
            return _not_finite(raw)
        # Six numbers: plain Python is several times cheaper here than numpy scalar operations.
        if self.output_kind == "logits":
            top = max(r for r, ok in zip(raw, legal, strict=True) if ok)
            p = [math.exp(r - top) if ok else 0.0 for r, ok in zip(raw, legal, strict=True)]
        else:
            p = [r if ok and r > 0.0 else 0.0 for r, ok in zip(raw, legal, strict=True)]
        return _normalised(p)


def _normalised(p: list[float]) -> PolicyChoice:
    # left to right, as _choices_from_probs adds the columns (sum() may compensate on newer Pythons)
    total = p[0] + p[1] + p[2] + p[3] + p[4] + p[5]
    if not 0.0 < total < math.inf:
        p = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # HOLD is always legal
    elif total != 1.0:
        p = [x / total for x in p]
    a = p.index(max(p))
    return PolicyChoice(a, p[a], p)


def _choices_from_probs(raw: np.ndarray, masks: np.ndarray) -> list[PolicyChoice]:
    """``_choose`` for every row of a probabilities output, in numpy: the same float64 operations
    in the same order (so the same bits); rows with a non-finite value take the scalar path, which
    says what was wrong."""
    r = raw.astype(np.float64)
    p = np.where(masks & (r > 0.0), r, 0.0)
    total = p[:, 0] + p[:, 1] + p[:, 2] + p[:, 3] + p[:, 4] + p[:, 5]
    usable = (total > 0.0) & (total < math.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where((usable & (total != 1.0))[:, None], p / total[:, None], p)
    p[~usable] = _HOLD.probs
    actions = p.argmax(axis=1)  # the first of equal maxima, as list.index(max(...))
    conf = p[np.arange(len(p)), actions]
    # PolicyChoice(a, c, q) for every row, built in C (a NamedTuple's __new__ is a Python call)
    out = list(map(_new_choice, zip(actions.tolist(), conf.tolist(), p.tolist(), repeat(""))))
    bad = ~np.isfinite(r).all(axis=1)
    if bad.any():
        for k in np.flatnonzero(bad).tolist():
            out[k] = _not_finite(raw[k].tolist())
    return out


def _not_finite(raw: list[float]) -> PolicyChoice:
    bad = ", ".join(f"{ACTION_NAMES[k]}={r}" for k, r in enumerate(raw) if not math.isfinite(r))
    return PolicyChoice(0, 0.0, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], f"policy output not finite: {bad}")


def batch_sizes(max_rows: int) -> tuple[int, ...]:
    """The batch sizes a look-ahead evaluates: powers of two up to ``max_rows``."""
    sizes = []
    n = 1
    while n <= max_rows:
        sizes.append(n)
        n *= 2
    return tuple(sizes)


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
