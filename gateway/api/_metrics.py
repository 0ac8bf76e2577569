"""The API's ``/metrics``: every request counted and timed under its route's template, and
the API's registry served to Prometheus.

**Route, not path.** A request counts under the template of the route that answered it
(``/v1/endpoints/{id}``), so an id in a path never becomes a label value: the number of
series is bounded by the routes, whatever callers send. The router leaves the route it
chose in the request's scope; a request answered before routing (the request guard's
401, 413, 429…) is matched against the API's routes here, and one no route matches (a
404 of the router) counts as ``unmatched``. The settings page's paths, answered in front
of the guard, count under the page's two templates.

**Cheap.** Per request: two clock reads, a wrapper around ``send`` that notes the status,
one dictionary lookup of the label children and their two updates
(:meth:`~gateway.observability.ApiMetrics.request`). The routes are searched only for the
requests the router never saw (refused by the guard, or no route's). Measured: about 3 µs
a request for the template, the lookup and the updates; about 40 µs for one whose route
is searched.

**Scrapes are not counted.** ``GET /metrics`` passes straight through: a scrape every
15 s would otherwise show up as API traffic in the request rate and latency panels, and
the numbers a scrape reads would change because it read them. Prometheus tells of its
scrapes itself (``up``, ``scrape_duration_seconds``).

**No token.** ``/metrics`` is served like ``/healthz``: Prometheus scrapes without one.
It tells request counts by route and status, never an id, a token or a body; keep the
API's port off a public network (or block ``/metrics`` at the proxy in front of it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..observability import ApiMetrics
from ._page import page_route

__all__ = ["METRICS_PATH", "UNMATCHED", "RequestMetrics", "metrics_response", "route_template"]

METRICS_PATH = "/metrics"
"""Where the API serves its metrics (no token)."""
UNMATCHED = "unmatched"
"""The ``route`` of a request no route matches."""


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route that answers (or would answer) the request of ``scope``:
    the one the router chose, else the first of ``routes`` whose path matches (a wrong
    method too), else the settings page's (``unmatched``: none)."""
    chosen = scope.get("route")
    if isinstance(chosen, BaseRoute) and isinstance(path := getattr(chosen, "path", None), str):
        return path
    for route in routes:
        if isinstance(path := getattr(route, "path", None), str) and route.matches(scope)[0] is not Match.NONE:
            return path
    return page_route(scope.get("path", "")) or UNMATCHED


class RequestMetrics:
    """ASGI middleware counting and timing each request in ``metrics`` under its route's
    template, one of ``routes`` (module docstring). The outermost of the API's
    middleware, so the guard's refusals and the settings page count too."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the application fails before it answers

        async def noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            self.metrics.request(scope.get("method", "GET"), route_template(self.routes, scope), status,
                                 time.perf_counter() - started)


def metrics_response(metrics: ApiMetrics) -> Response:
    """The registry of ``metrics`` in Prometheus' text format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
