"""One assigned partition as the event loop sees it: its offsets, the records held back,
and whether it must be paused. Pure bookkeeping: times are passed in, nothing here
touches Kafka, a timer or a task (the worker does, from what this says).

Why records are held, and in which order they are let go:

* **In partition order** (the retry tiers: :meth:`PartitionState.ordered`). A retry
  tier's records all share one delay, so the head of a partition is always the earliest
  due. When the head is not due, it and every record fetched after it are held in order,
  the partition is paused, and the worker wakes it when the head is due. Nothing is
  attempted before it is due, and the poll loop never blocks on a due time.
* **Each by its own due time** (the deferral rungs: :meth:`PartitionState.by_due_time`).
  A deferred delivery comes back when its endpoint can take it, so the records of one
  rung are due at times of their own: each is held until then, and the ones behind it
  that are due sooner go first. Up to ``hold_limit`` are held; the partition is paused at
  the limit and resumed when half of them went, so memory stays bounded.
* A record whose writer schema the registry has not given yet (:class:`Pending`) holds
  the records after it the same way, in either kind, until the schema comes.

The partition is resumed once nothing is held (or, by due time, below the limit). Held
records are received but unsettled: they keep the committable position
(:class:`~gateway.streaming.OffsetTracker`) where it is, so a crash or a rebalance reads
them again. On revoke, what is held is dropped for the next owner, and from then on
nothing settles here (the position is final).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from ..delivery import Job, Pending, is_due
from ._offsets import OffsetTracker

__all__ = ["HOLD_LIMIT", "PartitionState"]

HOLD_LIMIT = 5_000
"""Records a partition held by due time may hold at once (a deferral rung)."""


class PartitionState:
    """The event loop's state of one assigned partition."""

    def __init__(self, topic: str, partition: int, *, hold_limit: int | None = None) -> None:
        self.topic = topic
        self.partition = partition
        self.tracker = OffsetTracker()
        self.hold_limit = hold_limit
        """None: held in partition order; else held each by its due time, at most this many."""
        self.held: deque[Job] = deque()
        """In partition order: records received but not to be run yet, in offset order.
        By due time: the records waiting for a schema, with those behind them."""
        self._due: list[tuple[int, int, Job]] = []
        """By due time: records waiting for their due time, a heap by (due, offset)."""
        self.paused = False
        """Whether the consumer was asked to pause it (and not to resume it since)."""
        self.revoked = False

    @classmethod
    def ordered(cls, topic: str, partition: int) -> PartitionState:
        return cls(topic, partition)

    @classmethod
    def by_due_time(cls, topic: str, partition: int, hold_limit: int = HOLD_LIMIT) -> PartitionState:
        return cls(topic, partition, hold_limit=hold_limit)

    @property
    def key(self) -> tuple[str, int]:
        return self.topic, self.partition

    @property
    def holding(self) -> int:
        """Records held, for whatever reason."""
        return len(self.held) + len(self._due)

    def receive(self, job: Job, now_ms: int) -> bool:
        """A record arrived: True to run it now, False when it is held. Raises
        ``ValueError`` for an offset at or below one already received."""
        self.tracker.received(job.offset)
        if self.held or not job.ready:
            self.held.append(job)
            return False
        if is_due(job.due_at, now_ms):
            return True
        if self.hold_limit is None:
            self.held.append(job)
        else:
            heapq.heappush(self._due, (job.due_at, job.offset, job))
        return False

    def release(self, now_ms: int) -> list[Job]:
        """The held records that may run now: in partition order, from the head while
        ready and due; by due time, every one due (soonest first), and the records that
        waited for a schema once it came."""
        released = []
        held = self.held
        if self.hold_limit is None:
            while held and held[0].ready and is_due(held[0].due_at, now_ms):
                released.append(held.popleft())
            return released
        while held and held[0].ready:
            job = held.popleft()
            if is_due(job.due_at, now_ms):
                released.append(job)
            else:
                heapq.heappush(self._due, (job.due_at, job.offset, job))
        due = self._due
        while due and is_due(due[0][0], now_ms):
            released.append(heapq.heappop(due)[2])
        return released

    @property
    def wake_at(self) -> int | None:
        """When the next held record comes due (ms), if a due time is what holds it; None
        when nothing is held or the head waits for its schema (the schema's arrival wakes
        it)."""
        if self.hold_limit is None:
            if self.held and self.held[0].ready:
                return self.held[0].due_at
            return None
        if self.held and self.held[0].ready:  # (let go at the next release)
            return self.held[0].due_at
        return self._due[0][0] if self._due else None

    def pending_schemas(self) -> set[int]:
        return {job.content.schema_id for job in self.held if isinstance(job.content, Pending)}

    def redecode(self, schema_id: int, prepare: Callable[[Job], Job]) -> None:
        """The schema ``schema_id`` came (or was refused): decode its records again."""
        self.held = deque(
            prepare(job) if isinstance(job.content, Pending) and job.content.schema_id == schema_id else job
            for job in self.held
        )

    def pause_needed(self) -> bool:
        """True once when the consumer must pause it: records start being held in
        partition order, or (by due time) a schema is awaited or the limit is reached."""
        if self.paused:
            return False
        limit = self.hold_limit
        needed = bool(self.held) or (limit is not None and len(self._due) >= limit)
        if needed:
            self.paused = True
        return needed

    def resume_needed(self) -> bool:
        """True once when it may be fetched again: nothing held in partition order, or (by
        due time) no schema awaited and at most half the limit held."""
        if not self.paused:
            return False
        limit = self.hold_limit
        free = not self.held and (limit is None or len(self._due) <= limit // 2)
        if free:
            self.paused = False
        return free

    def settle(self, offset: int) -> int | None:
        """A record is settled: the new committable position if it moved (never after a
        revoke: what settles then is the next owner's to repeat)."""
        if self.revoked:
            return None
        return self.tracker.settle(offset)

    def drop_held(self) -> int:
        """Revoking: forget what is held (the next owner reads it again); how many."""
        dropped = self.holding
        self.held.clear()
        self._due.clear()
        return dropped

    def revoke(self) -> int | None:
        """The partition is gone: its final committable position (None: nothing settled)."""
        self.revoked = True
        return self.tracker.position
