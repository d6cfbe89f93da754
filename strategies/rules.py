"""Rule policies for ``trader replay --policy strategies.rules:EmaCross`` (periods from
``[policy.options]``: ``fast``, ``slow``), ``strategies.rules:Flat`` and
``strategies.rules:BuyAndHold``."""

from trader.policy.rules import BuyAndHold, EmaCross, Flat

__all__ = ["BuyAndHold", "EmaCross", "Flat"]
