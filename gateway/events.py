"""The platform's four webhook events: their documented fields, and their validation.

The documented JSON payloads (``reference/webhook-events.md``) are the contract with
receivers. An :class:`Event` keeps that document (``body``, in the documented field
order) apart from the gateway's metadata (event id, time it occurred), so the JSON we
POST is exactly the document, whatever the Avro record around it carries.

Validation is one function, :func:`validate_fields`, used both for JSON coming in through
``gateway publish`` and for Avro records decoded from the events topic (producers in
other languages can write anything their Avro library lets them).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from .errors import InputError, InvalidEvent

__all__ = [
    "FIELDS",
    "SCHEMA_NAMES",
    "Event",
    "EventType",
    "is_uuid",
    "parse_event",
    "parse_event_types",
    "validate_fields",
]


class EventType(StrEnum):
    MESSAGE = "MESSAGE"
    RATE_MESSAGE = "RATE_MESSAGE"
    TICKET = "TICKET"
    CREATE_LEAD = "CREATE_LEAD"


Kind = Literal["type", "uuid", "text", "number"]

# Documented fields in documented order. The doc says "All IDs (botId, sessionId,
# messageId) are UUIDs"; it gives no format for CREATE_LEAD's userId, so that one is text.
FIELDS: dict[EventType, tuple[tuple[str, Kind], ...]] = {
    EventType.MESSAGE: (
        ("event", "type"), ("botId", "uuid"), ("sessionId", "uuid"),
        ("role", "text"), ("message", "text"), ("messageId", "uuid"),
    ),
    EventType.RATE_MESSAGE: (
        ("event", "type"), ("botId", "uuid"), ("sessionId", "uuid"),
        ("rating", "number"), ("messageId", "uuid"),
    ),
    EventType.TICKET: (
        ("event", "type"), ("customerName", "text"), ("customerEmail", "text"),
        ("customerMessage", "text"), ("botId", "uuid"), ("sessionId", "uuid"),
    ),
    EventType.CREATE_LEAD: (
        ("event", "type"), ("userId", "text"), ("email", "text"), ("intent", "text"),
        ("name", "text"), ("botId", "uuid"), ("sessionId", "uuid"),
    ),
}

SCHEMA_NAMES: dict[EventType, str] = {
    EventType.MESSAGE: "gateway.events.Message",
    EventType.RATE_MESSAGE: "gateway.events.RateMessage",
    EventType.TICKET: "gateway.events.Ticket",
    EventType.CREATE_LEAD: "gateway.events.CreateLead",
}

METADATA = ("eventId", "occurredAt")

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Chat text may hold any Unicode scalar value (JSON escapes the control characters); a
# lone surrogate is not one: it cannot be encoded as UTF-8, in the JSON body or in Avro.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_MAX_TEXT = 1_000_000


def _invalid(field: str | None, value: object, problem: str) -> InvalidEvent:
    """The error for ``field`` (None: the whole event), showing ``value`` unless missing."""
    shown = _show(value)
    where = f"field {field!r}" if field else "event"
    return InvalidEvent(field, value, problem, f"{where}: {problem}" + (f" (got {shown})" if shown else ""))


def _show(value: object) -> str:
    if value is _MISSING:
        return ""
    text = json.dumps(value, default=repr) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()
# json.dumps builds a new encoder on every call made with options: this one is reused.
_BODY_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def is_uuid(value: object) -> bool:
    """True for a UUID in its canonical 8-4-4-4-12 hexadecimal form."""
    return isinstance(value, str) and len(value) == 36 and _UUID.fullmatch(value) is not None


def validate_fields(data: Mapping[str, Any]) -> EventType:
    """Check that ``data`` holds one documented event (plus optional metadata).

    Raises :class:`InvalidEvent` for the first problem found; returns the event type.
    """
    kind = data.get("event", _MISSING)
    if kind is _MISSING:
        raise _invalid("event", _MISSING, "missing; expected one of " + _types())
    try:
        event_type = EventType(kind) if isinstance(kind, str) else None
    except ValueError:
        event_type = None
    if event_type is None:
        raise _invalid("event", kind, "unknown event type; expected one of " + _types())
    fields = FIELDS[event_type]
    for name, field_kind in fields:
        value = data.get(name, _MISSING)
        if value is _MISSING:
            raise _invalid(name, _MISSING, f"missing; a {event_type} event requires it")
        _check(name, field_kind, value)
    if len(data) > len(fields):
        known = {name for name, _ in fields}
        for name in data:
            if name not in known and name not in METADATA:
                raise _invalid(
                    name, data[name],
                    f"not a documented field of {event_type}; documented: "
                    + ", ".join(n for n, _ in fields),
                )
    return event_type


def _types() -> str:
    return ", ".join(t.value for t in EventType)


def _check(name: str, kind: Kind, value: object) -> None:
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, value, "must be a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise _invalid(name, value, "must be a finite number")
        if isinstance(value, int) and not -(2**31) <= value < 2**31:
            raise _invalid(name, value, "is out of range for a 32-bit integer")
        return
    if not isinstance(value, str):
        raise _invalid(name, value, "must be a string")
    if kind == "uuid":
        if not is_uuid(value):
            raise _invalid(name, value, "is not a UUID (expected 8-4-4-4-12 hex digits)")
        return
    if len(value) > _MAX_TEXT:
        raise _invalid(name, f"{len(value)} characters", f"is longer than {_MAX_TEXT}")
    bad = _LONE_SURROGATE.search(value)
    if bad:
        raise _invalid(
            name, value,
            f"contains a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()}: half of a "
            "UTF-16 pair, not a Unicode character (it cannot be encoded as UTF-8)",
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One validated event: the documented document plus the gateway's metadata."""

    type: EventType
    event_id: str
    """UUID; the idempotency key receivers see as the ``webhook-id`` header."""
    occurred_at: int
    """Milliseconds since the Unix epoch."""
    body: Mapping[str, Any]
    """The documented JSON document, in the documented field order."""

    @property
    def bot_id(self) -> str:
        return str(self.body["botId"])

    @property
    def session_id(self) -> str:
        return str(self.body["sessionId"])

    @property
    def schema_name(self) -> str:
        return SCHEMA_NAMES[self.type]

    def json_body(self) -> bytes:
        """The bytes POSTed to receivers: the document, compact, UTF-8."""
        return _BODY_ENCODER.encode(self.body).encode()

    def to_record(self) -> dict[str, Any]:
        """The Avro record: the document's fields followed by the metadata."""
        return {**self.body, "eventId": self.event_id, "occurredAt": self.occurred_at}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Event:
        """Validate a decoded Avro record (metadata required) and build the event."""
        event_type = validate_fields(record)
        event_id = record.get("eventId")
        if not is_uuid(event_id):
            raise _invalid("eventId", event_id, "is not a UUID")
        occurred_at = record.get("occurredAt")
        if (isinstance(occurred_at, bool) or not isinstance(occurred_at, int)
                or not 0 <= occurred_at < 2**63):
            raise _invalid("occurredAt", occurred_at, "must be milliseconds since the epoch")
        body = {name: record[name] for name, _ in FIELDS[event_type]}
        return cls(event_type, str(event_id), occurred_at, body)


def parse_event(data: object, *, now_ms: int | None = None) -> Event:
    """Validate an event in the documented JSON shape; assign an event id and time if absent.

    ``eventId`` (a UUID) and ``occurredAt`` (ms since the epoch) may be given alongside the
    documented fields; they are metadata and never part of the JSON body.
    """
    if not isinstance(data, Mapping):
        raise _invalid(None, data, f"must be a JSON object, not {_json_kind(data)}")
    record = dict(data)
    if record.get("eventId") is None:
        record["eventId"] = str(uuid.uuid4())
    if record.get("occurredAt") is None:
        record["occurredAt"] = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    return Event.from_record(record)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def parse_event_types(names: Iterable[str], *, field: str = "event_types") -> tuple[EventType, ...]:
    """Event type names as a user gives them (any case; blanks and repeats ignored), in the
    order given. The one check of event type names: the command line, the HTTP API, the
    endpoint filters, test sends and the dead-letter filters all call it. Raises
    :class:`~gateway.errors.InputError` naming ``field`` for a name that is not a type."""
    wanted = dict.fromkeys(name.strip().upper() for name in names if name.strip())
    unknown = [name for name in wanted if name not in EventType.__members__]
    if unknown:
        raise InputError(f"event type {unknown[0]!r} is unknown; expected some of {_types()}", field=field)
    return tuple(EventType(name) for name in wanted)
