"""The one place that names the gateway's topics and the tiers its workers consume.

Tier topics are named after their delay (``retry-1m``, ``retry-5m``, ``retry-15m`` for
the default 60/300/900 s; ``retry-2s`` for 2 s), so changing the delays moves the
gateway to new topics instead of mixing records written under another schedule.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..config import Config
from ..errors import InputError

__all__ = ["Tier", "Topics", "delay_label", "endpoint_partition"]


def delay_label(seconds: int) -> str:
    """``60`` → ``1m``, ``900`` → ``15m``, ``2`` → ``2s``, ``7200`` → ``2h``."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def endpoint_partition(endpoint_id: str, partitions: int) -> int:
    """The partition of a topic keyed by endpoint that holds ``endpoint_id``'s records:
    chosen by the gateway itself (CRC-32 of the id), not by a client's partitioner, so
    every process and every client library agrees on it."""
    return zlib.crc32(endpoint_id.encode()) % partitions


@dataclass(frozen=True)
class Tier:
    """A topic a worker consumes: a stage of the delivery schedule (the events topic,
    index 0, no delay; a retry tier), a rung of the deferral ladder, or the deliveries
    topic (``owner``), whose consumers own the endpoints its partitions hold."""

    index: int
    """Schedule tiers: 0 for the events topic, 1.. for the retry tiers in order. Deferral
    rungs: 0.. in order of their delays."""
    name: str
    """``events``, ``retry-1m``, ``deferred-5s``, …: used in metrics, logs and `--tiers`."""
    topic: str
    delay: int
    """Seconds a record waits here: after the failure that sent it (retry tiers), after it
    was put off (deferral rungs); 0 for events."""
    deferral: bool = False
    owner: bool = False
    """The deliveries topic: keyed by endpoint, each partition consumed by one process,
    the one that makes every attempt at the endpoints of that partition."""

    @property
    def is_events(self) -> bool:
        return self.index == 0 and not self.deferral and not self.owner

    @property
    def routes(self) -> bool:
        """Records here make the attempt of another tier (a rung's, the deliveries topic's)."""
        return self.deferral or self.owner


@dataclass(frozen=True)
class Topics:
    """Topic names derived from a prefix and the retry delays."""

    prefix: str
    retry_delays: tuple[int, ...]
    defer_delays: tuple[int, ...] = (5, 60, 600)

    @classmethod
    def from_config(cls, config: Config) -> Topics:
        return cls(config.topic_prefix, config.retry_delays, config.defer_delays)

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
    def circuits(self) -> str:
        """The last circuit breaker change per endpoint (compacted)."""
        return f"{self.prefix}.circuits"

    @property
    def attempts(self) -> str:
        """Every attempt, successful or not: the delivery history."""
        return f"{self.prefix}.attempts"

    @property
    def deliveries(self) -> str:
        """Deliveries on their way to the process that owns their endpoint (keyed and
        partitioned by endpoint id: :func:`endpoint_partition`)."""
        return f"{self.prefix}.deliveries"

    @property
    def deliveries_tier(self) -> Tier:
        return Tier(0, "deliveries", self.deliveries, 0, owner=True)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The events stage followed by one tier per retry delay."""
        tiers = [Tier(0, "events", self.events, 0)]
        for i, delay in enumerate(self.retry_delays, start=1):
            name = f"retry-{delay_label(delay)}"
            tiers.append(Tier(i, name, f"{self.prefix}.{name}", delay))
        return tuple(tiers)

    @property
    def deferral_tiers(self) -> tuple[Tier, ...]:
        """The rungs deliveries put off by the gateway's own limits wait on: one topic per
        delay, so a rung's records are in due order, like a retry tier's."""
        return tuple(Tier(i, f"deferred-{delay_label(d)}", f"{self.prefix}.deferred-{delay_label(d)}", d,
                          deferral=True)
                     for i, d in enumerate(self.defer_delays))

    @property
    def worker_tiers(self) -> tuple[Tier, ...]:
        """Every topic a worker consumes (``--tiers all``): the schedule, the deliveries
        topic, then the deferrals."""
        return (*self.tiers, self.deliveries_tier, *self.deferral_tiers)

    def tier(self, name: str) -> Tier:
        for tier in self.worker_tiers:
            if tier.name == name:
                return tier
        known = ", ".join(t.name for t in self.worker_tiers)
        raise InputError(f"unknown tier {name!r}; this configuration has: {known}", field="tiers")

    def all(self) -> tuple[str, ...]:
        return (*(t.topic for t in self.worker_tiers), self.dlq, self.endpoints, self.dlq_replays,
                self.attempts, self.circuits)
