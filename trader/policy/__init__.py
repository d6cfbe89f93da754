"""Policies: the ONNX-exported RL policy (onnxruntime, CUDA when present) and Python policies
(rule baselines, user plug-ins) behind one port, chosen by ``policy.path``: a ``.onnx`` file, or
``module:attr`` naming a class/factory called with ``(settings, **policy.options)``."""

from __future__ import annotations

import re
from pathlib import Path

import structlog

from trader.config import Settings
from trader.errors import PolicyError
from trader.features.layout import ObservationLayout
from trader.policy.onnx import OnnxPolicy, PolicyInfo, choose_providers, metadata_for
from trader.ports import Policy, load_object

log = structlog.get_logger(__name__)

__all__ = [
    "OnnxPolicy",
    "PolicyError",
    "PolicyInfo",
    "build_policy",
    "check_trained_for",
    "choose_providers",
    "is_dotted",
    "metadata_for",
    "trained_for",
]

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_dotted(path: str | Path) -> bool:
    """``module:attr`` (a Python policy) rather than a file."""
    return bool(_DOTTED.match(str(path))) and not Path(str(path)).exists()


TRAINED_FOR = ("symbol", "tick_size", "bar_seconds")


def trained_for(settings: Settings) -> dict[str, str]:
    """The market a policy is trained on, as metadata props (checked when it is loaded)."""
    return {
        "symbol": settings.instrument.symbol,
        "tick_size": repr(settings.instrument.tick_size),
        "bar_seconds": str(settings.data.bar_seconds),
    }


def check_trained_for(meta: dict[str, str], settings: Settings, path: object) -> None:
    """A policy trained on another symbol, tick size or bar interval is refused (its features and
    stops would mean other things), or only warned about with ``policy.allow_other_market``."""
    want = trained_for(settings)
    keys = {
        "symbol": "instrument.symbol",
        "tick_size": "instrument.tick_size",
        "bar_seconds": "data.bar_seconds",
    }
    diffs = []
    for k in TRAINED_FOR:
        got = meta.get(k)
        if got is None:
            continue
        same = got == want[k]
        if k != "symbol":
            try:
                same = float(got) == float(want[k])
            except ValueError:
                same = False
        if not same:
            diffs.append(f"{k} {got} (config {keys[k]} = {want[k]})")
    if not diffs:
        return
    text = f"policy {path} was trained for another market: " + "; ".join(diffs)
    if settings.policy.allow_other_market:
        log.warning("policy_trained_for_another_market", path=str(path), differences=diffs)
        return
    raise PolicyError(text + "; set policy.allow_other_market = true to use it anyway")


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
    policy = OnnxPolicy(cfg.path, layout, cfg.provider, cfg.intra_op_threads)
    check_trained_for(policy.info.metadata, settings, cfg.path)
    return policy
