"""A sweep's search space: config keys in dotted form, each with a distribution, read from TOML.

```toml
metric = "sharpe"                 # optional: net_pnl | sharpe | sortino | max_drawdown | trades |
mode = "max"                      #   win_rate | profit_factor; mode max | min (default: by metric)
search = "grid"                   # optional: grid | random | optuna (the CLI's --search wins)
trials = 16                       # random / optuna: how many trials (--trials wins)
seed = 0                          # random / optuna: the sampler's seed (--seed wins)

[base]                            # config overrides for every trial, dotted or as tables
"execution.stop_mode" = "atr"

[params."execution.stop_atr_mult"]
uniform = [1.0, 3.0]              # also: loguniform = [lo, hi], int = [lo, hi] (both ends
[params."risk.max_consecutive_losses"]          # included), grid = [...], choice = [...]
int = [2, 5]
[params."fusion.llm_weight"]
grid = [0.1, 0.3, 0.5]
```

Every key and every listed value (both ends of a range) is checked against the configuration
before anything runs (:func:`validate_space`), so a typo or a value out of range fails the sweep
at start naming the key and the space file. Each value is checked with the other parameters at
their first value (low end): a combination the configuration refuses elsewhere in the space
(``execution.order_qty`` above ``risk.max_contracts``) fails only its own trial, which is recorded
as failed with the error.

Refused at start as well, since the sweep would silently run something else than the file says: a
key given twice (quoted and as nested tables), a key inside another one (``fusion`` and
``fusion.llm_weight``, among the parameters and ``[base]``), secrets (they go in the environment, as
for a config file), ``journal.path`` (each trial journals to ``<sweep dir>/trials/<key>.sqlite``), a
continuous range on a whole-number key, a listed value of another type than its key's (``"2"`` for
a number, ``2.0`` for a whole number) and two listed values the configuration reads as one.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from trader.config import (
    load_settings,
    secret_problems,
    setting_annotation,
)
from trader.errors import ConfigError

SearchKind = Literal["grid", "random", "optuna"]
Mode = Literal["max", "min"]
KINDS = ("grid", "choice", "int", "uniform", "loguniform")
SEARCHES: tuple[SearchKind, ...] = ("grid", "random", "optuna")

# The report metrics a sweep records and can rank by, with the direction that is better.
METRICS: dict[str, Mode] = {
    "net_pnl": "max",
    "sharpe": "max",
    "sortino": "max",
    "max_drawdown": "min",
    "trades": "max",
    "win_rate": "max",
    "profit_factor": "max",
}
# A trial whose metric is undefined (Sharpe or Sortino with no trades or fewer than two sessions, win
# rate with no trades) reports this to the searcher instead: worse than any real value, but finite,
# as Optuna needs. The results table keeps the raw value (None; inf for a profit factor without a
# losing trade, which the searcher sees as +1e9).
WORST_OBJECTIVE = 1e9
MAX_GRID_POINTS = 100_000


@dataclass(frozen=True)
class Distribution:
    """How one config key varies: ``grid``/``choice`` list values; ``int`` (both ends included),
    ``uniform`` and ``loguniform`` give a range. An ``int`` range keeps its ends as ints (exact at
    any size) and is never listed out: it can be two billion values wide."""

    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def finite_values(self) -> Sequence[Any] | None:
        """Every value a grid walks through (an ``int`` range as a lazy ``range``), or None for a
        continuous range."""
        if self.kind in ("grid", "choice"):
            return self.values
        if self.kind == "int":
            return range(int(self.low), int(self.high) + 1)
        return None

    def probe_values(self) -> tuple[Any, ...]:
        """The values checked against the configuration at start: each listed value, or both ends."""
        if self.kind in ("grid", "choice"):
            return self.values
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (self.low, self.high)


@dataclass(frozen=True)
class SweepSpace:
    """A parsed space file: parameters in file order, ``[base]`` overrides (flat, dotted) and the
    optional metric/mode/search/trials/seed defaults."""

    path: Path
    params: dict[str, Distribution]
    base: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    mode: Mode | None = None
    search: SearchKind | None = None
    trials: int | None = None
    seed: int | None = None


def _fail(path: Path, where: str, problem: str) -> ConfigError:
    return ConfigError(f"sweep space {path}: {where}: {problem}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _leaves(
    file: Path, section: str, table: Mapping[str, Any], is_leaf: Callable[[Any], bool], prefix: str = ""
) -> dict[str, Any]:
    """A section's tables as dotted keys: ``{"a": {"b": 1}}`` and ``{"a.b": 1}`` both as
    ``{"a.b": 1}`` (down to the values ``is_leaf`` says end a key path); the same key written both
    ways is refused (TOML allows it: one is a quoted key, the other a table)."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        leaves = {key: v} if is_leaf(v) else _leaves(file, section, v, is_leaf, key + ".")
        for leaf, value in leaves.items():
            if leaf in out:
                raise _fail(
                    file,
                    f'{section}."{leaf}"',
                    "is given twice (once quoted, once as nested tables or a dotted key); give it once",
                )
            out[leaf] = value
    return out


def _base_leaf(v: Any) -> bool:
    return not (isinstance(v, Mapping) and v)


def _param_leaf(v: Any) -> bool:
    """A ``[params]`` table holding a distribution key ends a key path: ``[params."a.b"]`` and
    ``[params.a.b]`` both name the key ``a.b``."""
    return _base_leaf(v) or any(kind in v for kind in KINDS)


def _distribution(path: Path, key: str, spec: Any) -> Distribution:
    where = f'params."{key}"'
    if not isinstance(spec, Mapping):
        raise _fail(path, where, f"expected a table with one of {', '.join(KINDS)}, got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    unknown = [k for k in spec if k not in KINDS]
    if unknown or len(kinds) != 1:
        raise _fail(
            path, where, f"give exactly one of {', '.join(KINDS)} (got {', '.join(map(str, spec)) or 'none'})"
        )
    kind = kinds[0]
    raw = spec[kind]
    if not isinstance(raw, list) or not raw:
        raise _fail(path, f"{where}.{kind}", f"expected a non-empty list, got {raw!r}")
    if kind in ("grid", "choice"):
        seen: list[str] = []
        for v in raw:
            if isinstance(v, float) and not math.isfinite(v):
                raise _fail(path, f"{where}.{kind}", f"{v!r} is not a finite number")
            canon = json.dumps(v, sort_keys=True, default=str)
            if canon in seen:
                raise _fail(path, f"{where}.{kind}", f"{v!r} is listed twice")
            seen.append(canon)
        return Distribution(kind, tuple(raw))
    if len(raw) != 2 or not all(_is_number(v) for v in raw):
        raise _fail(path, f"{where}.{kind}", f"expected [low, high] as two finite numbers, got {raw!r}")
    low, high = raw
    if kind == "int":
        if not all(isinstance(v, int) for v in raw):
            raise _fail(path, f"{where}.int", f"expected two integers, got {raw!r}")
        if low > high:
            raise _fail(path, f"{where}.int", f"low {low} is above high {high}")
        return Distribution("int", (), low, high)
    if not low < high:
        raise _fail(path, f"{where}.{kind}", f"low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise _fail(path, f"{where}.loguniform", f"low {low} must be above 0")
    return Distribution(kind, (), float(low), float(high))


# Keys whose values are files: relative values in a space file are relative to the space file (as
# in a config file), so every trial, on any worker, reads the same file.
PATH_KEYS = ("data.paths", "policy.path", "llm_model.path", "advisor.recorded_journal")


def _resolve_path(key: str, value: Any, base_dir: Path) -> Any:
    from trader.policy import is_dotted

    def fix(v: Any) -> Any:
        if not isinstance(v, str) or not v or Path(v).is_absolute():
            return v
        if key == "policy.path" and is_dotted(v):
            return v  # module:attr, a Python policy
        return str((base_dir / v).resolve())

    if key not in PATH_KEYS:
        return value
    return [fix(v) for v in value] if isinstance(value, list) else fix(value)


def load_space(path: str | Path) -> SweepSpace:
    """Read and check the shape of a space file; :func:`validate_space` checks it against the
    configuration."""
    file = Path(path)
    try:
        with file.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"sweep space file not found: {file}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep space {file}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep space {file}: cannot be read: {exc}") from exc
    allowed = {"params", "base", "metric", "mode", "search", "trials", "seed"}
    for k in raw:
        if k not in allowed:
            raise _fail(file, k, f"unknown key (expected {', '.join(sorted(allowed))})")
    params_table = raw.get("params")
    if not isinstance(params_table, Mapping) or not params_table:
        raise _fail(file, "params", 'no parameters: add tables like [params."fusion.llm_weight"]')
    specs = _leaves(file, "params", params_table, _param_leaf)
    params = {k: _distribution(file, k, v) for k, v in specs.items()}
    base_dir = file.resolve().parent
    for key, dist in params.items():
        if key in PATH_KEYS and dist.values:
            resolved = tuple(_resolve_path(key, v, base_dir) for v in dist.values)
            params[key] = Distribution(dist.kind, resolved, dist.low, dist.high)
    base_table = raw.get("base", {})
    if not isinstance(base_table, Mapping):
        raise _fail(file, "base", f"expected a table, got {base_table!r}")
    base_values = _leaves(file, "base", base_table, _base_leaf)
    base = {k: _resolve_path(k, v, base_dir) for k, v in base_values.items()}
    _check_overlaps(file, params, base)
    for key, value in base.items():
        _check_settable(file, f'base."{key}"', key, value)
    for key, dist in params.items():
        for value in dist.probe_values():
            _check_settable(file, f'params."{key}"', key, value)
    metric, mode, search = raw.get("metric"), raw.get("mode"), raw.get("search")
    if metric is not None and metric not in METRICS:
        raise _fail(file, "metric", f"{metric!r} is not one of {', '.join(METRICS)}")
    if mode is not None and mode not in ("max", "min"):
        raise _fail(file, "mode", f"{mode!r} is not 'max' or 'min'")
    if search is not None and search not in SEARCHES:
        raise _fail(file, "search", f"{search!r} is not one of {', '.join(SEARCHES)}")
    trials, seed = raw.get("trials"), raw.get("seed")
    if trials is not None and not (isinstance(trials, int) and not isinstance(trials, bool) and trials >= 1):
        raise _fail(file, "trials", f"{trials!r} is not a whole number >= 1")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise _fail(file, "seed", f"{seed!r} is not a whole number >= 0")
    return SweepSpace(file, params, base, metric, mode, search, trials, seed)


def _check_overlaps(file: Path, params: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Refuse a key set twice, or inside another key, among the parameters and ``[base]``: which
    of ``fusion = {...}`` and ``fusion.llm_weight`` a trial gets would depend on the merge order."""
    keys = [(f'params."{k}"', k) for k in params] + [(f'base."{k}"', k) for k in base]
    for i, (where, key) in enumerate(keys):
        for other_where, other in keys[:i]:
            if key == other:
                raise _fail(file, where, "is also a parameter; set it in one place")
            if key.startswith(other + ".") or other.startswith(key + "."):
                raise _fail(
                    file,
                    where,
                    f"overlaps {other_where} (one key holds the other); set each key in one place",
                )


def _check_settable(file: Path, where: str, key: str, value: Any) -> None:
    """Refuse what a space file must not set: secrets (the same rule and words as a config file:
    they go in the environment, and a space's values are written to sweep.json, the results and
    the page) and ``journal.path``, which each trial sets to its own journal."""
    problems = secrets_in(key, value, file)
    if problems:
        raise _fail(file, where, problems[0])
    journal = nested({key: value}).get("journal")
    if isinstance(journal, Mapping) and "path" in journal:
        raise _fail(
            file,
            where,
            "journal.path cannot be set in a sweep: each trial journals to "
            "<sweep dir>/trials/<trial key>.sqlite",
        )


def secrets_in(key: str, value: Any, file: Path) -> list[str]:
    """Why setting ``key`` (dotted) to ``value`` would put a secret in ``file``: the rule and the
    words of a config file (:mod:`trader.config`), or nothing."""
    return secret_problems(nested({key: value}), file)


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys as the nested overrides :func:`trader.config.load_settings` takes. The values
    are copied: nothing the caller holds is changed (``{"a": {...}, "a.b": 1}`` included)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is a value, not a table")
            node = child
        node[leaf] = copy.deepcopy(value)
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Nested overrides merged left to right (later layers win, tables merge) into a new dict;
    the layers are not changed."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            elif isinstance(v, Mapping):
                out[k] = merge(v)
            else:
                out[k] = copy.deepcopy(v)
    return out


def _scalar_types(tp: Any) -> set[type]:
    """The scalar types a setting's annotation takes (through ``Annotated``, unions and
    ``Literal``)."""
    if get_origin(tp) is Annotated:
        return _scalar_types(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in get_args(tp)))
    if get_origin(tp) is Literal:
        return {type(a) for a in get_args(tp)}
    return {tp} if isinstance(tp, type) else set()


def _takes_whole_numbers(key: str) -> bool:
    kinds = _scalar_types(setting_annotation(key.split(".")))
    return int in kinds and float not in kinds


def _value_at(values: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(values, Mapping) or part not in values:
            return False, None
        values = values[part]
    return True, values


def _kind(v: Any, *, given: bool) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "a whole number"
    if isinstance(v, float):
        return "a decimal number" if given else "a number"
    if isinstance(v, str):
        return "text"
    return type(v).__name__


def _brief(v: Any, show: Callable[[Any], str] = repr, limit: int = 80) -> str:
    text = show(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _misread(raw: Any, read: Any, where: str) -> str | None:
    """Why ``raw`` (from the space file) is not of the type the configuration holds there (``read``,
    what it read ``raw`` as, in JSON form), or None. pydantic's lax reading turns ``"2"`` and
    ``2.0`` into ``2``: refused, as two spellings of one value would run it twice under two trial
    keys. A whole number for a decimal key is fine."""
    if isinstance(raw, Mapping) and isinstance(read, Mapping):
        for k, v in raw.items():
            if k in read and (why := _misread(v, read[k], f"{where}.{k}")):
                return why
        return None
    if isinstance(raw, list) and isinstance(read, list) and len(raw) == len(read):
        for i, (a, b) in enumerate(zip(raw, read, strict=True)):
            if why := _misread(a, b, f"{where}[{i}]"):
                return why
        return None
    if isinstance(raw, bool) or isinstance(read, bool):
        same = isinstance(raw, bool) and isinstance(read, bool)
    elif isinstance(read, int):
        same = isinstance(raw, int)
    elif isinstance(read, float):
        same = isinstance(raw, int | float)
    elif isinstance(read, str):
        same = isinstance(raw, str)
    else:
        same = True  # another shape: the configuration's own validation speaks for it
    if same:
        return None
    return (
        f"{raw!r} is {_kind(raw, given=True)}, but {where} takes {_kind(read, given=False)} "
        f"(the configuration would read it as {_brief(read)}); write {_brief(read, json.dumps)}"
    )


def validate_space(space: SweepSpace, config: Path | None, overrides: Mapping[str, Any]) -> None:
    """Check every parameter value (each listed value, both ends of a range) against the
    configuration before anything runs: ``load_settings(config, overrides + base + point)`` where
    the point holds that value and every other parameter at its first value (low end). An unknown
    key, a refused value, a value of another type than its key's (``"2"`` for a number), two listed
    values the configuration reads as one, or a continuous range on a whole-number key is a
    :class:`ConfigError` naming the key and the space file."""
    where = f" (in {space.path})"
    reference = {k: d.probe_values()[0] for k, d in space.params.items()}

    def attempt(label: str, point: Mapping[str, Any]) -> dict[str, Any]:
        try:
            settings = load_settings(config, merge(overrides, nested(space.base), nested(point)))
        except ConfigError as exc:
            text = str(exc).replace(" (from the command line)", where)
            raise ConfigError(f"sweep space {space.path}: {label}: {text}") from None
        dumped: dict[str, Any] = settings.model_dump(mode="json")
        return dumped

    for key, dist in space.params.items():
        if dist.kind in ("uniform", "loguniform") and _takes_whole_numbers(key):
            raise _fail(
                space.path,
                f'params."{key}".{dist.kind}',
                f"{key} takes whole numbers and {dist.kind} draws fractions: use "
                f"int = [{math.ceil(dist.low)}, {math.floor(dist.high)}]",
            )
    try:
        load_settings(config, merge(overrides, nested(space.base)))
    except ConfigError as exc:
        text = str(exc).replace(" (from the command line)", where)
        raise ConfigError(f"sweep space {space.path}: [base]: {text}") from None
    for key, dist in space.params.items():
        read_as: dict[str, Any] = {}  # what the configuration reads each listed value as -> the value
        for value in dist.probe_values():
            settings = attempt(f'params."{key}" = {value!r}', {**reference, key: value})
            found, read = _value_at(settings, key)
            if not found:
                continue
            why = _misread(value, read, key)
            if why:
                raise _fail(space.path, f'params."{key}".{dist.kind}', why)
            canon = json.dumps(read, sort_keys=True)
            if dist.kind in ("grid", "choice") and canon in read_as:
                raise _fail(
                    space.path,
                    f'params."{key}".{dist.kind}',
                    f"{_brief(read_as[canon])} and {_brief(value)} are the same value of {key} (the "
                    f"configuration reads both as {_brief(read)}): the same trial would run twice; list "
                    "it once",
                )
            read_as[canon] = value


def trial_key(params: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit name for one point of the space (the same params, the same key, in
    any order, on any machine): the trial's journal file and its row in the results."""
    canon = json.dumps(dict(sorted(params.items())), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def grid_points(space: SweepSpace) -> list[dict[str, Any]]:
    """The product of every parameter's values, in file order (the last key varies fastest).
    Continuous ranges cannot be walked: they are refused, naming the key."""
    axes: list[Sequence[Any]] = []
    for key, dist in space.params.items():
        values = dist.finite_values()
        if values is None:
            raise _fail(
                space.path,
                f'params."{key}"',
                f"{dist.kind} is a continuous range: a grid needs grid, choice or int "
                "(or use --search random / optuna)",
            )
        axes.append(values)
    count = math.prod(len(a) for a in axes)  # len of an int range is arithmetic, nothing is listed
    if count > MAX_GRID_POINTS:
        raise _fail(space.path, "params", f"the grid has {count:,} points (at most {MAX_GRID_POINTS:,})")
    keys = list(space.params)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


def _plain(v: Any) -> Any:
    """numpy scalars as Python values (they must pickle, hash and go to Parquet the same)."""
    return v.item() if hasattr(v, "item") else v


def tune_domain(dist: Distribution) -> Any:
    """The Ray Tune search domain of one distribution (``int`` includes its high end)."""
    from ray import tune

    if dist.kind in ("grid", "choice"):
        return tune.choice(list(dist.values))
    if dist.kind == "int":
        return tune.randint(int(dist.low), int(dist.high) + 1)
    if dist.kind == "uniform":
        return tune.uniform(dist.low, dist.high)
    return tune.loguniform(dist.low, dist.high)


def random_points(space: SweepSpace, trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` points drawn by Ray Tune's samplers from a generator seeded with ``seed``, so
    a rerun with the same space, trials and seed draws the same points (and can skip the finished
    ones)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    domains = {k: tune_domain(d) for k, d in space.params.items()}
    return [{k: _plain(dom.sample(random_state=rng)) for k, dom in domains.items()} for _ in range(trials)]


def optuna_distribution(dist: Distribution) -> Any:
    """The Optuna distribution of one parameter (grid and choice lists are categorical)."""
    from optuna import distributions as od

    if dist.kind in ("grid", "choice"):
        return od.CategoricalDistribution(list(dist.values))
    if dist.kind == "int":
        return od.IntDistribution(int(dist.low), int(dist.high))
    return od.FloatDistribution(dist.low, dist.high, log=dist.kind == "loguniform")


def objective(value: Any, mode: Mode) -> float:
    """The finite number a searcher ranks: the metric; an infinity (profit factor without a loss)
    clamped to +-:data:`WORST_OBJECTIVE`; :data:`WORST_OBJECTIVE` on the bad side when it is
    undefined (None or NaN: Sharpe with no trades)."""
    if _is_number(value):
        return float(value)
    if isinstance(value, float) and math.isinf(value):
        return math.copysign(WORST_OBJECTIVE, value)
    return -WORST_OBJECTIVE if mode == "max" else WORST_OBJECTIVE
