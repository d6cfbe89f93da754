"""Sweep search spaces: parsing, validation against the configuration, points, keys, objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trader.errors import ConfigError
from trader.research.space import (
    WORST_OBJECTIVE,
    grid_points,
    load_space,
    merge,
    nested,
    objective,
    random_points,
    trial_key,
    validate_space,
)

SWEEP_OVERRIDES = {"advisor": {"mode": "off"}}


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_dotted_and_nested_parameter_tables_name_the_same_key(tmp_path: Path) -> None:
    space = load_space(
        space_file(
            tmp_path,
            '[params."fusion.llm_weight"]\ngrid = [0.1, 0.3]\n'
            "[params.risk.max_consecutive_losses]\nint = [2, 4]\n"
            '[base]\n"execution.stop_mode" = "atr"\n[base.risk]\nmax_contracts = 2\n',
        )
    )
    assert list(space.params) == ["fusion.llm_weight", "risk.max_consecutive_losses"]
    assert space.base == {"execution.stop_mode": "atr", "risk.max_contracts": 2}


def test_grid_is_the_product_in_file_order_with_int_ranges_inclusive(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, '[params."a.x"]\ngrid = [1, 2]\n[params."b.y"]\nint = [5, 7]\n'))
    points = grid_points(space)
    assert points == [{"a.x": a, "b.y": b} for a in (1, 2) for b in (5, 6, 7)]


def test_a_grid_refuses_a_continuous_range_naming_the_key(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, '[params."execution.stop_atr_mult"]\nuniform = [1.0, 3.0]\n'))
    with pytest.raises(ConfigError, match=r'params\."execution\.stop_atr_mult".*continuous'):
        grid_points(space)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[params."a.b"]\nuniform = [3.0, 1.0]\n', "must be below"),
        ('[params."a.b"]\nloguniform = [0.0, 1.0]\n', "above 0"),
        ('[params."a.b"]\nint = [1.5, 3]\n', "two integers"),
        ('[params."a.b"]\ngrid = []\n', "non-empty list"),
        ('[params."a.b"]\ngrid = [1, 1]\n', "listed twice"),
        ('[params."a.b"]\ngrid = [1]\nuniform = [0.0, 1.0]\n', "exactly one"),
        ('metric = "calmar"\n[params."a.b"]\ngrid = [1]\n', "metric"),
        ('[params."a.b"]\ngrid = [1]\n[base]\n"a.b" = 2\n', "also a parameter"),
        ("[base]\nx = 1\n", "no parameters"),
    ],
)
def test_malformed_spaces_are_refused_naming_the_file(tmp_path: Path, body: str, problem: str) -> None:
    path = space_file(tmp_path, body)
    with pytest.raises(ConfigError, match=problem) as err:
        load_space(path)
    assert str(path) in str(err.value)


def test_an_unknown_config_key_fails_validation_naming_key_and_file(tmp_path: Path) -> None:
    path = space_file(tmp_path, '[params."fusion.llm_wieght"]\ngrid = [0.1, 0.3]\n')
    with pytest.raises(ConfigError) as err:
        validate_space(load_space(path), None, SWEEP_OVERRIDES)
    text = str(err.value)
    assert "fusion.llm_wieght: unknown key" in text
    assert f"(in {path})" in text


def test_a_value_out_of_range_fails_validation_naming_it(tmp_path: Path) -> None:
    path = space_file(tmp_path, '[params."fusion.llm_weight"]\ngrid = [0.5, 1.7]\n')
    with pytest.raises(ConfigError) as err:
        validate_space(load_space(path), None, SWEEP_OVERRIDES)
    assert 'params."fusion.llm_weight" = 1.7' in str(err.value)
    assert "not within [0, 1]" in str(err.value)


def test_both_ends_of_a_range_are_validated(tmp_path: Path) -> None:
    path = space_file(tmp_path, '[params."risk.max_consecutive_losses"]\nint = [1, 5000]\n')
    with pytest.raises(ConfigError, match=r"= 5000"):
        validate_space(load_space(path), None, SWEEP_OVERRIDES)


def test_a_combination_refused_elsewhere_in_the_space_passes_validation(tmp_path: Path) -> None:
    # order_qty 2 is fine with max_contracts 2 (the first value): only the (1, 2) trial will fail
    path = space_file(
        tmp_path,
        '[params."risk.max_contracts"]\ngrid = [2, 1]\n[params."execution.order_qty"]\ngrid = [1, 2]\n',
    )
    validate_space(load_space(path), None, SWEEP_OVERRIDES)


def test_random_points_repeat_with_the_seed_and_stay_in_range(tmp_path: Path) -> None:
    space = load_space(
        space_file(
            tmp_path,
            '[params."execution.stop_atr_mult"]\nuniform = [1.0, 3.0]\n'
            '[params."fusion.cache_decay_rate"]\nloguniform = [0.01, 0.5]\n'
            '[params."risk.max_consecutive_losses"]\nint = [2, 5]\n'
            '[params."execution.trail_mode"]\nchoice = ["atr", "ticks"]\n',
        )
    )
    a, b, c = random_points(space, 40, 7), random_points(space, 40, 7), random_points(space, 40, 8)
    assert a == b != c
    assert random_points(space, 10, 7) == a[:10]  # more trials extend the same sequence
    for p in a:
        assert 1.0 <= p["execution.stop_atr_mult"] <= 3.0
        assert 0.01 <= p["fusion.cache_decay_rate"] <= 0.5
        assert type(p["risk.max_consecutive_losses"]) is int
        assert p["execution.trail_mode"] in ("atr", "ticks")
    assert {p["risk.max_consecutive_losses"] for p in a} == {2, 3, 4, 5}
    # the draws cover their ranges as their distributions say (fixed seed: no flake): the uniform
    # reaches both ends, the log-uniform puts ~40% of its draws in [0.01, 0.05] (a uniform: ~8%)
    atr = [p["execution.stop_atr_mult"] for p in a]
    assert min(atr) < 1.5 and max(atr) > 2.5
    assert sum(p["fusion.cache_decay_rate"] < 0.05 for p in a) >= 10


def test_trial_keys_ignore_order_and_tell_values_apart() -> None:
    assert trial_key({"a.b": 1, "c.d": 0.5}) == trial_key({"c.d": 0.5, "a.b": 1})
    assert trial_key({"a.b": 1}) != trial_key({"a.b": 2})
    assert len(trial_key({"a.b": 1})) == 12


def test_undefined_metrics_rank_worst_and_infinities_keep_their_side() -> None:
    assert objective(1.25, "max") == 1.25
    assert objective(None, "max") == -WORST_OBJECTIVE
    assert objective(None, "min") == WORST_OBJECTIVE
    assert objective(math.nan, "max") == -WORST_OBJECTIVE
    assert objective(math.inf, "max") == WORST_OBJECTIVE
    assert all(math.isfinite(objective(v, m)) for v in (None, math.nan, math.inf) for m in ("max", "min"))


def test_dotted_overrides_nest_and_merge() -> None:
    got = merge(
        {"data": {"paths": ["x"], "start": "a"}}, nested({"data.start": "b", "fusion.llm_weight": 0.4})
    )
    assert got == {"data": {"paths": ["x"], "start": "b"}, "fusion": {"llm_weight": 0.4}}


def test_the_example_space_is_valid_and_walks_a_24_point_grid() -> None:
    from tests.conftest import ROOT

    space = load_space(ROOT / "config" / "sweep-example.toml")
    validate_space(space, None, SWEEP_OVERRIDES)
    assert (space.metric, space.mode, space.search) == ("sharpe", "max", "grid")
    assert len(grid_points(space)) == 24


def test_relative_file_values_are_relative_to_the_space_file(tmp_path: Path) -> None:
    (tmp_path / "spaces").mkdir()
    path = tmp_path / "spaces" / "space.toml"
    path.write_text(
        '[base]\n"advisor.recorded_journal" = "../runs/a.sqlite"\n"data.paths" = ["nq.csv"]\n'
        '[params."policy.path"]\nchoice = ["p.onnx", "strategies.rules:EmaCross"]\n'
    )
    space = load_space(path)
    assert space.base["advisor.recorded_journal"] == str(tmp_path / "runs" / "a.sqlite")
    assert space.base["data.paths"] == [str(tmp_path / "spaces" / "nq.csv")]
    policies = (str(tmp_path / "spaces" / "p.onnx"), "strategies.rules:EmaCross")
    assert space.params["policy.path"].values == policies
