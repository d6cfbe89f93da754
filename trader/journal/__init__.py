"""The journal: an append-only SQLite (WAL) record of every run, bar, decision, order and fill.

``writer`` (the :class:`Journal`: a thread that commits rows in batches at bar boundaries),
``rows`` (every table's schema beside the one builder of its rows), ``reader`` (every SELECT).
"""

from trader.errors import JournalError
from trader.journal.rows import DECISION_COLUMNS, Row
from trader.journal.writer import Journal

__all__ = ["DECISION_COLUMNS", "Journal", "JournalError", "Row"]
