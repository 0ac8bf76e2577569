"""The worker's parts without processes or a broker: the partition state under a fake
clock, the in-flight budget, the consumer pump against a fake consumer, the tier worker
on a real event loop, and the dispatcher's outcome/decision path."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, cast

import pytest
from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from gateway.codec import Codec
from gateway.config import Config
from gateway.delivery import (
    BadRecord,
    Deferral,
    Delivered,
    Dispatcher,
    GiveUp,
    Job,
    Ownership,
    Pending,
    Retry,
    decide,
    first_delivery,
)
from gateway.errors import RegistryUnavailable
from gateway.events import parse_event
from gateway.observability import Health, Metrics
from gateway.ops import new_endpoint
from gateway.records import (
    Attempt,
    DeadLetter,
    DeadLetterReason,
    DeferReason,
    Delivery,
    DeliveryAttempt,
    Endpoint,
    Outcome,
)
from gateway.store import EndpointTable, Topics, due_at_of
from gateway.streaming import (
    Capacity,
    ConsumerPump,
    PartitionState,
    Pause,
    Renewal,
    Resume,
    TierWorker,
    fair_room,
    flow_control,
    in_turns,
    tier_workers,
)

from .conftest import free_port
from .fakes import FakeClock, FakeConsumer, FakeMessage, RecordingProducer, ScriptedSender

TOPIC = "t.retry-1s"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"


def job(offset: int, due_at: int = 0, *, pending: int | None = None, partition: int = 0) -> Job:
    content: Any = Pending(pending) if pending is not None else BadRecord(DeadLetterReason.INVALID, "x")
    return Job(FakeMessage(TOPIC, partition, offset), content, due_at)


# -- PartitionState ------------------------------------------------------------------------


def test_a_due_record_runs_at_once_and_nothing_is_paused() -> None:
    clock = FakeClock()
    state = PartitionState(TOPIC, 0)
    assert state.receive(job(0, clock.now_ms()), clock.now_ms())
    assert not state.pause_needed() and state.wake_at is None


def test_a_record_not_due_holds_it_and_everything_after_it_in_order() -> None:
    clock = FakeClock()
    state = PartitionState(TOPIC, 0)
    head_due = clock.now_ms() + 1000
    assert not state.receive(job(0, head_due), clock.now_ms())
    # Records behind the head are held even when due: their order is the schedule's.
    assert not state.receive(job(1, clock.now_ms() - 5), clock.now_ms())
    assert not state.receive(job(2, head_due + 500), clock.now_ms())
    assert state.pause_needed() and not state.pause_needed()  # asked once
    assert state.wake_at == head_due
    assert state.release(clock.advance_ms(999)) == []  # never a millisecond early
    released = state.release(clock.advance_ms(1))
    assert [j.offset for j in released] == [0, 1]
    assert state.wake_at == head_due + 500 and not state.resume_needed()
    assert [j.offset for j in state.release(clock.advance_ms(500))] == [2]
    assert state.resume_needed() and not state.resume_needed()
    assert state.wake_at is None


def test_a_rung_holds_each_record_until_its_own_due_time_and_lets_sooner_ones_pass() -> None:
    """A deferral rung's records come back each when its endpoint can take it: one due
    later does not hold back the ones behind it that are due sooner, and the partition is
    not paused until the bound; commits still stop at the first record not settled."""
    clock = FakeClock()
    state = PartitionState.by_due_time(TOPIC, 0, hold_limit=4)
    now = clock.now_ms()
    assert not state.receive(job(0, now + 60_000), now)
    assert not state.receive(job(1, now + 2_000), now)
    assert state.receive(job(2, now - 1), now)  # due: runs at once, past the held ones
    assert not state.receive(job(3, now + 2_000), now)
    assert not state.pause_needed() and state.wake_at == now + 2_000
    assert state.settle(2) is None  # 0 and 1 are held: the position stays
    assert state.release(clock.advance_ms(1_999)) == []
    assert [j.offset for j in state.release(clock.advance_ms(1))] == [1, 3]
    assert state.settle(1) is None and state.settle(3) is None
    assert state.wake_at == now + 60_000
    for offset in range(4, 8):
        state.receive(job(offset, now + 120_000), clock.now_ms())
    assert state.pause_needed() and state.holding == 5  # at the bound: fetch no more
    assert [j.offset for j in state.release(clock.advance_ms(58_000))] == [0]
    assert state.settle(0) == 4 and not state.resume_needed()  # 4 held, more than half the bound
    released = state.release(clock.advance_ms(60_000))
    assert [j.offset for j in released] == [4, 5, 6, 7] and state.resume_needed()


def test_a_rung_waits_behind_a_record_whose_schema_is_not_known_yet() -> None:
    clock = FakeClock()
    state = PartitionState.by_due_time(TOPIC, 0)
    now = clock.now_ms()
    assert not state.receive(job(0, pending=7), now)
    assert not state.receive(job(1, now - 1), now)  # due, but behind the one waiting for a schema
    assert state.pause_needed() and state.wake_at is None
    state.redecode(7, lambda j: job(j.offset, now + 5_000))
    assert [j.offset for j in state.release(now)] == [1]
    assert state.wake_at == now + 5_000 and state.resume_needed()


def test_held_records_keep_the_committable_position() -> None:
    clock = FakeClock()
    state = PartitionState(TOPIC, 0)
    assert state.receive(job(10, 0), clock.now_ms())
    assert not state.receive(job(11, clock.now_ms() + 100), clock.now_ms())
    assert state.settle(10) == 11  # stops at the held one
    assert state.tracker.position == 11
    (released,) = state.release(clock.advance_ms(100))
    assert state.settle(released.offset) == 12


def test_a_pending_schema_holds_the_partition_until_the_schema_comes() -> None:
    clock = FakeClock()
    state = PartitionState(TOPIC, 0)
    assert not state.receive(job(0, pending=7), clock.now_ms())
    assert not state.receive(job(1, 0), clock.now_ms())
    assert state.pause_needed()
    assert state.wake_at is None  # no timer: the schema's arrival wakes it
    assert state.release(clock.advance_ms(10_000)) == []
    assert state.pending_schemas() == {7}
    state.redecode(7, lambda j: job(j.offset, 0))
    assert [j.offset for j in state.release(clock.now_ms())] == [0, 1]
    assert state.resume_needed()


def test_revoke_drops_what_is_held_and_nothing_settles_after_it() -> None:
    clock = FakeClock()
    state = PartitionState(TOPIC, 0)
    assert state.receive(job(0, 0), clock.now_ms())
    assert state.receive(job(1, 0), clock.now_ms())
    assert not state.receive(job(2, clock.now_ms() + 1000), clock.now_ms())
    assert state.settle(0) == 1
    assert state.drop_held() == 1
    assert state.revoke() == 1  # the final position: 1 was still in flight
    assert state.settle(1) is None  # the next owner repeats it
    assert state.tracker.position == 1


def test_an_offset_received_twice_is_refused() -> None:
    state = PartitionState(TOPIC, 0)
    state.receive(job(5, 0), 0)
    with pytest.raises(ValueError):
        state.receive(job(5, 0), 0)


@given(st.lists(st.integers(0, 5_000), min_size=1, max_size=40),
       st.lists(st.integers(0, 3_000), min_size=1, max_size=40))
def test_nothing_is_ever_released_before_it_is_due_and_order_is_kept(
    dues: list[int], steps: list[int]
) -> None:
    clock = FakeClock(0)
    state = PartitionState(TOPIC, 0)
    ran: list[Job] = []
    for offset, due in enumerate(sorted(dues)):  # a tier's records come in due order
        received = job(offset, due)
        if state.receive(received, clock.now_ms()):
            assert received.due_at <= clock.now_ms()
            ran.append(received)
    for step in steps:
        for released in state.release(clock.advance_ms(step)):
            assert released.due_at <= clock.now_ms()
            ran.append(released)
    ran += state.release(clock.advance_ms(10_000))
    assert [j.offset for j in ran] == list(range(len(dues)))


# -- Capacity ------------------------------------------------------------------------------


def test_one_tier_may_use_the_whole_budget_while_no_other_needs_it() -> None:
    assert fair_room(100, {"events": 0, "retry-1s": 0}, set(), "events") == 100
    assert fair_room(100, {"events": 90, "retry-1s": 0}, set(), "events") == 10


def test_a_starved_tier_stops_the_tiers_above_their_share() -> None:
    used = {"events": 100, "retry-1s": 0}
    assert fair_room(100, used, set(), "retry-1s") == 0
    # retry-1s asked and found no room: events, above its share of 50, gets no more ...
    assert fair_room(100, {"events": 99, "retry-1s": 0}, {"retry-1s"}, "events") == 0
    # ... while retry-1s gets what frees up
    assert fair_room(100, {"events": 99, "retry-1s": 0}, {"retry-1s"}, "retry-1s") == 1
    # a tier below its share is never stopped by another's starvation
    assert fair_room(100, {"events": 10, "retry-1s": 60}, {"retry-1s"}, "events") == 30


def test_capacity_gives_a_starved_tier_its_share_back() -> None:
    capacity = Capacity(10, ["events", "retry-1s"])
    assert capacity.claim("events", 500) == 10  # a burst: it may have it all
    assert capacity.claim("retry-1s", 3) == 0  # starved now
    for _ in range(3):
        capacity.give("events")
        assert capacity.claim("events", 500) == 0  # above its share: it waits
        assert capacity.claim("retry-1s", 3 - capacity.used("retry-1s")) == 1
    assert capacity.used("retry-1s") == 3 and not capacity.starved("retry-1s")
    assert capacity.used("events") == 7
    capacity.give("events", 2)
    assert capacity.claim("events", 500) == 2  # nobody else is short: events may use it


def test_an_idle_tier_reserves_nothing() -> None:
    capacity = Capacity(8, ["events", "retry-1s", "retry-2s", "retry-3s"])
    assert capacity.claim("events", 8) == 8
    for tier in ("retry-1s", "retry-2s", "retry-3s"):
        assert capacity.claim(tier, 0) == 0 and not capacity.starved(tier)
    capacity.give("events", 8)
    assert capacity.claim("events", 8) == 8


def test_a_claim_not_met_in_full_tells_the_process_at_once() -> None:
    """A claim short of room calls ``on_short`` (the runner has the sender judge the shares
    then, not at its next tick); a claim met in full does not."""
    capacity = Capacity(4, ["events"])
    short: list[int] = []
    capacity.on_short = lambda: short.append(capacity.used())
    assert capacity.claim("events", 3) == 3 and short == []
    assert capacity.claim("events", 3) == 1 and short == [4]  # called once the room was taken
    assert capacity.claim("events", 1) == 0 and short == [4, 4]
    capacity.give("events", 4)
    assert capacity.claim("events", 2) == 2 and short == [4, 4]


def test_a_process_whose_consumer_finds_no_room_judges_the_shares_at_once() -> None:
    """How a process wires its budget to its sender (``flow_control``, what ``serve``
    uses): shares shrink only while records wait for room, and a consumer thread short of
    room has the sender judge them at once on the event loop, not at its next tick."""
    config = Config(concurrency=4)
    tiers = Topics.from_config(config).worker_tiers

    async def go() -> None:
        capacity, sender = flow_control(config, tiers, asyncio.get_running_loop())
        try:
            assert sender.contended is not None and not sender.contended()
            got = await asyncio.to_thread(capacity.claim, "events", 3)  # (a consumer thread)
            assert got == 3 and not sender.contended() and not sender.judging_soon
            judged_before = sender._judged_at
            assert await asyncio.to_thread(capacity.claim, "events", 3) == 1  # short of room
            assert sender.contended()
            async with asyncio.timeout(10):  # (no tick is running: only the short claim judges)
                while sender._judged_at == judged_before:
                    await asyncio.sleep(0.005)
            assert sender._ticker is None
        finally:
            await sender.aclose()

    asyncio.run(go())


def test_a_process_judges_each_tier_s_consumer_by_what_all_of_its_consumers_reach() -> None:
    """How a process wires its workers (``tier_workers``, what ``serve`` uses): one
    dispatcher and budget for all, ownership for the deliveries tier alone, and one
    ``ClusterContact`` shared by every tier's group watch, so that a consumer hunting for
    a coordinator while the process's others reach the cluster is replaced."""
    config = Config(bootstrap_servers=f"127.0.0.1:{free_port()}")  # (nothing listens: never joins)
    tiers = Topics.from_config(config).worker_tiers
    metrics = Metrics([t.name for t in Topics.from_config(config).tiers])

    async def go() -> None:
        loop = asyncio.get_running_loop()
        capacity, sender = flow_control(config, tiers, loop)
        dispatcher = _Dispatcher()
        ownership = Ownership(4)
        workers = tier_workers(config, tiers, dispatcher, capacity, loop,  # type: ignore[arg-type]
                               metrics=metrics, health=Health(), ownership=ownership)
        try:
            assert [w.tier for w in workers] == list(tiers)
            assert all(w.dispatcher is cast(Any, dispatcher) and w.capacity is capacity for w in workers)
            assert [w.ownership for w in workers] == [ownership if t.owner else None for t in tiers]
            contacts = {id(w._group.contact) for w in workers}
            assert len(contacts) == 1 and workers[0]._group.contact is not None
        finally:
            for worker in workers:
                worker.pump.consumer.close()
            await sender.aclose()

    asyncio.run(go())


def test_a_waiter_is_woken_once_the_room_it_waits_for_is_free_not_at_each_record() -> None:
    capacity = Capacity(10, ["events"])
    assert capacity.claim("events", 10) == 10
    woken = threading.Event()

    def waiter() -> None:
        capacity.wait(60, room=3)
        woken.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not capacity._wanted:  # (the waiter is waiting)
        time.sleep(0.001)
    capacity.give("events")
    capacity.give("events")
    assert not woken.wait(0.2)  # two records' room: not yet
    capacity.give("events")
    assert woken.wait(30)  # three: now
    thread.join()


@given(st.lists(st.tuples(st.sampled_from(["events", "retry-1s"]), st.integers(0, 30), st.integers(0, 30)),
                max_size=60))
def test_the_budget_is_never_exceeded_by_claims(steps: list[tuple[str, int, int]]) -> None:
    capacity = Capacity(20, ["events", "retry-1s"])
    for tier, wanted, giving in steps:
        give = min(giving, capacity.used(tier))
        capacity.give(tier, give)
        granted = capacity.claim(tier, wanted)
        assert 0 <= granted <= wanted
        assert capacity.used() <= 20


# -- ConsumerPump --------------------------------------------------------------------------


class Owner:
    """Stands in for the tier worker: records what the pump tells it."""

    def __init__(self) -> None:
        self.accepted: list[FakeMessage] = []
        self.claimed: list[bool] = []
        self.assigned_keys: list[tuple[str, int]] = []
        self.revocations: list[tuple[list[tuple[str, int]], bool]] = []
        self.pump: ConsumerPump | None = None
        self.store_on_revoke: dict[tuple[str, int], int] = {}

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.assigned_keys += partitions

    def revoked(self, partitions: list[tuple[str, int]], *, lost: bool) -> None:
        self.revocations.append((partitions, lost))
        assert self.pump is not None
        for key in partitions:  # what a worker stores while it releases
            if key in self.store_on_revoke:
                self.pump.store(*key, self.store_on_revoke[key])

    def accept(self, records: list[Any], claimed: list[bool]) -> None:
        self.accepted += records
        self.claimed += claimed

    def stopped(self, failure: BaseException | None) -> None:
        pass


def pump_with(consumer: FakeConsumer, capacity: Capacity) -> tuple[ConsumerPump, Owner]:
    """A pump run round by round by the test (no thread)."""
    owner = Owner()
    pump = ConsumerPump(consumer, "events", capacity, owner, pause_after=0)  # pause at once
    owner.pump = pump
    pump.subscribe(["t"])
    return pump, owner


def test_the_pump_hands_over_what_the_budget_has_room_for() -> None:
    consumer = FakeConsumer()
    capacity = Capacity(3, ["events"])
    pump, owner = pump_with(consumer, capacity)
    consumer.rebalance([("t", 0)])
    consumer.add(*(FakeMessage("t", 0, i) for i in range(5)))
    pump.run_once()
    assert [m.offset() for m in owner.accepted] == [0, 1, 2]
    assert capacity.used("events") == 3
    assert pump.budget_paused and consumer.paused == {("t", 0)}  # 3 and 4 wait in the pump
    capacity.give("events", 2)
    pump.run_once()
    assert [m.offset() for m in owner.accepted] == [0, 1, 2, 3, 4]
    assert not pump.budget_paused and consumer.paused == set()


def test_records_not_due_yet_take_no_room_and_starve_no_tier() -> None:
    """Fault: a deferral rung claimed room for every record it read, though the worker
    holds one not due yet at no cost. A rung that read a batch of returns due seconds
    later, while a slow bot's waiters filled the budget, was *starved*, and a starved tier
    stops the tiers above their share: in the fairness bench a fast bot's events waited
    up to 6 s (p95 4.6 s on Apache Kafka, one run in two or three)."""
    consumer, clock, owner = FakeConsumer(), FakeClock(), Owner()
    capacity = Capacity(4, ["events", "deferred-5s"])
    assert capacity.claim("events", 4) == 4  # the budget is full
    pump = ConsumerPump(consumer, "deferred-5s", capacity, owner, pause_after=0, clock=clock,
                        due_at=due_at_of)
    owner.pump = pump
    pump.subscribe(["t"])
    consumer.rebalance([("t", 0)])
    later, now = str(clock.now_ms() + 5_000).encode(), str(clock.now_ms()).encode()
    consumer.add(*(FakeMessage("t", 0, i, headers_=[("due-at", later)]) for i in range(3)))
    pump.run_once()
    assert [m.offset() for m in owner.accepted] == [0, 1, 2] and owner.claimed == [False] * 3
    assert not capacity.starved("deferred-5s") and capacity.used() == 4
    # One due now needs room: it waits for it (and what follows it, in order).
    consumer.add(FakeMessage("t", 0, 3, headers_=[("due-at", now)]),
                 FakeMessage("t", 0, 4, headers_=[("due-at", later)]), FakeMessage("t", 0, 5))  # (no header: due)
    pump.run_once()
    assert len(owner.accepted) == 3 and capacity.starved("deferred-5s")
    capacity.give("events", 2)
    pump.run_once()
    assert [m.offset() for m in owner.accepted] == [0, 1, 2, 3, 4, 5]
    assert owner.claimed == [False, False, False, True, False, True]
    assert capacity.used("deferred-5s") == 2 and not capacity.starved("deferred-5s")


def test_the_pump_lists_the_watermarks_of_paused_partitions_for_the_lag_metric() -> None:
    """Fault: with the budget full every partition is paused and no longer fetched, so
    the lag metric (from the watermark of the last fetch) stopped moving while records
    piled up: seen on Apache Kafka as lag 0 on a partition with 19 records unsettled."""
    consumer = FakeConsumer()
    capacity = Capacity(2, ["events"])
    owner = Owner()
    listed: list[dict[tuple[str, int], int]] = []
    pump = ConsumerPump(consumer, "events", capacity, owner, on_watermarks=listed.append, watermark_interval=0,
                         pause_after=0)
    owner.pump = pump
    pump.subscribe(["t"])
    consumer.rebalance([("t", 0), ("t", 1)])
    pump.run_once()
    assert listed == [] and consumer.listings == []  # nothing paused: the fetches tell
    consumer.add(*(FakeMessage("t", 0, i) for i in range(3)))
    pump.run_once()
    assert pump.budget_paused
    consumer.add(*(FakeMessage("t", 1, i) for i in range(7)))  # arrive while paused
    pump.run_once()
    assert listed[-1] == {("t", 0): 3, ("t", 1): 7}
    for _ in range(10):  # every record settles
        capacity.give("events", capacity.used("events"))
        pump.run_once()
    assert not pump.budget_paused and len(owner.accepted) == 10
    pump.send(Pause("t", 1))  # a retry tier's head not due: only that one is listed
    consumer.listings.clear()
    pump.run_once()
    assert set(consumer.listings) == {("t", 1)}


def test_a_budget_full_for_a_moment_waits_for_room_without_pausing() -> None:
    """Fault: the pump paused the assignment at every full budget. librdkafka drops what it
    prefetched for a paused partition and fetches again ~0.9 s after the resume, so a busy
    worker delivered 1,500 records a second instead of thousands (bench/run.py). On a
    fake clock: records wait for room up to ``pause_after``, and only then is the
    assignment paused (and polled)."""
    consumer = FakeConsumer()
    capacity = Capacity(2, ["events"])
    owner = Owner()
    clock = FakeClock()
    pump = ConsumerPump(consumer, "events", capacity, owner, pause_after=2.0, poll_timeout=0, clock=clock)
    owner.pump = pump
    pump.subscribe(["t"])
    consumer.rebalance([("t", 0)])
    consumer.add(*(FakeMessage("t", 0, i) for i in range(5)))
    pump.run_once()
    assert len(owner.accepted) == 2 and not pump.budget_paused
    polls = consumer.polls
    pump.run_once()  # no room: waits for it (the grace starts), neither pausing nor fetching more
    assert consumer.polls == polls and consumer.paused == set()
    capacity.give("events", 2)
    clock.advance(1.0)
    pump.run_once()
    assert len(owner.accepted) == 4 and consumer.paused == set()  # one still waits
    clock.advance(0.999)
    pump.run_once()
    assert not pump.budget_paused and consumer.polls == polls
    clock.advance(0.001)  # records waited 2 s for room: now it pauses the assignment and polls
    pump.run_once()
    assert pump.budget_paused and consumer.paused == {("t", 0)} and consumer.polls == polls + 1


def test_paused_partitions_watermarks_are_listed_once_an_interval() -> None:
    """The broker is asked for a paused partition's high watermark at most every
    ``watermark_interval`` (each request may wait for the broker), on a fake clock."""
    consumer = FakeConsumer()
    capacity = Capacity(1, ["events"])
    owner = Owner()
    listed: list[dict[tuple[str, int], int]] = []
    clock = FakeClock()
    pump = ConsumerPump(consumer, "events", capacity, owner, on_watermarks=listed.append, watermark_interval=5.0,
                         pause_after=0, poll_timeout=0, clock=clock)
    owner.pump = pump
    pump.subscribe(["t"])
    consumer.rebalance([("t", 0)])
    consumer.add(*(FakeMessage("t", 0, i) for i in range(3)))
    clock.advance(5)
    pump.run_once()
    assert pump.budget_paused and listed == []  # paused in this round: listed from the next
    clock.advance(5)
    pump.run_once()
    assert listed == [{("t", 0): 3}]
    for _ in range(4):
        clock.advance(1.2)  # 4.8 s in all: not yet
        pump.run_once()
    assert len(listed) == 1 and consumer.listings == [("t", 0)]
    clock.advance(0.2)
    pump.run_once()
    assert len(listed) == 2


def test_the_pump_keeps_polling_with_the_budget_full_and_the_assignment_paused() -> None:
    """Fault: polling stopped while there was no room, so a worker whose budget stayed
    full (a broker that is down, a slow receiver) went past max.poll.interval.ms and was
    evicted from its group."""
    consumer = FakeConsumer()
    capacity = Capacity(2, ["events"])
    pump, owner = pump_with(consumer, capacity)
    consumer.rebalance([("t", 0), ("t", 1)])
    consumer.add(*(FakeMessage("t", p, i) for p in (0, 1) for i in range(5)))
    pump.run_once()
    assert capacity.used("events") == 2
    polls = consumer.polls
    for _ in range(10):
        pump.run_once()
    assert consumer.polls == polls + 10  # still polling: the group keeps us
    assert consumer.paused == {("t", 0), ("t", 1)} and pump.budget_paused
    assert len(owner.accepted) == 2
    consumer.rebalance([("t", 0), ("t", 1), ("t", 2)])  # a partition assigned meanwhile comes paused
    assert ("t", 2) in consumer.paused
    capacity.give("events", 2)
    pump.run_once()
    assert len(owner.accepted) == 4


def test_the_budget_resumes_everything_but_what_the_loop_paused() -> None:
    consumer = FakeConsumer()
    capacity = Capacity(1, ["events"])
    pump, owner = pump_with(consumer, capacity)
    consumer.rebalance([("t", 0), ("t", 1)])
    pump.send(Pause("t", 1))  # its head is not due
    consumer.add(FakeMessage("t", 0, 0), FakeMessage("t", 0, 1))
    pump.run_once()
    assert consumer.paused == {("t", 0), ("t", 1)}  # offset 1 waits for room
    capacity.give("events")
    pump.run_once()
    assert [m.offset() for m in owner.accepted] == [0, 1]
    assert ("t", 1) in consumer.paused and ("t", 0) not in consumer.paused
    pump.send(Resume("t", 1))
    pump.run_once()
    assert ("t", 1) not in consumer.paused


def test_a_batch_is_taken_from_its_partitions_in_turns_each_in_its_own_order() -> None:
    """Fault: librdkafka returns a partition's records together, and they were started in
    that order: at a full budget on Apache Kafka a slow endpoint's backlog of hundreds was
    started (and put off) before another bot's records of the same batch, which waited
    100-300 ms behind that work on the event loop. Now the partitions take turns."""
    slow = [FakeMessage("t", 0, o) for o in range(5)]
    fast = [FakeMessage("t", 1, o) for o in range(2)]
    other = [FakeMessage("u", 0, 7)]
    turns = in_turns([*slow, *fast, *other])
    assert [(m.topic(), m.partition(), m.offset()) for m in turns] == [
        ("t", 0, 0), ("t", 1, 0), ("u", 0, 7), ("t", 0, 1), ("t", 1, 1), ("t", 0, 2), ("t", 0, 3), ("t", 0, 4)]
    assert in_turns(slow) == slow

    consumer = FakeConsumer()
    capacity = Capacity(3, ["events"])
    pump, owner = pump_with(consumer, capacity)
    consumer.rebalance([("t", 0), ("t", 1)])
    consumer.add(*slow, *fast)
    pump.run_once()  # room for 3: the other partition's records are among them
    assert [(m.partition(), m.offset()) for m in owner.accepted] == [(0, 0), (1, 0), (0, 1)]


def test_records_waiting_for_room_are_dropped_when_their_partition_goes() -> None:
    consumer = FakeConsumer()
    capacity = Capacity(1, ["events"])
    pump, owner = pump_with(consumer, capacity)
    consumer.rebalance([("t", 0), ("t", 1)])
    consumer.add(FakeMessage("t", 0, 0), FakeMessage("t", 0, 1), FakeMessage("t", 1, 0))
    pump.run_once()
    assert len(owner.accepted) == 1 and capacity.starved("events")
    consumer.rebalance([("t", 1)])  # partition 0 goes: its waiting record is the next owner's
    capacity.give("events")
    pump.run_once()
    assert [(m.partition(), m.offset()) for m in owner.accepted] == [(0, 0), (1, 0)]


def test_positions_are_stored_between_polls_and_committed_on_revoke() -> None:
    consumer = FakeConsumer()
    pump, owner = pump_with(consumer, Capacity(10, ["events"]))
    consumer.rebalance([("t", 0), ("t", 1)])
    pump.store("t", 0, 5)
    pump.store("t", 0, 7)  # the latest wins
    pump.run_once()
    assert consumer.stored == {("t", 0): 7}
    owner.store_on_revoke = {("t", 1): 3}
    consumer.rebalance([("t", 0)])
    assert owner.revocations == [([("t", 1)], False)]
    # what the owner stored while releasing is stored before the commit
    assert consumer.stored[("t", 1)] == 3 and consumer.commits == 1


def test_a_lost_partition_is_released_without_a_commit() -> None:
    consumer = FakeConsumer()
    _pump, owner = pump_with(consumer, Capacity(10, ["events"]))
    consumer.rebalance([("t", 0)])
    consumer.callbacks["on_lost"](consumer, consumer.assignment())
    assert owner.revocations == [([("t", 0)], True)] and consumer.commits == 0


def test_a_consumer_replaced_drops_its_partitions_as_lost_and_the_new_one_subscribes() -> None:
    """The pump replaces a consumer its renewal says is stuck: what it held is released as
    lost, settled positions go to the old consumer before its close (which commits them),
    the new one subscribes to the same topics, and the old one's callbacks are ignored."""
    stuck, fresh = FakeConsumer(), FakeConsumer()
    due = [True]
    made: list[FakeConsumer] = []

    def create() -> FakeConsumer:
        due[0] = False
        made.append(fresh)
        return fresh

    owner = Owner()
    pump = ConsumerPump(stuck, "events", Capacity(10, ["events"]), owner,
                        renew=Renewal(due=lambda: due[0], create=create, close_timeout=5))
    owner.pump = pump
    pump.subscribe(["t"])
    stuck.rebalance([("t", 0), ("t", 1)])
    owner.store_on_revoke = {("t", 1): 4}
    pump.run_once()
    assert made == [fresh] and pump.consumer is fresh
    assert owner.revocations == [([("t", 0), ("t", 1)], True)]
    assert stuck.closed and stuck.stored == {("t", 1): 4}  # the close committed what was settled
    assert "on_assign" in fresh.callbacks  # subscribed to the same topics, with the pump's callbacks
    fresh.rebalance([("t", 0), ("t", 1), ("t", 2)])
    assert owner.assigned_keys[-3:] == [("t", 0), ("t", 1), ("t", 2)]
    stuck.callbacks["on_assign"](stuck, [TopicPartition("t", 5)])  # a late callback of the old one
    assert ("t", 5) not in owner.assigned_keys and ("t", 5) not in pump.assigned
    pump.run_once()
    assert made == [fresh]  # not due again


# -- TierWorker on a real event loop -------------------------------------------------------


class _Dispatcher:
    """Stands in for the dispatcher: jobs from raw bytes (b"due:<ms>" or b"ok"), and a
    run that waits for the test's go-ahead when told to."""

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.gate: asyncio.Event | None = None
        self.codec = Codec()

    def prepare(self, tier: Any, message: Any) -> Job:
        value = message.value()
        due = int(value.split(b":")[1]) if value.startswith(b"due:") else 0
        return Job(message, BadRecord(DeadLetterReason.INVALID, "x"), due)

    async def run(self, tier: Any, job: Job) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.ran.append(job.offset)


def _worker(consumer: FakeConsumer, dispatcher: _Dispatcher, loop: asyncio.AbstractEventLoop, clock: FakeClock,
            **config: Any) -> TierWorker:
    ownership = config.pop("ownership", None)
    cfg = Config(topic_prefix="t", retry_delays=(1,), shutdown_timeout=config.pop("shutdown_timeout", 2.0), **config)
    tier = Topics.from_config(cfg).tiers[1]
    return TierWorker(tier, cfg, dispatcher, Capacity(100, [tier.name]), loop,  # type: ignore[arg-type]
                      metrics=Metrics([t.name for t in Topics.from_config(cfg).tiers]), health=Health(),
                      consumer=consumer, clock=clock, ownership=ownership)


async def _until(predicate: Any) -> None:
    """Until ``predicate`` holds: the worker's timers are on the fake clock, so this waits
    only for the pump's thread to hand records over (milliseconds); the bound is a
    safety net, not a timing."""
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.001)


async def _settle() -> None:
    """Let the event loop run what is ready (no time passes on the fake clock)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_worker_holds_a_retry_until_due_then_settles_in_order() -> None:
    """A retry is run at its due time on the worker's clock, never a millisecond early, and
    the records behind it wait with it; the partition is paused meanwhile, then resumed."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        consumer = FakeConsumer()
        dispatcher = _Dispatcher()
        clock = FakeClock()
        worker = _worker(consumer, dispatcher, loop, clock)
        topic = "t.retry-1s"
        due = clock.now_ms() + 300_000  # five minutes, on the fake clock
        consumer.add(FakeMessage(topic, 0, 0, b"ok"), FakeMessage(topic, 0, 1, f"due:{due}".encode()),
                     FakeMessage(topic, 0, 2, b"ok"))
        worker.start()
        consumer.rebalance([(topic, 0)])  # (as if from within poll: the fake's lists are simple)
        await _until(lambda: dispatcher.ran == [0] and (topic, 0) in consumer.paused and clock.timers == 1)
        clock.advance(299.999)
        await _settle()
        assert dispatcher.ran == [0]  # 2 is due, but waits behind 1; 1 is not due yet
        clock.advance(0.001)
        await _until(lambda: dispatcher.ran == [0, 1, 2])
        assert clock.now_ms() >= due
        await _until(lambda: consumer.stored.get((topic, 0)) == 3 and (topic, 0) not in consumer.paused)
        await worker.stop()
        assert consumer.closed

    asyncio.run(go())


def test_the_budget_is_even_whether_a_record_was_handed_over_with_room_or_without() -> None:
    """A record not due by its header is handed over without room (67d847e): the worker
    takes room for it when it runs (held until due, or due by the time it arrived) and
    gives back room only for one that had it. Every path ends with the budget at 0."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        consumer, dispatcher, clock = FakeConsumer(), _Dispatcher(), FakeClock()
        worker = _worker(consumer, dispatcher, loop, clock)
        topic, now = "t.retry-1s", clock.now_ms()
        later = [("due-at", str(now + 5_000).encode())]
        consumer.add(
            FakeMessage(topic, 0, 0, f"due:{now + 5_000}".encode(), headers_=later),  # held, no room
            FakeMessage(topic, 0, 1, b"ok", headers_=[("due-at", str(now).encode())]),  # room, held behind 0
            FakeMessage(topic, 1, 0, b"ok", headers_=later),  # no room, but due when it arrives
        )
        worker.start()
        consumer.rebalance([(topic, 0), (topic, 1)])
        await _until(lambda: dispatcher.ran == [0] and clock.timers == 1)
        await _settle()
        assert worker.capacity.used() == 0  # what ran settled, what is held costs nothing
        clock.advance(5)
        await _until(lambda: sorted(dispatcher.ran) == [0, 0, 1])
        await _settle()
        assert worker.capacity.used() == 0
        await worker.stop()

    asyncio.run(go())


def test_the_oldest_record_age_is_that_of_the_oldest_record_taken_and_not_settled() -> None:
    """gateway_oldest_record_age_seconds: from the Kafka timestamp of the oldest record in
    flight or held, to now; it drops as records settle, to 0 when none is left."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        consumer, dispatcher, clock = FakeConsumer(), _Dispatcher(), FakeClock()
        dispatcher.gate = asyncio.Event()
        worker = _worker(consumer, dispatcher, loop, clock)
        topic, now = "t.retry-1s", clock.now_ms()
        consumer.add(FakeMessage(topic, 0, 0, b"ok", timestamp_ms=now - 60_000),
                     FakeMessage(topic, 0, 1, f"due:{now + 5_000}".encode(), timestamp_ms=now - 10_000))
        assert worker.oldest_record_age() == 0
        worker.start()
        consumer.rebalance([(topic, 0)])
        await _until(lambda: clock.timers == 1)  # 0 in flight (held at the gate), 1 held until due
        assert worker.oldest_record_age() == 60
        dispatcher.gate.set()
        await _until(lambda: dispatcher.ran == [0])
        await _settle()
        assert worker.oldest_record_age() == 10
        clock.advance(5)
        await _until(lambda: dispatcher.ran == [0, 1])
        await _settle()
        assert worker.oldest_record_age() == 0
        await worker.stop()

    asyncio.run(go())


def test_the_worker_hands_over_what_is_still_in_flight_after_the_shutdown_timeout() -> None:
    """Stopping waits ``shutdown_timeout`` on the worker's clock for the records in flight,
    then commits what settled and hands the rest over (the next owner repeats it)."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        consumer = FakeConsumer()
        dispatcher = _Dispatcher()
        dispatcher.gate = asyncio.Event()  # never set: the record stays in flight
        clock = FakeClock()
        worker = _worker(consumer, dispatcher, loop, clock, shutdown_timeout=30.0)
        topic = "t.retry-1s"
        consumer.add(FakeMessage(topic, 0, 0, b"ok"))
        worker.start()
        consumer.rebalance([(topic, 0)])
        await _until(lambda: worker.partitions.get((topic, 0)) is not None
                     and worker.partitions[(topic, 0)].tracker.unsettled == 1)
        stopping = asyncio.ensure_future(worker.stop())
        await _until(lambda: clock.timers == 1)  # releasing: waiting for the record in flight
        clock.advance(29.999)
        await _settle()
        assert not stopping.done() and consumer.commits == 0
        clock.advance(0.001)
        await _until(stopping.done)
        assert (topic, 0) not in consumer.stored  # nothing settled: the next owner repeats it
        assert consumer.commits == 1

    asyncio.run(go())


def test_a_rebalance_waits_less_than_a_session_and_an_owner_makes_no_attempt_after_it() -> None:
    """Fault: releasing partitions in a rebalance waited up to ``shutdown_timeout`` (30 s)
    for the records in flight. librdkafka sends no heartbeat while the revoke runs, so
    past the session timeout (10 s) the process was evicted, its partitions went to
    another, and it kept attempting at endpoints it no longer owned: three workers
    sharing an endpoint limited to 20/s sent it 40/s for ~17 s (the bursts bench, Kafka).
    A rebalance now waits at most half the session, and the owning tier's worker cancels
    what is still running: the next owner repeats it, nothing makes a request after."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        consumer = FakeConsumer()
        dispatcher = _Dispatcher()
        dispatcher.gate = asyncio.Event()  # held until the test says: an attempt in flight
        clock = FakeClock()
        worker = _worker(consumer, dispatcher, loop, clock, shutdown_timeout=30.0, session_timeout_ms=10_000,
                         ownership=Ownership(6))
        topic = "t.retry-1s"
        consumer.add(FakeMessage(topic, 0, 0, b"ok"))
        worker.start()
        consumer.rebalance([(topic, 0)])
        await _until(lambda: worker.partitions.get((topic, 0)) is not None
                     and worker.partitions[(topic, 0)].tracker.unsettled == 1)
        revoking = asyncio.ensure_future(asyncio.to_thread(consumer.rebalance, []))  # (the pump's thread)
        await _until(lambda: clock.timers == 1)  # releasing: waiting for the record in flight
        clock.advance(4.999)
        await _settle()
        assert not revoking.done()
        clock.advance(0.001)
        await _until(revoking.done)
        dispatcher.gate.set()
        await _settle()
        assert dispatcher.ran == []  # cancelled: no attempt after the partition went
        assert (topic, 0) not in consumer.stored  # nothing settled: the next owner repeats it
        await worker.stop()

    asyncio.run(go())


class _Registry:
    """Stands in for the codec's registry lookups: away for the first ``outages`` calls."""

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.calls = 0

    def fetch_schema(self, schema_id: int) -> None:
        self.calls += 1
        if self.calls <= self.outages:
            raise RegistryUnavailable(f"registry away ({self.calls})")

    @property
    def answered(self) -> bool:
        return self.calls > self.outages


class _WaitingForSchemas(_Dispatcher):
    """Records of b"pending" wait for schema 7 until the registry has answered."""

    def __init__(self, registry: _Registry) -> None:
        super().__init__()
        self.codec = registry  # type: ignore[assignment]
        self.registry = registry

    def prepare(self, tier: Any, message: Any) -> Job:
        if message.value() == b"pending" and not self.registry.answered:
            return Job(message, Pending(7), 0)
        return super().prepare(tier, message)


def test_a_schema_lookup_is_retried_with_backoff_on_the_workers_clock() -> None:
    """While the registry is away, the partition waits (paused) and the lookup is tried
    again after 0.5 s, then 1 s, ... on the worker's clock; once answered, the records
    are decoded again and run in order."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        consumer = FakeConsumer()
        registry = _Registry(outages=2)
        dispatcher = _WaitingForSchemas(registry)
        clock = FakeClock()
        worker = _worker(consumer, dispatcher, loop, clock)
        topic = "t.retry-1s"
        consumer.add(FakeMessage(topic, 0, 0, b"pending"), FakeMessage(topic, 0, 1, b"ok"))
        worker.start()
        consumer.rebalance([(topic, 0)])
        await _until(lambda: registry.calls == 1 and clock.timers == 1)
        assert dispatcher.ran == [] and (topic, 0) in consumer.paused
        clock.advance(0.499)
        await _settle()
        assert registry.calls == 1
        clock.advance(0.001)
        await _until(lambda: registry.calls == 2 and clock.timers == 1)  # away again: next in 1 s
        clock.advance(0.999)
        await _settle()
        assert registry.calls == 2 and dispatcher.ran == []
        clock.advance(0.001)
        await _until(lambda: dispatcher.ran == [0, 1])
        await _until(lambda: consumer.stored.get((topic, 0)) == 2 and (topic, 0) not in consumer.paused)
        await worker.stop()

    asyncio.run(go())


# -- Dispatcher: outcomes, decisions, and what one attempt's failure costs --------------------


def _event_message(doc: dict[str, Any]) -> FakeMessage:
    value = Codec().encode("gateway.events.Message", parse_event(doc).to_record(), topic="x")
    return FakeMessage("u.events", 0, 3, value)


def _dispatcher(endpoints: list[Endpoint], answers: dict[str, int | BaseException | Deferral], *,
                clock: FakeClock | None = None) -> tuple[Dispatcher, RecordingProducer, ScriptedSender, Metrics]:
    cfg = Config(topic_prefix="u", retry_delays=(1, 2), defer_max_age=3600)
    table = EndpointTable()
    for e in endpoints:
        table.apply(e.id, e)
    producer = RecordingProducer()
    sender = ScriptedSender(answers)
    metrics = Metrics([t.name for t in Topics.from_config(cfg).tiers])
    dispatcher = Dispatcher(cfg, codec=Codec(), endpoints=table, sender=sender,  # type: ignore[arg-type]
                            producer=producer, metrics=metrics, clock=clock or FakeClock())
    return dispatcher, producer, sender, metrics


DOC = {"event": "MESSAGE", "botId": BOT, "sessionId": str(uuid.uuid4()), "role": "USER", "message": "hi",
       "messageId": str(uuid.uuid4())}


def test_a_fan_out_where_one_attempt_raises_tracks_the_others() -> None:
    """Fault: one attempt that raised dead-lettered the whole record as ``invalid``, and the
    record was settled while its other attempts were still running, untracked: their
    failures could be lost to a crash. Now each pair stands alone: the one that raised is
    dead-lettered as internal_error with its delivery, the others complete (here: one
    delivered, one sent on to the retry tier) before run() returns."""
    ok, broken, failing = (new_endpoint(bot_id=BOT, url=f"https://{n}.example/hook") for n in "abc")
    dispatcher, producer, sender, _metrics = _dispatcher(
        [ok, broken, failing], {ok.id: 204, broken.id: RuntimeError("boom"), failing.id: 503})
    tier = dispatcher.tiers[0]
    job = dispatcher.prepare(tier, _event_message(DOC))
    asyncio.run(dispatcher.run(tier, job))
    assert sorted(e for e, _ in sender.sent) == sorted([ok.id, broken.id, failing.id])
    written = {topic: Codec().decode(value)[1] for topic, _, value, _ in producer.records}
    assert set(written) == {"u.retry-1s", "u.dlq", "u.attempts"}
    history = [DeliveryAttempt.from_record(Codec().decode(v)[1]) for t, _, v, _ in producer.records
               if t == "u.attempts"]
    assert sorted(str(h.next) for h in history) == ["dead:internal_error", "delivered", "retry:retry-1s"]
    retry = Delivery.from_record(written["u.retry-1s"])
    assert retry.endpoint_id == failing.id and retry.attempts[0].outcome is Outcome.HTTP_ERROR
    dead = DeadLetter.from_record(written["u.dlq"])
    assert dead.reason == DeadLetterReason.INTERNAL_ERROR.value == "internal_error"
    assert dead.delivery is not None and dead.delivery.endpoint_id == broken.id
    assert dead.delivery.attempts[-1].outcome is Outcome.INTERNAL_ERROR
    assert "boom" in dead.detail


def test_an_unusable_secret_dead_letters_that_endpoint_alone() -> None:
    """An endpoint record written straight to the topic with a secret that is not base64
    (the real sender raises InvalidSecret while signing)."""
    from gateway.delivery import Sender

    good = new_endpoint(bot_id=BOT, url="http://127.0.0.1:9/hook")
    bad = Endpoint(id=str(uuid.uuid4()), bot_id=BOT, url="http://127.0.0.1:9/other",
                   secret="whsec_!!!not-base64", created_at=1, updated_at=1)
    cfg = Config(topic_prefix="u", retry_delays=(1, 2), allow_private_networks=True, request_timeout=2.0)
    table = EndpointTable()
    for e in (good, bad):
        table.apply(e.id, e)
    producer = RecordingProducer()

    async def go() -> None:
        sender = Sender(cfg)
        metrics = Metrics([t.name for t in Topics.from_config(cfg).tiers])
        dispatcher = Dispatcher(cfg, codec=Codec(), endpoints=table, sender=sender, producer=producer,
                                metrics=metrics)
        tier = dispatcher.tiers[0]
        await dispatcher.run(tier, dispatcher.prepare(tier, _event_message(DOC)))
        await sender.aclose()

    asyncio.run(go())
    written = [(t, Codec().decode(v)[1]) for t, _, v, _ in producer.records if t != "u.attempts"]
    topics = sorted(t for t, _ in written)
    assert topics == ["u.dlq", "u.retry-1s"]  # the good one's refused connection is retried
    dead = DeadLetter.from_record(next(r for t, r in written if t == "u.dlq"))
    assert dead.reason == "internal_error" and dead.delivery is not None
    assert dead.delivery.endpoint_id == bad.id
    assert "!!!" not in dead.detail  # never the secret


def _deferred_message(dispatcher: Dispatcher, delivery: Delivery) -> FakeMessage:
    rung = dispatcher.topics.deferral_tiers[0]
    value = Codec().encode("gateway.Delivery", delivery.to_record(), topic=rung.topic)
    return FakeMessage(rung.topic, 0, 9, value)


def test_a_deferred_delivery_past_the_age_limit_when_it_comes_due_is_dead_lettered_unsent() -> None:
    """Fault: the age limit was checked only when a delivery was deferred again, so one that
    came due past it was attempted anyway (or deferred once more and then expired). Now a
    delivery back from a deferral rung past GATEWAY_DEFER_MAX_AGE is dead-lettered as
    deferral_expired without a request; one within it is attempted."""
    clock = FakeClock()
    endpoint = new_endpoint(bot_id=BOT, url="https://a.example/hook")
    dispatcher, producer, sender, _ = _dispatcher([endpoint], {endpoint.id: 204}, clock=clock)
    rung = dispatcher.topics.deferral_tiers[0]
    event = parse_event(DOC)
    old = replace(first_delivery(event, endpoint, event.json_body()), deferrals=7,
                  deferred_since=clock.now_ms() - 3600_001, due_at=clock.now_ms())
    asyncio.run(dispatcher.run(rung, dispatcher.prepare(rung, _deferred_message(dispatcher, old))))
    assert sender.sent == []
    dead = [DeadLetter.from_record(Codec().decode(v)[1]) for t, _, v, _ in producer.records if t == "u.dlq"]
    assert [d.reason for d in dead] == [DeadLetterReason.DEFERRAL_EXPIRED]
    young = replace(old, deferred_since=clock.now_ms() - 3599_000)
    asyncio.run(dispatcher.run(rung, dispatcher.prepare(rung, _deferred_message(dispatcher, young))))
    assert [e for e, _ in sender.sent] == [endpoint.id]


def _written(producer: RecordingProducer, topic: str) -> list[Delivery]:
    return [Delivery.from_record(Codec().decode(v)[1]) for t, _, v, _ in producer.records if t == topic]


def test_a_deferred_delivery_is_due_when_its_endpoint_can_take_it_on_the_rung_of_that_wait() -> None:
    """Fault: a deferred delivery came back after a fixed delay chosen by how often it had
    been deferred (three times 5 s, then 1 m, then 10 m), whatever its endpoint could take.
    Now it is due when the sender says the endpoint can take it (``after``), on the rung
    of that wait, and never later than the age limit."""
    clock = FakeClock()
    endpoint = new_endpoint(bot_id=BOT, url="https://a.example/hook")
    for after, rung in ((0.01, "deferred-5s"), (42.0, "deferred-5s"), (61.0, "deferred-1m"),
                        (5000.0, "deferred-10m")):
        deferral = Deferral(DeferReason.SHARE, "full while others wait", after)
        dispatcher, producer, _, _ = _dispatcher([endpoint], {endpoint.id: deferral}, clock=clock)
        tier = dispatcher.tiers[0]
        asyncio.run(dispatcher.run(tier, dispatcher.prepare(tier, _event_message(DOC))))
        [deferred] = _written(producer, f"u.{rung}")
        wait = min(max(after, 0.25), 3600.0)  # at least a round trip; at most the age limit
        assert deferred.due_at == clock.now_ms() + math.ceil(wait * 1000), (after, rung)
        assert deferred.attempt == 0 and deferred.deferrals == 1


def test_only_a_deliverys_last_attempt_is_told_it_is_the_last() -> None:
    """The sender defers the last attempt rather than spend it on an open circuit: the
    dispatcher says which attempt is the last (the one made from the last retry tier)."""
    endpoint = new_endpoint(bot_id=BOT, url="https://a.example/hook")
    dispatcher, _, sender, _ = _dispatcher([endpoint], {endpoint.id: 503})
    event = parse_event(DOC)
    delivery = first_delivery(event, endpoint, event.json_body())
    # Equal tiers, not the dispatcher's own objects: a worker's come from its own Topics.
    # (They once were compared by identity, so the last attempt was never the last.)
    for tier in map(replace, dispatcher.tiers):
        message = FakeMessage(tier.topic, 0, 1, Codec().encode("gateway.Delivery", delivery.to_record(),
                                                                  topic=tier.topic))
        if tier.is_events:
            message = _event_message(DOC)
        asyncio.run(dispatcher.run(tier, dispatcher.prepare(tier, message)))
    assert sender.last == [False, False, True]


def test_a_process_attempts_the_endpoints_it_owns_and_forwards_the_others_to_their_owner() -> None:
    """One process owns an endpoint for the whole gateway (the partition of the deliveries
    topic that holds it): an event fanned out to an endpoint owned elsewhere is forwarded
    there, to the endpoint's partition, for the events tier's attempt; one owned here is
    attempted here. On the deliveries topic a record is always attempted, for the tier its
    header names: the owner attempts it."""
    mine, theirs = (replace(new_endpoint(bot_id=BOT, url=f"https://{n}.example/hook"), id=f"endpoint-{n}")
                    for n in "ab")
    dispatcher, producer, sender, metrics = _dispatcher([mine, theirs], {mine.id: 204, theirs.id: 204})
    ownership = Ownership(12)
    ownership.gained([ownership.partition_of(mine.id)])
    ownership.learned()
    assert not ownership.owns(theirs.id)  # (their ids fall on different partitions)
    dispatcher.ownership = ownership
    events = dispatcher.tiers[0]
    asyncio.run(dispatcher.run(events, dispatcher.prepare(events, _event_message(DOC))))
    assert [e for e, _ in sender.sent] == [mine.id]
    [forwarded] = _written(producer, "u.deliveries")
    assert forwarded.endpoint_id == theirs.id and forwarded.attempt == 0 and forwarded.attempts == ()
    index = [t for t, *_ in producer.records].index("u.deliveries")
    assert producer.partitions[index] == ownership.partition_of(theirs.id)
    headers = dict(producer.records[index][3])
    assert headers["schedule-tier"] == b"events" and metrics.forwarded._value.get() == 1

    owner_tier = dispatcher.topics.deliveries_tier
    value = Codec().encode("gateway.Delivery", forwarded.to_record(), topic=owner_tier.topic)
    message = FakeMessage(owner_tier.topic, ownership.partition_of(theirs.id), 4, value,
                          headers_=[("schedule-tier", b"retry-1s")])
    job = dispatcher.prepare(owner_tier, message)
    assert job.due_at == 0 and job.schedule == "retry-1s"
    asyncio.run(dispatcher.run(owner_tier, job))
    assert [e for e, _ in sender.sent] == [mine.id, theirs.id]  # attempted, owned or not
    [line] = [DeliveryAttempt.from_record(Codec().decode(v)[1]) for t, _, v, _ in producer.records
              if t == "u.attempts" and DeliveryAttempt.from_record(Codec().decode(v)[1]).endpoint_id == theirs.id]
    assert line.attempt.tier == "retry-1s"


def test_a_starting_process_waits_to_learn_what_it_owns_before_forwarding() -> None:
    """Until the deliveries topic's partitions are first assigned, a process cannot tell
    its endpoints from another's: an event waits for the assignment instead of being
    forwarded (a process restarting on a backlog would forward what it is about to own)."""
    endpoint = replace(new_endpoint(bot_id=BOT, url="https://a.example/hook"), id="endpoint-a")
    dispatcher, producer, sender, _ = _dispatcher([endpoint], {endpoint.id: 204})
    ownership = Ownership(12)
    dispatcher.ownership = ownership
    events = dispatcher.tiers[0]

    async def go() -> None:
        running = asyncio.create_task(dispatcher.run(events, dispatcher.prepare(events, _event_message(DOC))))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not running.done() and sender.sent == [] and producer.records == []
        ownership.gained(range(12))
        ownership.learned()
        await running

    asyncio.run(go())
    assert [e for e, _ in sender.sent] == [endpoint.id]
    assert _written(producer, "u.deliveries") == []


def test_decide_sends_a_failure_on_and_a_410_disables() -> None:
    tiers = Topics.from_config(Config(retry_delays=(1, 2))).tiers
    endpoint = new_endpoint(bot_id=BOT, url="https://a.example/hook")
    event = parse_event(DOC)
    body = event.json_body()
    at = 1_700_000_000_000

    def attempt(outcome: Outcome, status: int | None = None) -> Attempt:
        return Attempt(at=at, tier="events", duration_ms=10.0, outcome=outcome, status=status)

    delivered = decide(tiers, tiers[0], event, endpoint, attempt(Outcome.SUCCESS, 200), body)
    assert delivered.step == Delivered() and delivered.delivery is None
    failed = decide(tiers, tiers[0], event, endpoint, attempt(Outcome.TIMEOUT), body)
    assert isinstance(failed.step, Retry) and failed.delivery is not None
    assert failed.delivery.attempt == 1 and failed.delivery.due_at == failed.step.due_at
    assert json.loads(failed.delivery.payload) == DOC and not failed.disable_endpoint
    gone = decide(tiers, tiers[1], failed.delivery, endpoint, attempt(Outcome.HTTP_ERROR, 410), body)
    assert isinstance(gone.step, GiveUp) and gone.disable_endpoint
    assert gone.delivery is not None and gone.delivery.attempt == 2
    blocked = decide(tiers, tiers[0], event, endpoint, attempt(Outcome.BLOCKED), body)
    assert isinstance(blocked.step, GiveUp) and blocked.step.reason is DeadLetterReason.BLOCKED_DESTINATION
