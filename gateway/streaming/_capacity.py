"""The process's in-flight budget: how many records may be in progress at once, shared
fairly between the tiers that run in the process.

Each tier's consumer thread claims room for the records it fetched before it hands them
to the event loop (:meth:`Capacity.claim`); the event loop gives room back as records
settle, or as they are held until due (a held record costs no delivery slot, and takes
its room again when it comes due: :meth:`Capacity.take`).

Fair sharing, work-conserving: a tier may use all the room there is while no other tier
is short of room. A tier that has records waiting and could not claim room for all of
them is *starved*, and every tier already at or above its share (``limit`` divided by
the number of tiers) gets no more room until the starved tier has been served. So a
burst on the events topic can fill the budget, but cannot keep a retry tier whose records
came due from getting its share, and the other way round; and a tier with nothing to do
reserves nothing. The rule is :func:`fair_room`, pure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Set

__all__ = ["Capacity", "fair_room"]


def fair_room(limit: int, used: Mapping[str, int], starved: Set[str], tier: str) -> int:
    """How many more records ``tier`` may take now.

    ``used`` is every tier's records in progress; ``starved`` the tiers whose last claim
    was not met in full. A tier at or above its share gets nothing while another tier
    is starved; otherwise it gets whatever is left of ``limit``.
    """
    share = max(1, limit // max(1, len(used)))
    if used.get(tier, 0) >= share and any(t != tier for t in starved):
        return 0
    return max(0, limit - sum(used.values()))


class Capacity:
    """Records in flight in this process, bounded by ``limit`` and shared by ``tiers``.
    Safe to call from any thread."""

    def __init__(self, limit: int, tiers: Iterable[str]) -> None:
        self.limit = limit
        self.on_short: Callable[[], None] | None = None
        """Called (on the claiming thread, outside the lock) each time a claim is not met in
        full: the process may shrink endpoints' shares at once rather than at its next
        judgement (it must be cheap and thread-safe)."""
        self._used = dict.fromkeys(tiers, 0)
        self._starved: set[str] = set()
        self._total = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._wanted: list[int] = []
        """The room each waiting thread waits for (see :meth:`wait`)."""

    def claim(self, tier: str, wanted: int) -> int:
        """Take room for up to ``wanted`` records of ``tier``; returns how many it got.
        Getting fewer than wanted makes the tier starved until a claim is met in full."""
        with self._lock:
            granted = min(wanted, fair_room(self.limit, self._used, self._starved, tier))
            self._used[tier] += granted
            self._total += granted
            short = granted < wanted
            if short:
                self._starved.add(tier)
            else:
                self._starved.discard(tier)
        if short and self.on_short is not None:
            self.on_short()
        return granted

    def withdraw(self, tier: str) -> None:
        """``tier`` has nothing waiting any more (its records were revoked)."""
        with self._lock:
            self._starved.discard(tier)

    def take(self, tier: str, n: int = 1) -> None:
        """Take room whatever is left (a held record that came due: it was fetched
        under the budget already)."""
        with self._lock:
            self._used[tier] += n
            self._total += n

    def give(self, tier: str, n: int = 1) -> None:
        with self._lock:
            self._used[tier] -= n
            self._total -= n
            if self._wanted and self.limit - self._total >= min(self._wanted):
                self._room.notify_all()

    def wait(self, timeout: float, room: int = 1) -> None:
        """Wait up to ``timeout`` seconds for ``room`` records' room to be free (given back
        by any tier). Waiting for more than one lets a busy process hand records over in
        batches, not one by one as each settles (a thread woken per record, measured)."""
        with self._lock:
            self._wanted.append(room)
            try:
                self._room.wait(timeout)
            finally:
                self._wanted.remove(room)

    def used(self, tier: str | None = None) -> int:
        """Records in progress, of ``tier`` or of all tiers."""
        with self._lock:
            return self._used[tier] if tier is not None else self._total

    def starved(self, tier: str) -> bool:
        with self._lock:
            return tier in self._starved

    def contended(self) -> bool:
        """Whether records fetched wait for room (a tier is starved): only then must
        endpoints' shares of the budget shrink. Read without the lock: a moment's staleness
        only delays a shrink by one judgement."""
        return bool(self._starved)
