"""Delivery end to end: real broker, real `gateway run` processes, a real HTTP receiver."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from gateway.codec import Codec
from gateway.config import Config
from gateway.events import parse_event
from gateway.ops import new_endpoint
from gateway.publisher import Publisher
from gateway.records import DeadLetter, Delivery, Endpoint, Outcome
from gateway.store import Topics, save_endpoint
from gateway.verify import verify

from .conftest import alive, children_of, read_topic
from .receiver import Receiver

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
OTHER_BOT = "0b0b0b0b-1111-4222-8333-444444444444"


def documented() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def register(config: Config, url: str, *, bot: str = BOT, events: tuple[str, ...] = ()) -> Endpoint:
    endpoint = new_endpoint(bot_id=bot, url=url, event_types=events)
    save_endpoint(config, endpoint)
    return endpoint


def publish(config: Config, events: list[dict[str, Any]]) -> list[str]:
    with Publisher(config) as publisher:
        results = publisher.publish_many([parse_event(e) for e in events])
    assert all(r.ok for r in results)
    return [r.event.event_id for r in results]


def dead_letters(config: Config, expect: int | None = None, timeout: float = 15) -> list[DeadLetter]:
    messages = read_topic(config, f"{config.topic_prefix}.dlq", expect=expect, timeout=timeout)
    codec = Codec()
    return [DeadLetter.from_record(codec.decode(m.value())[1]) for m in messages]


def test_documented_payloads_arrive_exactly_and_signed(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    endpoint = register(topics, receiver.url("/hook"))
    worker_factory(topics)
    ids = publish(topics, documented())
    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 4, 20, "4 deliveries")
    time.sleep(0.5)
    got = {r.event_id: r for r in receiver.at("/hook")}
    assert sorted(got) == sorted(ids) and len(receiver.at("/hook")) == 4
    for event_id, doc in zip(ids, documented(), strict=True):
        request = got[event_id]
        assert request.json == doc
        assert list(request.json) == list(doc)
        assert request.headers["content-type"] == "application/json"
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
        verify(endpoint.secret, request.headers, request.body)  # raises if not authentic


def test_fan_out_follows_bots_and_filters(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    register(topics, receiver.url("/all"))
    register(topics, receiver.url("/tickets"), events=("TICKET",))
    register(topics, receiver.url("/other-bot"), bot=OTHER_BOT)
    worker_factory(topics)
    ids = publish(topics, documented())
    receiver.wait_for(lambda: len(receiver.at("/all")) >= 4 and len(receiver.at("/tickets")) >= 1, 20)
    time.sleep(1.0)
    assert sorted(r.event_id for r in receiver.at("/all")) == sorted(ids)
    assert [r.json["event"] for r in receiver.at("/tickets")] == ["TICKET"]
    assert receiver.at("/other-bot") == []


def test_retry_schedule_then_dead_letter_and_recovery(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    receiver.respond("/down", lambda request, seen: 503)
    receiver.respond("/flaky", lambda request, seen: 500 if seen < 2 else 200)
    down = register(topics, receiver.url("/down"), events=("MESSAGE",))
    flaky = register(topics, receiver.url("/flaky"), events=("MESSAGE",))
    worker_factory(topics)
    (event_id,) = publish(topics, documented()[:1])

    receiver.wait_for(lambda: len(receiver.at("/down")) >= 4, 30, "4 attempts at /down")
    (dead,) = dead_letters(topics, expect=1)
    time.sleep(4)  # anything early or extra would show up by now
    attempts = receiver.at("/down")
    assert len(attempts) == 4
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 1 and gaps[1] >= 2 and gaps[2] >= 3, gaps
    assert {r.event_id for r in attempts} == {event_id}

    assert dead.reason == "retries_exhausted"
    assert dead.delivery is not None
    assert dead.delivery.endpoint_id == down.id and dead.delivery.event_id == event_id
    assert [a.status for a in dead.delivery.attempts] == [503] * 4
    assert [a.tier for a in dead.delivery.attempts] == ["events", "retry-1s", "retry-2s", "retry-3s"]
    assert json.loads(dead.delivery.payload) == documented()[0]
    assert dead_letters(topics) == [dead]  # exactly one

    flaky_attempts = receiver.at("/flaky")
    assert len(flaky_attempts) == 3
    assert all(r.event_id == event_id for r in flaky_attempts)
    assert all(d.delivery is None or d.delivery.endpoint_id != flaky.id for d in dead_letters(topics))


def test_garbage_is_dead_lettered_and_the_partition_moves_on(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    register(topics, receiver.url("/hook"))
    worker_factory(topics)
    session = documented()[0]["sessionId"]
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers})
    # Same key as the valid event: same partition, garbage first.
    producer.produce(f"{topics.topic_prefix}.events", key=session.encode(), value=b"\xc3\x01garbage!")
    producer.flush(10)
    (event_id,) = publish(topics, documented()[:1])
    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 1, 20, "the valid event")
    assert receiver.at("/hook")[0].event_id == event_id
    (dead,) = dead_letters(topics, expect=1)
    assert dead.reason == "undecodable"
    assert dead.original_value == b"\xc3\x01garbage!"
    assert dead.original_key == session.encode()
    assert "single-object" in dead.detail


def test_invalid_record_is_dead_lettered_with_the_field(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    register(topics, receiver.url("/hook"))
    worker_factory(topics)
    record = {**documented()[0], "botId": "not-a-uuid", "eventId": str(uuid.uuid4()), "occurredAt": 1}
    value = Codec().encode("gateway.events.Message", record, topic="x")
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers})
    producer.produce(f"{topics.topic_prefix}.events", key=b"k", value=value)
    producer.flush(10)
    (dead,) = dead_letters(topics, expect=1, timeout=20)
    assert dead.reason == "invalid"
    assert "botId" in dead.detail and "not-a-uuid" in dead.detail
    assert dead.original_value == value


def test_a_new_endpoint_receives_events_within_seconds(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    worker_factory(topics)
    publish(topics, documented()[:1])  # no endpoint yet: counted and skipped
    register(topics, receiver.url("/late"))
    time.sleep(1.0)
    (event_id,) = publish(topics, documented()[1:2])
    receiver.wait_for(lambda: len(receiver.at("/late")) >= 1, 10, "delivery to the new endpoint")
    assert [r.event_id for r in receiver.at("/late")] == [event_id]


def test_sigterm_drains_commits_and_exits_zero(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    register(topics, receiver.url("/hook"))
    worker = worker_factory(topics, "--tiers", "events")
    events = [dict(documented()[0], messageId=str(uuid.uuid4())) for _ in range(50)]
    ids = publish(topics, events)
    try:
        receiver.wait_for(lambda: len(receiver.at("/hook")) >= 50, 20, "50 deliveries")
    except AssertionError:
        print(len(receiver.at("/hook")), worker.text())
        raise
    assert worker.terminate() == 0, worker.text()
    assert "stopped" in worker.text()
    # Everything was committed: a new worker in the same group delivers nothing again.
    worker_factory(topics, "--tiers", "events")
    time.sleep(2)
    assert sorted(r.event_id for r in receiver.at("/hook")) == sorted(ids)


def test_kill_9_mid_stream_loses_nothing(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    register(topics, receiver.url("/hook"))
    first = worker_factory(topics)
    sessions = [str(uuid.uuid4()) for _ in range(30)]
    events = [
        dict(documented()[0], sessionId=sessions[i % 30], messageId=str(uuid.uuid4()))
        for i in range(2000)
    ]
    ids = publish(topics, events)
    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 300, 60, "300 deliveries before the kill")
    first.kill()
    at_kill = len(receiver.at("/hook"))
    worker_factory(topics)
    receiver.wait_for(lambda: len({r.event_id for r in receiver.at("/hook")}) >= 2000, 120,
                      "every event after the restart")
    delivered = [r.event_id for r in receiver.at("/hook")]
    assert set(delivered) == set(ids)
    repeats = len(delivered) - len(set(delivered))
    print(f"\nkill -9 after {at_kill} of 2000 deliveries: all 2000 delivered, {repeats} repeated")
    assert at_kill < 2000, "the kill came too late to test anything"
    assert dead_letters(topics) == []


def test_private_destinations_are_dead_lettered_at_once_unless_allowed(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    strict = topics.replace(allow_private_networks=False)
    endpoint = register(strict, receiver.url("/private"))
    worker_factory(strict)
    publish(strict, documented()[:1])
    (dead,) = dead_letters(strict, expect=1, timeout=20)
    assert dead.reason == "blocked_destination"
    assert dead.delivery is not None and dead.delivery.endpoint_id == endpoint.id
    assert "127.0.0.1 (loopback)" in dead.detail
    assert len(dead.delivery.attempts) == 1
    time.sleep(1.5)
    assert receiver.at("/private") == []
    assert dead_letters(strict) == [dead]  # no retry tier saw it


def test_workers_option_runs_a_supervised_group(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    register(topics, receiver.url("/hook"))
    supervisor = worker_factory(topics, "--workers", "2", "--tiers", "events", wait_assigned=False)
    deadline = time.monotonic() + 30
    # Both processes joined the group: the partitions were split between them.
    while supervisor.text().count('"partitions assigned" tier=events') < 2:
        assert time.monotonic() < deadline, supervisor.text()
        time.sleep(0.1)
    events = [dict(documented()[0], sessionId=str(uuid.uuid4())) for _ in range(200)]
    ids = publish(topics, events)
    receiver.wait_for(lambda: len({r.event_id for r in receiver.at("/hook")}) >= 200, 30, "200 deliveries")
    assert {r.event_id for r in receiver.at("/hook")} == set(ids)
    children = children_of(supervisor.process.pid)
    assert len(children) == 2
    assert supervisor.terminate() == 0, supervisor.text()
    assert not any(alive(pid) for pid in children)


def test_a_slow_endpoint_does_not_stall_another(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    def slow(request: Any, seen: int) -> int:
        time.sleep(2)
        return 204

    receiver.respond("/slow", slow)
    register(topics, receiver.url("/slow"))
    register(topics, receiver.url("/fast"))
    worker_factory(topics)
    events = [dict(documented()[0], messageId=str(uuid.uuid4())) for _ in range(100)]
    started = time.monotonic()
    ids = publish(topics, events)
    receiver.wait_for(lambda: len(receiver.at("/fast")) >= 100, 30, "100 fast deliveries")
    fast_done = time.monotonic() - started
    slow_so_far = len(receiver.at("/slow"))
    # /slow takes 2 s a request, 20 at a time: 100 need >= 10 s. /fast is not held back:
    # it is done before /slow could possibly be (compared with /slow's own pace, not a
    # wall-clock bound a loaded machine could miss).
    assert fast_done < 10, fast_done
    assert slow_so_far < 100
    receiver.wait_for(lambda: len(receiver.at("/slow")) >= 100, 40, "100 slow deliveries")
    assert {r.event_id for r in receiver.at("/slow")} == set(ids)


def test_an_endpoint_slower_than_its_events_does_not_set_everyones_pace(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    """60 events for a bot whose endpoint takes 0.6 s (2 connections: 3.3 a second), then
    10 for another bot, through a worker holding 20 records in flight. The slow endpoint's
    share of the process is bounded (2 in flight, and no more waiting than it serves in
    the 1 s local wait), so the other bot's events are not queued behind it (about 18 s at
    the slow endpoint's pace). The rest of the slow endpoint's events are deferred, not
    failed: all are delivered, no attempt is spent on them, nothing is dead-lettered."""
    def slow(request: Any, seen: int) -> int:
        time.sleep(0.6)
        return 204

    receiver.respond("/slow", slow)
    slow_endpoint = register(topics, receiver.url("/slow"))
    register(topics, receiver.url("/fast"), bot=OTHER_BOT)
    config = topics
    worker_factory(config, "--concurrency", "20", "--endpoint-concurrency", "2")
    message = documented()[0]
    slow_ids = publish(config, [dict(message, messageId=str(uuid.uuid4())) for _ in range(60)])
    started = time.monotonic()
    fast_ids = publish(config, [dict(message, botId=OTHER_BOT, messageId=str(uuid.uuid4())) for _ in range(10)])
    receiver.wait_for(lambda: len(receiver.at("/fast")) >= 10, 30, "10 deliveries to /fast")
    took = time.monotonic() - started
    slow_then = len(receiver.at("/slow"))
    print(f"10 events of another bot delivered {took:.1f} s after publishing; /slow had {slow_then} of 60")
    assert slow_then < 60 and took < 60 * 0.6 / 2 / 2, took  # well within half the slow one's pace
    assert {r.event_id for r in receiver.at("/fast")} == set(fast_ids)

    receiver.wait_for(lambda: {r.event_id for r in receiver.at("/slow")} >= set(slow_ids), 90,
                      "every slow event, deferred ones included")
    assert dead_letters(config) == []
    topics_ = Topics.from_config(config)
    assert read_topic(config, topics_.tiers[1].topic) == []  # not one attempt failed: none retried
    deferred = [m for rung in topics_.deferral_tiers for m in read_topic(config, rung.topic)]
    assert deferred, "the slow endpoint's overflow was not deferred: the test proves nothing"
    codec = Codec()
    for m in deferred:
        delivery = Delivery.from_record(codec.decode(m.value())[1])
        assert delivery.endpoint_id == slow_endpoint.id and delivery.attempt == 0
        assert delivery.attempts[-1].outcome is Outcome.DEFERRED


def test_killing_the_supervisor_leaves_no_worker_behind(topics: Config, worker_factory: Any) -> None:
    supervisor = worker_factory(topics, "--workers", "2", "--tiers", "events", wait_assigned=False)
    deadline = time.monotonic() + 20
    children: list[int] = []
    while len(children) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
        children = children_of(supervisor.process.pid)
    supervisor.kill()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, "workers outlived their killed supervisor"
        time.sleep(0.1)
