"""The dispatcher: what happens to one record of the events topic or of a retry tier.

* An event is fanned out to the enabled endpoints of its bot whose filter admits it; from
  then on each (event, endpoint) pair is a :class:`~gateway.records.Delivery` that travels
  alone, so a retry never re-sends to an endpoint that already answered 2xx.
* A delivery from a retry tier is attempted once more, for its own endpoint only.
* After each attempt, :func:`~gateway.delivery.decide` says what follows (done, next tier, or
  dead letter, and whether to disable the endpoint) and :meth:`Dispatcher._apply` carries
  it out. The record is settled (its offset may be committed) only once every delivery it
  produced is done or its next record was acknowledged by the broker.
* A record that cannot be decoded or validated is dead-lettered with its original bytes,
  and the partition moves on. One whose schema the registry has not given yet is
  :class:`Pending`: the worker holds its partition until the schema comes.

Failures of the gateway itself are contained per attempt: an attempt that raises (an
unusable endpoint record, a bug) dead-letters that one (event, endpoint) pair as
``internal_error`` with its delivery; the record's other attempts go on and are waited
for. :meth:`Dispatcher.run` raises only when even the dead letter could not be written,
or the sender is closed (shutdown): then the record stays unsettled and is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..clock import SYSTEM, Clock
from ..codec import Codec
from ..config import Config
from ..errors import DecodeError, InvalidEvent, SchemaPending, SenderClosed
from ..events import SCHEMA_NAMES, Event
from ..observability import Log, Metrics, bind
from ..records import (
    DEAD_LETTER_SCHEMA,
    DELIVERY_ATTEMPT_SCHEMA,
    DELIVERY_SCHEMA,
    ENDPOINT_SCHEMA,
    Attempt,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    DeliveryAttempt,
    Endpoint,
    Next,
    Outcome,
    bounded,
)
from ..store import EndpointTable, Headers, Tier, Topics, dead_letter_headers, delivery_headers, record_header
from ._flow import Deferral, deferral_rung
from ._retry import Decision, Delivered, GiveUp, Retry, decide, first_delivery
from ._routing import Ownership
from ._sender import Sender

__all__ = ["MIN_DEFERRAL", "SCHEDULE_HEADER", "BadRecord", "Dispatcher", "Job", "Pending", "RecordWriter"]

log = logging.getLogger("gateway.dispatcher")

SCHEDULE_HEADER = "schedule-tier"
"""The header naming, on the deliveries topic, whose attempt a forwarded delivery makes."""
OWNERSHIP_WAIT = 30.0
"""Longest a record waits, when a process starts, to learn which endpoints it owns
(seconds); after it, records of endpoints not known to be owned here are forwarded."""

MIN_DEFERRAL = 0.25
"""Shortest a deferred delivery stays away (seconds): a Kafka round trip is not free."""

_EVENT_SCHEMAS = frozenset(SCHEMA_NAMES.values())
_KEPT_BYTES = 64 * 1024


class RecordWriter(Protocol):
    """Where the dispatcher's records go: returns once the broker acknowledged one
    (:class:`~gateway.store.AckedProducer`)."""

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, *,
                   partition: int | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that could not be decoded or validated."""

    reason: DeadLetterReason
    detail: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A record whose writer schema is still to be fetched from the registry."""

    schema_id: int


@dataclass(frozen=True, slots=True)
class Job:
    """A received record, decoded, with the time it may be processed."""

    message: Any
    """The confluent_kafka Message."""
    content: Event | Delivery | BadRecord | Pending
    due_at: int
    schedule: str | None = None
    """On the deliveries topic: the tier whose attempt the delivery makes (its record's
    ``schedule-tier`` header)."""

    @property
    def offset(self) -> int:
        return int(self.message.offset())

    @property
    def ready(self) -> bool:
        """Decoded (or found bad): only its due time may still hold it back."""
        return not isinstance(self.content, Pending)


class Dispatcher:
    """Turns records into HTTP attempts and their consequences. One per process."""

    def __init__(
        self,
        config: Config,
        *,
        codec: Codec,
        endpoints: EndpointTable,
        sender: Sender,
        producer: RecordWriter,
        metrics: Metrics,
        clock: Clock = SYSTEM,
        ownership: Ownership | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.ownership = ownership
        """Which endpoints this process attempts itself (the others' deliveries go to their
        owner); None: every one (no other process attempts)."""
        self.topics = Topics.from_config(config)
        self.tiers = self.topics.tiers
        self.codec = codec
        self.endpoints = endpoints
        self.sender = sender
        self.producer = producer
        self.metrics = metrics

    # -- decoding (on the poll path) -------------------------------------------------------

    def prepare(self, tier: Tier, message: Any) -> Job:
        """Decode and validate a received record; cheap enough for the poll path. Never
        raises: a failure of the gateway itself makes an ``internal_error`` bad record."""
        try:
            return self._prepare(tier, message)
        except Exception as exc:
            log.exception("reading a record failed", extra={
                "topic": message.topic(), "partition": message.partition(), "offset": message.offset()})
            return self._bad(tier, message, DeadLetterReason.INTERNAL_ERROR,
                             f"internal error while reading the record: {exc!r}")

    def _prepare(self, tier: Tier, message: Any) -> Job:
        value = message.value()
        # The limit guards the events topic, which many services write to; the retry tiers
        # carry the gateway's own records, always larger than the event they wrap.
        if tier.is_events and value is not None and len(value) > self.config.max_record_bytes:
            return self._bad(tier, message, DeadLetterReason.INVALID, (
                f"record of {len(value)} bytes is larger than the {self.config.max_record_bytes}-byte "
                "limit (GATEWAY_MAX_RECORD_BYTES)"))
        try:
            name, record = self.codec.decode(value, fetch=False)
            if tier.is_events:
                if name not in _EVENT_SCHEMAS:
                    raise DecodeError(f"a {name} record on the events topic, not an event")
                event = Event.from_record(record)
                self.metrics.consumed(event.type.value).inc()
                return Job(message, event, 0)
            if name != DELIVERY_SCHEMA:
                raise DecodeError(f"a {name} record on a retry tier, not a delivery")
            delivery = Delivery.from_record(record)
            if tier.owner:  # forwarded when due: due now, for the attempt its header names
                return Job(message, delivery, 0, record_header(message, SCHEDULE_HEADER))
            return Job(message, delivery, delivery.due_at)
        except SchemaPending as pending:
            return Job(message, Pending(pending.schema_id), 0)
        except DecodeError as exc:
            return self._bad(tier, message, DeadLetterReason.UNDECODABLE, str(exc))
        except InvalidEvent as exc:
            return self._bad(tier, message, DeadLetterReason.INVALID, str(exc))

    def _bad(self, tier: Tier, message: Any, reason: DeadLetterReason, detail: str) -> Job:
        if tier.is_events and reason is not DeadLetterReason.INTERNAL_ERROR:
            self.metrics.consumed(reason.value).inc()
        self.metrics.decode_errors.labels(tier.name, reason.value).inc()
        return Job(message, BadRecord(reason, detail), 0)

    # -- processing -----------------------------------------------------------------------

    async def run(self, tier: Tier, job: Job) -> None:
        """Process a due, ready job to the end: delivered, forwarded or dead-lettered."""
        content = job.content
        try:
            if isinstance(content, Event):
                await self._fan_out(tier, job, content)
            elif isinstance(content, Delivery):
                await self._retry(tier, job, content)
            elif isinstance(content, BadRecord):
                await self._dead_letter_record(job, content.reason, content.detail)
            else:
                raise AssertionError(f"a record still waiting for schema {content.schema_id} was run")
        except SenderClosed:
            raise
        except Exception as exc:  # outside any attempt (which guard themselves): the record
            log.exception("record processing failed; dead-lettering it",
                          extra={"topic": job.message.topic(), "offset": job.offset})
            await self._dead_letter_record(job, DeadLetterReason.INTERNAL_ERROR,
                                           f"internal error while processing: {exc!r}")

    async def _fan_out(self, tier: Tier, job: Job, event: Event) -> None:
        targets = self.endpoints.for_event(event.bot_id, event.type.value)
        if not targets:
            self.metrics.events_without_endpoint.labels(event.type.value).inc()
            return
        body = event.json_body()
        if len(targets) == 1:
            await self._attempt_or_forward(tier, tier, job, event, targets[0], body)
            return
        # Every attempt is waited for, whatever another one does: the record is settled
        # only when all of them are.
        results = await asyncio.gather(*(self._attempt_or_forward(tier, tier, job, event, e, body) for e in targets),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _retry(self, tier: Tier, job: Job, delivery: Delivery) -> None:
        endpoint = self.endpoints.get(delivery.endpoint_id)
        bound = bind(log, event_id=delivery.event_id, endpoint_id=delivery.endpoint_id, tier=tier.name)
        if endpoint is None:
            await self._dead_letter(job, delivery, DeadLetterReason.ENDPOINT_REMOVED,
                                    f"endpoint {delivery.endpoint_id} was removed", bound)
        elif not endpoint.enabled:
            await self._dead_letter(job, delivery, DeadLetterReason.ENDPOINT_DISABLED,
                                    f"endpoint {delivery.endpoint_id} is disabled", bound)
        elif tier.deferral and self._expired(delivery) is not None:
            await self._expire(job, delivery, endpoint, self._schedule_tier(tier, job, delivery), bound)
        else:
            await self._attempt_or_forward(tier, self._schedule_tier(tier, job, delivery), job, delivery, endpoint,
                                           delivery.payload.encode())

    def _schedule_tier(self, tier: Tier, job: Job, delivery: Delivery) -> Tier:
        """Whose attempt a delivery makes: its tier's; on the deliveries topic, the tier its
        record names; back from a deferral rung, the tier whose attempt was put off (its
        log's last entry says which)."""
        if not tier.routes:
            return tier
        names = [job.schedule] if job.schedule is not None else []
        last = delivery.last_attempt
        if last is not None:
            names.append(last.tier)
        for name in names:
            for schedule in self.tiers:
                if schedule.name == name:
                    return schedule
        return self.tiers[min(delivery.attempt, len(self.tiers) - 1)]

    async def _attempt_or_forward(self, tier: Tier, schedule: Tier, job: Job, source: Event | Delivery,
                                  endpoint: Endpoint, body: bytes) -> None:
        """Attempt here when this process owns the endpoint (records of the deliveries
        topic always: their partition is this process's), else forward the delivery to
        its owner."""
        ownership = self.ownership
        if not (tier.owner or ownership is None or ownership.known):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OWNERSHIP_WAIT):
                    await ownership.wait_known()
        if tier.owner or ownership is None or ownership.owns(endpoint.id):
            await self._attempt(schedule, job, source, endpoint, body)
        else:
            await self._forward(schedule, job, source, endpoint, body)

    async def _forward(self, schedule: Tier, job: Job, source: Event | Delivery, endpoint: Endpoint,
                       body: bytes) -> None:
        """Send the delivery to the partition of the deliveries topic that owns its
        endpoint, for the attempt of ``schedule``: not an attempt, no line in its log."""
        assert self.ownership is not None
        delivery = source if isinstance(source, Delivery) else first_delivery(source, endpoint, body)
        topic = self.topics.deliveries
        value = self.codec.encode(DELIVERY_SCHEMA, delivery.to_record(), topic=topic)
        headers = [*delivery_headers(delivery, source=_source(job)), (SCHEDULE_HEADER, schedule.name.encode())]
        await self.producer.send(topic, endpoint.id.encode(), value, headers,
                                 partition=self.ownership.partition_of(endpoint.id))
        self.metrics.forwarded.inc()

    async def _attempt(
        self, tier: Tier, job: Job, source: Event | Delivery, endpoint: Endpoint, body: bytes
    ) -> None:
        """One attempt of ``source`` (an event's first, or a delivery's next) at
        ``endpoint``, and what follows it. Contained: a failure of the gateway's own
        dead-letters this pair alone."""
        bound = bind(log, event_id=source.event_id, endpoint_id=endpoint.id, tier=tier.name)
        in_flight = self.metrics.in_flight(tier.name)
        try:
            in_flight.inc()
            try:
                attempt = await self.sender.send(endpoint, source.event_id, body, tier.name, log=bound,
                                                 last=tier == self.tiers[-1])
            finally:
                in_flight.dec()
            if isinstance(attempt, Deferral):
                await self._defer(job, tier, source, endpoint, body, attempt, bound)
                return
            decision = decide(self.tiers, tier, source, endpoint, attempt, body)
            await self._apply(job, source, decision, bound)
        except SenderClosed:
            raise
        except Exception as exc:
            bound.exception("attempt failed inside the gateway; dead-lettering the delivery")
            failed = Attempt.unsent(self.clock.now_ms(), tier.name, Outcome.INTERNAL_ERROR, f"internal error: {exc!r}")
            decision = decide(self.tiers, tier, source, endpoint, failed, body)
            assert decision.delivery is not None
            await asyncio.gather(
                self._dead_letter(job, decision.delivery, DeadLetterReason.INTERNAL_ERROR,
                                  bounded(f"internal error while attempting: {exc!r}") or "", bound),
                self._history(source, endpoint, failed, Next.dead(DeadLetterReason.INTERNAL_ERROR)),
            )

    async def _apply(self, job: Job, source: Event | Delivery, decision: Decision, log: Log) -> None:
        """Carry out ``decision``: metrics, the history, the next record, disabling, logs."""
        tier, attempt, step = decision.tier, decision.attempt, decision.step
        self.metrics.attempt(tier.name, attempt)
        if isinstance(step, Delivered):
            now = self.clock.now_ms() / 1000
            self.metrics.last_success.set(now)
            event_type = source.type.value if isinstance(source, Event) else source.event_type
            self.metrics.end_to_end(event_type).observe(max(0.0, now - source.occurred_at / 1000))
            await self._history(source, decision.endpoint, attempt, Next.delivered())
            return
        delivery = decision.delivery
        assert delivery is not None
        if isinstance(step, Retry):
            value = self.codec.encode(DELIVERY_SCHEMA, delivery.to_record(), topic=step.tier.topic)
            await asyncio.gather(
                self.producer.send(step.tier.topic, delivery.endpoint_id.encode(), value,
                                   delivery_headers(delivery, source=_source(job))),
                self._history(source, decision.endpoint, attempt, Next.retry(step.tier.name)),
            )
            self.metrics.retries_scheduled.labels(step.tier.name).inc()
            log.info("delivery failed, retry scheduled",
                     extra={"outcome": attempt.describe(), "next_tier": step.tier.name})
            return
        assert isinstance(step, GiveUp)
        if decision.disable_endpoint:
            await self._disable(decision.endpoint, log)
        await asyncio.gather(
            self._dead_letter(job, delivery, step.reason, step.detail, log),
            self._history(source, decision.endpoint, attempt, Next.dead(step.reason)),
        )

    def _expired(self, delivery: Delivery) -> int | None:
        """How long (ms) ``delivery`` has been deferred, when that is past the age limit
        (GATEWAY_DEFER_MAX_AGE); None when it is not."""
        if delivery.deferred_since is None:
            return None
        age = self.clock.now_ms() - delivery.deferred_since
        return age if age > self.config.defer_max_age * 1000 else None

    async def _expire(self, job: Job, delivery: Delivery, endpoint: Endpoint, tier: Tier, log: Log,
                      last: str | None = None) -> None:
        """Dead-letter a delivery deferred past the age limit (as ``deferral_expired``), with
        no request made, and its line in the history."""
        age = self._expired(delivery) or 0
        entry = Attempt.unsent(self.clock.now_ms(), tier.name, Outcome.DEFERRED,
                               f"deferred {delivery.deferrals} times over {age / 1000:.0f} s")
        detail = (f"deferred {delivery.deferrals} times over {age / 1000:.0f} s, longer than "
                  f"GATEWAY_DEFER_MAX_AGE ({self.config.defer_max_age} s)" + (f"; last: {last}" if last else ""))
        await asyncio.gather(
            self._dead_letter(job, delivery, DeadLetterReason.DEFERRAL_EXPIRED, detail, log),
            self._history(delivery, endpoint, entry, Next.dead(DeadLetterReason.DEFERRAL_EXPIRED)),
        )

    async def _defer(self, job: Job, tier: Tier, source: Event | Delivery, endpoint: Endpoint, body: bytes,
                     deferral: Deferral, log: Log) -> None:
        """The gateway's own limits put the delivery off: onto a deferral rung, its attempt
        count unchanged, a line in its log; or, deferred longer than the age limit, into
        the dead-letter topic."""
        now = self.clock.now_ms()
        delivery = source if isinstance(source, Delivery) else first_delivery(source, endpoint, body)
        entry = Attempt(at=now, tier=tier.name, duration_ms=0.0, outcome=Outcome.DEFERRED,
                        error=f"deferred ({deferral.reason.value}): {deferral.detail}")
        wait = max(MIN_DEFERRAL, deferral.after if deferral.after is not None else MIN_DEFERRAL)
        deferred = delivery.deferred(entry, due_at=now)
        assert deferred.deferred_since is not None
        if self._expired(deferred) is not None:
            await self._expire(job, deferred, endpoint, tier, log, last=deferral.detail)
            return
        # Back when the endpoint can take it, but no later than the age limit (it is then
        # dead-lettered on time, not late).
        left = (deferred.deferred_since + self.config.defer_max_age * 1000 - now) / 1000
        wait = min(wait, max(left, 0.0))
        rungs = self.topics.deferral_tiers
        rung = rungs[deferral_rung(wait, [r.delay for r in rungs])]
        self.metrics.deferral(deferral.reason.value, rung.name).inc()  # (one past the age limit is a dead letter)
        deferred = replace(deferred, due_at=now + math.ceil(wait * 1000))
        value = self.codec.encode(DELIVERY_SCHEMA, deferred.to_record(), topic=rung.topic)
        await asyncio.gather(
            self.producer.send(rung.topic, deferred.endpoint_id.encode(), value,
                               delivery_headers(deferred, source=_source(job))),
            self._history(source, endpoint, entry, Next.deferred(rung.name)),
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("delivery deferred", extra={"reason": deferral.reason.value, "rung": rung.name,
                                                  "deferrals": deferred.deferrals})

    async def _history(self, source: Event | Delivery, endpoint: Endpoint, attempt: Attempt, next: Next) -> None:
        """The attempt's line in the delivery history (the attempts topic), unless the
        history is switched off (GATEWAY_RECORD_ATTEMPTS=false)."""
        if not self.config.record_attempts:
            return
        if isinstance(source, Event):
            line = DeliveryAttempt(source.event_id, source.type.value, source.bot_id, endpoint.id,
                                   source.occurred_at, 1, attempt, next)
        else:
            line = DeliveryAttempt(source.event_id, source.event_type, source.bot_id, endpoint.id,
                                   source.occurred_at, source.attempt + 1, attempt, next, source.replay_of)
        topic = self.topics.attempts
        waiting = self.metrics.history_waiting
        waiting.inc()
        try:
            value = self.codec.encode(DELIVERY_ATTEMPT_SCHEMA, line.to_record(), topic=topic)
            await self.producer.send(topic, endpoint.id.encode(), value, [])
        except Exception:  # (not a cancellation: a revoke or a shutdown is no failure)
            self.metrics.history_written("failed").inc()
            raise
        finally:
            waiting.dec()
        self.metrics.history_written("written").inc()

    async def _disable(self, endpoint: Endpoint, log: Log) -> None:
        """A 410 Gone says the receiver is gone for good: stop sending to it."""
        current = self.endpoints.get(endpoint.id)
        if current is None or not current.enabled:
            return  # removed meanwhile: writing it back would resurrect it
        disabled = replace(current, enabled=False, updated_at=self.clock.now_ms())
        topic = self.topics.endpoints
        await self.producer.send(
            topic, endpoint.id.encode(), self.codec.encode(ENDPOINT_SCHEMA, disabled.to_record(), topic=topic), []
        )
        log.warning("endpoint disabled: it answered 410 Gone")

    async def _dead_letter(
        self, job: Job, delivery: Delivery, reason: DeadLetterReason, detail: str, log: Log
    ) -> None:
        """``log`` carries the delivery's event and endpoint ids."""
        topic, partition, offset = _source(job)
        dead = DeadLetter(
            reason=reason, detail=detail, dead_at=self.clock.now_ms(), source_topic=topic,
            source_partition=partition, source_offset=offset, delivery=delivery,
        )
        await self._write_dead_letter(dead, delivery.endpoint_id.encode())
        log.warning("delivery dead-lettered", extra={"reason": reason.value, "detail": detail})

    async def _dead_letter_record(self, job: Job, reason: DeadLetterReason, detail: str) -> None:
        topic, partition, offset = _source(job)
        message = job.message
        value = message.value()
        if value is not None and len(value) > _KEPT_BYTES:
            # The dead letter must fit in a Kafka record itself.
            detail += f" (original value cut to its first {_KEPT_BYTES} of {len(value)} bytes)"
            value = value[:_KEPT_BYTES]
        dead = DeadLetter(
            reason=reason, detail=detail, dead_at=self.clock.now_ms(), source_topic=topic,
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
        self.metrics.dead_letters.labels(dead.reason.value).inc()


def _source(job: Job) -> tuple[str, int, int]:
    message = job.message
    return message.topic(), message.partition(), message.offset()
