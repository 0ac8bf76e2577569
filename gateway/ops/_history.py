"""The delivery history: reading the attempts topic to answer "what happened to event X,
to endpoint Y, since T", successes included.

Workers write one :class:`~gateway.records.DeliveryAttempt` per attempt (and per run of
deferrals) to ``{prefix}.attempts``, keyed by endpoint id; this module only reads it.
Kafka stays the only store:

* :func:`read_history` reads the topic to its end once, filtering as it goes (``gateway
  deliveries list``). Reading never joins a consumer group the workers use and stops at
  the end each partition had when it was first reached.
* :class:`HistoryIndex` keeps the newest ``capacity`` attempts in memory and follows the
  topic (the HTTP API). Built at start from the whole topic, keeping the newest
  ``capacity`` by attempt time; then every new record is appended and the oldest is
  dropped once the index is full. :attr:`HistoryPage.complete_since` says how far back
  an answer is complete.

Filters (:class:`HistoryFilters`) are plain values judged without I/O; a refused input
raises an :class:`~gateway.errors.InputError` naming the field. Every read takes the
caller's :class:`~gateway.ops.Access`: a bot scope sees its own bot's attempts only.

:func:`endpoint_stats` sums an endpoint's attempts over windows (1 h, 24 h): attempts,
successes, failures and the success rate, with the last failure; pure, over what the
index holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import Message

from ..codec import Codec
from ..config import Config
from ..errors import DecodeError
from ..records import DELIVERY_ATTEMPT_SCHEMA, DeliveryAttempt, Outcome
from ..store import Topics, read_to_end, reader_consumer
from ._access import OPERATOR, Access
from ._inputs import RecordId, StatusSelector, check_range, iso, parse_time
from ._window import Grouping, TopicWindow

__all__ = [
    "DEFAULT_CAPACITY",
    "STATS_WINDOWS",
    "EndpointStats",
    "HistoryEntry",
    "HistoryFilters",
    "HistoryIndex",
    "HistoryPage",
    "WindowStats",
    "endpoint_stats",
    "read_history",
]

log = logging.getLogger("gateway.history")

DEFAULT_CAPACITY = 100_000
"""Attempts the API's index keeps by default: about 65 MB of Python objects (measured with
tracemalloc), up to about 120 MB when every attempt kept a full 512-character response."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One record of the attempts topic and where it sits."""

    partition: int
    offset: int
    line: DeliveryAttempt

    @property
    def id(self) -> RecordId:
        """``PARTITION:OFFSET``: unique within the topic."""
        return RecordId(self.partition, self.offset)

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Newest last: attempt time, then place in the topic."""
        return (self.line.attempt.at, self.partition, self.offset)

    def to_json(self) -> dict[str, Any]:
        """The entry as ``deliveries list --json`` and ``GET /v1/deliveries`` show it."""
        line, attempt = self.line, self.line.attempt
        return {
            "id": str(self.id),
            "eventId": line.event_id,
            "eventType": line.event_type,
            "botId": line.bot_id,
            "endpointId": line.endpoint_id,
            "occurredAt": iso(line.occurred_at),
            "number": line.number,
            "tier": attempt.tier,
            "at": iso(attempt.at),
            "durationMs": attempt.duration_ms,
            "outcome": attempt.outcome.value,
            "status": attempt.status,
            "error": attempt.error,
            "response": attempt.response_snippet,
            "next": str(line.next),
            "replayOf": line.replay_of,
        }


@dataclass(frozen=True)
class HistoryFilters:
    """Which attempts to show; empty fields select everything. Ids are compared as
    given, bot ids case-insensitively; ``since``/``until`` bound the attempt's start (ms).
    :meth:`parse` makes one from what a user typed."""

    event_id: str | None = None
    endpoint_id: str | None = None
    bot_id: str | None = None
    status: StatusSelector | None = None
    since: int | None = None
    until: int | None = None

    def __post_init__(self) -> None:
        check_range(self.since, self.until)

    @classmethod
    def parse(
        cls, *, event_id: str | None = None, endpoint_id: str | None = None, bot_id: str | None = None,
        status: str | None = None, since: str | None = None, until: str | None = None,
    ) -> HistoryFilters:
        """The filters as given by a user: the status as
        :class:`~gateway.ops.StatusSelector` reads it, times as
        :func:`~gateway.ops.parse_time` does. Refuses, naming the input."""
        return cls(
            event_id=event_id, endpoint_id=endpoint_id, bot_id=bot_id,
            status=StatusSelector.parse(status) if status is not None else None,
            since=parse_time(since, field="since") if since is not None else None,
            until=parse_time(until, field="until") if until is not None else None,
        )

    def scoped(self, access: Access) -> HistoryFilters:
        """These filters as ``access`` may run them: a bot scope's narrowed to its bot
        (:class:`~gateway.errors.Forbidden` when they name another)."""
        bot_id = access.bot_filter(self.bot_id)
        return self if bot_id == self.bot_id else replace(self, bot_id=bot_id)

    def admits(self, line: DeliveryAttempt) -> bool:
        if self.event_id is not None and line.event_id != self.event_id:
            return False
        if self.endpoint_id is not None and line.endpoint_id != self.endpoint_id:
            return False
        if self.bot_id is not None and line.bot_id.lower() != self.bot_id.lower():
            return False
        at = line.attempt.at
        if self.since is not None and at < self.since:
            return False
        if self.until is not None and at > self.until:
            return False
        return self.status is None or self.status.admits(line.attempt)


def _decode(codec: Codec, msg: Message) -> HistoryEntry | None:
    """The entry a record holds, or None (logged) when it holds no readable attempt: the
    history is a view, and one bad record must not hide the rest."""
    try:
        name, record = codec.decode(msg.value())
        if name != DELIVERY_ATTEMPT_SCHEMA:
            raise DecodeError(f"a {name} record, not a delivery attempt")
        line = DeliveryAttempt.from_record(record)
    except (DecodeError, KeyError, TypeError, ValueError) as exc:
        log.warning("attempt record unreadable, skipped",
                    extra={"partition": msg.partition(), "offset": msg.offset(), "error": str(exc)})
        return None
    return HistoryEntry(int(msg.partition() or 0), int(msg.offset() or 0), line)


def read_history(
    config: Config, filters: HistoryFilters = HistoryFilters(), *, codec: Codec | None = None,
    access: Access = OPERATOR, timeout: float = 30.0,
) -> list[HistoryEntry]:
    """Every attempt ``filters`` selects (within ``access``'s scope), read from the
    attempts topic to its end, newest first. :class:`~gateway.errors.Unavailable` if the
    topic cannot be read."""
    filters = filters.scoped(access)
    codec = codec or Codec(config.schema_registry_url)
    consumer = reader_consumer(config, "history-reader")
    found: list[HistoryEntry] = []
    try:
        for msg in read_to_end(consumer, config, Topics.from_config(config).attempts, timeout=timeout):
            entry = _decode(codec, msg)
            if entry is not None and filters.admits(entry.line):
                found.append(entry)
    finally:
        consumer.close()
    found.sort(key=lambda e: e.sort_key, reverse=True)
    return found


@dataclass(frozen=True)
class HistoryPage:
    """One page of an index query, newest first."""

    entries: tuple[HistoryEntry, ...]
    next_cursor: str | None
    """Pass it back for the next (older) page; None on the last page."""
    complete_since: int | None
    """None when the index holds every attempt the topic held; else the time (ms) of the
    oldest attempt it still holds: older attempts may exist that it no longer shows."""

    def to_json(self) -> dict[str, Any]:
        """The page as ``GET /v1/deliveries`` answers it."""
        return {"data": [e.to_json() for e in self.entries], "nextCursor": self.next_cursor,
                "completeSince": iso(self.complete_since) if self.complete_since is not None else None}


class HistoryIndex:
    """The newest ``capacity`` attempts of the attempts topic, in memory, following it (a
    :class:`~gateway.ops._window.TopicWindow`), grouped by event id and by endpoint id, so
    the questions the API is asked most cost the attempts of that event or endpoint, not
    the whole index.

    Measured: building from a topic of 100,000 attempts takes about 2 s on the bundled
    broker and 3 s on Apache Kafka (``tests/test_history.py``), mostly Avro decoding; a
    query scanning all of them, well under 100 ms.
    """

    def __init__(self, config: Config, *, capacity: int = DEFAULT_CAPACITY, codec: Codec | None = None) -> None:
        self.config = config
        self.topic = Topics.from_config(config).attempts
        # An event has a few attempts per endpoint: a list. An endpoint may have them all.
        self._window = TopicWindow[HistoryEntry](
            config, self.topic, what="history", purpose="history-index", thread="history", capacity=capacity,
            decode=lambda msg: _decode(self.codec, msg), key=lambda e: e.sort_key,
            groups={"event": Grouping(lambda e: e.line.event_id, few=True),
                    "endpoint": Grouping(lambda e: e.line.endpoint_id)})
        self.capacity = capacity
        self.codec = codec or Codec(config.schema_registry_url)

    @property
    def build_seconds(self) -> float | None:
        """How long :meth:`start` took to read the topic and build the index."""
        return self._window.build_seconds

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> HistoryIndex:
        """Read the topic to its end (keeping the newest ``capacity`` attempts), then
        follow it on a thread. :class:`~gateway.errors.Unavailable` if the topic cannot be read."""
        seen = self._window.start(timeout=timeout, follow=follow)
        log.info("delivery history loaded", extra={"attempts": len(self), "read": seen, "topic": self.topic,
                                                   "seconds": round(self._window.build_seconds or 0.0, 3)})
        return self

    def __len__(self) -> int:
        return len(self._window)

    def query(self, filters: HistoryFilters = HistoryFilters(), *, limit: int = 100,
              cursor: str | None = None, access: Access = OPERATOR) -> HistoryPage:
        """The newest ``limit`` attempts ``filters`` selects (within ``access``'s scope),
        older than ``cursor``."""
        filters = filters.scoped(access)
        of: tuple[str, str] | None = None
        if filters.event_id is not None:
            of = ("event", filters.event_id)
        elif filters.endpoint_id is not None:
            of = ("endpoint", filters.endpoint_id)
        page, next_cursor, complete_since = self._window.page(lambda e: filters.admits(e.line), limit=limit,
                                                              cursor=cursor, of=of)
        return HistoryPage(tuple(page), next_cursor, complete_since)

    def get(self, record_id: RecordId, *, access: Access = OPERATOR) -> HistoryEntry | None:
        """The attempt ``PARTITION:OFFSET``, if the index holds it and ``access`` sees its bot
        (another bot's is :class:`~gateway.errors.Forbidden`). A scan of the index (a few
        ms at 100,000 attempts): asked once per resend, not per page."""
        entries, _ = self._window.entries()
        for entry in reversed(entries):
            if entry.partition == record_id.partition and entry.offset == record_id.offset:
                access.check_bot(entry.line.bot_id, what=f"delivery {record_id} is another bot's")
                return entry
        return None

    def of_endpoint(self, endpoint_id: str) -> tuple[list[HistoryEntry], int | None]:
        """Every attempt the index holds at ``endpoint_id``, oldest first, and from when the
        index is complete (None: it holds the whole topic)."""
        return self._window.entries(("endpoint", endpoint_id))

    def stop(self) -> None:
        self._window.stop()


STATS_WINDOWS: tuple[tuple[str, int], ...] = (("1h", 3600), ("24h", 86400))
"""The windows :func:`endpoint_stats` sums over, by name, in seconds."""


@dataclass(frozen=True)
class WindowStats:
    """An endpoint's attempts over the last ``seconds``: deferrals are not attempts and
    are counted apart."""

    name: str
    seconds: int
    attempts: int
    succeeded: int
    failed: int
    deferred: int
    complete: bool
    """False when the index no longer holds the whole window (it dropped older attempts)."""

    @property
    def success_rate(self) -> float | None:
        """Successes per attempt (0.0-1.0); None without attempts."""
        return round(self.succeeded / self.attempts, 4) if self.attempts else None

    def to_json(self) -> dict[str, Any]:
        return {"window": self.name, "seconds": self.seconds, "attempts": self.attempts,
                "succeeded": self.succeeded, "failed": self.failed, "deferred": self.deferred,
                "successRate": self.success_rate, "complete": self.complete}


@dataclass(frozen=True)
class EndpointStats:
    """How an endpoint has been doing, from the delivery history."""

    endpoint_id: str
    windows: tuple[WindowStats, ...]
    last_attempt_at: int | None
    last_success_at: int | None
    last_failure: HistoryEntry | None
    complete_since: int | None

    def to_json(self) -> dict[str, Any]:
        failure = self.last_failure
        return {
            "endpointId": self.endpoint_id,
            "windows": [w.to_json() for w in self.windows],
            "lastAttemptAt": iso(self.last_attempt_at) if self.last_attempt_at is not None else None,
            "lastSuccessAt": iso(self.last_success_at) if self.last_success_at is not None else None,
            "lastFailure": None if failure is None else {
                "id": str(failure.id), "at": iso(failure.line.attempt.at), "eventId": failure.line.event_id,
                "eventType": failure.line.event_type, "outcome": failure.line.attempt.outcome.value,
                "status": failure.line.attempt.status, "error": failure.line.attempt.error},
            "completeSince": iso(self.complete_since) if self.complete_since is not None else None,
        }


def endpoint_stats(
    endpoint_id: str, entries: Iterable[HistoryEntry], *, now_ms: int, complete_since: int | None = None,
    windows: Sequence[tuple[str, int]] = STATS_WINDOWS,
) -> EndpointStats:
    """``endpoint_id``'s attempts among ``entries`` summed over each window ending at
    ``now_ms``; the last attempt, success and failure (of any time the entries cover).
    A window reaching before ``complete_since`` is marked incomplete. Pure."""
    counts = {name: [0, 0, 0, 0] for name, _ in windows}  # attempts, succeeded, failed, deferred
    last_attempt = last_success = None
    last_failure: HistoryEntry | None = None
    for entry in entries:
        line = entry.line
        if line.endpoint_id != endpoint_id:
            continue
        at, outcome = line.attempt.at, line.attempt.outcome
        deferred = outcome is Outcome.DEFERRED
        if not deferred:
            last_attempt = at if last_attempt is None else max(last_attempt, at)
            if outcome is Outcome.SUCCESS:
                last_success = at if last_success is None else max(last_success, at)
            elif last_failure is None or entry.sort_key > last_failure.sort_key:
                last_failure = entry
        for name, seconds in windows:
            if now_ms - seconds * 1000 < at <= now_ms:
                row = counts[name]
                if deferred:
                    row[3] += 1
                else:
                    row[0] += 1
                    row[1 if outcome is Outcome.SUCCESS else 2] += 1
    return EndpointStats(
        endpoint_id=endpoint_id,
        windows=tuple(WindowStats(name, seconds, attempts=counts[name][0], succeeded=counts[name][1],
                                  failed=counts[name][2], deferred=counts[name][3],
                                  complete=complete_since is None or complete_since <= now_ms - seconds * 1000)
                      for name, seconds in windows),
        last_attempt_at=last_attempt, last_success_at=last_success, last_failure=last_failure,
        complete_since=complete_since)

