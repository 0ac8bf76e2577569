"""What a gateway process tells about itself: structured logs, Prometheus metrics, and
its health (``/healthz``, ``/readyz``).

* ``_logs``: one event per line (key=value or JSON), fields bound once per piece of work.
* ``_metrics``: every ``gateway_*`` series, made per process (nothing at import): the
  workers' and the management API's, each in a registry of its own; and the workers'
  HTTP server of ``/metrics`` beside the health checks.
* ``_health``: readiness and liveness, as the runner declares and the workers report them.

The modules are private: import from ``gateway.observability``.
"""

from ._health import ENDPOINTS_LOADED, Health, assigned, health_app
from ._logs import BoundLogger, JsonFormatter, KeyValueFormatter, Log, bind, configure_logging
from ._metrics import (
    API_BUCKETS,
    DELIVERY_BUCKETS,
    END_TO_END_BUCKETS,
    ApiMetrics,
    Metrics,
    attempt_labels,
    serve_metrics,
)

__all__ = [
    "API_BUCKETS",
    "DELIVERY_BUCKETS",
    "ENDPOINTS_LOADED",
    "END_TO_END_BUCKETS",
    "ApiMetrics",
    "BoundLogger",
    "Health",
    "JsonFormatter",
    "KeyValueFormatter",
    "Log",
    "Metrics",
    "assigned",
    "attempt_labels",
    "bind",
    "configure_logging",
    "health_app",
    "serve_metrics",
]
