"""``trader tradovate-check``: the user's own conformance run against Tradovate's demo servers.

Before a strategy trades, its user should see that their credentials, account, contract and
network work with the real servers the way the daemon uses them. Each stage prints the raw
response (tokens, passwords and tickets masked) and a PASS/FAIL line; the stages follow
Tradovate's conformance-testing plan (docs/tradovate.md maps them to the tests):

1. ``auth``: ``POST auth/accesstokenrequest`` with the credentials from the environment;
2. ``renew``: ``GET auth/renewaccesstoken`` (the session is extended, not replaced);
3. ``accounts``: ``GET account/list`` and the configured account picked from it;
4. ``contract``: ``GET contract/find`` for ``tradovate.symbol``;
5. ``user-socket``: user-data WebSocket authorize + ``user/syncrequest``;
6. ``chart``: market-data WebSocket authorize + ``md/getChart`` for ``--seconds`` (60 = a minute
   of chart data: history then live updates);
7. ``test-order`` (only with ``--place-test-order``, only on demo): a Day limit buy far below the
   market with ``isAutomated: true``, then its cancel, then the order's final status.

Exit status: 0 every stage passed, 1 a stage failed, 2 the servers cannot be reached or the
configuration is unusable (no credentials, a test order asked for on live).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from trader.adapters.tradovate.rest import TradovateError, TradovateRest, TransientError
from trader.adapters.tradovate.socket import TradovateSocket
from trader.config import Settings
from trader.domain import TickGrid
from trader.errors import BrokerError, ConfigError

SECRET_KEYS = ("token", "password", "sec", "p-ticket", "authorization")


def mask(value: Any) -> Any:
    """Secrets out of a response before it is printed (keys naming a token, password, ...)."""
    if isinstance(value, dict):
        return {
            k: "***" if any(s in k.lower() for s in SECRET_KEYS) and v else mask(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


@dataclass
class Check:
    out: TextIO
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def raw(self, stage: str, what: str, data: Any) -> None:
        text = json.dumps(mask(data), default=str)
        self.out.write(f"  {stage} {what}: {text[:2000]}{' ...' if len(text) > 2000 else ''}\n")

    async def stage(self, name: str, body: Callable[[], Awaitable[str]]) -> bool:
        self.out.write(f"-- {name}\n")
        try:
            detail = await body()
        except TransientError as exc:
            raise BrokerError(f"tradovate-check: cannot reach the Tradovate servers ({exc})") from None
        except (TradovateError, KeyError, TypeError, ValueError) as exc:
            self.results.append((name, False, str(exc)))
            self.out.write(f"FAIL {name}: {exc}\n")
            return False
        self.results.append((name, True, detail))
        self.out.write(f"PASS {name}: {detail}\n")
        self.out.flush()
        return True


async def run_check(settings: Settings, out: TextIO, seconds: float, place_test_order: bool) -> int:
    cfg = settings.tradovate
    if place_test_order and cfg.environment != "demo":
        raise ConfigError("tradovate-check: --place-test-order only runs on tradovate.environment = demo")
    rest = TradovateRest(cfg)
    try:
        rest.credentials()
    except TradovateError as exc:
        raise ConfigError(f"tradovate-check: {exc}") from None
    chk = Check(out)
    out.write(f"tradovate-check: {cfg.environment} {rest.base} user {cfg.username!r} symbol {cfg.symbol!r}\n")
    ctx: dict[str, Any] = {}
    try:
        await rest.open_session()

        async def auth() -> str:
            tok = await rest.authenticate()
            chk.raw("auth", "response", rest.last_token_response)
            ctx["token"] = tok
            return f"user id {tok.user_id}, expires in {tok.expires_at - time.time():.0f}s"

        async def renew() -> str:
            before = rest.token
            tok = await rest.renew()
            chk.raw("renew", "response", rest.last_token_response)
            if tok is before:
                raise TradovateError("renewal returned no new token")
            return (
                f"renewed ({rest.renewals} renewal), new token expires in {tok.expires_at - time.time():.0f}s"
            )

        async def accounts() -> str:
            data = await rest.get("/account/list")
            chk.raw("accounts", "account/list", data)
            names = [a.get("name") for a in data or []]
            mine = [a for a in data or [] if not cfg.account or a.get("name") == cfg.account]
            if len(mine) != 1:
                raise TradovateError(f"tradovate.account {cfg.account!r} does not pick one of {names}")
            ctx["account"] = mine[0]
            return f"{len(names)} account(s) {names}; using {mine[0].get('name')!r} (id {mine[0].get('id')})"

        async def contract() -> str:
            data = await rest.get("/contract/find", {"name": cfg.symbol})
            chk.raw("contract", "contract/find", data)
            if not isinstance(data, dict) or "id" not in data:
                raise TradovateError(f"tradovate.symbol {cfg.symbol!r}: contract not found")
            ctx["contract"] = data
            return f"{cfg.symbol} is contract id {data['id']}"

        async def user_socket() -> str:
            sock = TradovateSocket(rest.ws_url, cfg, "user", lambda m: None, rest.gate)
            await sock.connect(rest.session, rest.require_token().access.get_secret_value())
            try:
                body = {"splitResponses": True, "accounts": [ctx["account"]["id"]], "entityTypes": ["order"]}
                d = await sock.request("user/syncrequest", body)
                counts = {k: len(v) for k, v in (d or {}).items() if isinstance(v, list)}
                chk.raw("user-socket", "user/syncrequest (entity counts)", counts)
                return f"authorized; sync returned {counts}"
            finally:
                await sock.close()

        async def chart() -> str:
            packets: list[dict[str, Any]] = []

            def on_event(m: dict[str, Any]) -> None:
                if m.get("e") == "chart":
                    packets.extend(p for p in m["d"].get("charts", ()) if isinstance(p, dict))

            sock = TradovateSocket(rest.md_url, cfg, "md", on_event, rest.gate)
            await sock.connect(rest.session, rest.require_token().md_access.get_secret_value())
            try:
                d = await sock.request(
                    "md/getChart",
                    {
                        "symbol": cfg.symbol,
                        "chartDescription": {
                            "underlyingType": "MinuteBar",
                            "elementSize": 1,
                            "elementSizeUnit": "UnderlyingUnits",
                            "withHistogram": False,
                        },
                        "timeRange": {"asMuchAsElements": 5},
                    },
                )
                chk.raw("chart", "md/getChart", d)
                await asyncio.sleep(seconds)
                if isinstance(d, dict) and d.get("realtimeId") is not None:
                    await sock.request("md/cancelChart", {"subscriptionId": d["realtimeId"]})
            finally:
                await sock.close()
            bars = [b for p in packets for b in p.get("bars", ())]
            history = any(p.get("eoh") for p in packets)
            if bars:
                chk.raw("chart", "last bar", bars[-1])
                ctx["last_close"] = float(bars[-1]["close"])
            if not bars or not history:
                raise TradovateError(
                    f"no chart data in {seconds:.0f}s ({len(packets)} packets, end of history: {history})"
                )
            return f"{len(bars)} bar updates in {len(packets)} packets over {seconds:.0f}s"

        async def test_order() -> str:
            last = ctx.get("last_close")
            if not last:
                raise TradovateError("no market price from the chart stage to keep the order far away")
            grid = TickGrid(settings.instrument.tick_size)
            price = grid.round(last * 0.5)  # half the market: a buy limit there does not fill
            acct = ctx["account"]
            body = {
                "accountSpec": acct["name"],
                "accountId": acct["id"],
                "clOrdId": f"trader-check-{int(time.time())}",
                "action": "Buy",
                "symbol": cfg.symbol,
                "orderQty": 1,
                "orderType": "Limit",
                "price": price,
                "timeInForce": "Day",
                "isAutomated": True,
            }
            placed = await rest.post("/order/placeorder", body)
            chk.raw("test-order", "order/placeorder", placed)
            if not isinstance(placed, dict) or placed.get("failureReason") not in (None, "", "Success"):
                raise TradovateError(f"placeorder refused: {placed}")
            oid = placed.get("orderId")
            if not oid:
                raise TradovateError(f"placeorder answered without an orderId: {placed}")
            cancelled = await rest.post("/order/cancelorder", {"orderId": oid, "isAutomated": True})
            chk.raw("test-order", "order/cancelorder", cancelled)
            if not isinstance(cancelled, dict) or cancelled.get("failureReason") not in (None, "", "Success"):
                raise TradovateError(f"cancelorder refused: {cancelled} (cancel order {oid} by hand!)")
            status = "?"
            for _ in range(10):
                item = await rest.get("/order/item", {"id": oid})
                status = str(item.get("ordStatus")) if isinstance(item, dict) else "?"
                if status == "Canceled":
                    break
                await asyncio.sleep(0.5)
            chk.raw("test-order", "order/item", {"id": oid, "ordStatus": status})
            if status != "Canceled":
                raise TradovateError(f"order {oid} is {status}, not Canceled: check it by hand")
            return f"limit buy at {price} placed (order {oid}) and cancelled"

        stages: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("auth", auth),
            ("renew", renew),
            ("accounts", accounts),
            ("contract", contract),
            ("user-socket", user_socket),
            ("chart", chart),
        ]
        if place_test_order:
            stages.append(("test-order", test_order))
        for name, body in stages:
            ok = await chk.stage(name, body)
            if not ok and name in ("auth", "accounts"):
                break  # nothing after these can work
    finally:
        await rest.close()
    passed = sum(ok for _, ok, _ in chk.results)
    out.write(f"tradovate-check: {passed}/{len(chk.results)} stages passed\n")
    return 0 if chk.results and passed == len(chk.results) else 1
