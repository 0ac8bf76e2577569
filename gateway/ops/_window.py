"""A topic's newest records in memory, following the topic, and pages of them newest
first: what the API's delivery history (:class:`~gateway.ops.HistoryIndex`) and dead
letters (:class:`~gateway.ops.DeadLetterIndex`) answer from. Each index says what a record
becomes, what it is sorted by and which groups make its questions cheap; this module keeps
the window.

Built at start from the whole topic, keeping the newest ``capacity`` entries by their sort
key; then every new record is appended and the oldest is dropped once the window is full.
Once one was dropped, an answer is complete only from the time of the oldest it still
holds (``complete_since``). Pages are cut by a cursor (the sort key of the last entry
shown), so paging is stable while new records arrive.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableSequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from confluent_kafka import Message

from ..config import Config
from ..errors import InputError
from ..store import TopicFollower
from ._inputs import Cursor

__all__ = ["Grouping", "SortKey", "TopicWindow"]

T = TypeVar("T")

SortKey = tuple[int, int, int]
"""When (ms), partition, offset: newest last."""


@dataclass(frozen=True)
class Grouping(Generic[T]):
    """A secondary index of a :class:`TopicWindow`: its entries by a name (an event id, an
    endpoint id), so a question about one name costs that name's entries, not the window."""

    name: Callable[[T], str | None]
    """The name an entry is grouped under; None: under none."""
    few: bool = False
    """Each name has a few entries: keep them in a list (an empty deque costs 600 bytes,
    60 MB over 100,000 names); else in a deque."""


class TopicWindow(Generic[T]):
    """The newest ``capacity`` entries ``decode`` makes of a topic's records (None: none),
    in memory, following the topic.

    Written by its own thread, read by any: every change and every query's snapshot take
    one lock. Entries are kept in arrival order (oldest first), and so is each group, so
    dropping the oldest entry drops it from the front of its groups too: O(1) (O(entries
    of that name) for a :attr:`Grouping.few` list).
    """

    def __init__(self, config: Config, topic: str, *, what: str, purpose: str, thread: str, capacity: int,
                 decode: Callable[[Message], T | None], key: Callable[[T], SortKey],
                 groups: Mapping[str, Grouping[T]]) -> None:
        if capacity < 1:
            raise ValueError(f"{what} capacity {capacity} must be at least 1")
        self.capacity = capacity
        self._decode = decode
        self._key = key
        self._groupings = dict(groups)
        self._lock = threading.Lock()
        self._entries: deque[T] = deque()
        self._groups: dict[str, dict[str, MutableSequence[T]]] = {group: {} for group in groups}
        self._dropped = False
        self._follower = TopicFollower(config, topic, purpose=purpose, thread=thread)
        self.build_seconds: float | None = None
        """How long :meth:`start` took to read the topic and build the window."""

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> int:
        """Read the topic to its end (keeping the newest ``capacity`` entries), then follow
        it on a thread; how many entries it read. :class:`~gateway.errors.Unavailable` if
        the topic cannot be read."""
        started = time.monotonic()
        newest: list[tuple[SortKey, T]] = []  # a min-heap by sort key
        seen = 0
        for msg in self._follower.read(timeout=timeout):
            entry = self._decode(msg)
            if entry is None:
                continue
            seen += 1
            item = (self._key(entry), entry)
            if len(newest) < self.capacity:
                heapq.heappush(newest, item)
            else:
                heapq.heappushpop(newest, item)
        newest.sort(key=lambda item: item[0])
        self._add((entry for _, entry in newest), dropped=seen > self.capacity)
        self.build_seconds = time.monotonic() - started
        if follow:
            self._follower.follow(self._apply)
        return seen

    def _apply(self, msg: Message) -> None:
        entry = self._decode(msg)
        if entry is not None:
            self._add((entry,))

    def _add(self, entries: Iterable[T], *, dropped: bool = False) -> None:
        with self._lock:
            self._dropped |= dropped
            for entry in entries:
                self._entries.append(entry)
                for group, grouping in self._groupings.items():
                    name = grouping.name(entry)
                    if name is not None:
                        self._groups[group].setdefault(name, [] if grouping.few else deque()).append(entry)
                if len(self._entries) > self.capacity:
                    self._evict()

    def _evict(self) -> None:
        old = self._entries.popleft()
        self._dropped = True
        for group, grouping in self._groupings.items():
            name = grouping.name(old)
            if name is None:
                continue
            entries = self._groups[group][name]
            del entries[0]
            if not entries:
                del self._groups[group][name]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self, of: tuple[str, str] | None = None) -> tuple[list[T], int | None]:
        """Every entry held (or, ``of`` a group and a name, that name's), oldest first, and
        from when the window is complete: None while it holds the whole topic, else the
        time (ms) of the oldest entry it still holds (older ones may exist that it no
        longer shows)."""
        with self._lock:
            if of is None:
                entries = list(self._entries)
            else:
                group, name = of
                entries = list(self._groups[group].get(name, ()))
            complete_since = self._key(self._entries[0])[0] if self._dropped and self._entries else None
        return entries, complete_since

    def page(self, admits: Callable[[T], bool], *, limit: int, cursor: str | None,
             of: tuple[str, str] | None = None) -> tuple[list[T], str | None, int | None]:
        """The newest ``limit`` entries (of :meth:`entries` ``of``) that ``admits`` keeps,
        older than ``cursor``, newest first; the cursor of the next page (None on the last);
        from when the answer is complete (as :meth:`entries`)."""
        if not 1 <= limit <= 1000:
            raise InputError(f"limit {limit} is not between 1 and 1000", field="limit")
        before = Cursor.decode(cursor, (int, int, int)) if cursor is not None else None
        candidates, complete_since = self.entries(of)
        matched = [e for e in candidates if admits(e) and (before is None or self._key(e) < before)]
        page = heapq.nlargest(limit + 1, matched, key=self._key)
        more = len(page) > limit
        page = page[:limit]
        return page, Cursor.encode(self._key(page[-1])) if more else None, complete_since

    def stop(self) -> None:
        self._follower.stop()
