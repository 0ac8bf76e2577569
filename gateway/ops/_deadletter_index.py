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

import logging
from dataclasses import dataclass
from typing import Any

from ..codec import Codec
from ..config import Config
from ..store import Topics
from ._access import OPERATOR, Access
from ._deadletters import DeadLetterEntry, Filters, decode_dead_letter
from ._inputs import iso
from ._window import Grouping, SortKey, TopicWindow

__all__ = ["DEFAULT_DEAD_LETTERS", "DeadLetterIndex", "DeadLetterPage"]

log = logging.getLogger("gateway.dlq_index")

DEFAULT_DEAD_LETTERS = 20_000
"""Dead letters the API's index keeps by default."""


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
    """The newest ``capacity`` dead letters, in memory, following the topic (a
    :class:`~gateway.ops._window.TopicWindow`), grouped by bot and by endpoint."""

    def __init__(self, config: Config, *, capacity: int = DEFAULT_DEAD_LETTERS, codec: Codec | None = None) -> None:
        self.config = config
        self.topic = Topics.from_config(config).dlq
        self._window = TopicWindow[_Indexed](
            config, self.topic, what="dead-letter", purpose="dlq-index", thread="dlq-index", capacity=capacity,
            decode=self._indexed, key=lambda item: item.key,
            groups={"bot": Grouping(lambda item: item.bot), "endpoint": Grouping(lambda item: item.endpoint)})
        self.capacity = capacity
        self.codec = codec or Codec(config.schema_registry_url)

    def _indexed(self, msg: Any) -> _Indexed:
        entry = decode_dead_letter(self.codec, self.topic, msg)
        died = entry.dead.dead_at if entry.dead is not None else int(msg.timestamp()[1] or 0)
        return _Indexed((died, entry.partition, entry.offset), entry)

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> DeadLetterIndex:
        """Read the topic to its end (keeping the newest ``capacity``), then follow it on a
        thread. :class:`~gateway.errors.Unavailable` if the topic cannot be read."""
        seen = self._window.start(timeout=timeout, follow=follow)
        log.info("dead letters loaded", extra={"dead_letters": len(self), "read": seen, "topic": self.topic,
                                               "seconds": round(self._window.build_seconds or 0.0, 3)})
        return self

    def __len__(self) -> int:
        return len(self._window)

    @staticmethod
    def _of(filters: Filters) -> tuple[str, str] | None:
        """The group whose dead letters are the candidates for ``filters``."""
        if filters.endpoint_id is not None:
            return ("endpoint", filters.endpoint_id)
        if filters.bot_id is not None:
            return ("bot", filters.bot_id.lower())
        return None

    def query(self, filters: Filters | None = None, *, limit: int = 100, cursor: str | None = None,
              access: Access = OPERATOR) -> DeadLetterPage:
        """The newest ``limit`` dead letters ``filters`` selects (all without), within
        ``access``'s scope, older than ``cursor``."""
        filters = (filters or Filters()).scoped(access)
        page, next_cursor, complete_since = self._window.page(lambda item: filters.admits(item.entry), limit=limit,
                                                              cursor=cursor, of=self._of(filters))
        return DeadLetterPage(tuple(item.entry for item in page), next_cursor, complete_since)

    def select(self, filters: Filters | None = None, *, access: Access = OPERATOR
               ) -> tuple[list[DeadLetterEntry], int | None]:
        """Every dead letter ``filters`` selects (within ``access``'s scope), newest first,
        and from when the answer is complete (see :attr:`DeadLetterPage.complete_since`)."""
        filters = (filters or Filters()).scoped(access)
        candidates, complete_since = self._window.entries(self._of(filters))
        matched = sorted((item for item in candidates if filters.admits(item.entry)),
                         key=lambda item: item.key, reverse=True)
        return [item.entry for item in matched], complete_since

    def stop(self) -> None:
        self._window.stop()
