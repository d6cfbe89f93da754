"""systemd's notify protocol, spoken directly: one datagram per message to ``$NOTIFY_SOCKET``.

No dependency: the protocol is newline-separated ``KEY=VALUE`` assignments sent as a single
datagram on an ``AF_UNIX``/``SOCK_DGRAM`` socket whose path is in ``$NOTIFY_SOCKET`` (a leading
``@`` means the abstract namespace). Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a
no-op. ``WatchdogSec=`` reaches the process as ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``).

The watchdog is fed by :class:`LoopWatchdog` from the bar loop's own health, never by a bare
timer: a ping is sent only while the event loop is responsive *and* the engine is not stuck inside
a bar *and* the feed has delivered a bar (or a heartbeat) recently enough.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(addr)
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self.sent = 0
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else None

    def send(self, **fields: str | int) -> bool:
        """Send one message (``READY=1``, ``STATUS=...``): True if a datagram went out."""
        if not self.enabled:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self._addr)
        except OSError as exc:  # systemd gone or socket full: never fatal for trading
            log.warning("sd_notify_failed", error=str(exc))
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text.replace("\n", " "))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class LoopWatchdog:
    """Pings ``WATCHDOG=1`` at half the watchdog interval while ``healthy()`` says so.

    ``healthy`` returns None when all is well, or the reason it is not; a reason is logged once
    and no ping is sent, so systemd restarts the service if the condition outlasts ``WatchdogSec``.
    Because this runs as a task on the same event loop, a blocked loop sends nothing either.
    """

    def __init__(
        self, notifier: Notifier, healthy: Callable[[], str | None], status: Callable[[], str] | None = None
    ) -> None:
        self.notifier = notifier
        self.healthy = healthy
        self.status = status
        self.interval_s = (notifier.watchdog_s or 0.0) / 2.0
        self.pings = 0
        self.withheld = 0
        self._reason: str | None = None

    async def run(self) -> None:
        if not self.notifier.enabled:
            return
        interval = self.interval_s or 5.0  # no watchdog configured: still refresh STATUS=
        while True:
            await asyncio.sleep(interval)
            self.tick()

    def tick(self) -> None:
        reason = self.healthy()
        if reason is None:
            if self.interval_s:
                self.notifier.watchdog()
                self.pings += 1
            if self._reason is not None:
                log.info("watchdog_healthy_again", was=self._reason)
            self._reason = None
        else:
            self.withheld += 1
            if reason != self._reason:
                log.warning("watchdog_withheld", reason=reason)
            self._reason = reason
        if self.status is not None:
            self.notifier.status(self.status())
