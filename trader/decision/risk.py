"""Risk review: every decision passes here before it can become an order.

Two layers:
* the guide's veto (``enable_risk_veto``): after ``max_consecutive_losses`` losing trades, when the
  win rate of the last 10 trades < ``min_win_rate_threshold`` (once ``win_rate_min_trades`` trades
  exist), or when the room left to the trailing drawdown limit < ``dd_buffer_threshold`` of that
  limit, the entry-side actions BUY, SELL, ENABLE_TRAIL become HOLD;
* hard limits, always on: kill switch, daily loss limit, trailing drawdown breached, trading hours
  (entries only inside the window, which may wrap past midnight; flatten at ``flatten_at``
  unless it is "off"), max contracts.
HOLD, MOVE_TO_BE and DISABLE_TRAIL always pass, and so does an exit: a SELL that only closes a
long (or a BUY that only covers a short) is never blocked; a vetoed reversal becomes exit-only.
Pure: the review is a function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from trader.config import Settings
from trader.domain import Action, MarketContext, PortfolioSnapshot, Verdict, Veto
from trader.errors import ConfigError
from trader.features.clock import SessionClock
from trader.ports import RiskRule, load_object


class RiskContext(NamedTuple):
    """What the rules may look at besides the portfolio, for one bar (built by
    :meth:`trader.controls.Controls.risk_context`; a NamedTuple: immutable and cheap per bar)."""

    ts_ns: int
    minute_of_day: int
    market: Callable[[], MarketContext]
    halted: bool = False  # operator halt (control API), stale data, a broker reconcile mismatch
    halt_reason: str = ""
    catching_up: bool = False  # a bar from the backfill after a reconnect: too old to enter on
    flatten: str = ""  # an operator's flatten request (control API): the reason
    kill_switch: str = ""  # the kill switch (config or operator): flatten and no entries


class ConsecutiveLosses:
    name = "consecutive_losses"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def check(self, action: Action, s: PortfolioSnapshot, ctx: RiskContext) -> str | None:
        if s.consecutive_losses >= self.limit:
            return f"{s.consecutive_losses} consecutive losses >= {self.limit}"
        return None


class MinWinRate:
    name = "min_win_rate"

    def __init__(self, threshold: float, min_trades: int) -> None:
        self.threshold = threshold
        self.min_trades = min_trades

    def check(self, action: Action, s: PortfolioSnapshot, ctx: RiskContext) -> str | None:
        if (
            s.recent_win_rate is not None
            and s.recent_trades >= self.min_trades
            and s.recent_win_rate < self.threshold
        ):
            return f"win rate {s.recent_win_rate:.2f} of last {s.recent_trades} trades < {self.threshold}"
        return None


class DrawdownBuffer:
    name = "drawdown_buffer"

    def __init__(self, buffer_fraction: float, limit_usd: float) -> None:
        self.buffer = buffer_fraction
        self.limit = limit_usd

    def check(self, action: Action, s: PortfolioSnapshot, ctx: RiskContext) -> str | None:
        room = s.equity_usd - s.drawdown_threshold_usd
        if room < self.buffer * self.limit:
            return f"room to drawdown limit {room:.2f} USD < {self.buffer:.0%} of {self.limit:.0f}"
        return None


class RiskEngine:
    """Applies the hard limits and the veto rules to a fused action."""

    def __init__(self, settings: Settings, clock: SessionClock, extra_rules: Sequence[RiskRule] = ()) -> None:
        r = settings.risk
        self.enable_veto = r.enable_risk_veto
        self.kill_switch = r.kill_switch  # also in ctx.kill_switch (Controls); kept for plain callers
        self.max_contracts = r.max_contracts
        self.daily_loss_limit = r.daily_loss_limit_usd
        self.reverse = settings.execution.reverse_on_opposite
        self.clock = clock
        self.guide_rules: list[RiskRule] = [
            ConsecutiveLosses(r.max_consecutive_losses),
            MinWinRate(r.min_win_rate_threshold, r.win_rate_min_trades),
            DrawdownBuffer(r.dd_buffer_threshold, settings.account.trailing_drawdown_usd),
        ]
        self.extra_rules = list(extra_rules)
        # minute of the day ─▶ its trading_hours veto and the HOLD verdict with that veto alone:
        # a policy may propose entries on every bar outside the window (at most 1440 entries)
        self._outside: dict[int, tuple[Veto, Verdict]] = {}

    def review(self, action: Action, s: PortfolioSnapshot, ctx: RiskContext) -> Verdict:
        pos = s.position
        # Hard limits that flatten: kill switch, daily loss, trailing drawdown breach, session end.
        flatten_reason = ""
        if self.kill_switch or ctx.kill_switch:
            flatten_reason = "kill_switch"
        elif ctx.flatten:
            flatten_reason = ctx.flatten
        elif s.daily_pnl_usd <= -self.daily_loss_limit:
            flatten_reason = "daily_loss_limit"
        elif s.equity_usd <= s.drawdown_threshold_usd:
            flatten_reason = "trailing_drawdown_breached"
        elif self.clock.past_flatten(ctx.minute_of_day):
            flatten_reason = "flatten_before_close"
        if flatten_reason:
            opens = action != Action.HOLD and _opens_exposure(action, pos, self.reverse)
            blocked = (Veto(flatten_reason, "entries blocked"),) if opens else ()
            return Verdict(Action.HOLD, blocked, flatten=pos != 0, flatten_reason=flatten_reason)

        if action in _ALWAYS_PASS:
            return _PASSED[action]
        is_exit = (action == Action.SELL and pos > 0) or (action == Action.BUY and pos < 0)
        if is_exit and not self.reverse:
            return _PASSED[action]  # a pure exit is never blocked (is_exit: action is BUY or SELL)

        vetoes: list[Veto] = []
        if ctx.halted:
            vetoes.append(Veto("halted", ctx.halt_reason or "trading halted"))
        if ctx.catching_up:
            vetoes.append(Veto("catching_up", "backfilled bar after a reconnect"))
        outside = None
        minute = ctx.minute_of_day
        if not self.clock.in_entry_window(minute) and action != Action.ENABLE_TRAIL:
            outside = self._outside.get(minute) if type(minute) is int else None
            if outside is None:
                veto = Veto("trading_hours", f"minute {minute} outside the entry window")
                outside = (veto, Verdict(Action.HOLD, (veto,)))
                if type(minute) is int:  # the text is the key's: 570 and 570.0 would read differently
                    self._outside[minute] = outside
            vetoes.append(outside[0])
        if (action == Action.BUY and pos >= self.max_contracts) or (
            action == Action.SELL and -pos >= self.max_contracts
        ):
            vetoes.append(Veto("max_contracts", f"position {pos} at max {self.max_contracts}"))
        if self.enable_veto:
            for rule in self.guide_rules:
                why = rule.check(action, s, ctx)
                if why:
                    vetoes.append(Veto(rule.name, why))
        for rule in self.extra_rules:
            why = rule.check(action, s, ctx)
            if why:
                vetoes.append(Veto(rule.name, why))
        if not vetoes:
            return _PASSED.get(action) or Verdict(action)  # a plug-in fusion's odd action as it is
        if is_exit:  # a vetoed reversal still closes the position
            return Verdict(action, tuple(vetoes), reduce_only=True)
        if outside is not None and len(vetoes) == 1:
            return outside[1]  # only outside the entry window: the minute's shared verdict
        return Verdict(Action.HOLD, tuple(vetoes))


# The verdict of an action that passes with no veto, one shared (frozen) object per action: most
# bars pass, and building a Verdict per bar costs more than the rest of the review.
_PASSED = {a: Verdict(a) for a in Action}
_ALWAYS_PASS = frozenset({Action.HOLD, Action.MOVE_TO_BE, Action.DISABLE_TRAIL})


def _opens_exposure(action: Action, pos: int, reverse: bool) -> bool:
    if action == Action.ENABLE_TRAIL:
        return True
    if action == Action.BUY:
        return pos >= 0 or reverse
    if action == Action.SELL:
        return pos <= 0 or reverse
    return False


def load_rules(
    paths: Sequence[str], options: dict[str, dict[str, Any]], settings: Settings
) -> list[RiskRule]:
    """Risk rule plug-ins by dotted path, each called with (settings, **options[path])."""
    rules = []
    for p in paths:
        factory = load_object(p, "risk.rules")
        rule = factory(settings, **options.get(p, {}))
        if not callable(getattr(rule, "check", None)) or not isinstance(getattr(rule, "name", None), str):
            raise ConfigError(f"risk.rules: {p!r} does not provide name and check()")
        rules.append(rule)
    return rules
