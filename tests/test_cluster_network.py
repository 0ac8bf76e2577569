"""Network faults between the gateway and its Kafka cluster, under load.

The gateway's worker reaches the three brokers of the cluster (tests/kafka_cluster.py)
only through a TCP proxy before each (tests/tcp_proxy.py): every broker advertises its
proxy's port on the listener the worker bootstraps from, while replication, the
controller, the load's publisher and the audit use the brokers directly. So a fault hits
the gateway's connections and nothing else, as a broken network between the gateway's
machine and the cluster would. Each test:

* latency: 0.3 s each way (a fetch, a commit, an acknowledgement take 0.6 s more), then
  1.5 s each way (a 3 s round trip, half the workers' 6 s session);
* drops: every connection to every broker closed, five times, under load;
* blackhole: nothing passes either way for 15 s, and no connection is closed (half-open):
  far longer than the session, so every group rebalances; the connections open then stay
  dead afterwards too, and the gateway finds out only through its client's timeouts
  (``socket.timeout.ms``: deliveries come back about that long after the blackhole
  began, whatever its length; the gateway sets 30 s, librdkafka's own 60 s doubled it).

Each ends with the chaos suite's audit, which reads every topic: nothing lost, nothing
early, the repeats counted and bounded; and each asserts that its fault really took (the
proxies delayed, closed or swallowed traffic; deliveries went on, or stopped, meanwhile).
Every Produce request the worker sent through the proxies must ask ``acks=all`` of an
idempotent producer. Apache Kafka only, on the cluster (``-m cluster``): the bundled
broker's own proxy test is tests/test_stuck_consumer.py.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from gateway.config import Config

from .chaos_support import ChaosReceiver, Load, conclude, make_events, register
from .conftest import WorkerProcess
from .kafka_cluster import KafkaCluster, assert_acks_all_and_idempotent, repeats_bounded, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.brokers("kafka")]


def proxied_worker(cluster: KafkaCluster, config: Config, worker_factory: Any) -> WorkerProcess:
    """A `gateway run` process that reaches the cluster only through the proxies."""
    worker: WorkerProcess = worker_factory(config.replace(bootstrap_servers=cluster.proxied_bootstrap))
    return worker


def accepted_so_far(cluster: KafkaCluster) -> int:
    """Connections the proxies have accepted since the cluster started."""
    return sum(len(proxy.seen) for proxy in cluster.proxies.values())


def connected_since(cluster: KafkaCluster, accepted: int) -> bool:
    return accepted_so_far(cluster) > accepted


def round_trip(bootstrap: str) -> float:
    """Seconds a metadata request takes from here (a fresh client: connect, versions,
    metadata)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    started = time.monotonic()
    admin.list_topics(timeout=30)
    return time.monotonic() - started


@pytest.mark.timeout(240)
def test_latency_on_every_connection_to_the_cluster(
    cluster: KafkaCluster, cluster_config: Config, worker_factory: Any, request: pytest.FixtureRequest
) -> None:
    """0.3 s, then 1.5 s each way for 8 s each: delivery slows and goes on."""
    config = cluster_config
    cluster.create_topics(config)
    with ChaosReceiver(seed=71) as receiver:
        receiver.flaky(0.1)
        endpoints = {"/hook": register(config, receiver.url("/hook"))}
        worker = proxied_worker(cluster, config, worker_factory)
        load = Load(config, make_events(1500, seed=71), chunk=40, interval=0.5).start()
        receiver.wait_delivered(200, 60)
        phases = []
        for latency, seconds in ((0.3, 8.0), (1.5, 8.0)):
            for proxy in cluster.proxies.values():
                proxy.latency(latency)
            started, at = time.monotonic(), receiver.delivered()
            delayed = sum(p.delayed for p in cluster.proxies.values())
            probe = ""
            if latency < 1:  # (a fresh client's metadata request takes a few round trips: 12 s at 1.5 s)
                took = round_trip(cluster.proxied_bootstrap)
                assert took >= 2 * latency, f"a metadata request took {took:.2f} s under {latency} s of latency"
                probe = f", a fresh client's metadata request {took:.1f} s"
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))  # the fault's duration
            during = receiver.delivered() - at
            assert sum(p.delayed for p in cluster.proxies.values()) > delayed, "nothing was delayed"
            assert during > 0, f"no delivery in {seconds:g} s of {latency} s latency: slowed, never stopped"
            phases.append(f"{latency} s each way for {seconds:g} s: {during} delivered{probe}")
        for proxy in cluster.proxies.values():
            proxy.latency(0)
        result = conclude("network-latency", request, config, receiver, load, endpoints, [worker.log],
                          notes="; ".join(phases), drain_timeout=120)
        assert_acks_all_and_idempotent(cluster)
        assert worker.terminate() == 0, worker.text()[-3000:]
    repeats_bounded(result)


@pytest.mark.timeout(240)
def test_every_connection_to_the_cluster_dropped_five_times(
    cluster: KafkaCluster, cluster_config: Config, worker_factory: Any, request: pytest.FixtureRequest
) -> None:
    """Every 200 deliveries, every connection of the worker closed: it reconnects and
    delivers again before the next drop."""
    config = cluster_config
    cluster.create_topics(config)
    with ChaosReceiver(seed=81) as receiver:
        receiver.flaky(0.1)
        endpoints = {"/hook": register(config, receiver.url("/hook"))}
        worker = proxied_worker(cluster, config, worker_factory)
        load = Load(config, make_events(1500, seed=81), chunk=40, interval=0.4).start()
        drops = []
        for threshold in (200, 400, 600, 800, 1000):
            receiver.wait_delivered(threshold, 90)  # delivering again since the last drop
            accepted = accepted_so_far(cluster)
            closed = sum(p.drop() for p in cluster.proxies.values())
            assert closed > 0, "no connection was open to drop"
            wait_for("the worker connected again", functools.partial(connected_since, cluster, accepted), 30)
            drops.append(f"{closed} at {receiver.delivered()}")
        result = conclude("network-drops", request, config, receiver, load, endpoints, [worker.log],
                          notes=f"connections dropped (how many at how many deliveries): {', '.join(drops)}",
                          drain_timeout=120)
        assert_acks_all_and_idempotent(cluster)
        assert worker.terminate() == 0, worker.text()[-3000:]
    repeats_bounded(result)


@pytest.mark.timeout(240)
def test_a_blackhole_between_the_gateway_and_the_cluster_longer_than_its_session(
    cluster: KafkaCluster, cluster_config: Config, worker_factory: Any, request: pytest.FixtureRequest
) -> None:
    """15 s of silence both ways on every connection, none closed: deliveries stop, every
    group rebalances, and once the client's timeouts retire the dead connections, the
    worker delivers again."""
    config = cluster_config
    cluster.create_topics(config)
    with ChaosReceiver(seed=91) as receiver:
        receiver.flaky(0.1)
        endpoints = {"/hook": register(config, receiver.url("/hook"))}
        worker = proxied_worker(cluster, config, worker_factory)
        load = Load(config, make_events(1500, seed=91), chunk=30, interval=0.5).start()
        receiver.wait_delivered(200, 60)
        assigned = worker.text().count("partitions assigned")
        for proxy in cluster.proxies.values():
            proxy.blackhole()
        started, at_start = time.monotonic(), receiver.delivered()
        # Records fetched before it still go out (retries held until due: 3 s at most),
        # then nothing can: deliveries stop for the rest of the 15 s.
        time.sleep(6)
        settled = receiver.delivered()
        time.sleep(max(0.0, 15 - (time.monotonic() - started)))  # the fault's duration
        at_end = receiver.delivered()
        for proxy in cluster.proxies.values():
            proxy.blackhole(False)
        lifted = time.monotonic()
        assert sum(p.swallowed for p in cluster.proxies.values()) > 0, "the blackhole swallowed nothing"
        assert at_end == settled, f"{at_end - settled} deliveries 6-15 s into a blackhole of every broker"
        wait_for("deliveries resumed", lambda: receiver.delivered() > at_end, 120)
        resumed = time.monotonic() - lifted
        result = conclude("network-blackhole", request, config, receiver, load, endpoints, [worker.log],
                          notes=f"every broker blackholed 15 s at {at_start} deliveries ({settled - at_start} "
                                f"more went out in its first 6 s, none after); deliveries resumed {resumed:.1f} s "
                                "after it lifted", drain_timeout=120)
        # The connections swallowed into the blackhole are given up socket.timeout.ms
        # after it began (30 s, 15 s after it lifted: measured 16.4 s); librdkafka's own
        # 60 s default made that about 45 s.
        assert resumed < 35, f"deliveries resumed {resumed:.1f} s after the blackhole lifted"
        assert worker.text().count("partitions assigned") > assigned, "the group never rebalanced"
        assert_acks_all_and_idempotent(cluster)
        assert worker.terminate() == 0, worker.text()[-3000:]
    repeats_bounded(result)
