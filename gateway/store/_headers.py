"""The plain Kafka headers of retry, deferral and dead-letter records: what they carry is
readable by tools that do not read Avro (kcat, …), so an engineer can filter a topic by
event, endpoint or attempt without the schemas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..records import DeadLetter, Delivery

__all__ = ["Headers", "dead_letter_headers", "delivery_headers"]

Headers = list[tuple[str, str | bytes | None]]


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
        ("due-at", str(delivery.due_at).encode()),
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
