"""Walk-forward on the shared NQ data with real parts: MaskablePPO training (torch, tiny budget),
ONNX export, replays through the engine and journal, Ray tasks for the parallel training."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import onnx
import pytest

from tests.conftest import NQ, make_settings
from trader.cli import main as cli_main
from trader.errors import ConfigError, DataError
from trader.feeds.replay import bound_ns, load_bars
from trader.journal import DECISION_COLUMNS
from trader.replay import replay
from trader.research.walkforward import index_data, plan_windows, run_walk_forward
from trader.train.ppo import TrainConfig

FROM = "2023-11-26T18:00:00"  # six sessions: 11-27 (after the warm-up) .. 12-04
TINY = {"timesteps": 256, "n_steps": 128, "batch_size": 64, "n_epochs": 2, "hidden": (32, 32), "seed": 3}


def settings():
    return make_settings(data={"start": FROM})


def walk(out_dir: Path, run_id: str, s=None, test_days: int = 2):
    """A sequential walk-forward of the tiny training budget: 2 training sessions a window."""
    return run_walk_forward(
        s or settings(),
        TrainConfig(checkpoint_every=0, **TINY),
        train_days=2,
        test_days=test_days,
        workers=1,
        data_paths=[NQ],
        out_dir=out_dir,
        run_id=run_id,
    )


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    out = tmp_path_factory.mktemp("wf")
    return walk(out / "seq", "wf-test"), out


def meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def journal_rows(journal: Path, sql: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(journal)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_each_window_trains_on_its_sessions_and_tests_on_the_following_ones(walked):
    result, _ = walked
    assert [w.window.index for w in result.windows] == [0, 1]
    days = [[s.day for s in w.window.train] + [s.day for s in w.window.test] for w in result.windows]
    assert days == [
        ["2023-11-27", "2023-11-28", "2023-11-29", "2023-11-30"],
        ["2023-11-29", "2023-11-30", "2023-12-01", "2023-12-04"],
    ]
    for w in result.windows:
        assert w.policy == result.out_dir / f"window-{w.window.index}" / "policy.onnx"
        assert w.policy.is_file()
        m = meta(w.policy)
        train_days = [s.day for s in w.window.train]
        test_days = [s.day for s in w.window.test]
        assert m["walk_forward_window"] == str(w.window.index)
        assert json.loads(m["train_sessions"]) == train_days
        assert json.loads(m["test_sessions"]) == test_days
        train_from, train_to = m["train_window"].split(" .. ")
        test_from = m["test_window"].split(" .. ")[0]
        assert train_to == test_from  # training ends where the test begins (exclusive)
        assert bound_ns(train_from, "UTC") < bound_ns(test_from, "UTC")
        assert max(train_days) < min(test_days)
        assert w.trained.sessions == 2  # the training environment saw exactly its two sessions
        first_test_ns = bound_ns(test_from, "UTC")
        assert first_test_ns is not None
        assert all(t.entry_ts_ns >= first_test_ns for t in w.segment.trades)
        assert int(w.segment.stats.ts_ns[0]) == first_test_ns  # decisions start at the test start
    # test windows follow each other without overlap
    a, b = result.windows
    assert int(a.segment.stats.ts_ns[-1]) < int(b.segment.stats.ts_ns[0])


@pytest.mark.slow
def test_the_stitched_net_pnl_is_the_sum_of_the_segments_net_pnl_in_their_journals(walked):
    result, _ = walked
    journaled = []
    for w in result.windows:
        ((report,),) = journal_rows(
            result.journal, "SELECT report_json FROM runs WHERE run_id=?", w.segment.run_id
        )
        journaled.append(json.loads(report)["net_pnl"])
    assert result.report["net_pnl"] == pytest.approx(sum(journaled), abs=1e-9)
    assert any(p != 0 for p in journaled), "the policies traded"
    # each segment starts from the previous one's ending equity
    start = 50_000.0
    seg0 = len(result.windows[0].segment.stats.ts_ns)
    assert float(result.stitched.equity[seg0 - 1]) == pytest.approx(start + journaled[0])
    assert float(result.stitched.equity[seg0]) == pytest.approx(start + journaled[0])  # flat at its first bar
    assert float(result.stitched.equity[-1]) == pytest.approx(start + sum(journaled))
    assert result.report["trades"] == sum(len(w.segment.trades) for w in result.windows)
    assert result.report["trading_days"] == 4
    summary = json.loads(result.files["summary"].read_text())
    assert [w["net_pnl"] for w in summary["windows"]] == pytest.approx(journaled)
    assert summary["report"]["net_pnl"] == result.report["net_pnl"]


@pytest.mark.slow
def test_a_test_window_replay_equals_a_direct_replay_of_that_window_with_its_policy(walked, tmp_path):
    result, _ = walked
    w = result.windows[1]
    s = settings()
    bars = load_bars(s.data, [NQ], tick_size=0.25)
    ts = bars.ts_ns[bars.accepted()].tolist()
    first = ts.index(int(w.segment.stats.ts_ns[0]))
    # the window's first bar with the 960 warm-up bars before it, to the end of the data
    start_iso = datetime.fromtimestamp(ts[first - 960] / 1e9, UTC).isoformat()
    direct_settings = make_settings(data={"start": start_iso}, policy={"path": str(w.policy)})
    direct = replay(
        direct_settings, journal_path=tmp_path / "direct.sqlite", data_paths=[NQ], run_id="direct"
    )
    q = f"SELECT {DECISION_COLUMNS} FROM decisions WHERE run_id=? ORDER BY bar_index"
    assert journal_rows(tmp_path / "direct.sqlite", q, "direct") == journal_rows(
        result.journal, q, w.segment.run_id
    )
    assert direct.report["net_pnl"] == pytest.approx(w.segment.net_pnl, abs=0.005)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_policies_in_parallel_ray_tasks(walked):
    result, out = walked
    code = cli_main(
        [
            "walk-forward",
            "--data",
            str(NQ),
            "--from",
            FROM,
            "--train-days",
            "2",
            "--test-days",
            "2",
            "--timesteps",
            "256",
            "--n-steps",
            "128",
            "--batch-size",
            "64",
            "--epochs",
            "2",
            "--hidden",
            "32,32",
            "--seed",
            "3",
            "--workers",
            "2",
            "--id",
            "wf-test",
            "--out",
            str(out / "ray"),
        ]
    )
    assert code == 0
    for w in result.windows:
        again = out / "ray" / f"window-{w.window.index}" / "policy.onnx"
        assert again.read_bytes() == w.policy.read_bytes()
    summary = json.loads((out / "ray" / "walkforward.json").read_text())
    assert summary["workers"] == 2
    assert summary["report"]["net_pnl"] == result.report["net_pnl"]


def test_overlapping_test_windows_and_too_few_sessions_are_refused():
    index = index_data(settings(), [NQ])
    assert len(index.sessions) == 6
    with pytest.raises(ConfigError, match="overlap"):
        plan_windows(index, 2, 2, step=1)
    with pytest.raises(DataError, match="6 tradable sessions"):
        plan_windows(index, 5, 2)
    assert [w.index for w in plan_windows(index, 2, 1)] == [0, 1, 2, 3]


def test_an_out_directory_holding_a_walk_forward_is_refused_before_any_training(walked):
    """Rerunning into the same --out overwrote the windows' policies under the old
    walkforward.json (compare then read new policies with old windows) and died at the journal's
    run ids after all the training."""
    _, out = walked
    summary = out / "seq" / "walkforward.json"
    before = summary.read_bytes()
    with pytest.raises(
        ConfigError, match=r"holds an earlier walk-forward \(journal.sqlite, walkforward.json"
    ):
        walk(out / "seq", "wf-test", test_days=3)
    assert summary.read_bytes() == before


def test_a_last_window_cut_by_to_records_the_cut_not_the_end_of_the_data(tmp_path):
    """With --to, the last window's test_to was written as null, which compare --walk-forward
    reads as "to the end of the file": it replayed 3 sessions where the walk-forward tested 2."""
    from trader.research.compare import windows_from_walk_forward

    cut = "2023-12-01T12:00:00"
    result = walk(tmp_path / "cut", "wf-cut", make_settings(data={"start": FROM, "end": cut}), test_days=3)
    summary = json.loads((tmp_path / "cut" / "walkforward.json").read_text())
    (last,) = summary["windows"]
    assert last["test_to"] is not None and last["test_to"].startswith(cut)
    index = index_data(settings(), [NQ])  # compare reads the whole file
    (window,) = windows_from_walk_forward(index, summary)
    assert int(index.ts_ns[window.end_row - 1]) < bound_ns(cut, index.tz) <= int(index.ts_ns[window.end_row])
    assert window.end_row - window.first_row == len(result.stitched.ts_ns)
