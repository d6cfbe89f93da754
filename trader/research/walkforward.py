"""Walk-forward: train a policy on each window of trading sessions, test it on the sessions that
follow through the replay path, roll on, and stitch the out-of-sample segments into one equity
curve and one report (``trader walk-forward``).

**Windows** are counted in trading sessions of the session clock (:mod:`trader.features.clock`: a
session runs from ``instrument.session_open`` to its close and is named by the local day it ends).
A session counts when it has a bar that can be decided (after the ``features.warmup_bars`` warm-up
of the data) inside the entry window. Window k (from 0) trains on sessions ``[k·step, k·step +
train_days)`` and tests on the ``test_days`` sessions right after them; ``step`` defaults to
``test_days`` and may not be smaller, since overlapping test windows would count sessions twice.

**No test information reaches training.** A training run loads only the bars before its test
window's first bar (``data.end`` = the test start, exclusive; :func:`trader.train.ppo.train`
measures its observation normalisation on the training episodes alone), and the indicators are
causal. A training window's warm-up history is the ``warmup`` bars before its first session; the
first window, when the data holds no earlier bars, warms up on the start of its first session, as
the bundled policy did. Every window trains with the same seed (``TrainConfig.seed``), one torch
thread and deterministic algorithms, so the same command gives the same policies, whether the
windows train one after another or as parallel Ray tasks (``workers`` > 1, one CPU each).

**Test replays** run through :func:`trader.replay.replay` (the engine, journal and report of
``trader replay``) with the window's policy and the LLM advisor off (this measures the RL policy;
``trader compare`` asks whether the LLM helps). Each starts ``warmup`` accepted bars before the
window's first bar, so the engine's warm-up ends exactly there: the first decided bar is the
window's first bar (checked), and the bars before it are indicator history, never traded.

**Stitching, exactly.** Each test replay starts a fresh account at
``account.starting_balance_usd`` (a new policy is a new deployment: trailing drawdown, daily loss
and the risk statistics start over). Segment k is that replay's marked equity (balance +
unrealized) from its first decided bar to its last bar; its net P&L is its last equity minus the
starting balance, which is the ``net_pnl`` of the replay's journaled report. The stitched curve
is segment k's equity plus the net P&L of segments 0..k−1: each segment starts from the previous
one's ending equity, and the stitched net P&L is the sum of the segments' net P&L. The stitched
report is :func:`trader.report.build_report` over the stitched bars and every segment's trades
(the same statistics as a replay's report: Sharpe and Sortino on per-session returns of the
stitched curve). A position still open at a window's last bar (a session that closed before
``instrument.flatten_at``, e.g. a holiday) is marked at that bar's close, as a replay report marks
it, and the next segment starts flat.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import numpy as np

from trader.config import Settings
from trader.domain import Trade
from trader.engine import RunStats
from trader.errors import ConfigError, DataError, TraderError
from trader.features.clock import SessionClock
from trader.features.warmup import warmup_bars
from trader.feeds.replay import bound_ns, load_bars

if TYPE_CHECKING:  # torch loads only where training runs
    from trader.train.ppo import TrainConfig, TrainedPolicy

NS = 1_000_000_000
EPOCH_DAY = date(1970, 1, 1)
Progress = Callable[[str], None]


def quiet(_: str) -> None:
    return None


def iso(ts_ns: int, tz: str) -> str:
    """Epoch ns as an ISO date-time with its UTC offset in ``tz`` (exact to the microsecond)."""
    dt = datetime.fromtimestamp(ts_ns // NS, ZoneInfo(tz)) + timedelta(microseconds=(ts_ns % NS) // 1000)
    return dt.isoformat()


def session_day(session_id: int) -> str:
    """The session clock's id (the local day number on which the session ends) as an ISO date."""
    return (EPOCH_DAY + timedelta(days=session_id)).isoformat()


# -- the data's sessions ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Session:
    """One trading session of the data: rows index the accepted bars."""

    session_id: int
    day: str  # local date on which it ends
    first_row: int
    end_row: int  # one past its last bar


@dataclass(frozen=True)
class DataIndex:
    """The accepted bars' times, the sessions that can be traded, and the warm-up in bars."""

    ts_ns: np.ndarray
    sessions: tuple[Session, ...]
    warmup: int
    paths: tuple[Path, ...]
    tz: str

    def iso(self, row: int) -> str:
        return iso(int(self.ts_ns[row]), self.tz)

    def row_at(self, ts_ns: int) -> int:
        """The first row at or after ``ts_ns``."""
        return int(np.searchsorted(self.ts_ns, ts_ns))


def data_paths_of(settings: Settings, data_paths: Sequence[Path] | None) -> tuple[Path, ...]:
    """The data files as absolute paths (worker processes may run elsewhere)."""
    return tuple(Path(p).resolve() for p in (data_paths if data_paths else settings.data.paths))


def index_data(settings: Settings, data_paths: Sequence[Path] | None = None) -> DataIndex:
    """Load the bars ``settings.data`` selects and find their tradable sessions."""
    paths = data_paths_of(settings, data_paths)
    rec = load_bars(
        settings.data, list(paths), tick_size=settings.instrument.tick_size, symbol=settings.instrument.symbol
    )
    ts = rec.ts_ns[rec.accepted()]
    warm = warmup_bars(settings)
    clock = SessionClock(settings.instrument)
    sid = clock.session_id_batch(ts)
    minute = (clock.local_s_batch(ts) // 60) % 1440
    tradable = clock.in_entry_window_batch(minute) & (np.arange(len(ts)) >= warm)
    bounds = np.flatnonzero(np.diff(sid)) + 1
    starts = np.concatenate(([0], bounds)).astype(int)
    ends = np.concatenate((bounds, [len(ts)])).astype(int)
    sessions = tuple(
        Session(int(sid[a]), session_day(int(sid[a])), int(a), int(b))
        for a, b in zip(starts, ends, strict=True)
        if tradable[a:b].any()
    )
    return DataIndex(ts, sessions, warm, paths, settings.data.timezone)


# -- windows --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One walk-forward window: training sessions, then test sessions (rows of the data index)."""

    index: int
    train: tuple[Session, ...]
    test: tuple[Session, ...]

    @property
    def train_first_row(self) -> int:
        return self.train[0].first_row

    @property
    def test_first_row(self) -> int:
        return self.test[0].first_row

    @property
    def test_end_row(self) -> int:
        return self.test[-1].end_row


def plan_windows(index: DataIndex, train_days: int, test_days: int, step: int | None = None) -> list[Window]:
    """Rolling windows over the data's sessions (see the module docstring)."""
    step = test_days if step is None else step
    for name, v in (("--train-days", train_days), ("--test-days", test_days), ("--step", step)):
        if v < 1:
            raise ConfigError(f"walk-forward {name}: {v} is not a positive number of sessions")
    if step < test_days:
        raise ConfigError(
            f"walk-forward --step {step} < --test-days {test_days}: test windows would overlap and the "
            "stitched out-of-sample curve would count sessions twice"
        )
    s = index.sessions
    if train_days + test_days > len(s):
        raise DataError(
            f"walk-forward: the data holds {len(s)} tradable sessions "
            f"({', '.join(x.day for x in s) or 'none'}); {train_days} training + {test_days} test "
            "sessions do not fit"
        )
    out = []
    k = 0
    while k * step + train_days + test_days <= len(s):
        a = k * step
        w = Window(k, tuple(s[a : a + train_days]), tuple(s[a + train_days : a + train_days + test_days]))
        if w.test_first_row < index.warmup:
            raise DataError(
                f"walk-forward window {k}: only {w.test_first_row} bars before its test start "
                f"{index.iso(w.test_first_row)}; the indicators need {index.warmup} (features.warmup_bars)"
            )
        out.append(w)
        k += 1
    return out


def window_settings(settings: Settings, index: DataIndex, first_row: int, end_row: int) -> Settings:
    """``settings`` with ``data.start`` at the warm-up history before ``first_row`` (from the data's
    start when it has less) and ``data.end`` at ``end_row`` (exclusive; the configured end when it
    is the end of the data)."""
    lo = first_row - index.warmup
    start = index.iso(lo) if lo > 0 else settings.data.start
    end = index.iso(end_row) if end_row < len(index.ts_ns) else settings.data.end
    return settings.model_copy(update={"data": settings.data.model_copy(update={"start": start, "end": end})})


# -- one window's replay ------------------------------------------------------------------------------
@dataclass
class Segment:
    """The out-of-sample part of one window's replay: its bars from the first decided one on."""

    run_id: str
    journal: Path
    report: dict[str, Any]  # the replay's report, as journaled (its bar counts include the warm-up)
    stats: RunStats  # the window's bars only
    trades: list[Trade]
    start_balance: float
    llm: dict[str, Any] = field(default_factory=dict)

    @property
    def net_pnl(self) -> float:
        eq = self.stats.equity
        return float(eq[-1]) - self.start_balance if len(eq) else 0.0


def _per_bar(name: str, value: Any) -> bool:
    """A RunStats field with one value per decided bar (a list or an engine column)."""
    return name != "actions" and hasattr(value, "extend") and hasattr(value, "__len__")


def without_warmup(full: RunStats, warm: int) -> RunStats:
    """A run's statistics from its first decided bar on (the warm-up bars are HOLDs, never traded)."""
    st = RunStats()
    for f in fields(RunStats):
        v = getattr(full, f.name)
        if _per_bar(f.name, v):
            getattr(st, f.name).extend(np.asarray(v)[warm:].tolist())
        elif isinstance(v, dict):
            setattr(
                st, f.name, {k: x for k, x in v.items() if not (f.name == "fusion_methods" and k == "warmup")}
            )
        elif isinstance(v, list):
            setattr(st, f.name, list(v))
        else:
            setattr(st, f.name, v)
    st.actions[0] -= warm
    st.bars = full.bars - warm
    return st


def replay_segment(
    settings: Settings,
    index: DataIndex,
    first_row: int,
    end_row: int,
    *,
    journal_path: Path,
    run_id: str,
) -> Segment:
    """Replay bars ``[first_row, end_row)`` of the index with their warm-up history before them;
    checks that the first decided bar is ``first_row``'s."""
    from trader.replay import replay

    s = window_settings(settings, index, first_row, end_row)
    out = replay(s, journal_path=journal_path, data_paths=list(index.paths), run_id=run_id)
    if out.status != "completed":
        raise TraderError(f"replay {run_id} of {index.iso(first_row)} .. ended {out.status}")
    stats = out.stats
    warm = stats.fusion_methods.get("warmup", 0)
    first_ts = int(index.ts_ns[first_row])
    if warm >= len(stats.ts_ns) or stats.ts_ns[warm] != first_ts:
        got = iso(stats.ts_ns[warm], index.tz) if warm < len(stats.ts_ns) else "none"
        raise TraderError(
            f"replay {run_id}: the first decided bar is {got}, not the window's first bar "
            f"{index.iso(first_row)} (features not ready after {index.warmup} warm-up bars?)"
        )
    trades = [t for t in out.trades if t.entry_ts_ns >= first_ts]
    return Segment(
        out.run_id,
        out.journal_path,
        out.report,
        without_warmup(stats, warm),
        trades,
        settings.account.starting_balance_usd,
        dict(out.report.get("llm") or {}),
    )


def stitch(segments: Sequence[Segment]) -> RunStats:
    """One run's statistics from consecutive segments, each starting from the previous one's
    ending equity (see the module docstring): per-bar values chained, counts summed."""
    if not segments:
        raise ValueError("stitch: no segments")
    st = RunStats()
    st.status = "completed"  # unless a segment says otherwise
    offset = 0.0
    last_ts = -1
    for seg in segments:
        s = seg.stats
        if len(s.ts_ns) and s.ts_ns[0] <= last_ts:
            raise ValueError(f"stitch: segment {seg.run_id} starts before the previous one ends")
        for f in fields(RunStats):
            v, acc = getattr(s, f.name), getattr(st, f.name)
            if f.name == "equity":
                acc.extend((np.asarray(v, dtype=np.float64) + offset).tolist())
            elif _per_bar(f.name, v):
                acc.extend(np.asarray(v).tolist())
            elif f.name == "actions":
                st.actions = [a + b for a, b in zip(acc, v, strict=True)]
            elif isinstance(v, dict):
                for k, x in v.items():
                    acc[k] = acc.get(k, 0) + x
            elif isinstance(v, int | float) and not isinstance(v, bool):
                setattr(st, f.name, acc + v)
        if s.status != "completed":
            st.status = s.status
        offset += seg.net_pnl
        last_ts = int(s.ts_ns[-1]) if len(s.ts_ns) else last_ts
    return st


def segment_report(seg: Segment, clock: SessionClock) -> dict[str, Any]:
    """The replay report's statistics over the segment's own bars (warm-up left out)."""
    from trader.report import build_report

    return build_report(seg.stats, seg.trades, seg.start_balance, clock)


# -- walk-forward ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTask:
    """One window's training, self-contained (it may run in a Ray worker process)."""

    window: int
    settings: Settings  # data.start/end cut to the training window's bars
    config: TrainConfig
    data_paths: tuple[Path, ...]
    out: Path
    run_dir: Path
    metadata: dict[str, str]


def train_window(task: TrainTask) -> TrainedPolicy:
    """Train and export one window's policy (torch is imported here, where training runs)."""
    from trader.train.ppo import train_and_export

    return train_and_export(
        task.settings,
        task.config,
        task.out,
        task.run_dir,
        list(task.data_paths),
        extra_metadata=task.metadata,
    )


def train_all(tasks: Sequence[TrainTask], workers: int, address: str | None = None) -> list[TrainedPolicy]:
    """Every window's training: in this process one after another (``workers`` <= 1 and no
    ``address``), else as Ray tasks of one CPU each, at most ``workers`` at a time, on an
    embedded Ray (:mod:`trader.research.ray_runtime`, shut down after unless one was already
    running) or the cluster at ``address``."""
    if address is None and (workers <= 1 or len(tasks) <= 1):
        return [train_window(t) for t in tasks]
    import ray

    from trader.research.ray_runtime import session

    with session(address, workers):
        remote = ray.remote(num_cpus=1, max_retries=0)(train_window)
        refs = [remote.remote(t) for t in tasks]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TraderError):
                raise cause from None
            raise


def default_workers(windows: int) -> int:
    """As many parallel trainings as there are windows and cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(windows, cores))


@dataclass
class WindowResult:
    window: Window
    policy: Path
    trained: TrainedPolicy
    segment: Segment
    report: dict[str, Any]  # statistics of the segment's own bars

    def row(self) -> dict[str, Any]:
        w, r = self.window, self.report
        return {
            "window": w.index,
            "train_sessions": [s.day for s in w.train],
            "test_sessions": [s.day for s in w.test],
            "policy": str(self.policy),
            "run_id": self.segment.run_id,
            "net_pnl": r["net_pnl"],
            "trades": r["trades"],
            "win_rate": r["win_rate"],
            "max_drawdown": r["max_drawdown"],
            "sharpe": r["sharpe"],
            "timesteps": self.trained.timesteps,
            "train_wall_s": self.trained.wall_s,
        }


@dataclass
class WalkForwardResult:
    run_id: str
    out_dir: Path
    journal: Path
    windows: list[WindowResult]
    stitched: RunStats
    report: dict[str, Any]
    files: dict[str, Path]


def new_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _check_out_dir(out: Path) -> None:
    """Refuse a directory that holds an earlier walk-forward: its windows' policies would be
    overwritten under its walkforward.json (which compare reads), or its journal would refuse the
    run ids after all the training."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"walk-forward --out {out}: is a file, not a directory")
    earlier = sorted(
        p.name
        for p in out.iterdir()
        if p.name in ("walkforward.json", "journal.sqlite") or p.name.startswith("window-")
    )
    if earlier:
        raise ConfigError(
            f"walk-forward --out {out}: holds an earlier walk-forward ({', '.join(earlier[:4])}"
            f"{' ...' if len(earlier) > 4 else ''}); choose another --out (or --id), or remove it"
        )


def run_walk_forward(
    settings: Settings,
    train_config: TrainConfig,
    *,
    train_days: int,
    test_days: int,
    step: int | None = None,
    workers: int | None = None,
    address: str | None = None,
    data_paths: Sequence[Path] | None = None,
    out_dir: Path | None = None,
    run_id: str | None = None,
    progress: Progress = quiet,
) -> WalkForwardResult:
    """Plan the windows, train each window's policy (``train_config``: a
    :class:`trader.train.ppo.TrainConfig`; its ``train_from``/``train_to`` are set per window),
    replay each test window with its policy, stitch, report, and write the results under
    ``out_dir`` (default ``runs/walkforward/<id>``). ``workers``: trainings at once (default: as
    many as windows and cores; > 1 runs them as Ray tasks); ``address``: a Ray cluster to train
    on (its nodes need trader and the data files at the same paths)."""
    from trader.report import build_report

    wid = run_id or new_id()
    out = Path(out_dir or Path("runs") / "walkforward" / wid).resolve()
    _check_out_dir(out)
    base = settings.model_copy(update={"advisor": settings.advisor.model_copy(update={"mode": "off"})})
    index = index_data(base, data_paths)
    windows = plan_windows(index, train_days, test_days, step)
    # where the last window's test ends when it runs to the last bar: the end --to set (compare
    # replays exactly these windows), else the end of the data (None)
    end_ns = bound_ns(base.data.end, index.tz, "data.end")
    data_end = None if end_ns is None else iso(end_ns, index.tz)
    n_workers = default_workers(len(windows)) if workers is None else max(1, workers)
    progress(
        f"walk-forward {wid}: {len(index.sessions)} sessions, {len(windows)} windows "
        f"({train_days} train / {test_days} test, step {step or test_days}), "
        + ("sequential" if n_workers <= 1 and address is None else f"{n_workers} Ray workers")
    )
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for w in windows:
        wdir = out / f"window-{w.index}"
        train_to = index.iso(w.test_first_row)
        t_settings = window_settings(base, index, w.train_first_row, w.test_first_row)
        cfg = replace(train_config, train_from=index.iso(w.train_first_row), train_to=train_to)
        test_to = (
            index.iso(w.test_end_row) if w.test_end_row < len(index.ts_ns) else data_end or "end of data"
        )
        meta = {
            "trained_by": "trader walk-forward (sb3-contrib MaskablePPO on trader.train.env.TradingEnv)",
            "walk_forward_id": wid,
            "walk_forward_window": str(w.index),
            "train_window": f"{cfg.train_from} .. {train_to}",
            "train_sessions": json.dumps([s.day for s in w.train]),
            "train_data_from": t_settings.data.start or iso(int(index.ts_ns[0]), index.tz),
            "test_window": f"{train_to} .. {test_to}",
            "test_sessions": json.dumps([s.day for s in w.test]),
        }
        tasks.append(
            TrainTask(w.index, t_settings, cfg, index.paths, wdir / "policy.onnx", wdir / "train", meta)
        )
    t0 = time.perf_counter()
    trained = train_all(tasks, n_workers, address)
    progress(f"trained {len(tasks)} policies in {time.perf_counter() - t0:.1f} s")
    journal = out / "journal.sqlite"
    clock = SessionClock(base.instrument)
    results = []
    for w, task, tp in zip(windows, tasks, trained, strict=True):
        ws = base.model_copy(update={"policy": base.policy.model_copy(update={"path": task.out})})
        seg = replay_segment(
            ws, index, w.test_first_row, w.test_end_row, journal_path=journal, run_id=f"wf-{wid}-w{w.index}"
        )
        wr = WindowResult(w, task.out, tp, seg, segment_report(seg, clock))
        results.append(wr)
        (task.out.parent / "window.json").write_text(
            json.dumps({**wr.row(), **task.metadata, "trained": _plain(asdict(tp))}, indent=2) + "\n"
        )
        progress(
            f"window {w.index}: test {w.test[0].day} .. {w.test[-1].day}: net P&L {seg.net_pnl:,.2f} "
            f"({wr.report['trades']} trades)"
        )
    stitched = stitch([r.segment for r in results])
    trades = [t for r in results for t in r.segment.trades]
    report = build_report(
        stitched,
        trades,
        base.account.starting_balance_usd,
        clock,
        {
            "walk_forward": {
                "id": wid,
                "windows": len(results),
                "out_of_sample_sessions": [s.day for r in results for s in r.window.test],
                "stitching": "each segment starts from the previous segment's ending equity; net P&L = "
                "sum of the segments' net P&L",
            },
            "llm": {"mode": "off"},
        },
    )
    files = {
        "summary": out / "walkforward.json",
        "plot": out / "equity.html",
        "journal": journal,
    }
    summary = {
        "id": wid,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": [str(p) for p in index.paths],
        "timezone": index.tz,
        "train_days": train_days,
        "test_days": test_days,
        "step": step or test_days,
        "workers": n_workers,
        "train_config": _plain(asdict(train_config)),
        "warmup_bars": index.warmup,
        "journal": str(journal),
        "windows": [
            {
                **r.row(),
                "test_from": index.iso(r.window.test_first_row),
                "test_to": index.iso(r.window.test_end_row)
                if r.window.test_end_row < len(index.ts_ns)
                else data_end,
                "train_from": index.iso(r.window.train_first_row),
                "segment_net_pnl": r.segment.net_pnl,
            }
            for r in results
        ],
        "report": report,
    }
    files["summary"].write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    write_equity_html(
        results, stitched, base.account.starting_balance_usd, files["plot"], f"walk-forward {wid}"
    )
    return WalkForwardResult(wid, out, journal, results, stitched, report, files)


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write_equity_html(
    results: Sequence[WindowResult], stitched: RunStats, start_balance: float, path: Path, title: str
) -> None:
    """The stitched out-of-sample equity, one colour per window (Plotly, self-contained HTML)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    offset = 0.0
    for r in results:
        s = r.segment.stats
        x = np.asarray(s.ts_ns, dtype=np.int64).astype("datetime64[ns]")
        fig.add_trace(
            go.Scattergl(
                x=x,
                y=np.asarray(s.equity, dtype=np.float64) + offset,
                mode="lines",
                name=f"window {r.window.index}: {r.window.test[0].day} .. {r.window.test[-1].day}",
            )
        )
        offset += r.segment.net_pnl
    fig.add_hline(y=start_balance, line_dash="dot", line_color="grey")
    fig.update_layout(
        title=f"{title}: stitched out-of-sample equity (net P&L {offset:,.2f} USD)",
        xaxis_title="bar time (UTC)",
        yaxis_title="equity (USD)",
        template="plotly_white",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def print_walk_forward(result: WalkForwardResult, console: Any = None) -> None:
    """The per-window table and the stitched report's main statistics (rich)."""
    from rich.table import Table

    con = console or wide_console()
    t = Table(title=f"walk-forward {result.run_id}: out-of-sample windows")
    for col in (
        "window",
        "train sessions",
        "test sessions",
        "trades",
        "net P&L $",
        "win rate",
        "max DD $",
        "Sharpe",
    ):
        t.add_column(col, justify="right" if col not in ("train sessions", "test sessions") else "left")
    for r in result.windows:
        row = r.row()
        t.add_row(
            str(row["window"]),
            _days(row["train_sessions"]),
            _days(row["test_sessions"]),
            str(row["trades"]),
            f"{row['net_pnl']:,.2f}",
            _pct(row["win_rate"]),
            f"{row['max_drawdown']:,.2f}",
            _num(row["sharpe"]),
        )
    con.print(t)
    rep = result.report
    s = Table(title="stitched out-of-sample report", show_header=False)
    s.add_column("statistic")
    s.add_column("value", justify="right")
    for k, label in (
        ("net_pnl", "net P&L $ (sum of the windows)"),
        ("trades", "trades"),
        ("win_rate", "win rate"),
        ("profit_factor", "profit factor"),
        ("max_drawdown", "max drawdown $"),
        ("sharpe", "Sharpe (daily, ann.)"),
        ("sortino", "Sortino (daily, ann.)"),
        ("trading_days", "sessions"),
        ("exposure", "exposure"),
    ):
        v = rep.get(k)
        s.add_row(label, _pct(v) if k in ("win_rate", "exposure") else _num(v))
    con.print(s)
    con.print(
        f"policies: {result.out_dir}/window-<k>/policy.onnx  journal: {result.journal}  "
        f"summary: {result.files['summary']}  plot: {result.files['plot']}"
    )


def wide_console() -> Any:
    """A rich console; 120 columns when the output is not a terminal (files, pipes, CI logs)."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _days(days: list[str]) -> str:
    """``2023-11-27..11-29 (3)``: first and last session day and how many."""
    if len(days) == 1:
        return days[0]
    return f"{days[0]}..{days[-1][5:]} ({len(days)})"


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"
