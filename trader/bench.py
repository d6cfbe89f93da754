"""Replay benchmark: end-to-end bars/s and per-bar decision latency, printed as JSON.

End to end = policy + fusion + risk + paper broker + journal (LLM off), over the shared NQ
file (or --data). Feature precomputation and file loading are timed separately (``setup_s``).
Decision latency is bar in ─▶ order intent out, per bar, in microseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from trader.config import load_settings
from trader.engine import Engine, RunStats

SHARED = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "NQ_1min_2023-11-19_2023-12-04.csv"
)


def _one(data: Path) -> dict[str, float]:
    from trader.wiring import build_replay

    settings = load_settings(None, {"data": {"paths": [str(data)]}, "advisor": {"mode": "off"}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = build_replay(settings, Path(tmp) / "bench.sqlite")
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = asyncio.run(_run(run.engine))
        run.journal.close()  # the journal's last batch is part of the work
        wall = time.perf_counter() - t1
    lat = np.asarray(stats.latencies_ns, dtype=np.float64) / 1000.0
    return {
        "bars": stats.bars,
        "setup_s": setup,
        "loop_s": wall,
        "bars_per_second": stats.bars / wall,
        "bars_per_second_incl_setup": stats.bars / (wall + setup),
        "p50_us": float(np.percentile(lat, 50)),
        "p99_us": float(np.percentile(lat, 99)),
        "max_us": float(lat.max()),
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


def llm_bar_path(ms_per_bar: float = 10.0, query_interval: int = 150) -> dict[str, object]:
    """Per-bar decision latency while an LLM query is in flight vs idle, in the same paced replay."""
    from trader.wiring import build_replay

    settings = load_settings(
        None,
        {
            "advisor": {"mode": "async", "only_when_actionable": False},
            "fusion": {"query_interval": query_interval},
            "data": {"end": "2023-11-29T06:00:00", "speed": 60_000.0 / ms_per_bar},
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = build_replay(settings, Path(tmp) / "llm.sqlite", advisor_timing="wall")
        engine = run.engine
        advisor = engine.advisor
        stats = asyncio.run(_run(engine))
        run.journal.close()
    lat = np.asarray(stats.latencies_ns, dtype=np.float64) / 1000.0
    decided = np.arange(len(lat)) >= settings.features.warmup_bars
    flags = np.zeros(len(lat), dtype=bool)
    flags[decided] = np.asarray(stats.llm_busy, dtype=bool)[: int(decided.sum())]
    on, off = lat[decided & flags], lat[decided & ~flags]

    def p(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 1) if len(a) else None

    ratio = (p(on, 99) or 0) / (p(off, 99) or 1)
    return {
        "bars_llm_busy": len(on),
        "bars_llm_idle": len(off),
        "queries": advisor.stats.queries if advisor else 0,  # type: ignore[attr-defined]
        "busy_p50_us": p(on, 50),
        "busy_p99_us": p(on, 99),
        "idle_p50_us": p(off, 50),
        "idle_p99_us": p(off, 99),
        "p99_ratio_busy_over_idle": round(ratio, 3),
    }


def llm_main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    out = {
        "benchmark": "llm_small_gguf_cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "answer_latency": llm_answer_latency(),
        "bar_path_with_llm_async": llm_bar_path(),
    }
    print(json.dumps(out, indent=2))
    return 0


def main(data: Path | None = None, repeat: int = 5) -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    path = Path(data or os.environ.get("TRADER_BENCH_DATA") or SHARED)
    runs = [_one(path) for _ in range(max(1, repeat))]
    # This VM's speed drifts between runs; report the median run, and the best beside it.
    ranked = sorted(runs, key=lambda r: r["bars_per_second"])
    best = ranked[len(ranked) // 2]
    out = {
        "benchmark": "replay_end_to_end_llm_off (median run)",
        "data": str(path),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
        "repeat": len(runs),
        "bars": best["bars"],
        "bars_per_second": round(best["bars_per_second"], 1),
        "bars_per_second_incl_setup": round(best["bars_per_second_incl_setup"], 1),
        "setup_s": round(best["setup_s"], 3),
        "decision_latency_us": {
            "p50": round(best["p50_us"], 1),
            "p99": round(best["p99_us"], 1),
            "max": round(best["max_us"], 1),
        },
        "best_bars_per_second": round(ranked[-1]["bars_per_second"], 1),
        "all_runs_bars_per_second": [round(r["bars_per_second"], 1) for r in runs],
        "all_runs_p99_us": [round(r["p99_us"], 1) for r in runs],
    }
    print(json.dumps(out, indent=2))
    return 0
