"""The observation layout: ordered feature names, declared in one place, versioned by a hash.

Order: base market (215) | account (13) | LLM-context market (28) | LLM-context risk (5) | custom.
With ``use_llm_features = false`` the two LLM-context blocks are left out (228-D).
A policy file carries the hash of the layout it was trained on; the daemon refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache

from trader.config import InstrumentConfig

LAYOUT_VERSION = 1
BASE_DIM = 228
LLM_DIM = 33

ACCOUNT_FEATURES: tuple[str, ...] = (
    "pos_side",
    "pos_size_ratio",
    "pos_unrealized_atr",
    "pos_bars_in_trade",
    "pos_stop_distance_atr",
    "pos_trailing_on",
    "pos_at_break_even",
    "acct_balance_change_ratio",
    "acct_daily_pnl_ratio",
    "acct_drawdown_room_ratio",
    "pos_mfe_atr",
    "pos_mae_atr",
    "acct_daily_trades",
)
RISK_CONTEXT_FEATURES: tuple[str, ...] = (
    "risk_unrealized_pnl",
    "risk_drawdown_from_peak",
    "risk_consecutive_losses",
    "risk_win_rate_10",
    "risk_mae_mfe_ratio",
)


@cache
def _market_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # The names come from the formulas themselves, so they cannot drift from them.
    import numpy as np

    from trader.domain import Bar
    from trader.features.clock import SessionClock
    from trader.features.market import MarketState, derive, derive_llm_context

    clock = SessionClock(InstrumentConfig())
    p = MarketState(clock).update(Bar(0, 1.0, 1.0, 1.0, 1.0, 1.0))
    arr = {k: np.array([v]) for k, v in p.items()}
    with np.errstate(all="ignore"):
        base = tuple(derive(arr, clock, 0.25))
        llm = tuple(derive_llm_context(arr, clock, 0.25))
    return base, llm


@dataclass(frozen=True, slots=True)
class ObservationLayout:
    names: tuple[str, ...]
    n_base_market: int
    n_llm_market: int
    n_custom: int
    use_llm_features: bool

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def hash(self) -> str:
        payload = json.dumps({"version": LAYOUT_VERSION, "dtype": "float32", "names": self.names})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def index(self, name: str) -> int:
        return self.names.index(name)

    # slices into the observation vector
    @property
    def base_market(self) -> slice:
        return slice(0, self.n_base_market)

    @property
    def account(self) -> slice:
        s = self.n_base_market
        return slice(s, s + len(ACCOUNT_FEATURES))

    @property
    def llm_market(self) -> slice:
        s = self.account.stop
        return slice(s, s + self.n_llm_market)

    @property
    def risk_context(self) -> slice:
        s = self.llm_market.stop
        return slice(s, s + (len(RISK_CONTEXT_FEATURES) if self.use_llm_features else 0))

    @property
    def custom(self) -> slice:
        s = self.risk_context.stop
        return slice(s, s + self.n_custom)


def build_layout(use_llm_features: bool, custom_names: tuple[str, ...] = ()) -> ObservationLayout:
    base, llm = _market_names()
    names = list(base) + list(ACCOUNT_FEATURES)
    if use_llm_features:
        names += list(llm) + list(RISK_CONTEXT_FEATURES)
    clash = set(custom_names) & set(names)
    if clash:
        raise ValueError(f"custom feature names clash with built-in ones: {sorted(clash)}")
    names += list(custom_names)
    if len(set(names)) != len(names):
        raise ValueError("duplicate feature names in the observation layout")
    layout = ObservationLayout(
        names=tuple(names),
        n_base_market=len(base),
        n_llm_market=len(llm) if use_llm_features else 0,
        n_custom=len(custom_names),
        use_llm_features=use_llm_features,
    )
    expected = BASE_DIM + (LLM_DIM if use_llm_features else 0) + len(custom_names)
    if layout.dim != expected:
        raise AssertionError(f"observation layout has {layout.dim} features, expected {expected}")
    return layout
