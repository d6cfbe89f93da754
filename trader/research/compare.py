"""Does the LLM help? Replay the same out-of-sample windows under several arms and compare their
P&L session by session (``trader compare``).

**Arms.** Each arm is one base config with a few overrides, run through the same replay path
(engine, risk engine, stops, session flattening, paper fills, journal); only the policy, the
advisor and, for two arms, the fusion or the stops differ:

* ``rl_only``: the RL policy (the window's ONNX file), advisor off.
* ``rl_llm``: the RL policy with the LLM's answers replayed from a recording
  (``advisor.mode = "recorded"``), under the base config's fusion and query schedule.
* ``llm_only``: ``policy = trader.policy.rules:Flat`` (HOLD, with confidence 1) under the guide's
  fusion (``fusion.strategy = "default"``) with ``fusion.llm_weight = 1`` and the interval query
  schedule. What it does, exactly: on a bar with fresh advice that the action mask allows, the
  LLM's action is taken when its (decayed) confidence is at least ``fusion.confidence_threshold``
  and at least ``fusion.low_confidence`` (below ``low_confidence`` the guide's high-confidence
  rule keeps the RL side's HOLD; at or above the threshold the weighted rule scores the LLM
  ``1·conf`` against the RL's ``0·1``); otherwise the bar is HOLD. The LLM can open, close
  (SELL/BUY against the position), move the stop to break-even and trail. Stops, the risk
  engine and the session flatten apply as in every arm.
* ``flat``: HOLD on every bar (never trades; its P&L is zero).
* ``buy_and_hold``: ``trader.policy.rules:BuyAndHold`` with ``execution.stop_mode = "none"``: long
  one order from each session's first entry-window bar until the session flatten
  (``instrument.flatten_at``, 15:55 ET by default), so it is intraday buy-and-hold, every session;
  the daily loss limit and the trailing drawdown still apply to it.
* ``ema_cross``: BUY when EMA(fast) of the close crosses above EMA(slow), SELL when below
  (``trader.policy.rules:EmaCross``; 20/50 unless ``ema`` says otherwise).

**Recorded answers.** An LLM's prompt carries the account (position, balance, win rate, ...), so
an arm's questions depend on its own trades. Each LLM arm therefore replays the answers of a
*recording*: a replay of that same arm on the same bars with the LLM asked for real
(``advisor.mode = "sync"``, every answer waited for, or ``"async"``, answers usable after their
measured latency). The arm's recorded replay then sees exactly the recorded answers, keyed by
prompt hash; a question the recording did not ask stops the run (``on_recorded_miss = "error"``),
so no arm ever gets advice that was not recorded, and re-running a comparison replays the same
advice without asking the model again. For a ``sync`` recording the arm reproduces the recording
decision for decision. Recordings are runs in one journal (``llm_journal``) with ids
``rec-<arm>-<key>``, where the key hashes everything the answers depend on (the arm's settings,
the window, the policy file's and the data files' identity), so a journal is reused where it fits
and recorded into (``record``) where it lacks a run. Any advisor model works: the recording asks
whatever ``llm_model`` / ``advisor.backend`` configure (the small bundled GGUF, Phi-3, a served
model).

**Per-session P&L.** An arm's P&L in a session is the change of its marked equity (balance +
unrealized) from the end of the previous session of the window (the starting balance for the
first) to the session's last bar, sessions by the session clock. Per window the sessions sum to
the replay's net P&L.

**Difference to RL-only.** For each arm, ``d_s = P&L_arm,s − P&L_rl_only,s`` per session, and a
percentile-bootstrap confidence interval of the mean of ``d`` over sessions
(:mod:`trader.research.stats`: ``resamples`` = 10,000, seeded). When the interval contains 0 the
result says so: "not distinguishable from zero"; otherwise "above zero" or "below zero". Under
:data:`~trader.research.stats.MIN_SESSIONS` sessions it draws no conclusion ("too few
sessions"): a bootstrap of two or three values only restates their spread.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from trader.config import Settings
from trader.errors import ConfigError, DataError, TraderError
from trader.features.clock import SessionClock
from trader.feeds.replay import bound_ns
from trader.research.stats import BootstrapCI, bootstrap_mean_ci
from trader.research.walkforward import (
    DataIndex,
    Progress,
    Segment,
    index_data,
    new_id,
    quiet,
    replay_segment,
    session_day,
    wide_console,
    window_settings,
)

ARMS = ("rl_only", "rl_llm", "llm_only", "flat", "buy_and_hold", "ema_cross")
LLM_ARMS = frozenset({"rl_llm", "llm_only"})
BASELINE = "rl_only"
DESCRIPTIONS = {
    "rl_only": "RL policy, LLM off",
    "rl_llm": "RL policy + recorded LLM advice (base fusion)",
    "llm_only": "LLM advice alone: its action at confidence >= threshold, else HOLD",
    "flat": "always HOLD",
    "buy_and_hold": "long each session from the entry window's first bar to the flatten, no stop",
    "ema_cross": "EMA cross",
}
FLAT = "trader.policy.rules:Flat"
BUY_AND_HOLD = "trader.policy.rules:BuyAndHold"
EMA_CROSS = "trader.policy.rules:EmaCross"


# -- arms -------------------------------------------------------------------------------------------------
def arm_settings(
    base: Settings,
    arm: str,
    *,
    policy: str | Path,
    ema: tuple[int, int] = (20, 50),
    advisor_mode: str = "off",
    recorded_journal: Path | None = None,
    recorded_run_id: str | None = None,
) -> Settings:
    """The base config with the overrides that make ``arm`` (see the module docstring).
    ``advisor_mode``: for the LLM arms, ``recorded`` (with the recording's journal and run id)
    or the mode that records (``sync``/``async``); the other arms ignore it (advisor off)."""
    if arm not in ARMS:
        raise ConfigError(f"compare: unknown arm {arm!r} (arms: {', '.join(ARMS)})")
    mode = advisor_mode if arm in LLM_ARMS else "off"
    if arm in LLM_ARMS and mode == "off":
        raise ConfigError(f"compare: arm {arm} needs the LLM (recorded, sync or async)")
    adv: dict[str, Any] = {"mode": mode}
    if mode == "recorded":
        adv.update(
            recorded_journal=recorded_journal, recorded_run_id=recorded_run_id, on_recorded_miss="error"
        )
    else:
        adv.update(recorded_journal=None, recorded_run_id=None)
    upd: dict[str, Any] = {}
    if arm in ("rl_only", "rl_llm"):
        upd["policy"] = base.policy.model_copy(update={"path": Path(str(policy))})
    elif arm in ("llm_only", "flat"):
        upd["policy"] = base.policy.model_copy(update={"path": Path(FLAT), "options": {}})
    elif arm == "buy_and_hold":
        upd["policy"] = base.policy.model_copy(update={"path": Path(BUY_AND_HOLD), "options": {}})
        upd["execution"] = base.execution.model_copy(update={"stop_mode": "none"})
    else:
        fast, slow = ema
        upd["policy"] = base.policy.model_copy(
            update={"path": Path(EMA_CROSS), "options": {"fast": fast, "slow": slow}}
        )
    if arm == "llm_only":
        upd["fusion"] = base.fusion.model_copy(
            update={"strategy": "default", "strategy_options": {}, "llm_weight": 1.0}
        )
        adv["schedule"] = "interval"
    upd["advisor"] = base.advisor.model_copy(update=adv)
    return base.model_copy(update=upd)


# -- windows ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareWindow:
    """Bars ``[first_row, end_row)`` of the data index, decided with ``policy`` in the RL arms."""

    index: int
    first_row: int
    end_row: int
    policy: str


def window_from_range(
    index: DataIndex, start: str | None, end: str | None, policy: str | Path
) -> CompareWindow:
    """One window: from ``start`` (the first decided bar; default: the first bar after the data's
    warm-up) to ``end`` (exclusive; default: the end of the data). The warm-up history before
    ``start`` is replayed, never traded."""
    first = index.warmup if start is None else index.row_at(_ns(start, index.tz, "--from"))
    last = len(index.ts_ns) if end is None else index.row_at(_ns(end, index.tz, "--to"))
    if first < index.warmup:
        raise DataError(
            f"compare --from {start}: only {first} bars before it; the indicators need "
            f"{index.warmup} (features.warmup_bars): start at {index.iso(index.warmup)} or later"
        )
    if first >= last:
        raise DataError(
            f"compare: no bars to decide between {start or 'the warm-up end'} and {end or 'the end'}"
        )
    return CompareWindow(0, first, last, str(policy))


def windows_from_walk_forward(index: DataIndex, summary: dict[str, Any]) -> list[CompareWindow]:
    """The test windows of a walk-forward run (its ``walkforward.json``), each with its policy."""
    out = []
    for w in summary["windows"]:
        first = index.row_at(_ns(w["test_from"], index.tz, "walk-forward test_from"))
        end = (
            len(index.ts_ns) if w["test_to"] is None else index.row_at(_ns(w["test_to"], index.tz, "test_to"))
        )
        if first < index.warmup or first >= end:
            raise DataError(
                f"compare: walk-forward window {w['window']} ({w['test_from']} .. {w['test_to']}) does "
                "not fit the data given (use the walk-forward run's data files)"
            )
        out.append(CompareWindow(int(w["window"]), first, end, str(w["policy"])))
    _check_windows_apart(index, out)
    return out


def _check_windows_apart(index: DataIndex, windows: list[CompareWindow]) -> None:
    """Windows that overlap, or share a session (one ends inside the session the next begins
    in), would count bars or a session twice in the per-session P&L and the bootstrap: refused."""
    starts = [s.first_row for s in index.sessions]

    def session_of(row: int) -> int | None:
        k = bisect.bisect_right(starts, row) - 1
        return index.sessions[k].session_id if k >= 0 and row < index.sessions[k].end_row else None

    ordered = sorted(windows, key=lambda w: w.first_row)
    for a, b in itertools.pairwise(ordered):
        shared = session_of(a.end_row - 1)
        if b.first_row < a.end_row or (shared is not None and shared == session_of(b.first_row)):
            raise DataError(
                f"compare: walk-forward windows {a.index} ({index.iso(a.first_row)} ..) and {b.index} "
                f"({index.iso(b.first_row)} ..) overlap or share a session: each session must be in "
                "one window only (use the walk-forward run's own walkforward.json)"
            )


def _ns(value: str, tz: str, key: str) -> int:
    ns = bound_ns(value, tz, key)
    assert ns is not None
    return ns


# -- recordings -------------------------------------------------------------------------------------------
def recording_key(rec: Settings, index: DataIndex) -> str:
    """A hash of what a recording's answers depend on: the settings (data range included), the
    policy file's and the data files' identity (name, size, modification time)."""
    d = rec.model_dump(mode="json", exclude={"journal", "logging", "service", "tradovate", "cpu"})
    d["data"]["paths"] = [_file_id(p) for p in index.paths]
    pol = Path(str(rec.policy.path))
    d["policy"]["file_sha256"] = hashlib.sha256(pol.read_bytes()).hexdigest() if pol.is_file() else None
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(p: Path) -> list[Any]:
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def _run_statuses(journal: Path) -> dict[str, str]:
    if not journal.exists():
        return {}
    from trader.journal import reader

    return {r.run_id: r.status for r in reader.runs(journal)}


def recording_for(
    arm: str,
    w: CompareWindow,
    rec: Settings,
    index: DataIndex,
    *,
    llm_journal: Path,
    record: bool,
    progress: Progress,
) -> tuple[str, Segment | None]:
    """The run id of ``arm``'s recording for window ``w`` in ``llm_journal``: found, or (with
    ``record``) made now by replaying ``rec`` (the arm with the LLM asked for real)."""
    rid = f"rec-{arm}-{recording_key(rec, index)}"
    status = _run_statuses(llm_journal).get(rid)
    if status == "completed":
        return rid, None
    if status is not None:
        raise TraderError(
            f"compare: the recording {rid} in {llm_journal} ended {status}; remove that journal or give "
            "another --llm-journal to record anew"
        )
    if not record:
        raise ConfigError(
            f"compare: {llm_journal} holds no recording of arm {arm} for window {w.index} "
            f"({index.iso(w.first_row)} .. ) with these settings; pass --record to ask the LLM now"
        )
    progress(f"recording arm {arm}, window {w.index}: the LLM asked for real ({rec.advisor.mode})")
    seg = replay_segment(rec, index, w.first_row, w.end_row, journal_path=llm_journal, run_id=rid)
    return rid, seg


# -- per-session P&L ----------------------------------------------------------------------------------------
def session_pnl(seg: Segment, clock: SessionClock) -> tuple[np.ndarray, np.ndarray]:
    """(session ids, P&L in USD) of a segment: the change of marked equity over each session,
    from the starting balance for the first (see the module docstring)."""
    ts = np.asarray(seg.stats.ts_ns, dtype=np.int64)
    eq = np.asarray(seg.stats.equity, dtype=np.float64)
    if not len(ts):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    sid = clock.session_id_batch(ts)
    ends = np.concatenate((np.flatnonzero(np.diff(sid) != 0), [len(ts) - 1]))
    eq_end = eq[ends]
    prev = np.concatenate(([seg.start_balance], eq_end[:-1]))
    return sid[ends], eq_end - prev


@dataclass
class ArmResult:
    arm: str
    segments: list[Segment] = field(default_factory=list)
    recordings: list[str] = field(default_factory=list)
    recording_net_pnl: list[float] = field(default_factory=list)  # the recording replays (if made now)

    def llm(self) -> dict[str, Any]:
        keys = ("queries", "answered", "recorded_misses", "llm_overrides", "decisions_with_advice")
        out: dict[str, Any] = {}
        for seg in self.segments:
            for k in keys:
                v = seg.llm.get(k)
                if isinstance(v, int):
                    out[k] = out.get(k, 0) + v
        return out


@dataclass
class CompareResult:
    run_id: str
    out_dir: Path
    journal: Path
    llm_journal: Path | None
    windows: list[CompareWindow]
    arms: dict[str, ArmResult]
    session_window: np.ndarray  # per session: the window it belongs to
    session_ids: np.ndarray
    pnl: dict[str, np.ndarray]  # arm -> P&L per session (USD)
    ci: dict[str, BootstrapCI | None]  # arm -> CI of the mean difference to rl_only (None: < 2 sessions)
    confidence: float
    resamples: int
    seed: int
    files: dict[str, Path]

    @property
    def days(self) -> list[str]:
        return [session_day(int(s)) for s in self.session_ids]

    def statement(self, arm: str) -> str:
        ci = self.ci.get(arm)
        if ci is None:
            return f"{arm} - rl_only: {len(self.session_ids)} session(s); a confidence interval needs 2"
        return ci.statement(f"{arm} - rl_only per session")


def run_compare(
    settings: Settings,
    *,
    arms: Sequence[str] = ARMS,
    start: str | None = None,
    end: str | None = None,
    policy: str | Path | None = None,
    walk_forward: dict[str, Any] | None = None,
    data_paths: Sequence[Path] | None = None,
    out_dir: Path | None = None,
    llm_journal: Path | None = None,
    record: bool = False,
    record_mode: str = "sync",
    ema: tuple[int, int] = (20, 50),
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    run_id: str | None = None,
    progress: Progress = quiet,
) -> CompareResult:
    """Replay every window under every arm, then per-session P&L, differences to rl_only and
    their bootstrap CIs; writes ``compare.json``, ``sessions.parquet`` and ``compare.html`` under
    ``out_dir`` (default ``runs/compare/<id>``). Windows: ``walk_forward`` (a walk-forward
    summary: its test windows and policies) or one window ``start`` .. ``end`` with ``policy``
    (default ``policy.path``)."""
    chosen = [BASELINE, *[a for a in ARMS if a in arms and a != BASELINE]]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"compare: unknown arm(s) {', '.join(unknown)} (arms: {', '.join(ARMS)})")
    if record_mode not in ("sync", "async"):
        raise ConfigError(f"compare: record mode {record_mode!r} is not sync or async")
    cid = run_id or new_id()
    out = Path(out_dir or Path("runs") / "compare" / cid).resolve()
    uses_llm = any(a in LLM_ARMS for a in chosen)
    if uses_llm and llm_journal is None and not record:
        raise ConfigError(
            "compare: the rl_llm and llm_only arms replay recorded LLM answers: give --llm-journal "
            "(from an earlier `trader compare --record`) or --record to ask the LLM now, or leave them "
            "out with --arms"
        )
    llm_j = (Path(llm_journal) if llm_journal else out / "llm.sqlite").resolve() if uses_llm else None
    base = settings
    index = index_data(base, data_paths)
    if walk_forward is not None:
        windows = windows_from_walk_forward(index, walk_forward)
    else:
        windows = [window_from_range(index, start, end, policy or base.policy.path)]
    spans = sorted((w.first_row, w.end_row) for w in windows)
    for (_, e0), (s1, _) in itertools.pairwise(spans):
        if s1 < e0:
            raise ConfigError("compare: windows overlap; sessions would be counted twice")
    out.mkdir(parents=True, exist_ok=True)
    journal = out / "journal.sqlite"
    clock = SessionClock(base.instrument)
    results = {a: ArmResult(a) for a in chosen}
    progress(
        f"compare {cid}: {len(windows)} window(s), arms {', '.join(chosen)}"
        + (f", LLM answers from {llm_j}" if llm_j else "")
    )
    for w in windows:
        for arm in chosen:
            kw: dict[str, Any] = {"policy": w.policy, "ema": ema}
            if arm in LLM_ARMS:
                assert llm_j is not None
                rec = window_settings(
                    arm_settings(base, arm, advisor_mode=record_mode, **kw), index, w.first_row, w.end_row
                )
                rid, rec_seg = recording_for(
                    arm, w, rec, index, llm_journal=llm_j, record=record, progress=progress
                )
                results[arm].recordings.append(rid)
                if rec_seg is not None:
                    results[arm].recording_net_pnl.append(rec_seg.net_pnl)
                kw.update(advisor_mode="recorded", recorded_journal=llm_j, recorded_run_id=rid)
            s = arm_settings(base, arm, **kw)
            seg = replay_segment(
                s, index, w.first_row, w.end_row, journal_path=journal, run_id=f"cmp-{cid}-{arm}-w{w.index}"
            )
            results[arm].segments.append(seg)
            progress(f"window {w.index} {arm}: net P&L {seg.net_pnl:,.2f} ({len(seg.trades)} trades)")
    sess_w, sess_id = [], []
    pnl: dict[str, list[float]] = {a: [] for a in chosen}
    for k, w in enumerate(windows):
        ids, _ = session_pnl(results[BASELINE].segments[k], clock)
        sess_w += [w.index] * len(ids)
        sess_id += ids.tolist()
        for arm in chosen:
            a_ids, a_pnl = session_pnl(results[arm].segments[k], clock)
            if not np.array_equal(a_ids, ids):
                raise TraderError(
                    f"compare: arm {arm} decided other sessions than rl_only in window {w.index}"
                )
            pnl[arm] += a_pnl.tolist()
    pnl_arr = {a: np.asarray(v, dtype=np.float64) for a, v in pnl.items()}
    ci: dict[str, BootstrapCI | None] = {}
    for arm in chosen[1:]:
        d = pnl_arr[arm] - pnl_arr[BASELINE]
        ci[arm] = (
            bootstrap_mean_ci(d, resamples=resamples, confidence=confidence, seed=seed)
            if len(d) >= 2
            else None
        )
    result = CompareResult(
        cid,
        out,
        journal,
        llm_j,
        windows,
        results,
        np.asarray(sess_w, dtype=np.int64),
        np.asarray(sess_id, dtype=np.int64),
        pnl_arr,
        ci,
        confidence,
        resamples,
        seed,
        {
            "summary": out / "compare.json",
            "sessions": out / "sessions.parquet",
            "plot": out / "compare.html",
            "journal": journal,
        },
    )
    write_outputs(result, index)
    return result


# -- outputs ------------------------------------------------------------------------------------------------
def summary(result: CompareResult, index: DataIndex | None = None) -> dict[str, Any]:
    r = result
    days = r.days
    arms: dict[str, Any] = {}
    for arm, ar in r.arms.items():
        p = r.pnl[arm]
        arms[arm] = {
            "description": DESCRIPTIONS[arm],
            "runs": [s.run_id for s in ar.segments],
            "total_pnl": round(float(p.sum()), 2),
            "mean_pnl_per_session": round(float(p.mean()), 2) if len(p) else None,
            "trades": sum(len(s.trades) for s in ar.segments),
        }
        if arm in LLM_ARMS:
            arms[arm]["recordings"] = ar.recordings
            arms[arm]["llm"] = ar.llm()
            if ar.recording_net_pnl:
                arms[arm]["recording_net_pnl"] = ar.recording_net_pnl
    diffs: dict[str, Any] = {}
    for arm, ci in r.ci.items():
        d = r.pnl[arm] - r.pnl[BASELINE]
        diffs[arm] = {
            "total": round(float(d.sum()), 2),
            "mean_per_session": round(float(d.mean()), 2) if len(d) else None,
            "ci_low": None if ci is None else round(ci.low, 2),
            "ci_high": None if ci is None else round(ci.high, 2),
            "contains_zero": None if ci is None else ci.contains_zero,
            "verdict": "too few sessions" if ci is None else ci.verdict,
            "statement": r.statement(arm),
        }
    return {
        "id": r.run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "journal": str(r.journal),
        "llm_journal": None if r.llm_journal is None else str(r.llm_journal),
        "windows": [
            {
                "window": w.index,
                "from": index.iso(w.first_row) if index else None,
                "to": (index.iso(w.end_row) if w.end_row < len(index.ts_ns) else None) if index else None,
                "policy": w.policy,
            }
            for w in r.windows
        ],
        "bootstrap": {
            "method": "percentile bootstrap of the mean per-session difference to rl_only",
            "resamples": r.resamples,
            "confidence": r.confidence,
            "seed": r.seed,
            "sessions": len(days),
        },
        "arms": arms,
        "difference_to_rl_only": diffs,
        "sessions": [
            {
                "window": int(r.session_window[i]),
                "session": days[i],
                "pnl": {arm: round(float(r.pnl[arm][i]), 2) for arm in r.arms},
            }
            for i in range(len(days))
        ],
    }


def write_outputs(result: CompareResult, index: DataIndex | None = None) -> None:
    import polars as pl

    r = result
    r.files["summary"].write_text(json.dumps(summary(r, index), indent=2) + "\n")
    df = pl.DataFrame(
        {
            "window": r.session_window,
            "session": r.days,
            **{f"pnl_{arm}": r.pnl[arm] for arm in r.arms},
        }
    )
    df.write_parquet(r.files["sessions"])
    write_plot(r, r.files["plot"])


def write_plot(result: CompareResult, path: Path) -> None:
    """Cumulative P&L per arm over the sessions (Plotly, self-contained HTML)."""
    import plotly.graph_objects as go

    r = result
    x = r.days
    fig = go.Figure()
    for arm in r.arms:
        fig.add_trace(go.Scatter(x=x, y=np.cumsum(r.pnl[arm]), mode="lines+markers", name=arm))
    fig.update_layout(
        title=f"trader compare {r.run_id}: cumulative P&L per arm ({len(x)} sessions)",
        xaxis={"title": "session (day it ends)", "type": "category"},
        yaxis_title="cumulative P&L (USD)",
        template="plotly_white",
    )
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def print_compare(result: CompareResult, console: Any = None) -> None:
    """The arms table (total, per session, difference to rl_only with its CI) and the verdicts."""
    from rich.table import Table

    r = result
    con = console or wide_console()
    level = f"{r.confidence:.0%}"
    t = Table(title=f"trader compare {r.run_id}: {len(r.session_ids)} sessions, {len(r.windows)} window(s)")
    for col in (
        "arm",
        "trades",
        "net P&L $",
        "mean/session $",
        "vs rl_only /session $",
        f"{level} CI",
        "verdict",
    ):
        t.add_column(col, justify="left" if col in ("arm", "verdict") else "right")
    for arm, ar in r.arms.items():
        p = r.pnl[arm]
        trades = sum(len(s.trades) for s in ar.segments)
        if arm == BASELINE:
            t.add_row(arm, str(trades), f"{p.sum():,.2f}", f"{p.mean():,.2f}", "-", "-", "baseline")
            continue
        d = p - r.pnl[BASELINE]
        ci = r.ci[arm]
        if ci is None:
            span, verdict = "-", "too few sessions"
        else:
            span = f"[{ci.low:+,.2f}, {ci.high:+,.2f}]"
            verdict = ci.verdict
        t.add_row(arm, str(trades), f"{p.sum():,.2f}", f"{p.mean():,.2f}", f"{d.mean():+,.2f}", span, verdict)
    con.print(t)
    if len(r.session_ids) <= 40:
        st = Table(title="P&L per session (USD)")
        st.add_column("session")
        for arm in r.arms:
            st.add_column(arm, justify="right")
        for i, day in enumerate(r.days):
            st.add_row(day, *(f"{r.pnl[arm][i]:,.2f}" for arm in r.arms))
        con.print(st)
    if "rl_llm" in r.arms:
        con.print(f"Does the LLM help? {r.statement('rl_llm')}.")
    for arm in r.arms:
        if arm not in (BASELINE, "rl_llm"):
            con.print(f"  {r.statement(arm)}")
    con.print(
        f"bootstrap: percentile, {r.resamples:,} resamples of {len(r.session_ids)} sessions, seed {r.seed}. "
        f"files: {r.files['summary']}, {r.files['sessions']}, {r.files['plot']}; journal {r.journal}"
        + (f"; LLM recordings {r.llm_journal}" if r.llm_journal else "")
    )
