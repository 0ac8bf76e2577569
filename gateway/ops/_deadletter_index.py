"""The dead letters the HTTP API serves, newest first: the dead-letter topic in memory,
followed, as :class:`~gateway.ops.HistoryIndex` keeps the attempts topic.

Built at start from the whole topic, keeping the newest ``capacity`` dead letters by the
time they died (then partition and offset); then every new record is added and the
oldest dropped once the index is full. Answers say from when they are complete
(``completeSince``), as the history's do. The command line (``gateway dlq``) and replay
planning read the topic itself, to its end: they see every dead letter.

Two secondary indexes, by bot and by endpoint, make the questions of a bot's settings
page (its dead letters, one endpoint's) cost that bot's or that endpoint's dead letters,
not the whole index. Pages are cut by a cursor (the sort key of the last one shown), so
paging is stable while new dead letters arrive.

Bounds: a dead letter holds its event's payload and its attempt log: about 3 KB for the
documented events, so the default 20,000 take about 60 MB; an event near the 1 MB record
limit takes what it weighs.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..codec import Codec
from ..config import Config
from ..errors import InputError
from ..store import Topics, read_to_end, reader_consumer
from ._access import OPERATOR, Access
from ._deadletters import DeadLetterEntry, Filters, decode_dead_letter
from ._inputs import Cursor, iso

__all__ = ["DEFAULT_DEAD_LETTERS", "DeadLetterIndex", "DeadLetterPage"]

log = logging.getLogger("gateway.dlq_index")

DEFAULT_DEAD_LETTERS = 20_000
"""Dead letters the API's index keeps by default."""

SortKey = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class _Indexed:
    key: SortKey
    """When it died (ms; the record's timestamp when it cannot be read), partition, offset."""
    entry: DeadLetterEntry

    @property
    def bot(self) -> str | None:
        delivery = self.entry.delivery
        return delivery.bot_id.lower() if delivery else None

    @property
    def endpoint(self) -> str | None:
        delivery = self.entry.delivery
        return delivery.endpoint_id if delivery else None


@dataclass(frozen=True)
class DeadLetterPage:
    """One page of dead letters, newest first."""

    entries: tuple[DeadLetterEntry, ...]
    next_cursor: str | None
    """Pass it back for the next (older) page; None on the last page."""
    complete_since: int | None
    """None when the index holds every dead letter the topic held; else when the oldest
    it still holds died: older ones may exist that it no longer shows."""

    def to_json(self) -> dict[str, Any]:
        return {"data": [e.summary() for e in self.entries], "nextCursor": self.next_cursor,
                "completeSince": iso(self.complete_since) if self.complete_since is not None else None}


class DeadLetterIndex:
    """The newest ``capacity`` dead letters, in memory, following the topic. Written by its
    own thread, read by any, under one lock (a query copies its candidates, then filters
    outside it)."""

    def __init__(self, config: Config, *, capacity: int = DEFAULT_DEAD_LETTERS, codec: Codec | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"dead-letter capacity {capacity} must be at least 1")
        self.config = config
        self.capacity = capacity
        self.topic = Topics.from_config(config).dlq
        self.codec = codec or Codec(config.schema_registry_url)
        self._lock = threading.Lock()
        self._entries: deque[_Indexed] = deque()
        """Oldest first, by arrival (and at start by sort key)."""
        self._by_bot: dict[str, deque[_Indexed]] = {}
        self._by_endpoint: dict[str, deque[_Indexed]] = {}
        self._dropped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer = reader_consumer(config, "dlq-index")

    def _indexed(self, msg: Any) -> _Indexed:
        entry = decode_dead_letter(self.codec, self.topic, msg)
        died = entry.dead.dead_at if entry.dead is not None else int(msg.timestamp()[1] or 0)
        return _Indexed((died, entry.partition, entry.offset), entry)

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> DeadLetterIndex:
        """Read the topic to its end (keeping the newest ``capacity``), then follow it on a
        thread. :class:`~gateway.errors.Unavailable` if the topic cannot be read."""
        started = time.monotonic()
        newest: list[tuple[SortKey, _Indexed]] = []  # a min-heap by sort key
        seen = 0
        for msg in read_to_end(self._consumer, self.config, self.topic, timeout=timeout):
            item = self._indexed(msg)
            seen += 1
            if len(newest) < self.capacity:
                heapq.heappush(newest, (item.key, item))
            else:
                heapq.heappushpop(newest, (item.key, item))
        newest.sort(key=lambda pair: pair[0])
        self._add([item for _, item in newest], dropped=seen > self.capacity)
        self._consumer.resume(self._consumer.assignment())
        log.info("dead letters loaded", extra={"dead_letters": len(self), "read": seen, "topic": self.topic,
                                               "seconds": round(time.monotonic() - started, 3)})
        if follow:
            self._thread = threading.Thread(target=self._follow, name="dlq-index", daemon=True)
            self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            self._add([self._indexed(msg)])

    def _add(self, items: Iterable[_Indexed], *, dropped: bool = False) -> None:
        with self._lock:
            self._dropped |= dropped
            for item in items:
                self._entries.append(item)
                if item.bot is not None:
                    self._by_bot.setdefault(item.bot, deque()).append(item)
                if item.endpoint is not None:
                    self._by_endpoint.setdefault(item.endpoint, deque()).append(item)
                if len(self._entries) > self.capacity:
                    self._evict()

    def _evict(self) -> None:
        old = self._entries.popleft()
        self._dropped = True
        # Each secondary deque is in arrival order too: the oldest entry is at its front.
        for index, name in ((self._by_bot, old.bot), (self._by_endpoint, old.endpoint)):
            if name is None:
                continue
            group = index[name]
            group.popleft()
            if not group:
                del index[name]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _candidates(self, filters: Filters) -> tuple[list[_Indexed], int | None]:
        with self._lock:
            if filters.endpoint_id is not None:
                candidates = list(self._by_endpoint.get(filters.endpoint_id, ()))
            elif filters.bot_id is not None:
                candidates = list(self._by_bot.get(filters.bot_id.lower(), ()))
            else:
                candidates = list(self._entries)
            complete_since = self._entries[0].key[0] if self._dropped and self._entries else None
        return [item for item in candidates if filters.admits(item.entry)], complete_since

    def query(self, filters: Filters | None = None, *, limit: int = 100, cursor: str | None = None,
              access: Access = OPERATOR) -> DeadLetterPage:
        """The newest ``limit`` dead letters ``filters`` selects (all without), within
        ``access``'s scope, older than ``cursor``."""
        if not 1 <= limit <= 1000:
            raise InputError(f"limit {limit} is not between 1 and 1000", field="limit")
        filters = (filters or Filters()).scoped(access)
        before = Cursor.decode(cursor, (int, int, int)) if cursor is not None else None
        matched, complete_since = self._candidates(filters)
        if before is not None:
            matched = [item for item in matched if item.key < before]
        page = heapq.nlargest(limit + 1, matched, key=lambda item: item.key)
        more = len(page) > limit
        page = page[:limit]
        return DeadLetterPage(tuple(item.entry for item in page),
                              Cursor.encode(page[-1].key) if more else None, complete_since)

    def select(self, filters: Filters | None = None, *, access: Access = OPERATOR
               ) -> tuple[list[DeadLetterEntry], int | None]:
        """Every dead letter ``filters`` selects (within ``access``'s scope), newest first,
        and from when the answer is complete (see :attr:`DeadLetterPage.complete_since`)."""
        matched, complete_since = self._candidates((filters or Filters()).scoped(access))
        matched.sort(key=lambda item: item.key, reverse=True)
        return [item.entry for item in matched], complete_since

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()
