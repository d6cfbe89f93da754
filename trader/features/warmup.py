"""The warm-up: how many bars only warm the indicators up before the first decision.

``features.warmup_bars`` is a number of bars, or ``"auto"``: the longest look-back of the
features actually in the observation layout. Each market feature's look-back is the longest of
the primitives its formula reads (recorded by running the formulas once, so it cannot drift from
them), each primitive's from its indicators' declared ``lookback`` (``indicators.py``,
checked against the values they produce). A custom feature block counts with its
``lookback_bars`` attribute when it declares one, else 0 (its NaN values still hold decisions
back: a bar is decided only once every feature has a value).

The default set (the 261-D layout) needs 900 bars, set by the 60-minute RSI (15 completed hours);
the 228-D base layout needs 240 (the 240-minute return, channel, volume and z-score windows).
The default stays a fixed 960 bars: the bundled policy was trained and evaluated with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from trader.config import InstrumentConfig, Settings
from trader.errors import ConfigError

if TYPE_CHECKING:
    from trader.ports import FeatureBlock


class _ReadRecorder(Mapping[str, np.ndarray]):
    """The primitives, recording which ones a formula reads."""

    def __init__(self, primitives: dict[str, np.ndarray]) -> None:
        self.primitives = primitives
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        self.read.add(key)
        return self.primitives[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.primitives)

    def __len__(self) -> int:
        return len(self.primitives)


@cache
def market_lookback_bars(use_llm_features: bool) -> int:
    """The longest look-back of the market features of the layout (base, plus the LLM-context
    block when ``use_llm_features``)."""
    from trader.domain import Bar
    from trader.features.clock import SessionClock
    from trader.features.market import MarketState, derive, derive_llm_context, primitive_lookbacks

    clock = SessionClock(InstrumentConfig())
    p = MarketState(clock).update(Bar(0, 1.0, 1.0, 1.0, 1.0, 1.0))
    rec = _ReadRecorder({k: np.array([v]) for k, v in p.items()})
    with np.errstate(all="ignore"):
        derive(rec, clock, 0.25)  # type: ignore[arg-type]
        if use_llm_features:
            derive_llm_context(rec, clock, 0.25)  # type: ignore[arg-type]
    lookback = primitive_lookbacks()
    return max(lookback[k] for k in rec.read)


def block_lookback_bars(block: FeatureBlock | Any) -> int:
    """A custom block's declared ``lookback_bars`` (0 when it declares none)."""
    n = getattr(block, "lookback_bars", 0)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(
            f"features.custom_blocks: {type(block).__name__}.lookback_bars = {n!r} is not a number of "
            "bars (an int >= 0)"
        )
    return int(n)


def auto_warmup_bars(use_llm_features: bool, blocks: Sequence[FeatureBlock] = ()) -> int:
    """``features.warmup_bars = "auto"``: the longest look-back of the layout's features."""
    return max([market_lookback_bars(use_llm_features), *(block_lookback_bars(b) for b in blocks)])


def warmup_bars(settings: Settings, blocks: Sequence[FeatureBlock] | None = None) -> int:
    """``features.warmup_bars`` as a number of bars (``"auto"`` resolved). ``blocks``: the custom
    feature blocks of the run; None = built from ``features.custom_blocks``."""
    w = settings.features.warmup_bars
    if w != "auto":
        return int(w)
    if blocks is None:
        from trader.features.observation import load_feature_blocks

        blocks = load_feature_blocks(settings.features.custom_blocks)
    return auto_warmup_bars(settings.features.use_llm_features, blocks)
