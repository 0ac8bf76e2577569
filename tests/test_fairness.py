"""Fair delivery across bots, end to end: a slow endpoint at three times its capacity, a
fast endpoint of another bot, and a down endpoint of a third, through one real worker.

* The slow endpoint loses nothing to the dead-letter topic and spends no attempt on the
  gateway's own limits: what it cannot take now is deferred and delivered later.
* The fast bot's events arrive at their normal latency (p99 under 1 s from publishing).
* The down endpoint is not hammered: its circuit opens, so it sees far fewer requests
  than events (at most 1.2 a event).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from gateway.codec import Codec
from gateway.config import Config
from gateway.events import parse_event
from gateway.publisher import Publisher
from gateway.records import DeadLetter, Delivery
from gateway.store import Topics

from .conftest import read_topic
from .receiver import Receiver
from .test_delivery import BOT, OTHER_BOT, documented, register

pytestmark = pytest.mark.integration

DOWN_BOT = "d0d0d0d0-2222-4333-8444-555555555555"
SLOW_SECONDS = 0.3
CONNECTIONS = 20  # the slow endpoint's capacity: 20 / 0.3 s = 66 a second


def _events(bot: str, count: int) -> list[dict[str, Any]]:
    base = documented()[0]
    return [dict(base, botId=bot, sessionId=str(uuid.uuid4()), messageId=str(uuid.uuid4())) for _ in range(count)]


def _publish_at(config: Config, events: list[dict[str, Any]], rate: float, published: dict[str, float]) -> None:
    """Publish ``events`` at ``rate`` a second (in tenths of a second), recording when each
    was acknowledged... and stamped: the event's occurredAt is its publish time."""
    with Publisher(config) as publisher:
        chunk = max(1, int(rate / 10))
        started = time.monotonic()
        for i in range(0, len(events), chunk):
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            batch = [parse_event(e) for e in events[i:i + chunk]]
            for result in publisher.publish_many(batch, timeout=60):
                assert result.ok, result.error
                published[result.event.event_id] = result.event.occurred_at / 1000


@pytest.mark.timeout(300)
def test_a_slow_a_fast_and_a_down_endpoint_each_get_what_they_can_and_cost_each_other_nothing(
    topics: Config, receiver: Receiver, worker_factory: Any
) -> None:
    def slow(request: Any, seen: int) -> int:
        time.sleep(SLOW_SECONDS)
        return 204

    receiver.respond("/slow", slow)
    receiver.respond("/down", lambda request, seen: 503)
    slow_endpoint = register(topics, receiver.url("/slow"), bot=BOT)
    register(topics, receiver.url("/fast"), bot=OTHER_BOT)
    down_endpoint = register(topics, receiver.url("/down"), bot=DOWN_BOT)
    worker = worker_factory(topics, "--endpoint-concurrency", str(CONNECTIONS))

    capacity = CONNECTIONS / SLOW_SECONDS
    seconds = 10
    loads = {
        "slow": (_events(BOT, int(3 * capacity * seconds)), 3 * capacity),
        "fast": (_events(OTHER_BOT, 300), 30.0),
        "down": (_events(DOWN_BOT, 200), 20.0),
    }
    published: dict[str, dict[str, float]] = {name: {} for name in loads}
    threads = [threading.Thread(target=_publish_at, args=(topics, events, rate, published[name]), daemon=True)
               for name, (events, rate) in loads.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    slow_count = len(loads["slow"][0])

    receiver.wait_for(lambda: len(receiver.at("/fast")) >= 300, 60, "the fast bot's 300 events")
    arrivals = {r.event_id: r.at for r in receiver.at("/fast")}
    latencies = sorted(arrivals[i] - t for i, t in published["fast"].items())
    p99 = latencies[int(0.99 * len(latencies)) - 1]

    try:
        receiver.wait_for(lambda: len({r.event_id for r in receiver.at("/slow")}) >= slow_count, 150,
                          f"all {slow_count} events at the slow endpoint")
    except AssertionError:
        print(worker.text()[-3000:])
        raise
    dead = [DeadLetter.from_record(Codec().decode(m.value())[1])
            for m in read_topic(topics, f"{topics.topic_prefix}.dlq")]
    down_requests = len(receiver.at("/down"))
    deferred = [Delivery.from_record(Codec().decode(m.value())[1])
                for rung in Topics.from_config(topics).deferral_tiers for m in read_topic(topics, rung.topic)]
    retried_slow = [m for tier in Topics.from_config(topics).tiers[1:] for m in read_topic(topics, tier.topic)
                    if m.key() == slow_endpoint.id.encode()]
    print(f"\nfairness: slow {slow_count} at 3x its capacity ({capacity:.0f}/s): delivered "
          f"{len({r.event_id for r in receiver.at('/slow')})}, deferrals {len(deferred)}, "
          f"dead-lettered {sum(1 for d in dead if d.delivery and d.delivery.endpoint_id == slow_endpoint.id)}; "
          f"fast 300: p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms; down 200: {down_requests} requests "
          f"({down_requests / 200:.2f} per event), dead-lettered "
          f"{sum(1 for d in dead if d.delivery and d.delivery.endpoint_id == down_endpoint.id)}")

    assert {r.event_id for r in receiver.at("/slow")} == set(published["slow"])
    assert not [d for d in dead if d.delivery and d.delivery.endpoint_id == slow_endpoint.id]
    assert retried_slow == [], "an attempt at the slow endpoint failed: it should only have been deferred"
    assert deferred, "nothing was deferred: the slow endpoint was not over its capacity"
    assert set(arrivals) == set(published["fast"])
    assert p99 < 1.0, f"the fast bot's p99 was {p99:.2f} s"
    assert down_requests <= 1.2 * 200, down_requests
