"""scripts/fetch_model against a real HTTP server on 127.0.0.1 that behaves like Hugging Face's
resolve endpoint: a redirect carrying the LFS object's SHA-256 and size, then a file with ranges."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

from tests.llm_server import free_port

ROOT = Path(__file__).resolve().parents[2]
BLOB = b"GGUF" + bytes(range(256)) * 4096  # ~1 MiB, starts with the GGUF magic


class FakeHub:
    def __init__(self, blob: bytes, etag: str) -> None:
        self.blob, self.etag, self.port = blob, etag, free_port()
        self.ranges: list[str | None] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/org/repo/resolve/main/model-q4.gguf"

    async def _resolve(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(
            "/cdn/model-q4.gguf",
            headers={"X-Linked-Etag": f'"{self.etag}"', "X-Linked-Size": str(len(self.blob))},
        )

    async def _cdn(self, request: web.Request) -> web.Response:
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            return web.Response(status=206, body=self.blob[start:])
        return web.Response(body=self.blob)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/org/repo/resolve/main/model-q4.gguf", self._resolve)
        app.router.add_get("/cdn/model-q4.gguf", self._cdn)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()


def fetch(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / "fetch_model"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def hub() -> FakeHub:
    return FakeHub(BLOB, hashlib.sha256(BLOB).hexdigest())


def test_download_resumes_verifies_the_published_checksum_and_renames(hub, tmp_path):
    (tmp_path / "model-q4.gguf.part").write_bytes(BLOB[:300_000])  # an interrupted earlier try
    r = fetch("--url", hub.url, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model-q4.gguf").read_bytes() == BLOB
    assert not (tmp_path / "model-q4.gguf.part").exists()
    assert hub.ranges[-1] == "bytes=300000-"
    again = fetch("--url", hub.url, "--out", str(tmp_path))
    assert again.returncode == 0 and "already present and verified" in again.stdout


def test_a_checksum_mismatch_or_a_non_gguf_file_is_rejected_and_nothing_is_installed(hub, tmp_path):
    r = fetch("--url", hub.url, "--out", str(tmp_path), "--sha256", "0" * 64)
    assert r.returncode == 1 and "SHA-256 mismatch" in r.stderr
    assert not list(tmp_path.iterdir())
    bad = FakeHub(b"<html>rate limited</html>", "1" * 64)
    r = fetch("--url", bad.url, "--out", str(tmp_path))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr
    assert not list(tmp_path.iterdir())


def test_no_network_is_a_clear_error():
    r = fetch("--url", f"http://127.0.0.1:{free_port()}/x/resolve/main/m.gguf", "--out", "/tmp/never")
    assert r.returncode == 1 and "cannot download" in r.stderr
