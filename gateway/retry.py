"""The retry schedule: after an attempt, what happens next. Pure decisions, no I/O.

An attempt on the events topic (tier 0) or a retry tier either delivered the event
(2xx), or failed. A failure moves the delivery to the next tier, due ``delay`` seconds
after the failure ended; after the last tier it is dead-lettered as
``retries_exhausted``. Failures that no retry can mend (a refused destination, 410 Gone)
are dead-lettered at once. A 429 or 503 with ``Retry-After`` longer than the next tier's
delay skips ahead to the first tier that waits at least that long: never earlier than
the receiver asked (up to the longest tier delay), never earlier than the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import Attempt, DeadLetterReason
from .topics import Tier

__all__ = ["Delivered", "Retry", "GiveUp", "Step", "next_step", "is_due"]


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
    if attempt.outcome == "blocked":
        return GiveUp(DeadLetterReason.BLOCKED_DESTINATION, attempt.error)
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
    failed_at = attempt.at + int(attempt.duration_ms)
    return Retry(tier, failed_at + tier.delay * 1000)


def is_due(due_at: int, now_ms: int) -> bool:
    return now_ms >= due_at
