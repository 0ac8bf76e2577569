"""The process's in-flight budget: how many records may be in progress at once, shared
fairly between the tiers that run in the process.

Each tier's consumer thread claims room for the records it fetched before it hands them
to the event loop (:meth:`Capacity.claim`); the event loop gives room back as records
settle, or as they are held until due (a held record costs no delivery slot, and takes
its room again when it comes due: :meth:`Capacity.take`).

Fair sharing, work-conserving: a tier may use all the room there is while no other tier
is short of room. A tier that has records waiting and could not claim room for all of
them is *short* of room (:meth:`Capacity.contended`: endpoints' shares shrink). One short
while below its share (``limit`` divided by the number of tiers) is *starved*, and every
tier already at or above its share gets no more room until the starved tier has been
served up to its share. So a burst on the events topic can fill the budget, but cannot
keep a retry tier whose records came due from getting its share, and the other way
round; a tier with nothing to do reserves nothing; and a tier that holds its share does
not stop the others for more. (It did: a deferral rung that fetched a batch of returns
stopped the events tier, whose room a slow endpoint's waiters held, until the whole batch
had room: another bot's events waited 5 to 6 s in two fairness bench runs of five.) The
rule is :func:`fair_room`, pure.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Set

__all__ = ["Capacity", "fair_room", "share_of"]


def fair_room(limit: int, used: Mapping[str, int], starved: Set[str], tier: str) -> int:
    """How many more records ``tier`` may take now.

    ``used`` is every tier's records in progress; ``starved`` the tiers whose last claim
    was not met in full. A tier at or above its share gets nothing while another tier
    is starved; otherwise it gets whatever is left of ``limit``.
    """
    if used.get(tier, 0) >= share_of(limit, used) and any(t != tier for t in starved):
        return 0
    return max(0, limit - sum(used.values()))


def share_of(limit: int, used: Mapping[str, int]) -> int:
    """Each tier's share of ``limit``: what a starved tier is served up to."""
    return max(1, limit // max(1, len(used)))


class Capacity:
    """Records in flight in this process, bounded by ``limit`` and shared by ``tiers``.
    Safe to call from any thread."""

    def __init__(self, limit: int, tiers: Iterable[str]) -> None:
        self.limit = limit
        self._used = dict.fromkeys(tiers, 0)
        self._short: set[str] = set()
        """Tiers whose last claim was not met in full: records wait for room."""
        self._starved: set[str] = set()
        """Those of them below their share: they stop the tiers at or above theirs."""
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    def claim(self, tier: str, wanted: int) -> int:
        """Take room for up to ``wanted`` records of ``tier``; returns how many it got.
        Getting fewer than wanted makes the tier short of room until a claim is met in
        full, and starved while it is also below its share."""
        with self._lock:
            granted = min(wanted, fair_room(self.limit, self._used, self._starved, tier))
            self._used[tier] += granted
            if granted < wanted:
                self._short.add(tier)
                if self._used[tier] < share_of(self.limit, self._used):
                    self._starved.add(tier)
                else:
                    self._starved.discard(tier)
            else:
                self._short.discard(tier)
                self._starved.discard(tier)
            return granted

    def withdraw(self, tier: str) -> None:
        """``tier`` has nothing waiting any more (its records were revoked)."""
        with self._lock:
            self._short.discard(tier)
            self._starved.discard(tier)

    def take(self, tier: str, n: int = 1) -> None:
        """Take room whatever is left (a held record that came due: it was fetched
        under the budget already)."""
        with self._lock:
            self._used[tier] += n

    def give(self, tier: str, n: int = 1) -> None:
        with self._lock:
            self._used[tier] -= n
            self._room.notify_all()

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for room to be given back (by any tier)."""
        with self._lock:
            self._room.wait(timeout)

    def used(self, tier: str | None = None) -> int:
        """Records in progress, of ``tier`` or of all tiers."""
        with self._lock:
            return self._used[tier] if tier is not None else sum(self._used.values())

    def short(self, tier: str) -> bool:
        """Whether records of ``tier`` wait for room."""
        with self._lock:
            return tier in self._short

    def starved(self, tier: str) -> bool:
        """Whether records of ``tier`` wait for room while it is below its share."""
        with self._lock:
            return tier in self._starved

    def contended(self) -> bool:
        """Whether records fetched wait for room (a tier is short of it): only then must
        endpoints' shares of the budget shrink. Read without the lock: a moment's staleness
        only delays a shrink by one judgement."""
        return bool(self._short)
