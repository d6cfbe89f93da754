"""Replay end to end through the engine: journal completeness, determinism, data handling."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import make_settings
from trader.config import BUNDLED_DATA
from trader.feeds.replay import DataError, load_bars
from trader.journal import DECISION_COLUMNS
from trader.wiring import build_replay

SLICE_END = "2023-11-29T16:00:00"  # ~2,700 bars of the bundled slice: past warm-up, some RTH trading


def replay(tmp_path: Path, name: str = "j.sqlite", **overrides):
    overrides.setdefault("data", {})
    overrides["data"].setdefault("end", SLICE_END)
    # a permissive risk setup so the short replay trades and exercises orders, fills and trades
    overrides.setdefault("risk", {"enable_risk_veto": False})
    settings = make_settings(**overrides)
    run = build_replay(settings, tmp_path / name)
    stats = asyncio.run(run.engine.run())
    run.journal.finish_run(run.run_id, stats.status, stats.bars, sum(stats.rejected.values()), {})
    run.journal.close()
    return run, stats, tmp_path / name


def rows(db: Path, sql: str, *args):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_journal_holds_every_bar_decision_order_fill_and_trade(tmp_path):
    run, stats, db = replay(tmp_path)
    rid = run.run_id
    (n_dec,) = rows(db, "SELECT count(*) FROM decisions WHERE run_id=?", rid)[0]
    assert n_dec == stats.bars > 2000
    idx = [r[0] for r in rows(db, "SELECT bar_index FROM decisions WHERE run_id=? ORDER BY bar_index", rid)]
    assert idx == list(range(stats.bars))
    assert rows(db, "SELECT status, bars FROM runs WHERE run_id=?", rid) == [("completed", stats.bars)]
    fills = rows(db, "SELECT client_id, side, qty, price FROM fills WHERE run_id=? ORDER BY seq", rid)
    orders = {r[0] for r in rows(db, "SELECT client_id FROM orders WHERE run_id=?", rid)}
    assert fills, "the replay should trade"
    assert {f[0] for f in fills if not f[0].startswith("stop-")} <= orders  # every market fill has its order
    assert all(f[3] / 0.25 == round(f[3] / 0.25) for f in fills)  # tick grid
    net_position = sum(f[1] * f[2] for f in fills)
    (last_pos,) = rows(
        db, "SELECT position FROM decisions WHERE run_id=? ORDER BY bar_index DESC LIMIT 1", rid
    )[0]
    assert net_position == last_pos == run.engine.portfolio.position
    trades_pnl = sum(r[0] for r in rows(db, "SELECT pnl_usd FROM trades WHERE run_id=?", rid))
    pf = run.engine.portfolio
    assert trades_pnl == pytest.approx(
        pf.balance_usd - 50_000 + (pf.entry_commission_usd if pf.position else 0)
    )
    warm = rows(db, "SELECT count(*) FROM decisions WHERE run_id=? AND method='warmup'", rid)[0][0]
    assert warm == 960
    assert (
        rows(
            db, "SELECT count(*) FROM decisions WHERE run_id=? AND method='warmup' AND final_action != 0", rid
        )[0][0]
        == 0
    )  # warm-up bars are never traded


def _digest(db: Path, run_id: str) -> tuple[str, str]:
    dec = rows(db, f"SELECT {DECISION_COLUMNS} FROM decisions WHERE run_id=? ORDER BY bar_index", run_id)
    fills = rows(
        db,
        "SELECT seq, ts_ns, side, qty, price, commission_usd, purpose FROM fills WHERE run_id=? ORDER BY seq",
        run_id,
    )
    return hashlib.sha256(repr(dec).encode()).hexdigest(), hashlib.sha256(repr(fills).encode()).hexdigest()


def test_two_replays_of_the_same_inputs_journal_identical_decisions_and_fills(tmp_path):
    a, _, db = replay(tmp_path, "same.sqlite")
    b, _, _ = replay(tmp_path, "same.sqlite")
    assert a.run_id != b.run_id
    da, db_ = _digest(db, a.run_id), _digest(db, b.run_id)
    assert da == db_
    assert rows(db, "SELECT count(*) FROM fills WHERE run_id=?", a.run_id)[0][0] > 0


def test_custom_column_names_and_positions_load_by_config_alone(tmp_path):
    src = pl.read_csv(BUNDLED_DATA, infer_schema=False).head(1500)
    named = tmp_path / "named.csv"
    src.select(
        pl.col("timestamp").alias("Date Time"),
        pl.col("open").alias("Open"),
        pl.col("high").alias("Hi"),
        pl.col("low").alias("Lo"),
        pl.col("close").alias("Last"),
        pl.col("volume").alias("Vol"),
    ).write_csv(named, separator=";")
    headerless = tmp_path / "noheader.csv"
    src.with_row_index("").select(["", "timestamp", "open", "high", "low", "close", "volume"]).write_csv(
        headerless, include_header=False
    )
    cols = {
        "timestamp": "Date Time",
        "open": "Open",
        "high": "Hi",
        "low": "Lo",
        "close": "Last",
        "volume": "Vol",
    }
    a = load_bars(make_settings(data={"paths": [str(named)], "columns": cols, "separator": ";"}).data)
    b = load_bars(
        make_settings(
            data={
                "paths": [str(headerless)],
                "has_header": False,
                "columns": {"timestamp": 1, "open": 2, "high": 3, "low": 4, "close": 5, "volume": 6},
            }
        ).data
    )
    ref = load_bars(make_settings(data={"paths": [str(BUNDLED_DATA)]}).data)
    for rb in (a, b):
        assert len(rb) == 1500
        assert (rb.ts_ns == ref.ts_ns[:1500]).all() and (rb.close == ref.close[:1500]).all()
    _, stats, _ = replay(
        tmp_path, data={"paths": [str(named)], "columns": cols, "separator": ";", "end": None}
    )
    assert stats.bars == 1500 and stats.status == "completed"


def test_broken_bars_are_counted_journaled_and_the_run_goes_on(tmp_path):
    lines = BUNDLED_DATA.read_text().splitlines()
    head, body = lines[0], lines[1:1201]
    body[100] = "2023-11-27 19:40:00,16000.00,NaN,15990.00,15995.00,10"  # not finite
    body[200] = body[200].split(",")[0] + ",16000.00,15990.00,15980.00,15995.00,10"  # high below open
    body[300] = body[300].split(",")[0] + ",16000.00,16010.00,16005.00,16001.00,10"  # low above open
    body[400] = body[400].split(",")[0] + ",16000.00,16010.00,15990.00,16001.00,-5"  # negative volume
    body[500] = body[499]  # duplicate timestamp
    body[600] = body[550]  # time going backwards
    body[700] = "not a time,1,2,0.5,1,1"  # unparseable timestamp
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([head, *body]) + "\n")
    run, stats, db = replay(tmp_path, data={"paths": [str(bad)], "end": None})
    assert stats.status == "completed"
    assert stats.rejected == {
        "not_finite": 1,
        "high_below_open_close": 1,
        "low_above_open_close": 1,
        "negative_volume": 1,
        "duplicate_timestamp": 1,
        "time_backwards": 1,
        "bad_timestamp": 1,
    }
    assert stats.bars == 1200 - 7
    got = rows(db, "SELECT reason, origin FROM bars_rejected WHERE run_id=? ORDER BY seq", run.run_id)
    assert got[0][0] == "not_finite" and got[0][1].endswith("bad.csv:102")


def test_missing_column_fails_at_start_naming_column_and_file(tmp_path):
    f = tmp_path / "nocol.csv"
    f.write_text("timestamp,open,high,low,close\n2023-11-27 18:00:00,1,1,1,1\n")
    with pytest.raises(
        DataError, match=r"nocol\.csv: missing required column 'volume' \(data\.columns\.volume\)"
    ):
        load_bars(make_settings(data={"paths": [str(f)]}).data)


def test_from_to_and_many_files_play_in_time_order(tmp_path):
    src = pl.read_csv(BUNDLED_DATA, infer_schema=False)
    first, second = tmp_path / "a.parquet", tmp_path / "b.csv"
    src.slice(0, 100).with_columns(
        pl.col("timestamp").str.to_datetime(),
        pl.col("open", "high", "low", "close", "volume").cast(pl.Float64),
    ).write_parquet(first)
    src.slice(100, 100).write_csv(second)
    rb = load_bars(make_settings(data={"paths": [str(second), str(first)]}).data)
    assert len(rb) == 200 and (rb.ts_ns[1:] > rb.ts_ns[:-1]).all()
    cut = load_bars(
        make_settings(
            data={
                "paths": [str(first), str(second)],
                "start": "2023-11-27T18:30:00",
                "end": "2023-11-27T19:00:00",
            }
        ).data
    )
    assert len(cut) == 30
