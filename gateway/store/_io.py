"""Writing and reading the gateway's topics: the acknowledged producer, and reading a topic
to its end (the endpoint table, the delivery history, the dead-letter tools).

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
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from ..config import Config
from ..errors import InputError, Unavailable
from ._headers import Headers

__all__ = ["AckedProducer", "read_to_end", "reader_consumer"]

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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="producer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

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
        loop = self._loop
        future: asyncio.Future[KafkaError | None] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            loop.call_soon_threadsafe(_resolve, future, err)

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


def _resolve(future: asyncio.Future[KafkaError | None], err: KafkaError | None) -> None:
    if not future.done():
        future.set_result(err)


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
    timeout: float = 30.0,
) -> Iterator[Message]:
    """Assign ``topic`` (or one partition of it) from offset ``start`` and yield its records
    up to the end each partition had when first reached; then return, never hang.

    Each partition is paused at its end, so records written meanwhile stay unread: resume
    the assignment to follow the topic from there. The end is found with
    ``enable.partition.eof``: the bundled broker's listed high watermarks are wrong.
    """
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise Unavailable(f"no Kafka broker answered at {config.bootstrap_servers}: {exc.args[0].str()}") from None
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise Unavailable(
            f"topic {topic} does not exist on {config.bootstrap_servers}; run `gateway topics create`"
        )
    partitions = sorted(metadata.partitions)
    if partition is not None:
        if partition not in partitions:
            raise InputError(f"partition {partition}: {topic} has {len(partitions)} partitions "
                             f"(0-{len(partitions) - 1})", field="partition")
        partitions = [partition]
    begin = dict.fromkeys(partitions, start)
    if start > 0:
        # An offset past a partition's end is out of range: Kafka then resets the consumer
        # to the beginning (it would read everything), and the bundled broker never answers
        # (it would hang). So begin no later than the high watermark and skip what is below
        # ``start`` (the bundled broker's listed watermark may be low: nothing is lost).
        for p in partitions:
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
            except KafkaException as exc:
                raise Unavailable(f"reading {topic}: {exc.args[0].str()}") from None
            begin[p] = max(0, min(start, high))
    consumer.assign([TopicPartition(topic, p, begin[p]) for p in partitions])
    remaining = set(partitions)
    idle_since = time.monotonic()
    while remaining:
        msg = consumer.poll(0.2)
        if msg is None:
            if time.monotonic() - idle_since > timeout:
                raise Unavailable(f"reading {topic} stalled for {timeout} s")
            continue
        idle_since = time.monotonic()
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                raise Unavailable(f"reading {topic}: {error.str()}")
            partition_at_end = msg.partition()
            if partition_at_end is not None:
                remaining.discard(partition_at_end)
                consumer.pause([TopicPartition(topic, partition_at_end)])
        elif msg.partition() in remaining and (msg.offset() or 0) >= start:
            yield msg
