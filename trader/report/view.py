"""One run read back from its journal, for the report page and ``trader report``.

Everything comes from the journal (runs, decisions, trades, account, llm_queries, bars), except
the candles of a replay: a replay does not journal its bars (``journal_bars`` is for the service's
recovery and would double the rows a replay writes), so their open/high/low come from the run's
data files (``runs.data_files``), read again through the same loader with the run's own
``[data]`` settings, and are used only when every decided bar is found there with the close the
decision journaled. Otherwise the page says why and draws the journaled closes as a line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from pydantic import ValidationError

from trader.config import DataConfig, InstrumentConfig
from trader.domain import Action, Trade
from trader.errors import JournalError, TraderError
from trader.features.clock import SessionClock
from trader.journal import reader
from trader.journal.reader import AdviceAnswer, MarkedDecision, RunInfo

ENTRY_ACTIONS = (int(Action.BUY), int(Action.SELL))
NO_ADVICE_METHODS = ("warmup", "rl_only", "redrive", "policy_invalid")


@dataclass
class RunView:
    """A run as the report shows it. Arrays are per decided bar, in bar order; ``open``, ``high``
    and ``low`` are None when the candles could not be rebuilt (``candles_note`` says why)."""

    journal_path: Path
    info: RunInfo
    config: dict[str, Any]
    start_balance_usd: float
    tz: ZoneInfo
    clock: SessionClock
    bar_seconds: int
    ts_ns: np.ndarray
    close: np.ndarray
    equity_usd: np.ndarray
    position: np.ndarray
    trades: list[tuple[int, Trade]]
    marked: list[MarkedDecision]
    stops: list[tuple[int, float | None]]
    answers: dict[int, AdviceAnswer]
    open: np.ndarray | None = None
    high: np.ndarray | None = None
    low: np.ndarray | None = None
    candles_from: str = ""  # where the candles came from, or why there are none
    notes: list[str] = field(default_factory=list)

    def llm_decided(self) -> list[MarkedDecision]:
        """Decisions where the LLM's advice changed the RL's action (an override, a weighted win,
        or an uncertainty hold)."""
        return [
            d
            for d in self.marked
            if d.llm_action is not None
            and d.method not in NO_ADVICE_METHODS
            and d.fused_action != d.rl_action
        ]

    def vetoed_entries(self) -> list[MarkedDecision]:
        """Decisions whose fused BUY or SELL a risk rule turned into something else (HOLD)."""
        return [
            d
            for d in self.marked
            if d.vetoes and d.fused_action in ENTRY_ACTIONS and d.final_action != d.fused_action
        ]


def pick_run(journal: str | Path, run_id: str | None) -> RunInfo:
    """The run ``run_id`` names (the full id or a unique prefix of 4+ characters), or the latest
    run; a clear :class:`JournalError` listing the journal's runs otherwise."""
    found = reader.runs(journal)
    if not found:
        raise JournalError(f"journal {journal} has no runs")
    if run_id is None:
        return found[-1]
    exact = [r for r in found if r.run_id == run_id]
    prefixed = [r for r in found if len(run_id) >= 4 and r.run_id.startswith(run_id)]
    if exact or len(prefixed) == 1:
        return (exact or prefixed)[0]
    listed = ", ".join(f"{r.run_id} ({r.mode}, {r.status}, {r.started_at[:16]})" for r in found[-5:][::-1])
    why = "matches several runs" if len(prefixed) > 1 else "is not in"
    more = f" ({len(found)} run{'s' * (len(found) != 1)}; the latest {min(5, len(found))}: {listed})"
    raise JournalError(f"run {run_id!r} {why} journal {journal}{more}")


def _section(config: dict[str, Any], name: str, model: Any, notes: list[str]) -> Any:
    try:
        return model.model_validate(config.get(name, {}))
    except ValidationError as exc:
        notes.append(
            f"the run's [{name}] settings do not load here ({exc.error_count()} problems); defaults used"
        )
        return model()


def load_run(journal: str | Path, run_id: str | None = None) -> RunView:
    """Read a run back: its row, decisions, trades, stop levels, LLM answers and (for candles) the
    journaled bars or the run's data files."""
    path = Path(journal)
    info = pick_run(path, run_id)
    notes: list[str] = []
    try:
        config = json.loads(info.config_json)
    except json.JSONDecodeError as exc:
        raise JournalError(f"journal {path}: run {info.run_id} has an unreadable config_json: {exc}") from exc
    instrument = _section(config, "instrument", InstrumentConfig, notes)
    start = float(config.get("account", {}).get("starting_balance_usd", 50_000.0))
    series = reader.decision_series(path, info.run_id)
    view = RunView(
        journal_path=path,
        info=info,
        config=config,
        start_balance_usd=start,
        tz=ZoneInfo(instrument.timezone),
        clock=SessionClock(instrument),
        bar_seconds=int(config.get("data", {}).get("bar_seconds", 60)),
        ts_ns=np.asarray(series.ts_ns, dtype=np.int64),
        close=np.asarray(series.close, dtype=np.float64),
        equity_usd=np.asarray(series.equity_usd, dtype=np.float64),
        position=np.asarray(series.position, dtype=np.int64),
        trades=reader.run_trades(path, info.run_id),
        marked=reader.marked_decisions(path, info.run_id),
        stops=reader.stop_levels(path, info.run_id),
        answers=reader.advice_answers(path, info.run_id),
        notes=notes,
    )
    _attach_candles(view, series.bar_index, instrument)
    return view


def _attach_candles(view: RunView, bar_index: list[int], instrument: InstrumentConfig) -> None:
    if not len(view.ts_ns):
        view.candles_from = "no decided bars"
        return
    bars = reader.journaled_bars(view.journal_path, view.info.run_id)
    if bars:
        if all(i in bars for i in bar_index):
            picked = [bars[i] for i in bar_index]
            _use(view, picked_ohlc(picked), "the journal's bars table")
            return
        view.candles_from = "the journal's bars table misses some decided bars"
        return
    view.candles_from = _candles_from_files(view, instrument)


def picked_ohlc(bars: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray([b.open for b in bars], dtype=np.float64),
        np.asarray([b.high for b in bars], dtype=np.float64),
        np.asarray([b.low for b in bars], dtype=np.float64),
        np.asarray([b.close for b in bars], dtype=np.float64),
    )


def _use(view: RunView, ohlc: tuple[np.ndarray, ...], source: str) -> None:
    o, h, lo, c = ohlc
    if not np.array_equal(c, view.close):
        view.candles_from = f"{source} (closes differ from the journaled decisions: not used)"
        return
    view.open, view.high, view.low = o, h, lo
    view.candles_from = source


def _candles_from_files(view: RunView, instrument: InstrumentConfig) -> str:
    """OHLC of the decided bars from the run's data files (a replay), read as the run read them
    (its ``[data]`` settings, tick size and symbol), or why not."""
    from trader.feeds.replay import load_bars  # polars; only for a replay's candles

    files = [Path(f) for f in view.info.data_files]
    if not files:
        return "the run names no data files (a live run without journaled bars)"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return f"data file not found: {', '.join(missing)}"
    try:
        data_cfg = DataConfig.model_validate(view.config.get("data", {}))
        rb = load_bars(data_cfg, files, tick_size=instrument.tick_size, symbol=instrument.symbol)
    except (ValidationError, TraderError, OSError) as exc:
        return f"the run's data files do not load again: {str(exc).splitlines()[0][:200]}"
    ok = rb.accepted()
    ts = rb.ts_ns[ok]
    order = np.argsort(ts, kind="stable")
    pos = np.searchsorted(ts[order], view.ts_ns)
    pos = np.minimum(pos, len(ts) - 1)
    rows = order[pos]
    if not np.array_equal(ts[rows], view.ts_ns):
        return "the run's data files no longer hold every decided bar (changed since the run?)"
    names = ", ".join(f.name for f in files)
    o, h, lo, c = (getattr(rb, k)[ok][rows].astype(np.float64) for k in ("open", "high", "low", "close"))
    _use(view, (o, h, lo, c), f"the run's data files ({names})")
    return view.candles_from
