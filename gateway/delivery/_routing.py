"""Who attempts an endpoint's deliveries: one process for the whole gateway, so that an
endpoint's rate limit, its cap on requests in flight and its circuit hold however many
processes run.

Kafka decides, with no other store: the deliveries topic is keyed and partitioned by
endpoint id (:func:`~gateway.store.endpoint_partition`), its partitions are shared out
among the processes of one consumer group, and the process holding an endpoint's
partition owns the endpoint. A process attempts a delivery itself when it owns the
endpoint (the usual case with one process: it owns them all, and no record makes an
extra trip); otherwise it forwards the delivery to the owner's partition, where the owner
attempts it. Events, retries and deferred deliveries all go through the same check.

While partitions move (a process joins, leaves or dies), two processes may both attempt
at one endpoint for the moment the move takes; at least once holds throughout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from ..store import endpoint_partition

__all__ = ["Ownership"]


class Ownership:
    """The partitions of the deliveries topic this process holds, of ``partitions``."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._owned: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self._known = asyncio.Event()

    @property
    def known(self) -> bool:
        """Whether the deliveries topic's partitions were assigned to this process once:
        before, it cannot tell its endpoints from another's."""
        return self._known.is_set()

    def learned(self) -> None:
        """The first assignment arrived (called on the event loop)."""
        self._known.set()

    async def wait_known(self) -> None:
        """Until the first assignment: a process starting on a backlog would otherwise
        forward what it is about to own."""
        await self._known.wait()

    def partition_of(self, endpoint_id: str) -> int:
        return endpoint_partition(endpoint_id, self.partitions)

    def owns(self, endpoint_id: str) -> bool:
        """Whether this process attempts ``endpoint_id``'s deliveries itself."""
        return endpoint_partition(endpoint_id, self.partitions) in self._owned

    @property
    def owned(self) -> frozenset[int]:
        return self._owned

    def gained(self, partitions: Iterable[int]) -> None:
        with self._lock:
            self._owned = self._owned | frozenset(partitions)

    def lost(self, partitions: Iterable[int]) -> None:
        with self._lock:
            self._owned = self._owned - frozenset(partitions)

