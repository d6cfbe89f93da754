"""A gymnasium environment made of the engine's own parts.

One episode is one trading session. The environment does not re-implement anything: it loads bars
with the replay feed's loader, computes observations with the same bulk feature builder, and drives
an :class:`~trader.engine.Engine` (action mask, fusion, risk rules, execution planner, paper broker,
portfolio) through its two halves, ``observe`` and ``decide``, with the agent's action in between.
An agent's action therefore has exactly the consequences the policy's choice has in ``trader replay``.

Reward (per step, in units of ``RewardConfig.scale_usd``)::

    r_t = (E_t − E_{t−1}) / scale − drawdown_penalty · max(0, D_t − D_{t−1}) / scale
          − breach_penalty · [trailing drawdown breached at t]

``E`` is marked equity (balance + unrealized P&L), so commission and slippage are in it: the paper
broker books both at each fill. ``D`` is the episode's drawdown, peak equity minus equity. A step
runs from one decision to the next, so ``E_t`` is marked at the close of the bar after the action,
when its order has filled at that bar's open.

Bars where the action cannot matter (flat outside the entry window: the risk engine turns every
entry into HOLD there and nothing else is legal) are played with HOLD automatically and their
reward is added to the next step (``skip_idle``), so the agent spends its steps where it can act.
Each episode starts with a fresh account (``account.starting_balance_usd``); it ends at the end of
the session, at the end of the data, or when the trailing drawdown is breached.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from trader.config import Settings
from trader.decision.risk import load_rules
from trader.domain import N_ACTIONS, ComponentHealth, Observed, PolicyChoice
from trader.engine import Engine, NullJournal
from trader.features.observation import BulkFeatures, load_feature_blocks
from trader.features.warmup import warmup_bars
from trader.feeds.replay import RecordedBars, load_bars
from trader.ports import Batch, JournalSink
from trader.wiring import build_training_engine


@dataclass(frozen=True)
class RewardConfig:
    scale_usd: float = 100.0  # 1.0 reward = $100 of equity
    drawdown_penalty: float = 0.5  # extra weight on every new dollar of drawdown from the episode peak
    breach_penalty: float = 10.0  # once, when the trailing drawdown is breached (the account is done)


class _ScriptedPolicy:
    """Engine.policy is unused here: the environment calls observe/decide itself."""

    name = "agent"

    def act(self, o: Observed) -> PolicyChoice:
        raise RuntimeError("the training environment supplies actions through step()")


class TradingEnv(gym.Env[np.ndarray, np.int64]):
    """Sessions of recorded bars as episodes. ``action_masks()`` gives the legal actions."""

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        settings: Settings,
        *,
        data_paths: list[Path] | None = None,
        episode_from: str | None = None,
        episode_to: str | None = None,
        reward: RewardConfig | None = None,
        skip_idle: bool = True,
        shuffle: bool = True,
        journal: JournalSink | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.reward_cfg = reward or RewardConfig()
        self.skip_idle = skip_idle
        self.shuffle = shuffle
        self.journal = journal or NullJournal()
        recorded = load_bars(
            settings.data,
            data_paths,
            tick_size=settings.instrument.tick_size,
            symbol=settings.instrument.symbol,
        )
        accepted = recorded.accepted()
        self.bars = _subset(recorded, accepted)
        cols = {k: getattr(self.bars, k) for k in ("ts_ns", "open", "high", "low", "close", "volume")}
        self.blocks = load_feature_blocks(settings.features.custom_blocks)
        self.features = BulkFeatures(settings, cols, self.blocks)
        self.warmup = warmup_bars(settings, self.blocks)
        self.layout = self.features.layout
        self.clock = self.features.clock
        self.rules = load_rules(settings.risk.rules, settings.risk.rule_options, settings)
        self.sessions = self._episodes(episode_from, episode_to)
        if not self.sessions:
            raise ValueError(
                f"no trading session with ready bars between {episode_from or 'the start'} and "
                f"{episode_to or 'the end'} (warm-up takes {self.warmup} bars)"
            )
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.layout.dim,), np.float32)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self._loop = asyncio.new_event_loop()
        self._order: list[int] = []
        self._episode = -1
        self.engine: Engine | None = None
        self._o: Observed | None = None  # the bar awaiting the agent's action
        self._row = 0
        self._end = 0
        self._peak = 0.0
        self._dd = 0.0
        self._equity = 0.0
        self.run_id = ""

    # -- episodes ---------------------------------------------------------------------------------
    def _episodes(self, start: str | None, end: str | None) -> list[tuple[int, int]]:
        """(first decision row, end row exclusive) of every session in [start, end) with ready bars."""
        from trader.feeds.replay import bound_ns

        ts = self.bars.ts_ns
        lo = bound_ns(start, self.settings.data.timezone)
        hi = bound_ns(end, self.settings.data.timezone)
        sess = self.clock.session_id_batch(ts)
        ready = self.features.ready_col.copy()
        ready[: self.warmup] = False
        if lo is not None:
            ready &= ts >= lo
        if hi is not None:
            ready &= ts < hi
        minute = (self.clock.local_s_batch(ts) // 60) % 1440
        tradable = self.clock.in_entry_window_batch(minute)
        out = []
        for sid in np.unique(sess):
            in_sess = (sess == sid) & ready
            rows = np.flatnonzero(in_sess)
            if len(rows) and (in_sess & tradable).any():  # a session the agent can act in
                out.append((int(rows[0]), int(rows[-1]) + 1))
        return out

    @property
    def n_episodes(self) -> int:
        return len(self.sessions)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options and "episode" in options:
            k = int(options["episode"])
        else:
            if not self._order:
                order = np.arange(len(self.sessions))
                if self.shuffle:
                    self.np_random.shuffle(order)
                self._order = order.tolist()
            k = self._order.pop(0)
        self._episode = k
        start, end = self.sessions[k]
        self._row, self._end = start, end
        s = self.settings
        self.features.seek(start)
        self.run_id = f"train-{uuid.uuid4().hex[:12]}"
        # warm-up is counted in rows of the whole file: the first bar gets index ``start``
        self.engine = build_training_engine(
            s, self.features, self.journal, self.run_id, start, _NoFeed(), _ScriptedPolicy(), self.rules
        )
        self._o = None
        self._equity = self._peak = s.account.starting_balance_usd
        self._dd = 0.0
        self._advance()  # to the first bar that needs the agent (reward before it is not the agent's)
        o = self._o
        obs = o.obs.copy() if o is not None and o.ready else np.zeros(self.layout.dim, np.float32)
        return obs, self._info()

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        eng = self.engine
        if eng is None:
            raise RuntimeError("call reset() first")
        a = int(action)
        if self._o is None or not self._o.mask[a]:
            a = 0  # an illegal action is HOLD (MaskablePPO never samples one)
        self._decide(a)  # orders fill on the next bar: equity does not move here
        reward = 0.0
        breached = self._breached()
        done = breached or self._row >= self._end
        if not done:
            reward = self._advance()
            breached = self._breached()
            done = breached or self._row >= self._end
        if breached:
            reward -= self.reward_cfg.breach_penalty
        assert self._o is not None
        obs = self._o.obs.copy()
        return obs, reward, done, False, self._info()

    def action_masks(self) -> np.ndarray:
        if self._o is None:
            return np.ones(N_ACTIONS, dtype=bool)
        return self._o.mask.copy()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.close()

    # -- internals --------------------------------------------------------------------------------
    def _decide(self, a: int) -> None:
        eng, o = self.engine, self._o
        assert eng is not None and o is not None
        self._loop.run_until_complete(eng.decide(o, PolicyChoice(a, 1.0, _one_hot(a))))

    def _observe_next(self) -> bool:
        """Observe the next row; False at the end of the episode."""
        eng = self.engine
        assert eng is not None
        if self._row >= self._end:
            return False
        self._o = eng.observe(self.bars.bar(self._row))
        self._row += 1
        assert self._o is not None, "rows were pre-validated"
        return True

    def _idle(self) -> bool:
        eng, o = self.engine, self._o
        assert eng is not None and o is not None
        if not o.ready:
            return True
        return (
            self.skip_idle and eng.portfolio.position == 0 and not self.clock.in_entry_window(o.minute_of_day)
        )

    def _advance(self) -> float:
        """Observe rows until one needs the agent (HOLD on idle ones); returns their reward."""
        total = 0.0
        while self._observe_next():
            total += self._reward()
            if self._breached() or not self._idle():
                break
            self._decide(0)
        return total

    def _reward(self) -> float:
        eng = self.engine
        assert eng is not None
        pf = eng.portfolio
        equity = pf.balance_usd + pf.unrealized_usd
        self._peak = max(self._peak, equity)
        dd = self._peak - equity
        cfg = self.reward_cfg
        r = (equity - self._equity) / cfg.scale_usd - cfg.drawdown_penalty * max(
            0.0, dd - self._dd
        ) / cfg.scale_usd
        self._equity, self._dd = equity, dd
        return r

    def _breached(self) -> bool:
        eng = self.engine
        assert eng is not None
        pf = eng.portfolio
        return pf.balance_usd + pf.unrealized_usd <= pf.threshold_usd

    def _info(self) -> dict[str, Any]:
        eng = self.engine
        assert eng is not None
        pf = eng.portfolio
        return {
            "session": self._episode,
            "bar_index": -1 if self._o is None else self._o.bar_index,
            "ts_ns": -1 if self._o is None else self._o.bar.ts_ns,
            "equity": pf.balance_usd + pf.unrealized_usd,
            "position": pf.position,
        }


class _NoFeed:
    total_bars: int | None = None

    async def batches(self) -> AsyncGenerator[Batch, None]:
        return
        yield

    def origin(self, row: int) -> str:
        return f"row {row}"

    def resume_after(self, last_ts_ns: int, next_row: int) -> None:
        return None

    def health(self) -> ComponentHealth:
        return ComponentHealth("training", True)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _one_hot(a: int) -> list[float]:
    p = [0.0] * N_ACTIONS
    p[a] = 1.0
    return p


def _subset(rb: RecordedBars, keep: np.ndarray) -> RecordedBars:
    return RecordedBars(
        ts_ns=rb.ts_ns[keep],
        open=rb.open[keep],
        high=rb.high[keep],
        low=rb.low[keep],
        close=rb.close[keep],
        volume=rb.volume[keep],
        origin_file=rb.origin_file[keep],
        origin_line=rb.origin_line[keep],
        files=rb.files,
    )
