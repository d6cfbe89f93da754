"""Command line: ``trader replay | run | record | check-config | report | tradovate-check |
features | layout-hash | llm-dataset | sweep | walk-forward | compare | bench``.

Exit codes: 0 ok, 1 run failed, 2 bad configuration, data or policy (message on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog

from trader import __version__
from trader.config import Settings, effective_config_toml, load_settings
from trader.errors import TraderError

T = TypeVar("T")
log = structlog.get_logger(__name__)


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def bar_time_arg(value: str) -> str:
    """--from/--to: an ISO date-time (naive = data.timezone), checked here so the error names
    the argument."""
    from trader.feeds.replay import parse_bar_time

    try:
        parse_bar_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _speed_arg(value: str) -> float:
    """--speed: 0 = as fast as possible, N = N times real time; finite and not negative."""
    try:
        speed = float(value)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and speed >= 0):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not 0 (as fast as possible) or a finite N > 0 (N times real time)"
        )
    return speed


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if getattr(args, "data", None):
        data["paths"] = [str(Path(p).resolve()) for p in args.data]
    if getattr(args, "date_from", None):
        data["start"] = args.date_from
    if getattr(args, "date_to", None):
        data["end"] = args.date_to
    if getattr(args, "speed", None) is not None:
        data["speed"] = args.speed
    if getattr(args, "close_at_end", False):
        data["close_at_end"] = True
    if data:
        o["data"] = data
    if getattr(args, "policy", None):
        from trader.policy import is_dotted

        o["policy"] = {"path": args.policy if is_dotted(args.policy) else str(Path(args.policy).resolve())}
    if getattr(args, "journal", None):
        o["journal"] = {"path": str(Path(args.journal).resolve())}
    advisor: dict[str, Any] = {}
    if getattr(args, "llm", None):
        advisor["mode"] = args.llm
    if getattr(args, "llm_journal", None):
        advisor["recorded_journal"] = str(Path(args.llm_journal).resolve())
    if getattr(args, "llm_schedule", None):
        advisor["schedule"] = args.llm_schedule
    if advisor:
        o["advisor"] = advisor
    return o


def _settings_with_recorded_default(args: argparse.Namespace) -> Settings:
    """Replay's defaults: for --llm recorded without --llm-journal, read the answers from this
    run's journal file; without --llm-schedule, ask the LLM on entry decisions only unless the
    config file or the environment names ``advisor.schedule`` (the demo in about a minute; the
    service's interval schedule is ``--llm-schedule interval``)."""
    o = _overrides(args)
    base = load_settings(args.config)
    advisor = o.setdefault("advisor", {})
    if advisor.get("mode") == "recorded" and "recorded_journal" not in advisor:
        journal = o.get("journal", {}).get("path") or str(base.journal.path)
        advisor["recorded_journal"] = str(Path(journal).resolve())
    if "schedule" not in advisor and "schedule" not in base.advisor.model_fields_set:
        advisor["schedule"] = "entries"
    return load_settings(args.config, o)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, _overrides(args))


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from trader.replay import run_replay
    from trader.report import write_json
    from trader.report.page import write_report_html
    from trader.report.progress import ReplayProgress
    from trader.report.tables import report_table, terminal

    progress = ReplayProgress(settings.account.starting_balance_usd, settings.advisor.mode)
    with progress:  # drawn on a terminal only; a pipe gets nothing extra
        out = await run_replay(settings, observers=(progress,) if progress.enabled else ())
    report, status = out.report, out.status
    terminal().print(report_table(report))
    to_decide, usable, warmup = out.decided_bars, out.usable_bars, out.warmup_bars
    if to_decide == 0:
        print(
            f"\nnothing was decided: all {usable} usable bars were warm-up "
            f"(features.warmup_bars = {warmup}); give it more data",
            file=sys.stderr,
        )
    elif to_decide < warmup:
        print(f"\ndecided {to_decide} of {usable} bars; the first {warmup} warm the indicators up")
    if args.report:
        write_json(report, args.report)
    page = args.plot or (Path(args.report).with_suffix(".html") if args.report else None)
    page = write_report_html(out.journal_path, out.run_id, page)
    print(
        f"\njournal: {out.journal_path}  run: {out.run_id}  page: {page}"
        + (f"  report: {args.report}" if args.report else "")
    )
    if to_decide == 0:
        return 2  # a replay that could not decide anything is a usage error, not a result
    return 0 if status in ("completed", "stopped") else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from trader.logs import configure_logging
    from trader.report.progress import CurrentStderr

    settings = _settings_with_recorded_default(args)
    configure_logging(settings.logging, CurrentStderr())  # log lines go above the progress display
    return run_loop(_replay(settings, args))


def cmd_run(args: argparse.Namespace) -> int:
    from trader.logs import configure_logging
    from trader.service.supervisor import run_service

    overrides = _overrides(args)
    if args.data:  # recorded bars instead of the live feed: paper trading on a replayed market
        overrides.setdefault("service", {})["feed"] = "recorded"
    settings = load_settings(args.config, overrides)
    configure_logging(settings.logging, sys.stdout)  # to stdout for journald (units set format json)
    return run_loop(run_service(settings, args.config, overrides, args.mode, None, fresh=args.fresh))


def cmd_record(args: argparse.Namespace) -> int:
    from trader.feeds.recorder import record
    from trader.logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.logging)
    n = run_loop(record(settings, Path(args.out), args.max_bars))
    print(f"recorded {n} bars into {args.out}")
    return 0


def cmd_tradovate_check(args: argparse.Namespace) -> int:
    from trader.adapters.tradovate.check import run_check
    from trader.logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.logging)
    return run_loop(run_check(settings, sys.stdout, args.seconds, args.place_test_order))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.toml:
        sys.stdout.write(effective_config_toml(settings))
        return 0
    from trader.report.tables import config_table, terminal

    terminal().print(config_table(settings))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from trader.report.page import figures_of, no_decisions_note, sessions_of, write_page
    from trader.report.tables import report_table, sessions_table, terminal
    from trader.report.view import load_run

    view = load_run(Path(args.journal), args.run)
    info = view.info
    console = terminal()
    title = f"run {info.run_id} ({info.mode}, {info.status}) in {view.journal_path}"
    if info.report is None:
        title += ": no final report yet, figures recomputed from the journal"
    console.print(report_table(info.report or {**figures_of(view), "status": info.status}, title))
    if len(view.ts_ns):
        console.print(sessions_table(sessions_of(view), view.tz))
    else:
        console.print(no_decisions_note(view))
    page = write_page(view, args.out)
    print(f"page: {page}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    import numpy as np
    import polars as pl

    from trader.execution.portfolio import Portfolio
    from trader.features.observation import AccountFeatures, BulkFeatures, load_feature_blocks
    from trader.feeds.replay import load_bars

    settings = _settings(args)
    rb = load_bars(settings.data, tick_size=settings.instrument.tick_size, symbol=settings.instrument.symbol)
    ok = rb.accepted()
    cols = {k: getattr(rb, k)[ok] for k in ("ts_ns", "open", "high", "low", "close", "volume")}
    feats = BulkFeatures(settings, cols, load_feature_blocks(settings.features.custom_blocks))
    # account columns describe a flat account at the starting balance (they depend on trading)
    snap = Portfolio(settings).snapshot()
    acct = AccountFeatures(settings, feats.layout)
    rows = feats.rows
    for i in range(len(rows)):
        acct.fill(rows[i], snap, float(cols["close"][i]), float(feats.atr_col[i]), 0)
    df = pl.DataFrame(
        {"timestamp": pl.Series(cols["ts_ns"]).cast(pl.Datetime("ns", "UTC")), "ready": feats.ready_col}
    )
    df = df.hstack(pl.DataFrame(np.asarray(rows), schema=list(feats.layout.names), orient="row"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        df.write_csv(out)
    else:
        df.write_parquet(out)
    print(f"wrote {len(df)} rows x {feats.layout.dim} features (layout {feats.layout.hash}) to {out}")
    return 0


def cmd_layout_hash(args: argparse.Namespace) -> int:
    from trader.features.layout import build_layout
    from trader.features.observation import load_feature_blocks

    settings = _settings(args)
    blocks = load_feature_blocks(settings.features.custom_blocks)
    layout = build_layout(settings.features.use_llm_features, tuple(n for b in blocks for n in b.names))
    print(f"{layout.hash}  {layout.dim} features")
    return 0


def cmd_llm_dataset(args: argparse.Namespace) -> int:
    from trader.llm.dataset import export_dataset

    n = export_dataset(Path(args.journal), Path(args.out), args.run_id, args.horizon)
    print(f"wrote {n} examples to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from trader.bench import main as bench_main

    return bench_main(args.data, args.repeat)


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--llm off`` to ``trader compare`` was taken as
    ``--llm-journal off``. An option is written whole or refused (the subcommands' parsers are of
    this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="trader", description="Hybrid RL + LLM trading daemon.")
    ap.add_argument("--version", action="version", version=f"trader {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, default=None, help="TOML config file (default: embedded defaults)"
        )

    p = sub.add_parser("replay", help="replay recorded bars through the full decision path")
    common(p)
    p.add_argument("--data", nargs="+", help="CSV, Parquet or DBN files (default: the bundled NQ slice)")
    p.add_argument(
        "--from",
        dest="date_from",
        type=bar_time_arg,
        help="first bar time, ISO (data.timezone if naive)",
    )
    p.add_argument("--to", dest="date_to", type=bar_time_arg, help="end bar time (exclusive), ISO")
    p.add_argument("--journal", help="SQLite journal file (default: journal.path)")
    p.add_argument("--report", help="write the report as JSON here (plot next to it as .html)")
    p.add_argument(
        "--plot",
        help="write the run's HTML page here (default: beside --report as .html, else "
        "report-<run8>.html beside the journal)",
    )
    p.add_argument(
        "--policy",
        help="ONNX policy file, or module:attr of a Python policy, e.g. strategies.rules:EmaCross "
        "(default: policy.path)",
    )
    p.add_argument("--speed", type=_speed_arg, help="0 = as fast as possible, N = N times real time")
    p.add_argument(
        "--llm",
        choices=["off", "sync", "async", "recorded"],
        help="LLM advisor mode (default: advisor.mode, async)",
    )
    p.add_argument("--llm-journal", help="--llm recorded: journal with the answers (default: --journal)")
    p.add_argument(
        "--llm-schedule",
        choices=["entries", "interval"],
        help="when to ask the LLM: entries = only on the RL's entry decisions the risk engine "
        "allows, each decided with its answer (about a minute for the demo); interval = every "
        "fusion.query_interval bars, on RL uncertainty and on state changes, as the service does "
        "(default: advisor.schedule when the config or environment sets it, else entries). "
        "With --llm recorded, use the schedule of the recorded run (a service journal: interval), "
        "or its answers are asked for on other bars and missed",
    )
    p.add_argument(
        "--close-at-end",
        action="store_true",
        help="close a position still open after the last bar (data.close_at_end); default: keep it",
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="run as a service (systemd Type=notify): paper trading, health, control")
    common(p)
    p.add_argument("--mode", choices=["paper", "live"], default="paper")
    p.add_argument(
        "--data",
        nargs="+",
        help="trade on these recorded bars paced at --speed instead of the live feed (paper)",
    )
    p.add_argument("--from", dest="date_from", type=bar_time_arg)
    p.add_argument("--to", dest="date_to", type=bar_time_arg)
    p.add_argument("--journal", help="SQLite journal file (default: journal.path)")
    p.add_argument("--speed", type=_speed_arg, help="bars paced at N times real time (default: data.speed)")
    p.add_argument("--llm", choices=["off", "sync", "async", "recorded"])
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a new account (the journal's previous run of this mode is marked abandoned); "
        "default: continue it, whether it crashed, stopped or failed",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("record", help="record live 1-minute bars to Parquet, one file per day (replayable)")
    common(p)
    p.add_argument("--out", required=True, help="directory for <symbol>_<YYYY-MM-DD>.parquet")
    p.add_argument(
        "--max-bars", type=int, help="stop after this many completed bars (default: run until stopped)"
    )
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("llm-dataset", help="export LLM prompt/answer pairs with realised outcomes (JSONL)")
    p.add_argument("--journal", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run-id", help="default: every run in the journal")
    p.add_argument("--horizon", type=int, default=15, help="bars ahead for the realised outcome")
    p.set_defaults(func=cmd_llm_dataset)

    p = sub.add_parser("check-config", help="validate and print the effective configuration")
    common(p)
    p.add_argument("--toml", action="store_true", help="print it as TOML (a config file) instead of a table")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "report",
        help="print a run's report and write its HTML page (candles, trades, stops, LLM and "
        "vetoes, equity, drawdown, sessions) from a journal",
    )
    p.add_argument("--journal", required=True, help="SQLite journal file")
    p.add_argument("--run", help="run id or a unique prefix of 4+ characters (default: the latest run)")
    p.add_argument("--out", help="the HTML page (default: report-<run8>.html beside the journal)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "tradovate-check",
        help="check credentials, account, contract, sockets and chart data against Tradovate "
        "(demo); credentials from the environment only",
    )
    common(p)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to watch chart data (default 60)")
    p.add_argument(
        "--place-test-order",
        action="store_true",
        help="also place a Day limit buy far below the market (isAutomated) and cancel it (demo only)",
    )
    p.set_defaults(func=cmd_tradovate_check)

    p = sub.add_parser("features", help="write the per-bar observation with named columns")
    common(p)
    p.add_argument("--data", nargs="+")
    p.add_argument("--from", dest="date_from", type=bar_time_arg)
    p.add_argument("--to", dest="date_to", type=bar_time_arg)
    p.add_argument("--out", required=True, help=".parquet or .csv")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser(
        "layout-hash",
        help="print the observation layout's hash (a policy file carries it) and its number of features",
    )
    common(p)
    p.set_defaults(func=cmd_layout_hash)

    from trader.research.sweep_cli import add_parser as add_sweep_parser

    add_sweep_parser(sub, common)

    from trader.research.oos_cli import add_parsers as add_walk_forward_and_compare_parsers

    add_walk_forward_and_compare_parsers(sub, common)

    p = sub.add_parser("bench", help="replay benchmark: bars/s and decision latency, JSON")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--repeat", type=int, default=5)
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TraderError as exc:
        print(f"trader: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
