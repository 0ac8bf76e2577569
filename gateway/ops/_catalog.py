"""The event types a receiver gets, as a settings page shows them: each type's JSON schema
(made from the documented fields, :data:`gateway.events.FIELDS`, so it cannot differ from
what the gateway validates and sends) and its example.

The examples are the documented ones (``reference/webhook-events.md``) for MESSAGE,
RATE_MESSAGE and TICKET, byte for byte the documents of ``examples/events.jsonl``. The
platform's documentation gives CREATE_LEAD's fields but no example payload: its example
is the gateway's own (the same one test sends use), and says so (``documented: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..events import FIELDS, EventType
from ._testsend import examples

__all__ = ["DOCUMENTED_EXAMPLES", "EventTypeInfo", "event_types"]

DOCUMENTED_EXAMPLES = frozenset({EventType.MESSAGE, EventType.RATE_MESSAGE, EventType.TICKET})
"""The types whose example payload the platform's documentation gives."""

_UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

# What the documentation says of each field (its comments), by field name and type.
_SAID: dict[str, str] = {
    "event": "The type of event.",
    "botId": "Unique identifier of the bot (a UUID).",
    "sessionId": "Unique identifier of the chat session (a UUID).",
    "role": "Who sent the message (USER in the documented example).",
    "message": "The actual message content.",
    "messageId": "Unique identifier of the message (a UUID).",
    "rating": "Rating value (a number; 1 in the documented example).",
    "customerName": "Name of the customer.",
    "customerEmail": "Email of the customer.",
    "customerMessage": "Message from the customer.",
    "userId": "Unique identifier of the user.",
    "email": "Email address of the user.",
    "intent": "The user's intent or reason for creating the lead.",
    "name": "Name of the user.",
}
_SAID_RATE = {"messageId": "ID of the message being rated (a UUID)."}

_DESCRIPTIONS = {
    EventType.MESSAGE: "A user sent a message.",
    EventType.RATE_MESSAGE: "A message was rated.",
    EventType.TICKET: "A ticket was created.",
    EventType.CREATE_LEAD: "A lead was created.",
}


def _schema(event_type: EventType) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, kind in FIELDS[event_type]:
        said = (_SAID_RATE if event_type is EventType.RATE_MESSAGE else {}).get(name) or _SAID[name]
        if kind == "type":
            prop: dict[str, Any] = {"const": event_type.value}
        elif kind == "uuid":
            prop = {"type": "string", "format": "uuid", "pattern": _UUID}
        elif kind == "number":
            prop = {"type": "number"}
        else:
            prop = {"type": "string"}
        properties[name] = prop | {"description": said}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": event_type.value,
        "description": _DESCRIPTIONS[event_type],
        "type": "object",
        "properties": properties,
        "required": [name for name, _ in FIELDS[event_type]],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class EventTypeInfo:
    """One event type: what it means, its JSON schema and its example payload."""

    type: EventType
    description: str
    schema: dict[str, Any]
    example: dict[str, Any]
    """The body a receiver gets, field for field and in the documented order."""
    documented: bool
    """Whether ``example`` is the platform documentation's own example."""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type.value, "description": self.description, "schema": self.schema,
                "example": self.example, "documented": self.documented}


def event_types() -> list[EventTypeInfo]:
    """Every event type, in the documented order."""
    known = examples()
    return [EventTypeInfo(t, _DESCRIPTIONS[t], _schema(t), known[t], t in DOCUMENTED_EXAMPLES) for t in EventType]
