"""One error hierarchy for the whole package.

Every error a user can cause (a bad config value, an unreadable data file, a policy that does not
fit, an LLM backend that is down, a broker that refuses, a journal that cannot be written, a run
that cannot be continued) is a :class:`TraderError`; the CLI turns any of them into exit status 2
and its message. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TraderError(Exception):
    """Base of every error the user can act on; the message says what and where."""


class ConfigError(TraderError, ValueError):
    """A configuration value is missing or invalid; the message names the key path."""


class DataError(TraderError, ValueError):
    """A data file cannot be used as it is; the message names the file, column or line."""


class PolicyError(TraderError, ValueError):
    """The policy cannot be served with this configuration; the message says why."""


class LLMError(TraderError, RuntimeError):
    """An LLM backend failed or is misconfigured."""


class BrokerError(TraderError, RuntimeError):
    """A broker adapter failed or refused; the subclasses say how."""


class JournalError(TraderError, RuntimeError):
    """The journal (the recovery source) cannot be written or read."""


class RecoveryError(TraderError, RuntimeError):
    """An unfinished run cannot be continued from its journal; the message gives the numbers."""


__all__ = [
    "BrokerError",
    "ConfigError",
    "DataError",
    "JournalError",
    "LLMError",
    "PolicyError",
    "RecoveryError",
    "TraderError",
]
