"""Replay: the policy evaluated for a stretch of coming bars in one call.

In a replay the market part of every observation is known ahead (``BulkFeatures.rows``); only
the account part and the action mask depend on what the portfolio does. While those stay as
they are (flat and no fill: most bars of a replay), the coming observations are known too, so
the policy answers a stretch of them in one batch. Each bar's own observation and mask are then
compared, byte for byte, with the row the batch assumed: the answer is used only when they are
the same, so a decision never differs from evaluating that bar alone (the policy's
``batch_exact`` vouches that a row's answer does not depend on the batch around it). At the
first bar that differs (a fill, a new session...) the rest is dropped and a new stretch starts
there.

Stretch lengths are powers of two (the sizes ``batch_exact`` checked), growing while the account
part and the mask hold (1, 2, 4 ... ``policy.batch_bars``) and back to one bar when they change,
so a position whose features change every bar costs one ordinary evaluation per bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trader.domain import N_ACTIONS, Observed, PolicyChoice
from trader.ports import BatchPolicy, Policy


class LookAhead:
    """Answers ``policy.act(o)`` for the replay's bars from batches over precomputed rows.

    ``features``: the replay's feature source: ``rows`` (float32[bars, dim]) and ``index`` (the
    row of the bar it handed out last); ``portfolio_columns``: the slices of an observation that
    depend on the portfolio (account and risk context).
    Counters: ``evaluations`` (policy calls), ``reevaluations`` (stretches cut short because a
    bar's observation or mask differed from the one assumed), ``answered`` (bars answered)."""

    def __init__(
        self,
        policy: BatchPolicy,
        features: Any,
        portfolio_columns: Sequence[slice],
        max_bars: int,
    ) -> None:
        self.policy = policy
        self.features = features
        self.rows: np.ndarray = features.rows
        rows = self.rows
        self.columns = tuple(portfolio_columns)
        self.max_bars = 1 << (max_bars.bit_length() - 1)  # a power of two (checked sizes only)
        dim = rows.shape[1]
        self._x = np.zeros((self.max_bars, dim), dtype=np.float32)
        self._m = np.zeros((self.max_bars, N_ACTIONS), dtype=np.bool_)
        self._start = 0  # row of the stretch's first bar
        self._n = 0  # bars of the stretch still usable (0: none)
        self._answers: Sequence[PolicyChoice] = ()
        self._mask_bytes = b""
        self._x_bytes = b""
        self._row_bytes = dim * 4  # bytes of one float32 observation
        self._state = b""  # the portfolio part and mask the stretch assumed
        self._steady = 0  # bars the portfolio part and mask have not changed for
        self._exact: bool | None = None  # checked on first use
        self.evaluations = 0
        self.reevaluations = 0
        self.answered = 0

    def act(self, o: Observed) -> PolicyChoice:
        """The policy's answer for the observed bar ``o`` (ready): the bar the feature source
        handed out last."""
        row = self.features.index
        k = row - self._start
        if 0 <= k < self._n:
            w = self._row_bytes
            if o.mask.tobytes() == self._mask_bytes and o.obs.tobytes() == self._x_bytes[k * w : k * w + w]:
                self.answered += 1
                return self._answers[k]
            self.reevaluations += 1
        if self._exact is None:
            self._exact = self.policy.batch_exact(self.max_bars)
        if not self._exact:
            self.answered += 1
            return self.policy.act(o)
        state = self._state_of(o)
        if state == self._state and 0 < k <= self._n:
            self._steady += k  # the stretch ran out with every bar as assumed
        else:
            self._steady = 0
        self._state = state
        return self._evaluate(o, row)

    def _state_of(self, o: Observed) -> bytes:
        return b"".join(o.obs[c].tobytes() for c in self.columns) + o.mask.tobytes()

    def _evaluate(self, o: Observed, row: int) -> PolicyChoice:
        self.answered += 1
        self.evaluations += 1
        size = 1
        while size <= self._steady and size < self.max_bars:
            size *= 2
        if size == 1:  # the policy's own single-bar path: cheaper than a batch of one
            self._answers = [self.policy.act(o)]
            self._start, self._n = row, 1
            self._mask_bytes, self._x_bytes = o.mask.tobytes(), o.obs.tobytes()
            return self._answers[0]
        n = min(size, len(self.rows) - row)
        x, m = self._x[:size], self._m[:size]
        x[:n] = self.rows[row : row + n]
        if n < size:  # past the last bar: repeat it (answers unused), so only checked sizes run
            x[n:] = x[n - 1]
        for c in self.columns:
            x[:, c] = o.obs[c]
        m[:] = o.mask
        if o.obs.tobytes() != x[0].tobytes():  # not the rows this bar was observed from
            self._n = 0
            return self.policy.act(o)
        self._answers = self.policy.act_batch(x, m)
        self._start, self._n = row, n
        self._mask_bytes = o.mask.tobytes()
        self._x_bytes = x[:n].tobytes()  # the rows assumed, compared with each bar's observation
        return self._answers[0]


def look_ahead(policy: Policy, features: Any, max_bars: int) -> LookAhead | None:
    """A :class:`LookAhead` where it can serve: ``max_bars`` > 0, a policy that evaluates batches
    (``act_batch`` and ``batch_exact``), and a feature source with every row precomputed
    (``BulkFeatures``); else None (the policy acts bar by bar)."""
    rows = getattr(features, "rows", None)
    if (
        max_bars <= 0
        or not isinstance(policy, BatchPolicy)
        or not isinstance(rows, np.ndarray)
        or rows.ndim != 2
        or rows.dtype != np.float32
        or not isinstance(getattr(features, "index", None), int)
    ):
        return None
    layout = features.layout
    return LookAhead(policy, features, (layout.account, layout.risk_context), max_bars)
