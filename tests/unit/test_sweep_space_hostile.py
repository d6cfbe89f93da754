"""Sweep spaces that would silently run something other than the file says: refused at start,
naming the space file and the parameter, before anything is written."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from tests.unit.test_sweep_space import SWEEP_OVERRIDES, space_file
from trader.errors import ConfigError
from trader.research.space import grid_points, load_space, merge, nested, random_points, validate_space
from trader.research.sweep import (
    SweepError,
    SweepPaths,
    SweepRequest,
    _check_setup,
    _plan,
    _write_setup,
    run_sweep,
    settings_environment,
)


def refused(tmp_path: Path, text: str, *, validate: bool = True) -> str:
    """The error a space is refused with (by load_space, else by validate_space), checked to name
    the space file."""
    path = space_file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        space = load_space(path)
        if validate:
            validate_space(space, None, SWEEP_OVERRIDES)
    message = str(err.value)
    assert f"sweep space {path}" in message
    return message


@pytest.fixture
def no_trader_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("TRADER_"):
            monkeypatch.delenv(name)
    return monkeypatch


# 1. wide int ranges


def test_an_int_range_wider_than_memory_is_checked_and_sized_without_listing_it(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, '[params."tradovate.cid"]\nint = [0, 9007199254740992]\n'))
    validate_space(space, None, SWEEP_OVERRIDES)  # both ends, exact (2**53 is no float round-off)
    values = space.params["tradovate.cid"].finite_values()
    assert values is not None and len(values) == 2**53 + 1
    with pytest.raises(ConfigError, match=r"the grid has 9,007,199,254,740,993 points"):
        grid_points(space)
    assert all(0 <= p["tradovate.cid"] <= 2**53 for p in random_points(space, 5, 0))


def test_a_two_billion_wide_int_range_out_of_the_keys_bounds_fails_naming_its_high_end(
    tmp_path: Path,
) -> None:
    message = refused(tmp_path, '[params."risk.max_consecutive_losses"]\nint = [1, 2000000000]\n')
    assert 'params."risk.max_consecutive_losses" = 2000000000' in message


# 2. values of another type than their key's, and spellings of one value


@pytest.mark.parametrize(
    ("key", "listed", "named"),
    [
        ("risk.max_consecutive_losses", '[2, 2.0, "2"]', "2.0 is a decimal number"),
        ("risk.max_consecutive_losses", '[2, "3"]', "'3' is text"),
        ("fusion.llm_weight", '[0.1, "0.1", "0.10"]', "'0.1' is text"),
        ("risk.enable_risk_veto", "[true, 0]", "0 is a whole number"),
    ],
)
def test_a_listed_value_of_another_type_than_its_key_is_refused_naming_it(
    tmp_path: Path, key: str, listed: str, named: str
) -> None:
    message = refused(tmp_path, f'[params."{key}"]\ngrid = {listed}\n')
    assert f'params."{key}".grid' in message and named in message


def test_two_values_the_configuration_reads_as_one_are_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, '[params."fusion.llm_weight"]\ngrid = [0.5, 1, 1.0]\n')
    assert "1 and 1.0 are the same value of fusion.llm_weight" in message
    # a section: {} leaves llm_weight at its default, 0.3
    message = refused(tmp_path, "[params.fusion]\nchoice = [{llm_weight = 0.3}, {}]\n")
    assert 'params."fusion".choice' in message and "same value of fusion" in message


def test_whole_numbers_for_a_decimal_key_are_fine(tmp_path: Path) -> None:
    path = space_file(
        tmp_path,
        '[params."fusion.llm_weight"]\ngrid = [0, 0.5, 1]\n'
        '[params."execution.stop_atr_mult"]\nint = [1, 3]\n',
    )
    space = load_space(path)
    validate_space(space, None, SWEEP_OVERRIDES)
    assert len(grid_points(space)) == 9


# 3. continuous ranges on whole-number keys


@pytest.mark.parametrize(
    ("dist", "suggested"),
    [
        ("uniform = [2.0, 5.0]", "int = [2, 5]"),
        ("loguniform = [1, 5]", "int = [1, 5]"),
        ("uniform = [1.5, 4.5]", "int = [2, 4]"),
    ],
)
def test_a_continuous_range_on_a_whole_number_key_is_refused_suggesting_int(
    tmp_path: Path, dist: str, suggested: str
) -> None:
    message = refused(tmp_path, f'[params."risk.max_consecutive_losses"]\n{dist}\n')
    assert 'params."risk.max_consecutive_losses"' in message
    assert "takes whole numbers" in message and suggested in message


# 4. keys inside other keys, and nested() / merge() leaving their inputs alone


def test_nested_does_not_change_the_values_it_is_given() -> None:
    choice = {"llm_weight": 0.5}
    got = nested({"fusion": choice, "fusion.llm_weight": 0.9})
    assert choice == {"llm_weight": 0.5}
    assert got == {"fusion": {"llm_weight": 0.9}}


def test_merge_does_not_share_or_change_its_layers() -> None:
    first, second = {"data": {"paths": ["a"]}}, {"data": {"start": "x"}}
    got = merge(first, second)
    got["data"]["paths"].append("b")
    assert first == {"data": {"paths": ["a"]}} and second == {"data": {"start": "x"}}


@pytest.mark.parametrize(
    ("body", "where", "other"),
    [
        (
            '[params.fusion]\nchoice = [{llm_weight = 0.5}]\n[params."fusion.llm_weight"]\ngrid = [0.1]\n',
            'params."fusion.llm_weight"',
            'params."fusion"',
        ),
        (
            '[params.fusion]\nchoice = [{llm_weight = 0.5}]\n[base]\n"fusion.llm_weight" = 0.2\n',
            'base."fusion.llm_weight"',
            'params."fusion"',
        ),
        (
            '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base]\nfusion = {}\n',
            'base."fusion"',
            'params."fusion.llm_weight"',
        ),
    ],
)
def test_a_key_inside_another_among_parameters_and_base_is_refused(
    tmp_path: Path, body: str, where: str, other: str
) -> None:
    message = refused(tmp_path, body, validate=False)
    assert f"{where}: overlaps {other}" in message


# 5. one key written twice


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (
            '[params."fusion.llm_weight"]\ngrid = [0.1]\n[params.fusion.llm_weight]\ngrid = [0.9]\n',
            'params."fusion.llm_weight"',
        ),
        (
            '[params."risk.max_contracts"]\ngrid = [1]\n[base]\n"fusion.llm_weight" = 0.1\n'
            "fusion.llm_weight = 0.9\n",
            'base."fusion.llm_weight"',
        ),
        (
            '[params."risk.max_contracts"]\ngrid = [1]\n[base]\n"fusion.llm_weight" = 0.1\n'
            "[base.fusion]\nllm_weight = 0.9\n",
            'base."fusion.llm_weight"',
        ),
    ],
)
def test_a_key_given_both_quoted_and_as_tables_is_refused_naming_it(
    tmp_path: Path, body: str, where: str
) -> None:
    message = refused(tmp_path, body, validate=False)
    assert f"{where}: is given twice" in message


# 6. secrets


@pytest.mark.parametrize(
    ("body", "where", "variable"),
    [
        (
            '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base]\n"tradovate.password" = "hunter2"\n',
            'base."tradovate.password"',
            "TRADER_TRADOVATE__PASSWORD",
        ),
        (
            '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base.tradovate]\nsec = "hunter2"\n',
            'base."tradovate.sec"',
            "TRADER_TRADOVATE__SEC",
        ),
        (
            '[params."tradovate.password"]\nchoice = ["hunter2", "x"]\n',
            'params."tradovate.password"',
            "TRADER_TRADOVATE__PASSWORD",
        ),
        (
            '[params.advisor.openai]\nchoice = [{api_key = "hunter2"}]\n',
            'params."advisor.openai"',
            "TRADER_ADVISOR__OPENAI__API_KEY",
        ),
        (
            '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base]\n"notifications.urls" = ["tgram://hunter2"]\n',
            'base."notifications.urls"',
            "TRADER_NOTIFY_URLS",
        ),
    ],
)
def test_secrets_in_a_space_are_refused_as_in_a_config_file_without_echoing_them(
    tmp_path: Path, body: str, where: str, variable: str
) -> None:
    message = refused(tmp_path, body, validate=False)
    assert where in message and "do not belong in a config file" in message
    assert f"set {variable}" in message and "in the environment" in message
    assert "hunter2" not in message


# 7. journal.path


@pytest.mark.parametrize(
    "body",
    [
        '[params."journal.path"]\nchoice = ["a.sqlite", "b.sqlite"]\n',
        "[params.journal]\nchoice = [{path = 'a.sqlite'}]\n",
        '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base]\n"journal.path" = "a.sqlite"\n',
        '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base.journal]\npath = "a.sqlite"\n',
    ],
)
def test_journal_path_is_refused_since_each_trial_journals_to_its_own_file(tmp_path: Path, body: str) -> None:
    message = refused(tmp_path, body, validate=False)
    assert "journal.path cannot be set in a sweep" in message and "trials/<trial key>.sqlite" in message


def test_journal_level_may_still_be_set_in_base(tmp_path: Path) -> None:
    path = space_file(
        tmp_path, '[params."fusion.llm_weight"]\ngrid = [0.1]\n[base]\n"journal.level" = "summary"\n'
    )
    validate_space(load_space(path), None, SWEEP_OVERRIDES)


# 8. nothing written before every check


@pytest.mark.parametrize(
    "body",
    [
        '[params."execution.stop_atr_mult"]\nuniform = [1.0, 3.0]\n',  # a continuous range in a grid
        '[params."tradovate.cid"]\nint = [0, 100000]\n[params."fusion.llm_weight"]\ngrid = [0.1, 0.2]\n',
    ],
)
def test_a_space_refused_for_its_grid_leaves_no_sweep_json_behind(
    tmp_path: Path, body: str, no_trader_env: pytest.MonkeyPatch
) -> None:
    req = SweepRequest(space=space_file(tmp_path, body), root=tmp_path / "sweeps", sweep_id="s")
    with pytest.raises(ConfigError, match=r"continuous range|the grid has 200,002 points"):
        run_sweep(req, out=io.StringIO())
    assert not (tmp_path / "sweeps" / "s" / "sweep.json").exists()


# 9. TRADER_* settings in the environment


def test_trader_settings_in_the_environment_are_recorded_secrets_by_name_only(
    no_trader_env: pytest.MonkeyPatch,
) -> None:
    no_trader_env.setenv("TRADER_RISK__MAX_CONSECUTIVE_LOSSES", "9")
    no_trader_env.setenv("TRADER_TRADOVATE__PASSWORD", "hunter2")
    no_trader_env.setenv(
        "TRADER_ADVISOR__ENSEMBLE", '[{"backend": "openai", "openai": {"api_key": "hunter2"}}]'
    )
    no_trader_env.setenv("TRADER_EXECUTION", '{"stop_mode": "ticks"}')
    no_trader_env.setenv("TRADER_CONTROL_TOKEN", "hunter2")  # not a setting
    assert settings_environment() == {
        "TRADER_ADVISOR__ENSEMBLE": None,
        "TRADER_EXECUTION": '{"stop_mode": "ticks"}',
        "TRADER_RISK__MAX_CONSECUTIVE_LOSSES": "9",
        "TRADER_TRADOVATE__PASSWORD": None,
    }


def test_a_rerun_under_another_trader_environment_is_refused(
    tmp_path: Path, no_trader_env: pytest.MonkeyPatch
) -> None:
    req = SweepRequest(space=space_file(tmp_path, '[params."fusion.llm_weight"]\ngrid = [0.1]\n'))
    paths = SweepPaths(tmp_path / "s")
    first = _plan(req)
    assert "environment" not in first.setup  # as before: a sweep begun without it continues
    _write_setup(paths, first, "s")
    no_trader_env.setenv("TRADER_RISK__MAX_CONSECUTIVE_LOSSES", "9")
    no_trader_env.setenv("TRADER_TRADOVATE__PASSWORD", "hunter2")
    second = _plan(req)
    assert "hunter2" not in json.dumps(second.setup)
    with pytest.raises(SweepError, match=r"another setup \(environment differ\)"):
        _check_setup(paths, second, "s")
    _write_setup(paths, second, "s")
    _check_setup(paths, _plan(req), "s")  # the same environment again: continues
