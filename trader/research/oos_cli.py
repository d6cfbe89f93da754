"""``trader walk-forward`` and ``trader compare``: their arguments and commands (the CLI module adds
them with :func:`add_parsers`). Torch, Ray, rich and Plotly are imported only when they run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trader.cli import bar_time_arg  # the CLI's own --from/--to check (cli builds this parser)
from trader.errors import ConfigError

# trader.research.compare.ARMS, spelt out so that building the CLI does not import the engine
ARMS = ("rl_only", "rl_llm", "llm_only", "flat", "buy_and_hold", "ema_cross")


def _count(least: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= {least}")
        return n

    return parse


def _ema(value: str) -> tuple[int, int]:
    try:
        fast, slow = (int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not FAST,SLOW (e.g. 20,50)") from None
    if not 1 <= fast < slow:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= FAST < SLOW")
    return fast, slow


def _confidence(value: str) -> float:
    try:
        c = float(value)
    except ValueError:
        c = -1.0
    if not 0.0 < c < 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a level within (0, 1), e.g. 0.95")
    return c


def _hidden(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not layer sizes, e.g. 64,64")
    return sizes


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``walk-forward`` and ``compare`` to the CLI's subcommands (``common`` adds ``--config``)."""
    p = sub.add_parser(
        "walk-forward",
        help="train a policy per window of sessions, test it on the following sessions, stitch the "
        "out-of-sample results",
        description="Rolling windows of trading sessions: window k trains on sessions [k*step, "
        "k*step + train-days) and is tested on the test-days sessions after them through the replay "
        "path; the test segments are stitched into one equity curve and one report.",
    )
    common(p)
    p.add_argument("--data", nargs="+", type=Path, help="CSV/Parquet/DBN files (default: data.paths)")
    p.add_argument("--from", dest="date_from", type=bar_time_arg, help="use bars from this time (ISO)")
    p.add_argument("--to", dest="date_to", type=bar_time_arg, help="use bars before this time (ISO)")
    p.add_argument("--train-days", type=_count(1), required=True, help="training sessions per window")
    p.add_argument("--test-days", type=_count(1), required=True, help="test sessions per window")
    p.add_argument("--step", type=_count(1), help="sessions between window starts (default: --test-days)")
    p.add_argument(
        "--timesteps", type=_count(1), default=20_000, help="training steps per window (default 20000)"
    )
    p.add_argument("--seed", type=_count(0), default=7, help="training seed, every window (default 7)")
    p.add_argument("--n-steps", type=_count(1), default=2048, help="rollout length per update (default 2048)")
    p.add_argument("--batch-size", type=_count(1), default=256, help="minibatch size (default 256)")
    p.add_argument("--epochs", type=_count(1), default=10, help="epochs per update (default 10)")
    p.add_argument("--hidden", type=_hidden, default=(64, 64), help="layer sizes (default 64,64)")
    p.add_argument(
        "--workers",
        type=_count(1),
        help="windows trained at once as Ray tasks (default: as many as windows and cores; 1 = in "
        "this process, one after another)",
    )
    p.add_argument("--address", help="train on the Ray cluster at host:port or ray://host:port")
    p.add_argument("--out", type=Path, help="output directory (default runs/walkforward/<id>)")
    p.add_argument("--id", dest="run_id", help="walk-forward id (default: time + random)")
    p.set_defaults(func=cmd_walk_forward)

    p = sub.add_parser(
        "compare",
        help="does the LLM help? replay the same windows as RL only, RL + LLM (recorded answers), "
        "LLM only and rule baselines; per-session P&L and bootstrap CIs against RL only",
    )
    common(p)
    p.add_argument("--data", nargs="+", type=Path, help="CSV/Parquet/DBN files (default: data.paths)")
    p.add_argument(
        "--from",
        dest="date_from",
        type=bar_time_arg,
        help="first decided bar (ISO; the warm-up history before it is replayed, never traded; "
        "default: the first bar after the data's warm-up)",
    )
    p.add_argument(
        "--to", dest="date_to", type=bar_time_arg, help="end (exclusive, ISO; default: end of data)"
    )
    p.add_argument("--policy", help="the RL arms' ONNX policy (default: policy.path)")
    p.add_argument(
        "--walk-forward",
        type=Path,
        help="a walk-forward run's directory: compare on its test windows, each with its policy",
    )
    p.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated arms (default: all: {','.join(ARMS)}); rl_only is always run",
    )
    p.add_argument("--ema", type=_ema, default=(20, 50), help="ema_cross periods FAST,SLOW (default 20,50)")
    p.add_argument(
        "--llm-journal", type=Path, help="journal with the LLM recordings (default: <out>/llm.sqlite)"
    )
    p.add_argument(
        "--record",
        nargs="?",
        const="sync",
        choices=["sync", "async"],
        help="record the LLM arms' answers that the journal lacks by asking the LLM now: sync (waits "
        "for every answer; default) or async (answers usable after their latency)",
    )
    p.add_argument(
        "--resamples", type=_count(100), default=10_000, help="bootstrap resamples (default 10000)"
    )
    p.add_argument("--confidence", type=_confidence, default=0.95, help="CI level (default 0.95)")
    p.add_argument("--seed", type=_count(0), default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", type=Path, help="output directory (default runs/compare/<id>)")
    p.add_argument("--id", dest="run_id", help="comparison id (default: time + random)")
    p.set_defaults(func=cmd_compare)


def _base_settings(args: argparse.Namespace, data: list[Path] | None, window: bool) -> Any:
    from trader.config import load_settings
    from trader.logs import configure_logging

    o: dict[str, Any] = {}
    d: dict[str, Any] = {}
    if data:
        d["paths"] = [str(Path(p).resolve()) for p in data]
    if window and args.date_from:
        d["start"] = args.date_from
    if window and args.date_to:
        d["end"] = args.date_to
    if d:
        o["data"] = d
    settings = load_settings(args.config, o)
    level = settings.logging.level if settings.logging.level in ("warning", "error") else "warning"
    configure_logging(settings.logging.model_copy(update={"level": level}))  # one line per replay is noise
    return settings


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_walk_forward(args: argparse.Namespace) -> int:
    from trader.research.walkforward import print_walk_forward, run_walk_forward
    from trader.train.ppo import TrainConfig

    settings = _base_settings(args, args.data, window=True)
    cfg = TrainConfig(
        timesteps=args.timesteps,
        seed=args.seed,
        n_steps=min(args.n_steps, args.timesteps),
        batch_size=min(args.batch_size, args.n_steps, args.timesteps),
        n_epochs=args.epochs,
        hidden=args.hidden,
        checkpoint_every=0,
    )
    result = run_walk_forward(
        settings,
        cfg,
        train_days=args.train_days,
        test_days=args.test_days,
        step=args.step,
        workers=args.workers,
        address=args.address,
        data_paths=args.data,
        out_dir=args.out,
        run_id=args.run_id,
        progress=_say,
    )
    print_walk_forward(result)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from trader.research.compare import print_compare, run_compare

    wf = None
    data = args.data
    if args.walk_forward is not None:
        if args.date_from or args.date_to or args.policy:
            raise ConfigError(
                "compare: --walk-forward gives the windows and policies; drop --from/--to/--policy"
            )
        path = args.walk_forward / "walkforward.json"
        if not path.is_file():
            raise ConfigError(f"compare --walk-forward: {path} not found (a `trader walk-forward` output)")
        wf = json.loads(path.read_text())
        data = data or [Path(p) for p in wf["data"]]
    settings = _base_settings(args, data, window=False)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    policy = args.policy
    if policy is not None:
        from trader.policy import is_dotted

        policy = policy if is_dotted(policy) else str(Path(policy).resolve())
    result = run_compare(
        settings,
        arms=arms,
        start=args.date_from,
        end=args.date_to,
        policy=policy,
        walk_forward=wf,
        data_paths=data,
        out_dir=args.out,
        llm_journal=args.llm_journal,
        record=args.record is not None,
        record_mode=args.record or "sync",
        ema=args.ema,
        resamples=args.resamples,
        confidence=args.confidence,
        seed=args.seed,
        run_id=args.run_id,
        progress=_say,
    )
    print_compare(result)
    return 0
