"""Debian's Chromium driven by Playwright for the browser tests (Playwright's own browser download
cannot run here). The flags keep Chromium off the network it cannot reach: without them it tries
Google's hosts at every start and its refused connections show up as page errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
)


def launch(playwright: Any) -> Any:
    """A headless Chromium browser (close it when done)."""
    path = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, timeout=60_000)
