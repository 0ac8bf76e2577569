"""Writing and reading the gateway's topics: the acknowledged producer; reading a topic to
its end (the endpoint table, the delivery history, the dead-letter tools); following one
after that (:class:`TopicFollower`: the endpoint registry, the API's indexes).

:class:`AckedProducer` turns librdkafka's delivery callbacks into awaitables: a worker
settles a record only once the broker acknowledged what the record turned into. A
record that cannot be produced is tried again (with backoff) rather than dropped; its
source offset stays uncommitted meanwhile, so nothing is lost even if the process dies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from ..config import Config
from ..errors import InputError, Unavailable
from ._headers import Headers

__all__ = ["AckedProducer", "TopicFollower", "offsets_at", "read_to_end", "reader_consumer"]

log = logging.getLogger("gateway.kafka_io")


class AckedProducer:
    """An idempotent producer (``acks=all``) whose sends complete on acknowledgement."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._producer = Producer(
            config.kafka_common()
            | {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 2,
                "message.timeout.ms": 60_000,
            }
        )
        self._acks: deque[tuple[asyncio.Future[KafkaError | None], KafkaError | None]] = deque()
        """Sends acknowledged (or failed) and not yet resolved on the loop."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="producer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)  # (returns once it served what was acknowledged)
            self._hand_over()

    def _hand_over(self) -> None:
        """Wake the loop once for every acknowledgement one poll served, not once for
        each (a loop woken per record, measured: a tenth of a worker's CPU)."""
        if self._acks:
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        acks = self._acks
        while acks:
            future, err = acks.popleft()
            if not future.done():
                future.set_result(err)

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, *,
                   partition: int | None = None) -> None:
        """Produce (to ``partition``, else where the key leads) and wait for the broker's
        acknowledgement, retrying until it comes."""
        delay = 0.1
        while True:
            error = await self._send_once(topic, key, value, headers, partition)
            if error is None:
                return
            log.error("produce failed, retrying",
                      extra={"topic": topic, "error": error.str(), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _send_once(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, partition: int | None
    ) -> KafkaError | None:
        future: asyncio.Future[KafkaError | None] = self._loop.create_future()
        acks = self._acks

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            acks.append((future, err))

        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                else:
                    self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery,
                                           partition=partition)
                break
            except BufferError:
                await asyncio.sleep(0.01)
        return await future

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(2)
        if not self._loop.is_closed():
            self._hand_over()  # (what the flush served)


def reader_consumer(config: Config, purpose: str) -> Consumer:
    """A consumer for reading a topic outside the workers' groups: partitions are assigned
    directly under a throwaway group id, and nothing is ever committed.

    Its fetches wait ``fetch_wait_ms`` as the workers' do: the end of a partition is
    known from the first fetch there that finds nothing, and a broker holds that fetch for
    the whole wait (librdkafka's default of 500 ms made every `dlq list` or replay plan
    half a second longer per topic read)."""
    return Consumer(
        config.kafka_common()
        | {
            "group.id": f"{config.consumer_group}.{purpose}.{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": config.fetch_wait_ms,
        }
    )


def read_to_end(
    consumer: Consumer,
    config: Config,
    topic: str,
    *,
    partition: int | None = None,
    start: int = 0,
    starts: Mapping[int, int] | None = None,
    past_end: Callable[[Message], bool] | None = None,
    timeout: float = 30.0,
) -> Iterator[Message]:
    """Assign ``topic`` (or one partition of it) from offset ``start`` and yield its records
    up to the end each partition had when first reached; then return, never hang.

    ``starts`` reads only the partitions it names instead, each from its offset (where
    :func:`offsets_at` found it). ``past_end`` ends a partition sooner: at the first record
    it holds true for, which is not yielded, as if the partition ended there.

    Each partition is paused at its end, so records written meanwhile stay unread: resume
    the assignment to follow the topic from there. The end is found with
    ``enable.partition.eof``: the bundled broker's listed high watermarks are wrong.
    """
    if starts is not None:
        first = dict(starts)
        begin = dict(first)
    else:
        partitions = _partitions(consumer, config, topic, timeout)
        if partition is not None:
            if partition not in partitions:
                raise InputError(f"partition {partition}: {topic} has {len(partitions)} partitions "
                                 f"(0-{len(partitions) - 1})", field="partition")
            partitions = [partition]
        first = dict.fromkeys(partitions, start)
        begin = dict(first)
        if start > 0:
            # An offset past a partition's end is out of range: Kafka then resets the
            # consumer to the beginning (it would read everything), and the bundled broker
            # never answers (it would hang). So begin no later than the high watermark and
            # skip what is below ``start`` (the bundled broker's listed watermark may be
            # low: nothing is lost).
            for p in partitions:
                try:
                    _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
                except KafkaException as exc:
                    raise Unavailable(f"reading {topic}: {exc.args[0].str()}") from None
                begin[p] = max(0, min(start, high))
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in begin.items()])
    remaining = set(begin)
    idle_since = time.monotonic()
    while remaining:
        msg = consumer.poll(0.2)
        if msg is None:
            if time.monotonic() - idle_since > timeout:
                raise Unavailable(f"reading {topic} stalled for {timeout} s")
            continue
        idle_since = time.monotonic()
        error = msg.error()
        at = msg.partition()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                raise Unavailable(f"reading {topic}: {error.str()}")
            if at is not None:
                remaining.discard(at)
                consumer.pause([TopicPartition(topic, at)])
        elif at in remaining and (msg.offset() or 0) >= first[at]:
            if past_end is not None and past_end(msg):
                remaining.discard(at)
                consumer.pause([TopicPartition(topic, at)])
            else:
                yield msg


def offsets_at(consumer: Consumer, config: Config, topic: str, at: int, *, timeout: float = 30.0) -> dict[int, int]:
    """Where each partition of ``topic`` holds its first record stamped at or after ``at``
    (ms), as :func:`read_to_end`'s ``starts``: a partition without one is left out, one
    whose broker cannot tell (the bundled broker) is read from its start."""
    partitions = _partitions(consumer, config, topic, timeout)
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, at) for p in partitions], timeout=timeout)
    except KafkaException as exc:
        raise Unavailable(f"reading {topic}: {exc.args[0].str()}") from None
    # An offset of -1: no record stamped at or after ``at`` there.
    return {tp.partition: tp.offset if tp.error is None else 0
            for tp in found if tp.error is not None or tp.offset >= 0}


def _partitions(consumer: Consumer, config: Config, topic: str, timeout: float) -> list[int]:
    """The partitions of ``topic``; :class:`~gateway.errors.Unavailable` without a broker,
    or without the topic."""
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise Unavailable.no_broker(config.bootstrap_servers, exc.args[0].str()) from None
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise Unavailable(
            f"topic {topic} does not exist on {config.bootstrap_servers}; run `gateway topics create`"
        )
    return sorted(metadata.partitions)


class TopicFollower:
    """A topic read to its end, then followed on a thread: how the endpoint registry and
    the API's indexes keep a topic in memory.

    Its consumer is a :func:`reader_consumer`: in no group the workers use, committing
    nothing. :meth:`read` yields what the topic holds up to its end (as
    :func:`read_to_end`); :meth:`follow` then hands every later record to ``apply`` on a
    thread, until :meth:`stop`. Records the broker answers with an error are passed over.
    """

    def __init__(self, config: Config, topic: str, *, purpose: str, thread: str) -> None:
        self.config = config
        self.topic = topic
        self._consumer = reader_consumer(config, purpose)
        self._name = thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self, *, timeout: float = 30.0) -> Iterator[Message]:
        return read_to_end(self._consumer, self.config, self.topic, timeout=timeout)

    def follow(self, apply: Callable[[Message], None]) -> None:
        """Hand every record after the end :meth:`read` reached to ``apply``, on a thread."""
        # read_to_end paused each partition at its end: follow from there.
        self._consumer.resume(self._consumer.assignment())
        self._thread = threading.Thread(target=self._follow, args=(apply,), name=self._name, daemon=True)
        self._thread.start()

    def _follow(self, apply: Callable[[Message], None]) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            apply(msg)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()
