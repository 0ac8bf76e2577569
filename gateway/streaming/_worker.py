"""The tier worker: one tier's consumer, its partitions, and the records it runs.

One process runs one :class:`TierWorker` per tier it serves (the events topic and/or
retry tiers), sharing one event loop, one :class:`~gateway.delivery.Dispatcher`, one
HTTP sender, one producer and one in-flight budget (:class:`~gateway.streaming.Capacity`).
Each tier consumes in its own consumer group (``{consumer_group}.{tier}``, e.g.
``webhooks-gateway.retry-1m``), so a rebalance in one tier never pauses another.

Who owns what:

* The tier's :class:`~gateway.streaming.ConsumerPump` thread is the only caller of its
  Kafka consumer: it polls (so it runs the rebalance callbacks), hands batches over, and
  carries out pause/resume commands and offset stores between polls. It never stops
  polling, whatever the budget, so the group never evicts a busy worker.
* The event loop owns every partition's :class:`~gateway.streaming.PartitionState`
  (offsets, held records), the timers that wake held partitions and the tasks in flight.
  Nothing else touches them.

Rules this module keeps (see also ``_offsets`` and ``_partitions``):

* An offset is stored for commit (``store_offsets``, committed by librdkafka's
  auto-commit every 250 ms and synchronously on revoke and close) only when every record
  up to it is settled.
* Nothing is attempted before it is due. A retry tier's partition is held in order: it
  is paused, a timer fires when its head is due, and it resumes once nothing is held. A
  deferral rung's records are held each until its own due time (those due sooner go
  first), up to a bound, the partition paused only at the bound; a timer fires at the
  soonest due time (see ``_partitions``).
* On revoke (rebalance or close), the partition stops taking records; held records are
  dropped (their offsets were never stored, so the next owner reads them); records in
  flight get up to ``shutdown_timeout`` to settle; then the settled position is stored
  and committed. A record still in flight after that is handed over: the next owner
  repeats it (at least once, receivers dedupe on ``webhook-id``). A lost partition (the
  session expired) is dropped at once.
* If processing a record raises (the dead letter itself could not be written, or the
  sender closed under it), its offset is never settled: the partition keeps delivering,
  but commits stop below that record, so a restart retries it.
* A record whose schema the registry has not given yet holds its partition (paused)
  while the schema is fetched off the loop, retried with backoff for as long as the
  registry is away; only bytes that really cannot be decoded are dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer

from ..clock import SYSTEM, Clock, Timer
from ..config import SOCKET_TIMEOUT_MS, Config
from ..delivery import Dispatcher, Job, Ownership, Pending
from ..errors import DecodeError, RegistryUnavailable
from ..observability import Health, Metrics, assigned, bind
from ..store import Tier, due_at_of
from ._capacity import Capacity
from ._consumer import ConsumerLike, ConsumerPump, Key, Pause, Renewal, Resume
from ._partitions import PartitionState
from ._session import session_ms
from ._statistics import LAG_INTERVAL_MS, ClusterContact, ConsumerLag, GroupWatch, read_statistics

__all__ = [
    "SCHEMA_RETRY_MAX", "TierWorker", "consumer_settings", "coordinator_bound", "rebalance_grace", "rejoin_bound",
]

_log = logging.getLogger("gateway.worker")

SCHEMA_RETRY_MAX = 30.0
"""Longest wait between two lookups of a schema while the registry is away (seconds)."""


def consumer_settings(config: Config, tier: Tier) -> dict[str, Any]:
    """librdkafka settings of a tier's consumer (without callbacks)."""
    settings: dict[str, Any] = config.kafka_common() | {
        "group.id": f"{config.consumer_group}.{tier.name}",
        "enable.auto.commit": True,
        # Settled offsets reach the broker within 250 ms: what a crash repeats.
        "auto.commit.interval.ms": 250,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "max.poll.interval.ms": config.max_poll_interval_ms,
        # The bundled broker holds every fetch this long even when records arrive
        # (measured: p50 242 ms at the default 500); Kafka answers as soon as data is
        # there, so this only costs idle fetches there.
        "fetch.wait.max.ms": config.fetch_wait_ms,
        # Consumer lag comes from these statistics (high watermark of the last fetch,
        # stored offsets), delivered on the consumer's thread by poll().
        "statistics.interval.ms": LAG_INTERVAL_MS,
    }
    if config.instance_id is not None:
        # Static membership: the member keeps its assignment while it is away up to the
        # session timeout, and gets it back with no rebalance when it rejoins (one name
        # per group: each tier has its own).
        settings["group.instance.id"] = config.instance_id
    if config.group_protocol == "consumer":
        # KIP-848: the broker sets the session and heartbeat (librdkafka refuses these
        # settings with it) and assigns partitions itself.
        settings["group.protocol"] = "consumer"
    else:
        session = session_ms(config)
        settings |= {"session.timeout.ms": session, "heartbeat.interval.ms": max(100, session // 4)}
    return settings


def rebalance_grace(config: Config) -> float:
    """How long releasing partitions in a rebalance waits for their records in flight.
    With the classic protocol librdkafka sends no heartbeat while the revoke runs, and a
    process that takes longer than the session timeout is evicted: its partitions go to
    another while it still works on them. So: half the session, at most the shutdown
    timeout. With KIP-848 the broker allows the rebalance timeout (max.poll.interval.ms)."""
    if config.group_protocol == "consumer":
        return min(config.shutdown_timeout, config.max_poll_interval_ms / 2000)
    return min(config.shutdown_timeout, session_ms(config) / 2000)


def rejoin_bound(config: Config) -> float:
    """How long a tier's consumer may stay out of its group, while the cluster answers,
    before it is replaced by a new one (seconds). A rebalance waits for the members up to
    the rebalance timeout (``max.poll.interval.ms``) and notices a member gone within a
    session; past both, and a session more, the consumer is not coming back by itself."""
    return (config.max_poll_interval_ms + 2 * session_ms(config)) / 1000


def coordinator_bound(config: Config) -> float:
    """How long a tier's consumer may stay out of its group with no coordinator, while the
    cluster answers, before it is replaced (seconds). Finding the coordinator is one
    request to any broker, answered or timed out within the socket timeout; no rebalance
    waits on it. (Seen on Apache Kafka after the broker was frozen for 10 s: one tier's
    consumer stayed in ``query-coord`` while the others rejoined, until replaced.)"""
    return (SOCKET_TIMEOUT_MS + session_ms(config)) / 1000


class TierWorker:
    """Consumes one tier's topic in its consumer group and runs its records."""

    def __init__(
        self,
        tier: Tier,
        config: Config,
        dispatcher: Dispatcher,
        capacity: Capacity,
        loop: asyncio.AbstractEventLoop,
        *,
        metrics: Metrics,
        health: Health,
        consumer: ConsumerLike | None = None,
        clock: Clock = SYSTEM,
        ownership: Ownership | None = None,
        contact: ClusterContact | None = None,
    ) -> None:
        self.tier = tier
        self.clock = clock
        """Due times (its wall clock) and every timer and wait of the worker and its pump."""
        self.ownership = ownership
        """The deliveries tier's worker: the endpoints this process owns follow its partitions."""
        self.log = bind(_log, tier=tier.name)
        self.config = config
        self.dispatcher = dispatcher
        self.capacity = capacity
        self.loop = loop
        self.health = health
        self.partitions: dict[Key, PartitionState] = {}
        self._tasks: dict[Key, set[asyncio.Task[None]]] = {}
        self._timers: dict[Key, tuple[int, Timer]] = {}
        """The wake-up of each partition holding records: (when, in ms; its timer)."""
        self._schema_fetches: dict[int, asyncio.Task[None]] = {}
        self._done: asyncio.Future[None] = loop.create_future()
        self._lag = ConsumerLag(tier.name, metrics.consumer_lag)
        self._group = GroupWatch(tier.name, clock=clock, contact=contact)
        metrics.out_of_group.labels(tier.name).set_function(self._group.out_for)
        self._stamps: dict[Key, dict[int, int]] = {}
        """Per partition, the Kafka timestamps (ms) of the records taken and not settled, by
        offset (in offset order: the first is the oldest)."""
        metrics.oldest_record_age.labels(tier.name).set_function(self.oldest_record_age)
        self._generation = 0
        """How many consumers this worker has made (a replaced one's statistics are ignored)."""
        self._in_flight = metrics.records_in_flight(tier.name)
        self._metrics = metrics
        self._stopping = False
        renew = None
        if consumer is None:
            consumer = self._new_consumer()
            bound, uncoordinated = rejoin_bound(config), coordinator_bound(config)
            renew = Renewal(due=lambda: not self._stopping and self._group.stuck(bound, uncoordinated=uncoordinated),
                            create=self._replacement, close_timeout=min(config.shutdown_timeout, 5.0))
        self.pump = ConsumerPump(consumer, tier.name, capacity, self, on_watermarks=self._lag.listed,
                                 watermark_interval=LAG_INTERVAL_MS / 1000,
                                 pause_after=min(2.0, config.max_poll_interval_ms / 1000 / 4), clock=clock,
                                 renew=renew, due_at=None if tier.is_events or tier.owner else due_at_of)

    # -- lifecycle (event loop) ----------------------------------------------------------

    def start(self) -> None:
        self.pump.start([self.tier.topic])

    async def stop(self) -> None:
        """Stop taking records, let in-flight ones settle (bounded), commit, close."""
        self._stopping = True
        self.pump.stop()
        await self._done
        for task in self._schema_fetches.values():
            task.cancel()

    def _new_consumer(self) -> ConsumerLike:
        """A consumer of the tier's group; its client id names the process and how many
        consumers it has made (what the broker's logs show)."""
        self._generation += 1
        generation = self._generation
        settings = consumer_settings(self.config, self.tier) | {
            "client.id": f"{self.config.consumer_group}.{self.tier.name}-{os.getpid()}-{generation}",
            "stats_cb": lambda stats: self._statistics(stats, generation),
        }
        return cast(ConsumerLike, Consumer(settings))

    def _replacement(self) -> ConsumerLike:
        """The next consumer, when the pump replaces one stuck out of its group."""
        self._metrics.consumers_replaced.labels(self.tier.name).inc()
        self._group.renewed()
        return self._new_consumer()

    def _statistics(self, stats_json: str, generation: int) -> None:
        """librdkafka's statistics (``stats_cb``, called by poll on the pump's thread, or by
        a replaced consumer's close: those are ignored)."""
        if generation != self._generation:
            return
        stats = read_statistics(stats_json, self.tier.name)
        if stats is not None:
            self._lag.update(stats)
            self._group.update(stats)

    def oldest_record_age(self) -> float:
        """Seconds since the oldest record taken and not settled was written (0: none).
        Read by the metrics scrape, on its own thread, while the loop changes the tables:
        a table that changes under it is read again."""
        for _ in range(5):
            try:
                oldest = min((next(iter(s.values())) for s in list(self._stamps.values()) if s), default=None)
            except RuntimeError:  # changed while read
                continue
            return 0.0 if oldest is None else max(0.0, self.clock.now_ms() - oldest) / 1000
        return 0.0

    # -- PartitionOwner: called on the pump's thread -------------------------------------

    def assigned(self, partitions: list[Key]) -> None:
        if self.ownership is not None:
            self.ownership.gained(p for _, p in partitions)
        self._lag.assign(partitions)
        self.loop.call_soon_threadsafe(self._assign, partitions)

    def revoked(self, partitions: list[Key], *, lost: bool) -> None:
        if self.ownership is not None:  # first: new deliveries of these endpoints go to their next owner
            self.ownership.lost(p for _, p in partitions)
        self._lag.revoke(partitions)
        grace = 0.0 if lost else self.config.shutdown_timeout if self._stopping else rebalance_grace(self.config)
        future = asyncio.run_coroutine_threadsafe(self._release(partitions, grace), self.loop)
        future.result(grace + 5)

    def accept(self, records: list[Any], claimed: list[bool]) -> None:
        self.loop.call_soon_threadsafe(self._accept, records, claimed)

    def stopped(self, failure: BaseException | None) -> None:
        self._lag.clear()
        if failure is not None:
            self.health.broken(f"consumer {self.tier.name}", "consumer loop failed")
        self.loop.call_soon_threadsafe(_finish, self._done)

    # -- event loop ----------------------------------------------------------------------

    def _assign(self, keys: list[Key]) -> None:
        for key in keys:
            # A rung's deliveries come back each at its own time; a retry tier's in order.
            self.partitions[key] = PartitionState.by_due_time(*key) if self.tier.deferral else PartitionState(*key)
            self._tasks[key] = set()
            self._stamps[key] = {}
        if self.ownership is not None:
            self.ownership.learned()
        self.health.met(assigned(self.tier.name))
        self.log.info("partitions assigned", extra={"partitions": [p for _, p in keys]})

    async def _release(self, keys: list[Key], grace: float) -> None:
        # Out of the table first: records still arriving for these partitions are dropped.
        states = [s for k in keys if (s := self.partitions.pop(k, None)) is not None]
        tasks: set[asyncio.Task[None]] = set()
        for state in states:
            timer = self._timers.pop(state.key, None)
            if timer is not None:
                timer[1].cancel()
            state.drop_held()
            tasks |= self._tasks.pop(state.key, set())
            self._stamps.pop(state.key, None)
        if tasks and grace > 0:
            await self.clock.wait(tasks, grace)  # they keep settling meanwhile
        running = [t for t in tasks if not t.done()]
        if self.ownership is not None:
            # The endpoints of these partitions are the next owner's: an attempt made from
            # now on would break their limits (the record is the next owner's to repeat).
            for task in running:
                task.cancel()
        for state in states:
            position = state.revoke()  # what settles from now on is the next owner's to repeat
            if position is not None:
                self.pump.store(state.topic, state.partition, position)
        self.log.info("partitions released", extra={
            "partitions": [s.partition for s in states],
            "handed_over_in_flight": len(running), "cancelled": len(running) if self.ownership else 0,
        })

    def _accept(self, records: list[Any], claimed: list[bool]) -> None:
        now = self.clock.now_ms()
        capacity, tier = self.capacity, self.tier.name
        for msg, has_room in zip(records, claimed, strict=True):
            state = self.partitions.get((msg.topic(), msg.partition()))
            if state is None:
                if has_room:
                    capacity.give(tier)
                continue
            job = self.dispatcher.prepare(self.tier, msg)
            try:
                run_now = state.receive(job, now)
            except ValueError:
                self.log.warning("offset received twice, skipped",
                                 extra={"partition": msg.partition(), "offset": msg.offset()})
                if has_room:
                    capacity.give(tier)
                continue
            self._stamps[state.key][job.offset] = _timestamp(msg, now)
            if run_now:
                if not has_room:  # (came due since it was handed over, as a held one does)
                    capacity.take(tier)
                self._start(state, job)
                continue
            if has_room:
                capacity.give(tier)  # a held record costs no slot
            if isinstance(job.content, Pending):
                self._fetch_schema(job.content.schema_id)
            self._sync(state)

    def _sync(self, state: PartitionState) -> None:
        """Make the consumer and the timer match what ``state`` holds."""
        if state.pause_needed():
            self.pump.send(Pause(*state.key))
        elif state.resume_needed():
            self.pump.send(Resume(*state.key))
        wake_at = state.wake_at
        if wake_at is None:
            return
        timer = self._timers.get(state.key)
        if timer is not None and timer[0] <= wake_at:
            return
        if timer is not None:  # a record due sooner came in (a deferral rung)
            timer[1].cancel()
        delay = max(0.0, (wake_at - self.clock.now_ms()) / 1000)
        self._timers[state.key] = (wake_at, self.clock.call_later(delay, lambda: self._wake(state)))

    def _wake(self, state: PartitionState) -> None:
        timer = self._timers.pop(state.key, None)
        if timer is not None:
            timer[1].cancel()  # (woken by its schema, not by the timer)
        if state.revoked:
            return
        for job in state.release(self.clock.now_ms()):
            self.capacity.take(self.tier.name)
            self._start(state, job)
        self._sync(state)

    def _start(self, state: PartitionState, job: Job) -> None:
        task = self.loop.create_task(self._run(state, job))
        tasks = self._tasks[state.key]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, state: PartitionState, job: Job) -> None:
        gauge = self._in_flight
        gauge.inc()
        try:
            await self.dispatcher.run(self.tier, job)
        except Exception:
            self.log.critical("record not settled: processing raised; commits of this partition "
                              "stop below it until a restart retries it", exc_info=True, extra={"offset": job.offset})
            return
        finally:
            gauge.dec()
            self.capacity.give(self.tier.name)
        stamps = self._stamps.get(state.key)
        if stamps is not None and not state.revoked:
            stamps.pop(job.offset, None)
        position = state.settle(job.offset)
        if position is not None:
            self.pump.store(state.topic, state.partition, position)

    # -- schemas from the registry -------------------------------------------------------

    def _fetch_schema(self, schema_id: int) -> None:
        if schema_id not in self._schema_fetches:
            task = self.loop.create_task(self._fetch(schema_id))
            self._schema_fetches[schema_id] = task
            task.add_done_callback(lambda _: self._schema_fetches.pop(schema_id, None))

    async def _fetch(self, schema_id: int) -> None:
        """Fetch a writer schema off the loop, for as long as the registry is away; then
        decode the records that waited for it again and wake their partitions."""
        wait = 0.5
        while True:
            try:
                await asyncio.to_thread(self.dispatcher.codec.fetch_schema, schema_id)
                break
            except DecodeError:
                break  # not a schema we can read: the records are dead-lettered as undecodable
            except RegistryUnavailable as exc:
                self._metrics.schema_lookups_failed.inc()
                self.log.warning("schema registry unavailable; partitions wait", extra={
                    "schema_id": schema_id, "error": str(exc), "retry_in_s": wait})
                await self.clock.sleep(wait)
                wait = min(wait * 2, SCHEMA_RETRY_MAX)
        for state in list(self.partitions.values()):
            if schema_id in state.pending_schemas():
                state.redecode(schema_id, self._redecode)
                self._wake(state)

    def _redecode(self, job: Job) -> Job:
        return self.dispatcher.prepare(self.tier, job.message)


def _timestamp(msg: Any, default: int) -> int:
    """A record's Kafka timestamp (ms), or ``default`` when it has none."""
    kind, at = msg.timestamp()
    return int(at) if kind != TIMESTAMP_NOT_AVAILABLE and at > 0 else default


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

