"""Position and account accounting, driven by fills and bar marks.

Money in USD, prices in index points on the tick grid. The trailing drawdown is Apex-style: the
liquidation threshold trails the peak equity (marked at each bar's favourable extreme) by
``trailing_drawdown_usd`` and stops trailing once it reaches start balance + lock offset.
Trade statistics (consecutive losses, win rate of the last 10 trades) feed the risk veto.
"""

from __future__ import annotations

from collections import deque

from trader.config import Settings
from trader.domain import Bar, Fill, PortfolioSnapshot, Side, Trade


class Portfolio:
    """Single-instrument account. Only the engine mutates it (fills, marks, protection updates)."""

    def __init__(self, settings: Settings) -> None:
        self.point_value = settings.instrument.point_value_usd
        acct = settings.account
        self.start_balance = acct.starting_balance_usd
        self.dd_limit = acct.trailing_drawdown_usd
        self.lock_level = acct.starting_balance_usd + acct.trailing_lock_offset_usd
        self.position = 0
        self.avg_entry = 0.0
        self.balance_usd = acct.starting_balance_usd
        self.commissions_usd = 0.0
        self.unrealized_usd = 0.0
        self.last_close = 0.0
        self.peak_equity_usd = acct.starting_balance_usd
        self.threshold_usd = min(self.peak_equity_usd - self.dd_limit, self.lock_level)
        self.session_id = -1
        self.session_start_equity = acct.starting_balance_usd
        # a position still open when its session ended although flatten_at is set (an early close:
        # a holiday's 13:00, a gap in the data): the engine has the risk engine flatten it
        self.held_over = False
        self._flattens = settings.instrument.flatten_at != "off"
        self._marked_position = 0  # the position at the last bar's close (before this bar's fills)
        self.daily_trades = 0
        # protection state mirrored from the working stop
        self.stop_price: float | None = None
        self.trailing = False
        self.trail_ticks = 0
        self.at_break_even = False
        # open trade bookkeeping
        self.entry_ts_ns = 0
        self.bars_in_trade = 0
        self.entry_commission_usd = 0.0
        self.mae_usd = 0.0
        self.mfe_usd = 0.0
        # statistics
        self.trades: list[Trade] = []
        self.consecutive_losses = 0
        self.recent: deque[bool] = deque(maxlen=10)
        self.reset_stats_each_session = settings.risk.reset_stats_each_session
        # snapshot cache: rebuilt only when something it shows has changed
        self._version = 0
        self._snap_version = -1
        self._snap: PortfolioSnapshot | None = None

    def adopt_position(self, position: int, avg_entry: float, ts_ns: int) -> None:
        """Take the broker's position as ours (reconciliation with ``adopt_broker_state``). The
        balance is left as it is: what was realised outside this process is not ours to know."""
        self.position = position
        self.avg_entry = avg_entry if position else 0.0
        self.entry_ts_ns = ts_ns if position else 0
        self.bars_in_trade = 0
        self.entry_commission_usd = 0.0
        self.mae_usd = self.mfe_usd = 0.0
        if position == 0:
            self._clear_protection()
        self._mark(self.last_close or avg_entry)
        self._version += 1

    # -- protection (the working stop, as the broker confirmed it) -----------------------------
    def set_stop(self, price: float | None) -> None:
        if price != self.stop_price:
            self.stop_price = price
            self._version += 1

    def set_break_even(self) -> None:
        self.at_break_even = True
        self._version += 1

    def set_trailing(self, on: bool, ticks: int) -> None:
        self.trailing = on
        self.trail_ticks = ticks if on else 0
        self._version += 1

    # -- fills -------------------------------------------------------------------------------
    def apply_fill(self, fill: Fill) -> list[Trade]:
        """Update position, average price, realized P&L and statistics; returns closed trades."""
        closed: list[Trade] = []
        self._version += 1
        side = int(fill.side)
        qty = fill.qty
        commission = fill.commission_usd
        self.balance_usd -= commission
        self.commissions_usd += commission
        pos = self.position
        if pos == 0 or (pos > 0) == (side > 0):
            new_pos = pos + side * qty
            if pos == 0:
                self.entry_ts_ns = fill.ts_ns
                self.bars_in_trade = 0
                self.entry_commission_usd = 0.0
                self.mae_usd = self.mfe_usd = 0.0
                self.at_break_even = False
            self.avg_entry = (self.avg_entry * abs(pos) + fill.price * qty) / abs(new_pos)
            self.entry_commission_usd += commission
            self.position = new_pos
        else:
            close_qty = min(qty, abs(pos))
            pos_side = 1 if pos > 0 else -1
            gross = (fill.price - self.avg_entry) * pos_side * close_qty * self.point_value
            self.balance_usd += gross
            share = close_qty / abs(pos)
            entry_comm = self.entry_commission_usd * share
            self.entry_commission_usd -= entry_comm
            exit_comm = commission * close_qty / qty
            trade = Trade(
                self.entry_ts_ns,
                fill.ts_ns,
                Side(pos_side),
                close_qty,
                self.avg_entry,
                fill.price,
                gross - entry_comm - exit_comm,
                fill.purpose,
            )
            self._record_trade(trade)
            closed.append(trade)
            self.position = pos + side * close_qty
            rest = qty - close_qty
            if self.position == 0:
                self.avg_entry = 0.0
                self._clear_protection()
            if rest > 0:  # reversal in one order: the remainder opens the other side
                self.position = side * rest
                self.avg_entry = fill.price
                self.entry_ts_ns = fill.ts_ns
                self.bars_in_trade = 0
                self.entry_commission_usd = commission * rest / qty
                self.mae_usd = self.mfe_usd = 0.0
        self._mark(self.last_close or fill.price)
        return closed

    def _record_trade(self, t: Trade) -> None:
        self.trades.append(t)
        self.daily_trades += 1
        win = t.pnl_usd > 0
        self.recent.append(win)
        self.consecutive_losses = 0 if win else self.consecutive_losses + 1

    def _clear_protection(self) -> None:
        self.stop_price = None
        self.trailing = False
        self.trail_ticks = 0
        self.at_break_even = False

    # -- marks -------------------------------------------------------------------------------
    def _mark(self, price: float) -> None:
        self.unrealized_usd = (
            (price - self.avg_entry) * self.position * self.point_value if self.position else 0.0
        )

    def mark_bar(self, bar: Bar, session_id: int) -> None:
        """Mark to the bar's close; trail the drawdown peak with the bar's favourable extreme."""
        if session_id != self.session_id:
            # held at the last bar's close: an order filled at this bar's open is the new session's
            if self._marked_position and self._flattens and self.session_id >= 0:
                self.held_over = True
            self.session_id = session_id
            self.session_start_equity = self.balance_usd + self.unrealized_usd
            self.daily_trades = 0
            if self.reset_stats_each_session:
                # A new session starts with a clean streak: otherwise a streak veto could never lift,
                # since no trade can happen while it holds.
                self.consecutive_losses = 0
                self.recent.clear()
            self._version += 1
        self.last_close = bar.close
        pos = self._marked_position = self.position
        if pos:
            self._version += 1
            self.bars_in_trade += 1
            pv = self.point_value
            best = (bar.high if pos > 0 else bar.low) - self.avg_entry
            worst = (bar.low if pos > 0 else bar.high) - self.avg_entry
            best_usd, worst_usd = best * pos * pv, worst * pos * pv
            self.mfe_usd = max(self.mfe_usd, best_usd)
            self.mae_usd = min(self.mae_usd, worst_usd)
            peak_candidate = self.balance_usd + best_usd
        else:
            peak_candidate = self.balance_usd
        self._mark(bar.close)
        equity = self.balance_usd + self.unrealized_usd
        peak = max(self.peak_equity_usd, peak_candidate, equity)
        if peak > self.peak_equity_usd:
            self.peak_equity_usd = peak
            self.threshold_usd = max(self.threshold_usd, min(peak - self.dd_limit, self.lock_level))

    # -- views -------------------------------------------------------------------------------
    @property
    def equity_usd(self) -> float:
        return self.balance_usd + self.unrealized_usd

    def snapshot(self) -> PortfolioSnapshot:
        """The current state; the same object is returned while nothing has changed."""
        if self._snap_version == self._version and self._snap is not None:
            return self._snap
        recent = self.recent
        equity = self.balance_usd + self.unrealized_usd
        self._snap_version = self._version
        self._snap = PortfolioSnapshot(
            position=self.position,
            avg_entry=self.avg_entry,
            stop_price=self.stop_price,
            trailing=self.trailing,
            at_break_even=self.at_break_even,
            bars_in_trade=self.bars_in_trade,
            unrealized_usd=self.unrealized_usd,
            balance_usd=self.balance_usd,
            equity_usd=equity,
            peak_equity_usd=self.peak_equity_usd,
            drawdown_threshold_usd=self.threshold_usd,
            daily_pnl_usd=equity - self.session_start_equity,
            consecutive_losses=self.consecutive_losses,
            recent_win_rate=(sum(recent) / len(recent)) if recent else None,
            recent_trades=len(recent),
            mae_usd=self.mae_usd,
            mfe_usd=self.mfe_usd,
        )
        return self._snap
