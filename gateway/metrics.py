"""The gateway's Prometheus metrics, consumer lag, and the HTTP endpoint that serves them.

Every series a process exports (``gateway_*``; prometheus-client adds ``process_*`` and
``python_*``):

=========================================== ========= ==================================
name                                        type      labels
=========================================== ========= ==================================
gateway_events_consumed_total               counter   event_type (4 types, undecodable,
                                                      invalid)
gateway_events_without_endpoint_total       counter   event_type
gateway_decode_errors_total                 counter   tier, reason (undecodable, invalid)
gateway_delivery_attempts_total             counter   tier, outcome, status_class
gateway_retries_scheduled_total             counter   tier (the tier the retry goes to)
gateway_dead_letters_total                  counter   reason
gateway_delivery_duration_seconds           histogram tier
gateway_end_to_end_latency_seconds          histogram event_type
gateway_deliveries_in_flight                gauge     tier
gateway_in_flight_records                   gauge     tier
gateway_consumer_lag_records                gauge     tier, topic, partition
gateway_last_success_timestamp_seconds      gauge
gateway_endpoints                           gauge     state (enabled, disabled)
gateway_ready                               gauge
gateway_build_info                          info      version, python, librdkafka
=========================================== ========= ==================================

Labels are bounded: event type, tier (one per configured delay), outcome (success,
http_error, timeout, connection_error, blocked), status class (``2xx`` … or ``none``),
dead-letter reason, and topic/partition of the partitions this process is assigned. No
event ids, no endpoint ids, no URLs: per-endpoint detail lives in the logs and the
dead-letter records. :func:`initialize` creates every known label combination at zero
when a process starts, so ``rate()`` and ``increase()`` see the first increment too.

Several processes on one host (``gateway run --workers N``) each serve their own
registry on their own port (``metrics_port + i``); Prometheus scrapes every port and
``sum()`` adds counters, histograms and lag up. Gauges that every process reports alike
(endpoints, last success) are read with ``max()``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import socket
import threading
from collections.abc import Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import confluent_kafka
from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    make_wsgi_app,
)

from .events import EventType
from .health import HEALTH, health_app
from .records import DeadLetterReason, classify

__all__ = [
    "ATTEMPTS",
    "BUILD_INFO",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "DECODE_ERRORS",
    "DELIVERIES_IN_FLIGHT",
    "DELIVERY_SECONDS",
    "ENDPOINTS",
    "END_TO_END_BUCKETS",
    "END_TO_END_SECONDS",
    "EVENTS_CONSUMED",
    "EVENTS_WITHOUT_ENDPOINT",
    "IN_FLIGHT",
    "LAG_INTERVAL_MS",
    "LAST_SUCCESS",
    "OUTCOMES",
    "READY",
    "RETRIES_SCHEDULED",
    "ConsumerLag",
    "initialize",
    "labelled",
    "lag_from_stats",
    "outcome_of",
    "serve_metrics",
]

log = logging.getLogger(__name__)

# The *_created series double every counter and histogram and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

EVENTS_CONSUMED = Counter(
    "gateway_events_consumed_total",
    "Records read from the events topic, by event type (undecodable and invalid records "
    "count under those names).", ["event_type"],
)
EVENTS_WITHOUT_ENDPOINT = Counter(
    "gateway_events_without_endpoint_total",
    "Events skipped because no enabled endpoint of their bot admits them.", ["event_type"]
)
DECODE_ERRORS = Counter(
    "gateway_decode_errors_total",
    "Records that could not be decoded or validated (dead-lettered with their bytes).",
    ["tier", "reason"],
)
ATTEMPTS = Counter(
    "gateway_delivery_attempts_total", "HTTP delivery attempts by tier and outcome.",
    ["tier", "outcome", "status_class"],
)
RETRIES_SCHEDULED = Counter(
    "gateway_retries_scheduled_total", "Deliveries sent on to a retry tier (the tier named).",
    ["tier"],
)
DEAD_LETTERS = Counter(
    "gateway_dead_letters_total", "Records written to the dead-letter topic.", ["reason"]
)
DELIVERY_SECONDS = Histogram(
    "gateway_delivery_duration_seconds", "Duration of one HTTP attempt.", ["tier"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)
END_TO_END_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30,  # first attempt (request timeout 15 s)
    60, 90, 120, 180, 300,                      # first retry, due 1 min after
    360, 390, 420, 600, 900,                    # second retry, due 1 + 5 min after
    1260, 1290, 1320, 1800, 3600, 7200,         # third retry, due 1 + 5 + 15 min after
)
"""Each stage of the default 1m/5m/15m schedule lands just after its cumulative delay
(60, 360, 1260 s) and gets bounds there, so quantiles show which stage delivered."""
END_TO_END_SECONDS = Histogram(
    "gateway_end_to_end_latency_seconds",
    "From the event's occurrence to its 2xx, across retries.", ["event_type"],
    buckets=END_TO_END_BUCKETS,
)
DELIVERIES_IN_FLIGHT = Gauge(
    "gateway_deliveries_in_flight", "HTTP deliveries started and not finished (waiting for "
    "a connection lane of their endpoint, or on the wire).", ["tier"],
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_records",
    "Records being processed (an event fanned out to several endpoints is one record).",
    ["tier"],
)
CONSUMER_LAG = Gauge(
    "gateway_consumer_lag_records",
    "Records of an assigned partition not settled yet: high watermark minus the stored "
    "(else committed) offset. Includes retries held until due.",
    ["tier", "topic", "partition"],
)
ENDPOINTS = Gauge("gateway_endpoints", "Registered endpoints by state.", ["state"])
LAST_SUCCESS = Gauge(
    "gateway_last_success_timestamp_seconds", "Unix time of the last 2xx delivery (0: none yet)."
)
READY = Gauge(
    "gateway_ready", "1 when /readyz answers 200: endpoint table loaded, partitions assigned."
)
READY.set_function(lambda: 1.0 if HEALTH.readiness()[0] else 0.0)
BUILD_INFO = Info("gateway_build", "Versions this process runs.")


def _version() -> str:
    try:
        return importlib.metadata.version("webhook-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.info({
    "version": _version(),
    "python": platform.python_version(),
    "librdkafka": confluent_kafka.libversion()[0],
})

OUTCOMES: tuple[tuple[str, str], ...] = (
    ("success", "2xx"),
    ("http_error", "3xx"),
    ("http_error", "4xx"),
    ("http_error", "5xx"),
    ("timeout", "none"),
    ("connection_error", "none"),
    ("blocked", "none"),
)
"""The (outcome, status class) pairs an attempt usually ends with, created at zero."""

LAG_INTERVAL_MS = 5000
"""How often librdkafka reports its statistics, from which consumer lag is taken."""


def initialize(tiers: Sequence[str]) -> None:
    """Create every known label combination at zero, for ``tiers`` (all tier names of the
    configuration, events first). A counter that appears with the value 1 has no earlier
    sample, so ``increase()`` would miss the first dead letter of a process without this."""
    for event_type in (*(t.value for t in EventType), "undecodable", "invalid"):
        EVENTS_CONSUMED.labels(event_type)
    for event_type in EventType:
        EVENTS_WITHOUT_ENDPOINT.labels(event_type.value)
        END_TO_END_SECONDS.labels(event_type.value)
    for reason in DeadLetterReason:
        DEAD_LETTERS.labels(reason.value)
    for index, tier in enumerate(tiers):
        for outcome, status_class in OUTCOMES:
            ATTEMPTS.labels(tier, outcome, status_class)
        for reason in (DeadLetterReason.UNDECODABLE, DeadLetterReason.INVALID):
            DECODE_ERRORS.labels(tier, reason.value)
        DELIVERY_SECONDS.labels(tier)
        DELIVERIES_IN_FLIGHT.labels(tier)
        IN_FLIGHT.labels(tier)
        if index > 0:
            RETRIES_SCHEDULED.labels(tier)
    for state in ("enabled", "disabled"):
        ENDPOINTS.labels(state)


class labelled:  # noqa: N801 (used like a function)
    """``metric.labels(*values)``, remembered: on the hot path the lookup (building and
    hashing the label tuple under the metric's lock) costs more than the update.
    Only for metrics whose children are never removed."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def outcome_of(status: int | None, error: str | None) -> tuple[str, str]:
    """(outcome, status class) labels of an attempt."""
    return classify(status, error), "none" if status is None else f"{status // 100}xx"


# -- consumer lag ------------------------------------------------------------------------


def lag_from_stats(stats: dict[str, Any], assigned: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Lag per assigned (topic, partition) from one librdkafka statistics document.

    ``hi_offset`` is the high watermark the broker returned with the last fetch (the
    cached watermark: correct on the bundled broker, whose ListOffsets answer is not).
    Lag counts from the offset this consumer stored as settled, else the group's
    committed offset, else the log start. A partition whose watermark is not known yet
    (no fetch answered since the assignment) is left out.
    """
    lags: dict[tuple[str, int], int] = {}
    topics = stats.get("topics", {})
    for topic, partition in assigned:
        entry = topics.get(topic, {}).get("partitions", {}).get(str(partition))
        if entry is None:
            continue
        high = entry.get("hi_offset", -1)
        if high < 0:
            continue
        for field in ("stored_offset", "committed_offset", "lo_offset"):
            start = entry.get(field, -1)
            if start >= 0:
                break
        else:
            start = 0  # auto.offset.reset=earliest on a log that starts at 0
        lags[(topic, partition)] = max(0, high - start)
    return lags


class ConsumerLag:
    """Keeps ``gateway_consumer_lag_records`` for one consumer's assigned partitions.

    Every method runs on the consumer's own thread: :meth:`update` is the consumer's
    ``stats_cb`` (librdkafka calls it from ``poll``), the others are called from its
    rebalance callbacks and its close. So no call is ever made on the consumer from
    another thread, and the assignment here is the consumer's own. Series of partitions
    this process no longer owns are removed at once, so with several processes
    ``sum()`` never counts a partition twice.
    """

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self._assigned: set[tuple[str, int]] = set()

    def assign(self, partitions: Iterable[Any]) -> None:
        self._assigned |= {(p.topic, p.partition) for p in partitions}

    def revoke(self, partitions: Iterable[Any]) -> None:
        for key in [(p.topic, p.partition) for p in partitions]:
            self._assigned.discard(key)
            self._remove(key)

    def clear(self) -> None:
        """Forget every partition (the consumer is closing)."""
        for key in list(self._assigned):
            self._remove(key)
        self._assigned.clear()

    def update(self, stats_json: str) -> None:
        try:
            lags = lag_from_stats(json.loads(stats_json), self._assigned)
        except Exception:  # an exception here would surface from poll() and stop the loop
            log.exception("consumer statistics unreadable", extra={"tier": self.tier})
            return
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(self.tier, topic, str(partition)).set(lag)

    def _remove(self, key: tuple[str, int]) -> None:
        try:
            CONSUMER_LAG.remove(self.tier, key[0], str(key[1]))
        except KeyError:
            pass  # no watermark was known yet


# -- HTTP ------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the gateway's own events


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``port`` from a background thread.

    Raises OSError when the port cannot be bound. The returned server stops with
    ``shutdown()``; the gateway's own processes simply exit.
    """
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path in ("/healthz", "/readyz"):
            return health_app(environ, start_response)
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("content-type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
