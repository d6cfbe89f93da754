"""One replay from configuration to its report: build (wiring), run, close, finish the run row.

The CLI's ``trader replay``, sweeps, walk-forward and compare all replay through :func:`run_replay`
(or :func:`replay`, its synchronous form for worker processes), so every replay is the same
engine, journal and report whoever asks for it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trader.config import Settings
from trader.domain import Trade
from trader.engine import RunStats
from trader.ports import RunObserver


@dataclass
class ReplayOutcome:
    """What one replay left: its id, journal, status, report (also journaled in the run row), the
    statistics and trades, and how many bars it could decide (usable bars less the warm-up)."""

    run_id: str
    journal_path: Path
    status: str  # completed | stopped | failed
    report: dict[str, Any]
    stats: RunStats
    trades: list[Trade]
    usable_bars: int
    decided_bars: int
    warmup_bars: int


async def run_replay(
    settings: Settings,
    *,
    journal_path: str | Path | None = None,
    data_paths: list[Path] | None = None,
    observers: Sequence[RunObserver] = (),
    run_id: str | None = None,
    pin_cpu: bool = True,
    handle_signals: bool = True,
) -> ReplayOutcome:
    """Replay recorded bars through the engine and report. ``pin_cpu``: pin the bar loop as
    ``cpu`` says (off for many replays side by side); ``handle_signals``: SIGINT/SIGTERM stop
    after the current bar (main thread only). The run row is finished even when the run fails;
    the exception then propagates."""
    from trader.llm.isolation import pin_bar_loop
    from trader.report import build_report, llm_report
    from trader.wiring import build_replay

    run = build_replay(settings, journal_path, data_paths, run_id=run_id, observers=observers)
    if pin_cpu:
        pin_bar_loop(settings.cpu, beside=(run.journal.writer_pid,))
    engine, journal = run.engine, run.journal
    loop = asyncio.get_running_loop()
    signals = (
        (signal.SIGINT, signal.SIGTERM)
        if handle_signals and threading.current_thread() is threading.main_thread()
        else ()
    )
    for sig in signals:
        loop.add_signal_handler(sig, engine.request_stop)
    assert run.recorded is not None
    usable, warmup = int(run.recorded.accepted().sum()), engine.warmup
    decided = run.recorded.bars_after_warmup(warmup)
    status = "failed"
    try:
        stats = await engine.run()
        status = stats.status
    finally:
        try:
            # data.close_at_end: a position still open after the last bar is closed at its close
            # (a failed run is left as it is: what it holds is for recovery to see)
            flatten = settings.data.close_at_end and status != "failed"
            await engine.close(flatten=flatten, reason="flatten:end_of_replay")
            engine.end_of_run()  # the last session's summary, the close at the end included
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            report = build_report(
                engine.stats,
                engine.portfolio.trades,
                settings.account.starting_balance_usd,
                engine.clock,
                {
                    "run_id": run.run_id,
                    "journal": str(journal.path),
                    # which tables hold this run (journal.level): full | trades | summary
                    "journal_level": settings.journal.level,
                    "llm": llm_report(engine.advisor, engine.stats, settings.advisor.mode),
                },
            )
            try:
                journal.finish_run(run.run_id, status, engine.stats.bars, report["bars_rejected"], report)
            finally:
                journal.close()
    return ReplayOutcome(
        run.run_id,
        Path(journal.path),
        status,
        report,
        engine.stats,
        list(engine.portfolio.trades),
        usable,
        decided,
        warmup,
    )


def replay(
    settings: Settings,
    *,
    journal_path: str | Path | None = None,
    data_paths: list[Path] | None = None,
    observers: Sequence[RunObserver] = (),
    run_id: str | None = None,
    pin_cpu: bool = False,
    handle_signals: bool = False,
) -> ReplayOutcome:
    """:func:`run_replay` on its own event loop (uvloop where installed): for worker processes
    and threads that have no loop (sweeps, walk-forward, compare)."""
    coro = run_replay(
        settings,
        journal_path=journal_path,
        data_paths=data_paths,
        observers=observers,
        run_id=run_id,
        pin_cpu=pin_cpu,
        handle_signals=handle_signals,
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
