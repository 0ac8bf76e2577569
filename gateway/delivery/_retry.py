"""The retry schedule: after an attempt, what happens next. Pure decisions, no I/O.

An attempt on the events topic (tier 0) or a retry tier either delivered the event
(2xx), or failed. A failure moves the delivery to the next tier, due ``delay`` seconds
after the failure ended; after the last tier it is dead-lettered as
``retries_exhausted``. Failures that no retry can mend (a refused destination, an
unusable endpoint record, 410 Gone) are dead-lettered at once. A 429 or 503 with
``Retry-After`` longer than the next tier's delay skips ahead to the first tier that
waits at least that long: never earlier than the receiver asked (up to the longest tier
delay), never earlier than the schedule.

:func:`decide` turns one attempt into a :class:`Decision`: everything that must follow
it, as a value, before any of it is carried out (the dispatcher applies it: Kafka writes,
disabling the endpoint, metrics, logs).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..events import Event
from ..records import Attempt, DeadLetterReason, Delivery, Endpoint, Outcome
from ..store import Tier

__all__ = [
    "Decision",
    "Delivered",
    "GiveUp",
    "Retry",
    "Step",
    "decide",
    "first_delivery",
    "is_due",
    "next_step",
]


@dataclass(frozen=True)
class Delivered:
    pass


@dataclass(frozen=True)
class Retry:
    tier: Tier
    due_at: int
    """ms since the epoch; never earlier than the failure's end plus the tier's delay."""


@dataclass(frozen=True)
class GiveUp:
    reason: DeadLetterReason
    detail: str


Step = Delivered | Retry | GiveUp


def next_step(tiers: tuple[Tier, ...], current: Tier, attempt: Attempt) -> Step:
    """Decide what follows ``attempt``, made from tier ``current`` of ``tiers``."""
    if attempt.succeeded:
        return Delivered()
    if attempt.outcome is Outcome.BLOCKED:
        return GiveUp(DeadLetterReason.BLOCKED_DESTINATION, attempt.describe())
    if attempt.outcome is Outcome.INVALID_ENDPOINT or attempt.outcome is Outcome.INTERNAL_ERROR:
        return GiveUp(DeadLetterReason.INTERNAL_ERROR, attempt.describe())
    if attempt.status == 410:
        return GiveUp(DeadLetterReason.GONE, "the endpoint answered 410 Gone")
    following = current.index + 1
    if following >= len(tiers):
        retries = len(tiers) - 1
        return GiveUp(
            DeadLetterReason.RETRIES_EXHAUSTED,
            f"{retries} retries exhausted; last attempt: {attempt.describe()}",
        )
    tier = tiers[following]
    if attempt.retry_after is not None and attempt.retry_after > tier.delay:
        # The receiver asked us to wait longer than this tier would: go on to the first
        # tier that waits at least that long (the attempts skipped are ones the receiver
        # asked us not to make), or the last tier. Never hold a record in a tier past its
        # own delay: its partition's head would block every record behind it.
        for tier in tiers[following:]:
            if tier.delay >= attempt.retry_after:
                break
    return Retry(tier, attempt.ended_at + tier.delay * 1000)


def is_due(due_at: int, now_ms: int) -> bool:
    return now_ms >= due_at


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything that follows one attempt."""

    tier: Tier
    """The tier that made the attempt."""
    endpoint: Endpoint
    attempt: Attempt
    step: Step
    delivery: Delivery | None
    """What travels on: to the next tier (with the attempt logged and its due time), or
    into the dead letter. None when delivered."""
    disable_endpoint: bool = False
    """The receiver said it is gone for good (410): stop sending to it."""


def decide(
    tiers: tuple[Tier, ...],
    tier: Tier,
    source: Event | Delivery,
    endpoint: Endpoint,
    attempt: Attempt,
    body: bytes,
) -> Decision:
    """What follows ``attempt`` at ``endpoint`` of ``source`` (an event's first attempt,
    or a delivery's next), made from ``tier``."""
    step = next_step(tiers, tier, attempt)
    if isinstance(step, Delivered):
        return Decision(tier, endpoint, attempt, step, None)
    # Only now, on the failure path, the delivery record that travels on.
    delivery = source if isinstance(source, Delivery) else first_delivery(source, endpoint, body)
    due_at = step.due_at if isinstance(step, Retry) else delivery.due_at
    disable = isinstance(step, GiveUp) and step.reason is DeadLetterReason.GONE
    return Decision(tier, endpoint, attempt, step, delivery.after(attempt, due_at=due_at), disable)


def first_delivery(event: Event, endpoint: Endpoint, body: bytes) -> Delivery:
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
        due_at=event.occurred_at,
    )
