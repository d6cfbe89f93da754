"""Databento DBN files (OHLCV-1m, .dbn and .dbn.zst) as replay input: written here with the
databento-dbn package's own encoder from the shared NQ bars, replayed through the real engine,
and compared with the replay of the same bars from CSV; files of several instruments, other
schemas and damaged files."""

from __future__ import annotations

import io
import sqlite3
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import databento_dbn as dbn
import numpy as np
import pytest

from tests.conftest import NQ, make_settings
from trader.errors import DataError
from trader.feeds.replay import RecordedBars, load_bars
from trader.replay import replay

SCALE = dbn.FIXED_PRICE_SCALE
FIELDS = ("ts_ns", "open", "high", "low", "close", "volume")


def csv_bars() -> RecordedBars:
    return load_bars(make_settings(data={"paths": [str(NQ)]}).data, tick_size=0.25)


def mapping(symbol: str, *intervals: tuple[str, str, int]) -> SimpleNamespace:
    """A symbology mapping as databento-dbn takes it: (start date, end date exclusive, instrument id)."""
    return SimpleNamespace(
        raw_symbol=symbol,
        intervals=[
            SimpleNamespace(start_date=date.fromisoformat(a), end_date=date.fromisoformat(b), symbol=str(i))
            for a, b, i in intervals
        ],
    )


def record(iid: int, ts: int, o: float, h: float, lo: float, c: float, v: float, rtype: Any = None) -> bytes:
    msg = dbn.OHLCVMsg(
        rtype or dbn.RType.OHLCV_1M,
        1,
        iid,
        ts,
        round(o * SCALE),
        round(h * SCALE),
        round(lo * SCALE),
        round(c * SCALE),
        int(v),
    )
    return bytes(msg)


def bar_records(rb: RecordedBars, iid: int, price_shift: float = 0.0) -> list[tuple[int, bytes]]:
    cols = [getattr(rb, k) for k in FIELDS]
    out = []
    for i in range(len(rb)):
        ts, o, h, lo, c, v = (col[i] for col in cols)
        out.append((int(ts), record(iid, int(ts), o + price_shift, h + price_shift, lo + price_shift,
                                     c + price_shift, v)))  # fmt: skip
    return out


def write_dbn(
    path: Path,
    records: list[tuple[int, bytes]],
    mappings: list[SimpleNamespace],
    schema: Any = dbn.Schema.OHLCV_1M,
    zstd: bool = False,
) -> Path:
    """A DBN file: metadata then the records in time order (zstd-compressed by the package's
    transcoder for .dbn.zst)."""
    records = sorted(records, key=lambda r: r[0])
    meta = dbn.Metadata(
        dataset="GLBX.MDP3",
        start=records[0][0] if records else 0,
        end=records[-1][0] + 60_000_000_000 if records else 0,
        stype_in=dbn.SType.RAW_SYMBOL,
        stype_out=dbn.SType.INSTRUMENT_ID,
        schema=schema,
        symbols=[m.raw_symbol for m in mappings],
        mappings=mappings,
    )
    raw = meta.encode() + b"".join(r for _, r in records)
    if zstd:
        buf = io.BytesIO()
        transcoder = dbn.Transcoder(buf, dbn.Encoding.DBN, dbn.Compression.ZSTD)
        transcoder.write(raw)
        transcoder.finish()
        raw = buf.getvalue()
    path.write_bytes(raw)
    return path


NQZ3 = mapping("NQZ3", ("2023-11-01", "2023-12-31", 42))


@pytest.fixture(scope="module")
def nq() -> RecordedBars:
    return csv_bars()


@pytest.fixture(scope="module")
def nq_files(nq: RecordedBars, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dbn")
    recs = bar_records(nq, 42)
    return {
        "dbn": write_dbn(d / "nq.dbn", recs, [NQZ3]),
        "zst": write_dbn(d / "nq.dbn.zst", recs, [NQZ3], zstd=True),
    }


def same_bars(a: RecordedBars, b: RecordedBars) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in FIELDS)


# -- replay equals the CSV's ------------------------------------------------------------------------------


def journal(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


DECISIONS = (
    "SELECT bar_index, ts_ns, close, p_hold, p_buy, p_sell, p_move_to_be, p_enable_trail, p_disable_trail, "
    "rl_action, rl_conf, method, reasons, fused_action, final_action, vetoes, flatten_reason, position, "
    "balance_usd, equity_usd, threshold_usd FROM decisions ORDER BY bar_index"
)
TRADES = (
    "SELECT entry_ts_ns, exit_ts_ns, side, qty, entry_price, exit_price, pnl_usd, exit_reason FROM trades"
)
FILLS = "SELECT ts_ns, side, qty, price, commission_usd, purpose FROM fills ORDER BY seq"


def test_dbn_and_dbn_zst_replays_decide_and_trade_exactly_as_the_csv(tmp_path, nq_files):
    outcomes = {}
    for name, path in {"csv": NQ, **nq_files}.items():
        out = replay(make_settings(data={"paths": [str(path)]}), journal_path=tmp_path / f"{name}.sqlite")
        assert out.status == "completed" and out.report["bars_rejected"] == 0
        outcomes[name] = out.journal_path
    csv = outcomes.pop("csv")
    want = journal(csv, DECISIONS), journal(csv, TRADES), journal(csv, FILLS)
    assert len(want[0]) == 14_714 and len(want[1]) > 20, "the comparison should cover real trading"
    for db in outcomes.values():
        assert (journal(db, DECISIONS), journal(db, TRADES), journal(db, FILLS)) == want


def test_prices_are_fixed_point_and_times_utc_whatever_data_timezone_says(nq, nq_files):
    tokyo = make_settings(data={"timezone": "Asia/Tokyo"}).data
    for path in nq_files.values():
        assert same_bars(load_bars(tokyo, [path], tick_size=0.25, symbol="NQ"), nq)


def test_an_undefined_price_rejects_its_row_only(tmp_path, nq):
    recs = bar_records(nq, 42)[:500]
    ts = recs[200][0]
    bad = dbn.OHLCVMsg(dbn.RType.OHLCV_1M, 1, 42, ts, 1, 1, 1, dbn.UNDEF_PRICE, 5)
    recs[200] = (ts, bytes(bad))
    rb = load_bars(make_settings().data, [write_dbn(tmp_path / "undef.dbn", recs, [NQZ3])], tick_size=0.25)
    assert np.isnan(rb.close[200]) and not rb.accepted()[200] and int(rb.accepted().sum()) == 499
    assert rb.origin(200).endswith("undef.dbn:201")  # the record number in the file


# -- several instruments in one file ------------------------------------------------------------------------


def test_a_file_of_several_instruments_gives_the_one_instrument_symbol_names(tmp_path, nq):
    es = mapping("ESZ3", ("2023-11-01", "2023-12-31", 43))
    path = write_dbn(tmp_path / "both.dbn", bar_records(nq, 42) + bar_records(nq, 43, -11_000.0), [NQZ3, es])
    data = make_settings().data
    assert same_bars(load_bars(data, [path], tick_size=0.25, symbol="NQ"), nq)
    es_bars = load_bars(data, [path], tick_size=0.25, symbol="ES")
    assert np.array_equal(es_bars.close, nq.close - 11_000.0)


def test_two_contracts_of_the_symbol_are_ambiguous_and_listed_until_data_symbol_picks_one(tmp_path, nq):
    h4 = mapping("NQH4", ("2023-11-01", "2023-12-31", 44))
    path = write_dbn(tmp_path / "roll.dbn", bar_records(nq, 42) + bar_records(nq, 44, 150.0), [NQZ3, h4])
    with pytest.raises(DataError) as e:
        load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    msg = str(e.value)
    assert str(path) in msg and "NQH4, NQZ3" in msg and "data.symbol" in msg and "'NQ'" in msg
    picked = load_bars(make_settings(data={"symbol": "NQH4"}).data, [path], tick_size=0.25, symbol="NQ")
    assert np.array_equal(picked.close, nq.close + 150.0)


def test_a_file_without_the_instrument_is_refused_listing_what_it_holds(tmp_path, nq):
    es = mapping("ESZ3", ("2023-11-01", "2023-12-31", 43))
    path = write_dbn(tmp_path / "es.dbn", bar_records(nq, 43), [es])
    with pytest.raises(DataError) as e:
        load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert str(path) in str(e.value) and "ESZ3" in str(e.value) and "instrument.symbol 'NQ'" in str(e.value)


def test_a_continuous_symbol_follows_its_mapping_across_a_roll(tmp_path, nq):
    """NQ.c.0 is instrument 42 until 2023-11-29 and 44 from then on; 44 before the roll (another
    contract then) and 43 (another product) are not part of it."""
    cont = mapping("NQ.c.0", ("2023-11-01", "2023-11-29", 42), ("2023-11-29", "2023-12-31", 44))
    es = mapping("ESZ3", ("2023-11-01", "2023-12-31", 43))
    roll = int(np.datetime64("2023-11-29T00:00:00", "ns").astype(np.int64))
    before = [r for r in bar_records(nq, 42) if r[0] < roll]
    after = [r for r in bar_records(nq, 44, 100.0) if r[0] >= roll]
    noise = [r for r in bar_records(nq, 44, 5_000.0) if r[0] < roll] + bar_records(nq, 43, -11_000.0)
    path = write_dbn(tmp_path / "cont.dbn", before + after + noise, [cont, es])
    rb = load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert np.array_equal(rb.ts_ns, nq.ts_ns)
    assert np.array_equal(rb.close, np.where(nq.ts_ns < roll, nq.close, nq.close + 100.0))


# -- other schemas, damaged files ---------------------------------------------------------------------------


def test_a_schema_other_than_ohlcv_1m_is_refused_naming_the_file_and_its_schema(tmp_path, nq):
    ts = int(nq.ts_ns[0])
    hourly = [(ts, record(42, ts, 16000.0, 16001.0, 15999.0, 16000.0, 9, dbn.RType.OHLCV_1H))]
    path = write_dbn(tmp_path / "hourly.dbn", hourly, [NQZ3], schema=dbn.Schema.OHLCV_1H)
    with pytest.raises(
        DataError, match=r"hourly\.dbn: DBN schema ohlcv-1h \(dataset GLBX\.MDP3\), not ohlcv-1m"
    ):
        load_bars(make_settings().data, [path])
    mixed = write_dbn(tmp_path / "mixed.dbn", bar_records(nq, 42)[:3] + hourly, [NQZ3], schema=None)
    with pytest.raises(DataError, match=r"mixed\.dbn: record 2 is ohlcv_1h, not 1-minute OHLCV"):
        load_bars(make_settings().data, [mixed])


def damaged(tmp_path: Path, nq_files: dict[str, Path], kind: str) -> Path:
    dbn_bytes, zst_bytes = nq_files["dbn"].read_bytes(), nq_files["zst"].read_bytes()
    cases = {
        "cut inside a record": ("cut.dbn", dbn_bytes[: len(dbn_bytes) - 20]),
        "cut zstd": ("cut.dbn.zst", zst_bytes[: len(zst_bytes) - 3]),
        "half a zstd file": ("half.dbn.zst", zst_bytes[: len(zst_bytes) // 2]),
        "cut in the metadata": ("meta.dbn", dbn_bytes[:60]),
        "not DBN": ("text.dbn", b"timestamp,open,high,low,close,volume\n" * 5),
        "empty": ("empty.dbn", b""),
        "zstd garbage": ("junk.dbn.zst", zst_bytes[:4] + bytes(range(256)) * 4),
    }
    name, data = cases[kind]
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("cut inside a record", r"truncated: the data ends inside a record \(36 bytes after record 14713\)"),
        ("cut zstd", r"damaged or truncated zstd data \(cut off"),
        ("half a zstd file", r"damaged or truncated zstd data \(cut off inside a block\)"),
        ("cut in the metadata", r"truncated or not DBN: no complete metadata header"),
        ("not DBN", r"is not a DBN file \(it starts with b'timestam', not 'DBN' or a zstd frame\)"),
        ("empty", r"is empty"),
        ("zstd garbage", r"damaged or truncated zstd data"),
    ],
)
def test_a_damaged_dbn_file_is_an_error_naming_it(tmp_path, nq_files, kind, says):
    path = damaged(tmp_path, nq_files, kind)
    with pytest.raises(DataError, match=says) as e:
        load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert str(e.value).startswith(str(path))


def test_a_file_with_metadata_and_no_bars_says_so(tmp_path):
    path = write_dbn(tmp_path / "none.dbn", [], [NQZ3])
    with pytest.raises(DataError, match=r"none\.dbn: holds no bars"):
        load_bars(make_settings().data, [path])


# -- hostile files: every way the bytes can be wrong is a DataError naming the file ------------------------


def test_corrupt_zstd_data_is_an_error_naming_the_file_not_a_zstd_traceback(tmp_path, nq_files):
    data = bytearray(nq_files["zst"].read_bytes())
    for i, at in enumerate((len(data) // 3, len(data) // 2, 2 * len(data) // 3)):
        flipped = bytearray(data)
        flipped[at] ^= 1
        path = tmp_path / f"flip{i}.dbn.zst"
        path.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=r"is not a readable DBN file") as e:
            load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
        assert str(e.value).startswith(str(path))


@pytest.mark.parametrize(("offset", "value"), [(0, 13), (0, 0), (1, 0x01), (1, 0xFF), (1, 0x15)])
def test_a_malformed_record_is_an_error_naming_the_file_not_a_decoder_panic(
    tmp_path, nq_files, offset, value
):
    """A record's length byte or rtype byte damaged: the decoder panics (pyo3's PanicException, a
    BaseException) or errs; either way the file is refused by name."""
    raw = bytearray(nq_files["dbn"].read_bytes())
    first = 8 + int.from_bytes(raw[4:8], "little")  # the metadata's end: the first record
    raw[first + 56 * 100 + offset] = value
    path = tmp_path / "damaged.dbn"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert str(e.value).startswith(str(path))


@pytest.mark.parametrize(
    ("rtype", "says"),
    [
        (dbn.RType.OHLCV_1H, r"record 101 is ohlcv_1h, not 1-minute OHLCV"),
        (dbn.RType.OHLCV_1S, r"record 101 is ohlcv_1s, not 1-minute OHLCV"),
        (0xA0, r"record 101 is mbo, not 1-minute OHLCV, in a file of schema ohlcv-1m"),
        (0x00, r"record 101 is mbp_0, not 1-minute OHLCV, in a file of schema ohlcv-1m"),
    ],
)
def test_every_record_of_an_ohlcv_1m_file_is_checked_whatever_the_header_says(
    tmp_path, nq_files, rtype, says
):
    """An hourly bar, or a damaged rtype byte, in a file whose header says ohlcv-1m was read as a
    1-minute bar (or dropped without a word): now it is an error naming the record."""
    raw = bytearray(nq_files["dbn"].read_bytes())
    first = 8 + int.from_bytes(raw[4:8], "little")
    raw[first + 56 * 100 + 1] = int(rtype)
    path = tmp_path / "rtype.dbn"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=says) as e:
        load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert str(e.value).startswith(str(path))


def test_an_undefined_event_time_refuses_its_row_only(tmp_path, nq):
    recs = bar_records(nq, 42)[:300]
    bad = dbn.OHLCVMsg(dbn.RType.OHLCV_1M, 1, 42, dbn.UNDEF_TIMESTAMP, 16_000 * SCALE, 16_001 * SCALE,
                       15_999 * SCALE, 16_000 * SCALE, 5)  # fmt: skip
    raw = meta_bytes(recs, symbols=["NQZ3"], mappings=[NQZ3]) + b"".join(
        bytes(bad) if i == 100 else r for i, (_, r) in enumerate(recs)
    )
    path = tmp_path / "undef_ts.dbn"
    path.write_bytes(raw)
    rb = load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    accepted = rb.accepted()
    assert len(rb) == 300 and not accepted[100] and int(accepted.sum()) == 299
    assert np.array_equal(rb.close[accepted], np.delete(nq.close[:300], 100))


def meta_bytes(recs: list[tuple[int, bytes]], symbols: list[str], mappings: list[SimpleNamespace]) -> bytes:
    return dbn.Metadata(
        dataset="GLBX.MDP3",
        start=recs[0][0],
        end=recs[-1][0] + 60_000_000_000,
        stype_in=dbn.SType.RAW_SYMBOL,
        stype_out=dbn.SType.INSTRUMENT_ID,
        schema=dbn.Schema.OHLCV_1M,
        symbols=symbols,
        mappings=mappings,
    ).encode()


# -- which instrument a file without symbol mappings holds ---------------------------------------------------


def test_a_file_without_mappings_is_replayed_only_when_something_in_it_names_the_instrument(tmp_path, nq):
    """Live-recorded files carry no mappings in their metadata. ES bars (symbols ESZ3) were replayed
    as NQ with a warning; now what the file says is checked, and a file that says nothing needs
    data.symbol = its instrument id."""
    recs = bar_records(nq, 43)[:500]
    data = make_settings().data
    es = tmp_path / "es.dbn"
    es.write_bytes(meta_bytes(recs, ["ESZ3"], []) + b"".join(r for _, r in recs))
    with pytest.raises(DataError, match=r"43: ESZ3\): none of its symbols is instrument.symbol 'NQ'"):
        load_bars(data, [es], tick_size=0.25, symbol="NQ")
    assert len(load_bars(data, [es], tick_size=0.25, symbol="ES")) == 500

    nq_named = tmp_path / "nq.dbn"
    nq_named.write_bytes(meta_bytes(recs, ["NQZ3"], []) + b"".join(r for _, r in recs))
    assert len(load_bars(data, [nq_named], tick_size=0.25, symbol="NQ")) == 500
    named = make_settings(data={"symbol": "NQZ3"}).data
    assert len(load_bars(named, [nq_named], tick_size=0.25, symbol="NQ")) == 500

    unnamed = tmp_path / "unnamed.dbn"
    unnamed.write_bytes(meta_bytes(recs, [], []) + b"".join(r for _, r in recs))
    with pytest.raises(DataError, match=r"nothing in the file names its instruments.*data.symbol"):
        load_bars(data, [unnamed], tick_size=0.25, symbol="NQ")
    by_id = make_settings(data={"symbol": "43"}).data
    assert len(load_bars(by_id, [unnamed], tick_size=0.25, symbol="NQ")) == 500


def test_a_live_streams_in_stream_symbol_mappings_name_its_instruments(tmp_path, nq):
    """A live stream says which symbol each instrument id is in SymbolMappingMsg records, not in
    its metadata: a file of NQ (42) and ES (43) bars gives NQ's, and ES is refused when only it is
    there."""
    nq_recs, es_recs = bar_records(nq, 42)[:400], bar_records(nq, 43, -11_000.0)[:400]
    ts0 = nq_recs[0][0]

    def mapping_msg(iid: int, sym_in: str, sym_out: str) -> bytes:
        return bytes(dbn.SymbolMappingMsg(1, iid, ts0, dbn.SType.CONTINUOUS, sym_in, dbn.SType.RAW_SYMBOL,
                                          sym_out, ts0, ts0 + 10**15))  # fmt: skip

    both = sorted(nq_recs + es_recs, key=lambda r: r[0])
    path = tmp_path / "live.dbn"
    path.write_bytes(
        meta_bytes(both, [], []) + mapping_msg(42, "NQ.c.0", "NQZ3") + mapping_msg(43, "ES.c.0", "ESZ3")
        + b"".join(r for _, r in both)
    )  # fmt: skip
    rb = load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert np.array_equal(rb.close, nq.close[:400])
    only_es = tmp_path / "live_es.dbn"
    only_es.write_bytes(meta_bytes(es_recs, [], []) + mapping_msg(43, "ES.c.0", "ESZ3")
                        + b"".join(r for _, r in es_recs))  # fmt: skip
    with pytest.raises(DataError, match=r"none of its symbols is instrument.symbol 'NQ'"):
        load_bars(make_settings().data, [only_es], tick_size=0.25, symbol="NQ")


def test_a_dbn_file_is_known_by_its_bytes_whatever_its_name(tmp_path, nq, nq_files):
    """A .dbn under another name (.bin, .csv) went to the CSV reader and its confusing error; a
    .dbn.zst that opens with a zstd skippable frame was refused as not DBN."""
    for name, source in (("bars.bin", "dbn"), ("bars.csv", "dbn"), ("bars.zst", "zst")):
        path = tmp_path / name
        path.write_bytes(nq_files[source].read_bytes())
        assert same_bars(load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ"), nq)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    path = tmp_path / "skip.dbn.zst"
    path.write_bytes(skippable + nq_files["zst"].read_bytes())
    assert same_bars(load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ"), nq)


def zstd_stored(data: bytes) -> bytes:
    """A zstd frame of raw (stored) blocks, written out per RFC 8878: no compressor needed."""
    out = bytearray((0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x38]))  # no FCS; 128 KiB window
    chunks = [data[i : i + (1 << 17)] for i in range(0, len(data), 1 << 17)] or [b""]
    for k, chunk in enumerate(chunks):
        last = 1 if k == len(chunks) - 1 else 0
        out += ((len(chunk) << 3) | last).to_bytes(3, "little") + chunk  # block type 0: raw
    return bytes(out)


def test_a_zstd_compressed_csv_is_read_as_csv_not_taken_for_dbn(tmp_path, nq):
    """Recognising DBN by its bytes must not catch zstd-compressed CSV (Databento's batch
    downloads can be that): its data does not start as DBN."""
    lines = NQ.read_bytes().splitlines(keepends=True)[:201]
    path = tmp_path / "bars.csv.zst"
    path.write_bytes(zstd_stored(b"".join(lines)))
    rb = load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ")
    assert np.array_equal(rb.close, nq.close[:200]) and np.array_equal(rb.ts_ns, nq.ts_ns[:200])
    dbn_in_zstd = tmp_path / "bars.zst"  # and a DBN file in a zstd frame, named neither way
    dbn_in_zstd.write_bytes(zstd_stored(meta_bytes(bar_records(nq, 42)[:300], ["NQZ3"], [NQZ3])
                                        + b"".join(r for _, r in bar_records(nq, 42)[:300])))  # fmt: skip
    assert np.array_equal(
        load_bars(make_settings().data, [dbn_in_zstd], tick_size=0.25).close, nq.close[:300]
    )


def test_a_legacy_file_whose_bars_are_ohlcv_deprecated_is_read_when_its_schema_is_ohlcv_1m(
    tmp_path, nq_files, nq
):
    """Files written before DBN 0.4 mark every OHLCV bar with rtype OHLCV_DEPRECATED (0x11); under
    a header of schema ohlcv-1m those are 1-minute bars."""
    raw = bytearray(nq_files["dbn"].read_bytes())
    first = 8 + int.from_bytes(raw[4:8], "little")
    for k in range(first, len(raw), 56):
        raw[k + 1] = int(dbn.RType.OHLCV_DEPRECATED)
    path = tmp_path / "legacy.dbn"
    path.write_bytes(bytes(raw))
    assert same_bars(load_bars(make_settings().data, [path], tick_size=0.25, symbol="NQ"), nq)
