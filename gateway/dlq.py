"""The dead-letter tools: read, filter, count and replay what the gateway gave up on.

Reading never joins a consumer group the workers use: partitions are assigned directly,
nothing is committed, and reading stops at the end each partition had when it was first
reached, so a tool never hangs on a topic the workers keep writing to.

A replay sends each selected delivery back into the first retry tier, due now, with its
attempt counter reset (it gets the whole schedule again), to the endpoint it failed for
(or the one named), never fanned out again. Each replayed dead letter is recorded on the
compacted ``dlq-replays`` topic, keyed by its partition:offset, and the replayed record
carries ``replay-id`` and ``replay-of`` headers; a later replay skips what was already
replayed unless told ``again``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Producer

from .codec import Codec, DecodeError
from .config import Config
from .kafka_io import TopicReadError, delivery_headers, read_to_end, reader_consumer
from .records import DELIVERY_SCHEMA, DeadLetter, Delivery
from .topics import Topics

__all__ = [
    "DeadLetterEntry",
    "Filters",
    "DlqError",
    "parse_time",
    "parse_rate",
    "read_dead_letters",
    "read_replayed",
    "stats",
    "Replayer",
    "ReplayReport",
]

REPLAY_SCHEMA = "gateway.Replay"


class DlqError(ValueError):
    """A dead-letter command cannot do what was asked; the message says why."""


def parse_time(text: str, *, now: datetime | None = None) -> int:
    """``2026-11-28T10:00:00Z``, ``2026-11-28``, ``2h ago``, ``30m`` (ago), ``1d`` → ms."""
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*(ago)?\s*", text)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
        return int((now - delta).timestamp() * 1000)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise DlqError(
            f"time {text!r} is neither ISO 8601 (2026-11-28T10:00:00Z) nor relative (2h ago)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_rate(text: str) -> float:
    """``50``, ``50/s``, ``600/m`` → records per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise DlqError(f"rate {text!r} is not a positive rate such as 50/s or 600/m")
    per = {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) / per


@dataclass(frozen=True)
class DeadLetterEntry:
    """One record of the dead-letter topic, where it sits, and what it holds."""

    topic: str
    partition: int
    offset: int
    dead: DeadLetter | None
    """None when the dead-letter record itself could not be read."""
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def coordinate(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def delivery(self) -> Delivery | None:
        return self.dead.delivery if self.dead else None

    @property
    def event_type(self) -> str | None:
        return self.delivery.event_type if self.delivery else None

    @property
    def last_status(self) -> int | None:
        last = self.delivery.last_attempt if self.delivery else None
        return last.status if last else None

    @property
    def last_outcome(self) -> str:
        last = self.delivery.last_attempt if self.delivery else None
        return last.describe() if last else "-"

    def summary(self) -> dict[str, Any]:
        """The row of `dlq list`."""
        dead, delivery = self.dead, self.delivery
        return {
            "partition": self.partition,
            "offset": self.offset,
            "deadAt": _iso(dead.dead_at) if dead else None,
            "reason": dead.reason if dead else "unreadable",
            "eventType": delivery.event_type if delivery else None,
            "botId": delivery.bot_id if delivery else None,
            "endpointId": delivery.endpoint_id if delivery else None,
            "attempts": len(delivery.attempts) if delivery else 0,
            "lastStatus": self.last_status,
            "lastOutcome": self.last_outcome if delivery else (dead.detail if dead else self.error),
            "eventId": delivery.event_id if delivery else None,
            "replayOf": delivery.replay_of if delivery else None,
        }

    def full(self) -> dict[str, Any]:
        """Everything, for `dlq show`: the summary, the detail and the attempt log."""
        dead, delivery = self.dead, self.delivery
        result = self.summary() | {"coordinate": self.coordinate, "headers": self.headers}
        if dead is not None:
            result |= {
                "detail": dead.detail,
                "source": f"{dead.source_topic}:{dead.source_partition}:{dead.source_offset}",
                "originalKey": _text(dead.original_key),
                "originalValueBytes": len(dead.original_value) if dead.original_value else None,
            }
        else:
            result["error"] = self.error
        if delivery is not None:
            result |= {
                "sessionId": delivery.session_id,
                "occurredAt": _iso(delivery.occurred_at),
                "payload": delivery.payload,
                "attemptLog": [
                    {"at": _iso(a.at), "tier": a.tier, "durationMs": a.duration_ms,
                     "status": a.status, "error": a.error, "response": a.response_snippet}
                    for a in delivery.attempts
                ],
            }
        return result


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Filters:
    """The selection shared by every dlq command; empty fields select everything."""

    event_type: str | None = None
    bot_id: str | None = None
    endpoint_id: str | None = None
    reason: str | None = None
    status: str | None = None
    """``5xx``, ``404``, ``timeout`` or ``connection``."""
    since: int | None = None
    until: int | None = None
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    event_id: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not re.fullmatch(r"[1-5]xx|\d{3}|timeout|connection", self.status):
            raise DlqError(f"status {self.status!r} is not 5xx, 404, timeout or connection")

    def admits(self, entry: DeadLetterEntry) -> bool:
        dead, delivery = entry.dead, entry.delivery
        if self.reason is not None and (dead.reason if dead else "unreadable") != self.reason:
            return False
        if self.since is not None and (dead is None or dead.dead_at < self.since):
            return False
        if self.until is not None and (dead is None or dead.dead_at > self.until):
            return False
        if self.event_type or self.bot_id or self.endpoint_id or self.event_id or self.status:
            if delivery is None:
                return False
            if self.event_type and delivery.event_type != self.event_type.upper():
                return False
            if self.bot_id and delivery.bot_id.lower() != self.bot_id.lower():
                return False
            if self.endpoint_id and delivery.endpoint_id != self.endpoint_id:
                return False
            if self.event_id and delivery.event_id != self.event_id:
                return False
            if self.status and not _status_matches(self.status, delivery):
                return False
        if self.to_offset is not None and entry.offset > self.to_offset:
            return False
        return True


def _status_matches(wanted: str, delivery: Delivery) -> bool:
    last = delivery.last_attempt
    if last is None:
        return False
    if wanted == "timeout":
        return last.outcome == "timeout"
    if wanted == "connection":
        return last.outcome == "connection_error"
    if last.status is None:
        return False
    if wanted.endswith("xx"):
        return str(last.status)[0] == wanted[0]
    return last.status == int(wanted)


def _read_to_end(
    config: Config, topic: str, *, partition: int | None = None, start: int = 0
) -> Iterator[Any]:
    consumer = reader_consumer(config, "dlq-reader")
    try:
        yield from read_to_end(consumer, config, topic, partition=partition, start=start)
    except TopicReadError as exc:
        raise DlqError(str(exc)) from None
    finally:
        consumer.close()


def read_dead_letters(
    config: Config, filters: Filters = Filters(), *, codec: Codec | None = None
) -> Iterator[DeadLetterEntry]:
    """The dead letters ``filters`` selects, in partition order of arrival."""
    codec = codec or Codec(config.schema_registry_url)
    topic = Topics.from_config(config).dlq
    matched = 0
    for msg in _read_to_end(config, topic, partition=filters.partition, start=filters.from_offset or 0):
        headers = {k: (v or b"").decode(errors="replace") for k, v in (msg.headers() or [])}
        try:
            name, record = codec.decode(msg.value())
            if name != "gateway.DeadLetter":
                raise DecodeError(f"a {name} record, not a dead letter")
            entry = DeadLetterEntry(topic, msg.partition(), msg.offset(), DeadLetter.from_record(record),
                                    headers=headers)
        except DecodeError as exc:
            entry = DeadLetterEntry(topic, msg.partition(), msg.offset(), None, error=str(exc), headers=headers)
        if filters.admits(entry):
            yield entry
            matched += 1
            if filters.limit is not None and matched >= filters.limit:
                return


def read_replayed(config: Config, *, codec: Codec | None = None) -> set[str]:
    """Coordinates of the dead letters already replayed."""
    codec = codec or Codec(config.schema_registry_url)
    replayed: set[str] = set()
    for msg in _read_to_end(config, Topics.from_config(config).dlq_replays):
        key = (msg.key() or b"").decode()
        if msg.value() is None:
            replayed.discard(key)
        else:
            replayed.add(key)
    return replayed


def stats(entries: Iterator[DeadLetterEntry]) -> dict[str, Counter[str]]:
    """Counts by reason, event type, endpoint and hour (UTC)."""
    result: dict[str, Counter[str]] = {
        "reason": Counter(), "eventType": Counter(), "endpointId": Counter(), "hour": Counter(),
    }
    for entry in entries:
        row = entry.summary()
        result["reason"][row["reason"]] += 1
        result["eventType"][row["eventType"] or "-"] += 1
        result["endpointId"][row["endpointId"] or "-"] += 1
        result["hour"][(row["deadAt"] or "-")[:13]] += 1
    return result


@dataclass
class ReplayReport:
    replay_id: str
    selected: int = 0
    replayed: int = 0
    skipped_already_replayed: int = 0
    refused: list[DeadLetterEntry] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.replayed / self.seconds if self.seconds > 0 else 0.0


class Replayer:
    """Sends selected dead letters back into the first retry tier, at a bounded rate."""

    def __init__(self, config: Config, *, codec: Codec | None = None) -> None:
        self.config = config
        self.topics = Topics.from_config(config)
        if len(self.topics.tiers) < 2:
            raise DlqError("there is no retry tier to replay into (GATEWAY_RETRY_DELAYS is empty)")
        self.first_tier = self.topics.tiers[1]
        self.codec = codec or Codec(config.schema_registry_url)

    def plan(
        self,
        entries: list[DeadLetterEntry],
        *,
        again: bool = False,
        to_endpoint: str | None = None,
        known_endpoints: set[str] | None = None,
    ) -> tuple[list[tuple[DeadLetterEntry, Delivery]], ReplayReport]:
        """What a replay would send: (dead letter, delivery to send) pairs, and the refusals
        (not deliveries, or for an endpoint that is no longer registered)."""
        report = ReplayReport(replay_id=str(uuid.uuid4()), selected=len(entries))
        replayed = set() if again else read_replayed(self.config, codec=self.codec)
        now = time.time_ns() // 1_000_000
        planned = []
        for entry in entries:
            delivery = entry.delivery
            if delivery is None:
                report.refused.append(entry)
                continue
            if entry.coordinate in replayed:
                report.skipped_already_replayed += 1
                continue
            target = to_endpoint or delivery.endpoint_id
            if known_endpoints is not None and target not in known_endpoints:
                report.refused.append(entry)
                continue
            planned.append((entry, replace(
                delivery,
                endpoint_id=target,
                attempt=0,
                due_at=now,
                replay_of=entry.coordinate,
            )))
        return planned, report

    def send(
        self,
        planned: list[tuple[DeadLetterEntry, Delivery]],
        report: ReplayReport,
        *,
        rate: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> ReplayReport:
        """Produce the planned deliveries (acknowledged), then record them as replayed."""
        producer = Producer(self.config.kafka_common() | {
            "acks": "all", "enable.idempotence": True, "linger.ms": 5,
        })
        errors: list[str] = []
        acked: list[tuple[DeadLetterEntry, Delivery]] = []

        def on_delivery(item: tuple[DeadLetterEntry, Delivery]) -> Callable[[Any, Any], None]:
            def callback(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(f"{item[0].coordinate}: {err.str()}")
                else:
                    acked.append(item)
            return callback

        started = time.monotonic()
        tier = self.first_tier
        for index, item in enumerate(planned):
            if rate:
                # Never ahead of the schedule `rate` allows, measured from the start.
                wait = started + index / rate - time.monotonic()
                if wait > 0:
                    producer.poll(0)
                    time.sleep(wait)
            entry, delivery = item
            headers = delivery_headers(
                delivery, source=(entry.topic, entry.partition, entry.offset)
            ) + [("replay-id", report.replay_id.encode()), ("replay-of", entry.coordinate.encode())]
            value = self.codec.encode(DELIVERY_SCHEMA, delivery.to_record(), topic=tier.topic)
            producer.produce(tier.topic, key=delivery.endpoint_id.encode(), value=value,
                             headers=headers, on_delivery=on_delivery(item))
            producer.poll(0)
            if on_progress:
                on_progress(index + 1)
        producer.flush(60)
        report.seconds = time.monotonic() - started
        report.replayed = len(acked)
        self._record(producer, acked, report)
        if errors:
            raise DlqError(f"{len(errors)} replays were not acknowledged; first: {errors[0]}")
        return report

    def _record(self, producer: Producer, acked: list[tuple[DeadLetterEntry, Delivery]],
                report: ReplayReport) -> None:
        topic = self.topics.dlq_replays
        now = time.time_ns() // 1_000_000
        for entry, delivery in acked:
            record = {"deadLetter": entry.coordinate, "replayId": report.replay_id, "replayedAt": now,
                      "eventId": delivery.event_id, "endpointId": delivery.endpoint_id}
            producer.produce(topic, key=entry.coordinate.encode(),
                             value=self.codec.encode(REPLAY_SCHEMA, record, topic=topic))
        if producer.flush(30):
            raise DlqError(f"the replays were sent but not all were recorded on {topic}; "
                           "a later replay may repeat them unless you filter them out")
