"""The gateway's Prometheus metrics (the workers' and the management API's), consumer lag,
and the HTTP endpoint that serves the workers'.

Every series a worker process exports (``gateway_*``; prometheus-client adds ``process_*``
and ``python_*``):

=========================================== ========= ==================================
name                                        type      labels
=========================================== ========= ==================================
gateway_events_consumed_total               counter   event_type (4 types, undecodable,
                                                      invalid)
gateway_events_without_endpoint_total       counter   event_type
gateway_decode_errors_total                 counter   tier, reason (undecodable, invalid,
                                                      internal_error)
gateway_delivery_attempts_total             counter   tier, outcome, status_class
gateway_retries_scheduled_total             counter   tier (the tier the retry goes to)
gateway_dead_letters_total                  counter   reason
gateway_delivery_duration_seconds           histogram tier
gateway_end_to_end_latency_seconds          histogram event_type
gateway_deliveries_in_flight                gauge     tier
gateway_in_flight_records                   gauge     tier
gateway_consumer_lag_records                gauge     tier, topic, partition
gateway_oldest_record_age_seconds           gauge     tier
gateway_tier_readers                        gauge     tier (1: some process reads it, 0: none)
gateway_consumer_out_of_group_seconds       gauge     tier (0 while in its group)
gateway_consumer_replacements_total         counter   tier
gateway_deferred_total                      counter   reason (connections_busy, share_full,
                                                      rate_limit, dns_queue, circuit_probe),
                                                      rung (the deferral rung it went to)
gateway_deliveries_forwarded_total          counter

gateway_circuit_breakers                    gauge     state (closed, open, half_open)
gateway_circuit_oldest_open_seconds         gauge
gateway_history_writes_total                counter   result (written, failed)
gateway_history_writes_waiting              gauge
gateway_schema_registry_errors_total        counter
gateway_last_success_timestamp_seconds      gauge
gateway_endpoints                           gauge     state (enabled, disabled)
gateway_ready                               gauge
gateway_build_info                          info      version, python, librdkafka
=========================================== ========= ==================================

The management API (``gateway api``, or its thread in ``gateway up``) exports its own
series, from an :class:`ApiMetrics` of its own, on its own port's ``/metrics``:

=========================================== ========= ==================================
name                                        type      labels
=========================================== ========= ==================================
gateway_api_requests_total                  counter   method, route, status
gateway_api_request_duration_seconds        histogram method, route
gateway_api_replay_jobs                     gauge     state (dry_run, running, succeeded,
                                                      failed)
gateway_api_replay_jobs_finished_total      counter   result (dry_run, succeeded, failed)
gateway_api_replayed_records_total          counter   result (acknowledged, failed)
=========================================== ========= ==================================

Labels are bounded: event type, tier (one per configured delay), outcome (one of
:class:`~gateway.records.Outcome`), status class (``1xx`` … ``5xx``, ``other`` for a
status outside 100-599, ``none`` without one or when the outcome is not the status's),
dead-letter reason, deferral reason and rung, history write result, and topic/partition
of the partitions this process is assigned. No event ids, no endpoint ids, no URLs:
per-endpoint detail lives in the logs and the dead-letter records. A :class:`Metrics`
creates every known label combination at zero when it is made, so ``rate()`` and
``increase()`` see the first increment too.

The API's labels are bounded the same way: ``route`` is the route's template
(``/v1/endpoints/{id}``), never the path a caller sent, and ``unmatched`` for a path no
route has; ``method`` is one of the HTTP methods (``other`` for the rest); ``status`` is
the status answered, one of the few the API has. A request series appears with its
first request (which combinations of route, method and status occur is not known
beforehand); the replay jobs' series start at zero.

Nothing happens at import: a :class:`Metrics` is an object with a registry of its own,
made by the process that serves it (or by a test) and passed to what updates it.

Several processes on one host (``gateway run --workers N``) each serve their own
registry on their own port (``metrics_port + i``); Prometheus scrapes every port and
``sum()`` adds counters, histograms and lag up. Gauges that every process reports alike
(endpoints, last success) are read with ``max()``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import confluent_kafka
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)

from ..events import EventType
from ..records import Attempt, CircuitState, DeadLetterReason, DeferReason, Outcome, status_class
from ._health import Health, health_app

__all__ = ["API_BUCKETS", "DELIVERY_BUCKETS", "END_TO_END_BUCKETS", "ApiMetrics", "Metrics", "attempt_labels",
           "serve_metrics"]

DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
END_TO_END_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30,  # first attempt (request timeout 15 s)
    60, 90, 120, 180, 300,                      # first retry, due 1 min after
    360, 390, 420, 600, 900,                    # second retry, due 1 + 5 min after
    1260, 1290, 1320, 1800, 3600, 7200,         # third retry, due 1 + 5 + 15 min after
)
"""Each stage of the default 1m/5m/15m schedule lands just after its cumulative delay
(60, 360, 1260 s) and gets bounds there, so quantiles show which stage delivered."""
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
"""Fine from 1 ms for the reads, served from the API's memory (its table and indexes); up
to 30 s for a write, which waits until the table shows it (up to 10 s), and a test send,
which waits for its receiver (up to the 15 s request timeout)."""

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
_CIRCUIT_STATES = (CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN)


def attempt_labels(attempt: Attempt) -> tuple[str, str]:
    """(outcome, status class) labels of an attempt. The status class is the status's
    only when the status decided the outcome (a timeout while reading a 2xx body is a
    timeout, status class ``none``), so every pair comes from a small preset set."""
    outcome = attempt.outcome
    if outcome is Outcome.SUCCESS or outcome is Outcome.HTTP_ERROR:
        return outcome.value, status_class(attempt.status)
    return outcome.value, "none"


def _attempt_label_pairs() -> list[tuple[str, str]]:
    pairs = [(Outcome.SUCCESS.value, "2xx")]
    pairs += [(Outcome.HTTP_ERROR.value, c) for c in _STATUS_CLASSES if c != "2xx"]
    pairs += [(o.value, "none") for o in Outcome if o not in (Outcome.SUCCESS, Outcome.HTTP_ERROR)]
    return pairs


def _version() -> str:
    try:
        return importlib.metadata.version("webhook-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _process_registry() -> CollectorRegistry:
    """A registry of its own with the process, platform and garbage collector metrics."""
    # The *_created series double every counter and histogram and no dashboard reads
    # them. (A global switch of prometheus-client; flipping it again is harmless.)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _read_at_scrape(gauge: Gauge, labels: Sequence[str], counts: Callable[[], Mapping[str, int]]) -> None:
    """Each of ``labels`` of ``gauge`` reads its value from ``counts`` at each scrape."""
    def reader(label: str) -> Callable[[], float]:
        return lambda: float(counts().get(label, 0))

    for label in labels:
        gauge.labels(label).set_function(reader(label))


class Metrics:
    """Every metric of one process, in a registry of its own (``registry``), with every
    known label combination of ``tiers`` (all tier names of the configuration, events
    first) created at zero: a counter that appears with the value 1 has no earlier
    sample, so ``increase()`` would miss the first dead letter of a process without it.
    ``deferrals`` names the other tiers a process may run (the deliveries tier and the
    deferral rungs), ``rungs`` the deferral rungs alone (the ``rung`` of a deferral).

    ``health`` feeds ``gateway_ready``. Children of labelled metrics used on the hot path
    are looked up once and kept (:meth:`attempt` and the rest): the lookup (building and
    hashing the label tuple under the metric's lock) costs more than the update.
    """

    def __init__(self, tiers: Sequence[str], *, deferrals: Sequence[str] = (), rungs: Sequence[str] = (),
                 health: Health | None = None) -> None:
        self.registry = registry = _process_registry()
        self.health = health
        self.events_consumed = Counter(
            "gateway_events_consumed_total",
            "Records read from the events topic, by event type (undecodable and invalid records "
            "count under those names).", ["event_type"], registry=registry,
        )
        self.events_without_endpoint = Counter(
            "gateway_events_without_endpoint_total",
            "Events skipped because no enabled endpoint of their bot admits them.", ["event_type"],
            registry=registry,
        )
        self.decode_errors = Counter(
            "gateway_decode_errors_total",
            "Records that could not be decoded or validated (dead-lettered with their bytes).",
            ["tier", "reason"], registry=registry,
        )
        self.delivery_attempts = Counter(
            "gateway_delivery_attempts_total", "Delivery attempts by tier and outcome.",
            ["tier", "outcome", "status_class"], registry=registry,
        )
        self.retries_scheduled = Counter(
            "gateway_retries_scheduled_total", "Deliveries sent on to a retry tier (the tier named).",
            ["tier"], registry=registry,
        )
        self.dead_letters = Counter(
            "gateway_dead_letters_total", "Records written to the dead-letter topic.", ["reason"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "gateway_delivery_duration_seconds",
            "Duration of one HTTP attempt that made a request (connect to last byte).", ["tier"],
            buckets=DELIVERY_BUCKETS, registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "gateway_end_to_end_latency_seconds",
            "From the event's occurrence to its 2xx, across retries.", ["event_type"],
            buckets=END_TO_END_BUCKETS, registry=registry,
        )
        self.deliveries_in_flight = Gauge(
            "gateway_deliveries_in_flight", "HTTP deliveries started and not finished (waiting for "
            "a connection lane of their endpoint, or on the wire).", ["tier"], registry=registry,
        )
        self.in_flight_records = Gauge(
            "gateway_in_flight_records",
            "Records being processed (an event fanned out to several endpoints is one record).",
            ["tier"], registry=registry,
        )
        self.consumer_lag = Gauge(
            "gateway_consumer_lag_records",
            "Records of an assigned partition not settled yet: high watermark minus the stored "
            "(else committed) offset. Includes retries held until due.",
            ["tier", "topic", "partition"], registry=registry,
        )
        self.tier_readers = Gauge(
            "gateway_tier_readers",
            "1 when some process reads the tier's topic (this one, or a consumer group with members), "
            "0 when none does: what is sent there waits.", ["tier"], registry=registry,
        )
        self.oldest_record_age = Gauge(
            "gateway_oldest_record_age_seconds",
            "Age (from its Kafka timestamp) of the oldest record this process took from the tier and has not "
            "settled; 0 when none. A retry tier or deferral rung holds records until due, so there it is "
            "normal up to the tier's delay.", ["tier"], registry=registry,
        )
        self.out_of_group = Gauge(
            "gateway_consumer_out_of_group_seconds",
            "How long the tier's consumer has been out of its consumer group (0 while in it): a "
            "consumer out of its group fetches nothing.", ["tier"], registry=registry,
        )
        self.consumers_replaced = Counter(
            "gateway_consumer_replacements_total",
            "Consumers closed and created anew because they stayed out of their group past the bound.",
            ["tier"], registry=registry,
        )
        self.schema_lookups_failed = Counter(
            "gateway_schema_registry_errors_total",
            "Schema lookups the registry did not answer (the partition waits and retries).",
            registry=registry,
        )
        self.endpoints = Gauge("gateway_endpoints", "Registered endpoints by state.", ["state"],
                               registry=registry)
        self.deferred = Counter(
            "gateway_deferred_total",
            "Deliveries put off for the gateway's own limits (no attempt spent), by reason "
            "(connections_busy, share_full, rate_limit, dns_queue, circuit_probe) and by the deferral "
            "rung they went to.", ["reason", "rung"], registry=registry,
        )
        self.forwarded = Counter(
            "gateway_deliveries_forwarded_total",
            "Deliveries sent on to the process that owns their endpoint (not attempted here): its "
            "partition of the deliveries topic.", registry=registry,
        )
        self.circuits = Gauge(
            "gateway_circuit_breakers", "Endpoints this process knows, by the state of its circuit "
            "breaker for them (closed, open, half_open).", ["state"], registry=registry,
        )
        self.oldest_open_circuit = Gauge(
            "gateway_circuit_oldest_open_seconds",
            "Seconds since the circuit of an enabled endpoint that has been open longest in this process "
            "opened (half-open between probes counts as open; 0: none is open).", registry=registry,
        )
        self.history_writes = Counter(
            "gateway_history_writes_total",
            "Lines of the delivery history (the attempts topic) by result: written (acknowledged by the "
            "broker) or failed (the write raised: the line is lost, its delivery dead-lettered as "
            "internal_error).", ["result"], registry=registry,
        )
        self.history_waiting = Gauge(
            "gateway_history_writes_waiting",
            "Lines of the delivery history sent and not acknowledged yet (a write the broker refuses is "
            "retried until it takes it, and the record it belongs to waits).", registry=registry,
        )
        self.last_success = Gauge(
            "gateway_last_success_timestamp_seconds", "Unix time of the last 2xx delivery (0: none yet).",
            registry=registry,
        )
        self.ready = Gauge(
            "gateway_ready", "1 when /readyz answers 200: endpoint table loaded, partitions assigned.",
            registry=registry,
        )
        self.ready.set_function(lambda: 1.0 if health is not None and health.readiness()[0] else 0.0)
        Info("gateway_build", "Versions this process runs.", registry=registry).info({
            "version": _version(),
            "python": platform.python_version(),
            "librdkafka": confluent_kafka.libversion()[0],
        })
        self._children: dict[tuple[Any, ...], Any] = {}
        self._initialize(tiers, deferrals, rungs)

    def _initialize(self, tiers: Sequence[str], deferrals: Sequence[str], rungs: Sequence[str]) -> None:
        for event_type in (*(t.value for t in EventType), "undecodable", "invalid"):
            self.events_consumed.labels(event_type)
        for event_type in EventType:
            self.events_without_endpoint.labels(event_type.value)
            self.end_to_end_seconds.labels(event_type.value)
        for reason in DeadLetterReason:
            if reason is not DeadLetterReason.UNKNOWN:  # (read from records, never written)
                self.dead_letters.labels(reason.value)
        for index, tier in enumerate(tiers):
            for outcome, status in _attempt_label_pairs():
                self.delivery_attempts.labels(tier, outcome, status)
            for reason in (DeadLetterReason.UNDECODABLE, DeadLetterReason.INVALID,
                           DeadLetterReason.INTERNAL_ERROR):
                self.decode_errors.labels(tier, reason.value)
            self.delivery_seconds.labels(tier)
            self.deliveries_in_flight.labels(tier)
            self.in_flight_records.labels(tier)
            self.out_of_group.labels(tier)
            self.oldest_record_age.labels(tier)
            self.consumers_replaced.labels(tier)
            if index > 0:
                self.retries_scheduled.labels(tier)
        for state in ("enabled", "disabled"):
            self.endpoints.labels(state)
        for name in deferrals:
            self.in_flight_records.labels(name)
            self.out_of_group.labels(name)
            self.oldest_record_age.labels(name)
            self.consumers_replaced.labels(name)
        for defer_reason in DeferReason:
            for rung in rungs:
                self.deferred.labels(defer_reason.value, rung)
        for result in ("written", "failed"):
            self.history_writes.labels(result)
        for circuit in _CIRCUIT_STATES:
            self.circuits.labels(circuit.value)

    def count_circuits(self, counts: Callable[[], Mapping[CircuitState, int]]) -> None:
        """Read the circuit states from ``counts`` at each scrape (the sender's)."""
        _read_at_scrape(self.circuits, [c.value for c in _CIRCUIT_STATES],
                        lambda: {state.value: n for state, n in counts().items()})

    def time_open_circuits(self, oldest: Callable[[], float]) -> None:
        """Read the age of the oldest open circuit from ``oldest`` at each scrape (the
        sender's)."""
        self.oldest_open_circuit.set_function(oldest)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- the hot path's children, kept ----------------------------------------------------

    def attempt(self, tier: str, attempt: Attempt) -> None:
        """Count one attempt, and time it if it made a request (one that never reached the
        network has no duration worth a histogram sample)."""
        outcome, status = attempt_labels(attempt)
        self._child(self.delivery_attempts, tier, outcome, status).inc()
        if attempt.outcome.reached_network:
            self._child(self.delivery_seconds, tier).observe(attempt.duration_ms / 1000)

    def consumed(self, event_type: str) -> Any:
        return self._child(self.events_consumed, event_type)

    def in_flight(self, tier: str) -> Any:
        return self._child(self.deliveries_in_flight, tier)

    def records_in_flight(self, tier: str) -> Any:
        return self._child(self.in_flight_records, tier)

    def end_to_end(self, event_type: str) -> Any:
        return self._child(self.end_to_end_seconds, event_type)

    def deferral(self, reason: str, rung: str) -> Any:
        return self._child(self.deferred, reason, rung)

    def history_written(self, result: str) -> Any:
        return self._child(self.history_writes, result)


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiMetrics:
    """Every metric of the management API, in a registry of its own (``registry``), apart
    from the workers' :class:`Metrics`: ``gateway up`` runs both in one process, and each
    is served on its own port.

    ``job_states`` are the states a replay job can be in (the gauge's ``state``, each at
    zero from the start), ``job_results`` those it can end in (the counter's ``result``).
    The request path keeps the children it looked up (:meth:`request`), as
    :class:`Metrics` does: the lookup costs more than the update.
    """

    def __init__(self, *, job_states: Sequence[str], job_results: Sequence[str]) -> None:
        self.registry = registry = _process_registry()
        self.requests = Counter(
            "gateway_api_requests_total",
            "Requests answered by the management API, by method, route template (unmatched: no route) and "
            "status. Scrapes of /metrics are not counted.", ["method", "route", "status"], registry=registry,
        )
        self.request_seconds = Histogram(
            "gateway_api_request_duration_seconds",
            "From a request's arrival at the API to the end of its answer.", ["method", "route"],
            buckets=API_BUCKETS, registry=registry,
        )
        self.replay_jobs = Gauge(
            "gateway_api_replay_jobs",
            "Replay jobs this API process remembers (the last 100), by state; running is 0 or 1.", ["state"],
            registry=registry,
        )
        self.replay_jobs_finished = Counter(
            "gateway_api_replay_jobs_finished_total",
            "Replay jobs finished, by how they ended (a dry run ends as it is made).", ["result"],
            registry=registry,
        )
        self.replayed_records = Counter(
            "gateway_api_replayed_records_total",
            "Dead letters sent back by replay jobs: acknowledged by the broker (in the retry tier), or failed "
            "(not acknowledged, so the same replay sends them again). Counted as the job goes.", ["result"],
            registry=registry,
        )
        for state in job_states:
            self.replay_jobs.labels(state)
        for result in job_results:
            self.replay_jobs_finished.labels(result)
        for result in ("acknowledged", "failed"):
            self.replayed_records.labels(result)
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._job_states = tuple(job_states)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request to ``route`` (a template) and time it. A method
        outside the HTTP ones counts as ``other``."""
        key = (method if method in _HTTP_METHODS else "other", route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(key[0], route, str(status)),
                                                       self.request_seconds.labels(key[0], route))
        children[0].inc()
        children[1].observe(seconds)

    def count_jobs(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Read the replay jobs by state from ``counts`` at each scrape (the jobs')."""
        _read_at_scrape(self.replay_jobs, self._job_states, counts)

    def job_finished(self, result: str) -> None:
        self.replay_jobs_finished.labels(result).inc()

    def replayed(self, *, acknowledged: int, failed: int) -> None:
        """Count dead letters a replay job sent since it last reported."""
        if acknowledged > 0:
            self.replayed_records.labels("acknowledged").inc(acknowledged)
        if failed > 0:
            self.replayed_records.labels("failed").inc(failed)

# -- HTTP ------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the gateway's own events


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(metrics: Metrics, health: Health, port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve ``/metrics`` (of ``metrics``), ``/healthz`` and ``/readyz`` (of ``health``) on
    ``port`` from a background thread.

    Raises OSError when the port cannot be bound. The returned server stops with
    ``shutdown()``; the gateway's own processes simply exit.
    """
    metrics_app = make_wsgi_app(metrics.registry)
    answer_health = health_app(health)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path in ("/healthz", "/readyz"):
            return answer_health(environ, start_response)
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("content-type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
