"""Connecting through a Ray Client server is tried again only for the one known transient
failure: the server's per-client process dying as it starts (ray-project/ray#63202, seen here in a
full test run: "Starting Ray client server failed", its logs empty). The stand-in below plays
Ray's module only in what ``_client_init`` calls: ``init`` and ``shutdown``."""

from __future__ import annotations

from typing import Any

import pytest

from trader.research.ray_runtime import _client_init


class FlakyRay:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.inits: list[dict[str, Any]] = []
        self.shutdowns = 0

    def init(self, **kw: Any) -> None:
        self.inits.append(kw)
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


DIED = RuntimeError("Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.")


def test_a_client_server_that_died_starting_is_asked_again_with_the_same_address():
    ray = FlakyRay([DIED, DIED])
    _client_init(ray, "ray://127.0.0.1:10001", {"log_to_driver": False})
    assert [kw["address"] for kw in ray.inits] == ["ray://127.0.0.1:10001"] * 3
    assert ray.shutdowns == 2  # each half-made connection let go before the next


def test_it_gives_up_after_three_tries_with_rays_own_error():
    ray = FlakyRay([DIED, DIED, DIED, DIED])
    with pytest.raises(RuntimeError, match="Starting Ray client server failed"):
        _client_init(ray, "ray://127.0.0.1:10001", {})
    assert len(ray.inits) == 3


def test_any_other_failure_is_not_retried():
    ray = FlakyRay([ConnectionError("Authentication failed: wrong token")])
    with pytest.raises(ConnectionError, match="wrong token"):
        _client_init(ray, "ray://127.0.0.1:10001", {})
    assert len(ray.inits) == 1
