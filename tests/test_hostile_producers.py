"""Hostile producers: whatever bytes land on the gateway's topics, a worker dead-letters
them with a precise reason and moves on. It never raises, never crashes, never stops a
partition.

``Dispatcher.prepare`` runs on the poll path (inside the event loop's ``_accept``): an
exception escaping it would drop the rest of the batch and leave offsets that never
settle, so the fuzz test below holds it to "an Event, a Delivery or a BadRecord, always".
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.codec import Codec
from gateway.config import Config
from gateway.delivery import BadRecord, Dispatcher, Job, Pending
from gateway.errors import DecodeError
from gateway.events import SCHEMA_NAMES, Event, EventType, parse_event
from gateway.observability import Metrics
from gateway.ops import new_endpoint
from gateway.records import (
    DEAD_LETTER_SCHEMA,
    DELIVERY_SCHEMA,
    ENDPOINT_SCHEMA,
    Attempt,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    Outcome,
)
from gateway.store import EndpointTable, Topics, save_endpoint

from .conftest import read_topic
from .receiver import Receiver

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
MESSAGE_SCHEMA = SCHEMA_NAMES[EventType.MESSAGE]


def documented() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def event_record(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The Avro record of a documented event, with fields changed (no validation)."""
    return {**parse_event(doc).to_record(), **changes}


@dataclass
class Msg:
    """What ``prepare`` reads of a confluent_kafka Message."""

    _value: bytes | None
    _key: bytes | None = b"key"
    _topic: str = "hostile.events"
    _partition: int = 0
    _offset: int = 0

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


# --- (a) fuzzing prepare -----------------------------------------------------------------

# The mock registry lives in its client: one codec encodes and decodes the Confluent side.
SINGLE = Codec()
CONFLUENT = Codec("mock://hostile-producers")
FUZZ_CONFIG = Config(topic_prefix="hostile", max_record_bytes=4096)
TIERS = Topics.from_config(FUZZ_CONFIG).tiers


def dispatcher(codec: Codec, config: Config = FUZZ_CONFIG) -> Dispatcher:
    # prepare() touches neither the sender nor the producer.
    return Dispatcher(config, codec=codec, endpoints=EndpointTable(), sender=None,  # type: ignore[arg-type]
                      metrics=Metrics([t.name for t in Topics.from_config(config).tiers]),
                      producer=None)  # type: ignore[arg-type]


DISPATCHERS = {"single-object": dispatcher(SINGLE), "confluent": dispatcher(CONFLUENT)}


def _delivery(doc: dict[str, Any]) -> Delivery:
    event = parse_event(doc)
    base = Delivery(
        event_id=event.event_id, event_type=event.type.value, bot_id=event.bot_id,
        session_id=event.session_id, occurred_at=event.occurred_at,
        payload=event.json_body().decode(), endpoint_id=str(uuid.uuid4()), attempt=0,
        due_at=event.occurred_at,
    )
    failed = Attempt(at=event.occurred_at, tier="events", duration_ms=12.5, outcome=Outcome.HTTP_ERROR, status=503,
                     response_snippet="busy ☃")
    return base.after(failed, due_at=event.occurred_at + 1000)


def _seeds(codec: Codec) -> list[bytes]:
    """Real encoded records of every kind, in this codec's wire format."""
    docs = documented()
    seeds = [codec.encode(SCHEMA_NAMES[EventType(d["event"])], event_record(d), topic="hostile.events")
             for d in docs]
    seeds.append(codec.encode(MESSAGE_SCHEMA, event_record(docs[0], message="né ☃ " * 20),
                              topic="hostile.events"))
    seeds += [codec.encode(DELIVERY_SCHEMA, _delivery(d).to_record(), topic="hostile.retry-1m")
              for d in docs[:2]]
    endpoint = new_endpoint(bot_id=BOT, url="https://example.com/hook")
    seeds.append(codec.encode(ENDPOINT_SCHEMA, endpoint.to_record(), topic="hostile.endpoints"))
    dead = DeadLetter(reason=DeadLetterReason.INVALID, detail="x", dead_at=1, source_topic="t", source_partition=0,
                      source_offset=1, original_key=b"k", original_value=b"\xc3\x01\x00",
                      delivery=_delivery(docs[1]))
    seeds.append(codec.encode(DEAD_LETTER_SCHEMA, dead.to_record(), topic="hostile.dlq"))
    return seeds


SEEDS = {"single-object": _seeds(SINGLE), "confluent": _seeds(CONFLUENT)}

# A mutation: (kind, position as a fraction of the length, a byte, a length).
mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]),
        st.floats(0, 1, exclude_max=True),
        st.integers(0, 255),
        st.integers(1, 16),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, float, int, int]]) -> bytes:
    for kind, where, byte, length in steps:
        i = int(where * len(data)) if data else 0
        if kind == "flip" and data:
            data = data[:i] + bytes([data[i] ^ (byte or 1)]) + data[i + 1:]
        elif kind == "set" and data:
            data = data[:i] + bytes([byte]) + data[i + 1:]
        elif kind == "insert":
            data = data[:i] + bytes([byte]) * length + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + length:]
        elif kind == "truncate":
            data = data[:i]
        elif kind == "duplicate":
            data = data[:i] + data[i:i + length] * 2 + data[i + length:]
    return data


hostile_values = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=64).map(lambda b: b"\xc3\x01" + b),  # the single-object magic, then junk
    st.binary(max_size=64).map(lambda b: b"\x00" + b),      # the Confluent magic, then junk
    st.binary(min_size=4097, max_size=5000),                 # over max_record_bytes
    st.sampled_from(list(SEEDS)).flatmap(
        lambda wire: st.tuples(st.just(wire), st.sampled_from(SEEDS[wire]), mutations, st.booleans())
    ).map(lambda t: (t[0], _mutate_record(t[0], t[1], t[2], keep_header=t[3]))),
)


def _mutate_record(wire: str, data: bytes, steps: list[tuple[str, float, int, int]], *,
                   keep_header: bool) -> bytes:
    """Half the time the framing is left intact, so the mutations reach the Avro body."""
    if not keep_header:
        return mutate(data, steps)
    header = 10 if wire == "single-object" else 5
    return data[:header] + mutate(data[header:], steps)


def prepared(target: Dispatcher, tier_index: int, value: bytes | None) -> Job:
    """``prepare`` as the worker completes it: a schema id not seen yet is never asked of
    the registry on the poll path (the record is Pending); the worker fetches it off the
    loop, then decodes the record again."""
    job = target.prepare(TIERS[tier_index], Msg(value))
    if isinstance(job.content, Pending):
        with contextlib.suppress(DecodeError):
            target.codec.fetch_schema(job.content.schema_id)
        job = target.prepare(TIERS[tier_index], Msg(value))
        assert not isinstance(job.content, Pending)
    return job


def _check(job: Job, tier_index: int) -> None:
    assert isinstance(job, Job)
    content = job.content
    if isinstance(content, BadRecord):
        assert content.reason in (DeadLetterReason.UNDECODABLE, DeadLetterReason.INVALID)
        assert isinstance(content.detail, str) and content.detail.strip()
        assert job.due_at == 0
    elif isinstance(content, Event):
        assert tier_index == 0
        body = content.json_body()  # what would be POSTed: must be UTF-8 JSON
        assert json.loads(body.decode("utf-8")) == dict(content.body)
    else:
        assert isinstance(content, Delivery) and tier_index > 0
        content.payload.encode("utf-8")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(item=hostile_values, tier_index=st.sampled_from([0, 1]))
@pytest.mark.timeout(120)  # the time budget of the whole run (typically a few seconds)
def test_prepare_never_raises_and_always_says_what_it_got(
    item: bytes | tuple[str, bytes], tier_index: int
) -> None:
    wire, value = item if isinstance(item, tuple) else ("single-object", item)
    for name, target in DISPATCHERS.items():
        if isinstance(item, tuple) and name != wire:
            continue
        started = time.perf_counter()
        job = target.prepare(TIERS[tier_index], Msg(value))
        elapsed = time.perf_counter() - started
        if isinstance(job.content, Pending):
            assert name == "confluent"
            job = prepared(target, tier_index, value)
        _check(job, tier_index)
        # Cheap enough for the poll path: typically well under a millisecond; the bound
        # catches a decoder that loops on a hostile length, not a slow machine.
        assert elapsed < 2.0, f"prepare took {elapsed:.2f} s on {len(value)} bytes"


@pytest.mark.parametrize("wire", list(SEEDS))
def test_the_unmutated_seeds_are_read_as_what_they_are(wire: str) -> None:
    """The fuzz test's seeds are real records: events read on the events topic,
    deliveries on a retry tier, and everything else refused with the reason."""
    target = DISPATCHERS[wire]
    kinds = []
    for value in SEEDS[wire]:
        on_events, on_retry = (prepared(target, i, value).content for i in (0, 1))
        kinds.append((type(on_events).__name__, type(on_retry).__name__))
        _check(Job(None, on_events, 0), 0)
    assert kinds == [("Event", "BadRecord")] * 5 + [("BadRecord", "Delivery")] * 2 + [
        ("BadRecord", "BadRecord")
    ] * 2


def test_a_retry_of_an_event_under_the_record_limit_is_not_refused_as_too_large() -> None:
    """Fails: ``Dispatcher.prepare`` (gateway/dispatcher.py, the size check at its top)
    applies GATEWAY_MAX_RECORD_BYTES, documented as the "largest event record accepted",
    to every tier. The delivery record the gateway itself writes for a failed event is
    always larger than the event record (the JSON payload repeats the field names, plus
    ids, the attempt log and its snippets), so an event accepted on the events topic
    whose first attempt fails is then refused on the retry tier: dead-lettered as
    ``invalid`` ("record of N bytes is larger than the limit") as a raw record with no
    delivery, which `dlq replay` refuses, instead of being retried."""
    limit = 2000
    config = FUZZ_CONFIG.replace(max_record_bytes=limit)
    target = dispatcher(SINGLE, config)
    doc = dict(documented()[0], message="m" * 1700)
    value = SINGLE.encode(MESSAGE_SCHEMA, event_record(doc), topic="hostile.events")
    assert len(value) <= limit
    event = target.prepare(TIERS[0], Msg(value)).content
    assert isinstance(event, Event)  # accepted on the events topic

    delivery = _delivery(doc)  # what the dispatcher forwards after a failed attempt
    forwarded = SINGLE.encode(DELIVERY_SCHEMA, delivery.to_record(), topic=TIERS[1].topic)
    retried = target.prepare(TIERS[1], Msg(forwarded)).content
    assert isinstance(retried, Delivery), f"{len(forwarded)} bytes: {retried}"


# --- (b) a real worker, one partition of hostile records ---------------------------------

LIMIT = 2000


def _hostile_records(codec: Codec, session: str) -> list[tuple[str, bytes | None, str, str]]:
    """(label, value, reason, detail fragments separated by |) in the order produced."""
    doc = dict(documented()[0], sessionId=session)
    valid = codec.encode(MESSAGE_SCHEMA, event_record(doc), topic="x")
    oversized = codec.encode(MESSAGE_SCHEMA, event_record(doc, message="x" * 3000), topic="x")
    truncated = valid[:10 + 20]  # the header, then a cut in the middle of botId
    wrong_fingerprint = b"\xc3\x01" + bytes.fromhex("abababababababab") + valid[10:]
    marked = codec.encode(MESSAGE_SCHEMA, event_record(doc, message="QQQQ"), topic="x")
    assert marked.count(b"QQQQ") == 1
    not_utf8 = marked.replace(b"QQQQ", b"\xff\xfe\xc3(")  # same length: the Avro prefix holds
    delivery = codec.encode(DELIVERY_SCHEMA, _delivery(doc).to_record(), topic="x")

    def bad(**changes: Any) -> bytes:
        return codec.encode(MESSAGE_SCHEMA, event_record(doc, **changes), topic="x")

    return [
        ("oversized", oversized, "invalid",
         f"record of {len(oversized)} bytes is larger than the {LIMIT}-byte limit"
         + "|GATEWAY_MAX_RECORD_BYTES"),
        ("truncated", truncated, "undecodable",
         f"{MESSAGE_SCHEMA}: record is truncated ({len(truncated)} bytes)"),
        ("wrong fingerprint", wrong_fingerprint, "undecodable",
         "unknown schema fingerprint abababababababab"),
        ("unknown event type", bad(event="SIGNUP"), "invalid",
         "field 'event': unknown event type|\"SIGNUP\""),
        ("non-UUID botId", bad(botId="bot-42"), "invalid",
         "field 'botId': is not a UUID|\"bot-42\""),
        ("non-UUID eventId", bad(eventId="evt-1"), "invalid",
         "field 'eventId': is not a UUID|\"evt-1\""),
        ("invalid UTF-8", not_utf8, "undecodable",
         f"{MESSAGE_SCHEMA}: a string is not valid UTF-8 (invalid start byte at byte 0)"),
        ("Confluent framing, no registry", b"\x00\x00\x00\x00\x07" + valid[10:], "undecodable",
         "Confluent-framed record (schema id 7) but no schema registry is configured"),
        ("tombstone", None, "undecodable", "empty value"),
        ("a delivery on the events topic", delivery, "undecodable",
         f"a {DELIVERY_SCHEMA} record on the events topic, not an event"),
    ]


def _committed(config: Config, topic: str, partition: int) -> int:
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers,
                         "group.id": f"{config.consumer_group}.events",
                         "enable.auto.commit": False})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


@pytest.mark.integration
def test_hostile_records_on_one_partition_are_dead_lettered_and_the_partition_moves_on(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    endpoint = new_endpoint(bot_id=BOT, url=receiver.url("/hook"))
    save_endpoint(topics, endpoint)
    # gateway_env (conftest) does not pass max_record_bytes and worker_factory takes no
    # environment: the flag goes on the command line.
    worker = worker_factory(topics, "--max-record-bytes", str(LIMIT))

    session = str(uuid.uuid4())
    codec = Codec()
    hostile = _hostile_records(codec, session)
    # Chat text may hold any character but a lone surrogate: a pasted vertical tab or
    # U+0001 is delivered, escaped by JSON (it used to be refused as "unpaired surrogate").
    text = "pasted\x0bfrom a form \x01 \x1b[31m"
    valid_doc = dict(documented()[0], sessionId=session, eventId=str(uuid.uuid4()), message=text)
    valid = codec.encode(MESSAGE_SCHEMA, parse_event(valid_doc).to_record(), topic="x")

    producer = Producer({"bootstrap.servers": topics.bootstrap_servers, "enable.idempotence": True})
    placed: list[tuple[int, int]] = []

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None, err
        placed.append((msg.partition(), msg.offset()))

    for _, value, _, _ in hostile:
        producer.produce(f"{topics.topic_prefix}.events", key=session.encode(), value=value,
                         on_delivery=on_delivery)
        producer.flush(10)  # one at a time: the offsets follow the list
    producer.produce(f"{topics.topic_prefix}.events", key=session.encode(), value=valid,
                     on_delivery=on_delivery)
    assert producer.flush(10) == 0
    assert len(placed) == len(hostile) + 1
    partition = placed[0][0]
    assert {p for p, _ in placed} == {partition}  # one partition, in this order
    offsets = [o for _, o in placed]
    assert offsets == sorted(offsets)

    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 1, 20, "the valid event after the hostile ones")
    messages = read_topic(topics, f"{topics.topic_prefix}.dlq", expect=len(hostile), timeout=20)
    dead = {d.source_offset: d for d in (DeadLetter.from_record(codec.decode(m.value())[1])
                                          for m in messages)}
    assert len(dead) == len(hostile), sorted(dead)

    for (label, value, reason, fragments), offset in zip(hostile, offsets, strict=False):
        letter = dead[offset]
        assert letter.reason == reason, (label, letter.detail)
        for fragment in fragments.split("|"):
            assert fragment in letter.detail, (label, letter.detail)
        assert letter.original_value == value, label
        assert letter.original_key == session.encode(), label
        assert (letter.source_topic, letter.source_partition) == (
            f"{topics.topic_prefix}.events", partition), label
        assert letter.delivery is None, label

    (request,) = receiver.at("/hook")
    assert request.event_id == valid_doc["eventId"]
    assert request.json == documented()[0] | {"sessionId": session, "message": text}
    assert b"\\u000b" in request.body and b"\x0b" not in request.body  # escaped, valid JSON

    # Nothing crashed and the partition's committed offset moved past every record.
    deadline = time.monotonic() + 10
    while (committed := _committed(topics, f"{topics.topic_prefix}.events", partition)) <= offsets[-1]:
        assert time.monotonic() < deadline, f"committed {committed}, last record {offsets[-1]}"
        time.sleep(0.3)
    assert worker.process.poll() is None, worker.text()
    log = worker.text()
    assert "Traceback" not in log and "record not settled" not in log, log
    assert log.count("record dead-lettered") == len(hostile)
    time.sleep(0.5)
    assert len(receiver.at("/hook")) == 1

