"""The endpoint registry: registrations on the compacted endpoints topic, the in-memory
table every worker routes by, and the operations that manage registrations.

The topic is keyed by endpoint id; the latest value per key wins and a tombstone (null
value) removes the endpoint. The bundled broker does not compact, and a Kafka topic is
only compacted eventually, so readers always keep the latest value per key themselves.

A worker loads the whole topic (to the end of every partition) before it delivers
anything, then keeps following it, so a new endpoint receives events within seconds.

Management (:func:`register_endpoint`, :func:`update_endpoint`,
:func:`set_endpoint_enabled`, :func:`remove_endpoint`, :func:`rotate_secret`,
:func:`get_endpoint`, :func:`list_endpoints`) is what both faces of the gateway call:
the ``gateway endpoints`` commands and the HTTP API. These functions print nothing: they
return values and raise the errors below. They block on Kafka; async code calls them
from a thread. A change is read-modify-write of one record: of two concurrent changes
to one endpoint, the later write wins whole.

Errors::

    EndpointError (ValueError)       input refused; .field names the parameter at fault
     ├── EndpointNotFound            no endpoint has that id (an API answers 404)
     └── EndpointsUnavailable        the endpoints topic could not be read or written
                                     (an API answers 503); .field is None
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import httpx
from confluent_kafka import Message, Producer

from .codec import Codec, DecodeError
from .config import Config
from .destinations import DestinationPolicy
from .events import EventType, is_uuid
from .kafka_io import TopicReadError, read_to_end, reader_consumer
from .records import CIRCUIT_SCHEMA, ENDPOINT_SCHEMA, Circuit, Endpoint
from .signing import InvalidSecret, new_secret, secret_key
from .topics import Topics
from .transport import destination

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "KEEP",
    "EndpointError",
    "EndpointNotFound",
    "EndpointRegistry",
    "EndpointTable",
    "EndpointsUnavailable",
    "Keep",
    "Registration",
    "circuit_json",
    "destination_warning",
    "endpoint_json",
    "get_endpoint",
    "list_endpoints",
    "load_circuits",
    "load_endpoints",
    "mask_secret",
    "new_endpoint",
    "register_endpoint",
    "remove_endpoint",
    "rotate_secret",
    "rotated",
    "save_endpoint",
    "set_enabled",
    "set_endpoint_enabled",
    "update_endpoint",
    "validate_bot_id",
    "validate_event_types",
    "validate_max_in_flight",
    "validate_rate_limit",
    "validate_secret",
    "validate_url",
]

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 24 * 3600
"""How long a rotated-out secret keeps signing unless told otherwise."""


class EndpointError(ValueError):
    """An endpoint operation refused; the message names the field and its value (never a
    secret's). ``field`` is the name of the parameter at fault (``bot_id``, ``url``,
    ``event_types``, ``secret``, ``grace_seconds``, ``endpoint_id``), or None when no
    single input is."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class EndpointNotFound(EndpointError):
    """No endpoint is registered under ``endpoint_id``."""

    def __init__(self, endpoint_id: str, *, field: str = "endpoint_id") -> None:
        super().__init__(f"no endpoint with id {endpoint_id!r}", field=field)
        self.endpoint_id = endpoint_id


class EndpointsUnavailable(EndpointError):
    """The endpoints topic could not be read, or did not acknowledge a write."""


def validate_bot_id(bot_id: str) -> str:
    """``bot_id`` in lower case, the form routing compares; refused unless a UUID."""
    if not is_uuid(bot_id):
        raise EndpointError(f"bot id {bot_id!r} is not a UUID", field="bot_id")
    return bot_id.lower()


def validate_url(url: str) -> str:
    """``url`` if deliveries can be POSTed to it (http or https, a host, no credentials,
    no whitespace, and parsed by the sender's own parser)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError as exc:
        raise EndpointError(f"url {url!r} is not a valid URL: {exc}", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"url {url!r} is not an http:// or https:// URL with a host", field="url")
    if parts.username or parts.password:
        shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        raise EndpointError(f"url {shown!r} carries credentials before the host; "
                            "the receiver must authenticate us by the signature instead", field="url")
    if any(c.isspace() for c in url):
        raise EndpointError(f"url {url!r} contains whitespace", field="url")
    try:  # what the sender will parse: the same judge here, so it cannot refuse it later
        httpx.URL(url).raw_host  # noqa: B018
    except httpx.InvalidURL as exc:
        raise EndpointError(f"url {url!r} is not a valid URL: {exc}", field="url") from None
    return url


def validate_event_types(event_types: Iterable[str]) -> tuple[str, ...]:
    """The event types as stored: upper case, without blanks or repeats; refused if unknown."""
    types = tuple(dict.fromkeys(t.strip().upper() for t in event_types if t.strip()))
    known = {t.value for t in EventType}
    for t in types:
        if t not in known:
            raise EndpointError(f"event type {t!r} is unknown; expected some of {', '.join(sorted(known))}",
                                field="event_types")
    return types


class Keep(Enum):
    """An argument left out of a change: the value stays as it is (``None`` clears it)."""

    KEEP = "keep"


KEEP = Keep.KEEP


def validate_rate_limit(value: float | str | None) -> float | None:
    """A rate limit in requests per second: a number, or text such as ``50/s``, ``600/m``,
    ``36000/h``; ``None`` (or ``none``) is no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*", value)
        if not match:
            raise EndpointError(f"rate limit {value!r} is not a rate such as 50/s or 600/m", field="rate_limit")
        rate = float(match.group(1)) / {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise EndpointError(f"rate limit {value!r} is not a number of requests per second", field="rate_limit")
    else:
        rate = float(value)
    if not 0 < rate <= 1_000_000 or rate != rate:
        raise EndpointError(f"rate limit {value!r} must be more than 0 and at most 1000000 per second",
                            field="rate_limit")
    return rate


def validate_max_in_flight(value: int | str | None) -> int | None:
    """The most requests in flight (1-1000); ``None`` (or ``default``): the process's."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default", "none")):
        return None
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not 1 <= number <= 1000:
        raise EndpointError(f"max in flight {value!r} is not a whole number from 1 to 1000", field="max_in_flight")
    return number


def validate_secret(secret: str) -> str:
    """``secret`` if it can sign (``whsec_`` and base64 of at least 16 bytes); the error
    never shows it."""
    if not secret.startswith("whsec_"):
        raise EndpointError("the secret must look like whsec_<base64>", field="secret")
    try:
        secret_key(secret)
    except InvalidSecret as exc:
        raise EndpointError(str(exc), field="secret") from None
    return secret


def mask_secret(secret: str) -> str:
    """What is shown instead of a secret: the same for every secret, so it reveals nothing."""
    return "whsec_" + "*" * 8


def endpoint_json(endpoint: Endpoint, *, show_secret: bool = False) -> dict[str, Any]:
    """The endpoint as ``gateway endpoints … --json`` and the HTTP API show it; the
    secret masked unless ``show_secret``. The previous secret is never shown."""
    return {
        "id": endpoint.id,
        "botId": endpoint.bot_id,
        "url": endpoint.url,
        "events": list(endpoint.event_types),
        "enabled": endpoint.enabled,
        "description": endpoint.description,
        "rateLimit": endpoint.rate_limit,
        "maxInFlight": endpoint.max_in_flight,
        "secret": endpoint.secret if show_secret else mask_secret(endpoint.secret),
        "createdAt": endpoint.created_at,
        "updatedAt": endpoint.updated_at,
    }


def circuit_json(circuit: Circuit | None) -> dict[str, Any]:
    """An endpoint's circuit as the workers last reported it (closed when never opened)."""
    if circuit is None:
        return {"state": "closed"}
    return {"state": circuit.state, "since": circuit.changed_at, "failures": circuit.failures,
            "probeAt": circuit.probe_at, "worker": circuit.worker}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_endpoint(
    *,
    bot_id: str,
    url: str,
    event_types: Iterable[str] = (),
    secret: str | None = None,
    description: str | None = None,
    rate_limit: float | str | None = None,
    max_in_flight: int | str | None = None,
    now_ms: int | None = None,
) -> Endpoint:
    """Validate a registration and build the endpoint (a new id, a new secret if none)."""
    bot_id = validate_bot_id(bot_id)  # routing compares lower-case ids
    validate_url(url)
    types = validate_event_types(event_types)
    secret = new_secret() if secret is None else validate_secret(secret)
    now = now_ms if now_ms is not None else _now_ms()
    return Endpoint(
        id=str(uuid.uuid4()),
        bot_id=bot_id,
        url=url,
        secret=secret,
        event_types=types,
        description=description,
        rate_limit=validate_rate_limit(rate_limit),
        max_in_flight=validate_max_in_flight(max_in_flight),
        created_at=now,
        updated_at=now,
    )


def set_enabled(endpoint: Endpoint, enabled: bool, *, now_ms: int | None = None) -> Endpoint:
    """``endpoint`` enabled or disabled, everything else kept."""
    now = now_ms if now_ms is not None else _now_ms()
    return replace(endpoint, enabled=enabled, updated_at=now)


def _validate_grace(grace_seconds: float) -> None:
    if not grace_seconds >= 0:  # also refuses NaN
        raise EndpointError(f"grace {grace_seconds!r} s is not 0 or more seconds", field="grace_seconds")


def rotated(
    endpoint: Endpoint,
    *,
    secret: str | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    now_ms: int | None = None,
) -> Endpoint:
    """``endpoint`` with a new secret (``secret``, or a generated one); the current secret
    becomes the previous one and keeps signing for ``grace_seconds``. A previous secret
    still in its grace is dropped: two signatures at most."""
    _validate_grace(grace_seconds)
    fresh = new_secret() if secret is None else validate_secret(secret)
    now = now_ms if now_ms is not None else _now_ms()
    return replace(endpoint, secret=fresh, previous_secret=endpoint.secret,
                   previous_secret_expires_at=now + int(grace_seconds * 1000), updated_at=now)


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Not a member of any group the workers use: reads every partition, never commits.
        self._consumer = reader_consumer(config, "endpoints-reader")

    def start(self, *, timeout: float = 30.0, follow: bool = True) -> EndpointRegistry:
        # The initial read keeps the latest record per id, then loads them in one step:
        # linear in the records, whatever the number of endpoints per bot.
        latest: dict[str, Endpoint | None] = {}
        try:
            for msg in read_to_end(self._consumer, self.config, self.topic, timeout=timeout):
                change = self._decode(msg)
                if change is not None:
                    latest[change[0]] = change[1]
        except TopicReadError as exc:
            raise EndpointsUnavailable(str(exc)) from None
        self.table.load(latest.items())
        for endpoint_id, endpoint in latest.items():
            self._log_change(endpoint_id, endpoint)
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
            change = self._decode(msg)
            if change is None:
                continue
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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()


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
    except TopicReadError:
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
        raise EndpointsUnavailable(
            f"the endpoints topic did not acknowledge {endpoint_id}: "
            + (errors[0] if errors else f"no answer within {timeout} s")
        )


def save_endpoint(config: Config, endpoint: Endpoint, *, timeout: float = 30.0) -> None:
    """Write a registration (new or changed) as it is, and wait for the broker's
    acknowledgement. No validation: the management functions below validate."""
    topic = Topics.from_config(config).endpoints
    value = Codec(config.schema_registry_url).encode(ENDPOINT_SCHEMA, endpoint.to_record(), topic=topic)
    _write(config, endpoint.id, value, timeout=timeout)


# --- management: what `gateway endpoints …` and the HTTP API call ---------------------------


@dataclass(frozen=True)
class Registration:
    """An endpoint as saved, and what the user should know about it."""

    endpoint: Endpoint
    """Including its signing secret: show it once, to whoever registered it."""
    warning: str | None = None
    """Why deliveries to its URL would be refused under the configured destination
    policy (a loopback or private address, say), or None. It is registered anyway: the
    policy may change, and the name may resolve elsewhere later."""


def destination_warning(config: Config, url: str) -> str | None:
    """Why deliveries to ``url`` would be refused, judged by the same
    :class:`DestinationPolicy` the sender applies when it connects (so the warning and
    the refusal cannot disagree), or None. ``url`` must be valid (:func:`validate_url`)."""
    policy = DestinationPolicy(allow_private=config.allow_private_networks,
                               allowed=config.allowed_networks)

    async def check() -> str | None:
        try:
            return await policy.check(*destination(httpx.URL(url)))
        finally:
            await policy.aclose()

    refused = asyncio.run(check())
    if refused is None:
        return None
    return (f"{url}: {refused}; deliveries to it are refused unless "
            "GATEWAY_ALLOW_PRIVATE_NETWORKS=true or GATEWAY_ALLOWED_NETWORKS covers it")


def register_endpoint(
    config: Config,
    *,
    bot_id: str,
    url: str,
    event_types: Iterable[str] = (),
    secret: str | None = None,
    description: str | None = None,
    rate_limit: float | str | None = None,
    max_in_flight: int | str | None = None,
    timeout: float = 30.0,
) -> Registration:
    """Validate and save a new endpoint (a new id; a generated secret unless ``secret``).

    Raises :class:`EndpointError` naming the field at fault, or
    :class:`EndpointsUnavailable` if the topic does not acknowledge the write.
    """
    endpoint = new_endpoint(bot_id=bot_id, url=url, event_types=event_types, secret=secret,
                            description=description, rate_limit=rate_limit, max_in_flight=max_in_flight)
    warning = destination_warning(config, url)
    save_endpoint(config, endpoint, timeout=timeout)
    return Registration(endpoint, warning)


def _current(config: Config, table: EndpointTable | None, timeout: float) -> EndpointTable:
    return table if table is not None else load_endpoints(config, timeout=timeout)


def get_endpoint(
    config: Config, endpoint_id: str, *, table: EndpointTable | None = None, timeout: float = 30.0
) -> Endpoint:
    """The endpoint registered under ``endpoint_id``; :class:`EndpointNotFound` if none.

    Read from ``table`` when given (a running :class:`EndpointRegistry`'s, say), else
    from the topic, to its end.
    """
    endpoint = _current(config, table, timeout).get(endpoint_id)
    if endpoint is None:
        raise EndpointNotFound(endpoint_id)
    return endpoint


def list_endpoints(
    config: Config,
    *,
    bot_id: str | None = None,
    table: EndpointTable | None = None,
    timeout: float = 30.0,
) -> list[Endpoint]:
    """Every endpoint (by bot, oldest first), or only ``bot_id``'s, in any case."""
    if bot_id is not None:
        bot_id = validate_bot_id(bot_id)
    current = _current(config, table, timeout)
    return current.all() if bot_id is None else current.for_bot(bot_id)


def update_endpoint(
    config: Config,
    endpoint_id: str,
    *,
    url: str | None = None,
    event_types: Iterable[str] | None = None,
    description: str | None = None,
    rate_limit: float | str | Keep | None = KEEP,
    max_in_flight: int | str | Keep | None = KEEP,
    table: EndpointTable | None = None,
    timeout: float = 30.0,
) -> Registration:
    """Change what is given (None keeps the URL, events and description; ``event_types=()``
    means all; ``rate_limit``/``max_in_flight`` are kept unless given, and ``None`` clears
    them) and save. The secret, the bot and the enabled state have functions of their own."""
    # Validate the inputs before reading the whole topic.
    types = validate_event_types(event_types) if event_types is not None else None
    if url is not None:
        validate_url(url)
    rate = rate_limit if isinstance(rate_limit, Keep) else validate_rate_limit(rate_limit)
    in_flight = max_in_flight if isinstance(max_in_flight, Keep) else validate_max_in_flight(max_in_flight)
    current = get_endpoint(config, endpoint_id, table=table, timeout=timeout)
    changed = replace(
        current,
        url=current.url if url is None else url,
        event_types=current.event_types if types is None else types,
        description=current.description if description is None else description,
        rate_limit=current.rate_limit if isinstance(rate, Keep) else rate,
        max_in_flight=current.max_in_flight if isinstance(in_flight, Keep) else in_flight,
        updated_at=_now_ms(),
    )
    warning = destination_warning(config, changed.url) if url is not None else None
    save_endpoint(config, changed, timeout=timeout)
    return Registration(changed, warning)


def set_endpoint_enabled(
    config: Config,
    endpoint_id: str,
    enabled: bool,
    *,
    table: EndpointTable | None = None,
    timeout: float = 30.0,
) -> Endpoint:
    """Enable or disable ``endpoint_id`` and return it as saved."""
    changed = set_enabled(get_endpoint(config, endpoint_id, table=table, timeout=timeout), enabled)
    save_endpoint(config, changed, timeout=timeout)
    return changed


def remove_endpoint(
    config: Config, endpoint_id: str, *, table: EndpointTable | None = None, timeout: float = 30.0
) -> Endpoint:
    """Remove ``endpoint_id`` (write its tombstone) and return what was registered.
    Workers dead-letter its pending retries as ``endpoint_removed``."""
    removed = get_endpoint(config, endpoint_id, table=table, timeout=timeout)
    _write(config, endpoint_id, None, timeout=timeout)
    return removed


def rotate_secret(
    config: Config,
    endpoint_id: str,
    *,
    secret: str | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    table: EndpointTable | None = None,
    timeout: float = 30.0,
) -> Endpoint:
    """Give ``endpoint_id`` a new secret (see :func:`rotated`), save it and return the
    endpoint, whose ``secret`` is the new one: show it once."""
    # Validate the inputs before reading the whole topic.
    _validate_grace(grace_seconds)
    if secret is not None:
        validate_secret(secret)
    current = get_endpoint(config, endpoint_id, table=table, timeout=timeout)
    changed = rotated(current, secret=secret, grace_seconds=grace_seconds)
    save_endpoint(config, changed, timeout=timeout)
    return changed
