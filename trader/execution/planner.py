"""Turns the risk engine's final action into order intents and protective-stop changes.

BUY/SELL open (or add to) a position with a bracket stop ``stop_ticks`` away from the fill
(ATR- or tick-based), close the opposite position, or reverse it when ``reverse_on_opposite``.
MOVE_TO_BE puts the stop at the average entry plus ``be_offset_ticks``; ENABLE_TRAIL fixes a
trail distance and the stop then ratchets with each close; DISABLE_TRAIL leaves the stop where
it is. Client order ids are derived from (run, bar index, intent number): a retried request
carries the same id. All stop prices are on the tick grid.

``stop_mode = "none"``: entries carry no stop (``stop_ticks`` 0), so there is no stop to move:
MOVE_TO_BE, ENABLE_TRAIL and DISABLE_TRAIL plan nothing (the action mask never offers them, see
:mod:`trader.decision.mask`; this is the planner's own guard, never a stop made out of nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trader.config import Settings
from trader.domain import Action, OrderIntent, OrderKind, PortfolioSnapshot, Side, TickGrid, Verdict


@dataclass(frozen=True, slots=True)
class Plan:
    orders: tuple[OrderIntent, ...] = ()
    move_stop: float | None = None
    trailing: bool | None = None
    trail_ticks: int = 0
    break_even: bool = False


class ExecutionPlanner:
    def __init__(self, settings: Settings, run_id: str) -> None:
        ex = settings.execution
        self.grid = TickGrid(settings.instrument.tick_size)
        self.tick = settings.instrument.tick_size
        self.qty = ex.order_qty
        self.reverse = ex.reverse_on_opposite
        self.stop_mode, self.stop_atr_mult, self.stop_ticks_fixed = (
            ex.stop_mode,
            ex.stop_atr_mult,
            ex.stop_ticks,
        )
        self.trail_mode, self.trail_atr_mult, self.trail_ticks_fixed = (
            ex.trail_mode,
            ex.trail_atr_mult,
            ex.trail_ticks,
        )
        self.be_offset = ex.be_offset_ticks * settings.instrument.tick_size
        self.run_tag = run_id[:8]

    def _ticks(self, mode: str, mult: float, fixed: int, atr: float) -> int:
        if mode == "none":
            return 0  # no protective stop
        if mode == "ticks" or not atr > 0:
            return fixed
        return max(1, math.ceil(atr * mult / self.tick - 1e-9))

    def _cid(self, bar_index: int, k: int) -> str:
        return f"{self.run_tag}-{bar_index}-{k}"

    def plan(self, v: Verdict, s: PortfolioSnapshot, atr: float, bar_index: int) -> Plan | None:
        a, pos = v.action, s.position
        if v.flatten and pos:
            side = Side.SELL if pos > 0 else Side.BUY
            return Plan(
                orders=(
                    OrderIntent(
                        self._cid(bar_index, 0),
                        side,
                        abs(pos),
                        OrderKind.MARKET,
                        f"flatten:{v.flatten_reason}",
                        position_before=pos,
                    ),
                )
            )
        if a == Action.HOLD:
            return None
        if a in (Action.BUY, Action.SELL):
            side = Side.BUY if a == Action.BUY else Side.SELL
            opposite = pos != 0 and (pos > 0) != (side > 0)
            orders = []
            if opposite:
                orders.append(
                    OrderIntent(
                        self._cid(bar_index, 0), side, abs(pos), OrderKind.MARKET, "exit", position_before=pos
                    )
                )
                if not self.reverse or v.reduce_only:
                    return Plan(orders=tuple(orders))
            # an add keeps the position's existing stop; a new position gets its own bracket stop
            adding = pos != 0 and not opposite
            stop_ticks = (
                0 if adding else self._ticks(self.stop_mode, self.stop_atr_mult, self.stop_ticks_fixed, atr)
            )
            orders.append(
                OrderIntent(
                    self._cid(bar_index, len(orders)),
                    side,
                    self.qty,
                    OrderKind.MARKET,
                    "reverse" if opposite else ("add" if adding else "entry"),
                    stop_ticks,
                    position_before=pos if adding else 0,
                )
            )
            return Plan(orders=tuple(orders))
        if pos == 0 or self.stop_mode == "none":
            return None  # the stop actions: nothing to move without a position and a stop
        if a == Action.MOVE_TO_BE:
            if pos > 0:
                be = self.grid.round_up(s.avg_entry + self.be_offset)
                better = s.stop_price is None or be > s.stop_price
            else:
                be = self.grid.round_down(s.avg_entry - self.be_offset)
                better = s.stop_price is None or be < s.stop_price
            return Plan(move_stop=be if better else None, break_even=True)
        if a == Action.ENABLE_TRAIL:
            return Plan(
                trailing=True,
                trail_ticks=self._ticks(self.trail_mode, self.trail_atr_mult, self.trail_ticks_fixed, atr),
            )
        if a == Action.DISABLE_TRAIL:
            return Plan(trailing=False)
        return None

    def trail(self, position: int, stop_price: float | None, trail_ticks: int, close: float) -> float | None:
        """The ratcheted stop after this close, or None when it would not tighten."""
        if position == 0 or trail_ticks <= 0:
            return None
        dist = trail_ticks * self.tick
        if position > 0:
            cand = self.grid.round_down(close - dist)
            return cand if stop_price is None or cand > stop_price else None
        cand = self.grid.round_up(close + dist)
        return cand if stop_price is None or cand < stop_price else None
