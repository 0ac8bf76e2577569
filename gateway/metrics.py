"""The gateway's Prometheus metrics, and the HTTP endpoint that serves them.

Labels are bounded: event type (4), tier (one per configured delay), outcome, status
class, dead-letter reason. No event ids, no endpoint ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "EVENTS_CONSUMED",
    "EVENTS_WITHOUT_ENDPOINT",
    "ATTEMPTS",
    "RETRIES_SCHEDULED",
    "DEAD_LETTERS",
    "DELIVERY_SECONDS",
    "END_TO_END_SECONDS",
    "IN_FLIGHT",
    "ENDPOINTS",
    "LAST_SUCCESS",
    "outcome_of",
    "serve_metrics",
]

EVENTS_CONSUMED = Counter(
    "gateway_events_consumed_total", "Records read from the events topic.", ["event_type"]
)
EVENTS_WITHOUT_ENDPOINT = Counter(
    "gateway_events_without_endpoint_total",
    "Events skipped because no enabled endpoint of their bot admits them.", ["event_type"]
)
ATTEMPTS = Counter(
    "gateway_delivery_attempts_total", "HTTP delivery attempts by tier and outcome.",
    ["tier", "outcome", "status_class"],
)
RETRIES_SCHEDULED = Counter(
    "gateway_retries_scheduled_total", "Deliveries sent on to a retry tier.", ["tier"]
)
DEAD_LETTERS = Counter(
    "gateway_dead_letters_total", "Records written to the dead-letter topic.", ["reason"]
)
DELIVERY_SECONDS = Histogram(
    "gateway_delivery_duration_seconds", "Duration of one HTTP attempt.", ["tier"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)
END_TO_END_SECONDS = Histogram(
    "gateway_end_to_end_latency_seconds",
    "From the event's occurrence to its 2xx, across retries.", ["event_type"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90, 120, 300, 420,
             600, 900, 1200, 1500, 1800, 3600),
)
IN_FLIGHT = Gauge("gateway_in_flight_records", "Records being processed.", ["tier"])
ENDPOINTS = Gauge("gateway_endpoints", "Registered endpoints.", ["state"])
LAST_SUCCESS = Gauge(
    "gateway_last_success_timestamp_seconds", "Unix time of the last 2xx delivery."
)


def outcome_of(status: int | None, error: str | None) -> tuple[str, str]:
    """(outcome, status class) labels of an attempt."""
    if status is None:
        if error and error.startswith("timeout"):
            return "timeout", "none"
        if error and error.startswith("blocked"):
            return "blocked", "none"
        return "connection_error", "none"
    status_class = f"{status // 100}xx"
    if 200 <= status < 300:
        return "success", status_class
    return "http_error", status_class


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on ``port`` from a background thread."""
    start_http_server(port, addr=host)
