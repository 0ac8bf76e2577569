"""What librdkafka's statistics tell about a tier's consumer: its lag, and whether it is
in its group.

A consumer's ``stats_cb`` gets one JSON document every :data:`LAG_INTERVAL_MS`, on the
consumer's own thread (from ``poll``). :func:`read_statistics` parses it once for both
readers: :class:`ConsumerLag` keeps ``gateway_consumer_lag_records``, and
:class:`GroupWatch` says when the consumer stays out of its group.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Gauge

from ..clock import SYSTEM, Clock
from ..observability import bind

__all__ = [
    "GROUP_WARN_AFTER", "LAG_INTERVAL_MS", "ClusterContact", "ConsumerLag", "GroupWatch", "lag_from_stats",
    "read_statistics",
]

log = logging.getLogger("gateway.metrics")
_group_log = logging.getLogger("gateway.consumer")

LAG_INTERVAL_MS = 5000
"""How often librdkafka reports its statistics, from which consumer lag is taken."""


def lag_from_stats(
    stats: Mapping[str, Any],
    assigned: Iterable[tuple[str, int]],
    listed: Mapping[tuple[str, int], int] | None = None,
) -> dict[tuple[str, int], int]:
    """Lag per assigned (topic, partition) from one librdkafka statistics document.

    ``hi_offset`` is the high watermark the broker returned with the last fetch (the
    cached watermark: correct on the bundled broker, whose ListOffsets answer is not).
    A paused partition is not fetched, so its cached watermark stops moving exactly when
    lag matters (every partition is paused while the in-flight budget is full): the
    watermarks ``listed`` by the broker for the paused partitions count too, the larger
    of the two wins. Lag counts from the offset this consumer stored as settled, else the
    group's committed offset, else the log start. A partition whose watermark is not
    known yet (no fetch answered since the assignment, nothing listed) is left out.
    """
    listed = listed or {}
    lags: dict[tuple[str, int], int] = {}
    topics = stats.get("topics", {})
    for topic, partition in assigned:
        entry = topics.get(topic, {}).get("partitions", {}).get(str(partition))
        if entry is None:
            continue
        high = max(entry.get("hi_offset", -1), listed.get((topic, partition), -1))
        if high < 0:
            continue
        for field in ("stored_offset", "committed_offset", "lo_offset"):
            start = entry.get(field, -1)
            if start >= 0:
                break
        else:
            start = 0  # auto.offset.reset=earliest on a log that starts at 0
        lags[(topic, partition)] = max(0, high - start)
    return lags


def read_statistics(stats_json: str, tier: str) -> dict[str, Any] | None:
    """One librdkafka statistics document (a consumer's ``stats_cb`` argument), parsed once
    for every reader of it; None, logged, when it is not a JSON object (an exception here
    would surface from ``poll()`` and stop the consumer's loop)."""
    try:
        document = json.loads(stats_json)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        log.error("consumer statistics unreadable", extra={"tier": tier, "statistics": stats_json[:200]})
        return None
    return document


class ConsumerLag:
    """Keeps ``gateway_consumer_lag_records`` for one consumer's assigned partitions.

    Every method runs on the consumer's own thread: :meth:`update` is the consumer's
    ``stats_cb`` (librdkafka calls it from ``poll``), the others are called from its
    rebalance callbacks and its close. So no call is ever made on the consumer from
    another thread, and the assignment here is the consumer's own. Series of partitions
    this process no longer owns are removed at once, so with several processes
    ``sum()`` never counts a partition twice.
    """

    def __init__(self, tier: str, gauge: Gauge) -> None:
        self.tier = tier
        self._gauge = gauge
        self._log = bind(log, tier=tier)
        self._assigned: set[tuple[str, int]] = set()
        self._listed: dict[tuple[str, int], int] = {}

    def assign(self, partitions: Iterable[tuple[str, int]]) -> None:
        """(topic, partition) pairs now owned."""
        self._assigned |= set(partitions)

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> None:
        for key in list(partitions):
            self._assigned.discard(key)
            self._listed.pop(key, None)
            self._remove(key)

    def clear(self) -> None:
        """Forget every partition (the consumer is closing)."""
        for key in list(self._assigned):
            self._remove(key)
        self._assigned.clear()
        self._listed.clear()

    def listed(self, highs: Mapping[tuple[str, int], int]) -> None:
        """High watermarks the broker listed for paused partitions (see
        :func:`lag_from_stats`); they count from the next statistics on."""
        for key, high in highs.items():
            if key in self._assigned:
                self._listed[key] = max(high, self._listed.get(key, -1))

    def update(self, stats: Mapping[str, Any]) -> None:
        """Read one statistics document (see :func:`read_statistics`)."""
        try:
            lags = lag_from_stats(stats, self._assigned, self._listed)
        except Exception:  # an exception here would surface from poll() and stop the loop
            self._log.exception("consumer statistics unreadable")
            return
        for (topic, partition), lag in lags.items():
            self._gauge.labels(self.tier, topic, str(partition)).set(lag)

    def _remove(self, key: tuple[str, int]) -> None:
        with contextlib.suppress(KeyError):  # no watermark was known yet
            self._gauge.remove(self.tier, key[0], str(key[1]))


GROUP_WARN_AFTER = 30.0
"""How long a consumer may stay out of its group before :class:`GroupWatch` says so (seconds)."""


class ClusterContact:
    """Whether the process reaches the cluster: some consumer of it had a broker connection
    up in its last statistics, lately. Shared by the tiers' :class:`GroupWatch`es: a
    consumer with no connection of its own (no assignment to fetch, hunting for a
    coordinator) is judged by what the others reach. (Seen on Apache Kafka after the
    broker was frozen for 10 s: the events tier's consumer stayed in ``query-coord`` with
    no broker up in its statistics, so it never counted as stuck while the cluster
    answered, and was never replaced, while the other seven tiers rejoined.)"""

    def __init__(self, *, within: float = 3 * LAG_INTERVAL_MS / 1000, clock: Clock = SYSTEM) -> None:
        self.within = within
        self._clock = clock
        self._up_at: float | None = None

    def up(self) -> None:
        """A consumer's statistics showed a broker connection up."""
        self._up_at = self._clock.monotonic()

    def answers(self) -> bool:
        return self._up_at is not None and self._clock.monotonic() - self._up_at <= self.within


class GroupWatch:
    """Says when a tier's consumer stays out of its consumer group.

    A member is in join-state ``steady`` whenever it holds its assignment, even an empty
    one; a rebalance takes it out for milliseconds to seconds. Outside ``steady`` it
    fetches nothing, so a tier that stays out silently stops delivering while every other
    tier goes on. This is watched from librdkafka's statistics (``cgrp``): one error
    when the consumer has been out for ``warn_after``, naming the states librdkafka is
    in, and one line when it is back. (Seen on Apache Kafka: after the broker was frozen
    for 10 s, one tier's consumer never rejoined while the others did within 5 s.)
    """

    def __init__(self, tier: str, *, warn_after: float = GROUP_WARN_AFTER, clock: Clock = SYSTEM,
                 contact: ClusterContact | None = None) -> None:
        self.tier = tier
        self.contact = contact
        """What the process's other consumers reach (None: this consumer's own view only)."""
        self.warn_after = warn_after
        self._clock = clock
        self._log = bind(_group_log, tier=tier)
        self._out_since: float | None = None
        self._uncoordinated_since: float | None = None
        """Since when the consumer has had no group coordinator (librdkafka's ``cgrp.state``
        other than ``up``: finding one, or waiting for its connection)."""
        self.warned = False
        self.brokers_up = False
        """Whether the last statistics had a connection to some broker up: the cluster
        answers, so staying out of the group is the consumer's own state."""

    def out_for(self) -> float:
        """Seconds the consumer has been out of its group (0 while in it)."""
        since = self._out_since
        return 0.0 if since is None else self._clock.monotonic() - since

    def stuck(self, bound: float, *, uncoordinated: float | None = None) -> bool:
        """Out of its group longer than ``bound`` while the cluster answers, or out of it
        with no coordinator for longer than ``uncoordinated`` (finding the coordinator is
        one request to any broker: no rebalance waits on it, so it needs no long bound)."""
        if not (self.brokers_up or (self.contact is not None and self.contact.answers())):
            return False
        if self.out_for() > bound:
            return True
        since = self._uncoordinated_since
        return (uncoordinated is not None and since is not None and self._out_since is not None
                and self._clock.monotonic() - max(since, self._out_since) > uncoordinated)

    def renewed(self) -> None:
        """The consumer was replaced: the new one starts out of the group, from now."""
        self._out_since, self.warned, self.brokers_up = self._clock.monotonic(), False, False
        self._uncoordinated_since = None

    def update(self, stats: Mapping[str, Any]) -> None:
        """Read one statistics document (``stats_cb``, on the consumer's thread)."""
        brokers = stats.get("brokers")
        if isinstance(brokers, dict):
            self.brokers_up = any(isinstance(b, dict) and b.get("state") == "UP" and b.get("nodeid", -1) >= 0
                                  for b in brokers.values())
            if self.brokers_up and self.contact is not None:
                self.contact.up()
        group = stats.get("cgrp")
        if not isinstance(group, dict) or "join_state" not in group:
            return
        now = self._clock.monotonic()
        if group.get("state") == "up":
            self._uncoordinated_since = None
        elif self._uncoordinated_since is None:
            self._uncoordinated_since = now
        if group["join_state"] == "steady":
            if self._out_since is not None and self.warned:
                self._log.info("consumer back in its group", extra={"out_for_s": round(now - self._out_since, 1)})
            self._out_since, self.warned = None, False
            return
        if self._out_since is None:
            self._out_since = now
        elif not self.warned and now - self._out_since >= self.warn_after:
            self.warned = True
            self._log.error("consumer out of its group: the tier fetches nothing until it rejoins", extra={
                "out_for_s": round(now - self._out_since, 1),
                "state": group.get("state"), "join_state": group["join_state"],
                "rebalance_reason": group.get("rebalance_reason"),
            })
