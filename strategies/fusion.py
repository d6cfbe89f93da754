"""Market-regime-aware fusion: the guide's rules with weights that follow the market regime.

Trending market (ADX above ``trend_adx``): the RL policy, trained on price action, keeps the
guide's weight. Ranging market: the LLM's read of context gets ``ranging_llm_weight``. High
volatility (ATR above ``high_vol_ratio`` times its 240-bar mean): act only when both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from trader.config import FusionConfig
from trader.decision.fusion import GuideFusion
from trader.domain import Action, Advice, Decision
from trader.features.observation import MarketContext


class RegimeAwareFusion:
    def __init__(
        self,
        cfg: FusionConfig,
        trend_adx: float = 25.0,
        ranging_llm_weight: float = 0.5,
        high_vol_ratio: float = 1.8,
        **_: Any,
    ) -> None:
        if not 0.0 <= ranging_llm_weight <= 1.0:
            raise ValueError(
                f"fusion.strategy_options.ranging_llm_weight: {ranging_llm_weight} is not within [0, 1]"
            )
        self.trend_adx = trend_adx
        self.high_vol_ratio = high_vol_ratio
        self.trending = GuideFusion(cfg)
        self.ranging = GuideFusion(cfg.model_copy(update={"llm_weight": ranging_llm_weight}))

    def fuse(
        self,
        rl_action: Action,
        rl_confidence: float,
        advice: Advice | None,
        mask: np.ndarray,
        market: Callable[[], MarketContext],
    ) -> Decision:
        if advice is None:
            return self.trending.fuse(rl_action, rl_confidence, None, mask, market)
        ctx = market()
        if ctx.volatility_regime == ctx.volatility_regime and ctx.volatility_regime > self.high_vol_ratio:
            if advice.action == rl_action and mask[rl_action]:
                d = self.trending.fuse(rl_action, rl_confidence, advice, mask, market)
                return Decision(
                    d.action,
                    "regime_high_vol_agreement",
                    d.rl_action,
                    d.rl_confidence,
                    d.llm_action,
                    d.llm_confidence,
                    (*d.reasons, f"vol_regime_{ctx.volatility_regime:.2f}"),
                )
            return Decision(
                Action.HOLD,
                "regime_high_vol_hold",
                rl_action,
                rl_confidence,
                advice.action,
                advice.confidence,
                (f"vol_regime_{ctx.volatility_regime:.2f}>{self.high_vol_ratio}",),
            )
        base = self.trending if ctx.adx == ctx.adx and ctx.adx >= self.trend_adx else self.ranging
        d = base.fuse(rl_action, rl_confidence, advice, mask, market)
        regime = "trending" if base is self.trending else "ranging"
        return Decision(
            d.action,
            f"{regime}_{d.method}",
            d.rl_action,
            d.rl_confidence,
            d.llm_action,
            d.llm_confidence,
            (*d.reasons, f"adx_{ctx.adx:.1f}"),
        )
