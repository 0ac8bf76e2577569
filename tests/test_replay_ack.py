"""A replay the broker does not acknowledge is a failure, and is not recorded as replayed.

A broker of the test's own (the session's shared broker is never stopped) is frozen
with SIGSTOP after the replay is planned: nothing it was sent is acknowledged.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from gateway.codec import Codec
from gateway.config import Config
from gateway.ops import plan_replay, read_replayed, register_endpoint, send_replay
from gateway.records import DEAD_LETTER_SCHEMA, Attempt, DeadLetter, DeadLetterReason, Delivery, Outcome
from gateway.store import Topics, create_topics, dead_letter_headers
from gateway.streaming import Broker

from .conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
DEAD = 5


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(port=free_port(), log=tmp_path / "tansu.log") as running:
        try:
            yield running
        finally:
            assert running.pid is not None
            os.kill(running.pid, signal.SIGCONT)  # never leave it frozen, whatever failed


def write_dead_letters(config: Config, endpoint_id: str) -> None:
    topic = Topics.from_config(config).dlq
    codec = Codec()
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    now = time.time_ns() // 1_000_000
    for i in range(DEAD):
        delivery = Delivery(
            event_id=str(uuid.uuid4()), event_type="MESSAGE", bot_id=BOT, session_id=f"s{i}",
            occurred_at=now, payload="{}", endpoint_id=endpoint_id, attempt=4, due_at=now,
            attempts=(Attempt(at=now, tier="retry-3s", duration_ms=1.0, outcome=Outcome.HTTP_ERROR, status=503),),
        )
        dead = DeadLetter(reason=DeadLetterReason.RETRIES_EXHAUSTED, detail="HTTP 503", dead_at=now,
                          source_topic="t", source_partition=0, source_offset=i, delivery=delivery)
        producer.produce(topic, key=endpoint_id.encode(),
                         value=codec.encode(DEAD_LETTER_SCHEMA, dead.to_record(), topic=topic),
                         headers=dead_letter_headers(dead))
    assert producer.flush(10) == 0


def test_unacknowledged_replays_are_reported_and_not_recorded(own_broker: Broker) -> None:
    config = Config(bootstrap_servers=own_broker.bootstrap, topic_prefix="acks",
                    retry_delays=(1, 2, 3), partitions=1)
    create_topics(config)
    endpoint = register_endpoint(config, bot_id=BOT, url="https://example.com/hook").endpoint
    write_dead_letters(config, endpoint.id)
    plan = plan_replay(config)
    assert len(plan.planned) == DEAD

    assert own_broker.pid is not None
    os.kill(own_broker.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        report = send_replay(config, plan, timeout=3)
    finally:
        os.kill(own_broker.pid, signal.SIGCONT)
    elapsed = time.monotonic() - started

    assert elapsed < 20, f"the replay took {elapsed:.1f} s with a 3 s timeout"
    assert report.replayed == 0
    assert report.failed == DEAD
    assert report.first_failure is not None
    assert plan.planned[0].entry.coordinate in report.first_failure
    assert "3 s" in report.first_failure
    assert not report.ok
    assert report.unrecorded == 0  # nothing was acknowledged, so nothing was to be recorded

    # Nothing was recorded as replayed, so the same replay, once the broker answers,
    # plans and sends them all again, and records them.
    assert read_replayed(config) == set()
    again = plan_replay(config)
    assert len(again.planned) == DEAD and again.skipped_already_replayed == 0
    done = send_replay(config, again, timeout=30)
    assert done.ok and done.replayed == DEAD
    assert read_replayed(config) == {item.entry.coordinate for item in again.planned}
