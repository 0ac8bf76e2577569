"""Unit tests of gateway.events: the documented payloads, and what is refused."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest

from gateway.codec import Codec
from gateway.errors import InvalidEvent
from gateway.events import FIELDS, SCHEMA_NAMES, Event, EventType, is_uuid, parse_event, validate_fields

# The example payloads of reference/webhook-events.md, verbatim and in documented order.
MESSAGE: dict[str, Any] = {
    "event": "MESSAGE",
    "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
    "sessionId": "b8e034be-90d8-477d-b919-8fcfcf37dc10",
    "role": "USER",
    "message": "hi",
    "messageId": "733b7d55-61ea-450f-b585-27755b015596",
}
RATE_MESSAGE: dict[str, Any] = {
    "event": "RATE_MESSAGE",
    "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
    "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b",
    "rating": 1,
    "messageId": "ad2deddc-6f36-4af7-8b2f-3ddeab122b64",
}
TICKET: dict[str, Any] = {
    "event": "TICKET",
    "customerName": "jd",
    "customerEmail": "test@email.com",
    "customerMessage": "hello",
    "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
    "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b",
}
# The document gives the CREATE_LEAD shape but no example; this one follows the shape.
CREATE_LEAD: dict[str, Any] = {
    "event": "CREATE_LEAD",
    "userId": "user-42",
    "email": "lead@example.com",
    "intent": "wants a demo",
    "name": "Ada Lovelace",
    "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
    "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b",
}

EXAMPLES: dict[EventType, dict[str, Any]] = {
    EventType.MESSAGE: MESSAGE,
    EventType.RATE_MESSAGE: RATE_MESSAGE,
    EventType.TICKET: TICKET,
    EventType.CREATE_LEAD: CREATE_LEAD,
}

EVENT_ID = "0b6f6a52-3c51-4d2e-9a43-5b1b8f1c7e10"

ids = pytest.mark.parametrize("example", list(EXAMPLES.values()), ids=[t.value for t in EXAMPLES])


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def _without(base: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k != name}


def _refused(data: object) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(data)
    return info.value


# --- documented payloads ---------------------------------------------------------------

def test_fields_table_matches_documented_order() -> None:
    for event_type, example in EXAMPLES.items():
        assert [name for name, _ in FIELDS[event_type]] == list(example)


@ids
def test_documented_example_parses_to_the_exact_document(example: dict[str, Any]) -> None:
    event = parse_event(example, now_ms=1_700_000_000_000)
    assert event.type == EventType(example["event"])
    assert dict(event.body) == example
    assert list(event.body) == list(example)  # documented key order
    assert event.occurred_at == 1_700_000_000_000
    assert event.bot_id == example["botId"]
    assert event.session_id == example["sessionId"]
    assert event.schema_name == SCHEMA_NAMES[event.type]


@ids
def test_body_is_in_documented_order_whatever_the_input_order(example: dict[str, Any]) -> None:
    shuffled = dict(reversed(list(example.items())))
    shuffled["eventId"] = EVENT_ID
    event = parse_event(shuffled)
    assert list(event.body) == list(example)


@ids
def test_json_body_is_compact_json_of_exactly_the_document(example: dict[str, Any]) -> None:
    event = parse_event(_with(example, eventId=EVENT_ID, occurredAt=5))
    body = event.json_body()
    assert isinstance(body, bytes)
    assert body == json.dumps(example, separators=(",", ":")).encode()
    decoded = json.loads(body)
    assert decoded == example
    assert list(decoded) == list(example)
    assert b"eventId" not in body and b"occurredAt" not in body
    assert b" " not in body.replace(b"Ada Lovelace", b"").replace(b"wants a demo", b"")


def test_json_body_of_documented_message_is_byte_exact() -> None:
    assert parse_event(MESSAGE).json_body() == (
        b'{"event":"MESSAGE","botId":"6434515b-8541-4861-bb24-8acd6e77e8c4",'
        b'"sessionId":"b8e034be-90d8-477d-b919-8fcfcf37dc10","role":"USER","message":"hi",'
        b'"messageId":"733b7d55-61ea-450f-b585-27755b015596"}'
    )


def test_json_body_keeps_non_ascii_as_utf8() -> None:
    event = parse_event(_with(MESSAGE, message="grüß dich ☃"))
    assert "grüß dich ☃".encode() in event.json_body()


def test_integer_rating_stays_an_integer_and_float_stays_float() -> None:
    assert b'"rating":1,' in parse_event(RATE_MESSAGE).json_body()
    assert b'"rating":4.5,' in parse_event(_with(RATE_MESSAGE, rating=4.5)).json_body()


@ids
def test_record_round_trip_through_to_record_from_record(example: dict[str, Any]) -> None:
    event = parse_event(_with(example, eventId=EVENT_ID, occurredAt=123))
    record = event.to_record()
    assert record == {**example, "eventId": EVENT_ID, "occurredAt": 123}
    assert list(record) == [*example, "eventId", "occurredAt"]
    assert Event.from_record(record) == event


# --- metadata ------------------------------------------------------------------------

def test_given_event_id_is_kept() -> None:
    event = parse_event(_with(MESSAGE, eventId=EVENT_ID, occurredAt=42))
    assert event.event_id == EVENT_ID
    assert event.occurred_at == 42


@pytest.mark.parametrize("given", [{}, {"eventId": None}], ids=["absent", "null"])
def test_absent_event_id_is_a_fresh_uuid4(given: dict[str, Any]) -> None:
    first = parse_event({**MESSAGE, **given})
    second = parse_event({**MESSAGE, **given})
    assert uuid.UUID(first.event_id).version == 4
    assert str(uuid.UUID(first.event_id)) == first.event_id
    assert first.event_id != second.event_id


def test_absent_occurred_at_is_now() -> None:
    import time

    before = time.time_ns() // 1_000_000
    event = parse_event(MESSAGE)
    after = time.time_ns() // 1_000_000
    assert before <= event.occurred_at <= after


@pytest.mark.parametrize("value", [-1, 1.5, "12", True])
def test_bad_occurred_at_is_refused(value: object) -> None:
    exc = _refused(_with(MESSAGE, occurredAt=value))
    assert exc.field == "occurredAt"
    assert "occurredAt" in str(exc)


def test_largest_avro_long_occurred_at_is_accepted() -> None:
    assert parse_event(_with(MESSAGE, occurredAt=2**63 - 1)).occurred_at == 2**63 - 1


def test_occurred_at_beyond_avro_long_is_refused() -> None:
    """Fails: Event.from_record (events.py line 212) checks only occurredAt >= 0, so 2**63
    is accepted and the event later cannot be encoded (Avro long is 64-bit signed): the
    codec raises OverflowError in `gateway publish` instead of InvalidEvent up front, like
    the 32-bit range check on rating."""
    exc = _refused(_with(MESSAGE, occurredAt=2**63))
    assert exc.field == "occurredAt"
    assert str(2**63) in str(exc)


def test_from_record_requires_metadata() -> None:
    with pytest.raises(InvalidEvent, match="eventId"):
        Event.from_record(MESSAGE)
    with pytest.raises(InvalidEvent, match="occurredAt"):
        Event.from_record(_with(MESSAGE, eventId=EVENT_ID))


def test_is_uuid() -> None:
    assert is_uuid(str(uuid.uuid4()))
    assert is_uuid(str(uuid.uuid4()).upper())
    for bad in ["", "hi", str(uuid.uuid4()).replace("-", ""), "{" + str(uuid.uuid4()) + "}",
                str(uuid.uuid4()) + "\n", 123, None, uuid.uuid4()]:
        assert not is_uuid(bad), bad


# --- refused input -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("example", "field"),
    [
        (MESSAGE, "botId"), (MESSAGE, "sessionId"), (MESSAGE, "messageId"),
        (RATE_MESSAGE, "botId"), (RATE_MESSAGE, "sessionId"), (RATE_MESSAGE, "messageId"),
        (TICKET, "botId"), (TICKET, "sessionId"),
        (CREATE_LEAD, "botId"), (CREATE_LEAD, "sessionId"),
        (MESSAGE, "eventId"),
    ],
)
@pytest.mark.parametrize("value", ["not-a-uuid", "6434515b-8541-4861-bb24-8acd6e77e8c"])
def test_non_uuid_id_is_refused(example: dict[str, Any], field: str, value: str) -> None:
    exc = _refused(_with(example, **{field: value}))
    assert exc.field == field
    assert exc.value == value
    assert repr(field) in str(exc)
    assert value in str(exc)
    assert "UUID" in str(exc)


@pytest.mark.parametrize(
    ("example", "field"),
    [(ex, name) for ex in EXAMPLES.values() for name in ex if name != "event"],
)
def test_missing_field_is_refused(example: dict[str, Any], field: str) -> None:
    exc = _refused(_without(example, field))
    assert exc.field == field
    assert repr(field) in str(exc)
    assert "missing" in str(exc)
    assert example["event"] in str(exc)


def test_missing_event_is_refused() -> None:
    exc = _refused(_without(MESSAGE, "event"))
    assert exc.field == "event"
    assert "'event'" in str(exc)
    assert "missing" in str(exc)
    for t in EventType:
        assert t.value in str(exc)


@pytest.mark.parametrize("kind", ["FOO", "message", "", 1, None])
def test_unknown_event_type_is_refused(kind: object) -> None:
    exc = _refused(_with(MESSAGE, event=kind))
    assert exc.field == "event"
    assert "'event'" in str(exc)
    assert json.dumps(kind) in str(exc)
    assert "unknown event type" in str(exc)


@pytest.mark.parametrize(
    ("example", "field", "value", "shown"),
    [
        (RATE_MESSAGE, "rating", "5", '"5"'),
        (RATE_MESSAGE, "rating", True, "true"),
        (RATE_MESSAGE, "rating", False, "false"),
        (RATE_MESSAGE, "rating", None, "null"),
        (MESSAGE, "message", 5, "5"),
        (MESSAGE, "role", ["USER"], '["USER"]'),
        (TICKET, "customerEmail", {"a": 1}, '{"a": 1}'),
        (CREATE_LEAD, "userId", 42, "42"),
        (MESSAGE, "botId", 7, "7"),
    ],
)
def test_wrong_type_is_refused(
    example: dict[str, Any], field: str, value: object, shown: str
) -> None:
    exc = _refused(_with(example, **{field: value}))
    assert exc.field == field
    assert exc.value == value
    assert repr(field) in str(exc)
    assert f"(got {shown})" in str(exc)


@pytest.mark.parametrize("rating", [math.nan, math.inf, -math.inf])
def test_non_finite_rating_is_refused(rating: float) -> None:
    exc = _refused(_with(RATE_MESSAGE, rating=rating))
    assert exc.field == "rating"
    assert "'rating'" in str(exc)
    assert "finite" in str(exc)
    assert json.dumps(rating) in str(exc)  # NaN, Infinity, -Infinity


@pytest.mark.parametrize("rating", [2**31, -(2**31) - 1])
def test_out_of_range_integer_rating_is_refused(rating: int) -> None:
    exc = _refused(_with(RATE_MESSAGE, rating=rating))
    assert exc.field == "rating"
    assert str(rating) in str(exc)


@pytest.mark.parametrize("rating", [0, -1, 5, 2**31 - 1, -(2**31), 0.5, -3.25, 1e300])
def test_finite_numeric_ratings_are_accepted(rating: float) -> None:
    assert parse_event(_with(RATE_MESSAGE, rating=rating)).body["rating"] == rating


@pytest.mark.parametrize("example", list(EXAMPLES.values()), ids=[t.value for t in EXAMPLES])
def test_undocumented_extra_field_is_refused(example: dict[str, Any]) -> None:
    exc = _refused(_with(example, extra="surprise"))
    assert exc.field == "extra"
    assert "'extra'" in str(exc)
    assert '"surprise"' in str(exc)
    assert "not a documented field" in str(exc)


def test_field_of_another_event_type_is_refused() -> None:
    exc = _refused(_with(MESSAGE, rating=1))
    assert exc.field == "rating"


@pytest.mark.parametrize(
    ("data", "kind"),
    [(["MESSAGE", 1], "an array"), ([], "an array"), ("MESSAGE", "a string"), (None, "null"),
     (3, "a number"), (True, "a boolean")],
)
def test_non_object_input_is_refused(data: object, kind: str) -> None:
    exc = _refused(data)
    assert exc.field is None
    assert f"must be a JSON object, not {kind}" in str(exc)
    assert f"(got {json.dumps(data)})" in str(exc)


def test_array_of_events_is_refused_with_a_shortened_value() -> None:
    exc = _refused([MESSAGE])
    assert "not an array" in str(exc)
    assert '(got [{"event": "MESSAGE"' in str(exc)
    assert len(str(exc)) < 200


@pytest.mark.parametrize(
    ("example", "field"),
    [(MESSAGE, "message"), (MESSAGE, "role"), (TICKET, "customerName"),
     (TICKET, "customerMessage"), (CREATE_LEAD, "userId"), (CREATE_LEAD, "intent")],
)
@pytest.mark.parametrize("char", ["\ud800", "\udfff", "\udbff"])
def test_a_lone_surrogate_in_text_is_refused_for_what_it_is(
    example: dict[str, Any], field: str, char: str
) -> None:
    value = f"ab{char}cd"
    exc = _refused(_with(example, **{field: value}))
    assert exc.field == field
    assert exc.value == value
    assert repr(field) in str(exc)
    assert f"lone surrogate U+{ord(char):04X} at index 2" in str(exc)
    assert "not a Unicode character" in str(exc) and "control" not in str(exc)


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x07", "\x0b", "\x0c", "\x1b", "\x7f", "\x9f",
                                  "\ufffe", "\U0010ffff"])
def test_every_unicode_scalar_value_is_accepted_and_json_escapes_controls(char: str) -> None:
    """Fault: a pasted vertical tab or U+0001 in chat text was refused at publish, with a
    message calling it an "unpaired surrogate". JSON escapes control characters, so the
    receiver still gets valid JSON."""
    text = f"pasted{char}text"
    event = parse_event(_with(MESSAGE, message=text))
    body = event.json_body()
    assert json.loads(body)["message"] == text
    if ord(char) < 0x20:
        assert char.encode() not in body  # escaped: \\f, \\u0001, …
    decoded = Event.from_record(codec_roundtrip(event))
    assert decoded.body["message"] == text


def codec_roundtrip(event: Event) -> dict[str, Any]:
    codec = Codec()
    return codec.decode(codec.encode(event.schema_name, event.to_record(), topic="x"))[1]


@pytest.mark.parametrize("text", ["line one\nline two", "a\tb", "a\r\nb", "\u2028\x85é☃😀"])
def test_newline_tab_and_other_text_are_allowed(text: str) -> None:
    event = parse_event(_with(MESSAGE, message=text))
    assert event.body["message"] == text
    assert json.loads(event.json_body())["message"] == text


def test_overlong_text_is_refused_without_echoing_it() -> None:
    exc = _refused(_with(MESSAGE, message="x" * 1_000_001))
    assert exc.field == "message"
    assert "1000001 characters" in str(exc)
    assert len(str(exc)) < 300


def test_long_values_are_shortened_in_the_message() -> None:
    exc = _refused(_with(MESSAGE, botId="z" * 500))
    assert exc.field == "botId"
    assert "zzzz" in str(exc)
    assert "..." in str(exc)
    assert len(str(exc)) < 300


def test_validate_fields_returns_the_type_and_accepts_metadata() -> None:
    for event_type, example in EXAMPLES.items():
        assert validate_fields(example) is event_type
        assert validate_fields(_with(example, eventId=EVENT_ID, occurredAt=1)) is event_type


def test_invalid_event_is_a_value_error() -> None:
    assert issubclass(InvalidEvent, ValueError)
