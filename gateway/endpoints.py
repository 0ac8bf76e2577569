"""The endpoint registry: registrations on the compacted endpoints topic, and the
in-memory table every worker routes by.

The topic is keyed by endpoint id; the latest value per key wins and a tombstone (null
value) removes the endpoint. The bundled broker does not compact, and a Kafka topic is
only compacted eventually, so readers always keep the latest value per key themselves.

A worker loads the whole topic (to the end of every partition) before it delivers
anything, then keeps following it, so a new endpoint receives events within seconds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from urllib.parse import urlsplit

import httpx
from confluent_kafka import Producer

from .codec import Codec, DecodeError
from .config import Config
from .events import EventType, is_uuid
from .kafka_io import TopicReadError, read_to_end, reader_consumer
from .records import ENDPOINT_SCHEMA, Endpoint
from .signing import InvalidSecret, new_secret, secret_key
from .topics import Topics

__all__ = [
    "EndpointTable",
    "EndpointRegistry",
    "EndpointError",
    "new_endpoint",
    "save_endpoint",
    "remove_endpoint",
    "load_endpoints",
    "validate_url",
    "mask_secret",
]

log = logging.getLogger(__name__)


class EndpointError(ValueError):
    """An endpoint registration the gateway refuses; the message names the field and value."""


def validate_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError as exc:
        raise EndpointError(f"url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"url {url!r} is not an http:// or https:// URL with a host")
    if parts.username or parts.password:
        shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        raise EndpointError(f"url {shown!r} carries credentials before the host; "
                            "the receiver must authenticate us by the signature instead")
    if any(c.isspace() for c in url):
        raise EndpointError(f"url {url!r} contains whitespace")
    try:  # what the sender will parse: the same judge here, so it cannot refuse it later
        httpx.URL(url).raw_host  # noqa: B018
    except httpx.InvalidURL as exc:
        raise EndpointError(f"url {url!r} is not a valid URL: {exc}") from None
    return url


def mask_secret(secret: str) -> str:
    return "whsec_" + "*" * 8


def new_endpoint(
    *,
    bot_id: str,
    url: str,
    event_types: Iterable[str] = (),
    secret: str | None = None,
    description: str | None = None,
    now_ms: int | None = None,
) -> Endpoint:
    """Validate a registration and build the endpoint (a new id, a new secret if none)."""
    if not is_uuid(bot_id):
        raise EndpointError(f"bot id {bot_id!r} is not a UUID")
    bot_id = bot_id.lower()  # routing compares lower-case ids
    validate_url(url)
    types = tuple(dict.fromkeys(t.strip().upper() for t in event_types if t.strip()))
    known = {t.value for t in EventType}
    for t in types:
        if t not in known:
            raise EndpointError(f"event type {t!r} is unknown; expected some of {', '.join(sorted(known))}")
    if secret is None:
        secret = new_secret()
    else:
        if not secret.startswith("whsec_"):
            raise EndpointError("the secret must look like whsec_<base64>")
        try:
            secret_key(secret)
        except InvalidSecret as exc:
            raise EndpointError(str(exc)) from None
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    return Endpoint(
        id=str(uuid.uuid4()),
        bot_id=bot_id,
        url=url,
        secret=secret,
        event_types=types,
        description=description,
        created_at=now,
        updated_at=now,
    )


class EndpointTable:
    """The latest registration per endpoint id, indexed by bot. Updated by one thread,
    read by others: every update swaps in new immutable tuples, so a reader never sees a
    half-applied change."""

    def __init__(self) -> None:
        self._by_id: dict[str, Endpoint] = {}
        self._by_bot: dict[str, tuple[Endpoint, ...]] = {}

    def apply(self, endpoint_id: str, endpoint: Endpoint | None) -> None:
        """Apply one record of the topic: a registration, or a removal (None)."""
        old = self._by_id.get(endpoint_id)
        if endpoint is None:
            self._by_id.pop(endpoint_id, None)
        else:
            self._by_id[endpoint_id] = endpoint
        for bot in {e.bot_id.lower() for e in (old, endpoint) if e is not None}:
            members = tuple(e for e in self._by_id.values() if e.bot_id.lower() == bot)
            if members:
                self._by_bot[bot] = members
            else:
                self._by_bot.pop(bot, None)

    def get(self, endpoint_id: str) -> Endpoint | None:
        return self._by_id.get(endpoint_id)

    def for_event(self, bot_id: str, event_type: str) -> list[Endpoint]:
        """The enabled endpoints of ``bot_id`` whose filter admits ``event_type``.

        UUIDs are compared case-insensitively: ``6434515B-…`` and ``6434515b-…`` are one bot.
        """
        return [e for e in self._by_bot.get(bot_id.lower(), ()) if e.admits(event_type)]

    def all(self) -> list[Endpoint]:
        return sorted(self._by_id.values(), key=lambda e: (e.bot_id, e.created_at, e.id))

    def __len__(self) -> int:
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Not a member of any group the workers use: reads every partition, never commits.
        self._consumer = reader_consumer(config, "endpoints-reader")

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> EndpointRegistry:
        try:
            for msg in read_to_end(self._consumer, self.config, self.topic, timeout=timeout):
                self._apply(msg)
        except TopicReadError as exc:
            raise EndpointError(str(exc)) from None
        # read_to_end paused each partition at its end: follow from there.
        self._consumer.resume(self._consumer.assignment())
        log.info("endpoints loaded", extra={"endpoints": len(self.table), "topic": self.topic})
        if self._on_change:
            self._on_change(self.table)
        if follow:
            self._thread = threading.Thread(target=self._follow, name="endpoints", daemon=True)
            self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            self._apply(msg)
            if self._on_change:
                self._on_change(self.table)

    def _apply(self, msg: object) -> None:
        key = msg.key()  # type: ignore[attr-defined]
        value = msg.value()  # type: ignore[attr-defined]
        if not key:
            log.warning("endpoint record without key skipped", extra={"offset": msg.offset()})  # type: ignore[attr-defined]
            return
        endpoint_id = key.decode(errors="replace")
        if value is None:
            self.table.apply(endpoint_id, None)
            log.info("endpoint removed", extra={"endpoint_id": endpoint_id})
            return
        try:
            name, record = self.codec.decode(value)
            if name != ENDPOINT_SCHEMA:
                raise DecodeError(f"a {name} record, not an endpoint")
            endpoint = Endpoint.from_record(record)
        except (DecodeError, KeyError, TypeError) as exc:
            log.error("endpoint record unreadable, skipped",
                      extra={"endpoint_id": endpoint_id, "error": str(exc)})
            return
        self.table.apply(endpoint_id, endpoint)
        log.info("endpoint updated", extra={"endpoint_id": endpoint_id, "bot_id": endpoint.bot_id,
                                             "enabled": endpoint.enabled})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()


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
        raise EndpointError(
            f"the endpoints topic did not acknowledge {endpoint_id}: "
            + (errors[0] if errors else f"no answer within {timeout} s")
        )


def save_endpoint(config: Config, endpoint: Endpoint, *, timeout: float = 30.0) -> None:
    """Write a registration (new or changed) and wait for the broker's acknowledgement."""
    topic = Topics.from_config(config).endpoints
    value = Codec(config.schema_registry_url).encode(ENDPOINT_SCHEMA, endpoint.to_record(), topic=topic)
    _write(config, endpoint.id, value, timeout=timeout)


def remove_endpoint(config: Config, endpoint_id: str, *, timeout: float = 30.0) -> None:
    """Write the tombstone that removes ``endpoint_id``."""
    _write(config, endpoint_id, None, timeout=timeout)


def set_enabled(endpoint: Endpoint, enabled: bool, *, now_ms: int | None = None) -> Endpoint:
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    return replace(endpoint, enabled=enabled, updated_at=now)
