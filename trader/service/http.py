"""Health, metrics, state and control over HTTP (aiohttp), bound to 127.0.0.1 by default.

GET  /healthz   200 when ready and healthy, 503 otherwise; JSON with the reasons; ``status`` is
                "degraded" (still 200) while the broker is locked out or penalised: entries are
                halted and it ends by itself, so a restart would not help
GET  /metrics   Prometheus text format (prometheus_client), built from the engine at scrape time
GET  /state     JSON: position, stop, balance, equity, drawdown threshold, halt state, last bar
POST /halt      no new entries (positions and their stops stay)            } bearer token from
POST /resume    entries allowed again                                       } the environment
POST /flatten   close the position at the next bar and halt entries        } (constant-time)
POST /kill      kill switch: flatten and no entries until /rearm            }
POST /rearm     release the operator kill switch                            }
GET  /          the live dashboard (trader/service/static; read-only: its buttons send the token
                the user types to the control endpoints above, like any other client)
GET  /events    the dashboard's server-sent events (see :mod:`trader.service.dashboard`)
GET  /dashboard/state   the dashboard's snapshot as JSON (last decisions, equity curve, status)

Control requests need ``Authorization: Bearer <token>`` where the token is read from the
environment variable named by ``service.control_token_env``; without that variable control is
disabled (403). Every accepted control request is journaled (table ``control``) with its source
address; refused ones too, up to ``REFUSALS_JOURNALED`` per source a minute: beyond that a source
gets 429 and its refusals are only counted (``trader_control_refused``), and the next journaled
refusal says how many were not. A malformed header (not printable ASCII) is a 400. A bad request
gets a 4xx with a reason, never a crash.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from trader.controls import OPERATOR_ACTIONS
from trader.domain import ACTION_NAMES
from trader.service.alerts import NotificationCollector, NotificationStats
from trader.service.dashboard import SECURITY_HEADERS, dumps, service_status
from trader.service.dashboard import asset as read_asset

if TYPE_CHECKING:
    from trader.service.dashboard import DashboardHub
    from trader.service.operator import Operator

log = structlog.get_logger(__name__)

LATENCY_BUCKETS_S = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)
LLM_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_BODY = 4096
SHUTDOWN_TIMEOUT_S = 3.0  # open requests at stop (an event stream is closed before this)
REFUSALS_JOURNALED = 5  # per source per minute; more are counted, not journaled
REFUSAL_WINDOW_S = 60.0


class RefusalLimiter:
    """Refused control requests per source: the first few a minute are journaled and logged, the
    rest answered 429 and counted, so a flood cannot fill the journal or the log."""

    def __init__(self, per_window: int = REFUSALS_JOURNALED, window_s: float = REFUSAL_WINDOW_S) -> None:
        self.per_window, self.window_s = per_window, window_s
        self._seen: dict[str, deque[float]] = {}
        self._suppressed: dict[str, int] = {}
        self.total: dict[str, int] = {}  # reason → refusals (journaled or not)
        self.suppressed_total = 0

    def admit(self, source: str, why: str) -> tuple[bool, int]:
        """(journal this one?, how many of this source were suppressed since its last row)."""
        self.total[why] = self.total.get(why, 0) + 1
        now = time.monotonic()
        q = self._seen.setdefault(source, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        if len(q) >= self.per_window:
            self._suppressed[source] = self._suppressed.get(source, 0) + 1
            self.suppressed_total += 1
            return False, 0
        q.append(now)
        if len(self._seen) > 10_000:  # many sources: forget the idle ones
            for k in [k for k, v in self._seen.items() if not v or now - v[-1] >= self.window_s]:
                self._seen.pop(k, None)
                self._suppressed.pop(k, None)
        return True, self._suppressed.pop(source, 0)


def _hist(name: str, doc: str, values_s: np.ndarray, buckets: tuple[float, ...]) -> HistogramMetricFamily:
    counts = [int((values_s <= b).sum()) for b in buckets]
    h = HistogramMetricFamily(name, doc)
    h.add_metric(
        [],
        [(repr(b), c) for b, c in zip(buckets, counts, strict=True)] + [("+Inf", len(values_s))],
        float(values_s.sum()),
    )
    return h


class EngineCollector(Collector):
    def __init__(self, operator: Operator, refusals: RefusalLimiter | None = None) -> None:
        self.operator = operator
        self.refusals = refusals

    def collect(self) -> Iterator[Any]:
        op = self.operator
        eng = op.engine
        st = eng.stats
        pf = eng.portfolio
        controls = op.controls

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def labelled(name: str, doc: str, label: str, items: dict[str, int]) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=[label])
            for k, v in sorted(items.items()):
                c.add_metric([k], v)
            return c

        yield counter("trader_bars", "Bars decided", st.bars)
        yield labelled("trader_bars_rejected", "Bars rejected by validation", "reason", st.rejected)
        yield labelled("trader_vetoes", "Risk vetoes by rule", "rule", st.vetoes)
        yield labelled("trader_fusion_decisions", "Decisions by fusion method", "method", st.fusion_methods)
        yield labelled(
            "trader_actions",
            "Final actions",
            "action",
            {ACTION_NAMES[i]: n for i, n in enumerate(st.actions)},
        )
        lat = np.asarray(st.latencies_ns[-10_000:], dtype=np.float64) / 1e9
        yield _hist("trader_decision_latency_seconds", "Bar in to order intent out", lat, LATENCY_BUCKETS_S)
        yield counter("trader_orders", "Orders submitted", st.orders)
        yield counter("trader_fills", "Fills received", st.fills)
        yield counter("trader_order_rejects", "Orders rejected by the broker", st.order_rejects)
        yield counter(
            "trader_policy_invalid",
            "Bars whose policy answer was unusable (decided as HOLD)",
            st.policy_invalid,
        )
        yield GaugeMetricFamily("trader_position_contracts", "Signed position", value=pf.position)
        equity = pf.balance_usd + pf.unrealized_usd
        yield GaugeMetricFamily("trader_equity_usd", "Balance + unrealized P&L", value=equity)
        yield GaugeMetricFamily("trader_balance_usd", "Realized balance", value=pf.balance_usd)
        yield GaugeMetricFamily(
            "trader_drawdown_room_usd",
            "Equity above the trailing drawdown threshold",
            value=equity - pf.threshold_usd,
        )
        yield GaugeMetricFamily(
            "trader_halted", "1 while entries are halted (any cause)", value=float(controls.halted)
        )
        yield GaugeMetricFamily(
            "trader_operator_halt",
            "1 while an operator halt is on",
            value=float(bool(controls.operator_halt)),
        )
        yield GaugeMetricFamily("trader_stale_data", "1 while bars are stale", value=float(controls.stale))
        yield GaugeMetricFamily(
            "trader_journal_ok",
            "1 while the journal can be written",
            value=float(op.journal_problem() is None),
        )
        yield GaugeMetricFamily(
            "trader_reconcile_mismatch",
            "1 while a broker/journal mismatch halts entries",
            value=float(bool(controls.reconcile_mismatch)),
        )
        f = eng.feed.health()
        yield GaugeMetricFamily("trader_feed_connected", "1 while the feed is up", value=float(f.connected))
        for k, v in f.counters:
            yield counter(f"trader_feed_{k}", f"Feed: {k.replace('_', ' ')}", v)
        b = eng.broker.health()
        yield GaugeMetricFamily(
            "trader_broker_connected", "1 while the broker is up", value=float(b.connected)
        )
        yield GaugeMetricFamily(
            "trader_broker_blocked",
            "1 while the broker takes no new orders (rate-limit lockout, captcha penalty)",
            value=float(bool(b.degraded)),
        )
        yield GaugeMetricFamily(
            "trader_degraded", "1 while the service is up but limited", value=float(bool(op.degraded()))
        )
        for k, v in b.counters:
            yield counter(f"trader_broker_{k}", f"Broker: {k.replace('_', ' ')}", v)
        age = op.last_bar_age_s()
        yield GaugeMetricFamily(
            "trader_last_bar_age_seconds", "Since the last bar finished", value=age or 0.0
        )
        if self.refusals is not None:
            yield labelled(
                "trader_control_refused", "Control requests refused", "reason", self.refusals.total
            )
            yield counter(
                "trader_control_refused_unjournaled",
                "Refused control requests beyond the per-source journal limit",
                self.refusals.suppressed_total,
            )
        yield counter("trader_reloads", "Config reloads applied", op.reloads)
        yield counter("trader_reload_rejects", "Config reloads rejected", op.reload_rejects)
        adv = eng.advisor
        if adv is not None:
            a = adv.stats  # type: ignore[attr-defined]
            yield counter("trader_llm_queries", "LLM queries", a.queries)
            yield counter("trader_llm_errors", "LLM errors", a.errors)
            yield counter("trader_llm_timeouts", "LLM timeouts", a.timeouts)
            yield counter("trader_llm_unparseable", "LLM answers that did not parse", a.unparseable)
            yield counter("trader_llm_skipped_busy", "Triggers skipped while a query ran", a.skipped_busy)
            yield _hist(
                "trader_llm_latency_seconds", "LLM answer latency", np.asarray(a.latencies_s), LLM_BUCKETS_S
            )
            rate = st.agreements / st.with_advice if st.with_advice else 0.0
            yield GaugeMetricFamily(
                "trader_llm_agreement_ratio", "RL and LLM named the same action", value=rate
            )


class ControlServer:
    def __init__(
        self,
        operator: Operator,
        stopping: Callable[[], bool],
        dashboard: DashboardHub | None = None,
        notifications: NotificationStats | None = None,
    ) -> None:
        self.operator = operator
        self.stopping = stopping
        cfg = operator.settings.service
        self.host, self.port = cfg.http_host, cfg.http_port
        self.token = os.environ.get(cfg.control_token_env, "")
        self.registry = CollectorRegistry(auto_describe=False)
        self.refusals = RefusalLimiter()
        self.registry.register(EngineCollector(operator, self.refusals))
        # trader_notifications_*: served at zero when notifications are off (alerts see a series)
        self.registry.register(NotificationCollector(notifications))
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/state", self.state)
        for action in OPERATOR_ACTIONS:
            self.app.router.add_post(f"/{action}", self.control)
        self.dashboard = dashboard
        if dashboard is not None:
            self.app.router.add_get("/", self.dashboard_page)
            self.app.router.add_get("/static/{name}", self.dashboard_asset)
            self.app.router.add_get("/dashboard/state", self.dashboard_state)
            self.app.router.add_get("/events", self.dashboard_events)
            self.app.on_shutdown.append(self._close_streams)  # before open requests are awaited
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response(  # 404, 405, 413 ... as JSON with the reason
                {"error": exc.reason, "path": request.path},
                status=exc.status,
                headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
            )
        except Exception as exc:  # a handler bug must never take the daemon down
            log.error("http_handler_error", path=request.path, error=repr(exc))
            return web.json_response({"error": "internal error"}, status=500)

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("http_listening", host=self.host, port=self.port, control=bool(self.token))
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        body = self.operator.health(self.stopping())
        return web.json_response(body, status=200 if body["ok"] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.operator.state())

    # -- the live dashboard (read-only; controls go through :meth:`control` like any client) --------
    def _dashboard_status(self) -> dict[str, Any]:
        return service_status(self.operator, self.stopping(), bool(self.token))

    def _asset_response(self, name: str) -> web.Response:
        try:
            body, content_type = read_asset(name)
        except (KeyError, FileNotFoundError):
            raise web.HTTPNotFound(reason=f"no dashboard file {name!r}") from None
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS)

    async def dashboard_page(self, request: web.Request) -> web.Response:
        return self._asset_response("dashboard.html")

    async def dashboard_asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "dashboard.html":
            raise web.HTTPNotFound(reason="the dashboard is at /")
        return self._asset_response(name)

    async def dashboard_state(self, request: web.Request) -> web.Response:
        assert self.dashboard is not None
        body = self.dashboard.snapshot(self._dashboard_status())
        return web.json_response(body, headers=SECURITY_HEADERS, dumps=dumps)

    async def dashboard_events(self, request: web.Request) -> web.StreamResponse:
        assert self.dashboard is not None
        return await self.dashboard.stream(request, self._dashboard_status)

    async def _close_streams(self, app: web.Application) -> None:
        if self.dashboard is not None:
            await self.dashboard.close_streams()

    def _refuse(self, action: str, source: str, why: str, status: int, text: str) -> web.Response:
        journal, suppressed = self.refusals.admit(source, why)
        if not journal:
            return web.json_response(
                {"error": f"too many refused control requests from {source}; try again later"},
                status=429,
                headers={"Retry-After": str(int(self.refusals.window_s))},
            )
        note = f" (+{suppressed} more refused, not journaled)" if suppressed else ""
        self.operator.refused(action, source, why + note)
        log.warning("control_refused", action=action, source=source, why=why, suppressed=suppressed)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return web.json_response({"error": text}, status=status, headers=headers)

    async def control(self, request: web.Request) -> web.Response:
        action = request.path.strip("/")
        source = request.remote or "?"
        if not self.token:
            return self._refuse(
                action, source, "control disabled", 403, "control is disabled (no token configured)"
            )
        auth = request.headers.get("Authorization", "")
        if auth and (not auth.isascii() or not auth.isprintable()):
            return self._refuse(
                action, source, "malformed Authorization header", 400, "malformed Authorization header"
            )
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return self._refuse(action, source, "bad token", 401, "missing or wrong bearer token")
        reason = ""
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    payload = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return web.json_response(
                        {"error": 'body must be JSON, e.g. {"reason": "..."}'}, status=400
                    )
                if not isinstance(payload, dict) or not isinstance(payload.get("reason", ""), str):
                    return web.json_response(
                        {"error": "body must be an object with a string 'reason'"}, status=400
                    )
                reason = payload.get("reason", "")[:200]
        result = self.operator.control(action, source, reason)
        return web.json_response({"ok": True, "action": action, **result, "at": time.time()})
