"""Rule policies for ``trader replay --policy strategies.rules:EmaCross`` (periods from
``[policy.options]``: ``fast``, ``slow``) and ``strategies.rules:Flat``."""

from trader.policy.rules import EmaCross, Flat

__all__ = ["EmaCross", "Flat"]
