"""Resending one delivery: the same event to the same endpoint again, as a new delivery,
whatever became of the first (delivered, retried, dead-lettered).

What the settings page's "resend" button and ``POST /v1/deliveries/{id}/resend`` do. The
line of the delivery history names the event and the endpoint, but holds no payload: the
event is read back from the events topic, found by its ``event-id`` header between the
time it occurred and the attempt being resent (Kafka finds where that window begins by
the records' timestamps; the bundled broker does not answer that, and the topic is read
from its start). An event older than the topic's retention (a week) cannot be resent.

The new delivery goes where a dead-letter replay goes, the first retry tier, due now,
with its attempt counter at zero: it gets the whole schedule, and its attempts appear in
the delivery history with ``replayOf`` naming the line it resends. It carries the same
``webhook-id`` (the event id): a receiver that dedupes on it, as it should, sees it
again and may ignore it; that is what a resend of a delivered event means.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import Message, Producer

from ..clock import SYSTEM
from ..codec import Codec
from ..config import Config
from ..delivery import first_delivery
from ..errors import Conflict, DecodeError, InvalidEvent, NotFound, Unavailable
from ..events import Event
from ..records import DELIVERY_SCHEMA, Delivery
from ..store import EndpointTable, Topics, delivery_headers, offsets_at, read_to_end, reader_consumer
from ._access import OPERATOR, Access
from ._deadletters import replay_tier
from ._endpoints import get_endpoint
from ._history import HistoryEntry
from ._inputs import iso

__all__ = ["EVENT_SKEW_MS", "Resent", "find_event", "resend_delivery"]

EVENT_SKEW_MS = 60 * 60 * 1000
"""How far around the window an event's record is looked for: producers' clocks and the
broker's may disagree with the time an event says it occurred."""


@dataclass(frozen=True)
class Resent:
    """A resend, acknowledged by the broker."""

    id: str
    """The resend's id, on the record's ``replay-id`` header."""
    of: HistoryEntry
    """The line of the delivery history resent."""
    delivery: Delivery
    topic: str
    at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "resendOf": str(self.of.id), "eventId": self.delivery.event_id,
                "eventType": self.delivery.event_type, "endpointId": self.delivery.endpoint_id,
                "topic": self.topic, "replayOf": self.delivery.replay_of, "at": iso(self.at)}


def find_event(config: Config, event_id: str, *, not_before: int, not_after: int, codec: Codec | None = None,
               timeout: float = 30.0) -> Event:
    """The event ``event_id`` as it is on the events topic, looked for among the records
    stamped from ``not_before`` to ``not_after`` (ms, widened by :data:`EVENT_SKEW_MS`).
    :class:`~gateway.errors.NotFound` when it is not there (any more)."""
    codec = codec or Codec(config.schema_registry_url)
    topic = Topics.from_config(config).events
    begin, end = not_before - EVENT_SKEW_MS, not_after + EVENT_SKEW_MS
    wanted = event_id.encode()

    def past_window(msg: Message) -> bool:  # then the rest of its partition is later still
        return (msg.timestamp()[1] or 0) > end > 0

    consumer = reader_consumer(config, "resend-reader")
    try:
        starts = offsets_at(consumer, config, topic, begin, timeout=timeout)
        for msg in read_to_end(consumer, config, topic, starts=starts, past_end=past_window, timeout=timeout):
            if dict(msg.headers() or []).get("event-id") != wanted:
                continue
            try:
                _, record = codec.decode(msg.value())
                return Event.from_record(record)
            except (DecodeError, InvalidEvent, KeyError, TypeError) as exc:
                raise Conflict(f"event {event_id} is on {topic} but cannot be read again: {exc}") from None
    finally:
        consumer.close()
    raise NotFound(f"event {event_id} is not on {topic} any more (its retention is a week)", field="id")


def resend_delivery(
    config: Config,
    entry: HistoryEntry,
    *,
    table: EndpointTable | None = None,
    access: Access = OPERATOR,
    codec: Codec | None = None,
    timeout: float = 30.0,
) -> Resent:
    """Send ``entry``'s event to ``entry``'s endpoint again, as a new delivery into the
    first retry tier, due now; return it once the broker acknowledged it.

    :class:`~gateway.errors.Forbidden` out of ``access``'s scope or for a read-only
    caller; :class:`~gateway.errors.Conflict` when the endpoint has been removed since;
    :class:`~gateway.errors.NotFound` when the event is no longer on the events topic.
    """
    access.require_write("resending a delivery")
    line = entry.line
    access.check_bot(line.bot_id, what=f"delivery {entry.id} is another bot's")
    try:
        endpoint = get_endpoint(config, line.endpoint_id, table=table, access=access, timeout=timeout)
    except NotFound:
        raise Conflict(f"endpoint {line.endpoint_id} is no longer registered: delivery {entry.id} cannot be "
                       "resent to it") from None
    codec = codec or Codec(config.schema_registry_url)
    event = find_event(config, line.event_id, not_before=min(line.occurred_at, line.attempt.at),
                       not_after=line.attempt.at, codec=codec, timeout=timeout)
    now = SYSTEM.now_ms()
    attempts = Topics.from_config(config).attempts
    coordinate = f"{attempts}:{entry.id}"
    delivery = replace(first_delivery(event, endpoint, event.json_body()), due_at=now, replay_of=coordinate)
    tier = replay_tier(config)
    resend_id = str(uuid.uuid4())
    headers: list[tuple[str, str | bytes | None]] = [
        *delivery_headers(delivery, source=(attempts, entry.partition, entry.offset)),
        ("replay-id", resend_id.encode()), ("replay-of", coordinate.encode()),
    ]
    producer = Producer(config.kafka_common() | {"acks": "all", "enable.idempotence": True,
                                                 "message.timeout.ms": max(1, int(timeout * 1000))})
    errors: list[str] = []
    producer.produce(tier.topic, key=endpoint.id.encode(),
                     value=codec.encode(DELIVERY_SCHEMA, delivery.to_record(), topic=tier.topic),
                     headers=headers, on_delivery=lambda err, msg: errors.append(err.str()) if err else None)
    if producer.flush(timeout) or errors:
        raise Unavailable(f"{tier.topic} did not acknowledge the resend of {entry.id}: "
                          + (errors[0] if errors else f"no answer within {timeout:g} s"))
    return Resent(resend_id, entry, delivery, tier.topic, now)
