"""Databento DBN files (schema OHLCV-1m, ``.dbn`` or zstd-compressed ``.dbn.zst``) as recorded bars.

Decoded with databento-dbn's own decoder, then checked like any CSV or Parquet file (tick grid,
outliers, bar interval, order: :mod:`trader.feeds.replay`). Prices are fixed-point int64 in units
of 1e-9 (``FIXED_PRICE_SCALE``; ``UNDEF_PRICE`` = no price, and that row is refused); ``ts_event``
is the bar's open, ns since the epoch, UTC, so ``data.timezone`` and ``data.columns`` do not
apply. The metadata is used: a schema other than ``ohlcv-1m`` is refused naming the file and its
schema, and the dataset and symbol are logged.

One file may hold several instruments. The one replayed is ``data.symbol`` when set (a symbol
of the file's symbology mappings, or an instrument id), else the one ``instrument.symbol`` names:
exactly, as the root of a futures contract (NQ: NQZ3, NQZ23) or of a Databento parent or
continuous symbol (NQ.FUT, NQ.c.0). No match, or more than one, is an error listing the symbols
the file holds. Rows of the symbol are taken by its mapping intervals (instrument id and UTC
dates), so a continuous symbol whose instrument id changes at a roll stays one series. A file whose
metadata maps no symbols to instrument ids (a recorded live stream) is named by its in-stream
symbol mapping records, and a file of one instrument by its metadata's symbols too; a file that
names its instruments nowhere is replayed only with ``data.symbol`` = the instrument id, never on
a guess.

A damaged or cut-off file is an error naming it: the zstd frames are walked to their end
(the decoder would return a truncated stream's first records without a word), a record cut
off at the end of the data is reported, and what the decoder cannot read (a corrupt zstd block, a
record of impossible length: a Rust panic inside the package) is reported with the file's name.
Every record is checked: a bar of another interval is an error whatever the header says, and so
is other market data in a file of schema ohlcv-1m (a file of mixed schemas may carry it: it is
passed over, counted in a warning). ``ts_event`` past int64 (UNDEF_TIMESTAMP) refuses its row
as a bad timestamp.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import structlog
from databento_dbn import (
    FIXED_PRICE_SCALE,
    UNDEF_PRICE,
    Compression,
    DBNDecoder,
    DBNError,
    ErrorMsg,
    ErrorMsgV1,
    Metadata,
    OHLCVMsg,
    RType,
    Schema,
    SType,
    SymbolMappingMsg,
    SymbolMappingMsgV1,
    SystemMsg,
    SystemMsgV1,
)

from trader.errors import DataError

log = structlog.get_logger(__name__)

DBN_SUFFIXES = (".dbn", ".dbn.zst")
_ZSTD_MAGIC = 0xFD2FB528
_CHUNK = 1 << 22  # bytes handed to the decoder at a time
_MONTH_CODES = "FGHJKMNQUVXZ"
_INT64_MAX = (1 << 63) - 1
# records that are not market data: a live stream's symbol mappings, heartbeats and gateway errors
_MAPPINGS = (SymbolMappingMsg, SymbolMappingMsgV1)
_NOT_DATA = (*_MAPPINGS, SystemMsg, SystemMsgV1, ErrorMsg, ErrorMsgV1)


def is_dbn(path: Path, head: bytes = b"") -> bool:
    """A DBN file by its name, or by its first bytes (``head``): DBN's magic, or zstd data whose
    first bytes decompress to DBN's (a zstd-compressed CSV is not DBN: polars reads it)."""
    if path.name.lower().endswith(DBN_SUFFIXES) or head.startswith(b"DBN"):
        return True
    return is_zstd(head) and _zstd_holds_dbn(path)


def _zstd_holds_dbn(path: Path) -> bool:
    """Whether a zstd file's data starts as DBN: the package's own decoder reads its header."""
    try:
        with path.open("rb") as f:
            start = f.read(1 << 16)
        decoder = DBNDecoder(compression=cast(Compression, Compression.ZSTD))
        decoder.write(start)
        decoder.decode()
    except BaseException as exc:
        if not _decoder_failure(exc) and not isinstance(exc, OSError):
            raise
        return False
    return True


def is_zstd(data: bytes) -> bool:
    """``data`` starts with a zstd frame or a skippable frame (RFC 8878)."""
    if len(data) < 4:
        return False
    magic = int.from_bytes(data[:4], "little")
    return magic == _ZSTD_MAGIC or 0x184D2A50 <= magic <= 0x184D2A5F


@dataclass(frozen=True, slots=True)
class DbnBars:
    """The bars of one instrument of a DBN file: ``frame`` has the columns timestamp (Int64 ns
    UTC), open, high, low, close (Float64, NaN where undefined) and volume (Float64);
    ``record`` the 1-based number of each row's record in the file (for messages)."""

    frame: pl.DataFrame
    record: np.ndarray
    symbol: str
    dataset: str
    schema: str


def read_dbn(path: Path, instrument_symbol: str | None, wanted: str | None = None) -> DbnBars:
    """The 1-minute bars of one instrument of a DBN file (see the module docstring).
    ``wanted``: ``data.symbol``; None = the one ``instrument_symbol`` names (None: the file's
    only symbol)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from exc
    if not data:
        raise DataError(f"{path}: is empty (no DBN metadata, no bars)")
    zstd = is_zstd(data)
    if zstd:
        problem = zstd_problem(data)
        if problem:
            raise DataError(f"{path}: damaged or truncated zstd data ({problem}); not a whole .dbn.zst file")
    elif not data.startswith(b"DBN"):
        raise DataError(f"{path}: is not a DBN file (it starts with {data[:8]!r}, not 'DBN' or a zstd frame)")
    meta, cols, in_stream = _decode(path, data, zstd)
    schema = str(meta.schema) if meta.schema is not None else "mixed"
    iid, ts = cols["instrument_id"].astype(np.int64), cols["ts_event"]
    symbol, keep = _pick(path, meta, iid, ts, instrument_symbol, wanted, in_stream)
    prices = {}
    for field in ("open", "high", "low", "close"):
        raw = cols[field][keep]
        prices[field] = np.where(raw == UNDEF_PRICE, math.nan, raw / FIXED_PRICE_SCALE)
    frame = pl.DataFrame(
        {
            "timestamp": pl.Series(ts[keep], dtype=pl.Int64),
            **{k: pl.Series(v, dtype=pl.Float64) for k, v in prices.items()},
            "volume": pl.Series(cols["volume"][keep].astype(np.float64)),
        }
    )
    record = cols["record"][keep]
    log.info(
        "dbn_file_read", file=str(path), dataset=meta.dataset, schema=schema, symbol=symbol, bars=len(record)
    )
    return DbnBars(frame, record, symbol, meta.dataset, schema)


_FIELDS = ("instrument_id", "ts_event", "open", "high", "low", "close", "volume")


def _decode(
    path: Path, data: bytes, zstd: bool
) -> tuple[Metadata, dict[str, np.ndarray], dict[int, set[str]]]:
    """Metadata, the OHLCV-1m records' fields (plus ``record``, each one's 1-based number in the
    file) in file order, and the symbols a live stream's in-stream mapping records give each
    instrument id. Decoded a chunk at a time, each chunk's bars turned into arrays. Every record is
    checked: an OHLCV record of another interval is an error whatever the header says, as is any
    other market data in a file of schema ohlcv-1m (in a file of mixed schemas it is passed over
    and counted); a record the decoder cannot read is an error naming the file."""
    # the stubs type the members as str; they are Compression values
    compression = cast(Compression, Compression.ZSTD if zstd else Compression.NONE)
    decoder = DBNDecoder(compression=compression)
    meta: Metadata | None = None
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*_FIELDS, "record")}
    in_stream: dict[int, set[str]] = {}
    n_records = 0
    other_data: dict[str, int] = {}
    try:
        for start in range(0, len(data), _CHUNK):
            decoder.write(data[start : start + _CHUNK])
            bars: list[OHLCVMsg] = []
            numbers: list[int] = []
            for rec in decoder.decode():
                if isinstance(rec, Metadata):
                    meta = rec
                    _check_schema(path, rec)
                    continue
                n_records += 1
                if isinstance(rec, OHLCVMsg):
                    bars.append(rec)
                    numbers.append(n_records)
                elif isinstance(rec, _MAPPINGS):
                    names = in_stream.setdefault(int(rec.instrument_id), set())
                    names.update(s for s in (rec.stype_in_symbol, rec.stype_out_symbol) if s)
                elif not isinstance(rec, _NOT_DATA):
                    kind = _rtype_name(rec.rtype)
                    if meta is not None and meta.schema is not None:
                        raise DataError(
                            f"{path}: record {n_records} is {kind}, not 1-minute OHLCV, in a file of "
                            f"schema {meta.schema}: the file is damaged"
                        )
                    other_data[kind] = other_data.get(kind, 0) + 1
            if not bars:
                continue
            # files written before DBN 0.4 mark every OHLCV bar OHLCV_DEPRECATED: in a file of
            # schema ohlcv-1m those are its 1-minute bars
            legacy = meta is not None and meta.schema == Schema.OHLCV_1M
            other = [
                i
                for i, r in enumerate(bars)
                if r.rtype != RType.OHLCV_1M and not (legacy and r.rtype == RType.OHLCV_DEPRECATED)
            ]
            if other:
                r = bars[other[0]]
                raise DataError(
                    f"{path}: record {numbers[other[0]]} is {_rtype_name(r.rtype)}, not 1-minute "
                    "OHLCV: replay reads DBN files of schema ohlcv-1m"
                )
            # plain attribute reads in comprehensions: several times faster than getattr per field
            parts["instrument_id"].append(np.array([r.instrument_id for r in bars], np.uint32))
            parts["ts_event"].append(_event_ns(np.array([r.ts_event for r in bars], np.uint64)))
            parts["open"].append(np.array([r.open for r in bars], np.int64))
            parts["high"].append(np.array([r.high for r in bars], np.int64))
            parts["low"].append(np.array([r.low for r in bars], np.int64))
            parts["close"].append(np.array([r.close for r in bars], np.int64))
            parts["volume"].append(np.array([r.volume for r in bars], np.uint64))
            parts["record"].append(np.asarray(numbers, dtype=np.int64))
        leftover = len(decoder.buffer())
    except DataError:
        raise
    except BaseException as exc:
        if not _decoder_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        after = f" (in the records after record {n_records})" if n_records else ""
        raise DataError(f"{path}: is not a readable DBN file: {first}{after}") from None
    if meta is None:
        raise DataError(f"{path}: truncated or not DBN: no complete metadata header ({len(data)} bytes)")
    if leftover:
        raise DataError(
            f"{path}: truncated: the data ends inside a record ({leftover} bytes after record {n_records})"
        )
    if other_data:
        log.warning("dbn_other_records_skipped", file=str(path), records=other_data)
    if not parts["record"]:
        raise DataError(f"{path}: holds no bars (DBN metadata, no OHLCV-1m records)")
    return meta, {k: np.concatenate(v) for k, v in parts.items()}, in_stream


def _decoder_failure(exc: BaseException) -> bool:
    """An error of the decoder on bad bytes: its own DBNError, zstd's RuntimeError (checksum,
    corrupt block), or a Rust panic on a malformed record (pyo3's PanicException, which derives
    from BaseException)."""
    return isinstance(exc, (DBNError, RuntimeError)) or type(exc).__name__ == "PanicException"


def _event_ns(ts: np.ndarray) -> np.ndarray:
    """uint64 ``ts_event`` values as int64 ns; -1 (unreadable: the row is refused as a bad
    timestamp) for UNDEF_TIMESTAMP and anything past int64."""
    out = ts.astype(np.int64)
    out[ts > np.uint64(_INT64_MAX)] = -1
    return out


def _rtype_name(rtype: Any) -> str:
    return str(getattr(rtype, "name", rtype)).lower()


def _check_schema(path: Path, meta: Metadata) -> None:
    if meta.schema is not None and meta.schema != Schema.OHLCV_1M:
        raise DataError(
            f"{path}: DBN schema {meta.schema} (dataset {meta.dataset}), not ohlcv-1m: replay reads "
            "1-minute bars"
        )


def _day_ns(d: date | str) -> int:
    day = d if isinstance(d, date) else date.fromisoformat(str(d))
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1_000_000_000


def _symbol_intervals(meta: Metadata) -> dict[str, list[tuple[int, int, int]]]:
    """Each symbol of the mappings: (instrument id, first ns, end ns exclusive) per interval."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    if meta.stype_out != SType.INSTRUMENT_ID:
        return out  # mapped to other symbols, not to the records' instrument ids
    for symbol, intervals in (meta.mappings or {}).items():
        for iv in intervals:
            target = str(iv["symbol"])
            if target.isdigit():
                out.setdefault(symbol, []).append(
                    (int(target), _day_ns(iv["start_date"]), _day_ns(iv["end_date"]))
                )
    return out


def names_instrument(symbol: str, root: str) -> bool:
    """Does ``symbol`` (from a file) name the instrument ``root`` (``instrument.symbol``)? Exactly,
    as a futures contract of it (NQZ3, NQZ23) or a parent/continuous symbol (NQ.FUT, NQ.c.0)."""
    s, r = symbol.upper(), root.upper()
    contract = re.fullmatch(re.escape(r) + f"[{_MONTH_CODES}]\\d{{1,4}}", s)
    return s == r or s.startswith(r + ".") or contract is not None


def _names_by_id(meta: Metadata, ids: list[int], in_stream: dict[int, set[str]]) -> dict[int, set[str]]:
    """What names each instrument id where the metadata maps no symbols to instrument ids: a live
    stream's in-stream mapping records, and for a file of one instrument the metadata's symbols
    (and a raw-symbol mapping's targets)."""
    names = {i: set(in_stream.get(i, ())) for i in ids}
    if len(ids) == 1:
        names[ids[0]].update(str(s) for s in meta.symbols or ())
        for symbol, intervals in (meta.mappings or {}).items():
            names[ids[0]].add(str(symbol))
            names[ids[0]].update(str(iv["symbol"]) for iv in intervals)
    return names


def _pick(
    path: Path,
    meta: Metadata,
    iid: np.ndarray,
    ts: np.ndarray,
    root: str | None,
    wanted: str | None,
    in_stream: dict[int, set[str]],
) -> tuple[str, np.ndarray]:
    """The symbol replayed and the rows that are its bars."""
    intervals = _symbol_intervals(meta)
    ids = sorted(set(iid.tolist()))
    names = {} if intervals else _names_by_id(meta, ids, in_stream)
    held = ", ".join(sorted(intervals)) or "; ".join(
        f"{i}: {', '.join(sorted(n))}" for i, n in names.items() if n
    )
    where = (
        f"{path} (dataset {meta.dataset}, instrument ids {', '.join(map(str, ids))}; "
        f"symbols: {held or 'no symbol mappings'})"
    )
    if intervals:
        return _pick_mapped(where, intervals, iid, ts, ids, root, wanted)
    if wanted is not None:
        hits = [i for i in ids if wanted == str(i) or wanted in names[i]]
        if len(hits) != 1:
            what = "several instruments named" if hits else "no data.symbol"
            raise DataError(f"{where}: holds {what} {wanted!r}; set data.symbol to an instrument id")
        return wanted, iid == hits[0]
    if root is None:
        if len(ids) > 1:
            raise DataError(f"{where}: several instruments; set data.symbol to the one to replay")
        label = sorted(names[ids[0]])[0] if names[ids[0]] else str(ids[0])
        return label, np.ones(len(iid), dtype=bool)
    matches = [i for i in ids if any(names_instrument(s, root) for s in names[i])]
    if len(matches) == 1:
        label = sorted(s for s in names[matches[0]] if names_instrument(s, root))[0]
        return label, iid == matches[0]
    if matches:
        raise DataError(
            f"{where}: several instruments match instrument.symbol {root!r} "
            f"({', '.join(map(str, matches))}); set data.symbol to the instrument id to replay"
        )
    if any(names.values()):
        raise DataError(
            f"{where}: none of its symbols is instrument.symbol {root!r}; set data.symbol to the one "
            "to replay (or instrument.symbol)"
        )
    raise DataError(
        f"{where}: nothing in the file names its instruments, so it cannot be checked to hold "
        f"instrument.symbol {root!r}; set data.symbol to the instrument id to replay"
    )


def _pick_mapped(
    where: str,
    intervals: dict[str, list[tuple[int, int, int]]],
    iid: np.ndarray,
    ts: np.ndarray,
    ids: list[int],
    root: str | None,
    wanted: str | None,
) -> tuple[str, np.ndarray]:
    """:func:`_pick` for a file whose metadata maps symbols to instrument ids over dates."""
    if wanted is not None:
        if wanted in intervals:
            chosen = wanted
        elif wanted.isdigit() and int(wanted) in ids:
            return wanted, iid == int(wanted)
        else:
            raise DataError(f"{where}: holds no data.symbol {wanted!r}")
    else:
        matches = sorted(s for s in intervals if root is None or names_instrument(s, root))
        if root is None and len(matches) > 1:
            raise DataError(f"{where}: several symbols; set data.symbol to the one to replay")
        if not matches:
            raise DataError(
                f"{where}: none of its symbols is instrument.symbol {root!r}; set data.symbol to the one "
                "to replay (or instrument.symbol)"
            )
        if len(matches) > 1:
            raise DataError(
                f"{where}: several symbols match instrument.symbol {root!r} ({', '.join(matches)}); set "
                "data.symbol to the one to replay"
            )
        chosen = matches[0]
    keep = np.zeros(len(iid), dtype=bool)
    chosen_ids = set()
    for instrument_id, first, end in intervals[chosen]:
        keep |= (iid == instrument_id) & (ts >= first) & (ts < end)
        chosen_ids.add(instrument_id)
    if not keep.any():
        raise DataError(f"{where}: holds no bars of {chosen!r} within its mapping dates")
    # a record of the symbol's instrument whose time cannot be read is kept: refused, and counted,
    # as a bad timestamp (its date cannot say which mapping interval it belongs to)
    keep |= np.isin(iid, sorted(chosen_ids)) & (ts < 0)
    return chosen, keep


def zstd_problem(data: bytes) -> str:
    """'' when ``data`` is whole zstd frames (skippable frames allowed), else what is wrong. Walks
    the frame and block headers only (RFC 8878), without decompressing."""
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 4:
            return f"{n - pos} stray bytes at offset {pos}"
        magic = int.from_bytes(data[pos : pos + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
            if n - pos < 8:
                return f"cut off in a skippable frame at offset {pos}"
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
            if pos > n:
                return "cut off inside a skippable frame"
            continue
        if magic != _ZSTD_MAGIC:
            return f"no zstd frame at offset {pos}"
        pos += 4
        if pos >= n:
            return "cut off in a frame header"
        fhd = data[pos]
        pos += 1
        single, checksum, dict_flag, fcs_flag = (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3, fhd >> 6
        pos += (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
        while True:
            if pos + 3 > n:
                return f"cut off in a block header at offset {pos}"
            header = int.from_bytes(data[pos : pos + 3], "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                return f"a reserved block type at offset {pos}"
            pos += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
            if pos > n:
                return "cut off inside a block"
            if last:
                break
        pos += 4 if checksum else 0
        if pos > n:
            return "cut off in a frame checksum"
    return ""
