"""Which offset of a partition may be committed. Pure bookkeeping, no I/O.

The rule (at least once): a partition's committed position may only move to ``n + 1``
when every record received at or below offset ``n`` is *settled*: delivered with a 2xx,
or its next-tier or dead-letter record acknowledged by the broker, or skipped on purpose
(no endpoint). Records finish out of order (a slow endpoint, a retry still being
produced), so the position is the first offset still unsettled, or one past the last
received when all are settled.

Records held back because they are not due yet are received but unsettled: they keep the
position where it is, so a crash or rebalance reads them again.
"""

from __future__ import annotations

from collections import deque

__all__ = ["OffsetTracker"]


class OffsetTracker:
    """Tracks the received offsets of one partition and the position safe to commit."""

    __slots__ = ("_order", "_settled", "position")

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._settled: set[int] = set()
        self.position: int | None = None
        """The offset to commit (first not settled), or None before anything settled."""

    def received(self, offset: int) -> None:
        """Record ``offset`` as received; offsets must arrive in increasing order."""
        if self._order and offset <= self._order[-1]:
            raise ValueError(f"offset {offset} received after {self._order[-1]}")
        self._order.append(offset)

    def settle(self, offset: int) -> int | None:
        """Mark ``offset`` settled; returns the new position when it moved, else None."""
        self._settled.add(offset)
        moved = None
        order, settled = self._order, self._settled
        while order and order[0] in settled:
            head = order.popleft()
            settled.discard(head)
            moved = head + 1
        if moved is not None:
            self.position = moved
        return moved

    @property
    def unsettled(self) -> int:
        return len(self._order)

    @property
    def idle(self) -> bool:
        return not self._order
