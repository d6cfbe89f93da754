"""Operator and safety state in one object: halt, resume, flatten, kill switch, stopping, stale
data, broker reconcile mismatch, a broker that cannot take orders (lockout), journal loss.

The service and the HTTP API change it (every change is journaled by the caller with the bar it
takes effect on); the engine asks it for the :class:`~trader.decision.risk.RiskContext` of each
bar, and the risk engine enforces what it says. A restart restores the operator part (halt, kill
switch, a pending flatten) by replaying the journaled control rows at the bars they took effect
on, so a re-driven run sees exactly the controls the original run saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog

from trader.decision.risk import RiskContext
from trader.domain import MarketContext

log = structlog.get_logger(__name__)

# Control actions an operator may send, and what each does.
OPERATOR_ACTIONS = ("halt", "resume", "flatten", "kill", "rearm")


class Controls:
    """Operator halt, kill switch and flatten requests, plus the safety halts (stale data, a
    reconcile mismatch, a lost journal, stopping). Entries are allowed only when none applies."""

    def __init__(self, kill_switch_config: bool = False) -> None:
        self.kill_switch_config = kill_switch_config
        self.operator_halt = ""  # reason of an operator halt ("" = none)
        self.kill_reason = ""  # operator kill switch: flatten and no entries until rearmed
        self.flatten_request = ""  # an operator's flatten, until the position is flat
        self.stopping = False
        self.stale = False
        self.reconcile_mismatch = ""
        self.broker_blocked = ""  # the broker cannot take orders now (a lockout); ends by itself
        self.journal_problem = ""
        self._key: tuple[object, ...] = ()
        self._halt = (False, "")

    # -- operator ---------------------------------------------------------------------------------
    def apply(self, action: str, reason: str = "") -> None:
        """An operator control (``OPERATOR_ACTIONS``). Unknown actions raise ValueError."""
        if action == "halt":
            self.operator_halt = reason or "operator halt"
        elif action == "resume":
            self.operator_halt = ""
            self.flatten_request = ""
        elif action == "flatten":
            self.operator_halt = reason or "operator flatten"
            self.flatten_request = "operator_flatten"
        elif action == "kill":
            self.kill_reason = reason or "operator kill switch"
        elif action == "rearm":
            self.kill_reason = ""
        else:
            raise ValueError(f"unknown control action {action!r}")

    def restore(self, journaled: Iterable[tuple[str, str]]) -> None:
        """Re-apply journaled operator controls (action, reason), oldest first."""
        for action, reason in journaled:
            if action in OPERATOR_ACTIONS:
                self.apply(action, reason)

    def flat(self) -> None:
        """The position is flat: an operator's flatten request is done."""
        self.flatten_request = ""

    # -- safety -----------------------------------------------------------------------------------
    def set_stale(self, stale: bool) -> bool:
        """Returns True when the state changed."""
        changed = stale != self.stale
        self.stale = stale
        return changed

    def bar_arrived(self) -> None:
        """A bar arrived: the data is not stale (decided at the bar, so a re-drive sees the same)."""
        self.stale = False

    def set_mismatch(self, text: str) -> None:
        self.reconcile_mismatch = text

    def set_broker_blocked(self, reason: str) -> None:
        self.broker_blocked = reason

    def journal_lost(self, problem: str) -> None:
        self.journal_problem = problem

    # -- what the risk engine sees ----------------------------------------------------------------
    @property
    def kill_switch(self) -> str:
        if self.kill_switch_config:
            return "kill_switch"
        return "kill_switch" if self.kill_reason else ""

    @property
    def halted(self) -> bool:
        return bool(self.halt_reasons())

    def halt_reasons(self) -> list[str]:
        out = []
        if self.kill_switch:
            out.append(self.kill_reason or "kill switch (config)")
        if self.operator_halt:
            out.append(self.operator_halt)
        if self.stale:
            out.append("stale data")
        if self.reconcile_mismatch:
            out.append(self.reconcile_mismatch)
        if self.broker_blocked:
            out.append(self.broker_blocked)
        if self.journal_problem:
            out.append(f"journal lost: {self.journal_problem}")
        if self.stopping:
            out.append("stopping")
        return out

    def risk_context(
        self, ts_ns: int, minute_of_day: int, market: Callable[[], MarketContext], catching_up: bool
    ) -> RiskContext:
        key = (
            self.kill_switch_config,
            self.kill_reason,
            self.operator_halt,
            self.stale,
            self.reconcile_mismatch,
            self.broker_blocked,
            self.journal_problem,
            self.stopping,
        )
        if key != self._key:  # the halt text is rebuilt only when a control changed
            reasons = self.halt_reasons()
            self._key, self._halt = key, (bool(reasons), "; ".join(reasons))
        halted, why = self._halt
        return RiskContext(
            ts_ns, minute_of_day, market, halted, why, catching_up, self.flatten_request, self.kill_switch
        )

    def state(self) -> dict[str, object]:
        return {
            "halted": bool(self.operator_halt),
            "halt_reason": self.operator_halt,
            "kill_switch": bool(self.kill_switch),
            "flatten_requested": bool(self.flatten_request),
            "stale_data": self.stale,
            "reconcile_mismatch": self.reconcile_mismatch or None,
            "broker_blocked": self.broker_blocked or None,
            "journal_problem": self.journal_problem or None,
            "stopping": self.stopping,
            "entries_halted_by": self.halt_reasons(),
        }
