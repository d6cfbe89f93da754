"""Policies: the ONNX-exported RL policy (onnxruntime, CUDA when present) and Python policies
(rule baselines, user plug-ins) behind one port, chosen by ``policy.path``: a ``.onnx`` file, or
``module:attr`` naming a class/factory called with ``(settings, **policy.options)``."""

from __future__ import annotations

import re
from pathlib import Path

from trader.config import Settings
from trader.errors import PolicyError
from trader.features.layout import ObservationLayout
from trader.policy.onnx import OnnxPolicy, PolicyInfo, choose_providers, metadata_for
from trader.ports import Policy, load_object

__all__ = [
    "OnnxPolicy",
    "PolicyError",
    "PolicyInfo",
    "build_policy",
    "choose_providers",
    "is_dotted",
    "metadata_for",
]

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_dotted(path: str | Path) -> bool:
    """``module:attr`` (a Python policy) rather than a file."""
    return bool(_DOTTED.match(str(path))) and not Path(str(path)).exists()


def build_policy(settings: Settings, layout: ObservationLayout) -> Policy:
    cfg = settings.policy
    if is_dotted(cfg.path):
        factory = load_object(str(cfg.path), "policy.path")
        if not callable(factory):
            raise PolicyError(f"policy.path: {cfg.path} is not a class or factory")
        try:
            policy = factory(settings, **cfg.options)
        except TypeError as exc:
            raise PolicyError(f"policy.path: {cfg.path} with policy.options {cfg.options}: {exc}") from exc
        if not callable(getattr(policy, "act", None)):
            raise PolicyError(f"policy.path: {cfg.path} does not provide act()")
        if not isinstance(getattr(policy, "name", None), str):
            raise PolicyError(f"policy.path: {cfg.path} does not provide a name")
        return policy
    return OnnxPolicy(cfg.path, layout, cfg.provider, cfg.intra_op_threads)
