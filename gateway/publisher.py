"""Publishing events to the events topic: the Python API for producers, and what
``gateway publish`` calls.

Every event is validated (:func:`gateway.events.parse_event`), encoded with the one codec,
keyed by its sessionId (so one session's events stay in order on one partition), and
counted as published only once the broker has acknowledged it (``acks=all``, idempotent
producer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from .codec import Codec
from .config import Config
from .errors import InputError, InvalidEvent, PublishError
from .events import Event, parse_event
from .store import Topics

__all__ = ["InputItem", "PublishResult", "Publisher", "publish", "read_events"]


@dataclass(frozen=True)
class PublishResult:
    event: Event
    error: str | None = None
    """None when the broker acknowledged the event."""
    partition: int | None = None
    offset: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Publisher:
    """Validates and publishes events. Thread-safe; reuse one per process.

    >>> with Publisher(Config.from_env()) as publisher:
    ...     event_id = publisher.publish({"event": "MESSAGE", "botId": ..., ...})
    """

    def __init__(self, config: Config | None = None, *, codec: Codec | None = None) -> None:
        self.config = config or Config.from_env()
        self.topic = Topics.from_config(self.config).events
        self.codec = codec or Codec(self.config.schema_registry_url)
        self._producer = Producer(
            self.config.kafka_common()
            | {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                # Give up on an unreachable broker with an error instead of queueing for 5 min.
                "message.timeout.ms": 30_000,
            }
        )

    def publish(self, event: Mapping[str, Any] | Event, *, timeout: float = 30.0) -> str:
        """Validate, publish and wait for the acknowledgement; returns the event id.

        Raises :class:`~gateway.errors.InvalidEvent` for an event of the wrong shape and
        :class:`~gateway.errors.PublishError` when the broker does not acknowledge it within
        ``timeout``.
        """
        if not isinstance(event, Event):
            event = parse_event(event)
        (result,) = self.publish_many([event], timeout=timeout)
        if result.error is not None:
            raise PublishError(f"event {event.event_id} was not published: {result.error}")
        return event.event_id

    def publish_many(self, events: Iterable[Event], *, timeout: float = 30.0) -> list[PublishResult]:
        """Publish already validated events; waits for every acknowledgement and reports
        each event's outcome, in order."""
        events = list(events)
        outcomes: dict[int, PublishResult] = {}

        def on_delivery(index: int, event: Event) -> Any:
            def callback(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    outcomes[index] = PublishResult(event, error=err.str())
                else:
                    outcomes[index] = PublishResult(event, partition=msg.partition(), offset=msg.offset())
            return callback

        for index, event in enumerate(events):
            value = self.codec.encode(event.schema_name, event.to_record(), topic=self.topic)
            while True:
                try:
                    self._producer.produce(
                        self.topic,
                        key=event.session_id.encode(),
                        value=value,
                        headers=[("event-id", event.event_id.encode()),
                                 ("event-type", event.type.value.encode())],
                        on_delivery=on_delivery(index, event),
                    )
                    break
                except BufferError:  # local queue full: let acknowledgements drain it
                    self._producer.poll(0.1)
        remaining = self._producer.flush(timeout)
        return [
            outcomes.get(i)
            or PublishResult(
                event,
                error=f"no acknowledgement within {timeout} s ({remaining} still queued); "
                f"is the broker at {self.config.bootstrap_servers} reachable?",
            )
            for i, event in enumerate(events)
        ]

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish(event: Mapping[str, Any], *, config: Config | None = None) -> str:
    """Publish one event with a short-lived producer; returns its event id. For many
    events, keep a :class:`Publisher`."""
    with Publisher(config) as publisher:
        return publisher.publish(event)


@dataclass(frozen=True)
class InputItem:
    """One event read from ``gateway publish`` input, or why it could not be read."""

    where: str
    """``line 3`` for JSON lines, ``item 3`` for a JSON array."""
    event: Event | None = None
    error: str | None = None


def read_events(text: str) -> list[InputItem]:
    """Parse ``gateway publish`` input: one JSON object per line, or one JSON array.

    Every item is validated; the caller decides what to do with the invalid ones. Raises
    :class:`~gateway.errors.InputError` when the input holds no event at all or is not JSON.
    """
    stripped = text.strip()
    if not stripped:
        raise InputError("the input is empty: expected JSON events, one object per line or an array",
                         field="source")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON array at line {exc.lineno} column {exc.colno}: {exc.msg}",
                             field="source") from None
        if not items:
            raise InputError("the input is an empty JSON array: there are no events to publish", field="source")
        return [_validated(f"item {i}", item) for i, item in enumerate(items, start=1)]
    result = []
    # Only \n ends a line: str.splitlines() would also split on U+2028 and friends, which
    # JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            result.append(InputItem(f"line {number}", error=f"invalid JSON at column {exc.colno}: {exc.msg}"))
            continue
        result.append(_validated(f"line {number}", item))
    return result


def _validated(where: str, item: object) -> InputItem:
    try:
        return InputItem(where, event=parse_event(item))
    except InvalidEvent as exc:
        return InputItem(where, error=str(exc))
