"""The example plug-ins in strategies/, loaded the way config loads them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import flat, make_settings
from trader.decision.fusion import build_fusion
from trader.decision.risk import RiskContext, RiskEngine, load_rules
from trader.domain import Action, Advice
from trader.features.clock import SessionClock
from trader.features.observation import MarketContext

ALL = np.ones(6, dtype=bool)


def market(**kw) -> MarketContext:
    base = dict(
        ts_ns=0,
        close=16000.0,
        atr=10.0,
        adx=30.0,
        plus_di=30.0,
        minus_di=10.0,
        rsi=55.0,
        macd=1.0,
        vwap=15990.0,
        vwap_distance_atr=1.0,
        momentum_pct=0.1,
        support=15950.0,
        resistance=16050.0,
        volatility_regime=1.0,
        minute_of_day=600,
    )
    base.update(kw)
    return MarketContext(**base)


def regime_fusion(**options):
    s = make_settings(fusion={"strategy": "strategies.fusion:RegimeAwareFusion", "strategy_options": options})
    return build_fusion(s.fusion, s.fusion.strategy_options)


def test_regime_fusion_gives_the_llm_more_weight_in_a_ranging_market():
    f = regime_fusion(ranging_llm_weight=0.6)
    adv = Advice(Action.SELL, 0.75, "x", 0)
    trending = f.fuse(Action.BUY, 0.5, adv, ALL, lambda: market(adx=35.0))
    ranging = f.fuse(Action.BUY, 0.5, adv, ALL, lambda: market(adx=15.0))
    assert trending.action == Action.BUY and trending.method == "trending_weighted_rl"
    assert ranging.action == Action.SELL and ranging.method == "ranging_weighted_llm"


def test_regime_fusion_holds_in_high_volatility_unless_both_agree():
    f = regime_fusion()
    hot = lambda: market(volatility_regime=2.5)  # noqa: E731
    assert f.fuse(Action.BUY, 0.95, Advice(Action.SELL, 0.2, "x", 0), ALL, hot).action == Action.HOLD
    assert f.fuse(Action.BUY, 0.6, Advice(Action.BUY, 0.6, "x", 0), ALL, hot).action == Action.BUY


def test_regime_fusion_rejects_a_bad_option():
    with pytest.raises(ValueError, match=r"ranging_llm_weight: 1\.5 is not within"):
        regime_fusion(ranging_llm_weight=1.5)


def engine_with(rules: list[str], options: dict) -> RiskEngine:
    s = make_settings(risk={"rules": rules, "rule_options": options})
    return RiskEngine(s, SessionClock(s.instrument), load_rules(s.risk.rules, s.risk.rule_options, s))


def test_lunch_block_blocks_entries_between_noon_and_one():
    eng = engine_with(["strategies.risk_rules:LunchBlock"], {})
    lunch = RiskContext(0, 12 * 60 + 30, lambda: market())
    after = RiskContext(0, 13 * 60, lambda: market())
    v = eng.review(Action.BUY, flat(), lunch)
    assert v.action == Action.HOLD and v.vetoes[0].rule == "lunch_block"
    assert eng.review(Action.BUY, flat(), after).action == Action.BUY
    exit_ = eng.review(Action.SELL, flat(position=1, avg_entry=1.0), lunch)
    assert exit_.action == Action.SELL  # an exit passes


def test_high_vix_uses_the_last_value_at_or_before_the_bar(tmp_path):
    f = tmp_path / "vix.csv"
    f.write_text("timestamp,vix\n2023-11-28 09:30:00,18.0\n2023-11-28 10:00:00,35.0\n")
    eng = engine_with(
        ["strategies.risk_rules:HighVix"],
        {"strategies.risk_rules:HighVix": {"file": str(f), "threshold": 30.0}},
    )
    rule = eng.extra_rules[0]
    t0930 = rule.ts[0]
    minute = 60_000_000_000
    calm = RiskContext(t0930 + 29 * minute, 10 * 60, lambda: market())
    fear = RiskContext(t0930 + 30 * minute, 10 * 60, lambda: market())
    assert eng.review(Action.BUY, flat(), calm).action == Action.BUY
    v = eng.review(Action.BUY, flat(), fear)
    assert v.action == Action.HOLD and "VIX 35.00 > 30.0" in v.vetoes[0].reason


def test_high_vix_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"high_vix\.file"):
        engine_with(
            ["strategies.risk_rules:HighVix"],
            {"strategies.risk_rules:HighVix": {"file": str(tmp_path / "none.csv")}},
        )


def test_support_resistance_rule_blocks_buying_under_resistance_and_selling_over_support():
    eng = engine_with(["strategies.risk_rules:NearSupportResistance"], {})
    near_res = RiskContext(0, 600, lambda: market(close=16046.0))  # 0.4 ATR under 16050
    near_sup = RiskContext(0, 600, lambda: market(close=15953.0))
    assert eng.review(Action.BUY, flat(), near_res).vetoes[0].rule == "near_support_resistance"
    assert eng.review(Action.SELL, flat(), near_res).action == Action.SELL
    assert eng.review(Action.SELL, flat(), near_sup).action == Action.HOLD


def test_a_plugin_path_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match=r"cannot import 'strategies\.nope'"):
        engine_with(["strategies.nope:Rule"], {})
