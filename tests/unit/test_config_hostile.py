"""Hostile configuration (issue 11): a bad value, from the file or the environment, is a
ConfigError naming the key and where it came from; never a traceback, never a silently different run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import BaseModel

from trader.cli import main
from trader.config import Settings, load_settings
from trader.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_trader_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TRADER_"):
            monkeypatch.delenv(name)


def _toml(v: Any) -> str:
    """A TOML inline value (no None: TOML has no null)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _toml_document(values: dict[str, Any], prefix: str = "") -> str:
    """Keys first, then one [table] per nested table."""
    lines = [f"{json.dumps(k)} = {_toml(v)}\n" for k, v in values.items() if not isinstance(v, dict)]
    for k, v in values.items():
        if isinstance(v, dict):
            name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
            lines.append(f"[{name}]\n{_toml_document(v, name)}")
    return "".join(lines)


def _toml_file(path: Path, key: str, value: Any) -> None:
    *section, leaf = key.split(".")
    head = f"[{'.'.join(section)}]\n" if section else ""
    path.write_text(f"{head}{leaf} = {_toml(value)}\n")


def _env_name(key: str) -> str:
    return "TRADER_" + key.replace(".", "__").upper()


def _refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str, key: str, value: Any) -> str:
    """Set ``key`` to ``value`` through the file (a TOML value) or the environment (a string), load,
    and return the ConfigError's message, checked to name the key and its source."""
    f = tmp_path / "c.toml"
    f.write_text("")
    if route == "file":
        _toml_file(f, key, value)
        source = str(f)
    else:
        source = _env_name(key)
        monkeypatch.setenv(source, value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    msg = str(e.value)
    assert key in msg and source in msg, msg
    return msg


def _loads(tmp_path: Path, toml: str) -> Settings:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    return load_settings(f)


def _refused(tmp_path: Path, toml: str) -> str:
    with pytest.raises(ConfigError) as e:
        _loads(tmp_path, toml)
    return str(e.value)


# -- 1. NaN and infinity -------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["file", "env"])
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("account.trailing_lock_offset_usd", "nan"),
        ("instrument.commission_per_side_usd", "nan"),
        ("instrument.tick_size", "inf"),
        ("account.starting_balance_usd", "inf"),
        ("risk.daily_loss_limit_usd", "inf"),
        ("llm_model.temperature", "nan"),
        ("fusion.llm_weight", "nan"),
        ("execution.stop_atr_mult", "-inf"),
        ("advisor.query_timeout_s", "nan"),
        ("tradovate.max_requests_per_s", "nan"),
        ("data.speed", "inf"),
        # neighbours: finite but absurd money, times and multiples
        ("account.starting_balance_usd", "1e300"),
        ("service.stop_timeout_s", "1e12"),
        ("llm_model.temperature", "50.0"),
        ("execution.trail_atr_mult", "1e9"),
    ],
)
def test_nan_and_inf_are_refused_naming_the_field(tmp_path, monkeypatch, route, key, value):
    number = float(value)
    _refusal(tmp_path, monkeypatch, route, key, number if route == "file" else value)


@pytest.mark.parametrize("route", ["file", "env"])
def test_nan_in_plugin_options_is_refused_naming_the_option(tmp_path, monkeypatch, route):
    msg = _refusal(tmp_path, monkeypatch, route, "fusion.strategy_options", {"band": {"width": math.nan}})
    assert "band.width" in msg


# -- 2. booleans are not numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "key", "value"),
    [
        ("file", "execution.order_qty", True),
        ("env", "execution.order_qty", "true"),
        ("file", "risk.max_contracts", True),
        ("file", "instrument.tick_size", True),
        ("file", "fusion.llm_weight", False),
        ("file", "data.columns.open", True),
        ("file", "cpu.bar_loop_cores", [True]),
        ("file", "instrument.slippage_ticks", False),
        ("env", "execution", {"order_qty": True}),  # JSON in the environment carries real booleans
    ],
)
def test_booleans_are_refused_where_a_number_is_meant(tmp_path, monkeypatch, route, key, value):
    _refusal(tmp_path, monkeypatch, route, key, value)


# -- 3. size vs account ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        # 100000 x ((40 + 1) ticks x 5 USD + 2 x 2.25 USD) against a 2,500 USD trailing drawdown
        (
            "[risk]\nmax_contracts = 100000\n[execution]\norder_qty = 100000\n",
            ["execution.order_qty", "100000", "20,950,000.00", "2,500.00"],
        ),
        ("[risk]\nmax_contracts = 12\n", ["risk.max_contracts", "12", "2,514.00", "2,500.00"]),
        ("[risk]\nmax_contracts = 11\n", None),  # 11 x 209.50 = 2,304.50: below the drawdown, accepted
        ("[execution]\nstop_ticks = 1000\nstop_mode = 'ticks'\n", ["execution.order_qty", "5,009.50"]),
        ("[instrument]\npoint_value_usd = 2000.0\n", ["execution.order_qty", "500.00 USD a tick"]),
        ("[account]\ntrailing_drawdown_usd = 200.0\n", ["execution.order_qty", "209.50", "200.00"]),
        (
            "[account]\ntrailing_drawdown_usd = 60000.0\n",
            ["account.trailing_drawdown_usd", "60,000.00", "account.starting_balance_usd", "50,000.00"],
        ),
    ],
)
def test_an_order_whose_one_stop_loss_reaches_the_drawdown_is_refused_with_the_numbers(tmp_path, toml, named):
    if named is None:
        assert _loads(tmp_path, toml).risk.max_contracts == 11
        return
    msg = _refused(tmp_path, toml)
    for text in named:
        assert text in msg, msg


# -- 4. trading hours --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('trade_start = "16:00"', ["instrument.trade_start", "16:00", "instrument.trade_end", "15:45"]),
        ('trade_start = "15:45"', ["instrument.trade_start", "15:45", "instrument.trade_end"]),
        ('flatten_at = "15:00"', ["instrument.flatten_at", "15:00", "instrument.trade_end", "15:45"]),
        ('flatten_at = "17:30"', ["instrument.flatten_at", "17:30", "instrument.session_close", "17:00"]),
        ('flatten_at = "17:00"', None),  # at the close: the session ends first, nothing is flattened
        (  # entries while the exchange is closed (between the close at 17:00 and the open at 18:00)
            'trade_start = "17:10"\ntrade_end = "17:40"\nflatten_at = "17:50"',
            ["instrument.trade_start", "17:10", "instrument.session_open", "18:00"],
        ),
        (  # an overnight window inside the session that opens at 18:00: accepted
            'trade_start = "19:00"\ntrade_end = "23:00"\nflatten_at = "23:30"',
            None,
        ),
        ('trade_start = "02:00"\ntrade_end = "04:00"\nflatten_at = "05:00"', None),
    ],
)
def test_trading_hours_out_of_order_are_refused_naming_both_values(tmp_path, monkeypatch, toml, named):
    if named is None:
        i = _loads(tmp_path, "[instrument]\n" + toml).instrument
        assert i.trade_start in toml or i.flatten_at in toml
        return
    msg = _refused(tmp_path, "[instrument]\n" + toml)
    for text in named:
        assert text in msg, msg


def test_trading_hours_from_the_environment_are_checked_too(tmp_path, monkeypatch):
    monkeypatch.setenv("TRADER_INSTRUMENT__TRADE_START", "16:00")
    with pytest.raises(
        ConfigError, match=r"instrument\.trade_start: 16:00 .*instrument\.trade_end \(15:45\)"
    ):
        load_settings(None)


# -- 5. separators, plug-in paths, environment values ---------------------------------------------


@pytest.mark.parametrize(
    ("route", "key", "value", "named"),
    [
        ("file", "data.separator", "", "''"),
        ("env", "data.separator", "", "''"),
        ("file", "data.separator", ";;", "';;'"),
        ("file", "data.separator", "\n", "'\\n'"),
        ("file", "policy.path", "nope_module:Policy", "nope_module"),
        ("env", "policy.path", "strategies.rules:Nope", "Nope"),
        ("file", "fusion.strategy", "strategies.fusion:Nope", "Nope"),
        ("file", "risk.rules", ["strategies.nope:Rule"], "strategies.nope"),
        ("file", "features.custom_blocks", ["nope.blocks:Block"], "nope.blocks"),
        ("file", "risk.rules", [":"], "':'"),
        ("file", "risk.rules", [".:x"], "'.:x'"),  # a relative import: TypeError inside importlib
        ("env", "risk", "notjson", "not JSON"),
        ("env", "risk.rules", "a:b", "not JSON"),
        ("env", "advisor.ensemble", "x", "not JSON"),
        ("env", "risk.rule_options.x", "1", "valid dictionary"),
        ("env", "data.columns", "[", "not JSON"),
        ("file", "data.start", "garbage", "'garbage'"),
        ("env", "data.end", "2023-13-45", "'2023-13-45'"),
    ],
)
def test_bad_separator_plugin_path_or_environment_value_is_named(
    tmp_path, monkeypatch, route, key, value, named
):
    msg = _refusal(tmp_path, monkeypatch, route, key, value)
    assert named in msg, msg


def test_settings_arguments_are_not_config_keys_and_dates_are_ordered(tmp_path):
    assert "_env_prefix: unknown key" in _refused(tmp_path, '_env_prefix = "X_"\n')
    assert "_secrets_dir: unknown key" in _refused(tmp_path, '_secrets_dir = "/etc"\n')
    msg = _refused(tmp_path, '[data]\nstart = "2023-11-30T10:00:00"\nend = "2023-11-29"\n')
    assert "data.start: 2023-11-30T10:00:00 must be before data.end (2023-11-29)" in msg


# -- 6. columns --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "key", "value"),
    [
        ("file", "data.columns.timestamp", -1),
        ("env", "data.columns.open", "-1"),
        ("file", "data.columns.close", ""),
        ("file", "data.columns.volume", "   "),
        ("env", "data.columns.high", ""),
        ("file", "data.columns.low", -(2**40)),
    ],
)
def test_column_positions_are_non_negative_and_names_non_blank(tmp_path, monkeypatch, route, key, value):
    _refusal(tmp_path, monkeypatch, route, key, value)
    monkeypatch.delenv(_env_name(key), raising=False)
    assert (
        _loads(tmp_path, "[data.columns]\ntimestamp = 0\nopen = 'Open Price'\n").data.columns.timestamp == 0
    )


# -- 7. prompt templates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("{balance.real.nope}", "{balance.real.nope}"),
        ("{balance.__class__.__mro__}", "{balance.__class__.__mro__}"),
        ("{market_name[0]}", "{market_name[0]}"),
        ("{nope}", "unknown placeholder {nope}"),
        ("x {}", "positional placeholder"),
        ("{0}", "positional placeholder"),
        ("{adx:.2q}", "{adx:.2q}"),
        ("{entry_price:.2f}", "{entry_price:.2f}"),  # a string in the advisor's context
        ("{adx!z}", "{adx!z}"),
        ("{adx:>{market_name}}", "{adx:>NQ}"),  # a nested spec, rendered
        ("{adx:99999}", "99999"),  # a 100 kB prompt
        ("{adx:.100000f}", "100000"),
        ("{", "not a valid format template"),
    ],
)
@pytest.mark.parametrize(("route", "key"), [("file", "prompts.system"), ("env", "prompts.context_template")])
def test_prompt_templates_are_rendered_at_load_refusing_attribute_index_and_unknown_names(
    tmp_path, monkeypatch, template, named, route, key
):
    msg = _refusal(tmp_path, monkeypatch, route, key, template)
    assert named in msg, msg


def test_a_plain_template_with_conversions_and_escapes_loads(tmp_path):
    s = _loads(tmp_path, '[prompts]\nsystem = "{{x}} {adx!r:>10} {win_rate:.0%} {consecutive_losses:d}"\n')
    assert s.prompts.system.startswith("{{x}}")


# -- 8. secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "variable"),
    [
        (
            '[advisor.openai]\napi_key = "sk-SECRET"\n',
            "advisor.openai.api_key",
            "TRADER_ADVISOR__OPENAI__API_KEY",
        ),
        ('[tradovate]\npassword = "sk-SECRET"\n', "tradovate.password", "TRADER_TRADOVATE__PASSWORD"),
        ('[tradovate]\nsec = "sk-SECRET"\n', "tradovate.sec", "TRADER_TRADOVATE__SEC"),
        (
            '[advisor]\nensemble = [{backend = "openai", openai = {api_key = "sk-SECRET"}}]\n',
            "advisor.ensemble.0.openai.api_key",
            "TRADER_ADVISOR__ENSEMBLE",
        ),
    ],
)
def test_secrets_in_a_file_are_refused_naming_the_environment_variable(tmp_path, toml, key, variable):
    msg = _refused(tmp_path, toml)
    assert key in msg and variable in msg and str(tmp_path / "c.toml") in msg
    assert "sk-SECRET" not in msg


def test_secrets_from_the_environment_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("TRADER_ADVISOR__OPENAI__API_KEY", "sk-SECRET")
    key = _loads(tmp_path, "").advisor.openai.api_key
    assert key is not None and key.get_secret_value() == "sk-SECRET"


# -- the CLI: exit 2, the message, no traceback ----------------------------------------------------


def test_the_cli_reports_a_hostile_config_with_exit_2_and_no_traceback(tmp_path, monkeypatch, capsys):
    f = tmp_path / "c.toml"
    f.write_text("[execution]\norder_qty = true\n")
    monkeypatch.setenv("TRADER_RISK__RULES", "a:b")
    assert main(["check-config", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "TRADER_RISK__RULES" in err and "Traceback" not in err


# -- property: any value, any field, any route: valid Settings or a ConfigError ---------------------


def _keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield ".".join(path)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _keys(sub, path)


KEYS = sorted(_keys(Settings))
HOSTILE = st.sampled_from(
    [
        *(math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, True, False, None, 2**70, -1, 0),
        *("", "nan", "inf", "true", "-1", "09:30", "{", "{adx.real}", "{0}", "a:b", ".:x", "\x00", "[", "{}"),
    ]
)
SCALARS = st.one_of(
    HOSTILE,
    HOSTILE,  # twice: most examples carry a value the loader must refuse, or accept exactly
    st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=6,
)


def _has(v: Any, kind: Any) -> bool:
    if isinstance(v, list):
        return any(_has(x, kind) for x in v)
    if isinstance(v, dict):
        return any(_has(x, kind) for x in v.values())
    return kind(v)


def _env_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    return json.dumps(v)


def _finite_everywhere(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_finite_everywhere(x) for x in v)
    if isinstance(v, dict):
        return all(_finite_everywhere(x) for x in v.values())
    return True


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    assignments=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3),
    route=st.sampled_from(["file", "env", "overrides"]),
)
def test_any_value_in_any_field_loads_or_is_a_config_error(tmp_path, assignments, route):
    """Random values (NaN, infinities, huge numbers, booleans, strings, None, nested tables) for
    one to three keys of Settings, through the file, the environment or the overrides: either
    valid Settings (every float finite) or a ConfigError with a message, never another exception."""
    f = tmp_path / "c.toml"
    f.write_text("")
    values = [v for _, v in assignments]
    if route == "file" and _has(values, lambda x: x is None):
        route = "overrides"  # TOML has no null
    if route == "env" and _has(values, lambda x: isinstance(x, str) and "\x00" in x):
        route = "overrides"  # no NUL in an environment variable
    env: dict[str, str] = {}
    nested: dict[str, Any] = {}
    for key, value in assignments:
        if route == "env":
            env[_env_name(key)] = _env_text(value)
            continue
        node = nested
        *section, leaf = key.split(".")
        for part in section:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    overrides: dict[str, Any] = {}
    if route == "file":
        f.write_text(_toml_document(nested))
    elif route == "overrides":
        overrides = nested
    with mock.patch.dict(os.environ, env):
        try:
            s = load_settings(f, overrides)
        except ConfigError as exc:
            assert str(exc).strip()
            return
    assert isinstance(s, Settings)
    assert _finite_everywhere(s.model_dump(mode="python"))


def test_a_policy_file_that_does_not_exist_yet_loads_and_is_refused_where_it_is_used(tmp_path):
    """scripts/train_policy writes the file a config names: the config loads; the run refuses it."""
    from trader.errors import PolicyError
    from trader.features.layout import build_layout
    from trader.policy import build_policy

    s = _loads(tmp_path, f'[policy]\npath = "{tmp_path / "later.onnx"}"\n')
    with pytest.raises(PolicyError, match="policy file not found"):
        build_policy(s, build_layout(True))
