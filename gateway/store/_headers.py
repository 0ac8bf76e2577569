"""The plain Kafka headers of retry, deferral and dead-letter records: what they carry is
readable by tools that do not read Avro (kcat, …), so an engineer can filter a topic by
event, endpoint or attempt without the schemas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..records import DeadLetter, Delivery

__all__ = ["DUE_AT_HEADER", "Headers", "dead_letter_headers", "delivery_headers", "due_at_of", "record_header"]

Headers = list[tuple[str, str | bytes | None]]

DUE_AT_HEADER = "due-at"
"""When a retry or deferral record is due (ms since the epoch, in decimal)."""


def record_header(message: Any, name: str) -> str | None:
    """The first value of header ``name`` of a received record (a confluent_kafka
    Message), decoded; None without one."""
    for key, value in message.headers() or ():
        if key == name and value is not None:
            return bytes(value).decode(errors="replace")
    return None


def due_at_of(message: Any) -> int | None:
    """A retry or deferral record's due time from its header, read without decoding the
    record (the consumer's thread uses it); None without a readable one."""
    value = record_header(message, DUE_AT_HEADER)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _source_headers(topic: str, partition: int, offset: int) -> Headers:
    return [
        ("source-topic", topic.encode()),
        ("source-partition", str(partition).encode()),
        ("source-offset", str(offset).encode()),
    ]


def delivery_headers(delivery: Delivery, *, source: Sequence[Any]) -> Headers:
    """Plain headers of a retry record, for tools that do not read Avro (kcat, …)."""
    last = delivery.last_attempt
    headers: Headers = [
        ("event-id", delivery.event_id.encode()),
        ("event-type", delivery.event_type.encode()),
        ("endpoint-id", delivery.endpoint_id.encode()),
        ("attempt", str(delivery.attempt).encode()),
        (DUE_AT_HEADER, str(delivery.due_at).encode()),
    ]
    if last is not None:
        headers.append(("last-error", last.describe().encode()))
    return headers + _source_headers(*source)


def dead_letter_headers(dead: DeadLetter) -> Headers:
    headers: Headers = [("reason", dead.reason.value.encode())]
    if dead.delivery is not None:
        d = dead.delivery
        headers += [
            ("event-id", d.event_id.encode()),
            ("event-type", d.event_type.encode()),
            ("endpoint-id", d.endpoint_id.encode()),
            ("attempt", str(d.attempt).encode()),
        ]
        if d.last_attempt is not None:
            headers.append(("last-error", d.last_attempt.describe().encode()))
    return headers + _source_headers(dead.source_topic, dead.source_partition, dead.source_offset)
