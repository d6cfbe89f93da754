"""Reconciliation, pure: what the broker reports vs what the portfolio holds ─▶ ok | mismatch | adopt.

The broker gathers the report (its position, average price, working stop, and working orders no
run of ours placed); the engine applies the outcome: ``ok`` clears a reconcile halt, ``mismatch``
halts entries with the text, ``adopt`` (only when configured) takes the broker's position as the
portfolio's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trader.domain import ReconcileReport


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["ok", "mismatch", "adopt"]
    text: str = ""


def compare(report: ReconcileReport, portfolio_position: int, adopt: bool) -> Outcome:
    problems = []
    if report.position != portfolio_position:
        problems.append(f"broker position {report.position:+d} != journal {portfolio_position:+d}")
    if report.unknown_orders:
        unknown = report.unknown_orders
        problems.append(f"{len(unknown)} working order(s) unknown to this run: {list(unknown[:5])}")
    if not problems:
        return Outcome("ok")
    text = "; ".join(problems)
    return Outcome("adopt", text) if adopt else Outcome("mismatch", text)
