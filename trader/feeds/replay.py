"""Replay feed: recorded bars from CSV or Parquet files (polars) or Databento DBN files (OHLCV-1m,
``.dbn``/``.dbn.zst``, read by :mod:`trader.feeds.dbn`), one file or many.

Files are read as they are (rows are never re-sorted, so time going backwards inside a file is
seen and rejected by validation) and played in the order of their first timestamp. Columns are
mapped by name or 0-based position from config, so files with other headers, an unnamed index
column or no header row load by config alone. Naive timestamps are read in ``data.timezone``.

Each file is judged as a whole before any of its rows is played (vectorised, no loop over rows):

* Its timestamps are read one way: epoch numbers in the unit most of its rows use (seconds,
  milliseconds, microseconds or nanoseconds, by magnitude), or date-times with or without a UTC
  offset as most of its rows are written. A row written another way is refused with the reason
  (``epoch_unit_mismatch``, ``timezone_mismatch``), never read the file's way.
* Given the instrument's tick size, a price off the tick grid is refused (``off_tick_grid``); a
  print far from the prices around it is refused (``price_outlier``), see
  :mod:`trader.features.validation`.
* A file where more than :data:`MAX_REFUSED_FRACTION` of the rows are refused for one of those
  reasons, or have unreadable timestamps, is refused as a whole, naming the reason and a line: so
  many bad rows say the file is not what the config describes (another instrument, unit or zone),
  and trading on what is left would be trading on a market with holes.
* Its bar interval (the median spacing of its timestamps) must be ``data.bar_seconds``.

Refused rows are counted and journaled by the engine like any rejected bar (with file:line). A
file without rows, or files and a ``data.start``/``data.end`` range that leave no usable bar, are
an error at start.
"""

from __future__ import annotations

import asyncio
import csv
import math
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import structlog

from trader.config import DataConfig
from trader.domain import Bar, BatchKind, ComponentHealth
from trader.errors import ConfigError, DataError
from trader.features.validation import (
    ROW_REASONS,
    SOURCE_REASONS,
    RefusedBar,
    off_tick_grid,
    price_codes,
    price_outliers,
    reason_codes,
)
from trader.feeds.dbn import is_dbn, read_dbn
from trader.ports import Batch

log = structlog.get_logger(__name__)

FIELDS = ("timestamp", "open", "high", "low", "close", "volume")
MAX_REFUSED_FRACTION = 0.1  # more rows than this refused for one reason: the file is refused
BAR_INTERVAL_TOLERANCE = 0.02  # relative: the median spacing may differ this much from bar_seconds

_INT64_MAX = int(np.iinfo(np.int64).max)
_EPOCH_UNITS = ("seconds", "milliseconds", "microseconds", "nanoseconds")
_EPOCH_NS = np.array([1_000_000_000, 1_000_000, 1_000, 1], dtype=np.int64)
# Unit by magnitude: seconds ~1e9, ms ~1e12, us ~1e15, ns ~1e18.
_EPOCH_BOUNDS = np.array([10**11, 10**14, 10**17], dtype=np.int64)
_DIGITS = r"^\d+$"
_UTC_OFFSET = r"(?:[Zz]|[+-]\d\d:?\d\d)$"
_ISO_OFFSET = re.compile(r"[+-]\d\d:?\d\d(?::?\d\d(?:\.\d+)?)?$")
_PARSE_PROBES = 64  # values tried one by one when polars cannot infer a date-time format
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _source_code(reason: str) -> int:
    return SOURCE_REASONS.index(reason) + 1


@dataclass(frozen=True, slots=True)
class RecordedBars:
    """Bars loaded from files: arrays plus where each row came from. ``ts_ns`` < 0 = unparseable.

    ``refused``: per row 0, or 1 + an index into :data:`SOURCE_REASONS` for a row its file refused
    (played as a :class:`RefusedBar`, which the validator rejects with that reason); None = none.
    """

    ts_ns: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    origin_file: np.ndarray  # index into files
    origin_line: np.ndarray  # 1-based line (CSV) or row (Parquet) number
    files: tuple[str, ...]
    refused: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ts_ns)

    def origin(self, i: int) -> str:
        return f"{self.files[self.origin_file[i]]}:{self.origin_line[i]}"

    def items(self, start: int = 0, stop: int | None = None) -> list[tuple[Bar | None, int]]:
        """Rows ``start:stop`` (default: every row) as (bar, row index); bar is None where the
        timestamp could not be parsed, a :class:`RefusedBar` where its file refused the row."""
        stop = len(self) if stop is None else min(stop, len(self))
        start = min(max(start, 0), stop)
        span = slice(start, stop)
        # map() and zip() walk the columns in C: the only Python work per row is Bar's own __init__
        out: list[tuple[Bar | None, int]] = list(
            zip(
                map(
                    Bar,
                    self.ts_ns[span].tolist(),
                    self.open[span].tolist(),
                    self.high[span].tolist(),
                    self.low[span].tolist(),
                    self.close[span].tolist(),
                    self.volume[span].tolist(),
                ),
                range(start, stop),
                strict=True,
            )
        )
        if self.refused is not None:
            for i in np.flatnonzero(self.refused[span]).tolist():
                out[i] = (self.bar(start + i), start + i)
        for i in np.flatnonzero(self.ts_ns[span] < 0).tolist():  # unreadable time: whatever else
            out[i] = (None, start + i)
        return out

    def bar(self, i: int) -> Bar:
        values = (
            int(self.ts_ns[i]),
            float(self.open[i]),
            float(self.high[i]),
            float(self.low[i]),
            float(self.close[i]),
            float(self.volume[i]),
        )
        code = 0 if self.refused is None else int(self.refused[i])
        return Bar(*values) if code == 0 else RefusedBar(*values, SOURCE_REASONS[code - 1])

    def reason_codes(self) -> np.ndarray:
        """Per row, what the engine's validator will say when the rows are played in this order:
        0 = accepted, else an index into :data:`trader.features.validation.ROW_REASONS`."""
        return reason_codes(self.ts_ns, self.open, self.high, self.low, self.close, self.volume, self.refused)

    def accepted(self) -> np.ndarray:
        """The rows the engine will accept (a bool mask; vectorised, same verdicts as the validator)."""
        return self.reason_codes() == 0

    def bars_after_warmup(self, warmup_bars: int) -> int:
        """How many bars the replay will decide on: the accepted bars after the first
        ``warmup_bars`` (``features.warmup_bars``), which only warm the indicators up."""
        return max(0, int(self.accepted().sum()) - warmup_bars)


@dataclass(frozen=True, slots=True)
class _Source:
    """One data file as read, for messages: where its rows are."""

    path: Path
    is_csv: bool
    first_line: int  # line (CSV) or row (Parquet) number of the first row
    records: np.ndarray | None = None  # DBN: each row's record number in the file

    def at(self, i: int) -> str:
        if self.records is not None:
            return f"record {int(self.records[i])}"
        return f"{'line' if self.is_csv else 'row'} {self.first_line + i}"


def _head(path: Path) -> bytes:
    """The file's first bytes (b"" where it cannot be read: :func:`_read_file` says why)."""
    try:
        with path.open("rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _read_file(path: Path, cfg: DataConfig) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        with path.open("rb") as f:
            head = f.read(4)
        if not head:
            raise DataError(f"{path}: is empty (no header, no bars)")
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{path}: is UTF-16 text; save it as UTF-8")
        # utf8-lossy: a stray byte spoils its row (rejected and counted), not the whole file
        return pl.read_csv(
            path,
            has_header=cfg.has_header,
            separator=cfg.separator,
            infer_schema=False,
            encoding="utf8-lossy",
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        where = _ragged_line(path, cfg.separator) if "more fields" in str(exc) else ""
        raise DataError(f"{path}: cannot be read: {where or exc}") from exc


def _ragged_line(path: Path, separator: str) -> str:
    """The first line with more fields than the first (only read when polars refused the file)."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        width = -1
        for n, row in enumerate(csv.reader(f, delimiter=separator), 1):
            if width < 0:
                width = len(row)
            elif len(row) > width:
                return f"line {n} has {len(row)} fields, line 1 has {width}"
    return ""


def _select(df: pl.DataFrame, path: Path, cfg: DataConfig) -> tuple[pl.DataFrame, dict[str, str]]:
    """The six fields by config, and each field's column name in the file (for messages)."""
    cols = df.columns
    exprs = []
    names: dict[str, str] = {}
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
        names[field] = name
        exprs.append(pl.col(name).alias(field))
    return df.select(exprs), names


def _column(path: Path, names: dict[str, str], field: str) -> str:
    return f"{path}: column {names[field]!r} (data.columns.{field})"


def _prices(raw: pl.DataFrame, src: _Source, names: dict[str, str]) -> dict[str, np.ndarray]:
    """Prices and volume as float64 (NaN where a value is not a number: that row is rejected);
    a column that holds no numbers at all, or a typed column that is not numeric, is an error."""
    out = {}
    for field in FIELDS[1:]:
        col = raw[field]
        if col.dtype == pl.String and src.is_csv:
            num = col.cast(pl.Float64, strict=False)
            if num.null_count() > col.null_count():  # text around a number, or not a number
                num = col.str.strip_chars().cast(pl.Float64, strict=False)
            if len(num) and num.null_count() == len(num):
                present = np.flatnonzero(col.is_not_null().to_numpy())
                if not len(present):
                    raise DataError(f"{_column(src.path, names, field)} is empty")
                i = int(present[0])
                raise DataError(
                    f"{_column(src.path, names, field)} holds no numbers ({src.at(i)}: {col[i]!r})"
                )
        elif col.dtype == pl.Float32:
            # through its shortest decimal text, so a float32 16000.3 stays on a 0.1 tick grid
            num = col.cast(pl.String).cast(pl.Float64)
        elif col.dtype.is_numeric():
            num = col.cast(pl.Float64, strict=False)
        else:
            raise DataError(f"{_column(src.path, names, field)} holds {col.dtype} values, not numbers")
        out[field] = num.fill_null(float("nan")).to_numpy()
    return out


def _timestamps(
    col: pl.Series, src: _Source, names: dict[str, str], cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(ts_ns with -1 where unreadable, refused codes) for one file, read one way per file."""
    dtype = col.dtype
    try:
        if dtype == pl.String:
            s = col.str.strip_chars()
            if cfg.timestamp_format:
                dt = s.str.to_datetime(cfg.timestamp_format, strict=False, time_unit="us")
                return _datetime_ns(dt, cfg.timezone), np.zeros(len(s), np.int8)
            digits = s.str.contains(_DIGITS).fill_null(False)
            if 2 * int(digits.sum()) > len(s) - s.null_count():
                epoch = s.zip_with(digits, pl.Series([None] * len(s), dtype=pl.String))
                return _epoch_ns(epoch.cast(pl.Int64, strict=False).fill_null(-1).to_numpy(), src, names)
            return _datetime_strings(s, src, names, cfg.timezone)
        if dtype.is_integer():
            return _epoch_ns(col.cast(pl.Int64, strict=False).fill_null(-1).to_numpy(), src, names)
        if isinstance(dtype, pl.Datetime):
            us = col.cast(pl.Datetime("us", dtype.time_zone))
            return _datetime_ns(us, cfg.timezone), np.zeros(len(col), np.int8)
        if dtype == pl.Date:
            return _datetime_ns(col.cast(pl.Datetime("us")), cfg.timezone), np.zeros(len(col), np.int8)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{_column(src.path, names, 'timestamp')} cannot be read as time: {exc}") from exc
    raise DataError(f"{_column(src.path, names, 'timestamp')} holds {dtype} values, not times")


def _epoch_ns(v: np.ndarray, src: _Source, names: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Epoch numbers (-1 = unreadable) to ns in the unit most rows use; rows whose magnitude says
    another unit are refused (their time, in their own unit, is kept for the journal)."""
    valid = v >= 0
    unit_of = np.searchsorted(_EPOCH_BOUNDS, v, side="right")
    counts = np.bincount(unit_of[valid], minlength=len(_EPOCH_UNITS))
    unit = int(np.argmax(counts))
    factor = _EPOCH_NS[unit_of]
    fits = valid & (v <= _INT64_MAX // factor)
    ts = np.full(len(v), -1, dtype=np.int64)
    ts[fits] = v[fits] * factor[fits]
    other = valid & (unit_of != unit)
    n_other = int(other.sum())
    refused = np.zeros(len(v), dtype=np.int8)
    if n_other:
        i = int(np.argmax(other))
        if n_other > MAX_REFUSED_FRACTION * int(valid.sum()):
            mix = ", ".join(f"{int(n)} in {u}" for u, n in zip(_EPOCH_UNITS, counts, strict=True) if n)
            raise DataError(
                f"{_column(src.path, names, 'timestamp')} mixes epoch units: {mix} "
                f"({src.at(i)}: {int(v[i])}); write one unit"
            )
        refused[other & fits] = _source_code("epoch_unit_mismatch")
        _log_refused(src, "epoch_unit_mismatch", other, f"the file's unit is {_EPOCH_UNITS[unit]}")
    return ts, refused


def _datetime_strings(
    s: pl.Series, src: _Source, names: dict[str, str], tz: str
) -> tuple[np.ndarray, np.ndarray]:
    """Date-time text: with or without a UTC offset as most rows are written; the others refused."""
    present = s.is_not_null()
    aware = s.str.contains(_UTC_OFFSET).fill_null(False)
    n_aware = int(aware.sum())
    n_naive = int(present.sum()) - n_aware
    other = (present & ~aware) if n_aware > n_naive else aware
    n_other = int(other.sum())
    if not n_other:
        return _datetime_ns(_parse_datetimes(s, src, names), tz), np.zeros(len(s), np.int8)
    other_np = other.to_numpy()
    if n_other > MAX_REFUSED_FRACTION * (n_aware + n_naive):
        a, n = int(np.argmax(aware.to_numpy())), int(np.argmax((present & ~aware).to_numpy()))
        raise DataError(
            f"{_column(src.path, names, 'timestamp')}: {n_aware} timestamps carry a UTC offset and "
            f"{n_naive} do not ({src.at(a)}: {s[a]!r}, {src.at(n)}: {s[n]!r}); write them one way "
            "(naive ones are read in data.timezone)"
        )
    nulls = pl.Series([None] * len(s), dtype=pl.String)
    ts = _datetime_ns(_parse_datetimes(s.zip_with(~other, nulls), src, names), tz)
    theirs = _datetime_ns(_parse_datetimes(s.zip_with(other, nulls), src, names, required=False), tz)
    ts[other_np] = theirs[other_np]
    refused = np.where(other_np & (ts >= 0), _source_code("timezone_mismatch"), 0).astype(np.int8)
    file_way = "with a UTC offset" if n_aware > n_naive else "naive"
    _log_refused(src, "timezone_mismatch", other_np, f"the file's timestamps are {file_way}")
    return ts, refused


def _parse_datetimes(s: pl.Series, src: _Source, names: dict[str, str], required: bool = True) -> pl.Series:
    """Text to Datetime("us"), null where unreadable. polars infers the format from the first
    value; when it cannot, the rows before the first value it can read are left unread."""
    try:
        return s.str.to_datetime(strict=False, time_unit="us")
    except pl.exceptions.PolarsError:
        pass
    present = np.flatnonzero(s.is_not_null().to_numpy())
    for i in present[:_PARSE_PROBES].tolist():
        try:
            one = s.slice(i, 1).str.to_datetime(strict=False, time_unit="us")
        except pl.exceptions.PolarsError:
            continue
        if one.null_count() == 0:
            keep = pl.Series(np.arange(len(s)) >= i)
            try:
                return s.zip_with(keep, pl.Series([None] * len(s), dtype=pl.String)).str.to_datetime(
                    strict=False, time_unit="us"
                )
            except pl.exceptions.PolarsError:
                break
    if not required or not len(present):
        return pl.Series([None] * len(s), dtype=pl.Datetime("us"))
    i = int(present[0])
    raise DataError(
        f"{_column(src.path, names, 'timestamp')} cannot be read as time ({src.at(i)}: {s[i]!r}); "
        "set data.timestamp_format"
    )


def _datetime_ns(dt: pl.Series, tz: str) -> np.ndarray:
    """Datetimes to epoch ns; naive ones are in ``tz``. -1 where unreadable or before 1970."""
    if isinstance(dt.dtype, pl.Datetime) and dt.dtype.time_zone is None:
        dt = dt.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    us = dt.dt.epoch("us").fill_null(-1).to_numpy()
    ok = (us >= 0) & (us <= _INT64_MAX // 1000)
    return np.where(ok, us * 1000, -1).astype(np.int64)


def _log_refused(src: _Source, reason: str, rows: np.ndarray, detail: str) -> None:
    n = int(rows.sum())
    if n:
        log.warning(
            "data_rows_refused",
            file=str(src.path),
            reason=reason,
            rows=n,
            first=src.at(int(np.argmax(rows))),
            detail=detail,
        )


def parse_bar_time(value: str) -> datetime:
    """An ISO date-time, naive or with a UTC offset; ValueError saying what is wrong with it."""
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        pass
    example = "e.g. 2023-11-28T09:30:00 or 2023-11-28T09:30:00-05:00"
    m = _ISO_OFFSET.search(value.strip())
    if m is not None:
        try:
            datetime.fromisoformat(value.strip()[: m.start()])
        except ValueError:
            pass
        else:
            raise ValueError(f"{value!r}: UTC offset {m.group()} is not within ±24:00 ({example})")
    raise ValueError(f"{value!r} is not an ISO date-time ({example})")


def bound_ns(value: str | None, tz: str, key: str = "data.start") -> int | None:
    """An ISO date-time as epoch ns (naive = in ``tz``), clamped to the bars' range (1970 ..
    2262); ConfigError naming ``key`` when it is not a date-time."""
    if value is None:
        return None
    try:
        dt = parse_bar_time(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    ns = (dt - _EPOCH) // timedelta(microseconds=1) * 1000
    return min(max(ns, 0), _INT64_MAX)


def _iso(ts_ns: int, tz: str) -> str:
    return datetime.fromtimestamp(ts_ns // 1_000_000_000, ZoneInfo(tz)).isoformat()


def _load_file(
    fi: int, path: Path, cfg: DataConfig, tick_size: float | None, symbol: str | None = None
) -> dict[str, np.ndarray]:
    if is_dbn(path, _head(path)):  # fixed fields, UTC ns, one instrument picked out of the file
        dbn = read_dbn(path, symbol, cfg.symbol)
        raw, names = dbn.frame, {f: f for f in FIELDS}
        src = _Source(path, False, 1, dbn.record)
    else:
        df = _read_file(path, cfg)
        is_csv = path.suffix.lower() not in (".parquet", ".pq")
        src = _Source(path, is_csv, 1 + (1 if is_csv and cfg.has_header else 0))
        if not df.height:
            raise DataError(
                f"{path}: holds no bars ({'only a header' if is_csv and cfg.has_header else 'no rows'})"
            )
        raw, names = _select(df, path, cfg)
    px = _prices(raw, src, names)
    ts, refused = _timestamps(raw["timestamp"], src, names, cfg)
    n = len(ts)
    unreadable = ts < 0
    if int(unreadable.sum()) > MAX_REFUSED_FRACTION * n:
        i = int(np.argmax(unreadable))
        raise DataError(
            f"{_column(path, names, 'timestamp')}: {int(unreadable.sum())} of {n} timestamps cannot "
            f"be read as times ({src.at(i)}: {raw['timestamp'][i]!r}); check data.timestamp_format "
            "and data.columns.timestamp"
        )
    o, h, lo, c, v = px["open"], px["high"], px["low"], px["close"], px["volume"]
    usable = ~unreadable & (refused == 0) & (price_codes(o, h, lo, c, v) == 0)
    if tick_size is not None:
        off = usable & off_tick_grid(o, h, lo, c, tick_size)
        n_off, n_usable = int(off.sum()), int(usable.sum())
        if n_off:
            i = int(np.argmax(off))
            if n_off > MAX_REFUSED_FRACTION * n_usable:
                raise DataError(
                    f"{path}: {n_off} of {n_usable} bars have prices off the tick grid of "
                    f"instrument.tick_size = {tick_size} ({src.at(i)}: open {float(o[i])!r} high "
                    f"{float(h[i])!r} low {float(lo[i])!r} close {float(c[i])!r}): prices of "
                    "another instrument, or the wrong tick size"
                )
            refused[off] = _source_code("off_tick_grid")
            usable &= ~off
            _log_refused(src, "off_tick_grid", off, f"tick_size {tick_size}")
    rows = np.flatnonzero(usable)
    outliers = rows[price_outliers(h[rows], lo[rows], c[rows])]
    if len(outliers):
        refused[outliers] = _source_code("price_outlier")
        usable[outliers] = False
        _log_refused(src, "price_outlier", np.isin(np.arange(n), outliers), "far from the median close")
    _check_bar_interval(ts[usable], src, cfg)
    return {
        "ts_ns": ts,
        "open": o,
        "high": h,
        "low": lo,
        "close": c,
        "volume": v,
        "origin_file": np.full(n, fi, dtype=np.int32),
        "origin_line": (
            src.records
            if src.records is not None
            else np.arange(src.first_line, src.first_line + n, dtype=np.int64)
        ),
        "refused": refused,
    }


def _check_bar_interval(ts: np.ndarray, src: _Source, cfg: DataConfig) -> None:
    """``data.bar_seconds`` against the file's bar interval: the 10th percentile of the spacing of
    its bars (quiet minutes without a bar, nights and weekends only make gaps longer; most gaps of
    a file of bars of the right size are one interval)."""
    steps = np.diff(ts)
    steps = steps[steps > 0]
    if not len(steps):
        return
    seconds = float(np.percentile(steps, 10)) / 1e9
    if abs(seconds - cfg.bar_seconds) > BAR_INTERVAL_TOLERANCE * cfg.bar_seconds:
        raise DataError(
            f"{src.path}: bars are {seconds:g} s apart (the 10th percentile spacing of its timestamps) but "
            f"data.bar_seconds = {cfg.bar_seconds}; set data.bar_seconds or give "
            f"{cfg.bar_seconds}-second bars"
        )


def load_bars(
    cfg: DataConfig,
    paths: Sequence[Path] | None = None,
    *,
    tick_size: float | None = None,
    symbol: str | None = None,
) -> RecordedBars:
    """Read, check, map and concatenate recorded bars (see the module docstring); fails fast on
    unusable files, rejects bad rows. ``tick_size`` (``instrument.tick_size``): prices off its
    grid are refused; None = not checked. ``symbol`` (``instrument.symbol``): the instrument a DBN
    file holding several is read for (``data.symbol`` overrides it). At least one bar is always
    usable."""
    paths = [Path(p) for p in (paths if paths is not None else cfg.paths)]
    if not paths:
        raise DataError("no data files given (data.paths is empty)")
    lo_ns = bound_ns(cfg.start, cfg.timezone, "data.start (--from)")
    hi_ns = bound_ns(cfg.end, cfg.timezone, "data.end (--to)")
    if lo_ns is not None and hi_ns is not None and lo_ns >= hi_ns:
        raise ConfigError(f"data.start (--from) {cfg.start} is not before data.end (--to) {cfg.end}")
    frames = [_load_file(fi, path, cfg, tick_size, symbol) for fi, path in enumerate(paths)]

    def first_ts(f: dict[str, np.ndarray]) -> int:
        ok = f["ts_ns"][(f["ts_ns"] >= 0) & (f["refused"] == 0)]
        return int(ok.min()) if len(ok) else 0

    frames.sort(key=first_ts)  # stable: files starting together keep their order
    cols = {k: np.concatenate([f[k] for f in frames]) for k in frames[0]}
    ts = cols["ts_ns"]
    readable = ts >= 0
    keep = np.ones(len(ts), dtype=bool)
    if lo_ns is not None:
        keep &= (ts >= lo_ns) | ~readable
    if hi_ns is not None:
        keep &= ts < hi_ns
    between = ""
    if cfg.start or cfg.end:
        between = f" between data.start (--from) {cfg.start or '-'} and data.end (--to) {cfg.end or '-'}"
        if readable.any() and not (keep & readable).any():
            first, last = int(ts[readable].min()), int(ts[readable].max())
            raise DataError(
                f"no bar{between}: the data ({', '.join(map(str, paths))}) runs "
                f"{_iso(first, cfg.timezone)} .. {_iso(last, cfg.timezone)}"
            )
    if not keep.all():
        cols = {k: a[keep] for k, a in cols.items()}
    rb = RecordedBars(
        ts_ns=cols["ts_ns"],
        open=cols["open"],
        high=cols["high"],
        low=cols["low"],
        close=cols["close"],
        volume=cols["volume"],
        origin_file=cols["origin_file"],
        origin_line=cols["origin_line"],
        files=tuple(str(p) for p in paths),
        refused=cols["refused"],
    )
    codes = rb.reason_codes()
    if not (codes == 0).any():
        counts = np.bincount(codes, minlength=len(ROW_REASONS))
        why = ", ".join(f"{r}={int(k)}" for r, k in zip(ROW_REASONS, counts, strict=True) if k)
        raise DataError(
            f"no usable bar in {', '.join(map(str, paths))}{between}: all {len(rb)} rows are rejected ({why})"
        )
    return rb


class ReplayFeed:
    """Plays recorded bars as fast as possible (speed 0) or at N times real time."""

    CHUNK = 256

    def __init__(self, bars: RecordedBars, speed: float = 0.0) -> None:
        if not (math.isfinite(speed) and speed >= 0):
            raise ConfigError(
                f"data.speed (--speed): {speed} is not 0 (as fast as possible) or a finite N > 0 "
                "(N times real time)"
            )
        self.recorded = bars
        self.speed = speed
        self.start_row = 0  # rows before this were already processed (crash recovery)
        self.done = False

    def origin(self, row: int) -> str:
        return self.recorded.origin(row) if 0 <= row < len(self.recorded) else f"row {row}"

    def resume_after(self, last_ts_ns: int, next_row: int) -> None:
        """Continue from ``next_row`` (the rows before it were re-driven from the journal)."""
        self.start_row = next_row

    @property
    def total_bars(self) -> int:
        return len(self.recorded)

    def health(self) -> ComponentHealth:
        return ComponentHealth("recorded", not self.done)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """Yields lists of (bar, row index); bar is None for a row whose timestamp could not be
        parsed, a :class:`RefusedBar` for a row its file refused.

        Unpaced replay hands out chunks (one await per chunk, not per bar) and yields to the event
        loop between them, so signal handlers and other tasks still run; paced replay yields each
        bar when its time has come.
        """
        rec, first = self.recorded, self.start_row
        if self.speed <= 0:
            # each chunk's bars are built as it is handed out, not all before the first bar
            for s in range(first, len(rec), self.CHUNK):
                yield Batch(BatchKind.LIVE, rec.items(s, s + self.CHUNK))
                await asyncio.sleep(0)
            self.done = True
            return
        prev_ts: int | None = None
        for item in rec.items(first):
            bar = item[0]
            if bar is not None and not isinstance(bar, RefusedBar):
                if prev_ts is not None and bar.ts_ns > prev_ts:
                    await asyncio.sleep((bar.ts_ns - prev_ts) / 1e9 / self.speed)
                prev_ts = bar.ts_ns
            yield Batch(BatchKind.LIVE, [item])
        self.done = True
