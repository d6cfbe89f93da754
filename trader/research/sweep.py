"""Parameter sweeps: many replays of the real engine over a search space, on Ray Tune.

``trader sweep --space space.toml`` walks a grid, draws random points, or lets Optuna (Ray Tune's
``OptunaSearch``) choose them; each trial is one replay (:func:`trader.replay.replay`) in its own
Ray worker process (``tune.with_resources(..., {"cpu": 1})``, a fresh process per trial, nothing
shared), journaling to ``<sweep dir>/trials/<trial_key>.sqlite``. The driver records each trial as
it ends, ok or failed with its error, in ``<sweep dir>/results.parquet`` (rewritten atomically
after every trial), so Ctrl-C keeps what finished.

Rerunning with the same ``--sweep-id`` continues: grid and random points (the same seed draws the
same points) whose trial key is already ``ok`` are not run again, failed ones are retried;
Optuna is told every finished trial (``points_to_evaluate`` + ``evaluated_rewards``) and runs
``trials`` minus the ones already ok, its sampler seeded with ``seed`` + that count so it draws new
points (a point Optuna proposes twice is replayed again and keeps one row). The setup (space, base
overrides, config file contents, data, dates, search, seed, metric, the ``TRADER_*`` variables that
set settings, secrets by name only) is kept in ``sweep.json``; a rerun with a different setup is
refused, since its results would not compare. Nothing is written before the space, its points and
the configuration have passed their checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import queue
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, get_origin

from trader import __version__
from trader.config import load_settings, model_type, setting_annotation, unwrap_type
from trader.errors import ConfigError, DataError, TraderError
from trader.research.ray_runtime import RayRuntime, check_workers, connect
from trader.research.space import (
    METRICS,
    Mode,
    SearchKind,
    SweepSpace,
    grid_points,
    load_space,
    merge,
    nested,
    objective,
    optuna_distribution,
    random_points,
    secrets_in,
    trial_key,
    validate_space,
)

DEFAULT_ROOT = Path("runs/sweeps")
DEFAULT_TRIALS = 16
RESULT_METRICS = (*METRICS, "trading_days")
# Sweeps replay without the LLM unless [base] (or a parameter) sets advisor.mode; with the LLM on,
# use "recorded" answers (advisor.recorded_journal) so every trial sees the same advice.
# Trials journal at level "trades" unless [base] sets journal.level: the per-bar decision rows are
# most of a trial's journal work, no metric reads them, and their writer thread would take the time
# of the core the other worker's replay runs on.
SWEEP_DEFAULTS: dict[str, Any] = {"advisor": {"mode": "off"}, "journal": {"level": "trades"}}


class SweepError(TraderError):
    """A sweep could not start or continue (not a failed trial: those are recorded)."""


@dataclass(frozen=True)
class SweepRequest:
    """What ``trader sweep`` was asked: the space, the config and data, where to run, how to
    search. None means: from the space file, else the default."""

    space: Path
    config: Path | None = None
    data: Sequence[Path] | None = None
    date_from: str | None = None
    date_to: str | None = None
    address: str | None = None
    workers: int | None = None
    search: SearchKind | None = None
    trials: int | None = None
    metric: str | None = None
    mode: Mode | None = None
    seed: int | None = None
    sweep_id: str | None = None
    root: Path = DEFAULT_ROOT
    top: int = 10
    progress: str = "auto"  # auto | rich | plain | off
    # A new worker process for every trial (Tune's reuse_actors=False). Default: a worker process
    # runs trials one after another (never two at once); each replay still builds its engine,
    # policy session, broker and journal from its own settings, and skips 2-4 s of process start
    # and imports per trial on a 2-core machine.
    process_per_trial: bool = False


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its parameters; sent once to the workers. Paths are absolute
    and must exist on every node."""

    sweep_id: str
    config: str | None
    overrides: dict[str, Any]
    trials_dir: str
    trader_version: str
    metric: str
    mode: Mode


@dataclass
class SweepOutcome:
    """How a sweep ended: counts for this invocation and overall, whether Ctrl-C stopped it, and
    where its results are."""

    sweep_id: str
    sweep_dir: Path
    results_path: Path
    page_path: Path | None
    planned: int
    skipped: int
    ok: int
    failed: int
    interrupted: bool
    total_ok: int
    total_failed: int
    best: dict[str, Any] | None
    wall_s: float
    fit_s: float = 0.0  # the Tune experiment alone (no Ray start-up, no table or page)


@dataclass(frozen=True)
class SweepPaths:
    """The files of one sweep under ``root/<sweep_id>``."""

    dir: Path

    @property
    def trials(self) -> Path:
        return self.dir / "trials"

    @property
    def results(self) -> Path:
        return self.dir / "results.parquet"

    @property
    def page(self) -> Path:
        return self.dir / "sweep.html"

    @property
    def setup(self) -> Path:
        return self.dir / "sweep.json"

    @property
    def tune(self) -> Path:
        return self.dir / "tune"


# -- the trial (runs in a Ray worker) ------------------------------------------------------------


def replay_trial(ctx: TrialContext, params: Mapping[str, Any]) -> dict[str, Any]:
    """One trial: check this node can run it, build its settings from the config file, the sweep's
    overrides and ``params``, replay into its own journal, and return the row Tune is told.
    Anything that goes wrong raises: Tune records the trial as failed with the error."""
    import trader
    from trader.replay import replay

    node = socket.gethostname()
    if trader.__version__ != ctx.trader_version:
        raise SweepError(
            f"trader on Ray node {node} is version {trader.__version__}, the sweep's driver runs "
            f"{ctx.trader_version}: install the same version on every node"
        )
    if ctx.config is not None and not Path(ctx.config).is_file():
        raise ConfigError(f"config file {ctx.config} does not exist on Ray node {node}")
    key = trial_key(params)
    journal = Path(ctx.trials_dir) / f"{key}.sqlite"
    settings = load_settings(
        ctx.config, merge(ctx.overrides, nested(params), {"journal": {"path": str(journal)}})
    )
    for path in settings.data.paths:
        if not path.exists():
            raise DataError(
                f"data file {path} does not exist on Ray node {node}: sweep data must be at the "
                "same path on every node"
            )
    journal.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    outcome = replay(settings, journal_path=journal, pin_cpu=False, handle_signals=False)
    wall_s = time.perf_counter() - t0
    if outcome.status != "completed":
        raise SweepError(f"replay ended {outcome.status}, not completed (run {outcome.run_id})")
    report = outcome.report
    row: dict[str, Any] = {name: report.get(name) for name in RESULT_METRICS}
    row.update(
        trial_key=key,
        params_json=json.dumps(dict(params), sort_keys=True, default=str),
        objective=objective(report.get(ctx.metric), ctx.mode),
        run_id=outcome.run_id,
        journal=str(journal),
        wall_s=round(wall_s, 3),
        node=node,
    )
    return row


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: one replay, one report."""
    from ray import tune

    tune.report(replay_trial(context, config["params"]))


# -- the results table ---------------------------------------------------------------------------

FIXED_COLUMNS = ("sweep_id", "trial_key", "status", "error")
TAIL_COLUMNS = (
    "objective",
    *RESULT_METRICS,
    "run_id",
    "journal",
    "wall_s",
    "node",
    "finished_at",
    "params_json",
)


class ResultsTable:
    """One row per trial key (the latest run of a point wins), written to Parquet atomically
    (temporary file + rename) after each change, so a reader or an interrupted sweep never sees
    half a file."""

    def __init__(self, path: Path, sweep_id: str, param_names: Sequence[str]) -> None:
        self.path = path
        self.sweep_id = sweep_id
        self.param_names = list(param_names)
        self.rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if path.exists():
            import polars as pl

            for row in pl.read_parquet(path).to_dicts():
                self.rows[row["trial_key"]] = row

    def params_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = json.loads(row["params_json"])
        return params

    def ok_keys(self) -> set[str]:
        return {k for k, r in self.rows.items() if r["status"] == "ok"}

    def ok_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if r["status"] == "ok"]

    def add(self, row: Mapping[str, Any]) -> None:
        with self._lock:
            self.rows[row["trial_key"]] = dict(row)
            self._write()

    def frame(self) -> Any:
        """The table as a polars DataFrame: fixed columns, one column per parameter (dotted
        name; mixed-type choices as text), metrics, run id, journal, wall seconds, node."""
        import polars as pl

        rows = list(self.rows.values())
        columns: dict[str, Any] = {}
        for name in FIXED_COLUMNS:
            columns[name] = pl.Series(name, [r.get(name) for r in rows], dtype=pl.String)
        for name in self.param_names:
            values = [self.params_of(r).get(name) for r in rows]
            try:
                columns[name] = pl.Series(name, values)
            except (TypeError, pl.exceptions.PolarsError):
                columns[name] = pl.Series(
                    name, [None if v is None else json.dumps(v) for v in values], dtype=pl.String
                )
        floats = {"objective", "net_pnl", "sharpe", "sortino", "max_drawdown", "win_rate"}
        floats |= {"profit_factor", "wall_s"}
        for name in TAIL_COLUMNS:
            if name in floats:
                dtype: Any = pl.Float64
            elif name in ("trades", "trading_days"):
                dtype = pl.Int64
            else:
                dtype = pl.String
            values = [r.get(name) for r in rows]
            if dtype is pl.Float64:
                values = [None if v is None else float(v) for v in values]
            columns[name] = pl.Series(name, values, dtype=dtype)
        return pl.DataFrame(columns)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.frame().write_parquet(tmp)
        os.replace(tmp, self.path)


def _finished_at() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def ok_row(sweep_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """A results row from what a trial reported."""
    row = {name: result.get(name) for name in TAIL_COLUMNS}
    row.update(
        sweep_id=sweep_id,
        trial_key=result["trial_key"],
        status="ok",
        error=None,
        finished_at=_finished_at(),
    )
    return row


def failed_row(sweep_id: str, params: Mapping[str, Any], error: str) -> dict[str, Any]:
    """A results row for a trial that raised: its parameters and the error, no metrics."""
    row: dict[str, Any] = dict.fromkeys(TAIL_COLUMNS)
    row.update(
        sweep_id=sweep_id,
        trial_key=trial_key(params),
        status="failed",
        error=error,
        params_json=json.dumps(dict(params), sort_keys=True, default=str),
        finished_at=_finished_at(),
    )
    return row


def describe_error(exc: BaseException | None, fallback: str | None = None) -> str:
    """The error of a failed trial as one readable text: the trial's own exception (inside Ray's
    wrapper) as ``Type: message``, else the last line of Tune's error file."""
    if exc is not None:
        cause = getattr(exc, "cause", None) or exc
        return f"{type(cause).__name__}: {cause}".strip()
    if fallback:
        lines = [ln for ln in fallback.strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else fallback
    return "trial failed (no error recorded)"


# -- driver side: events from Tune ---------------------------------------------------------------


class _TrialEvents:
    """Where the Tune callback sends what happened: a queue drained by the driver's main thread.
    In Ray Client mode the callback runs on the head node and the queue is a Ray queue actor."""

    def __init__(self, remote_queue: Any | None = None) -> None:
        self.local: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.remote = remote_queue

    def __getstate__(self) -> dict[str, Any]:
        return {"remote": self.remote}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.remote = state["remote"]
        self.local = queue.Queue()

    def put(self, event: tuple[Any, ...]) -> None:
        if self.remote is not None:
            self.remote.put(event)
        else:
            self.local.put(event)

    def drain(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        if self.remote is not None:
            while not self.remote.empty():
                out.append(self.remote.get())
            return out
        while True:
            try:
                out.append(self.local.get_nowait())
            except queue.Empty:
                return out


def _make_callback(sweep_id: str, events: _TrialEvents) -> Any:
    from ray.tune import Callback

    class SweepCallback(Callback):
        """Tune callback: each trial's start, result or error, as events for the driver."""

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            events.put(("started", trial.trial_id, dict(trial.config["params"])))

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            if "trial_key" in result:
                events.put(("finished", trial.trial_id, ok_row(sweep_id, result)))
            else:  # stopped before it reported (Ctrl-C): not finished, run again next time
                events.put(("abandoned", trial.trial_id, dict(trial.config["params"])))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            exc: BaseException | None = None
            text: str | None = None
            with contextlib.suppress(Exception):
                if trial.pickled_error_file and Path(trial.pickled_error_file).exists():
                    import cloudpickle

                    exc = cloudpickle.loads(Path(trial.pickled_error_file).read_bytes())
            with contextlib.suppress(Exception):
                if exc is None and trial.error_file and Path(trial.error_file).exists():
                    text = Path(trial.error_file).read_text()
            params = dict(trial.config["params"])
            events.put(("finished", trial.trial_id, failed_row(sweep_id, params, describe_error(exc, text))))

    return SweepCallback()


# -- progress ------------------------------------------------------------------------------------


@dataclass
class _Counts:
    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    running: dict[str, str] = field(default_factory=dict)  # tune trial id -> trial key
    best: dict[str, Any] | None = None


class SweepProgress:
    """Trials done / running / failed and the best so far: a rich live panel on a terminal, one
    plain line per finished trial otherwise."""

    def __init__(self, counts: _Counts, metric: str, mode: Mode, style: str, out: TextIO) -> None:
        self.c = counts
        self.metric, self.mode = metric, mode
        self.out = out
        if style == "auto":
            style = "rich" if out.isatty() else "plain"
        self.style = style
        self._live: Any = None

    def __enter__(self) -> SweepProgress:
        if self.style == "rich":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._panel(), console=Console(file=self.out), refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._panel())
            self._live.__exit__(None, None, None)
            self._live = None

    def _status(self) -> str:
        c = self.c
        done = c.skipped + c.ok + c.failed
        best = "-"
        if c.best is not None:
            best = f"{_fmt(c.best.get(self.metric))} ({c.best['trial_key']})"
        skipped = f" ({c.skipped} before this run)" if c.skipped else ""
        return (
            f"{done}/{c.total} done{skipped}, {len(c.running)} running, {c.failed} failed, "
            f"best {self.metric} {best}"
        )

    def _panel(self) -> Any:
        from rich.text import Text

        return Text(f"sweep: {self._status()}")

    def started(self, trial_id: str, key: str) -> None:
        self.c.running[trial_id] = key
        self._refresh()

    def abandoned(self, trial_id: str) -> None:
        self.c.running.pop(trial_id, None)
        self._refresh()

    def finished(self, trial_id: str, row: Mapping[str, Any], better: bool) -> None:
        self.c.running.pop(trial_id, None)
        if row["status"] == "ok":
            self.c.ok += 1
            if better:
                self.c.best = dict(row)
        else:
            self.c.failed += 1
        if self.style == "plain":
            done = self.c.skipped + self.c.ok + self.c.failed
            what = (
                f"{self.metric}={_fmt(row.get(self.metric))} wall={_fmt(row.get('wall_s'))}s"
                if row["status"] == "ok"
                else f"error={' '.join(str(row.get('error')).split())}"
            )
            print(
                f"trial {done}/{self.c.total} {row['status']} {row['trial_key']} {what} | {self._status()}",
                file=self.out,
                flush=True,
            )
        self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._panel())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if math.isfinite(v) else str(v)
    return str(v)


def is_better(row: Mapping[str, Any], best: Mapping[str, Any] | None, mode: Mode) -> bool:
    """Whether an ok row beats the best so far on the searcher's (finite) objective."""
    if best is None:
        return True
    a, b = float(row["objective"]), float(best["objective"])
    return a > b if mode == "max" else a < b


# -- the sweep -----------------------------------------------------------------------------------


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _file_stamp(path: Path) -> list[Any]:
    """A data file's identity without reading it all: path, size and modification time."""
    if not path.exists():
        return [str(path), None, None]
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def new_sweep_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass(frozen=True)
class _Plan:
    space: SweepSpace
    search: SearchKind
    metric: str
    mode: Mode
    trials: int
    seed: int
    overrides: dict[str, Any]
    setup: dict[str, Any]
    points: list[dict[str, Any]]  # grid and random: every point, deduplicated; optuna: none


def settings_environment() -> dict[str, str | None]:
    """The ``TRADER_*`` variables that set a setting (every trial's ``load_settings`` reads them),
    by name in upper case, with their values. One holding a secret (the rule of a config file: a
    secret field, or a section or list holding one set) is recorded by name only (None)."""
    out: dict[str, str | None] = {}
    for name, raw in os.environ.items():
        up = name.upper()
        if not up.startswith("TRADER_"):
            continue
        parts = up.removeprefix("TRADER_").lower().split("__")
        tp = setting_annotation(parts)
        if tp is None:
            continue  # not a setting (TRADER_CONTROL_TOKEN, TRADER_NOTIFY_URLS)
        value: Any = raw
        if model_type(tp) is not None or get_origin(unwrap_type(tp)) in (list, dict):
            try:
                value = json.loads(raw)  # pydantic-settings decodes sections, lists and tables
            except ValueError:
                out[up] = None  # load_settings refuses it; whatever it holds, it is not recorded
                continue
        out[up] = None if secrets_in(".".join(parts), value, Path(up)) else raw
    return dict(sorted(out.items()))


def _plan(req: SweepRequest) -> _Plan:
    space = load_space(req.space)
    search: SearchKind = req.search or space.search or "grid"
    metric = req.metric or space.metric or "sharpe"
    if metric not in METRICS:
        raise ConfigError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")
    mode: Mode = req.mode or space.mode or METRICS[metric]
    trials = req.trials or space.trials or DEFAULT_TRIALS
    seed = req.seed if req.seed is not None else (space.seed or 0)
    config = req.config.resolve() if req.config is not None else None
    if config is not None and not config.is_file():
        raise ConfigError(f"config file not found: {config}")
    data: dict[str, Any] = {}
    if req.data:
        for p in req.data:
            if not Path(p).exists():
                raise DataError(f"--data: {p} does not exist")
        data["paths"] = [str(Path(p).resolve()) for p in req.data]
    if req.date_from:
        data["start"] = req.date_from
    if req.date_to:
        data["end"] = req.date_to
    overrides = merge(SWEEP_DEFAULTS, {"data": data} if data else {})
    validate_space(space, config, overrides)
    settings = load_settings(config, merge(overrides, nested(space.base)))
    policy = Path(settings.policy.path)
    setup = {
        "space_file": str(space.path.resolve()),
        "params": {k: asdict(d) for k, d in space.params.items()},
        "base": space.base,
        "config": str(config) if config else None,
        "config_sha256": _file_digest(config),
        # what the trials replay: a retrained policy or rewritten data at the same path would make
        # old and new rows incomparable
        "policy_sha256": _file_digest(policy) if policy.is_file() else None,
        "data_files": [_file_stamp(Path(p)) for p in settings.data.paths],
        "trader_version": __version__,
        "data_paths": [str(p) for p in settings.data.paths],
        "data_start": settings.data.start,
        "data_end": settings.data.end,
        "search": search,
        "seed": seed if search != "grid" else None,
        "metric": metric,
        "mode": mode,
    }
    environment = settings_environment()
    if environment:  # left out when empty: a sweep begun before it was recorded can continue
        setup["environment"] = environment
    # built (and checked: a continuous range in a grid, too many points) before sweep.json is
    # written, so a refused space leaves nothing that would refuse its corrected rerun
    points: list[dict[str, Any]] = []
    if search == "grid":
        points = _dedupe(grid_points(space))
    elif search == "random":
        points = _dedupe(random_points(space, trials, seed))
    # JSON round trip: tuples as lists, so a setup compares equal to the one read back
    setup = json.loads(json.dumps(setup))
    return _Plan(space, search, metric, mode, trials, seed, overrides, setup, points)


def _check_setup(paths: SweepPaths, plan: _Plan, sweep_id: str) -> None:
    if not paths.setup.exists():
        return
    before = json.loads(paths.setup.read_text())["setup"]
    changed = sorted(k for k in set(before) | set(plan.setup) if before.get(k) != plan.setup.get(k))
    if changed:
        raise SweepError(
            f"sweep {sweep_id} in {paths.dir} was started with another setup ({', '.join(changed)} "
            "differ): its results would not compare; start a new sweep (another --sweep-id)"
        )


def _write_setup(paths: SweepPaths, plan: _Plan, sweep_id: str) -> None:
    paths.dir.mkdir(parents=True, exist_ok=True)
    body = {"sweep_id": sweep_id, "trader_version": __version__, "setup": plan.setup}
    if paths.setup.exists():
        body["created"] = json.loads(paths.setup.read_text()).get("created")
    body.setdefault("created", _finished_at())
    tmp = paths.setup.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, paths.setup)


def _dedupe(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for p in points:
        k = trial_key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def run_sweep(
    req: SweepRequest, *, runtime: RayRuntime | None = None, out: TextIO | None = None
) -> SweepOutcome:
    """Run (or continue) a sweep and write its results table and page. Ray is started (or
    joined at ``req.address``) here unless ``runtime`` is given; configuration problems are
    raised before Ray starts."""
    out = out or sys.stdout
    t_start = time.perf_counter()
    plan = _plan(req)
    sweep_id = req.sweep_id or new_sweep_id()
    if not sweep_id or any(c in sweep_id for c in "/\\\0") or sweep_id in (".", ".."):
        raise ConfigError(f"--sweep-id: {sweep_id!r} is not usable as a directory name")
    paths = SweepPaths((req.root / sweep_id).resolve())
    _check_setup(paths, plan, sweep_id)
    _write_setup(paths, plan, sweep_id)
    table = ResultsTable(paths.results, sweep_id, list(plan.space.params))
    done = table.ok_keys()

    if plan.search == "optuna":
        points: list[dict[str, Any]] = []
        to_run = max(plan.trials - len(done), 0)
        skipped = min(len(done), plan.trials)
        planned = plan.trials
    else:
        all_points = plan.points
        points = [p for p in all_points if trial_key(p) not in done]
        to_run, skipped, planned = len(points), len(all_points) - len(points), len(all_points)

    counts = _Counts(total=planned, skipped=skipped)
    for row in table.ok_rows():
        if is_better(row, counts.best, plan.mode):
            counts.best = row
    interrupted = False
    fit_s = 0.0
    page_drawing: Future[Path] | None = None
    already = f", {skipped} already done" if skipped else ""
    print(
        f"sweep {sweep_id}: {to_run} trials to run{already} ({plan.search}) in {paths.dir}",
        file=out,
        flush=True,
    )
    if to_run:
        ctx = TrialContext(
            sweep_id=sweep_id,
            config=plan.setup["config"],
            overrides=merge(plan.overrides, nested(plan.space.base)),
            trials_dir=str(paths.trials),
            trader_version=__version__,
            metric=plan.metric,
            mode=plan.mode,
        )
        paths.trials.mkdir(parents=True, exist_ok=True)
        own_runtime = runtime is None
        rt = runtime or connect(req.address, req.workers, preload=_driver_modules(plan.search))
        page_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep-page")
        try:
            if rt.kind != "embedded":
                check_workers()
            workers = min(req.workers or rt.workers, rt.workers) if runtime is not None else rt.workers
            progress = SweepProgress(counts, plan.metric, plan.mode, req.progress, out)
            t_fit = time.perf_counter()
            with progress:
                finished = _fit(
                    plan, ctx, rt, workers, points, to_run, table, progress, paths, req.process_per_trial
                )
            fit_s = time.perf_counter() - t_fit
            interrupted = finished < to_run
            if table.rows:
                # the page is drawn while Ray shuts down (a second or more of waiting for its
                # processes to end)
                page_drawing = page_pool.submit(_write_page, paths, table, plan, sweep_id)
        finally:
            try:
                if own_runtime:
                    rt.close()
            finally:
                page_pool.shutdown(wait=True)
    total_ok, total_failed = _tally(table)
    page: Path | None = None
    if page_drawing is not None:
        page = page_drawing.result()
    elif table.rows:
        page = _write_page(paths, table, plan, sweep_id)
    if table.rows:
        from trader.research.sweep_page import print_ranked

        print_ranked(table.frame(), list(plan.space.params), plan.metric, plan.mode, req.top, out)
    return SweepOutcome(
        sweep_id=sweep_id,
        sweep_dir=paths.dir,
        results_path=paths.results,
        page_path=page,
        planned=planned,
        skipped=skipped,
        ok=counts.ok,
        failed=counts.failed,
        interrupted=interrupted,
        total_ok=total_ok,
        total_failed=total_failed,
        best=counts.best,
        wall_s=time.perf_counter() - t_start,
        fit_s=fit_s,
    )


def _write_page(paths: SweepPaths, table: ResultsTable, plan: _Plan, sweep_id: str) -> Path:
    from trader.research.sweep_page import write_page

    return write_page(paths.page, table.frame(), list(plan.space.params), plan.metric, plan.mode, sweep_id)


def _driver_modules(search: SearchKind) -> tuple[str, ...]:
    """What the driver imports once Ray is up (Tune, the search algorithm, the page's plotting)."""
    modules = ["ray.tune", "ray.tune.search", "ray.tune.search.basic_variant"]
    if search == "optuna":
        modules += ["optuna", "ray.tune.search.optuna"]
    return (*modules, "trader.research.sweep_page")


def _tally(table: ResultsTable) -> tuple[int, int]:
    ok = sum(1 for r in table.rows.values() if r["status"] == "ok")
    return ok, len(table.rows) - ok


def _search_alg(plan: _Plan, workers: int, points: list[dict[str, Any]], table: ResultsTable) -> Any:
    """Tune's searcher: the explicit points one by one (grid and random), or Optuna warm-started
    with every finished trial, limited to ``workers`` suggestions at once."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    if plan.search != "optuna":
        return BasicVariantGenerator(max_concurrent=workers), {"params": tune.grid_search(points)}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {f"params/{k}": optuna_distribution(d) for k, d in plan.space.params.items()}
    known = [r for r in table.ok_rows() if r.get("objective") is not None]
    evaluated = [{f"params/{k}": v for k, v in table.params_of(r).items()} for r in known]
    searcher = OptunaSearch(
        space,
        metric="objective",
        mode=plan.mode,
        # a resumed study must not replay the first run's random start-up draws: offset the seed
        # by the trials it already knows
        seed=plan.seed + len(known),
        points_to_evaluate=evaluated or None,
        evaluated_rewards=[float(r["objective"]) for r in known] or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=workers), {}


def _fit(
    plan: _Plan,
    ctx: TrialContext,
    rt: RayRuntime,
    workers: int,
    points: list[dict[str, Any]],
    to_run: int,
    table: ResultsTable,
    progress: SweepProgress,
    paths: SweepPaths,
    process_per_trial: bool,
) -> int:
    """Run the Tune experiment; returns how many trials finished (ok or failed). Fewer than
    ``to_run`` means it was interrupted."""
    import logging

    from ray import tune

    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    remote_queue = None
    if rt.kind == "client":
        from ray.util.queue import Queue

        remote_queue = Queue(actor_options={"num_cpus": 0})
    events = _TrialEvents(remote_queue)
    search_alg, param_space = _search_alg(plan, workers, points, table)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=ctx), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            num_samples=to_run if plan.search == "optuna" else 1,
            max_concurrent_trials=workers,
            reuse_actors=not process_per_trial,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=dt.datetime.now().strftime("fit-%Y%m%d-%H%M%S-") + secrets.token_hex(2),
            storage_path=str(paths.tune),
            verbose=0,
            callbacks=[_make_callback(ctx.sweep_id, events)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    finished = 0

    def handle(event: tuple[Any, ...]) -> None:
        nonlocal finished
        kind, trial_id, payload = event
        if kind == "started":
            progress.started(trial_id, trial_key(payload))
        elif kind == "abandoned":
            progress.abandoned(trial_id)
        else:
            table.add(payload)
            finished += 1
            better = payload["status"] == "ok" and is_better(payload, progress.c.best, plan.mode)
            progress.finished(trial_id, payload, better)

    if rt.kind == "client":
        _fit_in_thread(tuner.fit, events, handle)
    else:
        _fit_here(tuner.fit, events, handle)
    for event in events.drain():
        handle(event)
    return finished


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _fit_here(
    fit: Callable[[], Any], events: _TrialEvents, handle: Callable[[tuple[Any, ...]], None]
) -> None:
    """Tune's loop in this (main) thread: its SIGINT handler stops the experiment cleanly on the
    first Ctrl-C. Events are handled by a thread beside it as they come."""
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            for event in events.drain():
                handle(event)
            stop.wait(0.1)

    pumper = threading.Thread(target=pump, name="sweep-results", daemon=True)
    pumper.start()
    try:
        fit()
    finally:
        stop.set()
        pumper.join()


def _fit_in_thread(
    fit: Callable[[], Any], events: _TrialEvents, handle: Callable[[tuple[Any, ...]], None]
) -> None:
    """Ray Client: Tune's loop runs on the head node, so Ctrl-C reaches only this process. It ends
    the client session (Ray then ends the remote experiment and its trials) after taking in every
    event already sent."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fit()
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    runner = threading.Thread(target=target, name="sweep-tune-client", daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            for event in events.drain():
                handle(event)
            runner.join(0.2)
    except KeyboardInterrupt:
        for event in events.drain():
            handle(event)
        return
    if failure and not isinstance(failure[0], KeyboardInterrupt):
        raise failure[0]


def interrupted_message(outcome: SweepOutcome) -> str:
    return (
        f"sweep {outcome.sweep_id} interrupted: {outcome.total_ok} ok and {outcome.total_failed} failed "
        f"of {outcome.planned} trials are in {outcome.results_path}; rerun with --sweep-id "
        f"{outcome.sweep_id} to finish the rest"
    )
