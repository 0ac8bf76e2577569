"""The endpoint registry: registrations on the compacted endpoints topic, and the
in-memory table every worker routes by.

The topic is keyed by endpoint id; the latest value per key wins and a tombstone (null
value) removes the endpoint. The bundled broker does not compact, and a Kafka topic is
only compacted eventually, so readers always keep the latest value per key themselves.

A worker loads the whole topic (to the end of every partition) before it delivers
anything, then keeps following it, so a new endpoint receives events within seconds.
Writing a registration (:func:`save_endpoint`, :func:`delete_endpoint`) waits for the
broker's acknowledgement; judging one (is the URL usable, the secret a secret) is the
operations layer's (:mod:`gateway.ops`), which calls these.

The circuits topic, where workers report their circuit breakers, is read back here too
(:func:`load_circuits`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from confluent_kafka import Message, Producer

from ..codec import Codec
from ..config import Config
from ..errors import DecodeError, Unavailable
from ..records import CIRCUIT_SCHEMA, ENDPOINT_SCHEMA, Circuit, Endpoint
from ._io import TopicFollower, read_to_end, reader_consumer
from ._topics import Topics

__all__ = [
    "EndpointRegistry",
    "EndpointTable",
    "delete_endpoint",
    "load_circuits",
    "load_endpoints",
    "save_endpoint",
]

log = logging.getLogger("gateway.endpoints")


class EndpointTable:
    """The latest registration per endpoint id, indexed by bot.

    Written by one thread (the registry's), read by others (the dispatcher's). Every
    change, and every :meth:`load` of many records, happens under one lock that the
    readers take too, so a reader sees the table as it was between two changes: never
    an endpoint in two bots at once, never a dictionary that changes size under it.
    What a reader gets back (tuples, lists, frozen endpoints) is its own: nothing it
    holds changes afterwards.

    Costs: :meth:`load` is linear in the records it is given plus the endpoints of the
    bots they touch; one change costs the endpoints of its bot (that bot's tuple is
    rebuilt). Bot ids are UUIDs, compared case-insensitively.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Endpoint] = {}
        # The writer's per-bot index (lower-case bot id → endpoint id → endpoint): a change
        # touches one bot's dictionary instead of scanning every endpoint.
        self._members: dict[str, dict[str, Endpoint]] = {}
        # What readers route by: one immutable tuple per bot, swapped whole.
        self._by_bot: dict[str, tuple[Endpoint, ...]] = {}
        self._enabled = 0

    def apply(self, endpoint_id: str, endpoint: Endpoint | None) -> None:
        """Apply one record of the topic: a registration, or a removal (None)."""
        self.load(((endpoint_id, endpoint),))

    def load(self, records: Iterable[tuple[str, Endpoint | None]]) -> None:
        """Apply many records in order, as :meth:`apply` would one by one, in one step
        that readers see whole. ``records`` is consumed under the lock: pass a collection,
        not a generator that waits on I/O."""
        touched: set[str] = set()
        with self._lock:
            for endpoint_id, endpoint in records:
                old = self._by_id.get(endpoint_id)
                self._enabled += (endpoint is not None and endpoint.enabled) - (old is not None and old.enabled)
                old_bot = old.bot_id.lower() if old is not None else None
                new_bot = endpoint.bot_id.lower() if endpoint is not None else None
                if old_bot is not None and old_bot != new_bot:
                    members = self._members[old_bot]
                    del members[endpoint_id]
                    if not members:
                        del self._members[old_bot]
                    touched.add(old_bot)
                if endpoint is None or new_bot is None:
                    self._by_id.pop(endpoint_id, None)
                    continue
                self._by_id[endpoint_id] = endpoint
                # A registration that stays with its bot keeps its place in the bot's order.
                self._members.setdefault(new_bot, {})[endpoint_id] = endpoint
                touched.add(new_bot)
            for bot in touched:
                current = self._members.get(bot)
                if current:
                    self._by_bot[bot] = tuple(current.values())
                else:
                    self._by_bot.pop(bot, None)

    def get(self, endpoint_id: str) -> Endpoint | None:
        with self._lock:
            return self._by_id.get(endpoint_id)

    def for_event(self, bot_id: str, event_type: str) -> list[Endpoint]:
        """The enabled endpoints of ``bot_id`` whose filter admits ``event_type``.

        UUIDs are compared case-insensitively: ``6434515B-…`` and ``6434515b-…`` are one bot.
        """
        with self._lock:
            members = self._by_bot.get(bot_id.lower(), ())
        return [e for e in members if e.admits(event_type)]

    def for_bot(self, bot_id: str) -> list[Endpoint]:
        """Every endpoint of ``bot_id`` (enabled or not, any case), oldest first."""
        with self._lock:
            members = self._by_bot.get(bot_id.lower(), ())
        return sorted(members, key=lambda e: (e.created_at, e.id))

    def all(self) -> list[Endpoint]:
        """Every endpoint, by bot, then oldest first."""
        with self._lock:
            endpoints = list(self._by_id.values())
        return sorted(endpoints, key=lambda e: (e.bot_id.lower(), e.created_at, e.id))

    def counts(self) -> tuple[int, int]:
        """(enabled, disabled) endpoints, kept as changes are applied: a gauge can be set
        after every change without walking the table."""
        with self._lock:
            return self._enabled, len(self._by_id) - self._enabled

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)


class EndpointRegistry:
    """Reads the endpoints topic into an :class:`EndpointTable` and keeps following it.

    :meth:`start` returns once the table holds everything the topic held when it was
    called; a background thread applies later changes.
    """

    def __init__(
        self,
        config: Config,
        *,
        codec: Codec | None = None,
        on_change: Callable[[EndpointTable], None] | None = None,
    ) -> None:
        self.config = config
        self.topic = Topics.from_config(config).endpoints
        self.codec = codec or Codec(config.schema_registry_url)
        self.table = EndpointTable()
        self._on_change = on_change
        self._follower = TopicFollower(config, self.topic, purpose="endpoints-reader", thread="endpoints")

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> EndpointRegistry:
        # The initial read keeps the latest record per id, then loads them in one step:
        # linear in the records, whatever the number of endpoints per bot.
        latest: dict[str, Endpoint | None] = {}
        for msg in self._follower.read(timeout=timeout):
            change = self._decode(msg)
            if change is not None:
                latest[change[0]] = change[1]
        self.table.load(latest.items())
        for endpoint_id, endpoint in latest.items():
            self._log_change(endpoint_id, endpoint)
        log.info("endpoints loaded", extra={"endpoints": len(self.table), "topic": self.topic})
        if self._on_change:
            self._on_change(self.table)
        if follow:
            self._follower.follow(self._apply)
        return self

    def _apply(self, msg: Message) -> None:
        change = self._decode(msg)
        if change is None:
            return
        self.table.apply(*change)
        self._log_change(*change)
        if self._on_change:
            self._on_change(self.table)

    def _decode(self, msg: Message) -> tuple[str, Endpoint | None] | None:
        """The (endpoint id, registration or None for a tombstone) a record holds, or None
        when it holds nothing usable (logged)."""
        key = msg.key()
        value = msg.value()
        if not key:
            log.warning("endpoint record without key skipped", extra={"offset": msg.offset()})
            return None
        endpoint_id = key.decode(errors="replace")
        if value is None:
            return endpoint_id, None
        try:
            name, record = self.codec.decode(value)
            if name != ENDPOINT_SCHEMA:
                raise DecodeError(f"a {name} record, not an endpoint")
            return endpoint_id, Endpoint.from_record(record)
        except (DecodeError, KeyError, TypeError) as exc:
            log.error("endpoint record unreadable, skipped",
                      extra={"endpoint_id": endpoint_id, "error": str(exc)})
            return None

    @staticmethod
    def _log_change(endpoint_id: str, endpoint: Endpoint | None) -> None:
        if endpoint is None:
            log.info("endpoint removed", extra={"endpoint_id": endpoint_id})
        else:
            log.info("endpoint updated", extra={"endpoint_id": endpoint_id, "bot_id": endpoint.bot_id,
                                                 "enabled": endpoint.enabled})

    def stop(self) -> None:
        self._follower.stop()


def load_circuits(config: Config, *, timeout: float = 30.0) -> dict[str, Circuit]:
    """The last circuit breaker change the workers reported per endpoint id (the circuits
    topic, read to its end). Empty when nothing ever opened, or the topic is missing."""
    topic = Topics.from_config(config).circuits
    codec = Codec(config.schema_registry_url)
    consumer = reader_consumer(config, "circuits-reader")
    circuits: dict[str, Circuit] = {}
    try:
        for msg in read_to_end(consumer, config, topic, timeout=timeout):
            key = (msg.key() or b"").decode(errors="replace")
            value = msg.value()
            if value is None:
                circuits.pop(key, None)
                continue
            try:
                name, record = codec.decode(value)
                if name == CIRCUIT_SCHEMA:
                    circuits[key] = Circuit.from_record(record)
            except (DecodeError, KeyError, TypeError):
                log.warning("circuit record unreadable, skipped", extra={"endpoint_id": key})
    except Unavailable:
        return {}
    finally:
        consumer.close()
        codec.close()
    return circuits


def load_endpoints(config: Config, *, timeout: float = 30.0) -> EndpointTable:
    """Read the endpoints topic to its end once and return the table."""
    registry = EndpointRegistry(config).start(timeout=timeout, follow=False)
    registry.stop()
    return registry.table


def _write(config: Config, endpoint_id: str, value: bytes | None, *, timeout: float) -> None:
    producer = Producer(config.kafka_common() | {"acks": "all", "enable.idempotence": True,
                                                 "message.timeout.ms": int(timeout * 1000)})
    errors: list[str] = []
    producer.produce(
        Topics.from_config(config).endpoints,
        key=endpoint_id.encode(),
        value=value,
        on_delivery=lambda err, msg: errors.append(err.str()) if err else None,
    )
    if producer.flush(timeout) or errors:
        raise Unavailable(
            f"the endpoints topic did not acknowledge {endpoint_id}: "
            + (errors[0] if errors else f"no answer within {timeout} s")
        )


def save_endpoint(config: Config, endpoint: Endpoint, *, timeout: float = 30.0) -> None:
    """Write a registration (new or changed) as it is, and wait for the broker's
    acknowledgement. No validation: the operations layer validates (:mod:`gateway.ops`)."""
    topic = Topics.from_config(config).endpoints
    value = Codec(config.schema_registry_url).encode(ENDPOINT_SCHEMA, endpoint.to_record(), topic=topic)
    _write(config, endpoint.id, value, timeout=timeout)


def delete_endpoint(config: Config, endpoint_id: str, *, timeout: float = 30.0) -> None:
    """Write the tombstone of ``endpoint_id`` and wait for the broker's acknowledgement."""
    _write(config, endpoint_id, None, timeout=timeout)
