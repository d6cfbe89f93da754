"""Keep llama.cpp off the bar loop's core and out of its interpreter.

Two ways (``llm_model.isolation``), measured by ``scripts/bench --llm``:

* ``process`` (default): the model runs in a child process (``python -m``, so it shares no
  interpreter state with the daemon). The daemon's advisor thread only waits on a pipe, so
  llama-cpp-python's per-token Python work (sampling, grammar, stopping criteria) never competes
  for the daemon's GIL; the child pins itself to the cores the bar loop does not keep
  (``cpu.bar_loop_cores``) and runs one thread per core (``n_threads``);
* ``thread``: the model runs in the advisor's worker thread of the daemon, pinned the same way;
* ``none``: the old way, kept to measure against: the advisor's thread, every core, unpinned.

The bar loop's own threads are pinned by :func:`pin_bar_loop` once a run is built.

A query that outlives its timeout in a child is abandoned by terminating the child; the next
query starts a new one (the model loads again, about a second for a small GGUF).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from trader.config import CpuConfig, LLMModelConfig
from trader.domain import LLMReply
from trader.errors import ConfigError, LLMError
from trader.logs import child_logging_args, configure_child_logging


class LLMTimeout(LLMError):
    """No answer within the query timeout."""


log = structlog.get_logger(__name__)

_START_S = 120.0  # a large GGUF from a cold disk


def _affinity() -> list[int]:
    if not hasattr(os, "sched_getaffinity"):
        return list(range(os.cpu_count() or 1))
    return sorted(os.sched_getaffinity(0))


_STARTED_WITH = _affinity()  # before any pinning of ours


def allowed_cores() -> list[int]:
    """The cores this process was started with (taskset, systemd CPUAffinity=)."""
    return list(_STARTED_WITH)


_CHOSEN: list[int] = []


def _current_core(allowed: list[int]) -> int:
    """The core this process runs on, read once (so the bar loop and the LLM agree)."""
    if not _CHOSEN:
        core = allowed[0]
        with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/stat") as fh:
            core = int(fh.read().rsplit(")", 1)[1].split()[36])  # field 39: the CPU last run on
        _CHOSEN.append(core if core in allowed else allowed[0])
    return _CHOSEN[0]


def bar_loop_cores(cfg: CpuConfig) -> list[int] | None:
    """The cores the bar loop keeps (None: no pinning)."""
    allowed = allowed_cores()
    if cfg.bar_loop_cores == "all" or len(allowed) < 2:
        return None
    if cfg.bar_loop_cores == "first":
        return allowed[:1]
    if cfg.bar_loop_cores == "auto":
        return [_current_core(allowed)]
    cores = [c for c in cfg.bar_loop_cores if c in allowed]
    if not cores:
        raise ConfigError(
            f"cpu.bar_loop_cores: {cfg.bar_loop_cores} has no core this process may use ({allowed})"
        )
    return cores


def off_loop_cores(cfg: CpuConfig) -> list[int] | None:
    """Every allowed core but the bar loop's (None: no pinning): where work that runs beside the
    loop goes (a local LLM, the journal's writer process)."""
    loop = bar_loop_cores(cfg)
    if loop is None:
        return None
    rest = [c for c in allowed_cores() if c not in loop]
    return rest or None


def llm_cores(cfg: CpuConfig) -> list[int] | None:
    """The cores a local LLM may use: every allowed core but the bar loop's (None: no pinning)."""
    return off_loop_cores(cfg)


def llm_threads(cfg: LLMModelConfig, cores: list[int] | None = None) -> int:
    """``n_threads`` as configured, or one per LLM core (all cores but the bar loop's) when 0."""
    if cfg.n_threads:
        return cfg.n_threads
    if cfg.isolation == "none":
        return len(allowed_cores())  # the old way: every core, the bar loop's included
    return len(cores) if cores else max(1, len(allowed_cores()) - 1)


def pin_thread(cores: list[int] | None) -> None:
    """Pin the calling thread (and the threads it starts) to ``cores``."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def pin_bar_loop(cfg: CpuConfig, beside: Sequence[int] = ()) -> list[int] | None:
    """Pin every thread of this process (event loop, journal writer thread, and those it starts
    later) to the bar loop's cores, and the processes ``beside`` (the journal's writer process) to
    the others; returns the loop's. Call once the run is built, before it starts."""
    cores = bar_loop_cores(cfg)
    if not hasattr(os, "sched_setaffinity"):
        return None
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cores or allowed_cores())
    for pid in beside:
        with contextlib.suppress(OSError):  # gone, or refused (a system-call filter)
            os.sched_setaffinity(pid, off_loop_cores(cfg) or allowed_cores())
    if cores is not None:
        log.info("bar_loop_pinned", cores=cores)
    return cores


def _child_main() -> None:
    """The child process (``python -m trader.llm.isolation CFG_JSON PREFIX_CACHE``): load the model,
    then answer one JSON line ``[system, user, timeout_s]`` with one JSON line, until stdin ends.
    The protocol has stdout to itself: whatever llama.cpp prints goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    cfg_json, prefix_cache, cores = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
    configure_child_logging(sys.argv[4] if len(sys.argv) > 4 else None)
    pin_thread(cores)

    def send(kind: str, detail: Any) -> None:
        proto.write(json.dumps([kind, detail]) + "\n")
        proto.flush()

    try:
        from trader.llm.backends import LlamaCppBackend

        backend = LlamaCppBackend(LLMModelConfig.model_validate_json(cfg_json), prefix_cache)
    except Exception as exc:
        send("error", str(exc))
        return
    send("ready", backend.name)
    try:
        for line in sys.stdin:
            system, user, timeout_s = json.loads(line)
            try:
                r = backend.complete(system, user, float(timeout_s))
            except Exception as exc:
                send("error", f"{type(exc).__name__}: {exc}")
            else:
                tokens = (r.prompt_tokens, r.completion_tokens)
                send("ok", (r.text, r.action_probs, *tokens, r.latency_s, r.timed_out))
    finally:
        backend.close()


class ProcessBackend:
    """llama.cpp in a child process, behind the LLMBackend port (JSON lines over its stdin/stdout;
    a plain ``python -m`` child, so nothing of the parent's ``__main__`` runs again)."""

    name = "llama_cpp"

    def __init__(
        self, cfg: LLMModelConfig, prefix_cache: bool = True, cores: list[int] | None = None
    ) -> None:
        self.cores = cores
        self.cfg = cfg.model_copy(update={"n_threads": llm_threads(cfg, cores)})
        self.prefix_cache = prefix_cache
        self._proc: subprocess.Popen[str] | None = None
        self.restarts = 0
        self._start()  # a broken model file fails here, at start, with the child's message

    def _start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "trader.llm.isolation",
            self.cfg.model_dump_json(),
            "1" if self.prefix_cache else "0",
            json.dumps(self.cores),
            *child_logging_args(),  # the child logs as this process does (console or JSON lines)
        ]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8"
        )
        try:
            kind, detail = self._read(proc, _START_S)
            if kind != "ready":
                raise LLMError(str(detail))
        except BaseException:
            proc.kill()  # never leave a half-started child behind
            with contextlib.suppress(Exception):
                proc.wait(5)
            raise
        self._proc = proc
        log.info("llm_process_started", pid=proc.pid, threads=self.cfg.n_threads, cores=self.cores)

    @staticmethod
    def _read(proc: subprocess.Popen[str], timeout_s: float) -> tuple[str, Any]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            raise LLMTimeout(f"no answer from the LLM process within {timeout_s:.0f} s")
        line = proc.stdout.readline()
        if not line:
            code = proc.poll()
            raise LLMError(f"the LLM process exited (exit code {code})")
        try:
            kind, detail = json.loads(line)
        except (ValueError, TypeError):
            raise LLMError(f"the LLM process wrote {line[:80]!r}, not an answer") from None
        return str(kind), detail

    def complete(self, system: str, user: str, timeout_s: float) -> LLMReply:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self.restarts += 1
            self._start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        t0 = time.perf_counter()
        try:
            proc.stdin.write(json.dumps([system, user, timeout_s]) + "\n")
            proc.stdin.flush()
            kind, detail = self._read(proc, timeout_s + 5.0)  # the child stops at timeout_s itself
        except LLMError:
            self._kill()  # abandoned or broken: the next query starts a fresh child
            raise
        except (OSError, ValueError) as exc:
            self._kill()
            raise LLMError(f"the LLM process died: {exc!r}") from None
        if kind != "ok":
            raise LLMError(str(detail))
        text, probs, pt, ct, latency_s, timed_out = detail
        # the daemon's latency is what it waited, pipe included
        latency = max(float(latency_s), time.perf_counter() - t0)
        return LLMReply(
            text, None if probs is None else tuple(probs), pt, ct, latency, self.name, bool(timed_out)
        )

    @property
    def pid(self) -> int | None:
        """The model process's pid (None between a death and the next query)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()  # the child's loop ends
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    _child_main()
