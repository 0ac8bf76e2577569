"""`gateway dlq list/show/stats/replay` on a real dead-letter topic filled by the real
pipeline: 100 exhausted deliveries across 3 endpoints and 2 event types."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from functools import partial
from typing import Any

import pytest
from confluent_kafka import Producer

from gateway.config import Config

from .conftest import read_topic, run_gateway
from .receiver import Receiver
from .test_delivery import BOT, documented, publish, register

pytestmark = pytest.mark.integration


def rows(result: Any) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_dead_letters_listed_filtered_counted_and_replayed(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    recovered: set[str] = set()

    def answer(path: str, request: Any, seen: int) -> int:
        return 204 if path in recovered else 503

    for path in ("/a", "/b", "/c"):
        receiver.respond(path, partial(answer, path))
    a = register(topics, receiver.url("/a"))
    b = register(topics, receiver.url("/b"), events=("MESSAGE",))
    c = register(topics, receiver.url("/c"), events=("TICKET",))
    worker_factory(topics.replace(circuit_failures=1000, circuit_failure_rate=0.0))  # every attempt reaches the 503s
    messages = [dict(documented()[0], messageId=str(uuid.uuid4())) for _ in range(30)]
    tickets = [dict(documented()[2], customerName=f"c{i}") for i in range(20)]
    ids = publish(topics, messages + tickets)
    # A garbage record becomes an undecodable dead letter too.
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers})
    producer.produce(f"{topics.topic_prefix}.events", key=b"junk", value=b"not avro at all")
    producer.flush(10)
    read_topic(topics, f"{topics.topic_prefix}.dlq", expect=101, timeout=60)

    def dlq(*args: str) -> subprocess.CompletedProcess[str]:
        return run_gateway(topics, "dlq", *args)

    every = rows(dlq("list", "--json"))
    assert len(every) == 101
    deliveries = [r for r in every if r["reason"] == "retries_exhausted"]
    assert len(deliveries) == 100
    assert all(r["attempts"] == 4 and r["lastStatus"] == 503 for r in deliveries)
    assert {r["eventId"] for r in deliveries} == set(ids)
    table = dlq("list")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 102  # header + rows

    stats = json.loads(dlq("stats", "--json").stdout)
    assert stats["reason"] == {"retries_exhausted": 100, "undecodable": 1}
    assert stats["eventType"] == {"MESSAGE": 60, "TICKET": 40, "-": 1}
    assert stats["endpointId"] == {a.id: 50, b.id: 30, c.id: 20, "-": 1}
    assert sum(stats["hour"].values()) == 101

    # Each filter selects exactly what it should.
    assert len(rows(dlq("list", "--json", "--endpoint-id", b.id))) == 30
    assert len(rows(dlq("list", "--json", "--event-type", "ticket"))) == 40
    assert len(rows(dlq("list", "--json", "--event-type", "TICKET", "--endpoint-id", a.id))) == 20
    assert len(rows(dlq("list", "--json", "--bot-id", BOT))) == 100
    assert rows(dlq("list", "--json", "--bot-id", str(uuid.uuid4()))) == []
    assert len(rows(dlq("list", "--json", "--reason", "undecodable"))) == 1
    assert len(rows(dlq("list", "--json", "--status", "5xx"))) == 100
    assert rows(dlq("list", "--json", "--status", "404")) == []
    assert len(rows(dlq("list", "--json", "--since", "1h ago"))) == 101
    assert rows(dlq("list", "--json", "--until", "2h ago")) == []
    assert len(rows(dlq("list", "--json", "--limit", "7"))) == 7
    per_partition = [len(rows(dlq("list", "--json", "--partition", str(p)))) for p in range(3)]
    assert sum(per_partition) == 101
    # Partitions arrive interleaved, so the first row may be the undecodable record, alone on
    # its partition; a delivery's partition holds 40 or 60, its first row's next offset too.
    first = next(r for r in every if r["reason"] == "retries_exhausted")
    window = rows(dlq("list", "--json", "--partition", str(first["partition"]),
                      "--from-offset", str(first["offset"]), "--to-offset", str(first["offset"] + 1)))
    assert [r["offset"] for r in window] == [first["offset"], first["offset"] + 1]
    bad = dlq("list", "--status", "teapot")
    assert bad.returncode == 2 and "teapot" in bad.stderr

    shown = dlq("show", deliveries[0]["eventId"])
    assert shown.returncode == 0, shown.stderr
    assert '"attemptLog"' in shown.stdout and '"retry-3s"' in shown.stdout

    # A dry run sends nothing.
    before = len(receiver.requests)
    dry = dlq("replay", "--endpoint-id", c.id, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would replay") == 20 and "nothing sent" in dry.stderr
    time.sleep(2)
    assert len(receiver.requests) == before
    assert read_topic(topics, f"{topics.topic_prefix}.retry-1s", timeout=10)  # unchanged below
    retry_records = len(read_topic(topics, f"{topics.topic_prefix}.retry-1s"))

    # A replay filtered to one endpoint redelivers exactly its records, only to it, at the rate.
    recovered.add("/c")
    started = time.monotonic()
    replay = dlq("replay", "--endpoint-id", c.id, "--rate", "20/s")
    elapsed = time.monotonic() - started
    assert replay.returncode == 0, replay.stderr
    assert "replayed 20 of 20" in replay.stderr
    assert elapsed >= 19 / 20 * 0.9, elapsed  # 20 records at 20/s take at least ~0.95 s
    receiver.wait_for(lambda: len(receiver.at("/c")) >= 80 + 20, 20, "20 redeliveries to /c")
    time.sleep(2)
    redelivered = receiver.at("/c")[80:]
    assert len(redelivered) == 20
    assert {r.json["customerName"] for r in redelivered} == {f"c{i}" for i in range(20)}
    assert len(receiver.at("/a")) == 200 and len(receiver.at("/b")) == 120  # untouched
    retry_topic = read_topic(topics, f"{topics.topic_prefix}.retry-1s")
    assert len(retry_topic) == retry_records + 20
    headers = [h for m in retry_topic if "replay-id" in (h := dict(m.headers()))]
    assert len(headers) == 20
    assert len({h["replay-id"] for h in headers}) == 1
    assert all(h["endpoint-id"] == c.id.encode() and h["attempt"] == b"0" for h in headers)

    # A second replay of the same selection replays nothing, unless --again.
    second = dlq("replay", "--endpoint-id", c.id)
    assert second.returncode == 0, second.stderr
    assert "replayed 0 of 20" in second.stderr and "20 skipped as already replayed" in second.stderr
    again = dlq("replay", "--endpoint-id", c.id, "--again", "--dry-run")
    assert again.stdout.count("would replay") == 20

    # The undecodable dead letter is listed, exported raw, and refused by replay.
    refused = dlq("replay", "--reason", "undecodable")
    assert refused.returncode == 1
    assert "not a delivery" in refused.stderr and "--raw" in refused.stderr
    assert "replayed 0 of 1" in refused.stderr


def test_raw_export_of_undecodable_dead_letters(
    topics: Config, receiver: Receiver, worker_factory: Any, tmp_path: Any
) -> None:
    worker_factory(topics, "--tiers", "events")
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers})
    producer.produce(f"{topics.topic_prefix}.events", key=b"k1", value=b"\x00\x00\x00\x00\x07garbage")
    producer.flush(10)
    read_topic(topics, f"{topics.topic_prefix}.dlq", expect=1, timeout=20)
    out = tmp_path / "raw.jsonl"
    result = run_gateway(topics, "dlq", "list", "--reason", "undecodable", "--raw", str(out))
    assert result.returncode == 0, result.stderr
    (line,) = out.read_text().splitlines()
    import base64

    exported = json.loads(line)
    assert base64.b64decode(exported["value"]) == b"\x00\x00\x00\x00\x07garbage"
    assert base64.b64decode(exported["key"]) == b"k1"
    assert "schema registry" in exported["detail"]


@pytest.mark.timeout(60)
def test_reading_from_an_offset_past_the_end_returns_at_once(topics: Config) -> None:
    """Fault (found by the API's property tests): `dlq list --from-offset 5` on a partition
    with fewer records hung for 30 s on the bundled broker (no out-of-range answer) and on
    Kafka would reset to the beginning and list everything from offset 0."""
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers})
    for i in range(3):
        producer.produce(f"{topics.topic_prefix}.dlq", key=b"k", value=b"junk %d" % i, partition=0)
    assert producer.flush(10) == 0
    started = time.monotonic()
    past = run_gateway(topics, "dlq", "list", "--json", "--partition", "0", "--from-offset", "5")
    assert past.returncode == 0, past.stderr
    assert past.stdout == "" and "0 dead letters" in past.stderr
    within = run_gateway(topics, "dlq", "list", "--json", "--partition", "0", "--from-offset", "1")
    assert [json.loads(line)["offset"] for line in within.stdout.splitlines()] == [1, 2]
    missing = run_gateway(topics, "dlq", "show", "0:7")
    assert missing.returncode == 1 and "no dead letter" in missing.stderr
    assert time.monotonic() - started < 25  # the three commands, each a fresh process
