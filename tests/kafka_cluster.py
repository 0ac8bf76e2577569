"""A three-broker Apache Kafka cluster on one machine, for the cluster and network-fault
tests (tests/test_cluster.py, tests/test_cluster_network.py).

The layout: one controller and three brokers, each a :class:`gateway.streaming.KafkaNode`
(the jars of ``kafka/pom.xml``, :data:`tests.apache_kafka.TEST_SPEED` settings) with its
own ports, ``node.id`` and data directory:

* node 0 is the KRaft controller alone (``process.roles=controller``), the only voter;
* nodes 1, 2 and 3 are brokers (``process.roles=broker``). Each has two client
  listeners: ``PLAINTEXT`` (direct; also the brokers' own, for replication) and
  ``PROXIED``, which advertises the port of a :class:`tests.tcp_proxy.TcpProxy` in front
  of it. A client that bootstraps from :attr:`KafkaCluster.proxied_bootstrap` reaches
  every broker through its proxy, and only the gateway's traffic crosses the proxies:
  a fault there never touches replication or the controller.

Why a controller of its own rather than three combined nodes: stopping brokers never
stops the quorum, so a test can take two brokers of three away and see what
``min.insync.replicas`` does with the one left (with three combined nodes, two down
would stop the metadata quorum too, and writes would hang rather than be refused).

The internal topics get three copies (``__consumer_offsets`` too, so a group's
coordinator moves when its broker dies), and :meth:`KafkaCluster.heal` gives every
partition back to its preferred leader between tests. Ports come
from below the kernel's ephemeral range (:func:`tests.chaos_support.chaos_port`): a
broker stopped for a minute must find its ports free when it starts again, and a port in
the ephemeral range may meanwhile be some connection's local port.

Measured here (2 cores shared with other work, load average 3 to 16): the four nodes are
formatted at once and the three brokers registered 17-28 s after the start; a broker
stops cleanly in 2-3 s, starts again on its data in 8-11 s, and is back in every
in-sync set then or within a second; a killed leader's partitions have a new leader in
1.7-1.9 s (the 2 s broker session), a killed coordinator's groups a new one in 2.2-3.4 s.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka import ConsumerGroupState, ElectionType, KafkaException
from confluent_kafka.admin import AdminClient

from gateway import streaming
from gateway.config import Config
from gateway.store import Topics, create_topics

from .apache_kafka import TEST_SPEED, kafka_jars
from .chaos_support import Audit, chaos_port
from .tcp_proxy import INIT_PRODUCER_ID, PRODUCE, TcpProxy

__all__ = ["BROKERS", "CLUSTER", "KafkaCluster", "PartitionState", "assert_acks_all_and_idempotent",
           "repeats_bounded", "wait_for"]

BROKERS = (1, 2, 3)
"""The brokers' node ids (the controller is node 0)."""

CLUSTER = {
    # Internal topics as a production cluster has them: three copies, two in sync to write.
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT",
}
"""Settings of every node of the cluster, over :data:`tests.apache_kafka.TEST_SPEED`."""


def wait_for(what: str, condition: Callable[[], bool], timeout: float, *, every: float = 0.2,
             detail: Callable[[], object] | None = None) -> float:
    """Wait until ``condition()`` holds; the seconds it took. Fails saying ``what`` (and
    ``detail()``) after ``timeout``. A condition that cannot be told because the cluster
    does not answer (a KafkaException: a broker just killed may be the one asked) is not
    met yet."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(KafkaException):
            if condition():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s" + (f"; {detail()}" if detail else ""))
        time.sleep(every)


@dataclass(frozen=True)
class PartitionState:
    """One partition as the cluster's metadata shows it."""

    topic: str
    partition: int
    leader: int
    """-1 while it has none."""
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


class KafkaCluster:
    """One controller and three brokers in ``root``, a proxy before each broker. Use as a
    context manager, or :meth:`start` / :meth:`close`.

    ``bootstrap`` lists the three brokers directly, ``proxied_bootstrap`` through their
    proxies; ``brokers[i]`` and ``proxies[i]`` are broker ``i`` (1, 2, 3) and its proxy.
    """

    def __init__(self, root: Path) -> None:
        taken: set[int] = set()

        def port() -> int:
            while (chosen := chaos_port()) in taken:
                pass
            taken.add(chosen)
            return chosen

        controller_port = port()
        voters = f"0@127.0.0.1:{controller_port}"
        self.cluster_id = streaming.new_cluster_id()
        common = {**TEST_SPEED, **CLUSTER}
        self.controller = streaming.KafkaNode(
            root / "controller", port=controller_port, controller_port=controller_port, node_id=0, voters=voters,
            cluster_id=self.cluster_id, on_parent_death=signal.SIGKILL,
            settings={**common, "process.roles": "controller",
                      "listeners": f"CONTROLLER://127.0.0.1:{controller_port}",
                      "advertised.listeners": f"CONTROLLER://127.0.0.1:{controller_port}"})
        self.brokers: dict[int, streaming.KafkaNode] = {}
        self.proxies: dict[int, TcpProxy] = {}
        for node_id in BROKERS:
            direct, proxied, front = port(), port(), port()
            self.proxies[node_id] = TcpProxy(proxied, port=front)
            self.brokers[node_id] = streaming.KafkaNode(
                root / f"broker-{node_id}", port=direct, controller_port=controller_port, node_id=node_id,
                voters=voters, cluster_id=self.cluster_id, on_parent_death=signal.SIGKILL,
                settings={**common, "process.roles": "broker",
                          "listeners": f"PLAINTEXT://127.0.0.1:{direct},PROXIED://127.0.0.1:{proxied}",
                          "advertised.listeners": f"PLAINTEXT://127.0.0.1:{direct},PROXIED://127.0.0.1:{front}"})
        self.bootstrap = ",".join(node.bootstrap for node in self.brokers.values())
        self.proxied_bootstrap = ",".join(f"127.0.0.1:{proxy.port}" for proxy in self.proxies.values())
        self._admin: AdminClient | None = None

    # -- the whole cluster ---------------------------------------------------------------

    def start(self, *, timeout: float = 120.0) -> Self:
        """Start the controller and the brokers (formatted at once, then all launched
        before any is waited for: a broker answers only once the controller runs), and the
        proxies; wait until the three brokers are registered. The JVMs are launched from
        this thread: they die with it (``on_parent_death``)."""
        kafka_jars()  # the tests' hint when Java or Maven is missing
        try:
            for proxy in self.proxies.values():
                proxy.start()
            nodes = [self.controller, *self.brokers.values()]
            with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
                for formatted in [pool.submit(node.format) for node in nodes]:
                    formatted.result()
            self.controller.launch()
            for node in self.brokers.values():
                node.launch()
            for node in self.brokers.values():
                node.wait_ready(timeout)
            wait_for("three brokers registered", lambda: self.registered() == set(BROKERS), timeout,
                     detail=self.registered)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for node in self.brokers.values():
            node.stop(timeout=20)
        self.controller.stop(timeout=20)
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def running(self, node_id: int) -> bool:
        return self.brokers[node_id].running

    def heal(self, *, timeout: float = 90.0) -> None:
        """Undo whatever a test did: every proxy fault off (the connections it left,
        blackholed ones included, closed, and its record of them cleared), every broker
        stopped or killed started again (a frozen one resumed), every replica of every
        partition back in sync and every partition led by its preferred replica, so the
        next test starts on a whole cluster."""
        for proxy in self.proxies.values():
            proxy.latency(0)
            proxy.blackhole(False)
            proxy.blackhole_when(None)
            proxy.drop()
            proxy.seen.clear()
        for node_id, node in self.brokers.items():
            if node.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)
            if not self.running(node_id):
                node.start(timeout=timeout)
        wait_for("three brokers registered", lambda: self.registered() == set(BROKERS), timeout,
                 detail=self.registered)
        self.wait_in_sync(timeout=timeout)
        self.balance(timeout=timeout)

    def balance(self, *, timeout: float = 60.0) -> float:
        """Give every partition back to its preferred leader (the first of its replicas),
        as ``auto.leader.rebalance.enable`` does after five minutes; the seconds it took.
        A broker that was away leads nothing until then: without this, the tests after
        one that killed brokers would find every group's coordinator on one broker."""

        def balanced() -> bool:
            unbalanced = [p for p in self.partitions() if p.replicas and p.leader != p.replicas[0]]
            if unbalanced:
                # (No timeouts as keywords: confluent-kafka 2.16 fails on them with a SystemError.)
                with contextlib.suppress(KafkaException, concurrent.futures.TimeoutError):
                    self.admin.elect_leaders(ElectionType.PREFERRED, None).result(15)
            return not unbalanced

        return wait_for("every partition led by its preferred replica", balanced, timeout, every=0.5)

    # -- one broker ----------------------------------------------------------------------

    def stop(self, node_id: int) -> None:
        """A clean shutdown of one broker (its leaderships move first)."""
        code = self.brokers[node_id].stop(timeout=60)
        assert code in (0, 143), f"broker {node_id} exited with {code}:\n{self.brokers[node_id].tail()}"

    def kill(self, node_id: int) -> None:
        """SIGKILL one broker: the controller fences it when its session (2 s) expires."""
        self.brokers[node_id].kill()

    def start_broker(self, node_id: int, *, timeout: float = 90.0) -> None:
        """Start a stopped or killed broker again on its data and ports."""
        self.brokers[node_id].start(timeout=timeout)

    # -- what the cluster says -----------------------------------------------------------

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0,
                                       "reconnect.backoff.max.ms": 500})
        return self._admin

    def registered(self) -> set[int]:
        """The brokers the metadata lists (registered and not fenced)."""
        with contextlib.suppress(KafkaException):
            return set(self.admin.list_topics(timeout=5).brokers)
        return set()

    def partitions(self, topics: Iterable[str] | None = None) -> list[PartitionState]:
        """Every partition of ``topics`` (of every topic, internal ones included, when
        None) as the metadata shows it now."""
        wanted = set(topics) if topics is not None else None
        metadata = self.admin.list_topics(timeout=5)
        return [
            PartitionState(name, p.id, p.leader, tuple(p.replicas), tuple(p.isrs))
            for name, topic in sorted(metadata.topics.items()) if wanted is None or name in wanted
            for p in sorted(topic.partitions.values(), key=lambda p: p.id)
        ]

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition → the broker leading it (-1: none)."""
        return {p.partition: p.leader for p in self.partitions([topic])}

    def out_of_sync(self) -> list[PartitionState]:
        """Partitions with a replica out of their in-sync set, or no leader."""
        try:
            return [p for p in self.partitions() if p.leader < 0 or set(p.isr) != set(p.replicas)]
        except KafkaException as exc:
            return [PartitionState(f"(no metadata: {exc})", -1, -1, (), ())]

    def wait_in_sync(self, *, timeout: float = 90.0) -> float:
        """Wait until every replica of every partition is in sync; the seconds it took."""
        return wait_for("every replica in sync", lambda: not self.out_of_sync(), timeout,
                        detail=lambda: self.out_of_sync()[:5])

    def create_topics(self, config: Config) -> Topics:
        """``gateway topics create``'s topics for ``config``, once every broker knows them."""
        create_topics(config)
        topics = Topics.from_config(config)
        self.wait_topics(topics.all())
        return topics

    def wait_topics(self, names: Iterable[str], *, timeout: float = 30.0) -> None:
        """Wait until every broker's metadata shows the topics ``names``, every replica in
        sync (a topic just created reaches the brokers a moment after the controller)."""
        wanted = set(names)

        def shown() -> bool:
            try:
                partitions = self.partitions(wanted)
            except KafkaException:
                return False
            return {p.topic for p in partitions} == wanted and all(
                p.leader >= 0 and set(p.isr) == set(p.replicas) for p in partitions)

        wait_for(f"topics {sorted(wanted)[:3]}… in every broker's metadata", shown, timeout)

    def coordinator(self, group: str) -> int:
        """The broker coordinating ``group`` (-1 when the cluster cannot say now)."""
        try:
            described = self.admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
        except (KafkaException, concurrent.futures.TimeoutError):
            return -1
        if described.state == ConsumerGroupState.DEAD:
            return -1
        return int(described.coordinator.id)


def assert_acks_all_and_idempotent(cluster: KafkaCluster) -> None:
    """Every Produce request the proxies carried asked ``acks=all`` (-1), from an
    idempotent producer: one that asked for its producer id (InitProducerId) first, which
    a plain producer never does."""
    seen = [conn for proxy in cluster.proxies.values() for conn in proxy.seen]
    producing = [conn for conn in seen if PRODUCE in conn.api_keys]
    assert producing, "nothing was produced through the proxies"
    assert all(conn.acks == {-1} for conn in producing), {(c.client_id, frozenset(c.acks)) for c in producing}
    clients = {conn.client_id for conn in producing}
    idempotent = {conn.client_id for conn in seen if INIT_PRODUCER_ID in conn.api_keys}
    assert clients <= idempotent, f"producers that never asked for a producer id: {clients - idempotent}"


def repeats_bounded(result: Audit) -> None:
    """At most one delivery in ten repeated. What a group rebalance repeats (the records in
    flight and settled past the last commit) stays well under it at the tests' loads, and
    a broker's crash is not expected to cause one: the workers' session outlasts it
    (``CLUSTER_SESSION_MS`` in conftest). Measured: 0 to 34 a scenario; with a 2 s session,
    the leader's SIGKILL mid-drain repeated 1,683 of 2,000."""
    bound = result.pairs // 10
    assert result.repeated <= bound, f"{result.repeated} repeated deliveries, more than {bound}"
