"""A ``trader`` process started by a test, its output read as it comes.

A pipe nobody reads holds 64 KiB. Once it is full the child's next log line blocks, and with it
the event loop that wrote it: the service stalls (no bars, no heartbeats, sockets dropped by the
server) only because its test was not listening until the end. Seen as a live e2e run taking
120 s instead of 17 (py-spy: the main thread in structlog's ``PrintLogger.msg``).
"""

from __future__ import annotations

import subprocess
import threading
from typing import IO, Any


def _drain(stream: IO[str], into: list[str]) -> None:
    for line in stream:
        into.append(line)


class Child(subprocess.Popen[str]):
    """``subprocess.Popen`` with text pipes drained by threads; ``communicate`` returns what was
    read (stdout, stderr), as Popen's would."""

    def __init__(self, args: Any, **kw: Any) -> None:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw["text"] = True
        super().__init__(args, **kw)
        self._read: dict[str, list[str]] = {}
        self._readers: list[threading.Thread] = []
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None:
                self._read[name] = []
                t = threading.Thread(target=_drain, args=(stream, self._read[name]), daemon=True)
                t.start()
                self._readers.append(t)

    def output(self) -> str:
        """What stdout has said so far."""
        return "".join(self._read.get("stdout", []))

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        self.wait(timeout)
        for t in self._readers:
            t.join(timeout)
        out = self._read.get("stdout")
        err = self._read.get("stderr")
        return ("".join(out) if out is not None else None, "".join(err) if err is not None else None)
