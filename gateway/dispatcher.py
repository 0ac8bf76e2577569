"""The dispatcher: what happens to one record of the events topic or of a retry tier.

* An event is fanned out to the enabled endpoints of its bot whose filter admits it; from
  then on each (event, endpoint) pair is a :class:`~gateway.records.Delivery` that travels
  alone, so a retry never re-sends to an endpoint that already answered 2xx.
* A delivery from a retry tier is attempted once more, for its own endpoint only.
* After each attempt, :func:`gateway.retry.next_step` decides: done, next tier, or dead
  letter. The record is settled (its offset may be committed) only once every delivery it
  produced is done or its next record was acknowledged by the broker.
* A record that cannot be decoded or validated is dead-lettered with its original bytes,
  and the partition moves on.

:meth:`Dispatcher.run` never raises: whatever goes wrong ends as a dead letter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from .codec import Codec, DecodeError
from .config import Config
from .endpoints import EndpointTable
from .events import SCHEMA_NAMES, Event, InvalidEvent
from .kafka_io import AckedProducer, dead_letter_headers, delivery_headers
from .metrics import (
    ATTEMPTS,
    DEAD_LETTERS,
    DECODE_ERRORS,
    DELIVERIES_IN_FLIGHT,
    DELIVERY_SECONDS,
    END_TO_END_SECONDS,
    EVENTS_CONSUMED,
    EVENTS_WITHOUT_ENDPOINT,
    LAST_SUCCESS,
    RETRIES_SCHEDULED,
    labelled,
    outcome_of,
)
from .records import (
    DEAD_LETTER_SCHEMA,
    DELIVERY_SCHEMA,
    ENDPOINT_SCHEMA,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    Endpoint,
)
from .retry import Delivered, GiveUp, Retry, next_step
from .sender import Sender
from .topics import Tier, Topics

__all__ = ["Dispatcher", "Job", "BadRecord", "now_ms"]

log = logging.getLogger(__name__)

_EVENT_SCHEMAS = frozenset(SCHEMA_NAMES.values())
_KEPT_BYTES = 64 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that could not be decoded or validated."""

    reason: DeadLetterReason
    detail: str


@dataclass(frozen=True, slots=True)
class Job:
    """A received record, decoded, with the time it may be processed."""

    message: Any
    """The confluent_kafka Message."""
    content: Event | Delivery | BadRecord
    due_at: int

    @property
    def offset(self) -> int:
        return int(self.message.offset())


class Dispatcher:
    """Turns records into HTTP attempts and their consequences. One per process."""

    def __init__(
        self,
        config: Config,
        *,
        codec: Codec,
        endpoints: EndpointTable,
        sender: Sender,
        producer: AckedProducer,
    ) -> None:
        self.config = config
        self.topics = Topics.from_config(config)
        self.tiers = self.topics.tiers
        self.codec = codec
        self.endpoints = endpoints
        self.sender = sender
        self.producer = producer
        self._consumed = labelled(EVENTS_CONSUMED)
        self._attempts = labelled(ATTEMPTS)
        self._in_flight = labelled(DELIVERIES_IN_FLIGHT)
        self._durations = labelled(DELIVERY_SECONDS)
        self._end_to_end = labelled(END_TO_END_SECONDS)

    def prepare(self, tier: Tier, message: Any) -> Job:
        """Decode and validate a received record; cheap enough for the poll path."""
        value = message.value()
        # The limit guards the events topic, which many services write to; the retry tiers
        # carry the gateway's own records, always larger than the event they wrap.
        if tier.index == 0 and value is not None and len(value) > self.config.max_record_bytes:
            EVENTS_CONSUMED.labels("invalid").inc()
            DECODE_ERRORS.labels(tier.name, DeadLetterReason.INVALID.value).inc()
            return Job(message, BadRecord(
                DeadLetterReason.INVALID,
                f"record of {len(value)} bytes is larger than the {self.config.max_record_bytes}-byte "
                "limit (GATEWAY_MAX_RECORD_BYTES)",
            ), 0)
        try:
            name, record = self.codec.decode(value)
            if tier.index == 0:
                if name not in _EVENT_SCHEMAS:
                    raise DecodeError(f"a {name} record on the events topic, not an event")
                event = Event.from_record(record)
                self._consumed(event.type.value).inc()
                return Job(message, event, 0)
            if name != DELIVERY_SCHEMA:
                raise DecodeError(f"a {name} record on a retry tier, not a delivery")
            delivery = Delivery.from_record(record)
            return Job(message, delivery, delivery.due_at)
        except DecodeError as exc:
            if tier.index == 0:
                EVENTS_CONSUMED.labels("undecodable").inc()
            DECODE_ERRORS.labels(tier.name, DeadLetterReason.UNDECODABLE.value).inc()
            return Job(message, BadRecord(DeadLetterReason.UNDECODABLE, str(exc)), 0)
        except InvalidEvent as exc:
            EVENTS_CONSUMED.labels("invalid").inc()
            DECODE_ERRORS.labels(tier.name, DeadLetterReason.INVALID.value).inc()
            return Job(message, BadRecord(DeadLetterReason.INVALID, str(exc)), 0)

    async def run(self, tier: Tier, job: Job) -> None:
        """Process a due job to the end: delivered, forwarded or dead-lettered."""
        try:
            content = job.content
            if isinstance(content, Event):
                await self._fan_out(tier, job, content)
            elif isinstance(content, Delivery):
                await self._retry(tier, job, content)
            else:
                await self._dead_letter_record(job, content.reason, content.detail)
        except Exception as exc:  # a bug must not stop the partition: keep the record
            log.exception("record processing failed; dead-lettering it",
                          extra={"topic": job.message.topic(), "offset": job.offset})
            await self._dead_letter_record(job, DeadLetterReason.INVALID,
                                           f"internal error while processing: {exc!r}")

    async def _fan_out(self, tier: Tier, job: Job, event: Event) -> None:
        targets = self.endpoints.for_event(event.bot_id, event.type.value)
        if not targets:
            EVENTS_WITHOUT_ENDPOINT.labels(event.type.value).inc()
            return
        body = event.json_body()
        if len(targets) == 1:
            await self._attempt(tier, job, event, targets[0], body)
            return
        await asyncio.gather(*(self._attempt(tier, job, event, e, body) for e in targets))

    async def _retry(self, tier: Tier, job: Job, delivery: Delivery) -> None:
        endpoint = self.endpoints.get(delivery.endpoint_id)
        if endpoint is None:
            await self._dead_letter(job, delivery, DeadLetterReason.ENDPOINT_REMOVED,
                                    f"endpoint {delivery.endpoint_id} was removed")
        elif not endpoint.enabled:
            await self._dead_letter(job, delivery, DeadLetterReason.ENDPOINT_DISABLED,
                                    f"endpoint {delivery.endpoint_id} is disabled")
        else:
            await self._attempt(tier, job, delivery, endpoint, delivery.payload.encode())

    async def _attempt(
        self, tier: Tier, job: Job, source: Event | Delivery, endpoint: Endpoint, body: bytes
    ) -> None:
        """One attempt of ``source`` (an event's first, or a delivery's next) at ``endpoint``."""
        in_flight = self._in_flight(tier.name)
        in_flight.inc()
        try:
            attempt = await self.sender.send(endpoint, source.event_id, body, tier.name)
        finally:
            in_flight.dec()
        outcome, status_class = outcome_of(attempt.status, attempt.error)
        self._attempts(tier.name, outcome, status_class).inc()
        self._durations(tier.name).observe(attempt.duration_ms / 1000)
        step = next_step(self.tiers, tier, attempt)
        if isinstance(step, Delivered):
            now = time.time()
            LAST_SUCCESS.set(now)
            event_type = source.type.value if isinstance(source, Event) else source.event_type
            self._end_to_end(event_type).observe(max(0.0, now - source.occurred_at / 1000))
            return
        # Only now, on the failure path, the delivery record that travels on.
        delivery = source if isinstance(source, Delivery) else _first_delivery(source, endpoint, body)
        fields = {
            "event_id": delivery.event_id,
            "endpoint_id": delivery.endpoint_id,
            "tier": tier.name,
            "outcome": attempt.describe(),
        }
        if isinstance(step, Retry):
            forwarded = delivery.after(attempt, due_at=step.due_at)
            value = self.codec.encode(DELIVERY_SCHEMA, forwarded.to_record(), topic=step.tier.topic)
            await self.producer.send(
                step.tier.topic,
                delivery.endpoint_id.encode(),
                value,
                delivery_headers(forwarded, source=_source(job)),
            )
            RETRIES_SCHEDULED.labels(step.tier.name).inc()
            log.info("delivery failed, retry scheduled", extra=fields | {"next_tier": step.tier.name})
            return
        assert isinstance(step, GiveUp)
        if step.reason is DeadLetterReason.GONE:
            await self._disable(endpoint)
        await self._dead_letter(job, delivery.after(attempt, due_at=delivery.due_at), step.reason, step.detail)

    async def _disable(self, endpoint: Endpoint) -> None:
        """A 410 Gone says the receiver is gone for good: stop sending to it."""
        current = self.endpoints.get(endpoint.id)
        if current is None or not current.enabled:
            return  # removed meanwhile: writing it back would resurrect it
        disabled = replace(current, enabled=False, updated_at=now_ms())
        topic = self.topics.endpoints
        await self.producer.send(
            topic, endpoint.id.encode(), self.codec.encode(ENDPOINT_SCHEMA, disabled.to_record(), topic=topic), []
        )
        log.warning("endpoint disabled: it answered 410 Gone", extra={"endpoint_id": endpoint.id})

    async def _dead_letter(
        self, job: Job, delivery: Delivery, reason: DeadLetterReason, detail: str
    ) -> None:
        topic, partition, offset = _source(job)
        dead = DeadLetter(
            reason=reason.value, detail=detail, dead_at=now_ms(), source_topic=topic,
            source_partition=partition, source_offset=offset, delivery=delivery,
        )
        await self._write_dead_letter(dead, delivery.endpoint_id.encode())
        log.warning("delivery dead-lettered", extra={
            "event_id": delivery.event_id, "endpoint_id": delivery.endpoint_id,
            "reason": reason.value, "detail": detail,
        })

    async def _dead_letter_record(self, job: Job, reason: DeadLetterReason, detail: str) -> None:
        topic, partition, offset = _source(job)
        message = job.message
        value = message.value()
        if value is not None and len(value) > _KEPT_BYTES:
            # The dead letter must fit in a Kafka record itself.
            detail += f" (original value cut to its first {_KEPT_BYTES} of {len(value)} bytes)"
            value = value[:_KEPT_BYTES]
        dead = DeadLetter(
            reason=reason.value, detail=detail, dead_at=now_ms(), source_topic=topic,
            source_partition=partition, source_offset=offset,
            original_key=(message.key() or b"")[:_KEPT_BYTES] or None, original_value=value,
        )
        await self._write_dead_letter(dead, message.key())
        log.warning("record dead-lettered", extra={
            "topic": topic, "partition": partition, "offset": offset,
            "reason": reason.value, "detail": detail,
        })

    async def _write_dead_letter(self, dead: DeadLetter, key: bytes | None) -> None:
        value = self.codec.encode(DEAD_LETTER_SCHEMA, dead.to_record(), topic=self.topics.dlq)
        await self.producer.send(self.topics.dlq, key, value, dead_letter_headers(dead))
        DEAD_LETTERS.labels(dead.reason).inc()


def _first_delivery(event: Event, endpoint: Endpoint, body: bytes) -> Delivery:
    """The delivery of ``event`` to ``endpoint`` before its first attempt."""
    return Delivery(
        event_id=event.event_id,
        event_type=event.type.value,
        bot_id=event.bot_id,
        session_id=event.session_id,
        occurred_at=event.occurred_at,
        payload=body.decode(),
        endpoint_id=endpoint.id,
        attempt=0,
        due_at=now_ms(),
    )


def _source(job: Job) -> tuple[str, int, int]:
    message = job.message
    return message.topic(), message.partition(), message.offset()
