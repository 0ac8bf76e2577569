"""GroupWatch: a tier's consumer that stays out of its consumer group is named in the log.

The rule runs on a fake clock; the statistics it reads are checked against a real
consumer on each broker (and Kafka's KIP-848 protocol), since a field librdkafka names
differently would leave the watch silent forever."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from confluent_kafka import Consumer

from gateway.config import Config
from gateway.store import Topics
from gateway.streaming import ClusterContact, GroupWatch, consumer_settings, read_statistics

from .fakes import FakeClock


def stats(join_state: str, state: str = "up") -> dict[str, Any]:
    return {"cgrp": {"state": state, "join_state": join_state, "rebalance_reason": "because"}}


def watched(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [(r.getMessage(), {k: getattr(r, k, None) for k in ("join_state", "out_for_s")})
            for r in caplog.records if r.name == "gateway.consumer"]


def test_a_consumer_out_of_its_group_longer_than_the_bound_is_named_once_and_again_when_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.consumer")
    clock = FakeClock()
    watch = GroupWatch("events", warn_after=30, clock=clock)
    watch.update(stats("steady"))
    watch.update(stats("wait-unassign-to-complete"))
    clock.advance(29.9)
    watch.update(stats("wait-unassign-to-complete"))
    assert watched(caplog) == []
    clock.advance(0.2)
    watch.update(stats("wait-join"))
    clock.advance(60)
    watch.update(stats("wait-join"))
    assert watched(caplog) == [("consumer out of its group: the tier fetches nothing until it rejoins",
                                {"join_state": "wait-join", "out_for_s": 30.1})]
    assert caplog.records[-1].levelname == "ERROR"
    clock.advance(5)
    watch.update(stats("steady"))
    assert watched(caplog)[-1] == ("consumer back in its group", {"join_state": None, "out_for_s": 95.1})


def brokers(state: str) -> dict[str, Any]:
    return {"brokers": {"127.0.0.1:9092/1": {"state": state, "nodeid": 1},
                        "127.0.0.1:9092/bootstrap": {"state": "UP", "nodeid": -1}}}


def test_a_consumer_is_stuck_only_out_of_its_group_past_the_bound_while_a_broker_answers() -> None:
    """What makes the worker replace a tier's consumer: out of its group longer than the
    bound while a broker connection is up. With every broker away a new consumer would not
    do better, so it is not stuck; a renewed consumer counts from its renewal."""
    clock = FakeClock()
    watch = GroupWatch("events", clock=clock)
    watch.update(stats("steady") | brokers("UP"))
    clock.advance(100)
    assert watch.out_for() == 0 and not watch.stuck(10)
    watch.update(stats("wait-join") | brokers("UP"))
    clock.advance(10)
    assert watch.out_for() == 10 and not watch.stuck(10)
    clock.advance(0.5)
    assert watch.stuck(10)
    watch.update(stats("wait-join") | brokers("DOWN"))  # (the bootstrap connection does not count)
    assert not watch.stuck(10)
    watch.update(stats("wait-join") | brokers("UP"))
    watch.renewed()
    assert watch.out_for() == 0
    clock.advance(11)
    assert watch.out_for() == 11 and not watch.stuck(10)  # no statistics of the new consumer yet
    watch.update(stats("wait-join") | brokers("UP"))
    assert watch.stuck(10)
    watch.update(stats("steady") | brokers("UP"))
    assert watch.out_for() == 0 and not watch.stuck(10)


def test_rebalances_shorter_than_the_bound_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.consumer")
    clock = FakeClock()
    watch = GroupWatch("events", warn_after=30, clock=clock)
    for _ in range(10):
        watch.update(stats("wait-join"))
        clock.advance(20)
        watch.update(stats("steady"))
        clock.advance(5)
    watch.update(stats("init", state="query-coord"))
    assert watched(caplog) == []


def test_statistics_without_a_group_or_unreadable_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.consumer")
    clock = FakeClock()
    watch = GroupWatch("events", warn_after=0, clock=clock)
    for text in ("{", "[]", json.dumps({"name": "rdkafka#consumer-1"}), json.dumps({"cgrp": {"state": "up"}})):
        document = read_statistics(text, "events")  # what the worker's stats_cb does
        if document is not None:
            watch.update(document)
        clock.advance(60)
    assert watched(caplog) == []


def _join_states_once_assigned(config: Config) -> list[str]:
    """The join states a tier's real consumer reports from its assignment on, until three
    in a row say "steady" (the topics are new: a rebalance may still follow the first
    assignment) or 60 s have passed."""
    tier = Topics.from_config(config).tier("events")
    seen: list[str] = []

    def record(text: str) -> None:
        group = json.loads(text).get("cgrp")
        if group:
            seen.append(group["join_state"])

    consumer = Consumer(consumer_settings(config, tier) | {"stats_cb": record, "statistics.interval.ms": 200})
    try:
        consumer.subscribe([tier.topic])
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.2)
        seen.clear()
        while seen[-3:] != ["steady"] * 3 and time.monotonic() < deadline:
            consumer.poll(0.2)
        return list(seen)  # (closing leaves the group: what it reports then is not asked)
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_real_consumer_holding_its_assignment_reports_steady(topics: Config) -> None:
    states = _join_states_once_assigned(topics)
    assert len(states) >= 3 and states[-3:] == ["steady"] * 3, states


@pytest.mark.integration
@pytest.mark.brokers("kafka")
def test_a_kip_848_consumer_holding_its_assignment_reports_steady(topics: Config) -> None:
    states = _join_states_once_assigned(topics.replace(group_protocol="consumer"))
    assert len(states) >= 3 and states[-3:] == ["steady"] * 3, states


def test_a_consumer_out_of_its_group_with_no_coordinator_is_stuck_past_the_shorter_bound() -> None:
    """Finding the coordinator waits on no rebalance: out of the group with no coordinator
    (``cgrp.state`` not ``up``) past ``uncoordinated`` is stuck, long before the rebalance
    bound; a coordinator found again, or the group rejoined, starts the count over."""
    clock = FakeClock()
    watch = GroupWatch("events", clock=clock)
    watch.update(stats("steady", state="query-coord") | brokers("UP"))  # in the group: fetching
    clock.advance(100)
    assert not watch.stuck(300, uncoordinated=30)
    watch.update(stats("init", state="query-coord") | brokers("UP"))
    clock.advance(30)
    assert not watch.stuck(300, uncoordinated=30)
    watch.update(stats("init", state="up") | brokers("UP"))  # a coordinator: a rebalance may wait
    clock.advance(1)
    watch.update(stats("wait-join", state="wait-broker-transport") | brokers("UP"))
    clock.advance(30)
    assert not watch.stuck(300, uncoordinated=30)
    clock.advance(0.5)
    assert watch.stuck(300, uncoordinated=30) and not watch.stuck(300)
    watch.update(stats("init", state="query-coord") | brokers("DOWN"))
    assert not watch.stuck(300, uncoordinated=30)  # no broker answers: a new consumer does no better
    watch.renewed()
    watch.update(stats("init", state="query-coord") | brokers("UP"))
    clock.advance(30.5)
    assert watch.stuck(300, uncoordinated=30)
    watch.update(stats("steady") | brokers("UP"))
    assert not watch.stuck(300, uncoordinated=30)


def test_a_consumer_with_no_broker_of_its_own_is_stuck_while_the_processs_others_reach_the_cluster() -> None:
    """Fault (CI on Apache Kafka, the broker frozen for 10 s): the events tier's consumer
    stayed hunting for a coordinator with no broker connection up in its own statistics
    (no assignment to fetch for), so it never counted as stuck while the cluster answered
    and was never replaced; the other seven tiers had rejoined. Now whether the cluster
    answers is what any consumer of the process reached lately."""
    clock = FakeClock()
    contact = ClusterContact(within=15, clock=clock)
    lost = GroupWatch("events", clock=clock, contact=contact)
    other = GroupWatch("retry-1s", clock=clock, contact=contact)
    alone = GroupWatch("events", clock=clock)  # (the rule before: its own view only)
    for watch in (lost, alone):
        watch.update(stats("init", state="query-coord") | brokers("DOWN"))
    clock.advance(31)
    assert not lost.stuck(300, uncoordinated=30)  # nobody reached the cluster: nothing to gain
    other.update(stats("steady") | brokers("UP"))
    assert lost.stuck(300, uncoordinated=30) and not alone.stuck(300, uncoordinated=30)
    clock.advance(16)  # the others' last contact is too old: the cluster may be gone
    assert not lost.stuck(300, uncoordinated=30)
