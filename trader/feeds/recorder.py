"""`trader record`: completed live bars ─▶ Parquet, one file per exchange-calendar day.

Each batch from the live feed (the warm-up history, catch-up after a reconnect, each new bar) is
merged into its day's file at once: read, append, de-duplicate by timestamp (the last version
wins), sort, write to a temporary file and rename it over the old one, so a file on disk is always
complete and a crash loses at most the bar being written. The files are what ``trader replay``
reads (``timestamp`` is a UTC datetime column, then open, high, low, close, volume).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import structlog

from trader.adapters.tradovate.feed import TradovateFeed
from trader.adapters.tradovate.rest import TradovateRest
from trader.config import Settings
from trader.domain import Bar

log = structlog.get_logger(__name__)

SCHEMA = {
    "timestamp": pl.Datetime("ns", "UTC"),
    "open": pl.Float64,
    "high": pl.Float64,
    "low": pl.Float64,
    "close": pl.Float64,
    "volume": pl.Float64,
}


class DayParquetWriter:
    def __init__(self, out_dir: Path, symbol: str, timezone: str) -> None:
        self.dir = out_dir
        self.symbol = symbol
        self.tz = ZoneInfo(timezone)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def path_for(self, day: str) -> Path:
        return self.dir / f"{self.symbol}_{day}.parquet"

    def add(self, bars: list[Bar]) -> None:
        by_day: dict[str, list[Bar]] = defaultdict(list)
        for b in bars:
            day = datetime.fromtimestamp(b.ts_ns / 1e9, UTC).astimezone(self.tz).date().isoformat()
            by_day[day].append(b)
        for day, rows in by_day.items():
            new = pl.DataFrame(
                {
                    "timestamp": [b.ts_ns for b in rows],
                    "open": [b.open for b in rows],
                    "high": [b.high for b in rows],
                    "low": [b.low for b in rows],
                    "close": [b.close for b in rows],
                    "volume": [b.volume for b in rows],
                }
            ).with_columns(pl.col("timestamp").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"))
            path = self.path_for(day)
            df = pl.concat([pl.read_parquet(path), new]) if path.exists() else new
            df = df.unique("timestamp", keep="last").sort("timestamp")
            tmp = path.with_suffix(".parquet.tmp")
            df.write_parquet(tmp)
            os.replace(tmp, path)
            self.written += len(rows)


async def record(settings: Settings, out_dir: Path, max_bars: int | None = None) -> int:
    """Record until stopped (SIGINT/SIGTERM) or ``max_bars`` bars; returns the bars written."""
    rest = TradovateRest(settings.tradovate)
    feed = TradovateFeed(settings, rest)
    writer = DayParquetWriter(out_dir, settings.tradovate.symbol, settings.instrument.timezone)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await rest.start()
        async with contextlib.aclosing(feed.batches()) as batches:
            async for batch in batches:
                bars = [b for b, _ in batch.items if b is not None]
                writer.add(bars)
                log.info("recorded", kind=batch.kind.value, bars=len(bars), total=writer.written)
                if max_bars is not None and writer.written >= max_bars:
                    break
    except asyncio.CancelledError:
        log.info("record_stopped", total=writer.written)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await rest.close()
    return writer.written
