"""The replay's progress on a terminal (rich.progress): bars done of all, bars/s, ETA, trades,
net P&L and whether an LLM query is in flight.

A run observer: :meth:`ReplayProgress.on_event` only records numbers from the engine's events and
returns (the bar loop never waits on the terminal); rich's own refresh thread draws them a few
times a second. Nothing is drawn unless stderr is a terminal, so pipes and logs get nothing extra.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import Progress, ProgressColumn, Task
from rich.progress_bar import ProgressBar
from rich.text import Text

from trader.domain import BarDecided, BatchDone, FillApplied


class _Column(ProgressColumn):
    """A column drawn from the observer's numbers (never from rich's task, which the bar loop
    does not update: no lock is shared with the drawing thread)."""

    def __init__(self, draw: Any) -> None:
        super().__init__()
        self.draw = draw

    def render(self, task: Task) -> RenderableType:
        return self.draw()


class ReplayProgress:
    """Progress of one replay on stderr; use as a context manager around the run, and pass it as
    a run observer only when :attr:`enabled`."""

    def __init__(
        self, start_balance_usd: float, llm_mode: str = "off", console: Console | None = None
    ) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = console is not None or sys.stderr.isatty()
        self.start_balance_usd = start_balance_usd
        self.llm = llm_mode != "off"
        self.done = 0
        self.total = 0
        self.trades = 0
        self.equity_usd = start_balance_usd
        self.llm_in_flight = 0  # at most one query is in flight at a time
        self.t0: float | None = None  # the first bar's arrival (model loading is not counted)
        self._progress: Progress | None = None

    # -- the observer (bar loop) ---------------------------------------------------------------------
    def on_event(self, event: object) -> None:
        if isinstance(event, BarDecided):
            self.equity_usd = event.equity_usd
            self.llm_in_flight = int(event.llm_busy)
            if self.t0 is None:
                self.t0 = time.perf_counter()
        elif isinstance(event, FillApplied):
            self.trades += len(event.trades)
        elif isinstance(event, BatchDone):
            self.done = event.bars
            self.total = max(event.total_bars or event.bars, event.bars)

    # -- what is drawn (rich's thread) ---------------------------------------------------------------
    def rate(self) -> float:
        """Bars per second since the first bar."""
        if self.t0 is None:
            return 0.0
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def _bar(self) -> RenderableType:
        return ProgressBar(total=max(self.total, 1), completed=self.done, width=30)

    def _counts(self) -> RenderableType:
        if not self.total:
            return Text("loading the policy, the data and the model ...")
        pct = self.done / self.total
        return Text(f"{pct:6.1%} {self.done:,}/{self.total:,} bars")

    def _speed(self) -> RenderableType:
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = "--:--" if left is None else time.strftime("%H:%M:%S", time.gmtime(left))
        return Text(f"{rate:,.0f} bars/s  ETA {eta}")

    def _pnl(self) -> RenderableType:
        pnl = self.equity_usd - self.start_balance_usd
        style = "green" if pnl > 0 else "red" if pnl < 0 else ""
        return Text.assemble(f"{self.trades} trades  net P&L ", (f"{pnl:+,.2f}", style), " USD")

    def _llm(self) -> RenderableType:
        return Text(f"LLM queries in flight {self.llm_in_flight}" if self.llm else "")

    # -- lifetime ------------------------------------------------------------------------------------
    def __enter__(self) -> ReplayProgress:
        if self.enabled:
            self._progress = Progress(
                _Column(lambda: Text("replay", style="bold")),
                _Column(self._bar),
                _Column(self._counts),
                _Column(self._speed),
                _Column(self._pnl),
                _Column(self._llm),
                console=self.console,
                refresh_per_second=4,
                transient=False,
            )
            self._progress.add_task("replay", total=None)
            self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None


class CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the moment: log lines then go above
    the progress display (rich redirects sys.stderr while it draws) instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
