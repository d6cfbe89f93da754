"""Bad recorded data never crashes the daemon and never trades silently wrong (issue 11, data).

Each class of bad input ends in a clear error naming the file, line, column or argument (the CLI
exits 2, no traceback), or its rows are rejected with a reason, counted and journaled while the
run goes on. Real files in tmp_path, the real loader, engine, journal and CLI.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from trader.config import BUNDLED_DATA
from trader.errors import ConfigError, DataError, TraderError
from trader.features.validation import ROW_REASONS, BarValidator, RefusedBar
from trader.feeds.replay import ReplayFeed, bound_ns, load_bars
from trader.wiring import build_replay

ROOT = Path(__file__).resolve().parents[2]
HEADER, *BODY = BUNDLED_DATA.read_text().splitlines()  # 1-minute NQ bars, tick 0.25, naive New York


def trader(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADER_")}
    env["TRADER_ADVISOR__MODE"] = "off"
    return subprocess.run(
        [sys.executable, "-m", "trader", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def with_prices(row: str, prices: str) -> str:
    """The row's timestamp with other ``open,high,low,close,volume``."""
    return row.split(",")[0] + "," + prices


def replay(tmp_path: Path, data: Path):
    """The real replay (engine, journal) over one file; returns the stats and the journal rows."""
    run = build_replay(make_settings(data={"paths": [str(data)]}), tmp_path / "j.sqlite")
    stats = asyncio.run(run.engine.run())
    run.journal.finish_run(run.run_id, stats.status, stats.bars, sum(stats.rejected.values()), {})
    run.journal.close()
    con = sqlite3.connect(tmp_path / "j.sqlite")
    try:
        rejected = con.execute("SELECT reason, origin FROM bars_rejected ORDER BY seq").fetchall()
        closes = [r[0] for r in con.execute("SELECT close FROM decisions")]
    finally:
        con.close()
    return stats, rejected, closes


def epoch_s(rows: list[str]) -> list[int]:
    ts = pl.Series([r.split(",")[0] for r in rows]).str.to_datetime(time_unit="us")
    return ts.dt.replace_time_zone("America/New_York").dt.epoch("s").to_list()


def assert_clear_cli_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


# -- 1. nothing to replay -------------------------------------------------------------------------
def test_header_only_file_is_a_clear_error(tmp_path):
    write_csv(tmp_path / "empty.csv", [])
    r = trader("replay", "--data", "empty.csv", cwd=tmp_path)
    assert_clear_cli_error(r, "empty.csv: holds no bars (only a header)")


def test_from_to_selecting_no_bar_is_a_clear_error(tmp_path):
    r = trader("replay", "--from", "2030-01-02T09:30:00", cwd=tmp_path)
    assert_clear_cli_error(r, "no bar between data.start (--from) 2030-01-02T09:30:00", "runs 2023-11-27")
    with pytest.raises(DataError, match=r"no bar between .* and data\.end \(--to\) 2023-11-01"):
        load_bars(make_settings(data={"end": "2023-11-01"}).data)


def test_a_file_whose_every_row_is_rejected_is_a_clear_error(tmp_path):
    f = write_csv(tmp_path / "nan.csv", [with_prices(r, "NaN,NaN,NaN,NaN,1") for r in BODY[:20]])
    with pytest.raises(
        DataError, match=r"no usable bar in .*nan\.csv: all 20 rows are rejected \(not_finite=20\)"
    ):
        load_bars(make_settings(data={"paths": [str(f)]}).data)


# -- 2. one finite but absurd price ---------------------------------------------------------------
def test_absurd_prices_are_rejected_with_a_reason_and_never_traded(tmp_path):
    body = BODY[:1200]
    bad = {
        300: ("1e20,1e20,1e20,1e20,10", "price_outlier"),
        400: ("16000.00,1e20,15990.00,15995.00,10", "price_outlier"),
        500: ("-16000.00,16010.00,15990.00,16000.00,10", "non_positive_price"),
        600: ("16000.00,16010.00,15990.00,0,10", "non_positive_price"),
        700: ("16000.00,15990.00,16010.00,16000.00,10", "high_below_open_close"),  # high < low
        800: ("16000.00,16010.00,15990.00,16020.00,10", "high_below_open_close"),  # close above high
        900: ("15980.00,16010.00,15990.00,16000.00,10", "low_above_open_close"),  # open below low
    }
    for i, (prices, _) in bad.items():
        body[i] = with_prices(body[i], prices)
    stats, rejected, closes = replay(tmp_path, write_csv(tmp_path / "absurd.csv", body))
    assert stats.status == "completed" and stats.bars == 1200 - len(bad)
    assert stats.rejected == {
        "price_outlier": 2,
        "non_positive_price": 2,
        "high_below_open_close": 2,
        "low_above_open_close": 1,
    }
    assert [(reason, origin.rsplit(":", 1)[1]) for reason, origin in rejected] == [
        (reason, str(i + 2)) for i, (_, reason) in sorted(bad.items())
    ]
    assert max(closes) < 20_000 and min(closes) > 10_000  # no absurd bar reached a decision


# -- 3. prices off the instrument's tick grid -----------------------------------------------------
def test_prices_off_the_tick_grid_are_rejected_and_a_file_mostly_off_grid_is_refused(tmp_path):
    body = BODY[:300]
    body[120] = with_prices(body[120], "16000.10,16010.00,15990.00,16000.00,10")
    rb = load_bars(
        make_settings(data={"paths": [str(write_csv(tmp_path / "nq.csv", body))]}).data, tick_size=0.25
    )
    bar = rb.items()[120][0]
    assert isinstance(bar, RefusedBar) and BarValidator().check(bar) == "off_tick_grid"
    assert rb.origin(120).endswith("nq.csv:122")
    validator = BarValidator()  # the engine's validator, bar by bar
    ok = np.array([bar is not None and validator.check(bar) is None for bar, _ in rb.items()])
    assert ok.sum() == 299 and not ok[120] and (ok == rb.accepted()).all()

    eurusd = [with_prices(r, "1.07123,1.07131,1.07118,1.07125,10") for r in BODY[:300]]
    f = write_csv(tmp_path / "eurusd.csv", eurusd)
    with pytest.raises(
        DataError,
        match=r"eurusd\.csv: 300 of 300 bars have prices off the tick grid of instrument\.tick_size = 0\.25 "
        r"\(line 2: open 1\.07123",
    ):
        load_bars(make_settings(data={"paths": [str(f)]}).data, tick_size=0.25)
    assert len(load_bars(make_settings(data={"paths": [str(f)]}).data, tick_size=0.00001)) == 300


# -- 4. epoch units and time zones, decided per file ----------------------------------------------
def test_one_epoch_milliseconds_row_is_rejected_not_the_file_reinterpreted(tmp_path):
    rows = BODY[:300]
    secs = epoch_s(rows)
    epoch_rows = [f"{t}," + r.split(",", 1)[1] for t, r in zip(secs, rows, strict=True)]
    epoch_rows[150] = f"{secs[150] * 1000}," + rows[150].split(",", 1)[1]
    f = write_csv(tmp_path / "epoch.csv", epoch_rows)
    rb = load_bars(make_settings(data={"paths": [str(f)]}).data)
    assert rb.ts_ns[0] == secs[0] * 1_000_000_000  # the file stays in seconds
    bar = rb.items()[150][0]
    assert isinstance(bar, RefusedBar) and bar.reason == "epoch_unit_mismatch"
    stats, rejected, _ = replay(tmp_path, f)
    assert stats.rejected == {"epoch_unit_mismatch": 1} and stats.bars == 299
    assert rejected[0][0] == "epoch_unit_mismatch" and rejected[0][1].endswith("epoch.csv:152")


def test_a_few_tz_aware_rows_in_a_naive_file_are_rejected_with_their_line(tmp_path):
    rows = BODY[:300]
    rows[40] = rows[40].replace(" ", "T", 1).replace(",", "-05:00,", 1)  # the same instant, with offset
    f = write_csv(tmp_path / "mixed.csv", rows)
    rb = load_bars(make_settings(data={"paths": [str(f)]}).data)
    assert rb.ts_ns[40] == epoch_s(BODY[40:41])[0] * 1_000_000_000
    stats, rejected, _ = replay(tmp_path, f)
    assert stats.rejected == {"timezone_mismatch": 1}
    assert rejected == [("timezone_mismatch", str(f) + ":42")]


def test_timestamps_half_tz_aware_half_naive_refuse_the_file(tmp_path):
    rows = BODY[:200]
    rows[:100] = [r.replace(",", "-05:00,", 1) for r in rows[:100]]
    write_csv(tmp_path / "half.csv", rows)
    r = trader("replay", "--data", "half.csv", cwd=tmp_path)
    assert_clear_cli_error(
        r,
        "half.csv: column 'timestamp' (data.columns.timestamp): "
        "100 timestamps carry a UTC offset and 100 do not",
    )


# -- 5. Parquet with bool or text price columns ---------------------------------------------------
def test_parquet_with_bool_or_text_price_columns_is_a_clear_error(tmp_path):
    src = pl.read_csv(BUNDLED_DATA).head(100).with_columns(pl.col("timestamp").str.to_datetime())
    src.with_columns(pl.col("close") > 16000).write_parquet(tmp_path / "bool.parquet")
    src.with_columns(pl.col("open").cast(pl.String)).write_parquet(tmp_path / "text.parquet")
    r = trader("replay", "--data", "bool.parquet", cwd=tmp_path)
    assert_clear_cli_error(
        r, "bool.parquet: column 'close' (data.columns.close) holds Boolean values, not numbers"
    )
    with pytest.raises(DataError, match=r"text\.parquet: column 'open' \(data\.columns\.open\) holds String"):
        load_bars(make_settings(data={"paths": [str(tmp_path / "text.parquet")]}).data)
    src.write_parquet(tmp_path / "good.parquet")
    assert len(load_bars(make_settings(data={"paths": [str(tmp_path / "good.parquet")]}).data)) == 100


# -- 6. bad --from / --to / --speed --------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--from", "yesterday"), "argument --from: 'yesterday' is not an ISO date-time"),
        (("--from", "2023-11-28T10:00:00+99:00"), "argument --from: '2023-11-28T10:00:00+99:00': UTC offset"),
        (("--to", "2023-13-45"), "argument --to: '2023-13-45' is not an ISO date-time"),
        (("--speed", "nan"), "argument --speed: 'nan' is not 0"),
        (("--speed", "inf"), "argument --speed: 'inf' is not 0"),
        (("--speed", "-2"), "argument --speed: '-2' is not 0"),
    ],
)
def test_bad_from_to_and_speed_arguments_are_clear_errors_naming_the_argument(tmp_path, args, needle):
    assert_clear_cli_error(trader("replay", *args, cwd=tmp_path), needle)


def test_bad_times_and_speeds_from_config_are_clear_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.start: 'yesterday' is not an ISO date-time"):
        bound_ns("yesterday", "America/New_York", "data.start")
    with pytest.raises(ConfigError, match=r"data\.end: '2023-11-28T10:00\+99:00': UTC offset"):
        bound_ns("2023-11-28T10:00+99:00", "America/New_York", "data.end")
    assert bound_ns("1900-01-01", "UTC") == 0 and bound_ns("2023-11-28T09:30:00.000001Z", "UTC") == (
        1_701_163_800_000_001_000
    )
    rb = load_bars(make_settings().data)
    for speed in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match=r"data\.speed \(--speed\)"):
            ReplayFeed(rb, speed)


# -- 7. data.bar_seconds against the data ---------------------------------------------------------
def test_bar_seconds_that_does_not_match_the_data_is_refused(tmp_path):
    f = write_csv(tmp_path / "five.csv", BODY[:1500:5])  # 5-minute bars
    with pytest.raises(
        DataError,
        match=r"five\.csv: bars are 300 s apart \(the 10th percentile spacing of its timestamps\) "
        r"but data\.bar_seconds = 60",
    ):
        load_bars(make_settings(data={"paths": [str(f)]}).data)
    assert len(load_bars(make_settings(data={"paths": [str(f)], "bar_seconds": 300}).data)) == 300


# -- 8. fewer bars than the warm-up ---------------------------------------------------------------
def test_fewer_bars_than_the_warmup_say_how_few_are_decided(tmp_path):
    for n, decided in ((1, 0), (10, 0), (1000, 40)):
        f = write_csv(tmp_path / f"n{n}.csv", BODY[:n])
        rb = load_bars(make_settings(data={"paths": [str(f)]}).data)
        assert len(rb) == n and rb.bars_after_warmup(960) == decided


def test_a_replay_shorter_than_the_warmup_says_nothing_was_decided(tmp_path):
    write_csv(tmp_path / "ten.csv", BODY[:10])
    r = trader("replay", "--data", "ten.csv", cwd=tmp_path)
    assert r.returncode == 2 and "nothing was decided: all 10 usable bars were warm-up" in r.stderr
    write_csv(tmp_path / "k.csv", BODY[:1000])
    r = trader("replay", "--data", "k.csv", cwd=tmp_path)
    assert r.returncode == 0 and "decided 40 of 1000 bars" in r.stdout


# -- the CSV loader never fails with anything but a TraderError ----------------------------------
_DT = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2300, 1, 1))
_TS = st.one_of(
    st.integers(0, 2**64).map(str),
    st.integers(1_700_000_000, 1_702_000_000).map(str),
    st.integers(1_700_000_000_000, 1_702_000_000_000).map(str),
    _DT.map(lambda d: d.isoformat(sep=" ")),
    st.builds(
        lambda d, h, m: f"{d.isoformat()}{h:+03d}:{m:02d}", _DT, st.integers(-99, 99), st.integers(0, 99)
    ),
    _DT.map(lambda d: d.isoformat() + "Z"),
    st.text(max_size=12),
)
_NUM = st.one_of(
    st.floats().map(repr),
    st.integers(-(10**6), 10**25).map(str),
    st.sampled_from(["16000.25", "16000.1", "1e20", "-1", "0", "nan", "inf", "", " 16000.5 ", "true", "1,5"]),
    st.text(max_size=8),
)
_ROW = st.tuples(_TS, _NUM, _NUM, _NUM, _NUM, _NUM).map(",".join)
_HEADERS = st.sampled_from(
    [HEADER, "timestamp,open,high,low,close", "close,low,high,open,timestamp,volume", ""]
)


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    """Some real bars with random rows among them, in a random encoding."""
    start = draw(st.integers(0, len(BODY) - 50))
    rows = BODY[start : start + draw(st.integers(0, 40))]
    for _ in range(draw(st.integers(0, 6))):
        rows.insert(draw(st.integers(0, len(rows))), draw(_ROW))
    text = "\n".join([draw(_HEADERS), *rows]) + draw(st.sampled_from(["\n", "", "\r\n"]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"]))
    return text.encode(encoding, errors="replace")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=csv_files(), tick_size=st.sampled_from([None, 0.25]))
def test_the_csv_loader_raises_nothing_but_trader_errors(content, tick_size):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "random.csv"
        f.write_bytes(content)
        try:
            rb = load_bars(make_settings(data={"paths": [str(f)]}).data, tick_size=tick_size)
        except TraderError:
            return
    codes = rb.reason_codes()
    assert (codes == 0).any()  # a loaded file always has a bar to replay
    validator, engine_says = BarValidator(), []
    for bar, _ in rb.items():  # what the engine does with each row, in order
        engine_says.append("bad_timestamp" if bar is None else validator.check(bar) or "")
    assert engine_says == [ROW_REASONS[c] for c in codes]
    assert np.isfinite(rb.close[codes == 0]).all()


def test_real_world_files_are_not_refused_for_gaps_moves_or_vendor_rounding(tmp_path):
    """Neighbours of the classes above that must load: a 1-minute file of an illiquid contract
    (60% of minutes without a bar), daily bars of a market that tripled over months, and prices of
    a 1/32 tick written with 4 decimals."""
    sparse = [r for i, r in enumerate(BODY[:2000]) if i % 5 in (0, 1)]
    rb = load_bars(make_settings(data={"paths": [str(write_csv(tmp_path / "sparse.csv", sparse))]}).data)
    assert len(rb) == len(sparse) and int(rb.accepted().sum()) == len(sparse)

    days = []
    for k in range(90):  # 15 -> 50 over three months: a move, not a bad print
        p = 15.0 + 35.0 * k / 89
        days.append(f"2020-01-01 00:00:00,{p:.2f},{p * 1.02:.2f},{p * 0.98:.2f},{p:.2f},100")
    days = [
        f"{(datetime(2020, 1, 1) + timedelta(days=k)).isoformat(sep=' ')}" + d[19:]
        for k, d in enumerate(days)
    ]
    daily = make_settings(data={"paths": [str(write_csv(tmp_path / "vx.csv", days))], "bar_seconds": 86400})
    assert int(load_bars(daily.data, tick_size=0.01).accepted().sum()) == 90

    ticks = [f"{i * 1 / 32 + 110:.4f}" for i in range(400)]
    rows = [with_prices(BODY[i], f"{t},{t},{t},{t},10") for i, t in enumerate(ticks)]
    zb = load_bars(
        make_settings(data={"paths": [str(write_csv(tmp_path / "zb.csv", rows))]}).data, tick_size=1 / 32
    )
    assert int(zb.accepted().sum()) == 400
