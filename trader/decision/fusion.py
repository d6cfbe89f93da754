"""Fusion of the RL policy's choice with the LLM's advice (DESIGN.md, "Decision rules").

First rule that applies wins:
0. no fresh advice, or advice illegal under the action mask ─▶ RL alone (``rl_only``)
1. agreement: both name the same action ─▶ that action (``agreement``)
2. high-confidence override: one side > high_confidence while the other < low_confidence
   ─▶ the confident side (``llm_override`` / ``rl_override``)
3. uncertainty hold: both < uncertainty_threshold ─▶ HOLD (``uncertainty_hold``)
4. weighted: (1 − w)·conf_RL vs w·conf_LLM; the LLM wins only with conf_LLM ≥ confidence_threshold
   (``weighted_llm`` / ``weighted_rl``)
Pure: no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from trader.config import FusionConfig
from trader.domain import Action, Advice, Decision, MarketContext
from trader.errors import ConfigError
from trader.ports import FusionStrategy, load_object

FUSION_METHODS = (
    "warmup",
    "rl_only",
    "agreement",
    "llm_override",
    "rl_override",
    "uncertainty_hold",
    "weighted_llm",
    "weighted_rl",
)


class GuideFusion:
    """The hybrid-agent guide's rules, exactly as DESIGN.md states them."""

    def __init__(self, cfg: FusionConfig, **_: Any) -> None:
        self.w = cfg.llm_weight
        self.threshold = cfg.confidence_threshold
        self.high = cfg.high_confidence
        self.low = cfg.low_confidence
        self.uncertain = cfg.uncertainty_threshold

    def fuse(
        self,
        rl_action: Action,
        rl_confidence: float,
        advice: Advice | None,
        mask: np.ndarray,
        market: Callable[[], MarketContext],
    ) -> Decision:
        if advice is None:
            return Decision(rl_action, "rl_only", rl_action, rl_confidence, None, None, ("no_fresh_advice",))
        la, lc, rc = advice.action, advice.confidence, rl_confidence
        if not mask[la]:
            return Decision(
                rl_action, "rl_only", rl_action, rc, la, lc, (f"advice_{la.name}_illegal_under_mask",)
            )
        if la == rl_action:
            return Decision(rl_action, "agreement", rl_action, rc, la, lc, (f"both_{la.name}",))
        if lc > self.high and rc < self.low:
            return Decision(
                la,
                "llm_override",
                rl_action,
                rc,
                la,
                lc,
                (f"llm_conf_{lc:.2f}>{self.high}", f"rl_conf_{rc:.2f}<{self.low}"),
            )
        if rc > self.high and lc < self.low:
            return Decision(
                rl_action,
                "rl_override",
                rl_action,
                rc,
                la,
                lc,
                (f"rl_conf_{rc:.2f}>{self.high}", f"llm_conf_{lc:.2f}<{self.low}"),
            )
        if rc < self.uncertain and lc < self.uncertain:
            return Decision(
                Action.HOLD, "uncertainty_hold", rl_action, rc, la, lc, (f"both_conf<{self.uncertain}",)
            )
        s_rl, s_llm = (1.0 - self.w) * rc, self.w * lc
        if lc >= self.threshold and s_llm > s_rl:
            return Decision(
                la, "weighted_llm", rl_action, rc, la, lc, (f"score_llm_{s_llm:.3f}>rl_{s_rl:.3f}",)
            )
        why = (
            f"llm_conf_{lc:.2f}<threshold_{self.threshold}"
            if lc < self.threshold
            else f"score_rl_{s_rl:.3f}>=llm_{s_llm:.3f}"
        )
        return Decision(rl_action, "weighted_rl", rl_action, rc, la, lc, (why,))


def build_fusion(cfg: FusionConfig, options: dict[str, Any] | None = None) -> FusionStrategy:
    """``default`` (the guide's rules) or a plug-in ``module:attr`` called with (cfg, **options)."""
    if cfg.strategy in ("default", "guide"):
        return GuideFusion(cfg)
    factory = load_object(cfg.strategy, "fusion.strategy")
    if not callable(factory):
        raise ConfigError(f"fusion.strategy: {cfg.strategy!r} is not a class or factory")
    strategy = factory(cfg, **(options or {}))
    if not callable(getattr(strategy, "fuse", None)):
        raise ConfigError(f"fusion.strategy: {cfg.strategy!r} does not provide fuse()")
    return cast(FusionStrategy, strategy)
