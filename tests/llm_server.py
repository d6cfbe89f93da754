"""A scripted OpenAI-compatible chat server on 127.0.0.1 (real HTTP over a real socket).

Answers come from a function of the request; it can also delay, fail with a status, or stop.
It can be hostile on purpose: ``answer`` may return any JSON value as ``message.content`` (a
dict, a list, a number, null, ten megabytes of text), ``response`` replaces the whole JSON body
(any shape at all), ``delay_s`` may depend on the request, and ``chunked`` streams the body
without a Content-Length so the client cannot tell its size in advance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScriptedChatServer:
    def __init__(
        self,
        answer: Callable[[dict[str, Any]], Any] = lambda body: "HOLD | 0.50 | -",
        delay_s: float | Callable[[dict[str, Any]], float] = 0.0,
        status: int = 200,
        response: Callable[[dict[str, Any]], Any] | None = None,
        chunked: bool = False,
    ) -> None:
        self.answer, self.delay_s, self.status = answer, delay_s, status
        self.response, self.chunked = response, chunked
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bytes_sent = 0  # body bytes the server managed to write (a client may stop reading)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _body(self, body: dict[str, Any]) -> Any:
        if self.response is not None:
            return self.response(body)
        return {
            "id": "x",
            "object": "chat.completion",
            "model": body.get("model", "m"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.answer(body)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        delay = self.delay_s(body) if callable(self.delay_s) else self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if self.status != 200:
            return web.Response(status=self.status, text="scripted failure")
        data = json.dumps(self._body(body)).encode()
        if not self.chunked:
            self.bytes_sent += len(data)
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client hung up: it had read enough
            for k in range(0, len(data), 64 * 1024):
                await resp.write(data[k : k + 64 * 1024])
                self.bytes_sent += len(data[k : k + 64 * 1024])
            await resp.write_eof()
        return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> ScriptedChatServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
