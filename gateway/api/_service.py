"""What one API process holds and serves every request from: the configuration, the
tokens, the endpoint table (following the topic), the delivery history and dead-letter
indexes, the replay jobs, the idempotency records, the state of its readiness check, and
its metrics (served at ``/metrics``).

**Read your writes.** Every read is served from the table this process follows. A write
is acknowledged by the broker, then :meth:`ApiService.write` waits (up to
``visible_timeout``) until the table shows it, so the next GET sees it; past the bound it
raises :class:`NotVisibleYet` (the write is saved). Changes made elsewhere (the CLI,
another API process) show up as the table follows the topic, within a second or so.

**One write at a time per endpoint.** :meth:`ApiService.change` holds the endpoint's lock
from the read that checks its version (``If-Match``) until the table shows the write: two
writes to one endpoint through this process are serialized, and the second one checks
its version against what the first wrote. Writes through another process (or the CLI)
are not under this lock; a version check still catches every one this table has seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from ..clock import SYSTEM, Clock
from ..config import Config
from ..errors import NotVisible, Unavailable
from ..observability import ApiMetrics
from ..ops import DeadLetterIndex, HistoryIndex, iso
from ..records import Circuit, Endpoint
from ..store import EndpointRegistry, EndpointTable, Topics, load_circuits
from ._auth import Tokens
from ._idempotency import IdempotencyKeys
from ._jobs import JobState, ReplayJobs

__all__ = ["READY_CACHE_SECONDS", "VISIBLE_TIMEOUT", "ApiService", "Check", "NotVisibleYet"]

log = logging.getLogger("gateway.api")

VISIBLE_TIMEOUT = 10.0
"""Seconds a write's answer waits for the table to show it."""
READY_CACHE_SECONDS = 5.0
"""How long a Kafka check of ``/readyz`` is reused: however often it is asked, the broker
is asked at most once per this many seconds by each API process."""
CIRCUITS_CACHE_SECONDS = 5.0
"""How long the circuits topic, read for endpoint stats, is reused."""

T = TypeVar("T")


class NotVisibleYet(NotVisible):
    """A write acknowledged but not shown by the table in time, with what it wrote."""

    def __init__(self, message: str, *, endpoint_id: str, result: object) -> None:
        super().__init__(message)
        self.endpoint_id = endpoint_id
        self.result = result


@dataclass(frozen=True)
class Check:
    """One readiness check: whether it passed, why not, and when it was made (ms)."""

    ok: bool
    detail: str
    checked_at: int

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "checkedAt": iso(self.checked_at)}


class ApiService:
    """Made without I/O; :meth:`start` reads the topics (blocking), :meth:`stop` lets go."""

    def __init__(self, config: Config, tokens: Tokens, *, history_capacity: int | None = None,
                 dead_letters_capacity: int | None = None, visible_timeout: float = VISIBLE_TIMEOUT,
                 clock: Clock = SYSTEM) -> None:
        self.config = config
        self.clock = clock
        self.tokens = tokens
        self.history_capacity = history_capacity or config.api_history_size
        self.dead_letters_capacity = dead_letters_capacity or config.api_dead_letters_size
        self.visible_timeout = visible_timeout
        self.metrics = ApiMetrics(job_states=tuple(JobState),
                                  job_results=tuple(s for s in JobState if s is not JobState.RUNNING))
        self.jobs = ReplayJobs(config, metrics=self.metrics)
        self.idempotency = IdempotencyKeys()
        self.history: HistoryIndex | None = None
        self.history_error: str | None = None
        self.dead_letters: DeadLetterIndex | None = None
        self.dead_letters_error: str | None = None
        self._registry: EndpointRegistry | None = None
        self._changed = threading.Condition()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._locks_guard = threading.Lock()
        self._testing: set[str] = set()
        self._circuits: tuple[float, dict[str, Circuit]] | None = None
        self._circuits_lock = threading.Lock()
        self._kafka_check: Check | None = None
        self._kafka_checked = 0.0
        self._kafka_lock = threading.Lock()
        self._admin: AdminClient | None = None

    def now_ms(self) -> int:
        return self.clock.now_ms()

    def start(self, *, timeout: float = 30.0) -> ApiService:
        """Load the endpoint table, the history and the dead letters, and follow them.
        Raises :class:`~gateway.errors.Unavailable` when the endpoints topic cannot be
        read; an index that cannot be read only makes its routes answer 503."""
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
        dead_letters = DeadLetterIndex(self.config, capacity=self.dead_letters_capacity)
        try:
            self.dead_letters = dead_letters.start(timeout=timeout)
        except Unavailable as exc:
            dead_letters.stop()
            self.dead_letters_error = f"the dead letters cannot be read: {exc}"
            log.warning("dead letters unavailable", extra={"error": str(exc)})
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

    def dead_letter_index(self) -> DeadLetterIndex:
        """The dead-letter index; :class:`~gateway.errors.Unavailable` when it could not be
        loaded."""
        if self.dead_letters is None:
            raise Unavailable(self.dead_letters_error or "the dead letters are not loaded")
        return self.dead_letters

    def wait_until(self, visible: Callable[[EndpointTable], bool], timeout: float | None = None) -> bool:
        """Block until ``visible(table)`` holds (True) or ``timeout`` passes (False)."""
        table = self.table
        with self._changed:
            return self._changed.wait_for(lambda: visible(table), self.visible_timeout if timeout is None else timeout)

    def write(self, write: Callable[[], T], written: Callable[[T], Endpoint], *, removed: bool = False) -> T:
        """Do ``write`` (blocking), then wait until the table shows what it wrote (or, when
        ``removed``, no longer shows it). :class:`NotVisibleYet` past the bound."""
        result = write()
        endpoint = written(result)

        def saved(table: EndpointTable) -> bool:
            current = table.get(endpoint.id)
            if removed:
                return current is None
            return current is not None and current.updated_at >= endpoint.updated_at

        if not self.wait_until(saved):
            raise NotVisibleYet(f"endpoint {endpoint.id} was saved, but this API's table did not show it within "
                                f"{self.visible_timeout:g} s; GET it again shortly", endpoint_id=endpoint.id,
                                result=result)
        return result

    @contextmanager
    def locked(self, endpoint_id: str) -> Iterator[None]:
        """Hold ``endpoint_id``'s write lock (made on first use, dropped when unused)."""
        with self._locks_guard:
            lock, users = self._locks.get(endpoint_id, (threading.Lock(), 0))
            self._locks[endpoint_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                lock, users = self._locks[endpoint_id]
                if users == 1:
                    del self._locks[endpoint_id]
                else:
                    self._locks[endpoint_id] = (lock, users - 1)

    def change(self, endpoint_id: str, write: Callable[[], T], written: Callable[[T], Endpoint], *,
               removed: bool = False) -> T:
        """:meth:`write` under ``endpoint_id``'s lock: the read that checks the version, the
        write and the wait until the table shows it happen as one step for this process."""
        with self.locked(endpoint_id):
            return self.write(write, written, removed=removed)

    @contextmanager
    def testing(self, endpoint_id: str) -> Iterator[bool]:
        """Whether a test send to ``endpoint_id`` may start now (one at a time per endpoint):
        yields False when one runs."""
        with self._locks_guard:
            busy = endpoint_id in self._testing
            self._testing.add(endpoint_id)
        try:
            yield not busy
        finally:
            if not busy:
                with self._locks_guard:
                    self._testing.discard(endpoint_id)

    def circuits(self) -> dict[str, Circuit]:
        """The circuit breakers the workers last reported, read at most every few seconds."""
        with self._circuits_lock:
            now = time.monotonic()
            if self._circuits is None or now - self._circuits[0] > CIRCUITS_CACHE_SECONDS:
                self._circuits = (now, load_circuits(self.config, timeout=10))
            return self._circuits[1]

    def kafka_check(self) -> Check:
        """Whether Kafka answers (the endpoints topic's metadata, within 2 s). One check at a
        time, its answer reused for :data:`READY_CACHE_SECONDS`."""
        with self._kafka_lock:
            if self._kafka_check is not None and time.monotonic() - self._kafka_checked < READY_CACHE_SECONDS:
                return self._kafka_check
            topic = Topics.from_config(self.config).endpoints
            now_ms = time.time_ns() // 1_000_000
            try:
                if self._admin is None:
                    self._admin = AdminClient({k: v for k, v in self.config.kafka_common().items()
                                               if k != "allow.auto.create.topics"})
                metadata = self._admin.list_topics(topic, timeout=2).topics.get(topic)
                if metadata is None or metadata.error is not None:
                    check = Check(False, f"topic {topic} is missing on {self.config.bootstrap_servers}", now_ms)
                else:
                    check = Check(True, f"{self.config.bootstrap_servers} answers", now_ms)
            except KafkaException as exc:
                check = Check(False, str(Unavailable.no_broker(self.config.bootstrap_servers, exc.args[0].str())),
                              now_ms)
            self._kafka_check, self._kafka_checked = check, time.monotonic()
            return check

    def readiness(self) -> tuple[bool, dict[str, Check]]:
        """Whether this process should get traffic: Kafka answers and the endpoint table is
        loaded. The indexes are reported too; without them only their routes fail."""
        now_ms = time.time_ns() // 1_000_000
        checks = {
            "kafka": self.kafka_check(),
            "endpoints": Check(self._registry is not None,
                               "loaded, following the topic" if self._registry is not None else "not loaded", now_ms),
            "deliveries": Check(self.history is not None, "indexed" if self.history is not None
                                else self.history_error or "not loaded", now_ms),
            "deadLetters": Check(self.dead_letters is not None, "indexed" if self.dead_letters is not None
                                 else self.dead_letters_error or "not loaded", now_ms),
        }
        return checks["kafka"].ok and checks["endpoints"].ok, checks

    def stop(self) -> None:
        self.jobs.join(5)
        if self.history is not None:
            self.history.stop()
        if self.dead_letters is not None:
            self.dead_letters.stop()
        if self._registry is not None:
            self._registry.stop()
