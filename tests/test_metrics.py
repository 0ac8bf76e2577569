"""Metrics: names and labels, consumer lag from librdkafka's statistics, /healthz and
/readyz, and a real worker's numbers while deliveries are stuck and after they drain."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import ApiService, Tokens
from gateway.config import Config
from gateway.events import parse_event
from gateway.observability import (
    DELIVERY_BUCKETS,
    END_TO_END_BUCKETS,
    ENDPOINTS_LOADED,
    Health,
    Metrics,
    assigned,
    attempt_labels,
    serve_metrics,
)
from gateway.ops import new_endpoint
from gateway.publisher import Publisher
from gateway.records import Attempt, Endpoint, Outcome
from gateway.store import Topics, save_endpoint
from gateway.streaming import ConsumerLag, die_with_parent, lag_from_stats, read_statistics

from .conftest import free_port, gateway_env
from .receiver import Receiver

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
UNBOUNDED_LABELS = {"event_id", "endpoint_id", "bot_id", "session_id", "url", "message_id", "offset"}


# -- helpers shared with tests/test_prometheus.py ---------------------------------------


def documented() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def register(config: Config, url: str, *, events: tuple[str, ...] = ()) -> Endpoint:
    endpoint = new_endpoint(bot_id=BOT, url=url, event_types=events)
    save_endpoint(config, endpoint)
    return endpoint


def publish(config: Config, events: list[dict[str, Any]]) -> None:
    with Publisher(config) as publisher:
        results = publisher.publish_many([parse_event(e) for e in events])
    assert all(r.ok for r in results)


def publish_undecodable(config: Config) -> None:
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    producer.produce(Topics.from_config(config).events, key=b"k", value=b"not avro at all")
    assert producer.flush(10) == 0


def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", trust_env=False, timeout=5)


def value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples named ``name`` whose labels include ``labels`` (None: none)."""
    found = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found = (found or 0.0) + sample.value
    return found


class GatewayProcess:
    """A real `gateway run` serving /metrics (worker_factory always passes --no-metrics)."""

    def __init__(self, config: Config, log: Path, port: int, *args: str, **env: str) -> None:
        self.port = port
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--metrics-port", str(port), *args],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
            # A `--workers N` supervisor must not outlive a test run that was killed.
            preexec_fn=die_with_parent(),
            env=gateway_env(config, GATEWAY_LOG_LEVEL="info", **env),
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def readiness(self, port: int | None = None) -> tuple[int, str] | None:
        """(status, body) of /readyz, or None while nothing listens yet."""
        try:
            response = scrape(port or self.port, "/readyz")
        except httpx.TransportError:
            return None
        return response.status_code, response.text

    def wait_ready(self, ports: list[int] | None = None, timeout: float = 30) -> list[tuple[int, str]]:
        """Poll /readyz of every port until each answers 200; returns what was seen."""
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout
        for port in ports or [self.port]:
            while True:
                answer = self.readiness(port)
                if answer is not None:
                    seen.append(answer)
                    if answer[0] == 200:
                        break
                if self.process.poll() is not None:
                    raise AssertionError(f"gateway exited with {self.process.returncode}:\n{self.text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"port {port} not ready within {timeout} s ({seen[-1:]}):\n{self.text()}")
                time.sleep(0.05)
        return seen

    def stop(self, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._out.close()
        return self.process.returncode


# -- names, labels, buckets ----------------------------------------------------------


def fresh_metrics() -> Metrics:
    return Metrics([t.name for t in Topics.from_config(Config()).tiers], health=Health())


def gateway_families() -> list[Any]:
    return [f for f in fresh_metrics().registry.collect() if f.name.startswith("gateway_")]


def api_families() -> list[Any]:
    """The management API's (tests/test_api_metrics.py tests them)."""
    return [f for f in ApiService(Config(), Tokens(())).metrics.registry.collect() if f.name.startswith("gateway_")]


def test_metric_names_and_labels_follow_prometheus_conventions() -> None:
    families = gateway_families()
    assert len(families) >= 15
    for family in [*families, *api_families()]:
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert not labels & UNBOUNDED_LABELS, (family.name, labels)
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert not re.search(r"_(ms|milliseconds|minutes)(_|$)", family.name), "base units only"
    exposed = {f.name + ("_total" if f.type == "counter" else "_info" if f.type == "info" else "")
               for f in [*families, *api_families()]}
    documented = set(re.findall(r"^(gateway_\w+)", sys.modules[Metrics.__module__].__doc__ or "", re.MULTILINE))
    assert documented == exposed, "the table in the docstring of gateway/observability/_metrics.py is out of date"


def test_initialize_creates_every_known_series_at_zero() -> None:
    families = {f.name: f for f in gateway_families()}
    dead = {s.labels["reason"] for s in families["gateway_dead_letters"].samples}
    assert {"retries_exhausted", "undecodable", "blocked_destination", "gone"} <= dead
    attempts = {(s.labels["tier"], s.labels["outcome"], s.labels["status_class"])
                for s in families["gateway_delivery_attempts"].samples}
    assert ("retry-15m", "timeout", "none") in attempts and ("events", "success", "2xx") in attempts
    retries = {s.labels["tier"] for s in families["gateway_retries_scheduled"].samples}
    assert retries >= {"retry-1m", "retry-5m", "retry-15m"} and "events" not in retries


@pytest.mark.parametrize(("outcome", "status", "labels"), [
    (Outcome.SUCCESS, 204, ("success", "2xx")),
    (Outcome.HTTP_ERROR, 500, ("http_error", "5xx")),
    (Outcome.HTTP_ERROR, 404, ("http_error", "4xx")),
    (Outcome.HTTP_ERROR, 302, ("http_error", "3xx")),
    (Outcome.HTTP_ERROR, 101, ("http_error", "1xx")),
    (Outcome.HTTP_ERROR, 99, ("http_error", "other")),
    (Outcome.HTTP_ERROR, 999, ("http_error", "other")),
    (Outcome.TIMEOUT, None, ("timeout", "none")),
    (Outcome.TIMEOUT, 200, ("timeout", "none")),  # the head came, the body did not
    (Outcome.BLOCKED, None, ("blocked", "none")),
    (Outcome.CONNECTION_ERROR, None, ("connection_error", "none")),
])
def test_outcome_labels(outcome: Outcome, status: int | None, labels: tuple[str, str]) -> None:
    assert attempt_labels(Attempt(0, "events", 1.0, outcome, status)) == labels


@pytest.mark.parametrize("status", [0, 99, 100, 199, 600, 999])
def test_any_status_counts_under_a_preset_series(status: int) -> None:
    """Statuses such as 099 or 999 must not create label values that never existed
    (a series appearing at 1 has no increase)."""
    metrics = fresh_metrics()
    before = {(s.labels["outcome"], s.labels["status_class"]) for f in metrics.registry.collect()
              if f.name == "gateway_delivery_attempts" for s in f.samples}
    metrics.attempt("events", Attempt(0, "events", 3.0, Outcome.HTTP_ERROR, status))
    after = {(s.labels["outcome"], s.labels["status_class"]): s.value for f in metrics.registry.collect()
             if f.name == "gateway_delivery_attempts" for s in f.samples if s.labels["tier"] == "events"}
    assert set(after) <= before
    assert sum(after.values()) == 1


def test_attempts_that_never_reached_the_network_are_not_timed() -> None:
    metrics = fresh_metrics()
    for outcome in (Outcome.BLOCKED, Outcome.INVALID_ENDPOINT, Outcome.INTERNAL_ERROR):
        metrics.attempt("events", Attempt(0, "events", 0.0, outcome))
    metrics.attempt("events", Attempt(0, "events", 120.0, Outcome.SUCCESS, 204))
    text = generate_latest(metrics.registry).decode()
    assert value(text, "gateway_delivery_attempts_total", tier="events") == 4
    assert value(text, "gateway_delivery_duration_seconds_count", tier="events") == 1
    assert value(text, "gateway_delivery_duration_seconds_sum", tier="events") == 0.12


def test_end_to_end_buckets_resolve_each_stage_of_the_default_schedule() -> None:
    config = Config()
    stage_start = 0
    for delay in (0, *config.retry_delays):
        stage_start += delay
        # A delivery on this stage lands within its first minute (request timeout 15 s).
        window = [b for b in END_TO_END_BUCKETS if stage_start <= b <= stage_start + 60]
        assert len(window) >= 3, (stage_start, window)
    assert END_TO_END_BUCKETS[-1] > sum(config.retry_delays) + 4 * config.request_timeout
    assert config.request_timeout in DELIVERY_BUCKETS and DELIVERY_BUCKETS[-1] > config.request_timeout


# -- consumer lag --------------------------------------------------------------------


def stats(**partitions: dict[str, int]) -> dict[str, Any]:
    """A librdkafka statistics document with partitions of topic ``t``."""
    return {"topics": {"t": {"partitions": {
        p.lstrip("p"): {"hi_offset": -1001, "lo_offset": -1001, "stored_offset": -1001,
                        "committed_offset": -1001} | fields
        for p, fields in partitions.items()}}}}


def test_lag_counts_from_the_stored_then_committed_offset_then_the_log_start() -> None:
    document = stats(
        p0={"hi_offset": 100, "stored_offset": 90, "committed_offset": 80, "lo_offset": 0},
        p1={"hi_offset": 100, "committed_offset": 70, "lo_offset": 0},
        p2={"hi_offset": 100, "lo_offset": 10},
        p3={"hi_offset": 100},
        p4={"lo_offset": 0},  # no fetch answered yet: unknown, left out
        p5={"hi_offset": 100, "stored_offset": 0},  # not assigned here
    )
    assigned_here = [("t", p) for p in range(5)] + [("other", 0)]
    assert lag_from_stats(document, assigned_here) == {
        ("t", 0): 10, ("t", 1): 30, ("t", 2): 90, ("t", 3): 100,
    }


def test_the_watermark_listed_for_a_paused_partition_counts_when_it_is_larger() -> None:
    document = stats(p0={"hi_offset": 10, "stored_offset": 4}, p1={"hi_offset": 10, "stored_offset": 4},
                     p2={"hi_offset": -1001, "committed_offset": 2})
    listed = {("t", 0): 25, ("t", 1): 3, ("t", 2): 12}  # p1: the bundled broker lists too low
    assert lag_from_stats(document, [("t", 0), ("t", 1), ("t", 2)], listed) == {
        ("t", 0): 21, ("t", 1): 6, ("t", 2): 10,
    }


def lag_series(metrics: Metrics, tier: str) -> dict[tuple[str, str], float]:
    return {(s.labels["topic"], s.labels["partition"]): s.value
            for f in metrics.registry.collect() if f.name == "gateway_consumer_lag_records"
            for s in f.samples if s.labels["tier"] == tier}


def test_lag_series_follow_the_assignment() -> None:
    metrics = fresh_metrics()
    lag = ConsumerLag("unit-tier", metrics.consumer_lag)
    lag.assign([("t", 0), ("t", 1)])
    lag.update(stats(p0={"hi_offset": 5, "stored_offset": 2}, p1={"hi_offset": 7, "stored_offset": 7},
                     p2={"hi_offset": 9, "stored_offset": 0}))
    assert lag_series(metrics, "unit-tier") == {("t", "0"): 3, ("t", "1"): 0}
    lag.listed({("t", 1): 12, ("t", 2): 99})  # t/2 is not assigned here: ignored
    lag.update(stats(p0={"hi_offset": 5, "stored_offset": 2}, p1={"hi_offset": 7, "stored_offset": 7},
                     p2={"hi_offset": 9, "stored_offset": 0}))
    assert lag_series(metrics, "unit-tier") == {("t", "0"): 3, ("t", "1"): 5}
    lag.revoke([("t", 0)])  # another process owns it now: it must not count twice
    assert lag_series(metrics, "unit-tier") == {("t", "1"): 5}
    assert read_statistics("{not json", "unit-tier") is None  # logged, never raised into poll()
    assert read_statistics("[1]", "unit-tier") is None
    lag.update({"topics": "not a table"})  # logged, never raised into poll()
    lag.clear()
    assert lag_series(metrics, "unit-tier") == {}


# -- health ----------------------------------------------------------------------------


def test_readiness_needs_the_endpoint_table_and_every_tier_assigned() -> None:
    health = Health()
    assert health.readiness() == (False, "starting") and health.liveness() == (True, "ok")
    health.expect([ENDPOINTS_LOADED, assigned("events"), assigned("retry-1m")])
    health.met(ENDPOINTS_LOADED)
    health.met(assigned("events"))
    assert health.readiness() == (False, "waiting for: partitions assigned (retry-1m)")
    health.met(assigned("retry-1m"))
    health.met(assigned("retry-1m"))  # a second assignment (rebalance) changes nothing
    assert health.readiness() == (True, "ready")
    health.broken("consumer events", "consumer loop failed")
    assert health.liveness() == (False, "broken: consumer events: consumer loop failed")
    assert health.readiness()[0] is False
    health.expect([])
    health.stopping()
    assert health.readiness() == (False, "stopping") and health.liveness()[0]


def test_metrics_port_serves_metrics_health_and_readiness() -> None:
    health = Health()
    port = free_port()
    server = serve_metrics(Metrics(["events"], health=health), health, port, host="127.0.0.1")
    try:
        assert scrape(port, "/readyz").status_code == 503
        assert scrape(port, "/healthz").text == "ok\n"
        health.expect([ENDPOINTS_LOADED])
        response = scrape(port, "/readyz")
        assert (response.status_code, response.text) == (503, "waiting for: endpoint table loaded\n")
        assert value(scrape(port).text, "gateway_ready") == 0
        health.met(ENDPOINTS_LOADED)
        assert scrape(port, "/readyz").status_code == 200
        text = scrape(port).text
        assert value(text, "gateway_ready") == 1
        assert value(text, "gateway_build_info", version=importlib.metadata.version("webhook-gateway")) == 1
        assert "_created" not in text
        assert value(text, "process_resident_memory_bytes")  # the process's own series too
        assert scrape(port, "/nothing").status_code == 404
    finally:
        server.shutdown()
        server.server_close()


# -- a real worker -------------------------------------------------------------------


@pytest.fixture
def gate(receiver: Receiver) -> Iterator[threading.Event]:
    """Requests to /held wait until the test opens the gate."""
    opened = threading.Event()
    receiver.respond("/held", lambda request, seen: 204 if opened.wait(30) else 503)
    yield opened
    opened.set()


@pytest.mark.integration
def test_a_worker_reports_readiness_lag_and_in_flight_then_drains(
    topics: Config, receiver: Receiver, gate: threading.Event, tmp_path: Path
) -> None:
    register(topics, receiver.url("/held"))
    publish(topics, documented() * 3)  # 12 events, before any worker runs
    publish_undecodable(topics)
    port = free_port()
    # Held requests must outlast a statistics interval, and not time out meanwhile.
    gateway = GatewayProcess(topics, tmp_path / "gateway.log", port, GATEWAY_REQUEST_TIMEOUT="30")
    try:
        seen = gateway.wait_ready()
        assert seen[0][0] == 503 and seen[-1] == (200, "ready\n"), seen
        assert scrape(port, "/healthz").text == "ok\n"

        def lag(text: str) -> float | None:
            return value(text, "gateway_consumer_lag_records", tier="events")

        deadline = time.monotonic() + 15
        while lag(text := scrape(port).text) is None or value(
                text, "gateway_deliveries_in_flight", tier="events") != 12:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        # Nothing settled but the undecodable record: every event is lag, and in flight.
        assert 12 <= (lag(text) or 0) <= 13
        assert value(text, "gateway_in_flight_records", tier="events") == 12
        assert value(text, "gateway_decode_errors_total", tier="events", reason="undecodable") == 1
        assert value(text, "gateway_dead_letters_total", reason="undecodable") == 1
        assert value(text, "gateway_endpoints", state="enabled") == 1
        partitions = {s.labels["partition"] for f in text_string_to_metric_families(text)
                      for s in f.samples if s.name == "gateway_consumer_lag_records"
                      and s.labels["tier"] == "events"}
        assert partitions == {"0", "1", "2"}

        gate.set()
        deadline = time.monotonic() + 15
        while lag(text := scrape(port).text) != 0:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert value(text, "gateway_deliveries_in_flight") == 0
        assert value(text, "gateway_delivery_attempts_total", tier="events", outcome="success") == 12
        assert value(text, "gateway_events_consumed_total") == 13
        assert value(text, "gateway_events_consumed_total", event_type="TICKET") == 3
        assert value(text, "gateway_end_to_end_latency_seconds_count") == 12
        assert (value(text, "gateway_last_success_timestamp_seconds") or 0) > time.time() - 60
    finally:
        gate.set()
        code = gateway.stop()
    assert code == 0, gateway.text()
