"""Fakes for the worker's unit tests: a Kafka consumer, its messages, a clock, a
producer and a sender. They stand in for I/O only; the code under test is the real one."""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, TopicPartition

from gateway.delivery import Deferral
from gateway.records import Attempt, Endpoint, Outcome


@dataclass
class FakeMessage:
    topic_: str
    partition_: int
    offset_: int
    value_: bytes | None = b""
    key_: bytes | None = b"k"
    headers_: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int = -1
    """When it was written (the record's Kafka timestamp); -1: none."""

    def topic(self) -> str:
        return self.topic_

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME if self.timestamp_ms >= 0 else TIMESTAMP_NOT_AVAILABLE), self.timestamp_ms

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def value(self) -> bytes | None:
        return self.value_

    def key(self) -> bytes | None:
        return self.key_

    def error(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return self.headers_


@dataclass
class FakeConsumer:
    """A consumer of one topic whose partitions hold ``queued`` messages. Paused
    partitions give nothing; every call is recorded."""

    queued: dict[tuple[str, int], deque[FakeMessage]] = field(default_factory=dict)
    assigned: list[tuple[str, int]] = field(default_factory=list)
    paused: set[tuple[str, int]] = field(default_factory=set)
    stored: dict[tuple[str, int], int] = field(default_factory=dict)
    polls: int = 0
    commits: int = 0
    closed: bool = False
    callbacks: dict[str, Any] = field(default_factory=dict)
    added: dict[tuple[str, int], int] = field(default_factory=dict)
    listings: list[tuple[str, int]] = field(default_factory=list)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def add(self, *messages: FakeMessage) -> None:
        for message in messages:
            key = (message.topic_, message.partition_)
            self.queued.setdefault(key, deque()).append(message)
            self.added[key] = self.added.get(key, 0) + 1

    def rebalance(self, assign: list[tuple[str, int]]) -> None:
        """What librdkafka does inside poll: revoke what goes, assign what comes."""
        gone = [k for k in self.assigned if k not in assign]
        if gone:
            self.callbacks["on_revoke"](self, [TopicPartition(*k) for k in gone])
        new = [k for k in assign if k not in self.assigned]
        self.assigned = list(assign)
        if new:
            self.callbacks["on_assign"](self, [TopicPartition(*k) for k in new])

    def _next(self) -> FakeMessage | None:
        for key in self.assigned:
            if key in self.paused:
                continue
            messages = self.queued.get(key)
            if messages:
                return messages.popleft()
        return None

    def poll(self, timeout: float) -> FakeMessage | None:
        self.polls += 1
        return self._next()

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        while len(out) < num_messages and (message := self._next()) is not None:
            out.append(message)
        return out

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(p.topic, p.partition) for p in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(p.topic, p.partition) for p in partitions}

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(*k) for k in self.assigned]

    def get_watermark_offsets(self, partition: TopicPartition, *, timeout: float, cached: bool) -> tuple[int, int]:
        """As the broker lists them: what was ever added to the partition (fetched or not)."""
        key = (partition.topic, partition.partition)
        self.listings.append(key)
        return 0, self.added.get(key, 0)

    def store_offsets(self, *, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            self.stored[(tp.topic, tp.partition)] = tp.offset

    def commit(self, *, asynchronous: bool) -> None:
        self.commits += 1

    def close(self) -> None:
        self.rebalance([])
        self.closed = True


class FakeClock:
    """A :class:`gateway.clock.Clock` that moves only when told (:meth:`advance`): its
    timers, sleeps and waits fire then, in order of their due times, on the calling
    thread (the test's event loop). Time is kept in whole nanoseconds."""

    def __init__(self, now_ms: int = 1_000_000) -> None:
        self._epoch_ns = now_ms * 1_000_000
        self._ns = 0
        self._timers: list[tuple[int, int, _Timer]] = []
        self._made = 0

    def now_ms(self) -> int:
        return (self._epoch_ns + self._ns) // 1_000_000

    def monotonic(self) -> float:
        return self._ns / 1e9

    def call_later(self, delay: float, callback: Callable[[], object]) -> _Timer:
        timer = _Timer(callback)
        self._made += 1
        heapq.heappush(self._timers, (self._ns + max(0, round(delay * 1e9)), self._made, timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_later(seconds, lambda: None if woken.done() else woken.set_result(None))
        await woken

    async def wait(self, tasks: Collection[asyncio.Task[None]], within: float) -> None:
        timer = asyncio.ensure_future(self.sleep(within))
        pending: set[asyncio.Future[Any]] = set(tasks)
        try:
            while pending and not timer.done():
                _, pending = await asyncio.wait(pending | {timer}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(timer)
        finally:
            timer.cancel()

    @property
    def timers(self) -> int:
        """Timers set and not fired or cancelled yet."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> int:
        """Move ``seconds`` on, firing every timer due meanwhile at its own time; returns
        the wall clock then (ms)."""
        target = self._ns + round(seconds * 1e9)
        while self._timers and self._timers[0][0] <= target:
            due, _, timer = heapq.heappop(self._timers)
            self._ns = max(self._ns, due)
            timer.fire()
        self._ns = target
        return self.now_ms()

    def advance_ms(self, ms: int) -> int:
        return self.advance(ms / 1000)


class _Timer:
    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback()


class RecordingProducer:
    """Stands in for the AckedProducer: keeps what would be written, acknowledges at once
    (or waits on ``gate`` when set)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes, Any]] = []
        self.partitions: list[int | None] = []
        self.gate: asyncio.Event | None = None

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Any, *,
                   partition: int | None = None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.records.append((topic, key, value, headers))
        self.partitions.append(partition)


class ScriptedSender:
    """Stands in for the HTTP sender: answers each endpoint with a programmed status, or
    raises what it was told to."""

    def __init__(self, answers: dict[str, int | BaseException | Deferral]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str]] = []
        self.last: list[bool] = []

    async def send(self, endpoint: Endpoint, event_id: str, body: bytes, tier: str, *, log: Any = None,
                   last: bool = False) -> Attempt | Deferral:
        self.sent.append((endpoint.id, event_id))
        self.last.append(last)
        await asyncio.sleep(0)
        answer = self.answers[endpoint.id]
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, Deferral):
            return answer
        outcome = Outcome.SUCCESS if 200 <= answer < 300 else Outcome.HTTP_ERROR
        return Attempt(at=1_700_000_000_000, tier=tier, duration_ms=5.0, outcome=outcome, status=answer)


def attempted(result: Attempt | Deferral) -> Attempt:
    """The attempt the sender made (a test that expects one, not a deferral)."""
    assert isinstance(result, Attempt), f"deferred, not sent: {result}"
    return result
