"""Which of the six actions are legal in a state. HOLD always is.

BUY: flat, short (an exit or reversal) or long below max_contracts; SELL mirrored.
MOVE_TO_BE: in a position, stop not yet at break-even, and at least ``be_min_profit_ticks`` in
profit (so the break-even stop lands on the right side of the market).
ENABLE_TRAIL / DISABLE_TRAIL: in a position with trailing off / on.
With ``execution.stop_mode = "none"`` positions have no stop, so MOVE_TO_BE, ENABLE_TRAIL and
DISABLE_TRAIL are never legal (the planner would plan nothing for them).
"""

from __future__ import annotations

import numpy as np

from trader.config import Settings
from trader.domain import Action, PortfolioSnapshot

HOLD_ONLY = np.array([True, False, False, False, False, False])


class ActionMasker:
    def __init__(self, settings: Settings) -> None:
        self.max_contracts = settings.risk.max_contracts
        self.min_profit_pts = settings.execution.be_min_profit_ticks * settings.instrument.tick_size
        self.stops = settings.execution.stop_mode != "none"
        self._mask = np.zeros(6, dtype=np.bool_)

    def mask(self, s: PortfolioSnapshot, close: float) -> np.ndarray:
        """A reused buffer: copy it to keep it."""
        m = self._mask
        pos = s.position
        m[Action.HOLD] = True
        m[Action.BUY] = pos < self.max_contracts
        m[Action.SELL] = -pos < self.max_contracts
        if pos and self.stops:
            side = 1 if pos > 0 else -1
            m[Action.MOVE_TO_BE] = not s.at_break_even and (close - s.avg_entry) * side >= self.min_profit_pts
            m[Action.ENABLE_TRAIL] = not s.trailing
            m[Action.DISABLE_TRAIL] = s.trailing
        else:
            m[Action.MOVE_TO_BE] = m[Action.ENABLE_TRAIL] = m[Action.DISABLE_TRAIL] = False
        return m
