"""Replay feed: recorded bars from CSV or Parquet files (polars), one file or many.

Files are read as they are (rows are never re-sorted, so time going backwards inside a file is
seen and rejected by validation) and played in the order of their first timestamp. Columns are
mapped by name or 0-based position from config, so files with other headers, an unnamed index
column or no header row load by config alone. Naive timestamps are read in ``data.timezone``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from trader.config import DataConfig
from trader.domain import Bar, BatchKind, ComponentHealth
from trader.errors import DataError
from trader.ports import Batch

FIELDS = ("timestamp", "open", "high", "low", "close", "volume")


@dataclass(frozen=True, slots=True)
class RecordedBars:
    """Bars loaded from files: arrays plus where each row came from. ``ts_ns`` < 0 = unparseable."""

    ts_ns: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    origin_file: np.ndarray  # index into files
    origin_line: np.ndarray  # 1-based line (CSV) or row (Parquet) number
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ts_ns)

    def origin(self, i: int) -> str:
        return f"{self.files[self.origin_file[i]]}:{self.origin_line[i]}"

    def items(self) -> list[tuple[Bar | None, int]]:
        """Every row as (bar, row index); bar is None where the timestamp could not be parsed."""
        ts, o, h, lo, c, v = (
            self.ts_ns.tolist(),
            self.open.tolist(),
            self.high.tolist(),
            self.low.tolist(),
            self.close.tolist(),
            self.volume.tolist(),
        )
        return [(Bar(t, o[i], h[i], lo[i], c[i], v[i]) if t >= 0 else None, i) for i, t in enumerate(ts)]

    def bar(self, i: int) -> Bar:
        return Bar(
            int(self.ts_ns[i]),
            float(self.open[i]),
            float(self.high[i]),
            float(self.low[i]),
            float(self.close[i]),
            float(self.volume[i]),
        )


def _read_file(path: Path, cfg: DataConfig) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        return pl.read_csv(path, has_header=cfg.has_header, separator=cfg.separator, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from exc


def _select(df: pl.DataFrame, path: Path, cfg: DataConfig) -> pl.DataFrame:
    cols = df.columns
    exprs = []
    for field in FIELDS:
        ref = getattr(cfg.columns, field)
        if isinstance(ref, int):
            if not 0 <= ref < len(cols):
                raise DataError(f"{path}: data.columns.{field} = {ref} but the file has {len(cols)} columns")
            name = cols[ref]
        else:
            if ref not in cols:
                raise DataError(
                    f"{path}: missing required column {ref!r} (data.columns.{field}); columns are {cols}"
                )
            name = ref
        exprs.append(pl.col(name).alias(field))
    return df.select(exprs)


def _timestamps_ns(col: pl.Series, cfg: DataConfig) -> pl.Series:
    tz = cfg.timezone
    if col.dtype == pl.String:
        if cfg.timestamp_format:
            dt = col.str.strip_chars().str.to_datetime(cfg.timestamp_format, strict=False, time_unit="ns")
        else:
            digits = col.str.strip_chars().str.contains(r"^\d+$").fill_null(False)
            if len(col) and bool(digits.all()):
                return _epoch_to_ns(col.str.strip_chars().cast(pl.Int64))
            dt = col.str.strip_chars().str.to_datetime(strict=False, time_unit="ns")
    elif col.dtype.is_integer():
        return _epoch_to_ns(col.cast(pl.Int64))
    elif isinstance(col.dtype, pl.Datetime):
        dt = col.cast(pl.Datetime("ns", col.dtype.time_zone))
    else:
        raise DataError(f"timestamp column has unsupported type {col.dtype}")
    if isinstance(dt.dtype, pl.Datetime) and dt.dtype.time_zone is None:
        dt = dt.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    return dt.dt.epoch("ns")


def _epoch_to_ns(s: pl.Series) -> pl.Series:
    # Unit by magnitude: seconds ~1e9, ms ~1e12, us ~1e15, ns ~1e18.
    m = s.abs().max()
    mag = int(m) if m is not None else 0  # type: ignore[arg-type]
    factor = 1_000_000_000 if mag < 10**11 else 1_000_000 if mag < 10**14 else 1_000 if mag < 10**17 else 1
    return s * factor


def bound_ns(value: str | None, tz: str) -> int | None:
    if value is None:
        return None
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return int(dt.timestamp() * 1_000_000_000)


def load_bars(cfg: DataConfig, paths: Sequence[Path] | None = None) -> RecordedBars:
    """Read, map and concatenate recorded bars; fails fast on unusable files, never on bad rows."""
    paths = list(paths if paths is not None else cfg.paths)
    if not paths:
        raise DataError("no data files given (data.paths is empty)")
    frames: list[tuple[int, pl.DataFrame]] = []
    header_lines = 1 if cfg.has_header else 0
    for fi, path in enumerate(paths):
        path = Path(path)
        raw = _select(_read_file(path, cfg), path, cfg)
        is_csv = path.suffix.lower() not in (".parquet", ".pq")
        try:
            ts = _timestamps_ns(raw["timestamp"], cfg)
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{path}: column timestamp cannot be read as time: {exc}") from exc
        df = pl.DataFrame(
            {
                "ts_ns": ts.fill_null(-1).cast(pl.Int64),
                **{f: raw[f].cast(pl.Float64, strict=False).fill_null(float("nan")) for f in FIELDS[1:]},
                "origin_file": pl.Series([fi] * len(raw), dtype=pl.Int32),
                "origin_line": pl.int_range(1, len(raw) + 1, eager=True) + (header_lines if is_csv else 0),
            }
        )
        frames.append((fi, df))
    first_ts = [int(d["ts_ns"].filter(d["ts_ns"] >= 0).min() or 0) for _, d in frames]  # type: ignore[arg-type]
    ordered = [d for _, d in sorted(zip(first_ts, [f for _, f in frames], strict=True), key=lambda t: t[0])]
    df = pl.concat(ordered) if ordered else pl.DataFrame()
    lo, hi = bound_ns(cfg.start, cfg.timezone), bound_ns(cfg.end, cfg.timezone)
    if lo is not None:
        df = df.filter((pl.col("ts_ns") >= lo) | (pl.col("ts_ns") < 0))
    if hi is not None:
        df = df.filter(pl.col("ts_ns") < hi)
    return RecordedBars(
        ts_ns=df["ts_ns"].to_numpy(),
        open=df["open"].to_numpy(),
        high=df["high"].to_numpy(),
        low=df["low"].to_numpy(),
        close=df["close"].to_numpy(),
        volume=df["volume"].to_numpy(),
        origin_file=df["origin_file"].to_numpy(),
        origin_line=df["origin_line"].to_numpy(),
        files=tuple(str(p) for p in paths),
    )


class ReplayFeed:
    """Plays recorded bars as fast as possible (speed 0) or at N times real time."""

    CHUNK = 256

    def __init__(self, bars: RecordedBars, speed: float = 0.0) -> None:
        self.recorded = bars
        self.speed = speed
        self.start_row = 0  # rows before this were already processed (crash recovery)
        self.done = False

    def origin(self, row: int) -> str:
        return self.recorded.origin(row) if 0 <= row < len(self.recorded) else f"row {row}"

    def resume_after(self, last_ts_ns: int, next_row: int) -> None:
        """Continue from ``next_row`` (the rows before it were re-driven from the journal)."""
        self.start_row = next_row

    def health(self) -> ComponentHealth:
        return ComponentHealth("recorded", not self.done)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """Yields lists of (bar, row index); bar is None for a row whose timestamp could not be parsed.

        Unpaced replay hands out chunks (one await per chunk, not per bar) and yields to the event
        loop between them, so signal handlers and other tasks still run; paced replay yields each
        bar when its time has come.
        """
        items = self.recorded.items()[self.start_row :]
        if self.speed <= 0:
            for s in range(0, len(items), self.CHUNK):
                yield Batch(BatchKind.LIVE, items[s : s + self.CHUNK])
                await asyncio.sleep(0)
            self.done = True
            return
        prev_ts: int | None = None
        for item in items:
            bar = item[0]
            if bar is not None:
                if prev_ts is not None and bar.ts_ns > prev_ts:
                    await asyncio.sleep((bar.ts_ns - prev_ts) / 1e9 / self.speed)
                prev_ts = bar.ts_ns
            yield Batch(BatchKind.LIVE, [item])
        self.done = True
