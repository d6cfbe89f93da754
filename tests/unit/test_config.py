"""Configuration: defaults, file, environment, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trader.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_default_toml_spells_out_exactly_the_embedded_defaults():
    assert load_settings(ROOT / "config" / "default.toml") == load_settings(None)


def test_example_configs_are_valid():
    assert load_settings(ROOT / "config" / "replay.toml").mode == "replay"
    assert load_settings(ROOT / "config" / "paper.toml").advisor.mode == "async"


def test_guide_defaults():
    s = load_settings(None)
    assert (s.fusion.llm_weight, s.fusion.confidence_threshold, s.fusion.cache_decay_rate) == (0.3, 0.7, 0.2)
    assert s.fusion.cache_ttl == 300.0 and s.features.use_llm_features


def test_environment_overrides_the_file_with_nested_keys(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text("[fusion]\nllm_weight = 0.4\n[risk]\nmax_contracts = 2\n")
    monkeypatch.setenv("TRADER_FUSION__LLM_WEIGHT", "0.5")
    s = load_settings(f)
    assert s.fusion.llm_weight == 0.5 and s.risk.max_contracts == 2


def test_out_of_range_value_names_key_value_and_reason(monkeypatch):
    monkeypatch.setenv("TRADER_FUSION__LLM_WEIGHT", "1.7")
    with pytest.raises(ConfigError, match=r"fusion\.llm_weight: 1\.7 is not within \[0, 1\]"):
        load_settings(None)


def test_unknown_key_and_bad_type_are_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[risk]\nmax_contract = 2\n")
    with pytest.raises(ConfigError, match=r"risk\.max_contract: unknown key"):
        load_settings(f)
    f.write_text("[instrument]\ntrade_start = '9h30'\ntimezone = 'Mars/Olympus'\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    assert "instrument.trade_start" in str(e.value) and "instrument.timezone" in str(e.value)


def test_cross_field_rules_are_checked():
    with pytest.raises(ConfigError, match=r"execution\.order_qty: 2 exceeds risk\.max_contracts"):
        load_settings(None, {"execution": {"order_qty": 2}})


def test_bad_toml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")
    f = tmp_path / "bad.toml"
    f.write_text("[fusion\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(f)


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[data]\npaths = ["bars.csv"]\n')
    assert load_settings(f).data.paths == [tmp_path / "bars.csv"]
