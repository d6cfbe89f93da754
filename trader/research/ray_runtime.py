"""Ray for research runs (sweeps, walk-forward): an embedded local Ray, or a cluster.

``connect(None, workers)`` starts Ray inside this process on this machine (``ray.init`` with
``num_cpus=workers``: nothing to set up); ``connect("host:6379")`` joins a running cluster through
its GCS address (this process is the driver), ``connect("ray://host:10001")`` through the Ray
Client server (Ray Tune then runs its loop on the head node). Either way Ray's own output is kept
down (no dashboard, no worker logs forwarded, errors only).

On a cluster every node must have ``trader`` installed at the same version as the driver
(:func:`check_workers` fails clearly otherwise), and the data, config and policy files a run names
must exist at the same paths on every node. Ray 2.5x clusters use token authentication when a token
exists; a driver joining by address then needs ``RAY_AUTH_MODE=token`` and the cluster's token
(Ray never enables it for an explicit address by itself).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import tenacity

from trader import __version__
from trader.errors import TraderError

RuntimeKind = Literal["embedded", "cluster", "client"]
# The object store holds only small configs and results here; Ray's default (30% of memory) would
# reserve gigabytes of /dev/shm for nothing.
EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024**2


class RayError(TraderError):
    """Ray could not be started or reached, or its workers cannot run this trader."""


@dataclass(frozen=True)
class RayRuntime:
    """A connection to Ray: its kind, address, the CPUs the cluster offers, how many runs go at
    once (``workers``), and whether this object started it (and so shuts it down)."""

    kind: RuntimeKind
    address: str | None
    cpus: int
    workers: int
    owned: bool

    def close(self) -> None:
        """Shut Ray down if this runtime started or joined it (a shared one is left running)."""
        if self.owned:
            import ray

            ray.shutdown()


def _quiet_environment() -> None:
    # Before ray is imported by anything that reads these: no usage reporting, and Tune's
    # legacy reporter, which honours verbose=0 (the new one prints every trial error anyway).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


def _import_beside(modules: Sequence[str]) -> threading.Thread | None:
    """Import ``modules`` in a thread: ``ray.init`` spends its seconds waiting for Ray's processes
    to start, time in which the driver's own imports (Ray Tune, Optuna, plotting: about a second
    here) can be done. A module that fails to import here is imported again, and fails loudly,
    where it is used."""
    if not modules:
        return None

    def target() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=target, name="ray-driver-imports", daemon=True)
    thread.start()
    return thread


def connect(
    address: str | None = None, workers: int | None = None, preload: Sequence[str] = ()
) -> RayRuntime:
    """Start or join Ray. ``address`` None: an embedded Ray on this machine with ``workers`` CPUs
    (default: all); ``"host:port"``: a cluster's GCS; ``"ray://host:port"``: its Ray Client
    server. ``workers`` caps runs at once (default: the cluster's CPUs). When Ray is already
    initialised in this process it is used as is and left running (``owned`` False).
    ``preload``: modules the caller needs next, imported while Ray starts."""
    _quiet_environment()
    import ray

    importing = _import_beside(preload)
    try:
        return _connect(ray, address, workers)
    finally:
        if importing is not None:
            importing.join()


# Ray's proxier forks one server process per client; that process sometimes dies as it starts
# (ray-project/ray#63202, a gRPC fork race, ~7% of connections) and ray.init raises this. A new
# connection gets a new process: connecting again is safe.
_CLIENT_SERVER_DIED = "Starting Ray client server failed"


def _client_init(ray: Any, address: str, common: dict[str, Any], attempts: int = 3) -> None:
    """``ray.init`` through a Ray Client server, again (up to ``attempts`` in all, 1 s apart) when
    the server's process for this client died as it started; any other failure at once."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_fixed(1.0),
        retry=tenacity.retry_if_exception(lambda exc: _CLIENT_SERVER_DIED in str(exc)),
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            try:
                ray.init(address=address, **common)
            except BaseException:
                with contextlib.suppress(Exception):
                    ray.shutdown()  # the half-made client connection
                raise


def _connect(ray: Any, address: str | None, workers: int | None) -> RayRuntime:
    if workers is not None and workers < 1:
        raise RayError(f"--workers: {workers} is not a whole number >= 1")
    if ray.is_initialized():
        cpus = _cluster_cpus()
        kind: RuntimeKind = "client" if ray.util.client.ray.is_connected() else "cluster"
        return RayRuntime(kind, address, cpus, min(workers or cpus, cpus) or 1, owned=False)
    common: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ncpu = workers or os.cpu_count() or 1
            ray.init(
                address="local",  # a new instance, even when a `ray start` cluster runs here
                num_cpus=ncpu,
                include_dashboard=False,
                object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                **common,
            )
            kind = "embedded"
        elif address.startswith("ray://"):
            _client_init(ray, address, common)
            kind = "client"
        else:
            ray.init(address=address, **common)
            kind = "cluster"
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        if address is None:
            raise RayError(f"cannot start an embedded Ray: {exc}") from exc
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = (
                "; a cluster started with a token (Ray's default when ~/.ray/auth_token exists) needs "
                "RAY_AUTH_MODE=token here and the same token (~/.ray/auth_token, RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH)"
            )
        raise RayError(f"cannot reach the Ray cluster at {address}: {exc}{hint}") from exc
    cpus = _cluster_cpus()
    if cpus < 1:
        ray.shutdown()
        raise RayError(f"the Ray cluster at {address} offers no CPUs")
    return RayRuntime(kind, address, cpus, min(workers or cpus, cpus), owned=True)


@contextmanager
def session(address: str | None = None, workers: int | None = None) -> Iterator[RayRuntime]:
    """:func:`connect` for a ``with`` block; Ray is shut down at its end if it was started here."""
    runtime = connect(address, workers)
    try:
        yield runtime
    finally:
        runtime.close()


def _worker_identity() -> dict[str, str]:
    import socket

    import trader

    return {"version": trader.__version__, "node": socket.gethostname(), "file": str(trader.__file__)}


def check_workers(timeout_s: float = 120.0) -> dict[str, str]:
    """Run a small task on the cluster and compare its ``trader`` version with this driver's;
    a :class:`RayError` names both when they differ, or when the workers cannot import trader."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_worker_identity)
    try:
        found: dict[str, str] = ray.get(task.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RayError(f"no Ray worker answered within {timeout_s:.0f} s") from exc
    except ray.exceptions.RayError as exc:
        raise RayError(
            f"Ray workers cannot import trader ({type(exc).__name__}): install trader {__version__} "
            f"on every node of the cluster"
        ) from exc
    if found["version"] != __version__:
        raise RayError(
            f"trader on Ray node {found['node']} is version {found['version']} ({found['file']}), "
            f"this driver runs {__version__}: install the same version on every node"
        )
    return found
