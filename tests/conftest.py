"""Fixtures that start real things: the bundled broker, topics, gateway subprocesses."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from gateway.codec import Codec
from gateway.config import Config
from gateway.store import Topics, create_topics
from gateway.streaming import Broker

_prefixes = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` forked (and did not reap), from ``/proc``."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (what a test expects stopped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


BROKERS = ("tansu", "kafka")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses a broker runs once per broker chosen with ``--brokers``."""
    if "broker_kind" in metafunc.fixturenames:
        chosen = [b.strip() for b in metafunc.config.getoption("brokers").split(",") if b.strip()]
        unknown = set(chosen) - set(BROKERS)
        if unknown:
            raise pytest.UsageError(f"--brokers: unknown {sorted(unknown)}; choose from {', '.join(BROKERS)}")
        only = metafunc.definition.get_closest_marker("brokers")
        if only is not None:
            chosen = [b for b in chosen if b in only.args]
        metafunc.parametrize("broker_kind", chosen, scope="session")


@pytest.fixture(scope="session")
def broker(broker_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One broker of each kind for the whole run; tests isolate themselves by topic prefix.
    It has ``bootstrap`` (host:port) and ``kind``."""
    if broker_kind == "tansu":
        log = tmp_path_factory.mktemp("broker") / "tansu.log"
        with Broker(port=free_port(), log=log) as running:
            running.kind = "tansu"  # type: ignore[attr-defined]
            yield running
    else:
        from .apache_kafka import KafkaNode

        with KafkaNode(tmp_path_factory.mktemp("kafka")) as node:
            yield node


@contextlib.contextmanager
def private_broker(kind: str, where: Path) -> Iterator[Any]:
    """A broker of ``kind`` of the test's own (to stop or kill), with ``bootstrap`` and
    ``pid``."""
    if kind == "tansu":
        own = Broker(port=free_port(), log=where / "tansu.log").start()
        try:
            yield own
        finally:
            own.stop()
    else:
        from .apache_kafka import KafkaNode

        with KafkaNode(where / "kafka") as node:
            yield node


def fresh_config(bootstrap: str, prefix: str, *, session_timeout_ms: int = 2000) -> Config:
    """A configuration of its own topics (``prefix`` and a number), with short delays and
    quick group joins."""
    return Config(
        bootstrap_servers=bootstrap,
        topic_prefix=f"{prefix}{os.getpid()}-{next(_prefixes)}",
        retry_delays=(1, 2, 3),
        defer_delays=(1, 2, 3),
        partitions=3,
        session_timeout_ms=session_timeout_ms,
        shutdown_timeout=10.0,
        request_timeout=5.0,
        allow_private_networks=True,
    )


@pytest.fixture
def config(broker: Any) -> Config:
    """A configuration of its own topics, with short delays and quick group joins."""
    return fresh_config(broker.bootstrap, "t")


@pytest.fixture
def topics(config: Config) -> Config:
    create_topics(config)
    return config


def gateway_env(config: Config, **extra: str) -> dict[str, str]:
    """Environment that points a `gateway` subprocess at ``config``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_BOOTSTRAP_SERVERS=config.bootstrap_servers,
        GATEWAY_TOPIC_PREFIX=config.topic_prefix,
        GATEWAY_RETRY_DELAYS=",".join(map(str, config.retry_delays)),
        GATEWAY_DEFER_DELAYS=",".join(map(str, config.defer_delays)),
        GATEWAY_PARTITIONS=str(config.partitions),
        GATEWAY_GROUP_PROTOCOL=config.group_protocol,
        GATEWAY_CIRCUIT_FAILURES=str(config.circuit_failures),
        GATEWAY_CIRCUIT_FAILURE_RATE=str(config.circuit_failure_rate),
        GATEWAY_MAX_POLL_INTERVAL_MS=str(config.max_poll_interval_ms),
        GATEWAY_SHUTDOWN_TIMEOUT=str(config.shutdown_timeout),
        GATEWAY_REQUEST_TIMEOUT=str(config.request_timeout),
        GATEWAY_READER_CHECK=str(config.reader_check),
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true" if config.allow_private_networks else "false",
        PYTHONUNBUFFERED="1",
    )
    if config.session_timeout_ms is not None:
        env["GATEWAY_SESSION_TIMEOUT_MS"] = str(config.session_timeout_ms)
    if config.schema_registry_url:
        env["GATEWAY_SCHEMA_REGISTRY_URL"] = config.schema_registry_url
    env.update(extra)
    return env


def run_gateway(
    config: Config, *args: str, input: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the real `gateway` command line as a subprocess and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=gateway_env(config, **env),
    )


def read_topic(
    config: Config, topic: str, *, timeout: float = 15.0, expect: int | None = None
) -> list[Any]:
    """Every record of ``topic`` from the beginning to its current end (or until ``expect``
    records arrived), with a plain consumer outside any group the gateway uses."""
    meta_consumer = Consumer({
        "bootstrap.servers": config.bootstrap_servers,
        "group.id": f"test-reader-{time.monotonic_ns()}",
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 25,  # the end is the first empty fetch: the broker holds it this long
        "enable.auto.commit": False,
        "allow.auto.create.topics": False,
    })
    try:
        partitions = meta_consumer.list_topics(topic, timeout=10).topics[topic].partitions
        meta_consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        at_end: set[int] = set()
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if expect is None and len(at_end) == len(partitions):
                break
            if expect is not None and len(records) >= expect:
                break
            msg = meta_consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(int(msg.partition() or 0))
                    continue
                raise RuntimeError(error.str())
            at_end.discard(int(msg.partition() or 0))
            records.append(msg)
        return records
    finally:
        meta_consumer.close()


def decode_all(messages: list[Any], codec: Codec | None = None) -> list[tuple[str, dict[str, Any]]]:
    codec = codec or Codec()
    return [codec.decode(m.value()) for m in messages]


DOCS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "webhook-events.md"


@pytest.fixture
def receiver() -> Iterator[Any]:
    from .receiver import Receiver

    with Receiver() as running:
        yield running


class WorkerProcess:
    """A real `gateway run` subprocess with its log in a file."""

    def __init__(self, config: Config, log: Path, *args: str) -> None:
        self.config = config
        self.log = log
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_assigned: bool = True, timeout: float = 30.0) -> WorkerProcess:
        self._log_file = open(self.log, "ab")  # noqa: SIM115
        self._offset = self.log.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--no-metrics", *self.args],
            stdout=self._log_file, stderr=subprocess.STDOUT,
            env=gateway_env(self.config, GATEWAY_LOG_LEVEL="info"),
        )
        if wait_assigned:
            tiers = len(Topics.from_config(self.config).worker_tiers)
            if "--tiers" in self.args:  # the tiers named, and the deliveries topic every process reads
                tiers = len(set(self.args[self.args.index("--tiers") + 1].split(",")) | {"deliveries"})
            deadline = time.monotonic() + timeout
            while self.text().count("partitions assigned") < tiers:
                if self.process.poll() is not None:
                    raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker not assigned within {timeout} s:\n{self.text()}")
                time.sleep(0.05)
        return self

    def text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._log_file.close()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.terminate()
        code = self.process.wait(timeout)
        self._log_file.close()
        return code


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def make(config: Config, *args: str, **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(config, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker.start(**kwargs)

    yield make
    for worker in started:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()
        if not worker._log_file.closed:
            worker._log_file.close()


# -- a three-broker Apache Kafka cluster (tests/kafka_cluster.py) ----------------------------


class ClusterHolder:
    """The one cluster of a run, started when a test first asks for it and closed as soon
    as the next test does not (:func:`pytest_runtest_teardown`): the cluster tests share
    one (their modules are next to each other: test_cluster.py, test_cluster_network.py)
    and no JVM of it idles through the rest of the run. A test that asks again later gets
    a new one."""

    def __init__(self, where: pytest.TempPathFactory) -> None:
        self.where = where
        self.running: Any = None

    def get(self) -> Any:
        if self.running is None:
            from .kafka_cluster import KafkaCluster

            self.running = KafkaCluster(self.where.mktemp("cluster")).start()
        return self.running

    def close(self) -> None:
        if self.running is not None:
            running, self.running = self.running, None
            running.close()


CLUSTER_HOLDER = pytest.StashKey[ClusterHolder]()


@pytest.fixture(scope="session")
def cluster_holder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHolder]:
    holder = ClusterHolder(tmp_path_factory)
    request.config.stash[CLUSTER_HOLDER] = holder
    yield holder
    holder.close()


@pytest.fixture
def cluster(broker_kind: str, cluster_holder: ClusterHolder) -> Any:
    """One controller and three brokers of Apache Kafka, a proxy before each broker
    (:class:`tests.kafka_cluster.KafkaCluster`), whole: whatever the test before stopped,
    killed, froze or faulted is undone before this one starts (every broker up, every
    replica in sync, every partition led by its preferred replica, no proxy fault).
    Apache Kafka only: mark the tests ``brokers("kafka")`` (the bundled broker has no
    replication)."""
    if broker_kind != "kafka":
        pytest.skip("a cluster is Apache Kafka's: the bundled broker has no replication")
    running = cluster_holder.get()
    running.heal()
    return running


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After a test's own teardown: the cluster closes when the next test does not use it."""
    yield
    holder = item.config.stash.get(CLUSTER_HOLDER, None)
    if holder is not None and "cluster" in getattr(item, "fixturenames", ()) and (
            nextitem is None or "cluster" not in getattr(nextitem, "fixturenames", ())):
        holder.close()


CLUSTER_SESSION_MS = 6000
"""The workers' consumer session on the cluster: three times the brokers' 2 s session.

A broker that dies stalls every ``acks=all`` write it was in sync for, offset commits
included, until the controller fences it (the broker session) and shrinks the in-sync
sets; a group's heartbeats wait behind a stalled commit on the coordinator connection.
With the 2 s consumer session of the other tests, equal to the broker session, every
consumer of the worker timed out of its group at each broker crash (measured: the leader
killed mid-drain repeated 1,683 of 2,000 deliveries, re-read past the deferral rungs'
oldest unsettled records; with 6 s, none). A worker without a session set keeps the same
ratio on any cluster of several brokers (``streaming.session_for``: 27 s on Kafka's 9 s
``broker.session.timeout.ms``)."""


@pytest.fixture
def cluster_config(cluster: Any) -> Config:
    """:func:`config` on the cluster: topics of its own, every broker to bootstrap from
    (directly; ``cluster.proxied_bootstrap`` goes through the proxies), and a session
    that outlasts a broker's crash (:data:`CLUSTER_SESSION_MS`)."""
    return fresh_config(cluster.bootstrap, "c", session_timeout_ms=CLUSTER_SESSION_MS)
