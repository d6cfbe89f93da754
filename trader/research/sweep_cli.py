"""``trader sweep``: its arguments and command (the CLI module adds them with :func:`add_parser`).
Ray and Tune are imported only when a sweep runs, so the rest of the CLI stays quick."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trader.cli import bar_time_arg  # the CLI's own --from/--to check (cli builds this parser)
from trader.research.space import METRICS, SEARCHES

EXIT_INTERRUPTED = 130


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return n


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 0")
    return n


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``sweep`` to the CLI's subcommands (``common`` adds ``--config``)."""
    p = sub.add_parser(
        "sweep",
        help="replay many parameter sets (grid, random or Optuna) on Ray; results table + HTML page",
        description="Run many replays over a search space of config keys on Ray (embedded, or a "
        "cluster with --address); results in runs/sweeps/<id>/results.parquet and sweep.html.",
    )
    common(p)
    p.add_argument(
        "--space", type=Path, required=True, help="TOML search space (see config/sweep-example.toml)"
    )
    p.add_argument("--data", nargs="+", type=Path, help="CSV/Parquet/DBN files (default: data.paths)")
    p.add_argument("--from", dest="date_from", type=bar_time_arg, help="first bar time, ISO")
    p.add_argument("--to", dest="date_to", type=bar_time_arg, help="end bar time (exclusive), ISO")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--address", help="Ray cluster: host:port (GCS, e.g. head:6379) or ray://host:10001 (Ray Client)"
    )
    where.add_argument(
        "--workers", type=_positive_int, help="embedded Ray: trials at once (default: all cores)"
    )
    p.add_argument("--search", choices=SEARCHES, help="default: the space file's, else grid")
    p.add_argument("--trials", type=_positive_int, help="random/optuna: number of trials (default 16)")
    p.add_argument("--metric", choices=list(METRICS), help="ranked and optimised (default: sharpe)")
    p.add_argument("--mode", choices=["max", "min"], help="default: by metric (max_drawdown: min)")
    p.add_argument("--seed", type=_non_negative_int, help="random/optuna sampler seed (default 0)")
    p.add_argument("--sweep-id", dest="sweep_id", help="continue this sweep (default: a new id)")
    p.add_argument(
        "--out", type=Path, default=Path("runs/sweeps"), help="sweeps directory (default runs/sweeps)"
    )
    p.add_argument("--top", type=_positive_int, default=10, help="rows of the ranked table (default 10)")
    p.add_argument("--progress", choices=["auto", "rich", "plain", "off"], default="auto")
    p.add_argument(
        "--process-per-trial",
        action="store_true",
        help="start a new worker process for every trial (default: a worker runs its trials in turn)",
    )
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Exit 0 when every planned trial has run (failed trials included: they are recorded), 1 when
    none succeeded, 130 after Ctrl-C (what finished is kept), 2 for a bad space or config."""
    from trader.research.sweep import SweepRequest, interrupted_message, run_sweep

    req = SweepRequest(
        space=args.space,
        config=args.config,
        data=args.data,
        date_from=args.date_from,
        date_to=args.date_to,
        address=args.address,
        workers=args.workers,
        search=args.search,
        trials=args.trials,
        metric=args.metric,
        mode=args.mode,
        seed=args.seed,
        sweep_id=args.sweep_id,
        root=args.out,
        top=args.top,
        progress=args.progress,
        process_per_trial=args.process_per_trial,
    )
    try:
        outcome = run_sweep(req)
    except KeyboardInterrupt:
        print("trader: sweep interrupted; trials that finished are in its results.parquet", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.interrupted:
        print(f"trader: {interrupted_message(outcome)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        f"sweep {outcome.sweep_id}: {outcome.ok} ok, {outcome.failed} failed this run"
        + (f", {outcome.skipped} already done" if outcome.skipped else "")
        + f" ({outcome.wall_s:.1f} s); results {outcome.results_path}"
        + (f", page {outcome.page_path}" if outcome.page_path else "")
    )
    return 0 if outcome.total_ok else 1
