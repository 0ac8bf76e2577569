"""One assigned partition as the event loop sees it: its offsets, the records held back,
and whether it must be paused. Pure bookkeeping: times are passed in, nothing here
touches Kafka, a timer or a task (the worker does, from what this says).

Why records are held, in partition order:

* A retry tier's records all share one delay, so the head of a partition is always the
  earliest due. When the head is not due, it and every record fetched after it are held
  in order, the partition is paused, and the worker wakes it when the head is due.
  Nothing is attempted before it is due, and the poll loop never blocks on a due time.
* A record whose writer schema the registry has not given yet (:class:`Pending`) holds
  the records after it the same way, until the schema comes.

The partition is resumed once nothing is held. Held records are received but unsettled:
they keep the committable position (:class:`~gateway.streaming.OffsetTracker`) where it
is, so a crash or a rebalance reads them again. On revoke, what is held is dropped for
the next owner, and from then on nothing settles here (the position is final).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..delivery import Job, Pending, is_due
from ._offsets import OffsetTracker

__all__ = ["PartitionState"]


class PartitionState:
    """The event loop's state of one assigned partition."""

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.tracker = OffsetTracker()
        self.held: deque[Job] = deque()
        """Records received but not to be run yet, in offset order."""
        self.paused = False
        """Whether the consumer was asked to pause it (and not to resume it since)."""
        self.revoked = False

    @property
    def key(self) -> tuple[str, int]:
        return self.topic, self.partition

    def receive(self, job: Job, now_ms: int) -> bool:
        """A record arrived: True to run it now, False when it is held. Raises
        ``ValueError`` for an offset at or below one already received."""
        self.tracker.received(job.offset)
        if self.held or not job.ready or not is_due(job.due_at, now_ms):
            self.held.append(job)
            return False
        return True

    def release(self, now_ms: int) -> list[Job]:
        """The held records that may run now: from the head, while ready and due."""
        released = []
        held = self.held
        while held and held[0].ready and is_due(held[0].due_at, now_ms):
            released.append(held.popleft())
        return released

    @property
    def wake_at(self) -> int | None:
        """When the held head comes due (ms), if a due time is what holds it; None when
        nothing is held or the head waits for its schema (the schema's arrival wakes it)."""
        if self.held and self.held[0].ready:
            return self.held[0].due_at
        return None

    def pending_schemas(self) -> set[int]:
        return {job.content.schema_id for job in self.held if isinstance(job.content, Pending)}

    def redecode(self, schema_id: int, prepare: Callable[[Job], Job]) -> None:
        """The schema ``schema_id`` came (or was refused): decode its records again."""
        self.held = deque(
            prepare(job) if isinstance(job.content, Pending) and job.content.schema_id == schema_id else job
            for job in self.held
        )

    def pause_needed(self) -> bool:
        """True once when records start being held: the consumer must pause it."""
        if self.held and not self.paused:
            self.paused = True
            return True
        return False

    def resume_needed(self) -> bool:
        """True once when nothing is held any more: the consumer may fetch it again."""
        if not self.held and self.paused:
            self.paused = False
            return True
        return False

    def settle(self, offset: int) -> int | None:
        """A record is settled: the new committable position if it moved (never after a
        revoke: what settles then is the next owner's to repeat)."""
        if self.revoked:
            return None
        return self.tracker.settle(offset)

    def drop_held(self) -> int:
        """Revoking: forget what is held (the next owner reads it again); how many."""
        dropped = len(self.held)
        self.held.clear()
        return dropped

    def revoke(self) -> int | None:
        """The partition is gone: its final committable position (None: nothing settled)."""
        self.revoked = True
        return self.tracker.position
