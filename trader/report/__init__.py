"""Run report: statistics (:mod:`.stats`), terminal tables (:mod:`.tables`, rich), the replay's
progress line (:mod:`.progress`), and the HTML page of a run (:mod:`.page`, :mod:`.plots`, read
back from the journal by :mod:`.view`).

The page and the terminal tables import Plotly and rich; the statistics do not, so the engine's
end-of-run report stays light.
"""

from __future__ import annotations

from typing import Any

from trader.report.stats import (
    JOURNAL_FIGURES,
    build_report,
    daily_returns,
    journal_figures,
    llm_report,
    performance,
    ratio,
    session_rows,
    write_json,
)

__all__ = [
    "JOURNAL_FIGURES",
    "build_report",
    "daily_returns",
    "format_table",
    "journal_figures",
    "llm_report",
    "performance",
    "ratio",
    "session_rows",
    "write_json",
    "write_report_html",
]


def format_table(r: dict[str, Any]) -> str:
    """The report as a plain-text table (see :func:`trader.report.tables.format_table`)."""
    from trader.report.tables import format_table as _format

    return _format(r)


def write_report_html(journal: Any, run_id: str | None = None, out: Any = None) -> Any:
    """Write a run's HTML page (see :func:`trader.report.page.write_report_html`)."""
    from trader.report.page import write_report_html as _write

    return _write(journal, run_id, out)
