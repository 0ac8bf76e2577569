"""What one API process holds and serves every request from: the configuration, the
tokens, the endpoint table (following the topic), the delivery history index and the
replay jobs.

**Read your writes.** Every read is served from the table this process follows. A write
is acknowledged by the broker, then :meth:`ApiService.write` waits (up to
``visible_timeout``) until the table shows it, so the next GET sees it; past the bound it
raises :class:`~gateway.errors.NotVisible` (the write is saved). Changes made elsewhere
(the CLI, another API process) show up as the table follows the topic, within a second
or so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from ..config import Config
from ..errors import NotVisible, Unavailable
from ..ops import HistoryIndex
from ..records import Endpoint
from ..store import EndpointRegistry, EndpointTable
from ._auth import Tokens
from ._jobs import ReplayJobs

__all__ = ["VISIBLE_TIMEOUT", "ApiService"]

log = logging.getLogger("gateway.api")

VISIBLE_TIMEOUT = 10.0
"""Seconds a write's answer waits for the table to show it."""

T = TypeVar("T")


class ApiService:
    """Made without I/O; :meth:`start` reads the topics (blocking), :meth:`stop` lets go."""

    def __init__(self, config: Config, tokens: Tokens, *, history_capacity: int | None = None,
                 visible_timeout: float = VISIBLE_TIMEOUT) -> None:
        self.config = config
        self.tokens = tokens
        self.history_capacity = history_capacity or config.api_history_size
        self.visible_timeout = visible_timeout
        self.jobs = ReplayJobs(config)
        self.history: HistoryIndex | None = None
        self.history_error: str | None = None
        self._registry: EndpointRegistry | None = None
        self._changed = threading.Condition()

    def start(self, *, timeout: float = 30.0) -> ApiService:
        """Load the endpoint table and the history, and follow both. Raises
        :class:`~gateway.errors.Unavailable` when the endpoints topic cannot be read; a
        history that cannot be read only makes ``/v1/deliveries`` answer 503."""
        registry = EndpointRegistry(self.config, on_change=self._on_change)
        try:
            registry.start(timeout=timeout)
        except BaseException:
            registry.stop()
            raise
        self._registry = registry
        history = HistoryIndex(self.config, capacity=self.history_capacity)
        try:
            self.history = history.start(timeout=timeout)
        except Unavailable as exc:
            history.stop()
            self.history_error = f"the delivery history cannot be read: {exc}"
            log.warning("delivery history unavailable", extra={"error": str(exc)})
        return self

    def _on_change(self, table: EndpointTable) -> None:
        with self._changed:
            self._changed.notify_all()

    @property
    def table(self) -> EndpointTable:
        if self._registry is None:
            raise Unavailable("the API has not loaded the endpoint table (not started)")
        return self._registry.table

    def history_index(self) -> HistoryIndex:
        """The delivery history index; :class:`~gateway.errors.Unavailable` when it could
        not be loaded."""
        if self.history is None:
            raise Unavailable(self.history_error or "the delivery history is not loaded")
        return self.history

    def wait_until(self, visible: Callable[[EndpointTable], bool], timeout: float | None = None) -> bool:
        """Block until ``visible(table)`` holds (True) or ``timeout`` passes (False)."""
        table = self.table
        with self._changed:
            return self._changed.wait_for(lambda: visible(table), self.visible_timeout if timeout is None else timeout)

    def write(self, write: Callable[[], T], written: Callable[[T], Endpoint], *, removed: bool = False) -> T:
        """Do ``write`` (blocking), then wait until the table shows what it wrote (or, when
        ``removed``, no longer shows it). :class:`~gateway.errors.NotVisible` past the bound."""
        result = write()
        endpoint = written(result)

        def saved(table: EndpointTable) -> bool:
            current = table.get(endpoint.id)
            if removed:
                return current is None
            return current is not None and current.updated_at >= endpoint.updated_at

        if not self.wait_until(saved):
            raise NotVisible(f"endpoint {endpoint.id} was saved, but this API's table did not show it within "
                             f"{self.visible_timeout:g} s; GET it again shortly")
        return result

    def stop(self) -> None:
        self.jobs.join(5)
        if self.history is not None:
            self.history.stop()
        if self._registry is not None:
            self._registry.stop()
