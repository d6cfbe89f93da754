"""The CLI as a user runs it (a real subprocess): ``trader layout-hash``, ``trader replay
--close-at-end`` and DBN files given with ``--data``."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from tests.conftest import make_settings
from tests.e2e.test_cli import trader
from tests.integration.test_dbn import NQZ3, bar_records, write_dbn
from trader.config import BUNDLED_DATA, BUNDLED_POLICY
from trader.feeds.replay import load_bars
from trader.replay import replay


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- layout-hash ------------------------------------------------------------------------------------------


def test_layout_hash_prints_the_hash_the_bundled_policy_was_trained_on(tmp_path):
    r = trader("layout-hash", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = ort.InferenceSession(str(BUNDLED_POLICY)).get_modelmeta().custom_metadata_map
    assert r.stdout == f"{meta['layout_hash']}  261 features\n"


def test_layout_hash_follows_the_config_file(tmp_path):
    (tmp_path / "base.toml").write_text("[features]\nuse_llm_features = false\n")
    (tmp_path / "custom.toml").write_text(
        '[features]\ncustom_blocks = ["strategies.features:RunRangeBlock"]\n'
    )
    base = trader("layout-hash", "--config", "base.toml", cwd=tmp_path)
    custom = trader("layout-hash", "--config", "custom.toml", cwd=tmp_path)
    default = trader("layout-hash", cwd=tmp_path)
    assert base.returncode == custom.returncode == 0, base.stderr + custom.stderr
    assert base.stdout.endswith("  228 features\n") and custom.stdout.endswith("  263 features\n")
    hashes = {r.stdout.split()[0] for r in (base, custom, default)}
    assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)


def test_layout_hash_with_a_bad_config_exits_2_naming_the_key(tmp_path):
    (tmp_path / "bad.toml").write_text('[features]\ncustom_blocks = ["strategies.features:NoSuchBlock"]\n')
    r = trader("layout-hash", "--config", "bad.toml", cwd=tmp_path)
    assert r.returncode == 2 and "features.custom_blocks" in r.stderr and "Traceback" not in r.stderr


# -- replay --close-at-end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_at_end(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A --to bar time at which the bundled demo (LLM off) holds a position: two bars after the
    fill of an entry that is held for longer."""
    out = replay(make_settings(), journal_path=tmp_path_factory.mktemp("probe") / "j.sqlite")
    held = next(t for t in out.trades if t.exit_ts_ns - t.entry_ts_ns >= 4 * 60 * 10**9)
    return datetime.fromtimestamp(held.entry_ts_ns / 1e9 + 120, UTC).isoformat()


def test_a_replay_ending_in_a_position_ends_flat_with_close_at_end_and_open_without(tmp_path, open_at_end):
    runs = {}
    for name, flag in (("kept", ()), ("closed", ("--close-at-end",))):
        r = trader(
            "replay", "--llm", "off", "--to", open_at_end, "--journal", f"{name}.sqlite",
            "--report", f"{name}.json", *flag, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        runs[name] = tmp_path / f"{name}.sqlite"
    last = "SELECT position FROM account WHERE reason = 'run_end'"
    kept, closed = runs["kept"], runs["closed"]
    (held,) = rows(kept, last)[0]
    assert held != 0 and rows(closed, last) == [(0,)]
    kept_trades = rows(kept, "SELECT seq, exit_reason FROM trades ORDER BY seq")
    closed_trades = rows(closed, "SELECT seq, exit_reason, qty, exit_ts_ns FROM trades ORDER BY seq")
    assert [t[:2] for t in closed_trades[:-1]] == kept_trades
    _, reason, qty, exit_ts = closed_trades[-1]
    assert reason == "flatten:end_of_replay" and qty == abs(held)
    (last_bar,) = rows(closed, "SELECT max(ts_ns) FROM decisions")[0]
    assert exit_ts == last_bar  # at the last bar's close
    fills = rows(closed, "SELECT purpose, qty FROM fills ORDER BY seq DESC LIMIT 1")
    assert fills == [("flatten:end_of_replay", abs(held))]
    report = json.loads((tmp_path / "closed.json").read_text())
    assert (
        report["trades"]
        == len(closed_trades)
        == json.loads((tmp_path / "kept.json").read_text())["trades"] + 1
    )


def test_close_at_end_from_the_config_file_does_the_same(tmp_path, open_at_end):
    (tmp_path / "c.toml").write_text("[data]\nclose_at_end = true\n")
    args = ("--config", "c.toml", "--llm", "off", "--to", open_at_end, "--journal", "j.sqlite")
    r = trader("replay", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    db = tmp_path / "j.sqlite"
    assert rows(db, "SELECT position FROM account WHERE reason = 'run_end'") == [(0,)]
    assert rows(db, "SELECT exit_reason FROM trades ORDER BY seq DESC LIMIT 1") == [
        ("flatten:end_of_replay",)
    ]


# -- DBN files on the command line --------------------------------------------------------------------------


def test_replay_takes_a_dbn_zst_file_and_refuses_a_truncated_one_by_name(tmp_path):
    bars = load_bars(make_settings().data, [BUNDLED_DATA], tick_size=0.25)
    recs = bar_records(bars, 42)
    write_dbn(tmp_path / "nq.dbn.zst", recs, [NQZ3], zstd=True)
    whole = write_dbn(tmp_path / "nq.dbn", recs, [NQZ3]).read_bytes()
    (tmp_path / "cut.dbn").write_bytes(whole[:-30])
    ok = trader("replay", "--llm", "off", "--data", "nq.dbn.zst", "--report", "r.json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "r.json").read_text())["bars"] == 5520
    bad = trader("replay", "--llm", "off", "--data", "cut.dbn", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"trader: {tmp_path / 'cut.dbn'}: truncated: the data ends inside a record" in bad.stderr
