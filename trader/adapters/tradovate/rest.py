"""Tradovate REST over aiohttp: the access token (request, renewal, time penalties) and calls.

Errors, and what each means for a retry:

* a penalty ticket (HTTP 200 with ``p-ticket``/``p-time``): the request was *not* executed; wait
  ``p-time`` seconds and resend the identical body with the ``p-ticket`` field added. With
  ``p-captcha`` the ticket cannot be answered by a server: :class:`PenaltyError`.
* HTTP 429: user-level rate limit, not executed: :class:`RateLimited` (back off).
* HTTP 401: the token was refused, not executed: authenticate again and resend once.
* HTTP 5xx, a timeout or a dropped connection: :class:`TransientError`. For a GET this is safe
  to repeat; for an order the request may or may not have been executed (``ambiguous``), and
  only the caller knows how to find out (the broker looks for its client order id).

Secrets (password, API secret, tokens) never appear in a log line, an exception or the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import aiohttp
import structlog
from pydantic import SecretStr
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from trader.config import TradovateConfig
from trader.errors import BrokerError

log = structlog.get_logger(__name__)

T = TypeVar("T")

URLS = {
    "demo": (
        "https://demo.tradovateapi.com/v1",
        "wss://demo.tradovateapi.com/v1/websocket",
        "wss://md.tradovateapi.com/v1/websocket",
    ),
    "live": (
        "https://live.tradovateapi.com/v1",
        "wss://live.tradovateapi.com/v1/websocket",
        "wss://md.tradovateapi.com/v1/websocket",
    ),
}


class TradovateError(BrokerError):
    pass


class AuthError(TradovateError):
    """Credentials refused or missing: fatal at start, with the reason and never the secret."""


class PenaltyError(TradovateError):
    """A penalty that needs a captcha: nothing to do but wait (about an hour)."""


class RateLimited(TradovateError):
    def __init__(self, path: str, retry_after_s: float) -> None:
        super().__init__(f"{path}: HTTP 429 rate limited")
        self.retry_after_s = retry_after_s


class TransientError(TradovateError):
    """5xx, timeout, connection lost. ``ambiguous``: the server may have executed the request."""

    def __init__(self, msg: str, ambiguous: bool) -> None:
        super().__init__(msg)
        self.ambiguous = ambiguous


class RejectedError(TradovateError):
    """A business-level refusal (``failureReason``/``errorText``): not retried."""


def endpoints(cfg: TradovateConfig) -> tuple[str, str, str]:
    rest, ws, md = URLS[cfg.environment]
    return (cfg.rest_url or rest).rstrip("/"), cfg.ws_url or ws, cfg.md_url or md


def parse_time(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


@dataclass(slots=True)
class Token:
    access: SecretStr
    md_access: SecretStr
    expires_at: float  # epoch seconds
    user_id: int


class RateLimiter:
    """At most ``rate`` calls per second, spaced evenly (a call waits for its slot)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self.interval


class TradovateRest:
    """One authenticated REST session. ``start()`` gets the token and keeps renewing it."""

    def __init__(self, cfg: TradovateConfig) -> None:
        self.cfg = cfg
        self.base, self.ws_url, self.md_url = endpoints(cfg)
        self.token: Token | None = None
        self.limiter = RateLimiter(cfg.max_requests_per_s)
        self._session: aiohttp.ClientSession | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._auth_lock = asyncio.Lock()
        self.penalties = 0
        self.rate_limited = 0
        self.renewals = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        if self.token is None:
            await self.authenticate()
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop(), name="tradovate-token-renewal")

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise TradovateError("REST session not started")
        return self._session

    # -- token --------------------------------------------------------------------------------------
    def _credentials(self) -> dict[str, Any]:
        c = self.cfg
        missing = [
            k
            for k, v in (("username", c.username), ("password", c.password), ("sec", c.sec))
            if not v or (isinstance(v, SecretStr) and not v.get_secret_value())
        ]
        if missing:
            raise AuthError(
                "tradovate credentials missing: "
                + ", ".join(f"tradovate.{k} (TRADER_TRADOVATE__{k.upper()})" for k in missing)
            )
        assert c.password is not None and c.sec is not None
        device = c.device_id or hashlib.sha256(socket.gethostname().encode()).hexdigest()[:32]
        return {
            "name": c.username,
            "password": c.password.get_secret_value(),
            "appId": c.app_id,
            "appVersion": c.app_version,
            "cid": c.cid,
            "sec": c.sec.get_secret_value(),
            "deviceId": device,
        }

    async def authenticate(self) -> Token:
        """POST /auth/accesstokenrequest, answering time penalties; AuthError on refusal."""
        async with self._auth_lock:
            data = await self._send("POST", "/auth/accesstokenrequest", self._credentials(), auth=False)
            if not isinstance(data, dict) or data.get("errorText") or not data.get("accessToken"):
                reason = data.get("errorText") if isinstance(data, dict) else None
                raise AuthError(
                    f"tradovate refused the access token request for user {self.cfg.username!r} "
                    f"({self.cfg.environment}): {reason or 'no accessToken in the response'}"
                )
            self.token = self._token_from(data)
            log.info(
                "tradovate_authenticated",
                user=self.cfg.username,
                environment=self.cfg.environment,
                user_id=self.token.user_id,
                expires_in_s=round(self.token.expires_at - time.time()),
            )
            return self.token

    def _token_from(self, data: dict[str, Any]) -> Token:
        access = str(data["accessToken"])
        return Token(
            SecretStr(access),
            SecretStr(str(data.get("mdAccessToken") or access)),
            parse_time(str(data["expirationTime"])),
            int(data.get("userId") or (self.token.user_id if self.token else 0)),
        )

    async def renew(self) -> None:
        """GET /auth/renewaccesstoken; a fresh access token request if renewal is refused."""
        try:
            data = await self._send("GET", "/auth/renewaccesstoken", None, auth=True, reauth=False)
            if not isinstance(data, dict) or not data.get("accessToken"):
                raise AuthError("renewal refused")
            self.token = self._token_from(data)
            self.renewals += 1
            log.info("tradovate_token_renewed", expires_in_s=round(self.token.expires_at - time.time()))
        except (AuthError, TransientError, RateLimited) as exc:
            log.warning("tradovate_token_renewal_failed", error=type(exc).__name__)
            await self.authenticate()

    async def _renew_loop(self) -> None:
        while True:
            tok = self.token
            wait = 1.0 if tok is None else max(1.0, tok.expires_at - self.cfg.renew_before_s - time.time())
            await asyncio.sleep(wait)
            try:
                await self.renew()
            except (AuthError, TransientError, RateLimited, PenaltyError) as exc:
                log.error("tradovate_token_unavailable", error=str(exc))

    # -- calls --------------------------------------------------------------------------------------
    async def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """A read: safe to repeat, so transient errors are retried (back-off with jitter)."""
        return await self.retrying(lambda: self._send("GET", path, None, params=params), safe=True)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """One attempt (the caller decides whether a retry is safe)."""
        return await self._send("POST", path, body)

    async def retrying(self, call: Callable[[], Awaitable[T]], safe: bool) -> T:
        """Repeat ``call`` on rate limits (never executed) and, if ``safe``, on transient errors,
        with exponential back-off and jitter, for at most ``order_retry_s``."""
        kinds: tuple[type[BaseException], ...] = (RateLimited, TransientError) if safe else (RateLimited,)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(kinds),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            stop=stop_after_delay(self.cfg.order_retry_s),
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable")

    async def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        params: dict[str, Any] | None = None,
        auth: bool = True,
        reauth: bool = True,
    ) -> Any:
        body = None if body is None else dict(body)
        while True:
            await self.limiter.wait()
            headers = {"Accept": "application/json"}
            if auth:
                if self.token is None:
                    await self.authenticate()
                assert self.token is not None
                headers["Authorization"] = f"Bearer {self.token.access.get_secret_value()}"
            try:
                async with self.session.request(
                    method, self.base + path, json=body, params=params, headers=headers
                ) as resp:
                    status = resp.status
                    raw = await resp.read()
            except TimeoutError:
                raise TransientError(f"{method} {path}: timed out", ambiguous=method == "POST") from None
            except aiohttp.ClientError as exc:
                sent = not isinstance(exc, aiohttp.ClientConnectorError)
                raise TransientError(
                    f"{method} {path}: {type(exc).__name__}", ambiguous=sent and method == "POST"
                ) from None
            if status == 429:
                self.rate_limited += 1
                log.warning("tradovate_rate_limited", path=path)
                raise RateLimited(path, 1.0)
            if status == 401 and auth and reauth:
                log.warning("tradovate_token_refused", path=path)
                await self.authenticate()
                reauth = False
                continue
            if status >= 500:
                raise TransientError(f"{method} {path}: HTTP {status}", ambiguous=method == "POST")
            if status >= 400:
                raise RejectedError(f"{method} {path}: HTTP {status}: {raw[:200].decode(errors='replace')}")
            try:
                data = _json(raw)
            except ValueError:
                raise TransientError(f"{method} {path}: response is not JSON", ambiguous=True) from None
            if isinstance(data, dict) and "p-ticket" in data:
                self.penalties += 1
                wait_s = float(data.get("p-time") or 1)
                if data.get("p-captcha"):
                    raise PenaltyError(f"{method} {path}: penalty needs a captcha; wait about an hour")
                log.warning("tradovate_time_penalty", path=path, wait_s=wait_s)
                await asyncio.sleep(wait_s)
                body = dict(body or {})
                body["p-ticket"] = data["p-ticket"]
                continue
            return data


def _json(raw: bytes) -> Any:
    import json

    return json.loads(raw) if raw.strip() else None
