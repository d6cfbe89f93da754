"""Log rendering (trader/logs.py) and the replay's LLM schedule default (trader/cli.py)."""

from __future__ import annotations

import io
import json
import os

import pytest
import structlog

from trader import logs
from trader.cli import _settings_with_recorded_default, build_parser
from trader.config import LoggingConfig


@pytest.fixture(autouse=True)
def _restore_structlog(monkeypatch):
    monkeypatch.setattr(logs, "_configured", None)
    yield
    structlog.reset_defaults()


def _log_line(cfg: LoggingConfig) -> str:
    out = io.StringIO()  # not a terminal, like a pipe or journald
    logs.configure_logging(cfg, out)
    structlog.get_logger("t").info("order_rejected", reason="price off the tick grid", qty=1)
    (line,) = out.getvalue().splitlines()
    return line


@pytest.mark.parametrize("fmt", ["auto", "console"])
def test_auto_and_console_log_key_value_lines_even_when_not_a_terminal(fmt):
    line = _log_line(LoggingConfig(format=fmt))
    assert not line.startswith("{") and "\x1b[" not in line  # not JSON, no colour codes
    assert "order_rejected" in line and "reason='price off the tick grid'" in line and "qty=1" in line


def test_json_logs_one_json_object_per_line_only_when_asked():
    event = json.loads(_log_line(LoggingConfig(format="json")))
    assert event["event"] == "order_rejected" and event["qty"] == 1 and event["level"] == "info"


def test_a_child_process_is_told_to_log_as_its_parent():
    assert logs.child_logging_args() == []  # nothing configured: the child keeps structlog's default
    logs.configure_logging(LoggingConfig(format="json", level="warning"), io.StringIO())
    (arg,) = logs.child_logging_args()
    assert LoggingConfig.model_validate_json(arg) == LoggingConfig(format="json", level="warning")
    logs.configure_logging(LoggingConfig(format="auto"), io.StringIO())
    assert LoggingConfig.model_validate_json(logs.child_logging_args()[0]).format == "console"


def _replay_schedule(*argv: str) -> str:
    return _settings_with_recorded_default(build_parser().parse_args(["replay", *argv])).advisor.schedule


def test_replay_asks_on_entries_unless_the_flag_the_config_or_the_environment_says_otherwise(
    tmp_path, monkeypatch
):
    for name in [k for k in os.environ if k.startswith("TRADER_")]:
        monkeypatch.delenv(name)
    assert _replay_schedule() == "entries"  # the demo
    assert _replay_schedule("--llm-schedule", "interval") == "interval"  # the full behaviour
    only_mode = tmp_path / "mode.toml"
    only_mode.write_text('[advisor]\nmode = "sync"\n')
    assert _replay_schedule("--config", str(only_mode)) == "entries"
    named = tmp_path / "named.toml"
    named.write_text('[advisor]\nschedule = "interval"\n')
    assert _replay_schedule("--config", str(named)) == "interval"
    assert _replay_schedule("--config", str(named), "--llm-schedule", "entries") == "entries"
    monkeypatch.setenv("TRADER_ADVISOR__SCHEDULE", "interval")
    assert _replay_schedule() == "interval"


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--llm", "off"],  # was read as --llm-journal off
        ["replay", "--jour", "j.sqlite"],
        ["sweep", "--space", "s.toml", "--work", "2"],
        ["walk-forward", "--train-days", "3", "--test-days", "2", "--time", "100"],
    ],
)
def test_an_abbreviated_option_is_refused_not_taken_for_a_longer_one(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
