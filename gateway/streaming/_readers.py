"""Who reads each tier: no topic the gateway writes to may go silent.

Any worker may put a delivery off onto a deferral rung, and send a failure on to the
next retry tier, whether or not it reads those topics itself (``gateway run --tiers
events``). If no process reads them, what lands there waits, silently, until one does.
So every process checks, every ``reader_check`` seconds, the consumer group of each tier
it does not run itself: a group with members (or, on brokers that do not list members,
a group that is not empty) has a reader. Each tier's answer is exported as
``gateway_tier_readers`` (1: read, 0: nobody reads it), and a tier found without reader
twice in a row is logged as an error, once, naming the command that fixes it; a line
says when a reader is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import Gauge

from ..config import Config
from ..observability import bind
from ..store import Tier, Topics

__all__ = ["TierReaders"]

log = logging.getLogger("gateway.runner")

_READ = frozenset({ConsumerGroupState.STABLE, ConsumerGroupState.PREPARING_REBALANCING,
                   ConsumerGroupState.COMPLETING_REBALANCING})


class TierReaders:
    """Watches the consumer groups of the tiers this process does not run."""

    def __init__(self, config: Config, running: Sequence[Tier], gauge: Gauge) -> None:
        self.config = config
        self.gauge = gauge
        tiers = Topics.from_config(config).worker_tiers
        ran = {t.name for t in running}
        self.watched = [t for t in tiers if t.name not in ran]
        self._unread: dict[str, int] = {}
        """Tiers found without reader, and how many checks in a row."""
        for tier in tiers:
            gauge.labels(tier.name).set(1)  # until a check says otherwise

    def group(self, tier: Tier) -> str:
        return f"{self.config.consumer_group}.{tier.name}"

    def check(self) -> dict[str, bool]:
        """Ask the broker about every watched tier's group (blocking); whether each is read."""
        if not self.watched:
            return {}
        admin = AdminClient(self.config.kafka_common())
        groups = {self.group(t): t for t in self.watched}
        read: dict[str, bool] = {}
        for group, future in admin.describe_consumer_groups(list(groups)).items():
            tier = groups[group]
            try:
                described = future.result(timeout=15)
            except (KafkaException, TimeoutError) as exc:
                log.debug("consumer group not described", extra={"tier": tier.name, "error": str(exc)})
                continue  # no answer is no news: the next check asks again
            read[tier.name] = bool(described.members) or described.state in _READ
        for name, is_read in read.items():
            self._note(name, is_read)
        return read

    def _note(self, name: str, is_read: bool) -> None:
        self.gauge.labels(name).set(1 if is_read else 0)
        tier = next(t for t in self.watched if t.name == name)
        bound = bind(log, tier=name, topic=tier.topic)
        if is_read:
            if self._unread.pop(name, 0) >= 2:
                bound.info("a process reads the tier again")
            return
        times = self._unread[name] = self._unread.get(name, 0) + 1
        if times == 2:  # twice in a row: not a worker restarting, nobody reads it
            bound.error(
                f"no process reads {tier.topic}: what this process sends there waits until one does; "
                f"run `gateway run --tiers {name}` (or every tier, the default) beside it",
                extra={"group": self.group(tier)})

    async def watch(self, stop: asyncio.Event, interval: float) -> None:
        """Check every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # a check that fails says nothing: the next one asks again
                log.exception("checking the tiers' readers failed")
