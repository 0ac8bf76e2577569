"""Round trips of every record type through gateway.codec.Codec, in both wire formats,
and the errors the decoder gives for bytes it cannot read."""

from __future__ import annotations

import io
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.codec import SINGLE_OBJECT_MAGIC, Codec, SchemaSet, schema_dir
from gateway.errors import DecodeError, EncodeError, RegistryUnavailable
from gateway.events import Event, EventType, parse_event
from gateway.records import (
    DEAD_LETTER_SCHEMA,
    DELIVERY_SCHEMA,
    ENDPOINT_SCHEMA,
    Attempt,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    Endpoint,
    Outcome,
)
from tests.schema_registry import SchemaRegistry

TOPIC = "test.events"

# One codec per wire format for the whole module: the mock registry lives in its client.
SINGLE = Codec()
CONFLUENT = Codec("mock://test")
CODECS = {"single-object": SINGLE, "confluent": CONFLUENT}
wire_formats = pytest.mark.parametrize("wire", list(CODECS))

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- strategies --------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
MILLIS = st.integers(0, 2**63 - 1)
uuids = st.uuids().map(str)
# Event text fields refuse C0 controls other than tab/newline/CR, DEL and lone surrogates.
_REFUSED = "".join(chr(c) for c in [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
event_text = st.text(st.characters(codec="utf-8", exclude_characters=_REFUSED), max_size=40)
# Any string Avro can carry (st.text() leaves out surrogates, which UTF-8 cannot encode).
any_text = st.text(max_size=40)
ratings = st.one_of(INT32, st.floats(allow_nan=False, allow_infinity=False))


def _event(data: dict[str, Any]) -> Event:
    return parse_event(data)


events = st.one_of(
    st.fixed_dictionaries({
        "event": st.just("MESSAGE"), "botId": uuids, "sessionId": uuids, "role": event_text,
        "message": event_text, "messageId": uuids, "eventId": uuids, "occurredAt": MILLIS,
    }),
    st.fixed_dictionaries({
        "event": st.just("RATE_MESSAGE"), "botId": uuids, "sessionId": uuids,
        "rating": ratings, "messageId": uuids, "eventId": uuids, "occurredAt": MILLIS,
    }),
    st.fixed_dictionaries({
        "event": st.just("TICKET"), "customerName": event_text, "customerEmail": event_text,
        "customerMessage": event_text, "botId": uuids, "sessionId": uuids,
        "eventId": uuids, "occurredAt": MILLIS,
    }),
    st.fixed_dictionaries({
        "event": st.just("CREATE_LEAD"), "userId": event_text, "email": event_text,
        "intent": event_text, "name": event_text, "botId": uuids, "sessionId": uuids,
        "eventId": uuids, "occurredAt": MILLIS,
    }),
).map(_event)

endpoints = st.builds(
    Endpoint,
    id=uuids,
    bot_id=uuids,
    url=any_text,
    secret=any_text,
    created_at=INT64,
    updated_at=INT64,
    event_types=st.lists(any_text, max_size=4).map(tuple),
    enabled=st.booleans(),
    description=st.none() | any_text,
    previous_secret=st.none() | any_text,
    previous_secret_expires_at=st.none() | INT64,
)

attempts = st.builds(
    Attempt,
    at=INT64,
    tier=any_text,
    duration_ms=st.floats(allow_nan=False),  # NaN != NaN; infinities are fine
    status=st.none() | INT32,
    error=st.none() | any_text,
    response_snippet=st.none() | any_text,
)

deliveries = st.builds(
    Delivery,
    event_id=uuids,
    event_type=st.sampled_from([t.value for t in EventType]) | any_text,
    bot_id=uuids,
    session_id=uuids,
    occurred_at=INT64,
    payload=any_text,
    endpoint_id=uuids,
    attempt=INT32,
    due_at=INT64,
    attempts=st.lists(attempts, max_size=4).map(tuple),
    replay_of=st.none() | any_text,
)

dead_letters = st.builds(
    DeadLetter,
    reason=st.sampled_from(list(DeadLetterReason)),
    detail=any_text,
    dead_at=INT64,
    source_topic=any_text,
    source_partition=INT32,
    source_offset=INT64,
    original_key=st.none() | st.binary(max_size=40),
    original_value=st.none() | st.binary(max_size=80),
    delivery=st.none() | deliveries,
)

# (schema name, record dict) of any of the seven record types.
records = st.one_of(
    events.map(lambda e: (e.schema_name, e.to_record())),
    endpoints.map(lambda e: (ENDPOINT_SCHEMA, e.to_record())),
    deliveries.map(lambda d: (DELIVERY_SCHEMA, d.to_record())),
    dead_letters.map(lambda d: (DEAD_LETTER_SCHEMA, d.to_record())),
)


def _check_framing(wire: str, data: bytes, schema_name: str) -> None:
    if wire == "single-object":
        assert data[:2] == b"\xc3\x01"
        assert data[2:10] == SINGLE.schemas[schema_name].fingerprint
    else:
        assert data[0] == 0
        assert len(data) >= 5


def _round_trip(wire: str, schema_name: str, record: dict[str, Any]) -> dict[str, Any]:
    codec = CODECS[wire]
    data = codec.encode(schema_name, record, topic=TOPIC)
    _check_framing(wire, data, schema_name)
    name, decoded = codec.decode(data)
    assert name == schema_name
    return decoded


# --- round trips ---------------------------------------------------------------------------

@wire_formats
@PROPERTY
@given(event=events)
def test_event_round_trip(wire: str, event: Event) -> None:
    decoded = _round_trip(wire, event.schema_name, event.to_record())
    assert decoded == event.to_record()
    back = Event.from_record(decoded)
    assert back == event
    assert list(back.body) == list(event.body)
    # byte-identical JSON: an int rating stays an int (1, not 1.0) and vice versa
    assert back.json_body() == event.json_body()


@wire_formats
@PROPERTY
@given(rating=ratings)
def test_rating_keeps_its_type(wire: str, rating: float) -> None:
    event = parse_event({
        "event": "RATE_MESSAGE", "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
        "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b", "rating": rating,
        "messageId": "ad2deddc-6f36-4af7-8b2f-3ddeab122b64",
    })
    decoded = _round_trip(wire, event.schema_name, event.to_record())
    assert type(decoded["rating"]) is type(rating)
    assert decoded["rating"] == rating


@wire_formats
@PROPERTY
@given(endpoint=endpoints)
def test_endpoint_round_trip(wire: str, endpoint: Endpoint) -> None:
    decoded = _round_trip(wire, ENDPOINT_SCHEMA, endpoint.to_record())
    assert decoded == endpoint.to_record()
    assert Endpoint.from_record(decoded) == endpoint


@wire_formats
@PROPERTY
@given(delivery=deliveries)
def test_delivery_round_trip(wire: str, delivery: Delivery) -> None:
    decoded = _round_trip(wire, DELIVERY_SCHEMA, delivery.to_record())
    assert decoded == delivery.to_record()
    back = Delivery.from_record(decoded)
    assert back == delivery
    assert back.attempts == delivery.attempts


@wire_formats
@PROPERTY
@given(dead=dead_letters)
def test_dead_letter_round_trip(wire: str, dead: DeadLetter) -> None:
    decoded = _round_trip(wire, DEAD_LETTER_SCHEMA, dead.to_record())
    assert decoded == dead.to_record()
    assert DeadLetter.from_record(decoded) == dead


@wire_formats
@PROPERTY
@given(dead=dead_letters, reason=any_text.filter(lambda text: text not in {r.value for r in DeadLetterReason}))
def test_a_dead_letter_reason_this_gateway_does_not_know_reads_as_unknown(
    wire: str, dead: DeadLetter, reason: str
) -> None:
    """Written by a newer gateway: read, never refused; the reason is UNKNOWN."""
    decoded = _round_trip(wire, DEAD_LETTER_SCHEMA, dead.to_record() | {"reason": reason})
    assert DeadLetter.from_record(decoded).reason is DeadLetterReason.UNKNOWN


@wire_formats
@PROPERTY
@given(
    delivery=deliveries,
    key=st.binary(max_size=40),
    value=st.binary(min_size=1, max_size=200),
)
def test_dead_letter_with_delivery_and_original_bytes(
    wire: str, delivery: Delivery, key: bytes, value: bytes
) -> None:
    dead = DeadLetter(
        reason=DeadLetterReason.RETRIES_EXHAUSTED, detail="HTTP 503", dead_at=1,
        source_topic="x.retry-15m", source_partition=2, source_offset=99,
        original_key=key, original_value=value, delivery=delivery,
    )
    decoded = _round_trip(wire, DEAD_LETTER_SCHEMA, dead.to_record())
    back = DeadLetter.from_record(decoded)
    assert back == dead
    assert back.delivery == delivery
    assert back.original_value == value and back.original_key == key


@wire_formats
def test_dead_letter_without_delivery(wire: str) -> None:
    dead = DeadLetter(
        reason=DeadLetterReason.UNDECODABLE, detail="unknown framing", dead_at=5,
        source_topic="x.events", source_partition=0, source_offset=0,
        original_key=None, original_value=b"\xff\x00garbage", delivery=None,
    )
    decoded = _round_trip(wire, DEAD_LETTER_SCHEMA, dead.to_record())
    assert decoded["delivery"] is None
    assert DeadLetter.from_record(decoded) == dead


replays = st.fixed_dictionaries({
    "deadLetter": any_text, "replayId": uuids, "replayedAt": INT64, "eventId": uuids,
    "endpointId": uuids,
})


@wire_formats
@PROPERTY
@given(record=replays)
def test_replay_round_trip(wire: str, record: dict[str, Any]) -> None:
    # gateway.Replay is being added alongside these tests; it has no dataclass (yet)
    if "gateway.Replay" not in SchemaSet.ORDER:
        pytest.skip("no gateway.Replay schema in this checkout")
    assert _round_trip(wire, "gateway.Replay", record) == record


def test_confluent_codec_also_reads_single_object_encoding() -> None:
    endpoint = Endpoint("e", "b", "https://x", "whsec_x", 1, 2)
    data = SINGLE.encode(ENDPOINT_SCHEMA, endpoint.to_record(), topic=TOPIC)
    name, decoded = CONFLUENT.decode(data)
    assert name == ENDPOINT_SCHEMA
    assert Endpoint.from_record(decoded) == endpoint


def test_confluent_framing_carries_a_registered_schema_id() -> None:
    data = CONFLUENT.encode(ENDPOINT_SCHEMA, Endpoint("e", "b", "u", "s", 1, 2).to_record(),
                            topic=TOPIC)
    (schema_id,) = struct.unpack(">I", data[1:5])
    registered = CONFLUENT._registry.get_schema(schema_id)
    assert json.loads(registered.schema_str)["name"] == "Endpoint"


def test_codec_reports_whether_it_uses_a_registry() -> None:
    assert not SINGLE.uses_registry
    assert CONFLUENT.uses_registry


# --- fingerprints ------------------------------------------------------------------------

_EMPTY = 0xC15D213AA4D7A795
_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY & -(_fp & 1))
    _TABLE.append(_fp)


def _crc64_avro(data: bytes) -> bytes:
    """CRC-64-AVRO as the Avro specification gives it, as 8 little-endian bytes."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def _self_contained(name: str, defined: set[str] | None = None) -> Any:
    """The bundled schema ``name`` as standalone JSON: every reference to another bundled
    record replaced by its definition at first use, as the Avro specification requires of
    a schema that is parsed (and fingerprinted) on its own."""
    defined = set() if defined is None else defined
    defined.add(name)
    raw = json.loads((schema_dir() / f"{name}.avsc").read_text())

    def walk(node: Any) -> Any:
        if isinstance(node, str) and node in SchemaSet.ORDER and node not in defined:
            return _self_contained(node, defined)
        if isinstance(node, list):
            return [walk(item) for item in node]
        if isinstance(node, dict):
            return {k: walk(v) if k in ("type", "fields", "items") else v for k, v in node.items()}
        return node

    return walk(raw)


def _canonical_form(name: str) -> str:
    # parsed without any named schemas: it fails unless the JSON really is self-contained
    return to_parsing_canonical_form(parse_schema(_self_contained(name)))


def test_every_bundled_schema_is_in_the_set() -> None:
    names = {p.name.removesuffix(".avsc") for p in schema_dir().glob("*.avsc")}
    history = list((schema_dir() / "history").glob("*.avsc"))
    assert names == set(SchemaSet.ORDER) == set(SINGLE.schemas.by_name)
    assert len(SINGLE.schemas.by_fingerprint) == len(names) + len(history)


# Every schema fingerprint a released gateway ever wrote in single-object encoding. A
# record carries nothing else to name its schema, so each must stay readable: a change to
# a schema adds its new fingerprint here and leaves the old version in avro/history/.
RELEASED_FINGERPRINTS = {
    "gateway.events.Message": {"6f85d86184496e35"},
    "gateway.events.RateMessage": {"93a1bbf4f1c6639e"},
    "gateway.events.Ticket": {"77c64bd5b7263dd9"},
    "gateway.events.CreateLead": {"3c4ab18d337d2316"},
    "gateway.Endpoint": {"6221d69c4ded9302", "8c977b8d333170b5"},
    "gateway.Delivery": {"98b5dfd68bc3f4fe", "4483c45f18b3837d"},
    "gateway.DeadLetter": {"bdcf587a602151ee", "f7d8698a9c98fecc"},
    "gateway.Replay": {"117ddb6992e7be67"},
    "gateway.DeliveryAttempt": {"03eb4fa25de59e94"},
    "gateway.Circuit": {"1c49b12204e730ac"},
}


def test_every_released_schema_version_stays_readable() -> None:
    current = {name: SINGLE.schemas[name].fingerprint.hex() for name in SchemaSet.ORDER}
    for name, printed in current.items():
        assert printed in RELEASED_FINGERPRINTS[name], (
            f"{name} changed (now {printed}): put its previous version in avro/history/ and add "
            "the new fingerprint to RELEASED_FINGERPRINTS")
    readable = {(s.name, p.hex()) for p, s in SINGLE.schemas.by_fingerprint.items()}
    for name, prints in RELEASED_FINGERPRINTS.items():
        for printed in prints:
            assert (name, printed) in readable, f"{name} {printed} was released and can no longer be read"


DATA = Path(__file__).parent / "data"


def test_a_delivery_written_before_outcomes_reads_with_them_derived() -> None:
    # Bytes written by the gateway as it was before attempts stored their outcome.
    name, record = SINGLE.decode((DATA / "delivery-before-outcomes.avro").read_bytes())
    assert name == DELIVERY_SCHEMA
    delivery = Delivery.from_record(record)
    assert [a.outcome for a in delivery.attempts] == [
        Outcome.HTTP_ERROR, Outcome.TIMEOUT, Outcome.BLOCKED, Outcome.CONNECTION_ERROR]
    assert [a.status for a in delivery.attempts] == [503, None, None, None]
    assert delivery.attempts[0].response_snippet == "busy"
    # and it is written again with the outcomes stored
    again = Delivery.from_record(SINGLE.decode(SINGLE.encode(DELIVERY_SCHEMA, delivery.to_record(),
                                                            topic=TOPIC))[1])
    assert again == delivery


def test_a_dead_letter_written_before_outcomes_reads() -> None:
    name, record = SINGLE.decode((DATA / "dead-letter-before-outcomes.avro").read_bytes())
    assert name == DEAD_LETTER_SCHEMA
    dead = DeadLetter.from_record(record)
    assert dead.reason == "retries_exhausted" and dead.delivery is not None
    assert dead.delivery.attempts[-1].outcome is Outcome.CONNECTION_ERROR


def test_an_endpoint_written_before_limits_reads_without_them() -> None:
    name, record = SINGLE.decode((DATA / "endpoint-before-limits.avro").read_bytes())
    endpoint = Endpoint.from_record(record)
    assert name == ENDPOINT_SCHEMA and endpoint.url == "https://hooks.example.com/in"
    assert (endpoint.rate_limit, endpoint.max_in_flight) == (None, None)
    assert endpoint.event_types == ("TICKET",) and endpoint.description == "crm"


def test_an_outcome_this_gateway_does_not_know_reads_as_unknown() -> None:
    # A newer gateway may add outcomes; the enum's default makes them readable here.
    raw = json.loads(SINGLE.schemas[DELIVERY_SCHEMA].full)
    outcome = raw["fields"][9]["type"]["items"]["fields"][3]
    assert outcome["name"] == "outcome"
    outcome["type"][1]["symbols"].append("from_the_future")
    newer = parse_schema(raw)
    record = _SAMPLE_DELIVERY.to_record()
    record["attempts"][0]["outcome"] = "from_the_future"
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, newer, record)
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, newer, SINGLE.schemas[DELIVERY_SCHEMA].parsed)
    assert isinstance(read, dict)
    assert Delivery.from_record(read).attempts[0].outcome is Outcome.UNKNOWN


@pytest.mark.parametrize("name", SchemaSet.ORDER)
def test_fastavro_fingerprint_is_the_specified_crc64_avro(name: str) -> None:
    canonical = _canonical_form(name)
    assert bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")) == _crc64_avro(canonical.encode())


@pytest.mark.parametrize("name", SchemaSet.ORDER)
def test_single_object_fingerprint_is_crc64_avro_of_canonical_form(name: str) -> None:
    """Fails for gateway.DeadLetter: SchemaSet takes the canonical form of the schema parsed
    against the other bundled schemas, which leaves ``"gateway.Delivery"`` as a bare name
    instead of inlining Delivery's definition (codec.py lines 91-92)."""
    canonical = _canonical_form(name)
    expected = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    schema = SINGLE.schemas[name]
    assert schema.canonical == canonical
    assert schema.fingerprint == expected
    if name in _SAMPLES:
        data = SINGLE.encode(name, _SAMPLES[name], topic=TOPIC)
        assert data[2:10] == expected


def test_canonical_forms_are_self_contained() -> None:
    canonical = _canonical_form(DEAD_LETTER_SCHEMA)
    assert '"doc"' not in canonical and '"default"' not in canonical
    assert '"name":"gateway.Delivery","type":"record"' in canonical
    assert '"name":"gateway.Attempt","type":"record"' in canonical
    # the registry path registers the same self-contained schema
    assert to_parsing_canonical_form(
        parse_schema(json.loads(SINGLE.schemas[DEAD_LETTER_SCHEMA].full))
    ) == canonical


def test_encoded_bytes_carry_the_fingerprint() -> None:
    canonical = _canonical_form(ENDPOINT_SCHEMA)
    data = SINGLE.encode(ENDPOINT_SCHEMA, _SAMPLES[ENDPOINT_SCHEMA], topic=TOPIC)
    assert data[:2] == SINGLE_OBJECT_MAGIC == b"\xc3\x01"
    assert data[2:10] == _crc64_avro(canonical.encode())


_SAMPLE_DELIVERY = Delivery(
    "0b6f6a52-3c51-4d2e-9a43-5b1b8f1c7e10", "MESSAGE", "b", "s", 1, "{}", "ep", 1, 2,
    (Attempt(1, "events", 12.5, Outcome.HTTP_ERROR, 503),),
)
_SAMPLES: dict[str, dict[str, Any]] = {
    "gateway.events.Message": parse_event({
        "event": "MESSAGE", "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
        "sessionId": "b8e034be-90d8-477d-b919-8fcfcf37dc10", "role": "USER", "message": "hi",
        "messageId": "733b7d55-61ea-450f-b585-27755b015596"}).to_record(),
    "gateway.events.RateMessage": parse_event({
        "event": "RATE_MESSAGE", "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
        "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b", "rating": 1,
        "messageId": "ad2deddc-6f36-4af7-8b2f-3ddeab122b64"}).to_record(),
    "gateway.events.Ticket": parse_event({
        "event": "TICKET", "customerName": "jd", "customerEmail": "test@email.com",
        "customerMessage": "hello", "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
        "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b"}).to_record(),
    "gateway.events.CreateLead": parse_event({
        "event": "CREATE_LEAD", "userId": "u", "email": "e", "intent": "i", "name": "n",
        "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
        "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b"}).to_record(),
    ENDPOINT_SCHEMA: Endpoint("e", "b", "u", "s", 1, 2).to_record(),
    DELIVERY_SCHEMA: _SAMPLE_DELIVERY.to_record(),
    DEAD_LETTER_SCHEMA: DeadLetter(DeadLetterReason.GONE, "HTTP 410", 3, "t", 0, 7,
                                   delivery=_SAMPLE_DELIVERY).to_record(),
}


def test_unknown_schema_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="gateway.Nope"):
        SINGLE.encode("gateway.Nope", {}, topic=TOPIC)


# --- decode errors -----------------------------------------------------------------------

def _endpoint_bytes(wire: str, **changes: Any) -> bytes:
    endpoint = Endpoint("id-1", "bot-1", "https://example.com/hook", "whsec_abc", 1, 2)
    record = {**endpoint.to_record(), **changes}
    return CODECS[wire].encode(ENDPOINT_SCHEMA, record, topic=TOPIC)


@wire_formats
@pytest.mark.parametrize("data", [b"", None])
def test_empty_value_is_a_decode_error(wire: str, data: bytes | None) -> None:
    with pytest.raises(DecodeError, match="empty"):
        CODECS[wire].decode(data)


@wire_formats
@pytest.mark.parametrize(
    "data", [b"\xff", b"{\"event\": \"MESSAGE\"}", b"\xc3\x02" + bytes(20), b"\x00\x00\x01",
             b"\x01\x00\x00\x00\x01abc"],
)
def test_garbage_framing_is_a_decode_error(wire: str, data: bytes) -> None:
    with pytest.raises(DecodeError, match="unknown framing") as info:
        CODECS[wire].decode(data)
    assert "c301" in str(info.value)
    assert data[:4].hex() in str(info.value)


@pytest.mark.parametrize("length", [2, 5, 9])
def test_short_single_object_header_is_a_decode_error(length: int) -> None:
    data = _endpoint_bytes("single-object")[:length]
    with pytest.raises(DecodeError, match="cut short"):
        SINGLE.decode(data)


@wire_formats
def test_unknown_fingerprint_is_a_decode_error(wire: str) -> None:
    body = _endpoint_bytes("single-object")[10:]
    data = SINGLE_OBJECT_MAGIC + bytes.fromhex("0123456789abcdef") + body
    with pytest.raises(DecodeError, match="unknown schema fingerprint 0123456789abcdef"):
        CODECS[wire].decode(data)


def test_confluent_record_without_a_registry_is_a_decode_error() -> None:
    data = _endpoint_bytes("confluent")
    (schema_id,) = struct.unpack(">I", data[1:5])
    with pytest.raises(DecodeError, match="schema registry") as info:
        SINGLE.decode(data)
    assert f"schema id {schema_id}" in str(info.value)
    assert "GATEWAY_SCHEMA_REGISTRY_URL" in str(info.value)


def test_unregistered_schema_id_is_a_decode_error() -> None:
    data = b"\x00" + struct.pack(">I", 987654) + _endpoint_bytes("single-object")[10:]
    with pytest.raises(DecodeError, match="schema id 987654 is not in the registry"):
        CONFLUENT.decode(data)


@wire_formats
@settings(max_examples=50, deadline=None)
@given(item=records, data=st.data())
def test_truncated_body_is_a_decode_error(
    wire: str, item: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    schema_name, record = item
    encoded = CODECS[wire].encode(schema_name, record, topic=TOPIC)
    header = 10 if wire == "single-object" else 5
    cut = data.draw(st.integers(header, len(encoded) - 1), label="cut")
    with pytest.raises(DecodeError) as info:
        CODECS[wire].decode(encoded[:cut])
    assert schema_name in str(info.value)


@wire_formats
def test_every_truncation_of_a_record_is_a_decode_error(wire: str) -> None:
    encoded = _endpoint_bytes(wire, description="né ☃", previousSecret="whsec_old")
    header = 10 if wire == "single-object" else 5
    for cut in range(header, len(encoded)):
        with pytest.raises(DecodeError, match="truncated"):
            CODECS[wire].decode(encoded[:cut])


@wire_formats
def test_truncation_inside_a_varint_says_truncated(wire: str) -> None:
    """Fails: updatedAt, the last field, is a multi-byte varint; cutting its last byte makes
    fastavro raise IndexError, which codec.py (line 248) reports as "corrupt Avro body:
    IndexError: string index out of range" instead of "record is truncated"."""
    encoded = _endpoint_bytes(wire, updatedAt=64)  # zig-zag varint 80 01
    assert encoded[-2:] == b"\x80\x01"
    with pytest.raises(DecodeError, match="truncated"):
        CODECS[wire].decode(encoded[:-1])


@wire_formats
@settings(max_examples=50, deadline=None)
@given(item=records, extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_a_decode_error(
    wire: str, item: tuple[str, dict[str, Any]], extra: bytes
) -> None:
    schema_name, record = item
    encoded = CODECS[wire].encode(schema_name, record, topic=TOPIC)
    with pytest.raises(DecodeError, match=f"{len(extra)} bytes left over") as info:
        CODECS[wire].decode(encoded + extra)
    assert schema_name in str(info.value)


@wire_formats
@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\xc3(", b"\xed\xa0"])
def test_invalid_utf8_in_a_string_is_a_decode_error(wire: str, bad: bytes) -> None:
    encoded = _endpoint_bytes(wire, url="QQ")
    marker = b"\x04QQ"  # zig-zag length 2, then the two bytes
    assert encoded.count(marker) == 1
    corrupt = encoded.replace(marker, b"\x04" + bad)
    with pytest.raises(DecodeError, match="not valid UTF-8") as info:
        CODECS[wire].decode(corrupt)
    assert ENDPOINT_SCHEMA in str(info.value)


@wire_formats
def test_corrupt_union_index_is_a_decode_error(wire: str) -> None:
    # Endpoint's previousSecret is ["null", "string"]: a null is the single byte 0 (index 0)
    endpoint = Endpoint("i", "b", "u", "s", 1, 2)
    encoded = CODECS[wire].encode(ENDPOINT_SCHEMA, endpoint.to_record(), topic=TOPIC)
    body_start = 10 if wire == "single-object" else 5
    index = body_start + 4 * 2  # four one-character strings, each length byte + char
    assert encoded[index] == 0
    corrupt = encoded[:index] + b"\x7e" + encoded[index + 1:]  # union index 63
    with pytest.raises(DecodeError):
        CODECS[wire].decode(corrupt)


@wire_formats
def test_record_that_does_not_fit_its_schema_is_an_encode_error(wire: str) -> None:
    record = Endpoint("i", "b", "u", "s", 1, 2).to_record()
    with pytest.raises(EncodeError, match=ENDPOINT_SCHEMA):
        CODECS[wire].encode(ENDPOINT_SCHEMA, {**record, "createdAt": "yesterday"}, topic=TOPIC)
    with pytest.raises(EncodeError, match=ENDPOINT_SCHEMA):
        CODECS[wire].encode(ENDPOINT_SCHEMA, {k: v for k, v in record.items() if k != "url"},
                            topic=TOPIC)


@wire_formats
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_out_of_range_long_is_an_encode_error(wire: str, value: int) -> None:
    """Fails for single-object: fastavro raises OverflowError (an ArithmeticError, not a
    ValueError), which Codec.encode (codec.py line 162) does not turn into EncodeError."""
    record = Endpoint("i", "b", "u", "s", 1, 2).to_record()
    with pytest.raises(EncodeError, match=ENDPOINT_SCHEMA):
        CODECS[wire].encode(ENDPOINT_SCHEMA, {**record, "createdAt": value}, topic=TOPIC)


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


# --- a registry that hangs after the start -----------------------------------------------


def test_schemas_registered_at_start_encode_while_the_registry_hangs() -> None:
    """A worker registers its schemas before it starts: a later registry hang cannot
    hold up a retry, a dead letter or a history record on the event loop."""
    with SchemaRegistry() as registry:
        codec = Codec(registry.url)
        codec.register_schemas()
        assert set(registry.subjects) >= {s.name for s in codec.schemas.by_name.values()}
        registry.hang()
        try:
            with ThreadPoolExecutor(1) as pool:
                encoded = pool.submit(codec.encode, ENDPOINT_SCHEMA, Endpoint("e", "b", "u", "s", 1, 2).to_record(),
                                      topic=TOPIC)
                data = encoded.result(timeout=10)  # without the registration: a hang
            assert data[0] == 0
        finally:
            registry.answer()
            codec.close()


def test_registering_with_a_registry_that_is_away_is_registry_unavailable() -> None:
    with SchemaRegistry() as registry:
        url = registry.url
    codec = Codec(url)  # nothing listens there any more
    try:
        with pytest.raises(RegistryUnavailable, match="did not answer"):
            codec.register_schemas()
    finally:
        codec.close()
