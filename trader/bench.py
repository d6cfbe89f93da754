"""Replay benchmark: end-to-end bars/s and per-bar decision latency, printed as JSON.

End to end = policy + fusion + risk + paper broker + journal (LLM off), over the shared NQ
file (or --data), at each ``journal.level`` (full, trades, summary). Feature precomputation and
file loading are timed separately (``setup_s``). Decision latency is bar in ─▶ order intent out,
per bar, in microseconds. ``--memory``: peak RSS of one replay of the data and of ten copies of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trader.config import load_settings
from trader.engine import Engine, RunStats

SHARED = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "NQ_1min_2023-11-19_2023-12-04.csv"
)


def _one(data: Path, level: str = "full", batch_bars: int | None = None) -> dict[str, float]:
    from trader.llm.isolation import pin_bar_loop
    from trader.wiring import build_replay

    overrides: dict[str, Any] = {
        "data": {"paths": [str(data)]},
        "advisor": {"mode": "off"},
        "journal": {"level": level},
    }
    if batch_bars is not None:
        overrides["policy"] = {"batch_bars": batch_bars}
    settings = load_settings(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = build_replay(settings, Path(tmp) / "bench.sqlite")
        pin_bar_loop(settings.cpu, beside=(run.journal.writer_pid,))  # as `trader replay` does
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = asyncio.run(_run(run.engine))
        run.journal.close()  # the journal's last batch is part of the work
        wall = time.perf_counter() - t1
    lat = np.asarray(stats.latencies_ns, dtype=np.float64) / 1000.0
    ahead = run.engine.look_ahead
    return {
        "bars": stats.bars,
        "setup_s": setup,
        "loop_s": wall,
        "bars_per_second": stats.bars / wall,
        "bars_per_second_incl_setup": stats.bars / (wall + setup),
        "p50_us": float(np.percentile(lat, 50)),
        "p99_us": float(np.percentile(lat, 99)),
        "max_us": float(lat.max()),
        "policy_calls": ahead.evaluations if ahead is not None else stats.bars - run.engine.warmup,
    }


async def _run(engine: Engine) -> RunStats:
    stats = await engine.run()
    await engine.close()
    return stats


def llm_answer_latency(n: int = 12) -> dict[str, object]:
    """Answer latency of the local GGUF on varied prompts, with and without the KV prefix cache."""
    from trader.config import load_settings as _ls
    from trader.llm.backends import LlamaCppBackend
    from trader.llm.prompts import PLACEHOLDERS

    s = _ls(None)
    system = s.prompts.system.format(**PLACEHOLDERS)
    out: dict[str, object] = {}
    for cache in (True, False):
        backend = LlamaCppBackend(s.llm_model, prefix_cache=cache)
        lat, toks = [], []
        for k in range(n + 1):
            ctx = dict(PLACEHOLDERS)
            ctx.update(current_price=16000.0 + 0.25 * k, current_time=f"10:{k % 60:02d}", rsi=40.0 + k)
            r = backend.complete(system, s.prompts.context_template.format(**ctx), 60.0)
            if k:  # the first query fills the cache in both cases
                lat.append(r.latency_s * 1000.0)
                toks.append(r.completion_tokens / r.latency_s)
        backend.close()
        a = np.asarray(lat)
        out["prefix_cache" if cache else "no_prefix_cache"] = {
            "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1),
            "completion_tokens_per_s_incl_prompt": round(float(np.mean(toks)), 1),
        }
    return out


def llm_bar_path_once(
    isolation: str, n_threads: int, ms_per_bar: float, query_interval: int
) -> dict[str, Any]:
    """One paced replay of the bundled slice with async LLM advice: per decided bar, its decision
    latency and whether a query was in flight. Queries every ``query_interval`` bars, so busy and
    idle stretches alternate through the run and share its conditions. The kill switch is on so no
    position or balance change triggers extra queries: every bar still runs the ONNX policy,
    fusion, risk and the journal; only orders are missing."""
    from trader.llm.isolation import pin_bar_loop
    from trader.wiring import build_replay

    settings = load_settings(None, _llm_bench_overrides(isolation, n_threads, ms_per_bar, query_interval))
    with tempfile.TemporaryDirectory() as tmp:
        run = build_replay(settings, Path(tmp) / "llm.sqlite", advisor_timing="wall")
        pin_bar_loop(settings.cpu, beside=(run.journal.writer_pid,))
        engine = run.engine
        stats = asyncio.run(_run(engine))
        run.journal.close()
    lat = np.asarray(stats.latencies_ns, dtype=np.float64) / 1000.0
    busy = np.asarray(stats.llm_busy, dtype=bool)
    decided = np.arange(len(lat)) >= engine.warmup  # warm-up bars ask nothing
    on, off = lat[decided & busy], lat[decided & ~busy]
    adv: Any = engine.advisor
    llm_ms = np.asarray(adv.stats.latencies_s) * 1000.0 if adv is not None else np.zeros(0)
    return {
        "busy_bars": len(on),
        "idle_bars": len(off),
        "queries": adv.stats.queries if adv is not None else 0,
        "busy_p50_us": round(float(np.percentile(on, 50)), 1) if len(on) else None,
        "idle_p50_us": round(float(np.percentile(off, 50)), 1) if len(off) else None,
        "busy_p99_us": round(float(np.percentile(on, 99)), 1) if len(on) else None,
        "idle_p99_us": round(float(np.percentile(off, 99)), 1) if len(off) else None,
        "p99_ratio": round(float(np.percentile(on, 99) / np.percentile(off, 99)), 3)
        if len(on) and len(off)
        else None,
        "llm_answer_p50_ms": round(float(np.percentile(llm_ms, 50)), 1) if len(llm_ms) else None,
    }


def _llm_bench_overrides(isolation: str, n_threads: int, ms_per_bar: float, interval: int) -> dict[str, Any]:
    return {
        "advisor": {"mode": "async", "only_when_actionable": False},
        "fusion": {"query_interval": interval},
        "risk": {"kill_switch": True},
        "llm_model": {"isolation": isolation, "n_threads": n_threads},
        "cpu": {"bar_loop_cores": "all" if isolation == "none" else "first"},
        "data": {"speed": 60_000.0 / ms_per_bar},
    }


def llm_bar_path(
    variants: tuple[tuple[str, int], ...] = (("process", 0), ("thread", 0), ("none", 0)),
    runs: int = 5,
    ms_per_bar: float = 2.0,
) -> dict[str, Any]:
    """Busy/idle p99 decision latency, per isolation variant, over several runs: the median ratio
    and its spread. A first (discarded) run measures the variant's answer latency inside the paced
    replay; the measured runs then ask every 2 x that many bars, so about half the decided bars see
    a query in flight. ``none`` is the old way (the model in the advisor thread on every core,
    unpinned)."""
    out: dict[str, Any] = {"ms_per_bar": ms_per_bar, "runs": runs}
    for isolation, n_threads in variants:
        calibration = llm_bar_path_once(isolation, n_threads, ms_per_bar, 250)
        answer_ms = float(calibration["llm_answer_p50_ms"] or 1000.0)
        query_interval = max(10, round(2.0 * answer_ms / ms_per_bar))
        per_run = [llm_bar_path_once(isolation, n_threads, ms_per_bar, query_interval) for _ in range(runs)]
        ratios = sorted(r["p99_ratio"] for r in per_run if r["p99_ratio"] is not None)
        out[f"{isolation}" + (f"_{n_threads}_threads" if n_threads else "")] = {
            "answer_ms_in_run": round(answer_ms, 1),
            "query_interval_bars": query_interval,
            "median_p99_ratio": ratios[len(ratios) // 2] if ratios else None,
            "p99_ratio_min": ratios[0] if ratios else None,
            "p99_ratio_max": ratios[-1] if ratios else None,
            "busy_bars_per_run": int(np.median([r["busy_bars"] for r in per_run])),
            "idle_bars_per_run": int(np.median([r["idle_bars"] for r in per_run])),
            "runs": per_run,
        }
    return out


def llm_main(runs: int = 5, answer_latency: bool = True) -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    out: dict[str, Any] = {
        "benchmark": "llm_small_gguf_cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
    }
    if answer_latency:
        out["answer_latency"] = llm_answer_latency()
    out["bar_path_busy_vs_idle"] = llm_bar_path(runs=runs)
    print(json.dumps(out, indent=2))
    return 0


LEVELS = ("full", "trades", "summary")


def main(
    data: Path | None = None,
    repeat: int = 5,
    levels: tuple[str, ...] = LEVELS,
    batch_bars: int | None = None,
) -> int:
    """The replay benchmark at each ``journal.level`` (the levels take turns, so a drift of this
    VM's speed spreads over all of them); the top-level numbers are the first level's."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    path = Path(data or os.environ.get("TRADER_BENCH_DATA") or SHARED)
    runs: dict[str, list[dict[str, float]]] = {level: [] for level in levels}
    for _ in range(max(1, repeat)):
        for level in levels:
            runs[level].append(_one(path, level, batch_bars))
    per_level = {level: _summary(r) for level, r in runs.items()}
    first = per_level[levels[0]]
    out = {
        "benchmark": f"replay_end_to_end_llm_off (median run), journal.level = {levels[0]}",
        "data": str(path),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "repeat": max(1, repeat),
        "policy_batch_bars": batch_bars if batch_bars is not None else load_settings(None).policy.batch_bars,
        **first,
        "journal_levels": {
            level: {k: v[k] for k in ("bars_per_second", "decision_latency_us", "all_runs_bars_per_second")}
            for level, v in per_level.items()
        },
    }
    print(json.dumps(out, indent=2))
    return 0


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    # This VM's speed drifts between runs; report the median run, and the best beside it.
    ranked = sorted(runs, key=lambda r: r["bars_per_second"])
    best = ranked[len(ranked) // 2]
    return {
        "bars": best["bars"],
        "bars_per_second": round(best["bars_per_second"], 1),
        "bars_per_second_incl_setup": round(best["bars_per_second_incl_setup"], 1),
        "setup_s": round(best["setup_s"], 3),
        "policy_calls": int(best["policy_calls"]),
        "decision_latency_us": {
            "p50": round(best["p50_us"], 1),
            "p99": round(best["p99_us"], 1),
            "max": round(best["max_us"], 1),
        },
        "best_bars_per_second": round(ranked[-1]["bars_per_second"], 1),
        "all_runs_bars_per_second": [round(r["bars_per_second"], 1) for r in runs],
        "all_runs_p99_us": [round(r["p99_us"], 1) for r in runs],
    }


# -- memory ----------------------------------------------------------------------------------------
def long_data(src: Path, copies: int, out: Path) -> Path:
    """``copies`` back-to-back copies of a CSV of bars, each shifted three weeks later in time (so
    weekdays and sessions keep their place): a longer market for the memory measurement."""
    import datetime as dt

    import polars as pl

    df = pl.read_csv(src, infer_schema=False)
    ts = pl.col(df.columns[0]).str.to_datetime("%Y-%m-%d %H:%M:%S")
    span = dt.timedelta(weeks=3 * max(1, -(-_span_days(df) // 21)))
    parts = [
        df.with_columns((ts + span * k).dt.strftime("%Y-%m-%d %H:%M:%S").alias(df.columns[0]))
        for k in range(copies)
    ]
    pl.concat(parts).write_csv(out)
    return out


def _span_days(df: Any) -> int:
    import datetime as dt

    first, last = (dt.datetime.fromisoformat(df[0, 0]), dt.datetime.fromisoformat(df[-1, 0]))
    return (last - first).days + 1


def memory_child(data: str, level: str) -> None:
    """One replay in this (fresh) process; prints its peak RSS as JSON (the parent's subprocess)."""
    import resource

    import structlog

    from trader.replay import replay

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    settings = load_settings(
        None, {"data": {"paths": [data]}, "advisor": {"mode": "off"}, "journal": {"level": level}}
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = replay(settings, journal_path=Path(tmp) / "memory.sqlite")
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "bars": out.stats.bars,
                "peak_rss_mb": round(peak / 1024, 1),
                "rss_before_replay_mb": round(before / 1024, 1),
                "replay_s_incl_setup": round(wall, 2),
            }
        )
    )


def memory_main(data: Path | None = None, copies: int = 10, level: str = "full") -> int:
    """Peak RSS of one replay (in a fresh process each) of the data and of ``copies`` copies of it
    back to back: how memory grows with the length of the replay."""
    import subprocess
    import sys

    path = Path(data or os.environ.get("TRADER_BENCH_DATA") or SHARED)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        long = long_data(path, copies, Path(tmp) / f"x{copies}.csv")
        for name, p in (("x1", path), (f"x{copies}", long)):
            code = f"from trader.bench import memory_child; memory_child({str(p)!r}, {level!r})"
            proc = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {"benchmark": "replay_peak_rss", "data": str(path), "journal_level": level, **results}, indent=2
        )
    )
    return 0


# -- instructions ----------------------------------------------------------------------------------
# This VM's wall clock swings by a third between runs minutes apart (other tenants), more than most
# hot-path changes move it. The instructions one replay executes (valgrind's callgrind, every thread)
# do not: they compare two versions of the code to a fraction of a percent, in any weather.


def instructions_child(data: str, level: str) -> None:
    """One replay, run under callgrind by :func:`instructions_main`, between two marker calls that
    the parent's callgrind options name: counting is zeroed entering ``getppid`` and dumped entering
    ``getpgrp``, so the count is the replay's loop and its journal's last batch (the policy's
    one-off batch check included), not the imports and set-up around them."""
    import structlog

    from trader.wiring import build_replay

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    overrides = {"data": {"paths": [data]}, "advisor": {"mode": "off"}, "journal": {"level": level}}
    settings = load_settings(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_replay(settings, Path(tmp) / "instructions.sqlite")
        os.getppid()  # callgrind: --zero-before=getppid
        stats = asyncio.run(_run(run.engine))
        run.journal.close()
        os.getpgrp()  # callgrind: --dump-before=getpgrp
    print(json.dumps({"bars": stats.bars}))


def instructions_main(data: Path | None = None, levels: tuple[str, ...] = ("full",)) -> int:
    """Instructions of one replay at each ``journal.level`` (callgrind, every thread together: the
    bar loop and the journal writer thread; and the journal's writer process, its whole life, start
    included), in a fresh process each with a fixed hash seed. Needs valgrind (Debian: ``apt-get
    install valgrind``); runs ~100 times slower than the replay."""
    import shutil
    import subprocess
    import sys

    if shutil.which("valgrind") is None:
        print("scripts/bench --instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    path = Path(data or os.environ.get("TRADER_BENCH_DATA") or SHARED)
    out: dict[str, Any] = {
        "benchmark": "replay_instructions_llm_off (callgrind, every thread)",
        "data": str(path),
        "machine": f"{platform.machine()} python {platform.python_version()}",
    }
    for level in levels:
        with tempfile.TemporaryDirectory() as tmp:
            code = f"from trader.bench import instructions_child as c; c({str(path)!r}, {level!r})"
            proc = subprocess.Popen(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--trace-children=yes",  # the journal's writer process too
                    f"--callgrind-out-file={tmp}/callgrind.%p.out",
                    "--zero-before=getppid",
                    "--dump-before=getpgrp",
                    sys.executable,
                    "-c",
                    code,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                print(stderr[-2000:], file=sys.stderr)
                return 1
            bars = json.loads(stdout.strip().splitlines()[-1])["bars"]
            marked = Path(tmp) / f"callgrind.{proc.pid}.out.1"  # the dump at the second marker
            if not marked.is_file():
                print(f"callgrind wrote no dump at the replay's end marker ({marked.name})", file=sys.stderr)
                return 1
            total = _callgrind_total(marked)
            # the journal's writer process: no markers there, one dump at its exit
            sinks = [f for f in Path(tmp).glob("callgrind.*.out") if "journal/sink.py" in _callgrind_cmd(f)]
            if len(sinks) != 1:
                print(f"expected one dump of the journal's writer, found {len(sinks)}", file=sys.stderr)
                return 1
            writer = _callgrind_total(sinks[0])
        per_bar = round((total + writer) / bars) if bars else None
        out[level] = {
            "bars": bars,
            "instructions_M": round(total / 1e6, 1),
            "writer_process_M": round(writer / 1e6, 1),
            "per_bar": per_bar,
        }
    print(json.dumps(out, indent=2))
    return 0


def _callgrind_cmd(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("cmd:"):
            return line
    return ""


def _callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no instruction total in callgrind's output")
