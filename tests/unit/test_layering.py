"""The house rules of DESIGN.md ("Layout"), checked on the source: the core imports no adapter,
service or LLM backend; nothing reaches into another object's ``_private`` names; journal rows
are built in journal/rows and read in journal/reader only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SQL = re.compile(r"\s*(SELECT\s.+\sFROM\s|INSERT\s+INTO\s|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s)", re.I | re.S)
PKG = ROOT / "trader"

# Outside the core: adapters, the service, LLM backends, the wiring, the CLI, tools around it.
EDGE = (
    "trader/adapters/",
    "trader/adapters/tradovate/",
    "trader/execution/adapters/tradovate/broker.py",
    "trader/adapters/tradovate/feed.py",
    "trader/feeds/recorder.py",
    "trader/service/",
    "trader/llm/",
    "trader/wiring.py",
    "trader/replay.py",  # runs a replay built by the wiring (CLI, sweeps, walk-forward, compare)
    "trader/research/",  # sweeps, walk-forward, compare: drivers of whole runs
    "trader/recovery.py",
    "trader/cli.py",
    "trader/__main__.py",
    "trader/bench.py",
    "trader/train/",
)
FORBIDDEN_IN_CORE = (
    "trader.tradovate",
    "trader.adapters",
    "trader.service",
    "trader.llm.backends",
    "trader.adapters.tradovate.feed",
    "trader.adapters.tradovate.broker",
    "trader.wiring",
    "trader.cli",
)


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(ROOT)), ast.parse(p.read_text(), str(p)))
        for p in sorted(PKG.rglob("*.py"))
        if "__pycache__" not in p.parts
    ]


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_core_imports_no_adapter_service_or_llm_backend():
    bad = []
    for rel, tree in _modules():
        if rel.startswith(EDGE):
            continue
        for name in _imports(tree):
            if name.startswith(FORBIDDEN_IN_CORE):
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_module_reaches_into_another_objects_private_names():
    bad = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                bad.append(f"{rel}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trader"):
                bad += [
                    f"{rel}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not bad, "\n".join(bad)


def test_journal_rows_are_built_and_read_only_in_the_journal_package():
    bad = []
    for rel, tree in _modules():
        if rel.startswith("trader/journal/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
                bad.append(f"{rel}:{node.lineno} SQL outside trader/journal: {node.value[:40]!r}")
            if isinstance(node, ast.Import) and any(a.name == "sqlite3" for a in node.names):
                bad.append(f"{rel}:{node.lineno} imports sqlite3")
    assert not bad, "\n".join(bad)


def test_components_are_not_swapped_after_construction():
    """No assignment to another object's component attribute (``engine.broker = ...``)."""
    components = {"broker", "feed", "policy", "fusion", "risk", "advisor", "journal", "features", "submit"}
    bad = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if (
                        isinstance(t, ast.Attribute)
                        and t.attr in components
                        and not (isinstance(t.value, ast.Name) and t.value.id == "self")
                    ):
                        bad.append(f"{rel}:{node.lineno} assigns .{t.attr}")
    assert not bad, "\n".join(bad)
