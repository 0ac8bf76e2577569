"""The consumer session a worker asks for, when the user sets none: chosen from the cluster.

A session is how long a dead worker's partitions wait before another worker gets them (a
worker killed and restarted at once waits for it too). Shorter is better, down to what
the cluster can stall a live worker's heartbeats for. On a cluster of several brokers,
a dead follower stalls ``acks=all`` offset commits until the controller fences it
(``broker.session.timeout.ms``, 9 s by default), and a consumer's heartbeats wait behind
its commits on the coordinator's connection. Measured on a three-broker cluster
(tests/test_cluster.py): a worker session equal to the broker session repeated 1,683
of 2,000 deliveries when a leader was killed; three times it repeated none. A single
broker has no follower to wait for, so nothing stalls a commit while it lives.

:func:`session_for` is the rule, pure; :func:`settle_session` asks the cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._metadata import ClusterMetadata
from confluent_kafka.admin._resource import ResourceType

from ..config import Config
from ..store import cluster_metadata

__all__ = [
    "ONE_BROKER_SESSION_MS", "UNKNOWN_CLUSTER_SESSION_MS", "Session", "brokers_in", "session_for", "session_ms",
    "settle_session",
]

log = logging.getLogger("gateway.session")

ONE_BROKER_SESSION_MS = 10_000
"""A single broker: no follower can stall a commit, and a broker's own pause stops every
member's session clock with it."""

UNKNOWN_CLUSTER_SESSION_MS = 30_000
"""Several brokers that do not tell their ``broker.session.timeout.ms``: three times
Kafka's default of 9 s, rounded up."""

BROKER_SESSIONS = 3
"""A worker's session in broker sessions, on a cluster of several brokers."""


@dataclass(frozen=True)
class Session:
    """A consumer session chosen, and why (what the worker logs)."""

    ms: int
    why: str


def session_for(brokers: int, broker_session_ms: int | None, *, group_min_ms: int | None = None,
                group_max_ms: int | None = None) -> Session:
    """The session for a cluster of ``brokers`` brokers that say their
    ``broker.session.timeout.ms`` (None: not said), within the group session bounds they
    allow (``group.min/max.session.timeout.ms``, when said)."""
    if brokers <= 1:
        chosen = Session(ONE_BROKER_SESSION_MS, "one broker: no follower can stall an offset commit")
    elif broker_session_ms is not None:
        chosen = Session(BROKER_SESSIONS * broker_session_ms,
                         f"{brokers} brokers: {BROKER_SESSIONS} times their broker.session.timeout.ms "
                         f"({broker_session_ms} ms), how long a dead follower can stall an offset commit")
    else:
        chosen = Session(UNKNOWN_CLUSTER_SESSION_MS,
                         f"{brokers} brokers that do not describe their broker.session.timeout.ms")
    bounded = chosen.ms
    if group_max_ms is not None:
        bounded = min(bounded, group_max_ms)
    if group_min_ms is not None:
        bounded = max(bounded, group_min_ms)
    if bounded != chosen.ms:
        return Session(bounded, f"{chosen.why}; held to the brokers' group session bounds "
                                f"({group_min_ms or 0}-{group_max_ms or 'any'} ms)")
    return chosen


def brokers_in(metadata: Any) -> int:
    """How many brokers a cluster's metadata (``AdminClient.list_topics``) shows: those
    that answer, and those holding a copy of some partition (listed even while down)."""
    replicas = {replica for topic in metadata.topics.values()
                for partition in topic.partitions.values() for replica in partition.replicas}
    return len(set(metadata.brokers) | replicas)


def _described(admin: AdminClient, broker: int, timeout: float) -> dict[str, int | None]:
    """The broker's session settings; None for each it does not describe (the bundled
    broker describes none; a cluster may deny DescribeConfigs)."""
    names = ("broker.session.timeout.ms", "group.min.session.timeout.ms", "group.max.session.timeout.ms")
    resource = ConfigResource(ResourceType.BROKER, str(broker))
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout=timeout)
    except (KafkaException, TimeoutError) as exc:  # (refused or unanswered: the conservative session)
        log.warning("broker configuration not described", extra={"broker": broker, "error": str(exc)})
        entries = {}
    found: dict[str, int | None] = {}
    for name in names:
        entry = entries.get(name)
        value = getattr(entry, "value", None)
        found[name] = int(value) if value is not None and str(value).isdigit() else None
    return found


def settle_session(
    config: Config, *, timeout: float = 15.0, cluster: tuple[AdminClient, ClusterMetadata] | None = None
) -> Config:
    """``config`` with its consumer session chosen (:func:`session_for`) when the user set
    none, the choice logged. Blocking: asks the cluster for its metadata and one broker's
    settings. Raises :class:`~gateway.errors.Unavailable` when no broker answers.

    The brokers counted are those that answer and those holding a copy of any topic's
    partition: a broker that is down while a worker starts still counts. The choice holds
    until the worker restarts (a broker added later counts from then). With KIP-848
    (``group_protocol`` ``consumer``) the broker sets the session: nothing is chosen.
    ``cluster``: a client and the metadata it already read (a worker's start reads it once)."""
    if config.session_timeout_ms is not None or config.group_protocol == "consumer":
        return config
    if cluster is None:
        admin = AdminClient(config.kafka_common())
        cluster = admin, cluster_metadata(admin, config, timeout=timeout)
    admin, metadata = cluster
    found = _described(admin, min(metadata.brokers), timeout)
    session = session_for(brokers_in(metadata), found["broker.session.timeout.ms"],
                          group_min_ms=found["group.min.session.timeout.ms"],
                          group_max_ms=found["group.max.session.timeout.ms"])
    log.info("consumer session chosen", extra={"session_ms": session.ms, "why": session.why,
                                               "set_it_with": "GATEWAY_SESSION_TIMEOUT_MS"})
    return config.replace(session_timeout_ms=session.ms)


def session_ms(config: Config) -> int:
    """The session of ``config``: what the user set or :func:`settle_session` chose; a
    configuration neither has been through gets the conservative one."""
    return config.session_timeout_ms if config.session_timeout_ms is not None else UNKNOWN_CLUSTER_SESSION_MS
