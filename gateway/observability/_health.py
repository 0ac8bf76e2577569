"""Readiness and liveness of one gateway process, as ``/readyz`` and ``/healthz`` answer.

* ``/readyz`` answers 200 once the process can deliver: the endpoint table is loaded to
  the end of its topic, and every tier it runs has joined its consumer group and got
  its first assignment (possibly empty, when there are more workers than partitions).
  Before that, and from the moment it starts stopping, 503 with what it waits for.
  A later rebalance does not make it unready: records wait in Kafka meanwhile, nothing
  is lost, and a load balancer has nothing to route away.
* ``/healthz`` answers 200 while the process is alive and well, and 503 when a
  component broke in a way only a restart mends (a consumer loop that died).

Both are served on the metrics port (see :func:`gateway.observability.serve_metrics`). The
runner declares the conditions when it starts; the workers report them as they are met.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ENDPOINTS_LOADED", "Health", "assigned", "health_app"]

ENDPOINTS_LOADED = "endpoint table loaded"


def assigned(tier: str) -> str:
    """The readiness condition of one tier: its consumer got its first assignment."""
    return f"partitions assigned ({tier})"


class Health:
    """What this process reports; safe to call from any thread. The runner makes one and
    passes it to the workers and to the metrics server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._waiting: list[str] = []
        self._broken: dict[str, str] = {}

    def expect(self, conditions: Iterable[str]) -> None:
        """Start over: ready once every one of ``conditions`` is :meth:`met`."""
        with self._lock:
            self._started = True
            self._stopping = False
            self._waiting = list(dict.fromkeys(conditions))
            self._broken = {}

    def met(self, condition: str) -> None:
        with self._lock:
            if condition in self._waiting:
                self._waiting.remove(condition)

    def stopping(self) -> None:
        with self._lock:
            self._stopping = True

    def broken(self, component: str, why: str) -> None:
        with self._lock:
            self._broken[component] = why

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            if self._stopping:
                return False, "stopping"
            if not self._started:
                return False, "starting"
            if self._broken:
                return False, "broken: " + "; ".join(f"{k}: {v}" for k, v in self._broken.items())
            if self._waiting:
                return False, "waiting for: " + ", ".join(self._waiting)
            return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            if self._broken:
                return False, "broken: " + "; ".join(f"{k}: {v}" for k, v in self._broken.items())
            return True, "ok"


def health_app(health: Health) -> Callable[[dict[str, Any], Any], list[bytes]]:
    """The WSGI answer of ``health`` for ``/healthz`` and ``/readyz``: 200 or 503, the
    reason as text."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        probe = health.readiness if environ.get("PATH_INFO") == "/readyz" else health.liveness
        ok, text = probe()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("content-type", "text/plain; charset=utf-8"), ("cache-control", "no-store")])
        return [text.encode() + b"\n"]

    return app
