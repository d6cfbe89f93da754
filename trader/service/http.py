"""Health, metrics, state and control over HTTP (aiohttp), bound to 127.0.0.1 by default.

GET  /healthz   200 when ready and healthy, 503 otherwise; JSON with the reasons
GET  /metrics   Prometheus text format (prometheus_client), built from the engine at scrape time
GET  /state     JSON: position, stop, balance, equity, drawdown threshold, halt state, last bar
POST /halt      no new entries (positions and their stops stay)            } bearer token from
POST /resume    entries allowed again                                       } the environment
POST /flatten   close the position at the next bar and halt entries        } (constant-time)

Control requests need ``Authorization: Bearer <token>`` where the token is read from the
environment variable named by ``service.control_token_env``; without that variable control is
disabled (403). Every control request, accepted or refused, is journaled (table ``control``) with
its source address. A bad request gets a 4xx with a reason, never a crash.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from trader.domain import ACTION_NAMES

if TYPE_CHECKING:
    from trader.service.runner import Service

log = structlog.get_logger(__name__)

LATENCY_BUCKETS_S = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)
LLM_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_BODY = 4096


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
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        svc = self.service
        eng = svc.engine
        st = eng.stats
        pf = eng.portfolio

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
        lat = np.asarray(st.latencies_ns, dtype=np.float64) / 1e9
        yield _hist("trader_decision_latency_seconds", "Bar in to order intent out", lat, LATENCY_BUCKETS_S)
        yield counter("trader_orders", "Orders submitted", svc.orders)
        yield counter("trader_fills", "Fills received", eng._fill_seq)
        yield counter("trader_order_rejects", "Orders rejected by the broker", svc.order_rejects)
        g = GaugeMetricFamily("trader_position_contracts", "Signed position", value=pf.position)
        yield g
        equity = pf.balance_usd + pf.unrealized_usd
        yield GaugeMetricFamily("trader_equity_usd", "Balance + unrealized P&L", value=equity)
        yield GaugeMetricFamily("trader_balance_usd", "Realized balance", value=pf.balance_usd)
        yield GaugeMetricFamily(
            "trader_drawdown_room_usd",
            "Equity above the trailing drawdown threshold",
            value=equity - pf.threshold_usd,
        )
        yield GaugeMetricFamily("trader_halted", "1 while entries are halted", value=float(svc.halted))
        yield GaugeMetricFamily("trader_stale_data", "1 while bars are stale", value=float(svc.stale))
        feed = eng.feed
        if hasattr(feed, "reconnects"):
            f: Any = feed
            yield GaugeMetricFamily(
                "trader_feed_connected", "1 while the market-data feed is up", value=float(f.connected)
            )
            yield counter("trader_feed_reconnects", "Market-data reconnects", f.reconnects)
            yield counter("trader_feed_duplicate_bars", "Bar updates dropped as duplicates", f.duplicates)
            yield counter(
                "trader_feed_out_of_order_bars", "Bar updates dropped as out of order", f.out_of_order
            )
            yield counter(
                "trader_feed_malformed_frames", "Malformed frames skipped", f.malformed + f.bad_bars
            )
        broker: Any = eng.broker
        if hasattr(broker, "reconciles"):
            yield GaugeMetricFamily(
                "trader_broker_connected", "1 while the user-data stream is up", value=float(broker.connected)
            )
            yield GaugeMetricFamily(
                "trader_reconcile_mismatch",
                "1 while a broker/journal mismatch halts entries",
                value=float(bool(broker.mismatch)),
            )
            yield counter("trader_reconciles", "Reconciliations with the broker", broker.reconciles)
            yield counter("trader_broker_reconnects", "User-data reconnects", broker.reconnects)
            yield counter("trader_order_rejects_broker", "Orders refused by the broker", broker.rejects)
            yield counter(
                "trader_orders_found_after_ambiguous_send",
                "Ambiguous sends found placed",
                broker.adopted_orders,
            )
        age = svc.last_bar_age_s()
        yield GaugeMetricFamily(
            "trader_last_bar_age_seconds", "Since the last bar finished", value=age or 0.0
        )
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
    def __init__(self, service: Service) -> None:
        self.service = service
        cfg = service.settings.service
        self.host, self.port = cfg.http_host, cfg.http_port
        self.token = os.environ.get(cfg.control_token_env, "")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(service))
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/state", self.state)
        for action in ("halt", "resume", "flatten"):
            self.app.router.add_post(f"/{action}", self.control)
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
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("http_listening", host=self.host, port=self.port, control=bool(self.token))
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        body = self.service.health()
        return web.json_response(body, status=200 if body["ok"] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.state())

    async def control(self, request: web.Request) -> web.Response:
        action = request.path.strip("/")
        source = request.remote or "?"
        if not self.token:
            self.service.journal_control(action, source, "refused: control disabled")
            return web.json_response({"error": "control is disabled (no token configured)"}, status=403)
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            self.service.journal_control(action, source, "refused: bad token")
            log.warning("control_refused", action=action, source=source)
            return web.json_response(
                {"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
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
        result = self.service.control(action, source, reason)
        return web.json_response({"ok": True, "action": action, **result, "at": time.time()})
