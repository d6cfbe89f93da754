"""Fusion rules in priority order, risk vetoes and hard limits, action masking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import flat, make_settings
from trader.decision.fusion import GuideFusion
from trader.decision.mask import ActionMasker
from trader.decision.risk import RiskContext, RiskEngine
from trader.domain import ENTRY_SIDE_ACTIONS, Action, Advice
from trader.features.clock import SessionClock

ALL = np.ones(6, dtype=bool)
S = make_settings()
FUSE = GuideFusion(S.fusion)
NOON = 12 * 60 + 5  # inside the entry window, outside lunch


def advice(action: Action, conf: float) -> Advice:
    return Advice(action, conf, "test", asked_bar=0)


def fuse(rl: Action, rc: float, adv: Advice | None, mask: np.ndarray = ALL):
    return FUSE.fuse(rl, rc, adv, mask, lambda: None)  # type: ignore[arg-type, return-value]


# -- fusion ---------------------------------------------------------------------------------------
def test_no_advice_means_rl_alone():
    d = fuse(Action.BUY, 0.55, None)
    assert (d.action, d.method) == (Action.BUY, "rl_only")


def test_advice_illegal_under_the_mask_is_ignored_even_when_confident():
    mask = ALL.copy()
    mask[Action.MOVE_TO_BE] = False
    d = fuse(Action.HOLD, 0.3, advice(Action.MOVE_TO_BE, 0.99), mask)
    assert (d.action, d.method) == (Action.HOLD, "rl_only")


def test_agreement_wins_first_even_when_both_are_unsure():
    d = fuse(Action.SELL, 0.2, advice(Action.SELL, 0.1))
    assert (d.action, d.method) == (Action.SELL, "agreement")


def test_confident_llm_overrides_unsure_rl():
    d = fuse(Action.HOLD, 0.55, advice(Action.BUY, 0.95))
    assert (d.action, d.method) == (Action.BUY, "llm_override")


def test_confident_rl_overrides_unsure_llm():
    d = fuse(Action.BUY, 0.95, advice(Action.SELL, 0.59))
    assert (d.action, d.method) == (Action.BUY, "rl_override")


def test_override_needs_the_other_side_below_low_confidence():
    d = fuse(Action.HOLD, 0.6, advice(Action.BUY, 0.95))  # 0.6 is not < 0.6
    assert d.method.startswith("weighted")


def test_both_uncertain_means_hold():
    d = fuse(Action.BUY, 0.45, advice(Action.SELL, 0.49))
    assert (d.action, d.method) == (Action.HOLD, "uncertainty_hold")


def test_override_has_priority_over_uncertainty_hold():
    # RL 0.45 < 0.5 and < 0.6, LLM 0.95 > 0.9: rule 2 applies before rule 3 could.
    assert fuse(Action.BUY, 0.45, advice(Action.SELL, 0.95)).method == "llm_override"


def test_weighted_vote_llm_needs_the_confidence_threshold():
    # w = 0.3: 0.3 * 0.69 = 0.207 > 0.7 * 0.25 = 0.175, but 0.69 < threshold 0.7 -> RL
    d = fuse(Action.BUY, 0.25, advice(Action.SELL, 0.69))
    assert (d.action, d.method) == (Action.BUY, "weighted_rl")


def test_weighted_vote_llm_wins_above_threshold_with_the_higher_score():
    d = fuse(Action.BUY, 0.28, advice(Action.SELL, 0.7))  # 0.21 > 0.196
    assert (d.action, d.method) == (Action.SELL, "weighted_llm")


def test_weighted_vote_rl_wins_with_the_higher_score():
    d = fuse(Action.BUY, 0.5, advice(Action.SELL, 0.8))  # 0.35 vs 0.24
    assert (d.action, d.method) == (Action.BUY, "weighted_rl")


conf = st.floats(0.0, 1.0, allow_nan=False)
actions = st.sampled_from(list(Action))


@given(
    rl=actions,
    rc=conf,
    la=st.one_of(st.none(), actions),
    lc=conf,
    mask_bits=st.lists(st.booleans(), min_size=6, max_size=6),
)
@hsettings(max_examples=400, deadline=None)
def test_fusion_only_ever_returns_rl_llm_or_hold_and_never_an_illegal_llm_action(rl, rc, la, lc, mask_bits):
    mask = np.array(mask_bits)
    mask[Action.HOLD] = True
    mask[rl] = True  # the policy only ever picks legal actions
    d = fuse(rl, rc, None if la is None else advice(la, lc), mask)
    assert d.action in (rl, la, Action.HOLD)
    assert mask[d.action]
    if d.action != rl and d.action != Action.HOLD:
        assert lc >= S.fusion.confidence_threshold


# -- risk -----------------------------------------------------------------------------------------
RISK = RiskEngine(S, SessionClock(S.instrument))


def ctx(minute: int = NOON) -> RiskContext:
    return RiskContext(0, minute, lambda: None)  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(
    "snap, rule",
    [
        (flat(consecutive_losses=3), "consecutive_losses"),
        (flat(recent_win_rate=0.2, recent_trades=5), "min_win_rate"),
        (flat(equity_usd=47_900.0, balance_usd=47_900.0), "drawdown_buffer"),  # room 400 < 20% of 2500
    ],
)
def test_guide_vetoes_turn_entries_into_hold(snap, rule):
    for a in (Action.BUY, Action.SELL):
        v = RISK.review(a, snap, ctx())
        assert v.action == Action.HOLD and rule in [x.rule for x in v.vetoes]


def test_win_rate_veto_waits_for_enough_trades():
    assert RISK.review(Action.BUY, flat(recent_win_rate=0.0, recent_trades=4), ctx()).action == Action.BUY


def test_enable_trail_is_entry_side_but_move_to_be_and_disable_trail_always_pass():
    long_bad = flat(position=1, avg_entry=16000.0, consecutive_losses=5, trailing=True)
    assert RISK.review(Action.ENABLE_TRAIL, long_bad, ctx()).action == Action.HOLD
    assert RISK.review(Action.MOVE_TO_BE, long_bad, ctx()).action == Action.MOVE_TO_BE
    assert RISK.review(Action.DISABLE_TRAIL, long_bad, ctx()).action == Action.DISABLE_TRAIL


def test_an_exit_is_never_blocked_by_a_veto_or_the_trading_hours():
    long_bad = flat(position=1, avg_entry=16000.0, consecutive_losses=5)
    v = RISK.review(Action.SELL, long_bad, ctx(minute=3 * 60))
    assert v.action == Action.SELL and not v.vetoes


def test_a_vetoed_reversal_still_closes_the_position():
    s = make_settings(execution={"reverse_on_opposite": True})
    engine = RiskEngine(s, SessionClock(s.instrument))
    v = engine.review(Action.SELL, flat(position=1, avg_entry=16000.0, consecutive_losses=5), ctx())
    assert v.action == Action.SELL and v.reduce_only and v.vetoes


def test_veto_switch_off_lets_guide_rules_pass_but_not_hard_limits():
    s = make_settings(risk={"enable_risk_veto": False})
    engine = RiskEngine(s, SessionClock(s.instrument))
    assert engine.review(Action.BUY, flat(consecutive_losses=9), ctx()).action == Action.BUY
    assert engine.review(Action.BUY, flat(), ctx(minute=3 * 60)).action == Action.HOLD  # trading hours


def test_entries_outside_the_trading_window_are_vetoed():
    v = RISK.review(Action.BUY, flat(), ctx(minute=9 * 60 + 29))
    assert v.action == Action.HOLD and v.vetoes[0].rule == "trading_hours"
    assert RISK.review(Action.BUY, flat(), ctx(minute=9 * 60 + 30)).action == Action.BUY


def test_max_contracts_blocks_adding_beyond_the_limit():
    v = RISK.review(Action.BUY, flat(position=1, avg_entry=16000.0), ctx())
    assert v.action == Action.HOLD and v.vetoes[0].rule == "max_contracts"


@pytest.mark.parametrize(
    "snap, minute, reason",
    [
        (flat(position=1, avg_entry=1.0, daily_pnl_usd=-1000.0), NOON, "daily_loss_limit"),
        (flat(position=-1, avg_entry=1.0, equity_usd=47_500.0), NOON, "trailing_drawdown_breached"),
        (flat(position=1, avg_entry=1.0), 15 * 60 + 55, "flatten_before_close"),
    ],
)
def test_hard_limits_flatten_and_block_entries(snap, minute, reason):
    v = RISK.review(Action.BUY, snap, ctx(minute))
    assert v.flatten and v.flatten_reason == reason and v.action == Action.HOLD


def test_kill_switch_flattens_and_blocks_everything():
    s = make_settings(risk={"kill_switch": True})
    engine = RiskEngine(s, SessionClock(s.instrument))
    v = engine.review(Action.SELL, flat(position=-1, avg_entry=1.0), ctx())
    assert v.flatten and v.flatten_reason == "kill_switch" and v.action == Action.HOLD


@given(
    rl=actions,
    rc=conf,
    la=actions,
    lc=conf,
    losses=st.integers(0, 6),
    win=st.floats(0, 1),
    trades=st.integers(0, 10),
    room=st.floats(0, 3000),
    pos=st.integers(-1, 1),
)
@hsettings(max_examples=400, deadline=None)
def test_no_fusion_outcome_bypasses_a_veto(rl, rc, la, lc, losses, win, trades, room, pos):
    snap = flat(
        position=pos,
        avg_entry=16000.0 if pos else 0.0,
        consecutive_losses=losses,
        recent_win_rate=win,
        recent_trades=trades,
        equity_usd=47_500.0 + room + 1,
        balance_usd=47_500.0 + room + 1,
    )
    d = fuse(rl, rc, advice(la, lc))
    v = RISK.review(d.action, snap, ctx())
    vetoed = losses >= 3 or (trades >= 5 and win < 0.3) or room + 1 < 500
    opens = (
        (v.action == Action.BUY and pos >= 0)
        or (v.action == Action.SELL and pos <= 0)
        or v.action == Action.ENABLE_TRAIL
    )
    if vetoed:
        assert not opens


# -- mask -----------------------------------------------------------------------------------------
def test_flat_allows_hold_buy_sell_only():
    m = ActionMasker(S).mask(flat(), 16000.0)
    assert m.tolist() == [True, True, True, False, False, False]


def test_long_at_max_cannot_buy_and_break_even_needs_profit():
    masker = ActionMasker(S)
    long_ = flat(position=1, avg_entry=16000.0)
    assert masker.mask(long_, 16001.0).tolist() == [True, False, True, False, True, False]
    assert masker.mask(long_, 16002.0)[Action.MOVE_TO_BE]  # 8 ticks = 2 points
    assert not masker.mask(dataclasses.replace(long_, at_break_even=True), 16010.0)[Action.MOVE_TO_BE]
    assert masker.mask(dataclasses.replace(long_, trailing=True), 16000.0).tolist()[4:] == [False, True]


def test_short_break_even_needs_price_below_entry():
    masker = ActionMasker(S)
    short = flat(position=-1, avg_entry=16000.0)
    assert not masker.mask(short, 16001.0)[Action.MOVE_TO_BE]
    assert masker.mask(short, 15998.0)[Action.MOVE_TO_BE]
    assert masker.mask(short, 15998.0)[Action.BUY] and not masker.mask(short, 15998.0)[Action.SELL]


def test_entry_side_actions_are_the_guides():
    assert {Action.BUY, Action.SELL, Action.ENABLE_TRAIL} == ENTRY_SIDE_ACTIONS
