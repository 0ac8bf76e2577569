"""Creating the gateway's topics with the settings each needs, and checking existing ones.

``gateway topics create`` calls :func:`create_topics`; the rules for each topic's settings
are :func:`topic_specs` and :func:`plan_replication`, pure.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._metadata import ClusterMetadata
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from ..config import Config
from ..errors import Unavailable
from ._topics import Topics, delay_label

__all__ = [
    "DAY_MS", "TopicSpec", "TopicStatus", "TopicsPlan", "cluster_metadata", "create_topics", "plan_replication",
    "topic_specs",
]

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """How one topic is created: its name and the settings that differ from the broker's."""

    name: str
    settings: dict[str, str]
    why: str
    """One line for the README and ``topics create``: why these settings."""


def topic_specs(config: Config, replication_factor: int) -> list[TopicSpec]:
    """Every topic's settings, for a cluster whose topics get ``replication_factor`` copies.

    * Every topic keeps ``min.insync.replicas`` at one less than its replicas (at most 2,
      at least 1), and the gateway's producers write with ``acks=all``: an acknowledged
      record survives the loss of a broker, and one broker down never stops writes.
    * Retry tiers and deferral rungs keep records at least a week and at least ten times
      their delay (and the deferral age limit): a record must outlive any outage of the
      workers that read it (a record that expires unread is lost), with room to spare.
    * The events topic keeps a week (time to recover from anything); the dead-letter
      topic 30 days (a bad day can still be replayed weeks later).
    * The endpoints topic is compacted: the latest registration per endpoint id, forever;
      a tombstone removes one (tombstones themselves are dropped a day after compaction).
    * The attempts topic (the delivery history) keeps ``attempts_retention`` (7 days).
    * The dlq-replays topic is compacted too (a dead letter replayed twice keeps one
      record) and also deleted after the dead-letter topic's 30 days: a replay record
      outliving its dead letter would only grow the topic.
    """
    topics = Topics.from_config(config)
    isr = str(max(1, min(2, replication_factor - 1)))
    week = 7 * DAY_MS
    specs = [TopicSpec(topics.events, {"retention.ms": str(week)}, "events from the platform: a week")]
    for tier in topics.tiers[1:]:
        retention = max(week, 10 * tier.delay * 1000)
        specs.append(TopicSpec(tier.topic, {"retention.ms": str(retention)},
                               f"retries due {delay_label(tier.delay)} after a failure: "
                               f"{retention // DAY_MS} days, far beyond the delay"))
    specs.append(TopicSpec(topics.deliveries, {"retention.ms": str(week)},
                           "deliveries on their way to their endpoint's owner: a week"))
    for tier in topics.deferral_tiers:
        retention = max(week, 10 * tier.delay * 1000, 10 * config.defer_max_age * 1000)
        specs.append(TopicSpec(tier.topic, {"retention.ms": str(retention)},
                               f"deliveries put off for {delay_label(tier.delay)}: {retention // DAY_MS} days, "
                               "far beyond the delay and the deferral age limit"))
    specs += [
        TopicSpec(topics.dlq, {"retention.ms": str(30 * DAY_MS)}, "dead letters: 30 days to inspect and replay"),
        TopicSpec(topics.endpoints, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
                                     "delete.retention.ms": str(DAY_MS)},
                  "registrations: compacted, the latest per endpoint, kept forever"),
        TopicSpec(topics.dlq_replays, {"cleanup.policy": "compact,delete", "retention.ms": str(30 * DAY_MS)},
                  "which dead letters were replayed: compacted, and gone with the dead letters"),
        TopicSpec(topics.attempts, {"retention.ms": str(config.attempts_retention * 1000)},
                  f"the delivery history: every attempt, {delay_label(config.attempts_retention)}"),
        TopicSpec(topics.circuits, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
                                    "delete.retention.ms": str(DAY_MS)},
                  "the last circuit breaker change per endpoint: compacted"),
    ]
    for spec in specs:
        spec.settings["min.insync.replicas"] = isr
    return specs


@dataclass(frozen=True)
class TopicStatus:
    topic: str
    created: bool
    """False when the topic already existed."""
    problems: tuple[str, ...] = ()
    """How an existing topic differs from what ``topics create`` would make."""


@dataclass(frozen=True)
class TopicsPlan:
    """What :func:`create_topics` decided before creating anything."""

    brokers: int
    replication_factor: int
    warnings: tuple[str, ...]


def plan_replication(requested: int | None, brokers: int) -> TopicsPlan:
    """The replication factor to create with: as requested, or (``None``) three copies,
    or one per broker on a smaller cluster. Asking for more copies than there are
    brokers is warned about (Kafka refuses to create such topics)."""
    warnings = []
    if requested is None:
        factor = max(1, min(3, brokers))
        if factor < 3:
            warnings.append(
                f"the cluster has {brokers} broker{'s' if brokers != 1 else ''}: topics get {factor} "
                f"{'copy' if factor == 1 else 'copies'} (3 on a cluster of 3 or more); fine for a demo, "
                "not for production")
    else:
        factor = requested
        if requested > brokers:
            warnings.append(
                f"--replication-factor {requested} asks for more copies than the cluster's {brokers} "
                f"broker{'s' if brokers != 1 else ''}: Kafka refuses to create such topics")
    return TopicsPlan(brokers, factor, tuple(warnings))


def cluster_metadata(admin: AdminClient, config: Config, *, timeout: float) -> ClusterMetadata:
    """The cluster's metadata (its brokers, every topic); :class:`~gateway.errors.Unavailable`
    naming the address when no broker answers."""
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise Unavailable.no_broker(config.bootstrap_servers, exc.args[0].str()) from None
    if not metadata.brokers:
        raise Unavailable.no_broker(config.bootstrap_servers, "it listed no brokers")
    return metadata


def create_topics(
    config: Config,
    *,
    on_status: Callable[[TopicStatus], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    timeout: float = 30.0,
) -> list[TopicStatus]:
    """Create every gateway topic that does not exist yet, with :func:`topic_specs`;
    existing ones are left as they are, and checked: a partition count or cleanup
    policy that differs from what would be created is reported in their status."""
    admin = AdminClient(config.kafka_common())
    metadata = cluster_metadata(admin, config, timeout=min(timeout, 10.0))
    plan = plan_replication(config.replication_factor, len(metadata.brokers))
    for warning in plan.warnings:
        if on_warning is not None:
            on_warning(warning)
    specs = topic_specs(config, plan.replication_factor)
    new = [
        NewTopic(spec.name, num_partitions=config.partitions, replication_factor=plan.replication_factor,
                 config=spec.settings)
        for spec in specs
    ]
    statuses: list[TopicStatus] = []
    for spec, (name, future) in zip(specs, admin.create_topics(new, request_timeout=timeout).items(), strict=True):
        try:
            future.result(timeout=timeout)
            status = TopicStatus(name, created=True)
        except concurrent.futures.TimeoutError:
            raise Unavailable(f"creating {name} got no answer within {timeout} s") from None
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise Unavailable(f"could not create {name}: {error.str()}") from None
            status = TopicStatus(name, created=False, problems=_differences(admin, config, spec, timeout))
        statuses.append(status)
        if on_status is not None:
            on_status(status)
    return statuses


def _differences(admin: AdminClient, config: Config, spec: TopicSpec, timeout: float) -> tuple[str, ...]:
    problems = []
    topic = admin.list_topics(spec.name, timeout=timeout).topics.get(spec.name)
    if topic is not None and len(topic.partitions) != config.partitions:
        problems.append(f"{len(topic.partitions)} partitions, not {config.partitions}")
    wanted = spec.settings.get("cleanup.policy", "delete")
    try:
        resource = ConfigResource(ResourceType.TOPIC, spec.name)
        described = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
        actual = described["cleanup.policy"].value if "cleanup.policy" in described else None
    except (KafkaException, KeyError, concurrent.futures.TimeoutError):
        return tuple(problems)
    if actual is not None and set(actual.split(",")) != set(wanted.split(",")):
        problems.append(f"cleanup.policy={actual}, not {wanted}")
    return tuple(problems)
