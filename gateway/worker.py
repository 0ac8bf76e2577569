"""The worker: Kafka consumers, partitions, offsets, holding retries until due, shutdown.

One process runs one :class:`TierWorker` per tier it serves (the events topic and/or
retry tiers), sharing one event loop, one :class:`~gateway.dispatcher.Dispatcher`, one
HTTP sender and one producer. Each tier consumes in its own consumer group
(``{consumer_group}.{tier}``, e.g. ``webhooks-gateway.retry-1m``), so a rebalance in one tier never pauses another.

Threads and who owns what:

* A consumer thread per tier is the only caller of its ``Consumer`` (confluent-kafka's
  consumer is not thread-safe: calling ``store_offsets`` from another thread while
  ``poll`` runs deadlocks). It polls (so it also runs the rebalance callbacks), hands
  each batch to the event loop, and carries out the loop's requests (store offsets,
  pause, resume) between polls. It only polls while the process has room
  (``concurrency`` records in flight), which bounds memory however deep the backlog.
* The event loop owns every partition's state: the offset tracker, the records held
  until due, the tasks in flight. Nothing else touches it.

Rules this module keeps (see also :mod:`gateway.offsets`):

* An offset is stored for commit (``store_offsets``, committed by librdkafka's
  auto-commit and synchronously on revoke and close) only when every record up to it is
  settled.
* A retry tier's records all share one delay, so the head of a partition is always the
  earliest due. When the head is not due, the partition is paused, the records already
  fetched are held in order, a timer fires when the head is due, and the partition
  resumes once nothing is held. The poll loop never blocks on a due time, and nothing is
  attempted before it is due.
* On revoke (rebalance or close), the partition stops taking records; held records are
  dropped (their offsets were never stored, so the next owner reads them); records in
  flight get up to ``shutdown_timeout`` to settle; then the settled position is
  committed. A record still in flight after that is handed over: the next owner repeats
  it (at least once, receivers dedupe on ``webhook-id``).
* If processing a record raises (a bug), its offset is never settled: the partition
  keeps delivering, but commits stop below that record, so a restart retries it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from .config import Config
from .dispatcher import Dispatcher, Job, now_ms
from .health import HEALTH, assigned
from .metrics import IN_FLIGHT, LAG_INTERVAL_MS, ConsumerLag
from .offsets import OffsetTracker
from .retry import is_due
from .topics import Tier

__all__ = ["TierWorker", "Capacity"]

log = logging.getLogger(__name__)

_BATCH = 500


class Capacity:
    """Records in flight in this process, bounded. Taken by consumer threads before
    they hand records over, given back by the event loop as records settle (or are held
    until due, which costs no delivery slot)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def room(self, timeout: float) -> int:
        """Wait up to ``timeout`` for room; returns how many records fit now (maybe 0)."""
        with self._cond:
            self._cond.wait_for(lambda: self._used < self.limit, timeout)
            return max(0, self.limit - self._used)

    def take(self, n: int) -> None:
        with self._cond:
            self._used += n

    def give(self, n: int = 1) -> None:
        with self._cond:
            self._used -= n
            if self._used + n >= self.limit:  # someone may be waiting for room
                self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


@dataclass
class _Partition:
    tp: TopicPartition
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    held: deque[Job] = field(default_factory=deque)
    """Records fetched but not due yet, in offset order."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    paused: bool = False
    timer: asyncio.TimerHandle | None = None
    revoked: bool = False


class TierWorker:
    """Consumes one tier's topic in its consumer group and runs its records."""

    def __init__(
        self,
        tier: Tier,
        config: Config,
        dispatcher: Dispatcher,
        capacity: Capacity,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.tier = tier
        self.config = config
        self.dispatcher = dispatcher
        self.capacity = capacity
        self.loop = loop
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._stopping = threading.Event()
        self._requests: queue.SimpleQueue[Callable[[Consumer], None]] = queue.SimpleQueue()
        # Settled positions waiting to be stored, latest per partition: one store_offsets
        # call per poll round instead of one request per record.
        self._positions: dict[tuple[str, int], int] = {}
        self._positions_lock = threading.Lock()
        self._done: asyncio.Future[None] = loop.create_future()
        session = config.session_timeout_ms
        self._lag = ConsumerLag(tier.name)
        self._in_flight = IN_FLIGHT.labels(tier.name)
        self._consumer = Consumer(
            config.kafka_common()
            | {
                "group.id": f"{config.consumer_group}.{tier.name}",
                "enable.auto.commit": True,
                # Settled offsets reach the broker within 250 ms: what a crash repeats.
                "auto.commit.interval.ms": 250,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": session,
                "heartbeat.interval.ms": max(100, session // 4),
                # The bundled broker holds every fetch this long even when records arrive
                # (measured: p50 242 ms at the default 500); Kafka answers as soon as data
                # is there, so this only costs idle fetches there.
                "fetch.wait.max.ms": config.fetch_wait_ms,
                # Consumer lag comes from these statistics (high watermark of the last
                # fetch, stored offsets), delivered on this consumer's thread by poll().
                "statistics.interval.ms": LAG_INTERVAL_MS,
                "stats_cb": self._lag.update,
            }
        )
        self._thread = threading.Thread(target=self._poll_loop, name=f"consumer-{tier.name}", daemon=True)

    # -- lifecycle (event loop) ------------------------------------------------------

    def start(self) -> None:
        self._consumer.subscribe(
            [self.tier.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._thread.start()

    async def stop(self) -> None:
        """Stop taking records, let in-flight ones settle (bounded), commit, close."""
        self._stopping.set()
        await self._done

    # -- consumer thread -------------------------------------------------------------

    def _poll_loop(self) -> None:
        consumer = self._consumer
        try:
            while not self._stopping.is_set():
                self._serve_requests(consumer)
                room = self.capacity.room(0.1)
                if room == 0:
                    continue
                first = consumer.poll(0.05)
                if first is None:
                    continue
                batch = [first]
                if room > 1:
                    batch += consumer.consume(min(room, _BATCH) - 1, 0)
                records = []
                for msg in batch:
                    error = msg.error()
                    if error is None:
                        records.append(msg)
                    elif error.code() != KafkaError._PARTITION_EOF:
                        log.error("consumer error", extra={"tier": self.tier.name, "error": error.str()})
                if records:
                    self.capacity.take(len(records))
                    self.loop.call_soon_threadsafe(self._accept, records)
        except Exception:
            log.exception("consumer loop failed", extra={"tier": self.tier.name})
            HEALTH.broken(f"consumer {self.tier.name}", "consumer loop failed")
        finally:
            try:
                consumer.close()  # runs _on_revoke: drain, commit
            except Exception:
                log.exception("consumer close failed", extra={"tier": self.tier.name})
            self._lag.clear()
            self.loop.call_soon_threadsafe(_finish, self._done)

    def _serve_requests(self, consumer: Consumer) -> None:
        with self._positions_lock:
            positions, self._positions = self._positions, {}
        if positions:
            offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
            try:
                consumer.store_offsets(offsets=offsets)
            except KafkaException:  # a partition revoked since: store the others one by one
                for offset in offsets:
                    try:
                        consumer.store_offsets(offsets=[offset])
                    except KafkaException:
                        pass
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                request(consumer)
            except KafkaException as exc:  # e.g. a partition revoked since the request
                log.debug("consumer request failed", extra={"tier": self.tier.name, "error": exc.args[0].str()})

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause across revoke and re-assignment: one paused
        # while its head was not due would come back silent, its records held until a
        # restart (found by the chaos suite's rebalance scenario).
        consumer.resume(partitions)
        self._lag.assign(partitions)
        self.loop.call_soon_threadsafe(self._assign, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._lag.revoke(partitions)
        keys = [(p.topic, p.partition) for p in partitions]
        future = asyncio.run_coroutine_threadsafe(self._release(keys, self.config.shutdown_timeout), self.loop)
        try:
            future.result(self.config.shutdown_timeout + 5)
        except Exception:
            log.exception("releasing partitions failed", extra={"tier": self.tier.name})
        self._serve_requests(consumer)  # the offsets stored while releasing
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.error("commit on revoke failed", extra={"tier": self.tier.name, "error": exc.args[0].str()})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._lag.revoke(partitions)
        keys = [(p.topic, p.partition) for p in partitions]
        future = asyncio.run_coroutine_threadsafe(self._release(keys, 0.0), self.loop)
        try:
            future.result(5)
        except Exception:
            log.exception("releasing lost partitions failed", extra={"tier": self.tier.name})

    # -- event loop ------------------------------------------------------------------

    def _assign(self, keys: list[tuple[str, int]]) -> None:
        for topic, partition in keys:
            self._partitions[(topic, partition)] = _Partition(TopicPartition(topic, partition))
        HEALTH.met(assigned(self.tier.name))
        log.info("partitions assigned", extra={"tier": self.tier.name, "partitions": [p for _, p in keys]})

    async def _release(self, keys: list[tuple[str, int]], timeout: float) -> None:
        # Out of the table first: records still arriving for these partitions are dropped.
        states = [s for k in keys if (s := self._partitions.pop(k, None)) is not None]
        tasks: set[asyncio.Task[None]] = set()
        for state in states:
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
            state.held.clear()
            tasks |= state.tasks
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)  # they keep settling meanwhile
        for state in states:
            state.revoked = True  # what settles from now on is the next owner's to repeat
            if state.tracker.position is not None:
                self._store(state.tp, state.tracker.position)
        unfinished = sum(1 for t in tasks if not t.done())
        log.info("partitions released", extra={
            "tier": self.tier.name, "partitions": [s.tp.partition for s in states],
            "handed_over_in_flight": unfinished,
        })

    def _accept(self, records: list[Any]) -> None:
        now = now_ms()
        for msg in records:
            state = self._partitions.get((msg.topic(), msg.partition()))
            if state is None or state.revoked:
                self.capacity.give()
                continue
            try:
                state.tracker.received(msg.offset())
            except ValueError:
                log.warning("offset received twice, skipped",
                            extra={"tier": self.tier.name, "partition": msg.partition(), "offset": msg.offset()})
                self.capacity.give()
                continue
            job = self.dispatcher.prepare(self.tier, msg)
            if state.held or not is_due(job.due_at, now):
                state.held.append(job)
                self.capacity.give()
                self._hold(state)
            else:
                self._start(state, job)

    def _hold(self, state: _Partition) -> None:
        if not state.paused:
            tp = state.tp
            self._requests.put(lambda c: c.pause([tp]))
            state.paused = True
        if state.timer is None:
            delay = max(0.0, (state.held[0].due_at - now_ms()) / 1000)
            state.timer = self.loop.call_later(delay, self._wake, state)

    def _wake(self, state: _Partition) -> None:
        state.timer = None
        if state.revoked:
            return
        now = now_ms()
        while state.held and is_due(state.held[0].due_at, now):
            self.capacity.take(1)
            self._start(state, state.held.popleft())
        if state.held:
            self._hold(state)
        elif state.paused:
            tp = state.tp
            self._requests.put(lambda c: c.resume([tp]))
            state.paused = False

    def _start(self, state: _Partition, job: Job) -> None:
        task = self.loop.create_task(self._run(state, job))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    async def _run(self, state: _Partition, job: Job) -> None:
        gauge = self._in_flight
        gauge.inc()
        try:
            await self.dispatcher.run(self.tier, job)
        except Exception:
            log.critical("record not settled: processing raised; commits of this partition "
                         "stop below it until a restart retries it",
                         exc_info=True, extra={"tier": self.tier.name, "offset": job.offset})
            return
        finally:
            gauge.dec()
            self.capacity.give()
        if not state.revoked:
            position = state.tracker.settle(job.offset)
            if position is not None:
                self._store(state.tp, position)

    def _store(self, tp: TopicPartition, position: int) -> None:
        """Ask the consumer thread to store ``position`` (carried out between polls)."""
        with self._positions_lock:
            self._positions[(tp.topic, tp.partition)] = position


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
