"""The monitoring kit (monitoring/alerts.yml, monitoring/grafana-dashboard.json) speaks the metrics
the service really exposes: every ``trader_*`` series an alert or a panel queries is one that
/metrics serves (the engine's collector, LLM metrics included), so a renamed metric cannot leave
an alert silently watching nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from tests.conftest import make_settings
from trader.service.http import ControlServer
from trader.service.operator import Operator
from trader.wiring import build_replay

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "monitoring"
SERIES = re.compile(r"\btrader_[a-z0-9_]+")


def exposed(tmp_path: Path) -> set[str]:
    """Series names /metrics serves for a paper run with an LLM advisor (an OpenAI-compatible
    backend: built, never called)."""
    s = make_settings(
        service={"http_enabled": False},
        advisor={"mode": "async", "backend": "openai", "openai": {"base_url": "http://127.0.0.1:9/v1"}},
    )
    run = build_replay(s, tmp_path / "j.sqlite", mode="paper")
    try:
        text = generate_latest(ControlServer(Operator(s, run, None), lambda: False).registry).decode()
    finally:
        run.journal.close()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("trader_")}
    for line in text.splitlines():  # families without a sample yet (no veto so far) still exist
        if line.startswith("# TYPE trader_"):
            _, _, name, kind = line.split()
            if kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            else:
                names.add(name)
    return names


def queried() -> dict[str, set[str]]:
    rules = yaml.safe_load((KIT / "alerts.yml").read_text())
    out: dict[str, set[str]] = {}
    for group in rules["groups"]:
        for r in group["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"]
            out[f"alert {r['alert']}"] = set(SERIES.findall(r["expr"]))
    dash = json.loads((KIT / "grafana-dashboard.json").read_text())
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        out[f"panel {p['title']}"] = {n for t in p["targets"] for n in SERIES.findall(t["expr"])}
    return out


def test_every_alert_and_panel_queries_series_the_service_exposes(tmp_path):
    have = exposed(tmp_path)
    assert {"trader_halted", "trader_llm_queries_total", "trader_decision_latency_seconds_bucket"} <= have
    uses = queried()
    missing = {where: sorted(names - have) for where, names in uses.items() if names - have}
    assert not missing, missing
    alerts = " ".join(uses)
    for must in ("StaleData", "Halted", "ReconcileMismatch", "NoBars", "LLMErrorRate", "DrawdownRoom"):
        assert f"alert Trader{must}" in alerts
