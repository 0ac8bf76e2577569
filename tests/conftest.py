"""Fixtures that start real things: the bundled broker, topics, gateway subprocesses."""

from __future__ import annotations

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

from gateway.broker import Broker
from gateway.codec import Codec
from gateway.config import Config
from gateway.topics import create_topics

_prefixes = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One bundled broker for the whole run; tests isolate themselves by topic prefix."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with Broker(port=free_port(), log=log) as running:
        yield running


@pytest.fixture
def config(broker: Broker) -> Config:
    """A configuration of its own topics, with short delays and quick group joins."""
    return Config(
        bootstrap_servers=broker.bootstrap,
        topic_prefix=f"t{os.getpid()}-{next(_prefixes)}",
        retry_delays=(1, 2, 3),
        partitions=3,
        session_timeout_ms=2000,
        shutdown_timeout=10.0,
        request_timeout=5.0,
        allow_private_networks=True,
    )


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
        GATEWAY_PARTITIONS=str(config.partitions),
        GATEWAY_SESSION_TIMEOUT_MS=str(config.session_timeout_ms),
        GATEWAY_SHUTDOWN_TIMEOUT=str(config.shutdown_timeout),
        GATEWAY_REQUEST_TIMEOUT=str(config.request_timeout),
        GATEWAY_ALLOW_PRIVATE_NETWORKS="true" if config.allow_private_networks else "false",
        PYTHONUNBUFFERED="1",
    )
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
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    continue
                raise RuntimeError(msg.error().str())
            at_end.discard(msg.partition())
            records.append(msg)
        return records
    finally:
        meta_consumer.close()


def decode_all(messages: list[Any], codec: Codec | None = None) -> list[tuple[str, dict[str, Any]]]:
    codec = codec or Codec()
    return [codec.decode(m.value()) for m in messages]


DOCS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "webhook-events.md"
