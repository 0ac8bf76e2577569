"""A schema registry that hangs, then goes away, then comes back, under a real worker.

Fault: a registry that was down or slow dead-lettered valid events as undecodable (and
replay refuses undecodable dead letters), and the lookup blocked the event loop, so every
partition stalled behind it. Now a record whose schema cannot be fetched yet holds its
own partition (paused) while the lookup is retried off the event loop; the other
partitions go on; nothing is dead-lettered; the held records are delivered once the
registry answers again.
"""

from __future__ import annotations

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
from gateway.store import Topics, save_endpoint

from .conftest import read_topic
from .receiver import Receiver
from .schema_registry import SchemaRegistry

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"


def example(kind: str) -> dict[str, Any]:
    docs = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    return next(d for d in docs if d["event"] == kind)


def test_a_registry_outage_holds_the_partition_and_dead_letters_nothing(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    with SchemaRegistry() as registry:
        config = topics.replace(schema_registry_url=registry.url)
        events_topic = Topics.from_config(config).events
        bot = example("MESSAGE")["botId"]
        save_endpoint(topics, new_endpoint(bot_id=bot, url=receiver.url("/hook")))  # either format reads
        codec = Codec(registry.url)

        def encoded(kind: str) -> tuple[str, bytes]:
            event = parse_event(dict(example(kind), eventId=str(uuid.uuid4())))
            return event.event_id, codec.encode(event.schema_name, event.to_record(), topic=events_topic)

        first = encoded("MESSAGE")
        messages = [encoded("MESSAGE") for _ in range(5)]
        tickets = [encoded("TICKET") for _ in range(5)]  # registered now; the worker never saw it
        codec.close()
        producer = Producer({"bootstrap.servers": config.bootstrap_servers})

        def produce(items: list[tuple[str, bytes]], partition: int) -> None:
            for _, value in items:
                producer.produce(events_topic, value=value, key=b"k", partition=partition)
            assert producer.flush(10) == 0

        worker = worker_factory(config)
        produce([first], 1)
        receiver.wait_for(lambda: len(receiver.at("/hook")) >= 1, 20, "the first event")

        registry.hang()  # a registry that accepts and never answers
        produce(tickets, 0)
        produce(messages, 1)
        # The lookup of the ticket schema hangs off the event loop: partition 1 goes on.
        try:
            receiver.wait_for(lambda: len(receiver.at("/hook")) >= 6, 40, "partition 1 during the hang")
        except AssertionError:
            print(worker.text()[-6000:])
            raise
        assert {r.event_id for r in receiver.at("/hook")} == {first[0]} | {i for i, _ in messages}

        registry.stop()  # then it goes away altogether
        time.sleep(3)
        assert read_topic(config, f"{config.topic_prefix}.dlq") == []
        assert len(receiver.at("/hook")) == 6  # the tickets wait, in Kafka and paused

        registry.start()  # back, same port, same schemas
        try:
            receiver.wait_for(lambda: len(receiver.at("/hook")) >= 11, 40, "the tickets after the outage")
        except AssertionError:
            print(worker.text()[-6000:])
            raise
        delivered = [r.event_id for r in receiver.at("/hook")]
        assert sorted(delivered) == sorted([first[0], *(i for i, _ in messages), *(i for i, _ in tickets)])
        assert read_topic(config, f"{config.topic_prefix}.dlq") == []
        assert "schema registry unavailable" in worker.text()
