"""The one place that names the gateway's topics, and creates them.

Tier topics are named after their delay (``retry-1m``, ``retry-5m``, ``retry-15m`` for
the default 60/300/900 s; ``retry-2s`` for 2 s), so changing the delays moves the
gateway to new topics instead of mixing records written under another schedule.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from .config import Config

__all__ = ["Topics", "Tier", "TopicStatus", "TopicsError", "delay_label", "create_topics"]


class TopicsError(RuntimeError):
    """Topics could not be created or checked; the message names the broker or topic."""


def delay_label(seconds: int) -> str:
    """``60`` → ``1m``, ``900`` → ``15m``, ``2`` → ``2s``, ``7200`` → ``2h``."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


@dataclass(frozen=True)
class Tier:
    """A stage of the delivery schedule: the events topic (index 0, no delay) or a retry tier."""

    index: int
    """0 for the events topic, 1.. for the retry tiers in order."""
    name: str
    """``events``, ``retry-1m``, …: used in metrics, logs and `--tiers`."""
    topic: str
    delay: int
    """Seconds a record waits after the failure that sent it here (0 for events)."""


@dataclass(frozen=True)
class Topics:
    """Topic names derived from a prefix and the retry delays."""

    prefix: str
    retry_delays: tuple[int, ...]

    @classmethod
    def from_config(cls, config: Config) -> Topics:
        return cls(config.topic_prefix, config.retry_delays)

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def endpoints(self) -> str:
        return f"{self.prefix}.endpoints"

    @property
    def dlq_replays(self) -> str:
        """Which dead letters were replayed (compacted, keyed by the dead letter)."""
        return f"{self.prefix}.dlq-replays"

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The events stage followed by one tier per retry delay."""
        tiers = [Tier(0, "events", self.events, 0)]
        for i, delay in enumerate(self.retry_delays, start=1):
            name = f"retry-{delay_label(delay)}"
            tiers.append(Tier(i, name, f"{self.prefix}.{name}", delay))
        return tuple(tiers)

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        known = ", ".join(t.name for t in self.tiers)
        raise ValueError(f"unknown tier {name!r}; this configuration has: {known}")

    def all(self) -> tuple[str, ...]:
        return (*(t.topic for t in self.tiers), self.dlq, self.endpoints, self.dlq_replays)


@dataclass(frozen=True)
class TopicStatus:
    topic: str
    created: bool
    """False when the topic already existed."""


def create_topics(
    config: Config,
    *,
    on_status: Callable[[TopicStatus], None] | None = None,
    timeout: float = 30.0,
) -> list[TopicStatus]:
    """Create every gateway topic that does not exist yet; existing ones are left as they are.

    The endpoints topic is compacted (latest registration per endpoint id); the dead-letter
    topic keeps records for 30 days so a bad day can still be replayed a week later.
    """
    topics = Topics.from_config(config)
    admin = AdminClient(config.kafka_common())
    try:
        admin.list_topics(timeout=min(timeout, 10.0))
    except KafkaException as exc:
        raise TopicsError(
            f"no Kafka broker answered at {config.bootstrap_servers}: {exc.args[0].str()}"
        ) from None
    month_ms = str(30 * 24 * 3600 * 1000)
    special = {
        topics.endpoints: {"cleanup.policy": "compact"},
        topics.dlq_replays: {"cleanup.policy": "compact"},
        topics.dlq: {"retention.ms": month_ms},
    }
    new = [
        NewTopic(
            name,
            num_partitions=config.partitions,
            replication_factor=config.replication_factor,
            config=special.get(name, {}),
        )
        for name in topics.all()
    ]
    statuses: list[TopicStatus] = []
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            status = TopicStatus(name, created=True)
        except concurrent.futures.TimeoutError:
            raise TopicsError(f"creating {name} got no answer within {timeout} s") from None
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicsError(f"could not create {name}: {error.str()}") from None
            status = TopicStatus(name, created=False)
        statuses.append(status)
        if on_status is not None:
            on_status(status)
    return statuses
