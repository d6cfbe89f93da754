"""The LLM advisor: decides when to ask, asks off the hot path, and serves cached advice.

The bar loop calls :meth:`Advisor.on_bar` once per decided bar. It returns the latest usable
advice with its confidence decayed by ``cache_decay_rate`` per bar of reuse (multiplicative:
conf x (1 - rate)^age), or None when there is none or it is older than ``cache_ttl`` seconds of
bar time. It may also start a new query, but never waits for one, except in the replay modes
that exist to simulate waiting:

* ``sync``: ask and wait, answer usable on the same bar (deterministic, slow);
* ``async`` (replay, bar timing): an answer is usable from the first bar whose time is at least
  ask time + its latency (from the question to the answer, waiting behind an abandoned query
  included): what live trading would have seen. At each bar the replay waits (wall time) only
  until the answer's wall time catches up with the bar's simulated time since the question, and
  never past the query timeout: once ``query_timeout_s`` of simulated time has passed without an
  answer, the query is abandoned there, as live would have. So a bar never waits longer than the
  simulated time between it and the bar before, however slow the backend; the wait is reported
  (``sim_wait_s``) so it is not counted as decision latency;
* ``async`` (live/paper, wall timing): usable as soon as it is finished;
* ``recorded``: answers come from an earlier journal by prompt hash, usable when the earlier run
  could use them; a missing answer is an error or a counted miss (``on_recorded_miss``).

When to ask (``advisor.schedule``):

* ``interval`` (``use_selective_querying``): on a significant state change (position, balance or
  win rate since the last query) at once; otherwise every ``query_interval`` bars, labelled with
  the first reason that applies: RL uncertain (confidence < threshold), flat (an entry decision),
  or plain interval. Without selective querying: every bar.
* ``entries``: only on an entry decision, which the engine names (the RL proposes BUY or SELL
  while flat, or against the open position, and the risk engine would let it through: a vetoed
  entry is HOLD whatever the model says, so asking would change nothing). That bar waits for the
  answer, so the advice takes part in the entry's fusion: in ``async`` replay the wait is
  simulated like the others (reported as ``sim_wait_s``, never past ``query_timeout_s``);
  ``recorded`` answers are usable on the bar that asked. The live bar loop never waits on the
  LLM, so this schedule is refused with wall-clock timing (paper, live).

Either way only when the advice can act (inside the entry window or with a position open) if
``only_when_actionable``. At most one query is in flight; a trigger while busy is counted as
skipped.

Answers are untrusted input. Their text is capped at ``ANSWER_MAX_CHARS`` (a longer answer is
counted as truncated, journaled cut and marked, and is no advice) and parsed in the worker
thread, so the bar path never runs over a long answer. An answer that cannot be read
(unparseable, truncated, failed, timed out) clears the cached advice: the previous answer is not
left in force, since the model has since been asked again and did not confirm it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from trader.config import Settings
from trader.domain import ACTION_NAMES, Advice, PortfolioSnapshot
from trader.errors import ConfigError, JournalError
from trader.journal import reader, rows
from trader.journal.rows import Row
from trader.llm.backends import LLMBackend, LLMBadAnswer, LLMError, LLMReply, LLMTimeout
from trader.llm.grammar import ParsedAnswer, cap_answer, parse_answer
from trader.llm.isolation import llm_cores, pin_thread
from trader.llm.prompts import build_context, render

log = structlog.get_logger(__name__)


def prompt_hash(system: str, user: str) -> str:
    return hashlib.sha256(f"{system}\n\x1e\n{user}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class _Query:
    qid: int
    bar_index: int
    ts_ns: int
    trigger: str
    system: str
    user: str
    phash: str
    submitted: float  # perf_counter
    done: threading.Event = field(default_factory=threading.Event)
    reply: LLMReply | None = None
    error: str | None = None
    recorded_latency_s: float | None = None  # recorded mode: when the earlier run could use it
    finished: float | None = None  # perf_counter when the answer (or the failure) came
    parsed: ParsedAnswer | None = None  # read in the worker, off the bar path
    truncated: bool = False  # the answer (text or HTTP body) was cut at its limit

    def latency_s(self) -> float:
        """From the question to the answer: the backend's own latency, or longer when the query
        waited behind an abandoned one."""
        waited = (self.finished or self.submitted) - self.submitted
        return max(waited, self.reply.latency_s) if self.reply is not None else waited


@dataclass(slots=True)
class AdvisorStats:
    queries: int = 0
    answered: int = 0
    unparseable: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped_busy: int = 0
    recorded_misses: int = 0
    truncated: int = 0  # answers cut at ANSWER_MAX_CHARS (no advice) or bodies over the HTTP limit
    latencies_s: list[float] = field(default_factory=list)
    stated_conf: list[float] = field(default_factory=list)
    logit_conf: list[float] = field(default_factory=list)
    triggers: dict[str, int] = field(default_factory=dict)
    sim_wait_s: float = 0.0


def _read_reply(q: _Query) -> None:
    """Cap the reply's text and parse it (in the worker thread, or at submit when recorded).
    Truncated or timed-out text is no advice; a "text" that is not a string is a failed answer."""
    reply = q.reply
    assert reply is not None
    text: object = reply.text
    if not isinstance(text, str):
        q.error = f"answer text is {type(text).__name__}, not text: {repr(text)[:200]}"
        text = ""
    capped, q.truncated = cap_answer(text)
    if capped is not reply.text:
        q.reply = dataclasses.replace(reply, text=capped)
    q.parsed = None if q.error or q.truncated or reply.timed_out else parse_answer(capped)


class RecordedAnswers:
    """LLM answers of an earlier run, by prompt hash (``advisor.mode = 'recorded'``)."""

    def __init__(self, journal: Path, run_id: str | None = None) -> None:
        if not journal.exists():
            raise LLMError(f"advisor.recorded_journal: {journal} not found")
        try:
            self.run_id, self.source_mode, answers = reader.recorded_answers(journal, run_id)
        except JournalError as exc:
            raise LLMError(f"advisor.recorded_journal: {exc}") from None
        self.answers: dict[str, tuple[str, tuple[float, ...] | None, float, int, int]] = {
            h: (a.raw, a.action_probs, a.latency_s, a.prompt_tokens, a.completion_tokens)
            for h, a in answers.items()
        }
        log.info(
            "llm_recorded_loaded",
            journal=str(journal),
            run_id=self.run_id,
            answers=len(self.answers),
            source_mode=self.source_mode,
        )


class Advisor:
    def __init__(
        self,
        settings: Settings,
        backend: LLMBackend | None,
        *,
        mode: str,
        timing: str,
        record: Callable[[Row], None],
        run_id: str,
        clock: Any,
        recorded: RecordedAnswers | None = None,
    ) -> None:
        if mode not in ("sync", "async", "recorded"):
            raise ValueError(f"advisor mode {mode!r}")
        if mode != "recorded" and backend is None:
            raise ValueError("a backend is needed unless the mode is 'recorded'")
        self.backend = backend
        self.mode = mode
        self.timing = timing  # "bar" (replay) or "wall" (paper/live)
        self.record = record
        self.run_id = run_id
        self.clock = clock
        self.recorded = recorded
        self.reconfigure(settings)
        a = settings.advisor
        if a.schedule == "entries" and timing == "wall":
            raise ConfigError(
                "advisor.schedule: 'entries' makes the entry bar wait for the LLM's answer, which only "
                "replay may do (the live bar loop never waits on the LLM); use 'interval' here"
            )
        # entries: ask only on entry decisions, and decide the entry with the answer (same bar)
        self.on_entries = a.schedule == "entries"
        self.timeout_s = a.query_timeout_s
        self.confidence_source = a.confidence_source
        self.only_actionable = a.only_when_actionable
        self.stats = AdvisorStats()
        self._inflight: _Query | None = None
        self._advice: Advice | None = None  # the latest usable answer, undecayed
        self._advice_ts: int = 0
        self._available_bar = 0
        self._last_query_bar: int | None = None
        self._last_state: tuple[int, float, float | None] | None = None
        self._qid = 0
        self._work: list[_Query] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._wall_due = False
        self._scheduler: Any = None
        self._last_ctx: tuple[int, int, Callable[[], Any], PortfolioSnapshot] | None = None

    def reconfigure(self, settings: Settings) -> None:
        """The schedule, cache, prompts and log channel from (reloaded) settings; called by a
        reload after the whole new config was validated, between bars."""
        f = settings.fusion
        self.settings = settings
        self.selective = f.use_selective_querying
        self.interval = f.query_interval
        self.threshold = f.confidence_threshold
        self.decay = 1.0 - f.cache_decay_rate
        self.ttl_ns = int(f.cache_ttl * 1e9)
        self.log_queries = settings.logging.log_llm_queries

    def continue_after(self, query_id: int) -> None:
        """A continued run: number new queries after the journaled ones."""
        self._qid = max(self._qid, query_id)

    @property
    def busy(self) -> bool:
        """A query is in flight."""
        return self._inflight is not None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.backend is not None and self.mode != "recorded":
            self._thread = threading.Thread(target=self._worker, name="llm-worker", daemon=True)
            self._thread.start()
        wall = self.settings.advisor.wall_interval_s
        if self.timing == "wall" and wall > 0:
            from apscheduler.schedulers.asyncio import AsyncIOScheduler

            self._scheduler = AsyncIOScheduler()
            self._scheduler.add_job(self._on_wall_tick, "interval", seconds=wall, id="llm_wall_interval")
            self._scheduler.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop asking; wait (bounded) for a query in flight and journal it."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        q = self._inflight
        if q is not None and q.done.wait(timeout_s):
            self._finish(q, None)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)  # the worker closes the backend it owns

    def _on_wall_tick(self) -> None:
        self._wall_due = True

    # -- worker thread ---------------------------------------------------------------------------
    def _worker(self) -> None:
        """Runs every query, then closes the backend: its resources (an HTTP client's event loop,
        llama.cpp's context) live in this thread."""
        backend = self.backend
        assert backend is not None
        if self.settings.llm_model.isolation == "thread":
            pin_thread(llm_cores(self.settings.cpu))  # llama.cpp computes on this thread and its own
        try:
            self._serve(backend)
        finally:
            try:
                backend.close()
            except Exception as exc:
                log.warning("llm_backend_close_failed", error=str(exc))

    def _serve(self, backend: LLMBackend) -> None:
        while True:
            with self._cv:
                while not self._work and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._work:
                    return
                q = self._work.pop(0)
            try:
                q.reply = backend.complete(q.system, q.user, self.timeout_s)
                _read_reply(q)
            except LLMTimeout as exc:
                q.error = f"timeout: {exc}"
            except LLMBadAnswer as exc:
                q.error, q.truncated = str(exc), exc.truncated
            except LLMError as exc:
                q.error = str(exc)
            except Exception as exc:  # a backend bug must not kill the worker
                q.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            q.finished = time.perf_counter()
            q.done.set()

    # -- the bar path ----------------------------------------------------------------------------
    def on_bar(
        self,
        i: int,
        ts_ns: int,
        rl_confidence: float,
        snap: PortfolioSnapshot,
        minute: int,
        market: Callable[[], Any],
        entry_decision: bool = False,
    ) -> Advice | None:
        """The advice for bar ``i``; may ask. ``entry_decision``: the RL proposes an entry the
        risk engine would allow (the ``entries`` schedule asks then, and only then)."""
        self._last_ctx = (i, ts_ns, market, snap)
        q = self._inflight
        if q is not None:
            self._collect(q, i, ts_ns)
        trigger = self._trigger(i, rl_confidence, snap, minute, entry_decision)
        if trigger is not None:
            if self._inflight is not None:
                self.stats.skipped_busy += 1
            else:
                self._submit(i, ts_ns, trigger, market, snap)
                if (self.mode in ("sync", "recorded") or self.on_entries) and self._inflight is not None:
                    # recorded: usable on this bar if the earlier run could use it here (sync runs);
                    # entries: the entry waits for its answer
                    self._collect(self._inflight, i, ts_ns)
        return self._current(i, ts_ns)

    def _trigger(
        self, i: int, rl_conf: float, snap: PortfolioSnapshot, minute: int, entry_decision: bool
    ) -> str | None:
        state = (snap.position, round(snap.balance_usd, 2), snap.recent_win_rate)
        if self._wall_due:
            self._wall_due = False
            self._last_state = state
            return "wall_interval"
        if self.only_actionable and snap.position == 0 and not self.clock.in_entry_window(minute):
            return None
        if self.on_entries:
            return "entry" if entry_decision else None
        if not self.selective:
            return "every_bar"
        changed = self._last_state is not None and state != self._last_state
        since = None if self._last_query_bar is None else i - self._last_query_bar
        if changed:
            return "state_change"
        if since is not None and since < self.interval:
            return None
        if rl_conf < self.threshold:
            return "rl_uncertain"
        if snap.position == 0:
            return "flat"
        return "interval"

    def _submit(
        self, i: int, ts_ns: int, trigger: str, market: Callable[[], Any], snap: PortfolioSnapshot
    ) -> None:
        ctx = build_context(market(), snap, self.settings.instrument, self.clock)
        system, user = render(self.settings.prompts, ctx)
        self._qid += 1
        q = _Query(self._qid, i, ts_ns, trigger, system, user, prompt_hash(system, user), time.perf_counter())
        self._last_query_bar = i
        self._last_state = (snap.position, round(snap.balance_usd, 2), snap.recent_win_rate)
        self.stats.queries += 1
        self.stats.triggers[trigger] = self.stats.triggers.get(trigger, 0) + 1
        if self.mode == "recorded":
            assert self.recorded is not None
            hit = self.recorded.answers.get(q.phash)
            if hit is None:
                self.stats.recorded_misses += 1
                if self.settings.advisor.on_recorded_miss == "error":
                    raise LLMError(
                        f"advisor.mode = 'recorded': no recorded answer for the prompt at bar {i} "
                        f"(hash {q.phash}); the inputs differ from the recorded run"
                    )
                q.error = "recorded_miss"
            else:
                raw, probs, latency, pt, ct = hit
                q.reply = LLMReply(raw, probs, pt, ct, latency, "recorded")
                q.recorded_latency_s = latency if self.recorded.source_mode == "async" else 0.0
                _read_reply(q)
            q.finished = q.submitted
            q.done.set()
            self._inflight = q
            return
        self._inflight = q
        with self._cv:
            self._work.append(q)
            self._cv.notify()

    def _collect(self, q: _Query, i: int, ts_ns: int) -> None:
        """Make q's answer current if it is usable at this bar (waiting only where simulated)."""
        if self.mode == "sync":
            q.done.wait(self.timeout_s + 5.0)
        elif self.mode == "recorded":
            need = 0.0 if self.on_entries else (q.recorded_latency_s or 0.0)
            if (ts_ns - q.ts_ns) / 1e9 < need:
                return
        elif self.on_entries:
            # async replay, entries: the entry bar waits for its answer, as a trader holding the
            # order for it would, but never past the query timeout; the wait is simulated time
            # (sim_wait_s), not decision latency
            if not q.done.is_set():
                t0 = time.perf_counter()
                q.done.wait(max(self.timeout_s - (t0 - q.submitted), 0.0))
                self.stats.sim_wait_s += time.perf_counter() - t0
            if not q.done.is_set():
                self._abandon(q, i)
                return
        elif self.timing == "bar":
            allowed = (ts_ns - q.ts_ns) / 1e9  # how long the answer could have taken to be usable now
            # Wait until the wall time since the question catches up with the simulated time, and
            # never past the query timeout: live would have given up on the query there.
            horizon = min(allowed, self.timeout_s)
            elapsed = time.perf_counter() - q.submitted
            if not q.done.is_set() and elapsed < horizon:
                t0 = time.perf_counter()
                q.done.wait(horizon - elapsed)
                self.stats.sim_wait_s += time.perf_counter() - t0
            if not q.done.is_set():
                if allowed >= self.timeout_s:
                    self._abandon(q, i)  # no answer within the query timeout of simulated time
                return
            if q.latency_s() > allowed:
                return  # finished (or failed), but later than this bar in simulated time
        if not q.done.is_set():
            if time.perf_counter() - q.submitted > self.timeout_s + 5.0:
                self._abandon(q, i)
            return
        self._finish(q, i, ts_ns)

    def _abandon(self, q: _Query, i: int) -> None:
        q.error = f"no answer within {self.timeout_s} s"
        self.stats.timeouts += 1
        self._advice = None  # asked again and not confirmed: the old answer is not left in force
        self._journal(q, None, None, i)
        self._inflight = None

    def _finish(self, q: _Query, i: int | None, ts_ns: int | None = None) -> None:
        self._inflight = None
        reply = q.reply
        parsed = None
        if q.truncated:
            self.stats.truncated += 1
        if q.error is not None or reply is None:
            if q.error and q.error.startswith("timeout"):
                self.stats.timeouts += 1
            elif q.error != "recorded_miss":
                self.stats.errors += 1
            log.warning("llm_query_failed", query=q.qid, bar=q.bar_index, error=q.error)
        else:
            self.stats.latencies_s.append(reply.latency_s)
            parsed = q.parsed
            if reply.timed_out:
                self.stats.timeouts += 1
            elif parsed is None:
                self.stats.unparseable += 1
                log.warning(
                    "llm_answer_unparseable",
                    query=q.qid,
                    bar=q.bar_index,
                    raw=reply.text[:200],
                    truncated=q.truncated,
                )
        advice = None
        if parsed is not None and reply is not None:
            logit_conf = reply.action_probs[parsed.action] if reply.action_probs else None
            self.stats.answered += 1
            self.stats.stated_conf.append(parsed.confidence)
            if logit_conf is not None:
                self.stats.logit_conf.append(logit_conf)
            src = self.confidence_source
            if src == "logits" and logit_conf is not None:
                conf = logit_conf
            elif src == "product" and logit_conf is not None:
                conf = parsed.confidence * logit_conf
            else:
                conf = parsed.confidence
            advice = Advice(parsed.action, conf, parsed.reason, q.bar_index, 0, parsed.confidence, logit_conf)
            if i is not None:
                self._advice = advice
                self._advice_ts = q.ts_ns
                self._available_bar = i
        elif i is not None:
            self._advice = None  # asked again and not confirmed: the old answer is not left in force
        self._journal(q, parsed, advice, i)

    def _journal(self, q: _Query, parsed: Any, advice: Advice | None, available_bar: int | None) -> None:
        r = q.reply
        self.record(
            rows.llm_query(
                self.run_id,
                q.qid,
                q.bar_index,
                q.ts_ns,
                q.trigger,
                r.backend if r else self.mode,
                q.phash,
                q.system,
                q.user,
                None if r is None or q.error else r.text,  # a failed answer's excerpt is in error
                None if parsed is None else ACTION_NAMES[parsed.action],
                None if parsed is None else parsed.confidence,
                None if advice is None else advice.logit_confidence,
                r.action_probs if r else None,
                None if advice is None else advice.confidence,
                None if r is None else round(r.latency_s * 1000.0, 3),
                None if r is None else r.prompt_tokens,
                None if r is None else r.completion_tokens,
                q.error or ("timeout" if r is not None and r.timed_out else None),
                available_bar,
            )
        )
        if self.log_queries:
            log.info(
                "llm_query",
                query=q.qid,
                bar=q.bar_index,
                trigger=q.trigger,
                answer=None if r is None else r.text[:120],
                error=q.error,
                latency_ms=None if r is None else round(r.latency_s * 1000, 1),
            )

    def _current(self, i: int, ts_ns: int) -> Advice | None:
        adv = self._advice
        if adv is None:
            return None
        if ts_ns - self._advice_ts > self.ttl_ns:
            self._advice = None
            return None
        age = i - self._available_bar
        if age == 0:
            return adv
        return Advice(
            adv.action,
            adv.confidence * self.decay**age,
            adv.reason,
            adv.asked_bar,
            age,
            adv.stated_confidence,
            adv.logit_confidence,
        )

    @property
    def sim_wait_s(self) -> float:
        return self.stats.sim_wait_s
