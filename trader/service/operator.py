"""Operator actions and views of a running service, the same for every transport (HTTP, signals):
control (halt, resume, flatten, kill, rearm), reload (SIGHUP), health (watchdog, /healthz) and
state (/state, STATUS=).

Every control request and reload, accepted or refused, is journaled at the bar it takes effect on,
so a restart restores the operator state (see :mod:`trader.recovery`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

from trader.config import Settings, load_settings
from trader.controls import OPERATOR_ACTIONS
from trader.wiring import Run, decision_parts

log = structlog.get_logger(__name__)

# Config values that may change while running (SIGHUP); everything else needs a restart.
RELOADABLE: dict[str, tuple[str, ...] | None] = {
    "fusion": None,  # the whole section (weights, thresholds, strategy, query schedule, cache)
    "prompts": None,
    "logging": ("log_llm_queries", "log_decision_fusion", "log_risk_veto", "log_latency"),
    "risk": (
        "enable_risk_veto",
        "max_consecutive_losses",
        "min_win_rate_threshold",
        "win_rate_min_trades",
        "dd_buffer_threshold",
        "daily_loss_limit_usd",
        "kill_switch",
        "rules",
        "rule_options",
    ),
}


class Operator:
    """Control, reload, health and state over one run."""

    def __init__(
        self, settings: Settings, run: Run, config_path: Path | None, overrides: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.run = run
        self.engine = run.engine
        self.controls = run.controls
        self.config_path = config_path
        self.overrides = overrides or {}
        self.started_at = time.monotonic()
        self.ready = False
        self.reloads = 0
        self.reload_rejects = 0

    # -- control ----------------------------------------------------------------------------------
    def control(self, action: str, source: str, reason: str = "") -> dict[str, Any]:
        """An accepted operator control: applied, journaled, logged."""
        if action not in OPERATOR_ACTIONS:
            raise ValueError(f"unknown control action {action!r}")
        self.controls.apply(action, reason)
        self.engine.journal_control(action, source, "accepted", reason)
        log.warning("control", action=action, source=source, reason=reason)
        self.engine.watch_controls()  # observers (the dashboard) hear of the halt now, not next bar
        return {"halted": self.controls.halted, "position": self.engine.portfolio.position}

    def refused(self, action: str, source: str, why: str) -> None:
        self.engine.journal_control(action, source, f"refused: {why}")

    # -- reload -----------------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """SIGHUP: validate the whole new config and build its components, then swap all of them
        (fusion, risk, advisor schedule and prompts, log channels) or none. Journaled either way."""
        old = self.settings
        try:
            new = load_settings(self.config_path, self.overrides)
            applied, restart = _diff(old, new)
            merged = _merge(old, new)
            parts = decision_parts(merged, self.engine.clock)  # plug-ins load here, or the reload fails
        except Exception as exc:  # whatever the new config does wrong, the running one stays
            self.reload_rejects += 1
            why = str(exc).strip() or type(exc).__name__
            log.error("reload_rejected", error=why)
            self.engine.journal_control("reload", "SIGHUP", "rejected", why[:500])
            return {"applied": {}, "restart_required": [], "error": why}
        # the swap: no await between these lines, so no bar sees half of it
        self.engine.reload(parts)
        advisor = self.engine.advisor
        if advisor is not None:
            advisor.reconfigure(merged)
        self.controls.kill_switch_config = merged.risk.kill_switch
        self.settings = merged
        self.reloads += 1
        log.info("config_reloaded", applied=applied, restart_required=restart)
        self.engine.journal_control(
            "reload",
            "SIGHUP",
            "accepted",
            f"applied {sorted(applied)}; restart needed for {restart}",
            config_json=merged.model_dump_json(),
        )
        return {"applied": applied, "restart_required": restart}

    # -- health -----------------------------------------------------------------------------------
    def last_bar_age_s(self) -> float | None:
        last = self.engine.last_bar_at
        return None if not last else time.monotonic() - last

    def check_stale(self) -> None:
        cfg = self.settings.service
        age = self.last_bar_age_s()
        since_start = time.monotonic() - self.started_at
        limit = cfg.stale_bar_multiple * cfg.bar_interval_s
        stale = (age if age is not None else since_start) > limit
        if self.controls.set_stale(stale):
            if stale:
                log.warning("stale_data_entries_halted", last_bar_age_s=age, limit_s=limit)
            else:
                log.info("data_resumed_entries_allowed")
            self.engine.watch_controls()

    def journal_problem(self) -> str | None:
        return self.run.journal.health()

    def unhealthy(self) -> str | None:
        """Why the service is not healthy, or None. Feeds the watchdog and /healthz."""
        cfg = self.settings.service
        busy = self.engine.busy_since
        if busy and time.monotonic() - busy > cfg.stuck_bar_s:
            return f"stuck in one bar for {time.monotonic() - busy:.1f}s"
        problem = self.journal_problem()
        if problem is not None:
            return problem
        self.check_stale()
        if self.controls.stale:
            return "stale data: no bar within the limit"
        b = self.engine.broker.health()
        if not b.connected and b.disconnected_s > cfg.broker_down_limit_s:
            return f"broker {b.kind} disconnected for {b.disconnected_s:.0f}s"
        return None

    def degraded(self) -> list[str]:
        """Up but limited (a broker lockout or penalty): entries halt and /healthz says so, but the
        watchdog keeps being fed, since a restart would only ask the broker for more."""
        out = []
        for part in (self.engine.feed.health(), self.engine.broker.health()):
            if part.degraded and part.degraded not in out:
                out.append(part.degraded)
        return out

    def health(self, stopping: bool) -> dict[str, Any]:
        reason = self.unhealthy()
        adv = self.engine.advisor
        f, b = self.engine.feed.health(), self.engine.broker.health()
        degraded = self.degraded()
        ok = self.ready and reason is None and not stopping
        return {
            "ok": ok,
            "status": ("degraded" if degraded else "ok") if ok else "unhealthy",
            "degraded": degraded,
            "ready": self.ready,
            "stopping": stopping,
            "problem": reason,
            "last_bar_age_s": self.last_bar_age_s(),
            "stale_data": self.controls.stale,
            "halted": bool(self.controls.operator_halt),
            "halt_reasons": self.controls.halt_reasons(),
            "journal": {"path": str(self.run.journal.path), "problem": self.journal_problem()},
            "feed": {"kind": f.kind, "connected": f.connected, **dict(f.counters)},
            "broker": {
                "name": self.engine.broker.name,
                "connected": b.connected,
                "disconnected_s": round(b.disconnected_s, 1),
                "mismatch": self.controls.reconcile_mismatch or None,
                "blocked": b.degraded or None,
            },
            "llm": None
            if adv is None
            else {
                "mode": self.settings.advisor.mode,
                "queries": adv.stats.queries,  # type: ignore[attr-defined]
                "errors": adv.stats.errors,  # type: ignore[attr-defined]
                "timeouts": adv.stats.timeouts,  # type: ignore[attr-defined]
            },
        }

    def state(self) -> dict[str, Any]:
        pf = self.engine.portfolio
        return {
            "mode": self.run.mode,
            "run_id": self.run.run_id,
            "bars": self.engine.stats.bars,
            "position": pf.position,
            "avg_entry": pf.avg_entry if pf.position else None,
            "stop_price": pf.stop_price,
            "trailing": pf.trailing,
            "balance_usd": round(pf.balance_usd, 2),
            "equity_usd": round(pf.balance_usd + pf.unrealized_usd, 2),
            "peak_equity_usd": round(pf.peak_equity_usd, 2),
            "drawdown_threshold_usd": round(pf.threshold_usd, 2),
            "daily_pnl_usd": round(pf.snapshot().daily_pnl_usd, 2),
            "consecutive_losses": pf.consecutive_losses,
            **self.controls.state(),
            "last_bar_age_s": self.last_bar_age_s(),
            "reloads": self.reloads,
        }

    def status_line(self) -> str:
        age = self.last_bar_age_s()
        pos = self.engine.portfolio.position
        halt = " halted" if self.controls.halted else ""
        return (
            f"{self.run.mode}: position {pos:+d}, last bar {'-' if age is None else f'{age:.0f}s'} ago{halt}"
        )


def _diff(old: Settings, new: Settings) -> tuple[dict[str, Any], list[str]]:
    applied: dict[str, Any] = {}
    restart: list[str] = []
    old_d, new_d = old.model_dump(mode="json"), new.model_dump(mode="json")
    for section, values in new_d.items():
        if values == old_d.get(section):
            continue
        keys = RELOADABLE.get(section, ())
        if isinstance(values, dict):
            for k, v in values.items():
                if v == old_d[section].get(k):
                    continue
                if keys is None or (keys and k in keys):
                    applied[f"{section}.{k}"] = v
                else:
                    restart.append(f"{section}.{k}")
        else:
            restart.append(section)
    return applied, restart


def _merge(old: Settings, new: Settings) -> Settings:
    """The running settings with the reloadable values of ``new``."""
    return old.model_copy(
        update={
            "fusion": new.fusion,
            "prompts": new.prompts,
            "logging": old.logging.model_copy(
                update={k: getattr(new.logging, k) for k in RELOADABLE["logging"] or ()}
            ),
            "risk": old.risk.model_copy(update={k: getattr(new.risk, k) for k in RELOADABLE["risk"] or ()}),
        }
    )
