"""Tradovate REST over aiohttp: the access token (request, renewal, time penalties), the request
limits shared with both WebSockets, and calls.

Errors, and what each means for a retry (partner docs: rate limits, penalty tickets,
access-token-request; OpenAPI spec 2026-08):

* a penalty ticket (HTTP 200 with ``p-ticket``/``p-time``): the request was *not* executed; wait
  ``p-time`` seconds and resend the identical body with the ``p-ticket`` field added. With
  ``p-captcha: true`` no program can answer it ("wait about one hour"): :class:`PenaltyError`,
  and the :class:`RequestGate` locks every request for ``lockout_s``.
* HTTP 429 (WebSocket ``s: 429``): the user is locked out for about an hour, and it "cannot be
  resolved programmatically": :class:`RateLimited` with ``lockout``; the gate refuses every
  request until ``lockout_s`` has passed (retrying inside the lockout only extends it).
* HTTP 423: "you're about to be locked out": not executed; :class:`RateLimited` without
  ``lockout``; the gate sends nothing for ``warning_backoff_s``, then carries on.
* HTTP 401: the token was refused, not executed: :meth:`TradovateRest.refresh` (renewal first, a
  new access token request only when renewal fails) and resend once.
* HTTP 5xx, a timeout or a dropped connection: :class:`TransientError`. For a GET this is safe
  to repeat; for an order the request may or may not have been executed (``ambiguous``), and
  only the caller knows how to find out (the broker looks for its client order id).

Sessions: every successful access token request opens a session, a user may hold 2 and a third
closes the oldest (with its sockets). So the market-data and user-data sockets share this one
token, renewal (``GET auth/renewaccesstoken``, "extends the current session without creating a
new one") runs ``renew_before_s`` before ``expirationTime``, and concurrent refusals (a session
revoked from outside drops both sockets at once) share a single refresh. New token requests are
spaced ``token_request_spacing_s`` apart and at most ``max_token_requests_per_hour`` (the docs
give 10 a minute on one page and 5 an hour on another: the stricter one holds).

Secrets (password, API secret, tokens) never appear in a log line, an exception or the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import structlog
from pydantic import SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
)
from tenacity import wait_exponential_jitter as expo

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
HOUR_S = 3600.0


class TradovateError(BrokerError):
    pass


class AuthError(TradovateError):
    """Credentials refused or missing, or a socket's authorization refused; never the secret."""


class RateLimited(TradovateError):
    """Not executed because of a limit. ``lockout``: HTTP 429 or a captcha penalty (about an hour,
    nothing to retry); otherwise HTTP 423 (slow down). ``retry_at``: monotonic time from which a
    request may be sent again."""

    def __init__(self, msg: str, retry_at: float, lockout: bool) -> None:
        super().__init__(msg)
        self.retry_at = retry_at
        self.lockout = lockout


class PenaltyError(RateLimited):
    """A penalty ticket that needs a captcha: a lockout (no program can answer it)."""


class TransientError(TradovateError):
    """5xx, timeout, connection lost. ``ambiguous``: the server may have executed the request."""

    def __init__(self, msg: str, ambiguous: bool) -> None:
        super().__init__(msg)
        self.ambiguous = ambiguous


class RejectedError(TradovateError):
    """A business-level refusal (``failureReason``/``errorText``, HTTP 4xx): not retried."""


def endpoints(cfg: TradovateConfig) -> tuple[str, str, str]:
    rest, ws, md = URLS[cfg.environment]
    return (cfg.rest_url or rest).rstrip("/"), cfg.ws_url or ws, cfg.md_url or md


def parse_time(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _clock(monotonic_at: float) -> str:
    """A monotonic instant as UTC wall-clock time (for messages)."""
    wall = time.time() + (monotonic_at - time.monotonic())
    return datetime.fromtimestamp(wall, UTC).strftime("%H:%M:%S UTC")


@dataclass(slots=True)
class Token:
    access: SecretStr
    md_access: SecretStr
    expires_at: float  # epoch seconds
    user_id: int


class RequestGate:
    """Every request of one user (REST and both sockets) passes here: at most
    ``max_requests_per_s`` spaced evenly, at most ``max_requests_per_hour`` in any rolling hour,
    nothing at all during a server lockout, nothing during a 423 back-off."""

    def __init__(self, cfg: TradovateConfig) -> None:
        self.cfg = cfg
        self.interval = 1.0 / cfg.max_requests_per_s
        self._next = 0.0
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()
        self.locked_until = 0.0
        self.lock_reason = ""
        self.slow_until = 0.0
        self.slow_reason = ""
        self.lockouts = 0
        self.warnings = 0
        self.budget_waits = 0

    def lock(self, reason: str, seconds: float | None = None) -> float:
        """The server locked us out (429, captcha): nothing is sent until the returned time."""
        now = time.monotonic()
        if now >= self.locked_until:
            self.lockouts += 1
        self.locked_until = max(self.locked_until, now + (seconds or self.cfg.lockout_s))
        self.lock_reason = reason
        log.error("tradovate_locked_out", reason=reason, until=_clock(self.locked_until))
        return self.locked_until

    def slow(self, reason: str) -> float:
        """HTTP 423, the warning before a lockout: send nothing for ``warning_backoff_s``."""
        self.warnings += 1
        self.slow_until = max(self.slow_until, time.monotonic() + self.cfg.warning_backoff_s)
        self.slow_reason = reason
        log.warning("tradovate_request_warning", reason=reason, until=_clock(self.slow_until))
        return self.slow_until

    def used_this_hour(self) -> int:
        now = time.monotonic()
        while self._sent and now - self._sent[0] >= HOUR_S:
            self._sent.popleft()
        return len(self._sent)

    def blocked(self) -> str:
        """Why entries should not be sent now ("" = nothing in the way)."""
        now = time.monotonic()
        if now < self.locked_until:
            return f"tradovate lockout until {_clock(self.locked_until)}: {self.lock_reason}"
        if now < self.slow_until:
            return f"tradovate asked to slow down until {_clock(self.slow_until)}: {self.slow_reason}"
        used, budget = self.used_this_hour(), self.cfg.max_requests_per_hour
        if used >= 0.9 * budget:
            return f"request budget nearly spent: {used} of {budget} this hour"
        return ""

    def check(self, what: str) -> None:
        """Raise :class:`RateLimited` at once during a lockout (a request would only extend it)."""
        if time.monotonic() < self.locked_until:
            raise RateLimited(
                f"{what}: not sent, locked out until {_clock(self.locked_until)} ({self.lock_reason})",
                self.locked_until,
                lockout=True,
            )

    async def wait(self, what: str) -> None:
        """Wait for this request's slot (back-off, spacing, hourly budget); raise during a lockout."""
        async with self._lock:
            while True:
                self.check(what)
                now = time.monotonic()
                if now < self.slow_until:
                    await asyncio.sleep(self.slow_until - now)
                    continue
                if self.used_this_hour() >= self.cfg.max_requests_per_hour:
                    self.budget_waits += 1
                    wait = self._sent[0] + HOUR_S - now
                    log.warning("tradovate_request_budget_spent", what=what, wait_s=round(wait, 1))
                    await asyncio.sleep(min(wait, 5.0))
                    continue
                if self._next > now:
                    await asyncio.sleep(self._next - now)
                now = time.monotonic()
                self._next = max(now, self._next) + self.interval
                self._sent.append(now)
                return


def reconnecting(
    cfg: TradovateConfig, event: str, retry_on: type[BaseException] | tuple[type[BaseException], ...]
) -> AsyncRetrying:
    """A socket's reconnect attempts: back-off with jitter (never inside a limit), each wait
    logged as ``event`` with the attempt and the error."""
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=retry_wait(cfg.reconnect_initial_s, cfg.reconnect_max_s),
        before_sleep=lambda rs: log.warning(
            event,
            attempt=rs.attempt_number,
            error=str(rs.outcome.exception()) if rs.outcome else "",
        ),
    )


def retry_wait(first_s: float, max_s: float) -> Callable[[RetryCallState], float]:
    """Tenacity wait: exponential back-off with jitter, but never before a limit's ``retry_at``."""
    backoff = expo(multiplier=first_s, max=max_s, jitter=first_s)

    def wait(rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        base = backoff(rs)
        if isinstance(exc, RateLimited):
            return max(base, exc.retry_at - time.monotonic())
        return base

    return wait


class TradovateRest:
    """One authenticated REST session. ``start()`` gets the token and keeps renewing it; the
    sockets authorize with the same token and share the :class:`RequestGate`."""

    def __init__(self, cfg: TradovateConfig) -> None:
        self.cfg = cfg
        self.base, self.ws_url, self.md_url = endpoints(cfg)
        self.token: Token | None = None
        self.gate = RequestGate(cfg)
        self._session: aiohttp.ClientSession | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._auth_lock = asyncio.Lock()
        self._token_requests: deque[float] = deque()
        self.token_wait_reason = ""  # while a new token request waits for its turn
        self.last_token_response: Any = None  # raw (secrets inside): for tradovate-check only
        self.penalties = 0
        self.rate_limited = 0
        self.renewals = 0
        self.token_requests = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    async def open_session(self) -> None:
        """The HTTP session only (no token yet)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)

    async def start(self) -> None:
        await self.open_session()
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

    def require_token(self) -> Token:
        if self.token is None:
            raise AuthError("not authenticated")
        return self.token

    def blocked(self) -> str:
        """Why nothing new should be sent now ("" = nothing in the way)."""
        return self.gate.blocked() or self.token_wait_reason

    # -- token --------------------------------------------------------------------------------------
    def credentials(self) -> dict[str, Any]:
        """The access token request's body; AuthError naming what is missing."""
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
        """The token to use: the current one, or a new access token request (at start)."""
        async with self._auth_lock:
            if self.token is not None and self.token.expires_at > time.time():
                return self.token
            return await self._request_token()

    async def refresh(self, refused: Token | None) -> Token:
        """``refused`` was not accepted (HTTP 401, a socket's authorization refused): renew it,
        and request a new token only when renewal fails. Callers that saw the same token refused
        share one refresh (a revoked session drops both sockets at once)."""
        async with self._auth_lock:
            current = self.token
            if current is not None and current is not refused and current.expires_at > time.time():
                return current
            if current is not None:
                try:
                    return await self._renew_locked()
                except (AuthError, RejectedError) as exc:  # refused: the session is gone
                    log.warning("tradovate_token_renewal_failed", error=type(exc).__name__)
                # a timeout or 5xx is raised: the caller retries; a new session would close one
            return await self._request_token()

    async def _request_token(self) -> Token:
        """POST /auth/accesstokenrequest within the token request limits, answering time
        penalties; AuthError on refusal, PenaltyError (and a lockout) on a captcha."""
        spacing, per_hour = self.cfg.token_request_spacing_s, self.cfg.max_token_requests_per_hour
        while True:
            now = time.monotonic()
            while self._token_requests and now - self._token_requests[0] >= HOUR_S:
                self._token_requests.popleft()
            ready = now
            if self._token_requests:
                ready = self._token_requests[-1] + spacing
            if len(self._token_requests) >= per_hour:
                ready = max(ready, self._token_requests[0] + HOUR_S)
            if ready <= now:
                break
            self.token_wait_reason = f"next access token request allowed at {_clock(ready)}"
            log.warning("tradovate_token_request_deferred", wait_s=round(ready - now, 1))
            await asyncio.sleep(min(ready - now, 5.0))
        self.token_wait_reason = ""
        self._token_requests.append(time.monotonic())
        self.token_requests += 1
        data = self.last_token_response = await self._send(
            "POST", "/auth/accesstokenrequest", self.credentials(), auth=False
        )
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
        try:
            expires = parse_time(str(data["expirationTime"]))
        except (KeyError, ValueError):
            raise AuthError("tradovate token response has no valid expirationTime") from None
        return Token(
            SecretStr(access),
            SecretStr(str(data.get("mdAccessToken") or access)),
            expires,
            int(data.get("userId") or (self.token.user_id if self.token else 0)),
        )

    async def renew(self) -> Token:
        """GET /auth/renewaccesstoken; a new access token request only if renewal is refused
        (a timeout or 5xx is raised and retried later: a new token would open a new session)."""
        async with self._auth_lock:
            try:
                return await self._renew_locked()
            except (AuthError, RejectedError) as exc:
                log.warning("tradovate_token_renewal_failed", error=type(exc).__name__)
                return await self._request_token()

    async def _renew_locked(self) -> Token:
        data = self.last_token_response = await self._send(
            "GET", "/auth/renewaccesstoken", None, auth=True, reauth=False
        )
        if not isinstance(data, dict) or not data.get("accessToken"):
            raise AuthError("renewal refused")
        self.token = self._token_from(data)
        self.renewals += 1
        log.info("tradovate_token_renewed", expires_in_s=round(self.token.expires_at - time.time()))
        return self.token

    async def _renew_loop(self) -> None:
        while True:
            tok = self.token
            wait = 1.0 if tok is None else max(1.0, tok.expires_at - self.cfg.renew_before_s - time.time())
            await asyncio.sleep(wait)
            try:
                await self.renew()
            except TradovateError as exc:
                log.error("tradovate_token_unavailable", error=str(exc))
                await asyncio.sleep(max(1.0, self.cfg.reconnect_max_s))

    # -- calls --------------------------------------------------------------------------------------
    async def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """A read: safe to repeat, so transient errors and a 423 are retried (back-off, jitter)."""
        return await self.retrying(lambda: self._send("GET", path, None, params=params), safe=True)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """One attempt (the caller decides whether a retry is safe)."""
        return await self._send("POST", path, body)

    async def retrying(self, call: Callable[[], Awaitable[T]], safe: bool) -> T:
        """Repeat ``call`` after a 423 (never executed) and, if ``safe``, on transient errors,
        with exponential back-off and jitter, for at most ``order_retry_s``. A lockout is raised
        at once: retrying inside it only extends it."""

        def again(exc: BaseException) -> bool:
            if isinstance(exc, RateLimited):
                return not exc.lockout and exc.retry_at - time.monotonic() < self.cfg.order_retry_s
            return safe and isinstance(exc, TransientError)

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(again),
            wait=retry_wait(0.2, 5.0),
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
        what = f"{method} {path}"
        while True:
            await self.gate.wait(what)
            headers = {"Accept": "application/json"}
            used = self.token
            if auth:
                if used is None:
                    raise AuthError(f"{what}: no access token (not authenticated)")
                headers["Authorization"] = f"Bearer {used.access.get_secret_value()}"
            try:
                async with self.session.request(
                    method, self.base + path, json=body, params=params, headers=headers
                ) as resp:
                    status = resp.status
                    raw = await resp.read()
            except TimeoutError:
                raise TransientError(f"{what}: timed out", ambiguous=method == "POST") from None
            except aiohttp.ClientError as exc:
                sent = not isinstance(exc, aiohttp.ClientConnectorError)
                raise TransientError(
                    f"{what}: {type(exc).__name__}", ambiguous=sent and method == "POST"
                ) from None
            if status == 429:
                self.rate_limited += 1
                until = self.gate.lock(f"HTTP 429 on {what}")
                raise RateLimited(f"{what}: HTTP 429, locked out until {_clock(until)}", until, lockout=True)
            if status == 423:
                until = self.gate.slow(f"HTTP 423 on {what}")
                raise RateLimited(
                    f"{what}: HTTP 423, slowing down until {_clock(until)}", until, lockout=False
                )
            if status == 401 and auth and reauth:
                log.warning("tradovate_token_refused", path=path)
                await self.refresh(used)
                reauth = False
                continue
            if status == 401:
                raise AuthError(f"{what}: HTTP 401 (token refused)")
            if status >= 500:
                raise TransientError(f"{what}: HTTP {status}", ambiguous=method == "POST")
            if status >= 400:
                raise RejectedError(f"{what}: HTTP {status}: {raw[:200].decode(errors='replace')}")
            try:
                data = _json(raw)
            except ValueError:
                raise TransientError(f"{what}: response is not JSON", ambiguous=True) from None
            if isinstance(data, dict) and "p-ticket" in data:
                self.penalties += 1
                wait_s = float(data.get("p-time") or 1)
                if data.get("p-captcha"):
                    until = self.gate.lock(f"penalty with captcha on {what}")
                    raise PenaltyError(
                        f"{what}: penalty needs a captcha; no request until {_clock(until)}",
                        until,
                        lockout=True,
                    )
                log.warning("tradovate_time_penalty", path=path, wait_s=wait_s)
                await asyncio.sleep(wait_s)
                body = dict(body or {})
                body["p-ticket"] = data["p-ticket"]
                continue
            return data


def _json(raw: bytes) -> Any:
    import json

    return json.loads(raw) if raw.strip() else None
