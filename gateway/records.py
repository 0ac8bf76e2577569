"""The gateway's own records: endpoint registrations, deliveries with their attempt log,
and dead letters. Each maps one-to-one onto its ``.avsc`` schema in ``avro/``.

Times are integers of milliseconds since the Unix epoch, as in the schemas.

How an attempt ended is an :class:`Outcome`, set once by whoever made the attempt (the
sender) and stored with it; nothing parses it back out of error text. Records written
before the outcome was stored read with it derived once, at decoding, from their status
and error text (:meth:`Outcome.of_legacy`).

Every text a receiver controls (response snippets, redirect targets, protocol errors) is
cut to a bound before it is stored: it travels in every retry record, its headers, the
dead letter and a log line.

The vocabulary every part shares is here too, as values, never as free strings: how an
attempt ended (:class:`Outcome`), what followed it (:class:`Next`), why a dead letter
died (:class:`DeadLetterReason`), why a delivery was put off (:class:`DeferReason`) and
the state of an endpoint's circuit (:class:`CircuitState`). Records store them as the
strings of their schemas; reading a value a newer gateway wrote gives ``UNKNOWN`` (or the
text kept as it is), never an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "CIRCUIT_SCHEMA",
    "DEAD_LETTER_SCHEMA",
    "DELIVERY_ATTEMPT_SCHEMA",
    "DELIVERY_SCHEMA",
    "ENDPOINT_SCHEMA",
    "MAX_STORED_TEXT",
    "Attempt",
    "Circuit",
    "CircuitState",
    "DeadLetter",
    "DeadLetterReason",
    "DeferReason",
    "Delivery",
    "DeliveryAttempt",
    "Endpoint",
    "Next",
    "NextKind",
    "Outcome",
    "bounded",
    "is_deferral",
    "status_class",
]

MAX_STORED_TEXT = 512
"""Characters kept of any receiver-controlled text (snippet, error, redirect target)."""


def bounded(text: str | None, limit: int = MAX_STORED_TEXT) -> str | None:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters cut)"


class Outcome(StrEnum):
    """How one attempt ended. Only the first four reached the receiver's network."""

    SUCCESS = "success"
    """A 2xx answer within the deadline."""
    HTTP_ERROR = "http_error"
    """Any other status, redirects included."""
    TIMEOUT = "timeout"
    """The deadline (connect to last byte) passed."""
    CONNECTION_ERROR = "connection_error"
    """No usable answer: refused, reset, unresolvable, not HTTP."""
    BLOCKED = "blocked"
    """The destination is not allowed (SSRF guard); no request was made."""
    INVALID_ENDPOINT = "invalid_endpoint"
    """The endpoint's URL is unusable; no request was made."""
    INTERNAL_ERROR = "internal_error"
    """The gateway itself failed (a bug, an unusable secret); no request was made."""
    CIRCUIT_OPEN = "circuit_open"
    """The endpoint's circuit breaker is open: the attempt is spent on the schedule, no
    request is made."""
    DEFERRED = "deferred"
    """Not an attempt: the gateway's own limits (the endpoint's connections busy, its share
    of the process full, its rate limit) put the delivery off. Logged, never counted."""
    UNKNOWN = "unknown"
    """Written by a newer gateway with an outcome this one does not know."""

    @property
    def reached_network(self) -> bool:
        """Whether a request was made (so the attempt has a duration worth measuring)."""
        return self in _NETWORK

    @classmethod
    def of_legacy(cls, status: int | None, error: str | None) -> Outcome:
        """The outcome of an attempt stored before outcomes were: read from its status and
        the prefixes its error text then began with."""
        if status is not None:
            return cls.SUCCESS if 200 <= status < 300 and error is None else cls.HTTP_ERROR
        text = error or ""
        if text.startswith("blocked destination"):
            return cls.BLOCKED
        if text.startswith("invalid endpoint URL"):
            return cls.INVALID_ENDPOINT
        if text.startswith("timeout"):
            return cls.TIMEOUT
        return cls.CONNECTION_ERROR


_NETWORK = frozenset({Outcome.SUCCESS, Outcome.HTTP_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR})


def is_deferral(attempt: Attempt) -> bool:
    """A log entry that is not an attempt: a run of deferrals."""
    return attempt.outcome is Outcome.DEFERRED


def status_class(status: int | None) -> str:
    """``2xx`` … ``5xx`` (and ``1xx``), ``none`` without a status, ``other`` for a status
    outside 100-599 (``099``, ``999``): a bounded set of label values."""
    if status is None:
        return "none"
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "other"


ENDPOINT_SCHEMA = "gateway.Endpoint"
DELIVERY_SCHEMA = "gateway.Delivery"
DEAD_LETTER_SCHEMA = "gateway.DeadLetter"
DELIVERY_ATTEMPT_SCHEMA = "gateway.DeliveryAttempt"
CIRCUIT_SCHEMA = "gateway.Circuit"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A registered webhook endpoint of one bot."""

    id: str
    bot_id: str
    url: str
    secret: str
    """``whsec_<base64>``; never logged, never in metrics or dead letters."""
    created_at: int
    updated_at: int
    event_types: tuple[str, ...] = ()
    """Event types delivered; empty means all."""
    enabled: bool = True
    description: str | None = None
    previous_secret: str | None = None
    previous_secret_expires_at: int | None = None
    rate_limit: float | None = None
    """Most requests per second, per gateway process; None: no limit."""
    max_in_flight: int | None = None
    """Most requests in flight, per gateway process; None: the process's default."""

    def admits(self, event_type: str) -> bool:
        """Does this endpoint want events of ``event_type``?"""
        return self.enabled and (not self.event_types or event_type in self.event_types)

    def secrets_at(self, now_ms: int) -> tuple[str, ...]:
        """Secrets to sign with: the current one, and the previous one during its grace."""
        if self.previous_secret and (
            self.previous_secret_expires_at is None or now_ms < self.previous_secret_expires_at
        ):
            return (self.secret, self.previous_secret)
        return (self.secret,)

    def __repr__(self) -> str:  # keeps the secrets out of logs and tracebacks
        return (
            f"Endpoint(id={self.id!r}, bot_id={self.bot_id!r}, url={self.url!r}, "
            f"event_types={self.event_types!r}, enabled={self.enabled!r})"
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "botId": self.bot_id,
            "url": self.url,
            "secret": self.secret,
            "previousSecret": self.previous_secret,
            "previousSecretExpiresAt": self.previous_secret_expires_at,
            "eventTypes": list(self.event_types),
            "enabled": self.enabled,
            "description": self.description,
            "rateLimit": self.rate_limit,
            "maxInFlight": self.max_in_flight,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Endpoint:
        return cls(
            id=r["id"],
            bot_id=r["botId"],
            url=r["url"],
            secret=r["secret"],
            previous_secret=r.get("previousSecret"),
            previous_secret_expires_at=r.get("previousSecretExpiresAt"),
            event_types=tuple(r.get("eventTypes") or ()),
            enabled=r.get("enabled", True),
            description=r.get("description"),
            rate_limit=r.get("rateLimit"),
            max_in_flight=r.get("maxInFlight"),
            created_at=r["createdAt"],
            updated_at=r["updatedAt"],
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt and how it ended."""

    at: int
    tier: str
    duration_ms: float
    outcome: Outcome
    status: int | None = None
    error: str | None = None
    response_snippet: str | None = None
    retry_after: float | None = field(default=None, compare=False)
    """Seconds a 429/503 answer's Retry-After asked for; steers the next tier, not stored."""

    @classmethod
    def unsent(cls, at: int, tier: str, outcome: Outcome, error: str) -> Attempt:
        """An attempt that made no request (``outcome`` says why), its text bounded."""
        return cls(at=at, tier=tier, duration_ms=0.0, outcome=outcome, error=bounded(error))

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.SUCCESS

    @property
    def ended_at(self) -> int:
        """A time in ms no earlier than the attempt's real end. ``at`` is the start cut
        down to the millisecond (up to 1 ms early) and the duration is rounded to the
        microsecond, so the end is taken one millisecond later and rounded up: a retry due
        ``delay`` after it is never early (measured once: 2 ms early without this)."""
        return -(-(self.at * 1000 + int(self.duration_ms * 1000) + 1001) // 1000)

    def describe(self) -> str:
        """``HTTP 503``, ``timeout after 15.0 s``, …: the outcome in a few words."""
        if self.error:
            return self.error if self.status is None else f"HTTP {self.status}: {self.error}"
        return f"HTTP {self.status}"

    def to_record(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "tier": self.tier,
            "durationMs": self.duration_ms,
            "outcome": self.outcome.value,
            "status": self.status,
            "error": self.error,
            "responseSnippet": self.response_snippet,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Attempt:
        status, error = r.get("status"), r.get("error")
        stored = r.get("outcome")
        return cls(
            at=r["at"],
            tier=r["tier"],
            duration_ms=r["durationMs"],
            outcome=Outcome.of_legacy(status, error) if stored is None else Outcome(stored),
            status=status,
            error=error,
            response_snippet=r.get("responseSnippet"),
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way to one endpoint, as carried by the retry tiers."""

    event_id: str
    event_type: str
    bot_id: str
    session_id: str
    occurred_at: int
    payload: str
    """The JSON document, exactly as POSTed on every attempt."""
    endpoint_id: str
    attempt: int
    """Attempts made in the current schedule (a replay resets it to 0)."""
    due_at: int
    attempts: tuple[Attempt, ...] = field(default=())
    """Every attempt ever made, oldest first (and the runs of deferrals between them)."""
    replay_of: str | None = None
    deferrals: int = 0
    """Times deferred for the gateway's own limits since the last attempt."""
    deferred_since: int | None = None
    """When the current run of deferrals began (ms), None when not deferred."""

    def after(self, attempt: Attempt, *, due_at: int) -> Delivery:
        """This delivery with one more attempt logged and the next one due at ``due_at``
        (a deferral run, if any, ended with it)."""
        return replace(
            self, attempt=self.attempt + 1, due_at=due_at, attempts=(*self.attempts, attempt),
            deferrals=0, deferred_since=None,
        )

    def deferred(self, deferral: Attempt, *, due_at: int) -> Delivery:
        """This delivery put off once more, attempt count unchanged. A run of deferrals
        keeps one entry in the log (the latest, its text counting them), so a delivery
        deferred a thousand times carries one line for it, not a thousand."""
        log = self.attempts
        if log and log[-1].outcome is Outcome.DEFERRED:
            log = log[:-1]
        count = self.deferrals + 1
        since = self.deferred_since if self.deferred_since is not None else deferral.at
        began = datetime.fromtimestamp(since / 1000, UTC).isoformat(timespec="seconds")
        entry = replace(deferral, error=f"{deferral.error} (deferred {count} time{'s' if count != 1 else ''} "
                                        f"since {began})")
        return replace(self, due_at=due_at, attempts=(*log, entry), deferrals=count, deferred_since=since)

    @property
    def last_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def to_record(self) -> dict[str, Any]:
        return {
            "eventId": self.event_id,
            "eventType": self.event_type,
            "botId": self.bot_id,
            "sessionId": self.session_id,
            "occurredAt": self.occurred_at,
            "payload": self.payload,
            "endpointId": self.endpoint_id,
            "attempt": self.attempt,
            "dueAt": self.due_at,
            "attempts": [a.to_record() for a in self.attempts],
            "replayOf": self.replay_of,
            "deferrals": self.deferrals,
            "deferredSince": self.deferred_since,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Delivery:
        return cls(
            event_id=r["eventId"],
            event_type=r["eventType"],
            bot_id=r["botId"],
            session_id=r["sessionId"],
            occurred_at=r["occurredAt"],
            payload=r["payload"],
            endpoint_id=r["endpointId"],
            attempt=r["attempt"],
            due_at=r["dueAt"],
            attempts=tuple(Attempt.from_record(a) for a in r.get("attempts") or ()),
            replay_of=r.get("replayOf"),
            deferrals=r.get("deferrals") or 0,
            deferred_since=r.get("deferredSince"),
        )


class DeadLetterReason(StrEnum):
    RETRIES_EXHAUSTED = "retries_exhausted"
    UNDECODABLE = "undecodable"
    INVALID = "invalid"
    ENDPOINT_REMOVED = "endpoint_removed"
    ENDPOINT_DISABLED = "endpoint_disabled"
    BLOCKED_DESTINATION = "blocked_destination"
    GONE = "gone"
    INTERNAL_ERROR = "internal_error"
    """The gateway itself failed on the record (a bug, or an unusable endpoint record)."""
    DEFERRAL_EXPIRED = "deferral_expired"
    """Put off for the gateway's own limits longer than GATEWAY_DEFER_MAX_AGE."""
    UNKNOWN = "unknown"
    """Written by a newer gateway with a reason this one does not know."""

    @classmethod
    def read(cls, text: str) -> DeadLetterReason:
        """The reason a record holds; UNKNOWN for one this gateway does not know."""
        try:
            return cls(text)
        except ValueError:
            return cls.UNKNOWN


class DeferReason(StrEnum):
    """Why a delivery was put off without spending an attempt (a bounded label of
    ``gateway_deferred_total``)."""

    BUSY = "connections_busy"
    """Every connection of the endpoint stayed busy for the longest local wait."""
    SHARE = "share_full"
    """The endpoint's share of the process (in flight plus waiting) is full."""
    RATE = "rate_limit"
    """Its rate limit would not allow a request within the longest local wait."""
    DNS = "dns_queue"
    """Its name's lookup waited behind its domain's others (the per-domain cap on lookups)
    for longer than a delivery may wait: a local wait, not an attempt."""
    PROBE = "circuit_probe"
    """A delivery's last attempt, refused by an open circuit, waits for the next probe
    (the last attempt always makes a request)."""


class CircuitState(StrEnum):
    """The state of an endpoint's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    """Deliveries spend their attempts without a request until the next probe."""
    HALF_OPEN = "half_open"
    """One delivery goes as the probe; its answer closes or opens the circuit again."""
    UNKNOWN = "unknown"
    """Written by a newer gateway with a state this one does not know."""

    @classmethod
    def read(cls, text: str) -> CircuitState:
        try:
            return cls(text)
        except ValueError:
            return cls.UNKNOWN


class NextKind(StrEnum):
    """What followed an attempt, in the delivery history."""

    DELIVERED = "delivered"
    RETRY = "retry"
    """Sent on to a retry tier (the step names it)."""
    DEAD = "dead"
    """Dead-lettered (the step names the reason)."""
    DEFERRED = "deferred"
    """Put off onto a deferral rung (the step names it); not an attempt."""
    TEST = "test"
    """A test send: nothing follows."""
    UNKNOWN = "unknown"
    """Written by a newer gateway with a step this one does not know."""


@dataclass(frozen=True, slots=True)
class Next:
    """What followed an attempt: its kind and, for a retry, a dead letter or a deferral,
    where it went (the tier, the reason, the rung). Stored as ``delivered``,
    ``retry:<tier>``, ``dead:<reason>``, ``deferred:<rung>`` or ``test``."""

    kind: NextKind
    to: str | None = None

    @classmethod
    def delivered(cls) -> Next:
        return cls(NextKind.DELIVERED)

    @classmethod
    def retry(cls, tier: str) -> Next:
        return cls(NextKind.RETRY, tier)

    @classmethod
    def dead(cls, reason: DeadLetterReason) -> Next:
        return cls(NextKind.DEAD, reason.value)

    @classmethod
    def deferred(cls, rung: str) -> Next:
        return cls(NextKind.DEFERRED, rung)

    @classmethod
    def read(cls, text: str) -> Next:
        """The step a history record holds (UNKNOWN kind, text kept, for one this gateway
        does not know)."""
        name, _, to = text.partition(":")
        try:
            kind = NextKind(name)
        except ValueError:
            return cls(NextKind.UNKNOWN, text)
        return cls(kind, to or None)

    def __str__(self) -> str:
        if self.kind is NextKind.UNKNOWN:
            return self.to or NextKind.UNKNOWN.value
        return self.kind.value if self.to is None else f"{self.kind.value}:{self.to}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the gateway gave up on, with why and where it came from."""

    reason: DeadLetterReason
    detail: str
    dead_at: int
    source_topic: str
    source_partition: int
    source_offset: int
    original_key: bytes | None = None
    original_value: bytes | None = None
    delivery: Delivery | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "detail": self.detail,
            "deadAt": self.dead_at,
            "sourceTopic": self.source_topic,
            "sourcePartition": self.source_partition,
            "sourceOffset": self.source_offset,
            "originalKey": self.original_key,
            "originalValue": self.original_value,
            "delivery": self.delivery.to_record() if self.delivery else None,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> DeadLetter:
        delivery = r.get("delivery")
        return cls(
            reason=DeadLetterReason.read(r["reason"]),
            detail=r["detail"],
            dead_at=r["deadAt"],
            source_topic=r["sourceTopic"],
            source_partition=r["sourcePartition"],
            source_offset=r["sourceOffset"],
            original_key=r.get("originalKey"),
            original_value=r.get("originalValue"),
            delivery=Delivery.from_record(delivery) if delivery else None,
        )


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One line of the delivery history (the attempts topic): an attempt, or a deferral,
    of one event to one endpoint, and what followed it."""

    event_id: str
    event_type: str
    bot_id: str
    endpoint_id: str
    occurred_at: int
    number: int
    """1 for the first attempt, 2 for the first retry, …"""
    attempt: Attempt
    next: Next
    replay_of: str | None = None

    def to_record(self) -> dict[str, Any]:
        a = self.attempt
        return {
            "eventId": self.event_id, "eventType": self.event_type, "botId": self.bot_id,
            "endpointId": self.endpoint_id, "occurredAt": self.occurred_at, "number": self.number,
            "tier": a.tier, "at": a.at, "durationMs": a.duration_ms, "outcome": a.outcome.value,
            "status": a.status, "error": a.error, "responseSnippet": a.response_snippet,
            "next": str(self.next), "replayOf": self.replay_of,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> DeliveryAttempt:
        try:
            outcome = Outcome(r["outcome"])
        except ValueError:
            outcome = Outcome.UNKNOWN
        attempt = Attempt(at=r["at"], tier=r["tier"], duration_ms=r["durationMs"], outcome=outcome,
                          status=r.get("status"), error=r.get("error"), response_snippet=r.get("responseSnippet"))
        return cls(event_id=r["eventId"], event_type=r["eventType"], bot_id=r["botId"],
                   endpoint_id=r["endpointId"], occurred_at=r["occurredAt"], number=r["number"],
                   attempt=attempt, next=Next.read(r["next"]), replay_of=r.get("replayOf"))


@dataclass(frozen=True, slots=True)
class Circuit:
    """The last change of an endpoint's circuit breaker, as one process reported it."""

    endpoint_id: str
    state: CircuitState
    failures: int
    changed_at: int
    probe_at: int | None
    worker: str

    def to_record(self) -> dict[str, Any]:
        return {"endpointId": self.endpoint_id, "state": self.state.value, "failures": self.failures,
                "changedAt": self.changed_at, "probeAt": self.probe_at, "worker": self.worker}

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Circuit:
        return cls(endpoint_id=r["endpointId"], state=CircuitState.read(r["state"]), failures=r["failures"],
                   changed_at=r["changedAt"], probe_at=r.get("probeAt"), worker=r["worker"])
