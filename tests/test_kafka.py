"""What only a real Apache Kafka can show: the broker crashing and coming back on its
data, compaction, watermarks and committed offsets as the broker reports them, a rolling
restart, the KIP-848 consumer protocol, and ``max.poll.interval.ms`` enforced.

Every test here runs on Apache Kafka only (``--brokers`` must include kafka): on the
bundled broker none of these can be shown (it is memory-only, never compacts, and
reports watermarks differently).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.admin._resource import ResourceType

from gateway.codec import Codec
from gateway.config import Config
from gateway.ops import new_endpoint, remove_endpoint, set_endpoint_enabled, update_endpoint
from gateway.records import Endpoint
from gateway.store import Topics, create_topics, save_endpoint

from .apache_kafka import KafkaNode
from .chaos_support import ChaosReceiver, Load, conclude, make_events, read_all, register
from .conftest import free_port, read_topic, run_gateway
from .receiver import Receiver
from .test_delivery import BOT, documented, publish
from .test_metrics import GatewayProcess, scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.brokers("kafka")]


# -- the broker crashes ----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_broker_killed_mid_drain_and_restarted_on_its_data_loses_nothing(
    config: Config, broker_kind: str, worker_factory: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """SIGKILL the broker while a worker drains 5,000 events (10% of the requests fail, so
    the retry tiers are in play), start it again on the same data directory: every event
    is delivered or dead-lettered after its retries, none is lost, no retry is early."""
    with KafkaNode(tmp_path / "kafka") as node:
        config = config.replace(bootstrap_servers=node.bootstrap)
        create_topics(config)
        with ChaosReceiver(seed=11) as receiver:
            receiver.flaky(0.1)
            endpoints = {"/hook": register(config, receiver.url("/hook"))}
            load = Load(config, make_events(5000, seed=11), chunk=500, interval=0.0).start()
            load.join(120)  # a backlog first: the worker then drains it
            worker = worker_factory(config)
            receiver.wait_delivered(1500, 90)
            node.kill()
            at_kill = receiver.delivered()
            time.sleep(1.0)
            node.start()
            conclude("broker-kill-9", request, config, receiver, load, endpoints, [worker.log],
                     notes=f"broker killed after {at_kill} of 5000 deliveries and restarted on its data",
                     drain_timeout=120)
            assert worker.terminate() == 0, worker.text()[-3000:]


# -- compaction ---------------------------------------------------------------------------


def _make_compaction_quick(config: Config, topic: str) -> None:
    """Test-speed settings on a topic that `gateway topics create` made: segments roll
    after 100 ms, any dirt gets cleaned, tombstones go 100 ms after a cleaning."""
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    entries = [ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
               for name, value in (("segment.ms", "100"), ("min.cleanable.dirty.ratio", "0.01"),
                                   ("min.compaction.lag.ms", "0"), ("delete.retention.ms", "100"))]
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
    admin.incremental_alter_configs([resource])[resource].result(20)


def _per_key(config: Config, topic: str) -> dict[str, list[bytes | None]]:
    records: dict[str, list[bytes | None]] = {}
    for msg in read_topic(config, topic):
        records.setdefault((msg.key() or b"").decode(), []).append(msg.value())
    return records


@pytest.mark.timeout(180)
def test_the_endpoints_topic_is_compacted_and_a_later_worker_loads_exactly_the_current_table(
    config: Config, receiver: Receiver, worker_factory: Any
) -> None:
    created = run_gateway(config, "topics", "create")
    assert created.returncode == 0, created.stderr
    topic = Topics.from_config(config).endpoints
    _make_compaction_quick(config, topic)

    moved = new_endpoint(bot_id=BOT, url=receiver.url("/moved-0"))
    save_endpoint(config, moved)
    for i in range(1, 5):  # four more versions of one registration
        update_endpoint(config, moved.id, url=receiver.url(f"/moved-{i}"))
    gone = new_endpoint(bot_id=BOT, url=receiver.url("/gone"))
    save_endpoint(config, gone)
    remove_endpoint(config, gone.id)  # a tombstone
    paused = new_endpoint(bot_id=BOT, url=receiver.url("/paused"), event_types=("MESSAGE",))
    save_endpoint(config, paused)
    set_endpoint_enabled(config, paused.id, False)
    set_endpoint_enabled(config, paused.id, True)
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    ends = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest()  # type: ignore[no-untyped-call]
                               for p in partitions})
    assert sum(f.result(10).offset for f in ends.values()) == 10  # records written, offsets taken

    # Only closed segments are cleaned, and a segment closes when a record arrives after
    # segment.ms; a tombstone goes in a second cleaning after delete.retention.ms. So keep
    # writing (tombstones of ids never registered: nothing for the table) until it shows.
    deadline = time.monotonic() + 90
    rolls = 0
    while True:
        per_key = _per_key(config, topic)
        if len(per_key.get(moved.id, [])) == 1 and gone.id not in per_key and len(per_key[paused.id]) == 1:
            break
        assert time.monotonic() < deadline, {k: len(v) for k, v in per_key.items() if not k.startswith("roll")}
        time.sleep(0.3)
        remove_endpoint_record(config, topic, f"roll-{rolls}")
        rolls += 1
    codec = Codec()
    (latest,) = per_key[moved.id]
    assert Endpoint.from_record(codec.decode(latest)[1]).url == receiver.url("/moved-4")
    print(f"\ncompaction: 10 registration records became 2 (+ {rolls} roll records) "
          f"after {rolls} rolls")

    # A worker started now reads the compacted topic: exactly the current table.
    listed = run_gateway(config, "endpoints", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    table = {e["id"]: (e["url"], e["enabled"]) for e in map(json.loads, listed.stdout.splitlines())}
    assert table == {moved.id: (receiver.url("/moved-4"), True), paused.id: (receiver.url("/paused"), True)}
    worker_factory(config)
    (event_id,) = publish(config, documented()[:1])
    receiver.wait_for(lambda: len(receiver.at("/moved-4")) == 1 and len(receiver.at("/paused")) == 1, 30,
                      "the event at the current URL and at the re-enabled endpoint")
    time.sleep(1)
    assert [r.event_id for r in receiver.requests] == [event_id, event_id]
    assert {r.path for r in receiver.requests} == {"/moved-4", "/paused"}


def remove_endpoint_record(config: Config, topic: str, key: str) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    producer.produce(topic, key=key.encode(), value=None)
    assert producer.flush(10) == 0


# -- consumer lag ---------------------------------------------------------------------------


def _broker_lag(config: Config, tier_name: str, topic: str) -> dict[int, int]:
    """High watermark minus the group's committed offset, per partition, as the broker
    reports them to an admin client."""
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    latest = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest()  # type: ignore[no-untyped-call]
                                 for p in partitions})
    highs = {tp.partition: future.result(10).offset for tp, future in latest.items()}
    group = f"{config.consumer_group}.{tier_name}"
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])]
    committed = admin.list_consumer_group_offsets(request)[group].result(10)
    offsets = {tp.partition: max(tp.offset, 0) for tp in committed.topic_partitions}
    return {p: highs[p] - offsets.get(p, 0) for p in partitions}


def _metric_lag(port: int, topic: str) -> dict[int, float]:
    text = scrape(port).text
    return {p: lag for p in range(3)
            if (lag := value(text, "gateway_consumer_lag_records", topic=topic, partition=str(p))) is not None}


@pytest.mark.timeout(120)
def test_the_lag_metric_is_the_brokers_watermark_minus_the_committed_offset(
    topics: Config, receiver: Receiver, tmp_path: Path
) -> None:
    topics = topics.replace(request_timeout=60.0)  # the held requests must not time out
    gate = threading.Event()
    receiver.respond("/hook", lambda request, seen: 204 if gate.wait(60) else 503)
    save_endpoint(topics, new_endpoint(bot_id=BOT, url=receiver.url("/hook")))
    events_topic = Topics.from_config(topics).events
    port = free_port()
    gateway = GatewayProcess(topics, tmp_path / "gateway.log", port, "--tiers", "events", "--concurrency", "6")
    try:
        gateway.wait_ready()
        publish(topics, [dict(documented()[0], sessionId=str(uuid.uuid4())) for _ in range(10)])
        receiver.wait_for(lambda: len(receiver.requests) >= 6, 20, "6 requests held by the receiver")
        # The budget is full and 4 records wait: the whole assignment is paused, so these
        # are not fetched; the metric sees them through the watermarks the broker lists.
        publish(topics, [dict(documented()[0], sessionId=str(uuid.uuid4())) for _ in range(50)])

        # The statistics come every 5 s: wait until they show all 60 records unsettled.
        deadline = time.monotonic() + 30
        while sum(_metric_lag(port, events_topic).values()) != 60:
            assert time.monotonic() < deadline, (_metric_lag(port, events_topic), gateway.text()[-2000:])
            time.sleep(0.5)
        broker = _broker_lag(topics, "events", events_topic)
        assert _metric_lag(port, events_topic) == broker, broker
        assert sum(broker.values()) == 60

        gate.set()
        receiver.wait_for(lambda: len({r.event_id for r in receiver.requests}) >= 60, 30, "every delivery")
        deadline = time.monotonic() + 30
        while (any(_metric_lag(port, events_topic).values())
               or any(_broker_lag(topics, "events", events_topic).values())):
            assert time.monotonic() < deadline, (_metric_lag(port, events_topic),
                                                 _broker_lag(topics, "events", events_topic))
            time.sleep(0.5)
    finally:
        gate.set()
        assert gateway.stop() == 0, gateway.text()[-3000:]


# -- a rolling restart ----------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_rolling_restart_of_two_workers_under_load_loses_nothing(
    topics: Config, worker_factory: Any, request: pytest.FixtureRequest
) -> None:
    config = topics
    with ChaosReceiver(seed=12) as receiver:
        receiver.flaky(0.1)
        endpoints = {"/hook": register(config, receiver.url("/hook"))}
        workers = [worker_factory(config), worker_factory(config)]
        logs = [w.log for w in workers]
        load = Load(config, make_events(3000, seed=12), chunk=100, interval=0.2).start()
        receiver.wait_delivered(400, 90)
        moments = []
        for i in (0, 1):  # one after the other, as a deployment does
            assert workers[i].terminate(timeout=60) == 0, workers[i].text()[-3000:]
            moments.append(f"worker {i} stopped at {receiver.delivered()}")
            workers[i] = worker_factory(config)
            logs.append(workers[i].log)
            moments.append(f"back at {receiver.delivered()}")
        conclude("rolling-restart", request, config, receiver, load, endpoints, logs,
                 notes="; ".join(moments), drain_timeout=90)
        for worker in workers:
            assert worker.terminate(timeout=60) == 0, worker.text()[-3000:]


# -- KIP-848 --------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_the_kip_848_consumer_protocol_delivers_rebalances_and_fails_over(
    topics: Config, worker_factory: Any, request: pytest.FixtureRequest
) -> None:
    """group.protocol=consumer: the broker assigns the partitions (incrementally) and
    owns the session timeout (10 s here)."""
    config = topics.replace(group_protocol="consumer")
    with ChaosReceiver(seed=13) as receiver:
        receiver.flaky(0.1)
        endpoints = {"/hook": register(config, receiver.url("/hook"))}
        first = worker_factory(config)
        logs = [first.log]
        load = Load(config, make_events(2000, seed=13), chunk=100, interval=0.25).start()
        receiver.wait_delivered(300, 90)
        second = worker_factory(config, wait_assigned=False)
        logs.append(second.log)
        deadline = time.monotonic() + 30
        while "partitions assigned" not in second.text() or "[]" in _last_assignment(second.text()):
            assert time.monotonic() < deadline, second.text()[-3000:]
            time.sleep(0.2)
        at_kill = receiver.delivered()
        second.kill()  # its partitions come back to the first after the broker's session timeout
        conclude("kip-848", request, config, receiver, load, endpoints, logs,
                 notes=f"second worker joined, then killed at {at_kill}", drain_timeout=120)
        admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
        group = f"{config.consumer_group}.events"
        described = admin.describe_consumer_groups([group])[group].result(10)
        assert described.type.name == "CONSUMER", described  # not the classic protocol
        assert first.terminate(timeout=60) == 0, first.text()[-3000:]


def _last_assignment(log: str) -> str:
    lines = [line for line in log.splitlines() if "partitions assigned" in line and "tier=events" in line]
    return lines[-1] if lines else "[]"


# -- max.poll.interval.ms ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_worker_with_its_budget_full_longer_than_max_poll_interval_stays_in_its_group(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    """Four records fill the worker's budget; the receiver holds them 9 s, three times the
    3 s max.poll.interval.ms. The worker keeps polling (paused) and is not evicted: no
    rebalance, and every event is delivered exactly once."""
    config = topics.replace(request_timeout=20.0, max_poll_interval_ms=3000)

    def hold_the_first_four(request: Any, seen: int) -> int:
        time.sleep(9 if seen < 4 else 0)
        return 204

    receiver.respond("/hook", hold_the_first_four)
    save_endpoint(config, new_endpoint(bot_id=BOT, url=receiver.url("/hook")))
    worker = worker_factory(config, "--tiers", "events", "--concurrency", "4")
    ids = publish(config, [dict(documented()[0], sessionId=str(uuid.uuid4())) for _ in range(12)])
    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 12, 60, "12 deliveries")
    time.sleep(2)
    delivered = [r.event_id for r in receiver.at("/hook")]
    assert sorted(delivered) == sorted(ids), "repeated or missing: the worker left its group"
    log = worker.text()
    assert log.count('"partitions assigned" tier=events') == 1 and "partitions released" not in log, log[-3000:]
    assert "poll interval" not in log.lower(), log[-3000:]
    assert worker.terminate() == 0


@pytest.mark.timeout(120)
def test_retry_partitions_paused_longer_than_max_poll_interval_stay_in_their_group(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    """A failed delivery waits 8 s in its retry tier (paused), longer than the 3 s
    max.poll.interval.ms: the tier keeps its partitions and retries on time."""
    config = topics.replace(retry_delays=(8, 9), max_poll_interval_ms=3000)
    create_topics(config)  # (its tiers are named after these delays)
    receiver.respond("/hook", lambda request, seen: 503 if seen == 0 else 204)
    save_endpoint(config, new_endpoint(bot_id=BOT, url=receiver.url("/hook")))
    worker = worker_factory(config)
    (event_id,) = publish(config, documented()[:1])
    receiver.wait_for(lambda: len(receiver.at("/hook")) >= 2, 40, "the retry")
    first, retry = receiver.at("/hook")[:2]
    assert retry.at - first.at >= 8
    time.sleep(1)
    assert [r.event_id for r in receiver.at("/hook")] == [event_id, event_id]
    log = worker.text()
    assert "partitions released" not in log and "poll interval" not in log.lower(), log[-3000:]
    assert len(read_all(config, Topics.from_config(config).tiers[1].topic)) == 1
    assert worker.terminate() == 0
