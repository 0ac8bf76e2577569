"""The consumer pump: the one thread that calls one tier's Kafka consumer.

confluent-kafka's consumer is not thread-safe (calling ``store_offsets`` from another
thread while ``poll`` runs deadlocks), so a :class:`ConsumerPump` owns it: it polls, so
it also runs the rebalance callbacks, hands each batch of records to its
:class:`PartitionOwner` (the tier's worker, which passes them to the event loop), and
between polls carries out what the event loop asked for: typed :class:`Pause` and
:class:`Resume` commands, and the settled positions to store for commit.

The pump never stops polling for long. ``max.poll.interval.ms`` (default 5 minutes) is
enforced by the client: a consumer that does not call ``poll`` for that long leaves its
group, and ``pause`` does not stop that clock. When the process's in-flight budget
(:class:`~gateway.streaming.Capacity`) has no room for the records a poll fetched, they
wait in the pump (one batch at most). For a moment (``pause_after``, a few seconds at
most) the pump only waits for room: a busy process frees room within milliseconds, and a
pause is expensive (librdkafka drops what it prefetched for the paused partitions, and
measured here the first record after a resume comes ~0.9 s later: pausing at every full
budget held a worker at 1,500 deliveries a second). If the budget stays full longer, the
pump pauses the whole assignment and goes on polling, which keeps the membership and
serves rebalances while nothing more is fetched; once the waiting records all got room
it resumes the partitions, except those the event loop paused itself (a retry tier's
head not due yet). A broker that is
down, a receiver that is slow or records held until due can hold the budget for hours:
the group never notices.

The rebalance contract (the owner's side is in ``gateway/streaming/_worker.py``):

* On assignment, the new partitions are resumed first (librdkafka keeps a partition's
  pause across revoke and re-assignment: one paused while its head was not due would
  come back silent), paused again if the budget is full, and announced to the owner.
* On revocation, the owner releases the partitions (bounded: it waits for their records
  in flight up to half the session timeout in a rebalance, ``shutdown_timeout`` when
  stopping), then the positions it stored meanwhile are
  stored and committed synchronously before the callback returns, so the next owner
  starts exactly after what was settled.
* On loss (the session expired: another member may own them already), the owner drops
  them without waiting and nothing is committed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from ..clock import SYSTEM, Clock
from ..observability import BoundLogger, bind
from ._capacity import Capacity

__all__ = [
    "BATCH",
    "REFILL_PARTS",
    "Command",
    "ConsumerLike",
    "ConsumerPump",
    "Key",
    "PartitionOwner",
    "Pause",
    "Renewal",
    "Resume",
    "in_turns",
]

_log = logging.getLogger("gateway.consumer")

BATCH = 500
"""Most records handed to the event loop at once."""

REFILL_PARTS = 20
"""A full budget is refilled in parts of this share of it (or at the poll timeout)."""


def in_turns(records: Sequence[Any]) -> list[Any]:
    """A fetched batch taken one record from each partition in turn, each partition's own
    order kept. librdkafka returns a partition's records together: a slow endpoint's
    backlog of hundreds would otherwise be started (and put off) before another bot's
    records fetched with it, which waited behind that work on the event loop."""
    queues: dict[tuple[str, int], deque[Any]] = {}
    for msg in records:
        queues.setdefault((msg.topic(), msg.partition()), deque()).append(msg)
    if len(queues) < 2:
        return list(records)
    turns: list[Any] = []
    left = list(queues.values())
    while left:
        turns.extend(q.popleft() for q in left)
        left = [q for q in left if q]
    return turns

WATERMARK_TIMEOUT = 0.5
"""Longest wait for the broker to list a paused partition's high watermark (seconds)."""

Key = tuple[str, int]
"""(topic, partition)."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop fetching a partition (its held head is not due yet)."""

    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Resume:
    """Fetch a partition again (nothing of it is held any more)."""

    topic: str
    partition: int


Command = Pause | Resume


class ConsumerLike(Protocol):
    """The part of ``confluent_kafka.Consumer`` the pump uses (tests pass a fake)."""

    def subscribe(self, topics: list[str], **callbacks: Any) -> None: ...
    def poll(self, timeout: float) -> Any: ...
    def consume(self, num_messages: int, timeout: float) -> list[Any]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def assignment(self) -> list[TopicPartition]: ...
    def get_watermark_offsets(self, partition: TopicPartition, *, timeout: float, cached: bool) -> Any: ...
    def store_offsets(self, *, offsets: list[TopicPartition]) -> None: ...
    def commit(self, *, asynchronous: bool) -> Any: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Renewal:
    """When a pump replaces its consumer with a new one, and how."""

    due: Callable[[], bool]
    """Asked before every round, on the pump's thread."""
    create: Callable[[], ConsumerLike]
    close_timeout: float = 10.0
    """How long the old consumer's close is waited for (it may hang on what is stuck)."""


class PartitionOwner(Protocol):
    """What the pump tells the tier's worker. Every method is called on the pump's thread."""

    def assigned(self, partitions: list[Key]) -> None:
        """New partitions: prepare their state (must not block)."""

    def revoked(self, partitions: list[Key], *, lost: bool) -> None:
        """Release the partitions: drop what is held, and unless ``lost`` wait (bounded)
        for their records in flight and store their settled positions. Blocks."""

    def accept(self, records: list[Any], claimed: list[bool]) -> None:
        """Records to process (must not block). Room in the budget is already taken for
        each whose ``claimed`` flag is set: the others were not due when handed over (the
        worker holds them, or takes room for one that came due meanwhile)."""

    def stopped(self, failure: BaseException | None) -> None:
        """The pump ended: closed normally, or because ``failure`` broke its loop."""


class ConsumerPump:
    """Polls one consumer on its own thread; the event loop talks to it through
    :meth:`send` (commands) and :meth:`store` (positions)."""

    def __init__(
        self,
        consumer: ConsumerLike,
        tier: str,
        capacity: Capacity,
        owner: PartitionOwner,
        *,
        poll_timeout: float = 0.05,
        on_watermarks: Callable[[dict[Key, int]], None] | None = None,
        watermark_interval: float = 5.0,
        pause_after: float = 2.0,
        clock: Clock = SYSTEM,
        renew: Renewal | None = None,
        due_at: Callable[[Any], int | None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.due_at = due_at
        """A record's due time (ms since the epoch) from its headers, None when it has
        none; None for a tier whose records are all due when read (the events topic)."""
        self.renew = renew
        """When to replace the consumer with a new one, and how (None: never)."""
        self.topics: list[str] = []
        self.assigned: set[Key] = set()
        """The partitions the consumer was last given (its callbacks keep this)."""
        self._replacing = False
        self.tier = tier
        self.clock = clock
        """Times ``pause_after`` and ``watermark_interval`` (its monotonic clock)."""
        self.log = bind(_log, tier=tier)
        self.capacity = capacity
        self.owner = owner
        self.poll_timeout = poll_timeout
        self.refill = max(1, capacity.limit // REFILL_PARTS)
        """Room waited for before a full budget hands more over (at most what waits)."""
        self.on_watermarks = on_watermarks
        """Told the high watermarks listed for paused partitions, every
        ``watermark_interval`` seconds while any is paused (for the lag metric: a paused
        partition is not fetched, so the watermark its fetches reported stops moving)."""
        self.watermark_interval = watermark_interval
        self._listed_at = 0.0
        self.pause_after = pause_after
        """How long records may wait for room before the assignment is paused (seconds)."""
        self._full_since: float | None = None
        self._waiting: list[Any] = []
        """Records fetched, in order, that the budget had no room for yet: while any
        wait, nothing more is fetched (the pump waits for room, then pauses the
        assignment after ``pause_after``), so at most a batch waits per tier."""
        self.held: set[Key] = set()
        """Partitions the event loop paused (heads not due)."""
        self.budget_paused = False
        """The whole assignment is paused because the budget has no room."""
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # Settled positions waiting to be stored, latest per partition: one store_offsets
        # call per poll round instead of one request per record.
        self._positions: dict[Key, int] = {}
        self._positions_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- from any thread -----------------------------------------------------------------

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def store(self, topic: str, partition: int, position: int) -> None:
        """Store ``position`` for commit (carried out between polls)."""
        with self._positions_lock:
            self._positions[(topic, partition)] = position

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe the consumer, with the pump's rebalance callbacks (run by ``poll``, so
        on whichever thread calls :meth:`run_once`)."""
        self.topics = topics
        self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)

    def start(self, topics: list[str]) -> None:
        """Subscribe and poll on a thread of the pump's own until :meth:`stop`."""
        self.subscribe(topics)
        self._thread = threading.Thread(target=self._run, name=f"consumer-{self.tier}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the pump to stop: it closes the consumer (which revokes and commits) and
        tells the owner :meth:`~PartitionOwner.stopped`."""
        self._stopping.set()

    # -- the pump's thread ---------------------------------------------------------------

    def _run(self) -> None:
        failure: BaseException | None = None
        try:
            while not self._stopping.is_set():
                self.run_once()
        except Exception as exc:
            self.log.exception("consumer loop failed")
            failure = exc
        finally:
            try:
                self.consumer.close()  # runs _on_revoke: release, store, commit
            except Exception:
                self.log.exception("consumer close failed")
            self.owner.stopped(failure)

    def run_once(self) -> None:
        """One round: carry out the requests, hand over what the budget has room for,
        then poll (with the assignment paused while fetched records still wait)."""
        if self.renew is not None and self.renew.due():
            self.replace()
        self.serve()
        self._list_watermarks()
        if self._waiting:
            self._hand_over()
        if self._waiting:
            if self._full_since is None:
                self._full_since = self.clock.monotonic()
            if not self.budget_paused and self.clock.monotonic() - self._full_since < self.pause_after:
                # Room comes back within milliseconds when busy: wait for a batch's worth.
                self.capacity.wait(self.poll_timeout, min(len(self._waiting), self.refill))
                return
            self._pause_budget()
        else:
            self._full_since = None
            if self.budget_paused:
                self._resume_budget()
        first = self.consumer.poll(self.poll_timeout)
        if first is None:
            return
        batch = [first]
        if not self.budget_paused:
            batch += self.consumer.consume(BATCH - 1, 0)
        for msg in in_turns(batch):
            error = msg.error()
            if error is None:
                # (Records fetched before a pause may still come: they wait like the rest.)
                self._waiting.append(msg)
            elif error.fatal() or error.code() == KafkaError._FATAL:
                # The consumer is unusable: with static membership, another process joined
                # under the same instance id (GATEWAY_INSTANCE_ID) and fenced this one.
                self.log.error("consumer failed for good: the tier stops", extra={
                    "error": error.str(),
                    "hint": "if fenced: another process runs with the same GATEWAY_INSTANCE_ID"})
                raise KafkaException(error)
            elif error.code() != KafkaError._PARTITION_EOF:
                self.log.error("consumer error", extra={"error": error.str()})
        if self._waiting:
            self._hand_over()
            if self._waiting and self.pause_after <= 0:
                self._pause_budget()

    def _hand_over(self) -> None:
        """Hand over, in order, what the budget has room for. A record not due yet (a
        retry tier's, a deferral rung's) needs no room: the worker holds it, at no cost,
        until it comes due. Claiming room for it anyway made a rung that read a batch
        of returns due seconds later *starved*, and a starved tier stops the tiers above
        their share: a fast bot's events waited seconds behind a slow bot's returns."""
        waiting = self._waiting
        due_at = self.due_at
        if due_at is None:
            granted = self.capacity.claim(self.tier, len(waiting))
            if granted:
                self._waiting = waiting[granted:]
                self.owner.accept(waiting[:granted], [True] * granted)
            return
        now = self.clock.now_ms()
        runs = [i for i, msg in enumerate(waiting) if (due := due_at(msg)) is None or due <= now]
        granted = self.capacity.claim(self.tier, len(runs))
        cut = runs[granted] if granted < len(runs) else len(waiting)  # (the first due one without room)
        if cut:
            claimed = [False] * cut
            for i in runs[:granted]:
                claimed[i] = True
            self._waiting = waiting[cut:]
            self.owner.accept(waiting[:cut], claimed)

    def serve(self) -> None:
        """Store the positions and carry out the commands the event loop sent."""
        with self._positions_lock:
            positions, self._positions = self._positions, {}
        if positions:
            offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
            try:
                self.consumer.store_offsets(offsets=offsets)
            except KafkaException:  # a partition revoked since: store the others one by one
                for offset in offsets:
                    with contextlib.suppress(KafkaException):
                        self.consumer.store_offsets(offsets=[offset])
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            key = (command.topic, command.partition)
            tp = [TopicPartition(*key)]
            try:
                if isinstance(command, Pause):
                    self.held.add(key)
                    self.consumer.pause(tp)
                else:
                    self.held.discard(key)
                    if not self.budget_paused:
                        self.consumer.resume(tp)
            except KafkaException as exc:  # e.g. a partition revoked since the request
                self.log.debug("consumer request failed", extra={"error": exc.args[0].str()})

    def _list_watermarks(self) -> None:
        """Ask the broker for the high watermarks of the paused partitions, at most every
        ``watermark_interval``. Each request waits at most ``WATERMARK_TIMEOUT`` and the
        first that fails ends the round (a broker that is away stalls the pump by that
        much, not by one timeout per partition)."""
        if self.on_watermarks is None or self.clock.monotonic() - self._listed_at < self.watermark_interval:
            return
        self._listed_at = self.clock.monotonic()
        if self.budget_paused:
            paused = [(tp.topic, tp.partition) for tp in self.consumer.assignment()]
        else:
            paused = sorted(self.held)
        highs: dict[Key, int] = {}
        for key in paused:
            try:
                listed = self.consumer.get_watermark_offsets(TopicPartition(*key), timeout=WATERMARK_TIMEOUT,
                                                             cached=False)
            except KafkaException as exc:
                self.log.debug("watermark not listed", extra={"error": exc.args[0].str()})
                break
            if listed is None:  # timed out
                break
            highs[key] = listed[1]
        if highs:
            self.on_watermarks(highs)

    def _pause_budget(self) -> None:
        if not self.budget_paused:
            self.budget_paused = True
            self.consumer.pause(self.consumer.assignment())
            self.log.debug("budget full: tier paused")

    def _resume_budget(self) -> None:
        self.budget_paused = False
        again = [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in self.held]
        if again:
            self.consumer.resume(again)

    def replace(self) -> None:
        """Close the consumer (bounded) and go on with a new one in the same group.

        For a consumer out of its group far longer than a rebalance takes while the cluster
        answers: its partitions are long someone else's, so they are dropped as lost
        (records in flight settle into nothing: their offsets are never stored, the next
        owner repeats them). The old consumer's close commits what was settled before and
        leaves the group; its callbacks no longer reach the pump. A close that hangs (its
        coordinator connection is what is stuck) is left behind after ``close_timeout``."""
        assert self.renew is not None
        old, keys = self.consumer, sorted(self.assigned)
        self.log.error("consumer replaced: out of its group too long while the cluster answers",
                       extra={"partitions_dropped": [p for _, p in keys]})
        if keys:
            self.assigned.clear()
            self._forget(keys)
            try:
                self.owner.revoked(keys, lost=True)
            except Exception:
                self.log.exception("releasing lost partitions failed")
        self.serve()  # settled positions go to the old consumer, committed by its close
        self.held.clear()
        self._replacing = True  # (its callbacks, run by its close, are not the pump's business)
        closing = threading.Thread(target=_close_quietly, args=(old, self.log), daemon=True,
                                   name=f"consumer-{self.tier}-close")
        closing.start()
        closing.join(self.renew.close_timeout)
        if closing.is_alive():
            self.log.warning("old consumer still closing; left behind",
                             extra={"close_timeout_s": self.renew.close_timeout})
        self._replacing = False
        self.consumer = self.renew.create()
        self.subscribe(self.topics)

    # -- rebalance callbacks (run by poll, on this thread) -------------------------------
    # A replaced consumer's callbacks (run by its close, on another thread) are ignored:
    # what it held was dropped when it was replaced.

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer or self._replacing:
            return
        consumer.resume(partitions)  # a pause kept from an earlier assignment would silence it
        if self.budget_paused:
            consumer.pause(partitions)
        keys = [(p.topic, p.partition) for p in partitions]
        self.assigned.update(keys)
        self.owner.assigned(keys)

    def _forget(self, keys: list[Key]) -> None:
        """Partitions leave: what of them was fetched and still waits is the next
        owner's to read (nothing of it was stored)."""
        self.held.difference_update(keys)
        gone = set(keys)
        self._waiting = [m for m in self._waiting if (m.topic(), m.partition()) not in gone]
        if not self._waiting:
            self.capacity.withdraw(self.tier)

    def _release(self, consumer: Any, partitions: list[TopicPartition], *, lost: bool) -> bool:
        """Partitions leave (revoked, or ``lost``): forget them and let the owner release
        them. False, doing nothing, for a replaced consumer's callback."""
        if consumer is not self.consumer or self._replacing:
            return False
        keys = [(p.topic, p.partition) for p in partitions]
        self.assigned.difference_update(keys)
        self._forget(keys)
        try:
            self.owner.revoked(keys, lost=lost)
        except Exception:
            self.log.exception("releasing lost partitions failed" if lost else "releasing partitions failed")
        return True

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if not self._release(consumer, partitions, lost=False):
            return
        self.serve()  # the positions stored while releasing
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                self.log.error("commit on revoke failed", extra={"error": exc.args[0].str()})

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, lost=True)


def _close_quietly(consumer: ConsumerLike, log: BoundLogger) -> None:
    try:
        consumer.close()
    except Exception:
        log.exception("closing the replaced consumer failed")
