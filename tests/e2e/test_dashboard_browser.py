"""The live dashboard in a real browser (issue 13): `trader run` on paced recorded bars, Chromium
driven by Playwright. The page loads with no console error and no request off the service, updates
when a bar arrives, refuses a control click without the token, halts with it, and keeps the token
out of the URL, cookies and web storage. Without a configured token the page is read-only."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser import launch, needs_chromium
from tests.child import Child
from tests.conftest import NQ
from tests.llm_server import free_port

TOKEN = "dash-" + "k3y" * 8
UI_TIMEOUT_MS = 20_000  # a bound on waiting for the page, never a timing assertion

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api")


@dataclass
class Running:
    url: str
    journal: Path
    proc: subprocess.Popen[str]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Running]:
    """`trader run` on recorded NQ bars at 600x (a bar every 0.1 s); ``token`` param: the control
    token in its environment, or None for a service without control."""
    token = getattr(request, "param", TOKEN)
    port = free_port()
    cfg = tmp_path / "trader.toml"
    cfg.write_text(
        f"""
[advisor]
mode = "off"
[service]
http_port = {port}
stop_timeout_s = 10.0
feed = "recorded"
[data]
paths = ["{NQ}"]
end = "2023-11-20T12:00:00"
speed = 600.0
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRADER_", "NOTIFY_", "WATCHDOG_"))}
    if token is not None:
        env["TRADER_CONTROL_TOKEN"] = token
    journal = tmp_path / "j.sqlite"
    proc = Child(
        [sys.executable, "-m", "trader", "run", "--config", str(cfg), "--journal", str(journal)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if _get(f"{url}/state")["bars"] > 0:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < end, "the service did not come up"
            time.sleep(0.2)
        yield Running(url, journal, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


def test_the_dashboard_updates_with_each_bar_refuses_a_click_without_the_token_and_halts_with_it(
    service: Running, browser: object, tmp_path: Path
) -> None:
    expect = sync_api.expect
    context = browser.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    requests: list[tuple[str, dict[str, str]]] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append((r.url, r.headers)))

    page.goto(service.url + "/")
    expect(page.locator("#conn")).to_have_text("live")
    expect(page.locator("#mode")).to_have_text("paper")
    bar = page.locator("#bar-index")
    expect(bar).to_have_text(re.compile(r"^\d+"))
    first = bar.text_content()
    # the next bar arrives: the page shows it without a reload
    page.wait_for_function("(prev) => document.getElementById('bar-index').textContent !== prev", arg=first)
    assert int(bar.text_content().split()[0]) > int(first.split()[0])
    expect(page.locator("#decisions tbody tr").first).to_be_visible()
    expect(page.locator("#equity-chart polyline")).to_have_count(1)
    expect(page.locator("#halt-title")).to_have_text("Entries allowed")
    expect(page.locator("#health-journal")).to_have_text("writing")
    assert not errors, errors
    assert all(u.startswith(service.url + "/") or u.startswith("data:") for u, _ in requests), requests

    # Halt without a token: the server refuses (401), the page says so, nothing is halted
    page.click("#btn-halt")
    expect(page.locator("#control-result")).to_contain_text("refused (401)")
    expect(page.locator("#control-result")).to_contain_text("missing or wrong bearer token")
    assert _get(f"{service.url}/state")["halted"] is False
    # ... a wrong one is refused the same way
    page.fill("#token", "not-the-token")
    page.click("#btn-halt")
    expect(page.locator("#control-result")).to_contain_text("refused (401)")
    assert _get(f"{service.url}/state")["halted"] is False

    # with the token: halted, and the page shows why
    page.fill("#token", TOKEN)
    page.fill("#reason", "halted from the dashboard test")
    page.click("#btn-halt")
    expect(page.locator("#control-result")).to_contain_text("halt accepted")
    state = _get(f"{service.url}/state")
    assert state["halted"] is True and state["halt_reason"] == "halted from the dashboard test"
    expect(page.locator("#halt-title")).to_have_text("Entries halted")
    expect(page.locator("#halt-reasons")).to_contain_text("halted from the dashboard test")
    # the page keeps streaming while halted
    halted_at = bar.text_content()
    page.wait_for_function(
        "(prev) => document.getElementById('bar-index').textContent !== prev", arg=halted_at
    )
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)  # kept for a failure

    # the token went only into the Authorization header of the control requests
    assert TOKEN not in page.url
    storage = page.evaluate(
        "() => [localStorage.length, sessionStorage.length, document.cookie, location.href]"
    )
    assert storage[:3] == [0, 0, ""] and TOKEN not in storage[3]
    assert context.cookies() == []
    for url, headers in requests:
        assert TOKEN not in url
        leaked = {k: v for k, v in headers.items() if TOKEN in v}
        assert leaked in ({}, {"authorization": f"Bearer {TOKEN}"}), (url, leaked)
        if leaked:
            assert url == f"{service.url}/halt"
    assert all(u.startswith(service.url + "/") or u.startswith("data:") for u, _ in requests), requests
    # the only console errors are the browser's notes on the two refused requests
    assert all("401" in e for e in errors) and len(errors) <= 2, errors

    # stopping the service with the page open: it ends promptly and the page says so
    service.proc.send_signal(signal.SIGTERM)
    out, _ = service.proc.communicate(timeout=30)
    assert service.proc.returncode == 0, out
    expect(page.locator("#conn")).to_have_text("service stopped")
    assert TOKEN not in out  # nor in the logs
    con = sqlite3.connect(service.journal)
    rows = con.execute("SELECT action, result, reason FROM control ORDER BY rowid").fetchall()
    con.close()
    assert rows[:3] == [
        ("halt", "refused: bad token", ""),
        ("halt", "refused: bad token", ""),
        ("halt", "accepted", "halted from the dashboard test"),
    ]
    context.close()


@pytest.mark.parametrize("service", [None], indirect=True)
def test_without_a_configured_token_the_dashboard_is_read_only(service: Running, browser: object) -> None:
    expect = sync_api.expect
    page = browser.new_page()  # type: ignore[attr-defined]
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(service.url + "/")
    expect(page.locator("#conn")).to_have_text("live")
    for button in ("#btn-halt", "#btn-resume", "#btn-flatten", "#token"):
        expect(page.locator(button)).to_be_disabled()
    expect(page.locator("#control-note")).to_contain_text("Control is disabled")
    expect(page.locator("#bar-index")).not_to_have_text("–")
    page.close()
