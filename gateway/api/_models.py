"""The management API's request and response bodies, as pydantic models.

They are the API's contract: FastAPI validates requests against them (a wrong type gets
a 422 naming the field) and builds the OpenAPI document from them. Field names are
camelCase on the wire, as in ``endpoint_json`` and the dead-letter tools' JSON. Times are
ISO 8601 strings in UTC (``2026-11-29T21:16:11.990Z``) everywhere. Outcomes, states,
circuit states, scopes and reasons are enumerations in the document.

Request models only check shapes (types, lengths, required fields, unknown fields
refused, numbers finite); what a value must be (a UUID bot id, a reachable URL, a known
event type, a signing secret) is judged by the same library functions the CLI calls, so
the two faces cannot differ.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema
from pydantic.alias_generators import to_camel

from ..events import EventType
from ..ops import MAX_DESCRIPTION_LENGTH, MAX_GRACE_SECONDS, MAX_URL_LENGTH, ProbeKind, Scope, Verdict
from ..records import CircuitState, DeadLetterReason, Outcome
from ._auth import DEFAULT_MINTED_TTL, MAX_MINTED_TTL
from ._errors import PROBLEMS
from ._jobs import JobState

__all__ = [
    "AttemptLogOut",
    "CircuitOut",
    "DeadLetterList",
    "DeadLetterOut",
    "DeadLetterStats",
    "DeadLetterSummary",
    "DeliveryList",
    "DeliveryOut",
    "EndpointCreate",
    "EndpointCreated",
    "EndpointList",
    "EndpointOut",
    "EndpointPatch",
    "EndpointStatsOut",
    "EventTypeList",
    "EventTypeOut",
    "FailureOut",
    "Health",
    "ProbeOut",
    "ProbeReportOut",
    "Problem",
    "ProblemField",
    "Readiness",
    "ReadinessCheck",
    "RefusalOut",
    "ReplayItemOut",
    "ReplayJobOut",
    "ReplayProgressOut",
    "ReplayRequest",
    "ReplayResultOut",
    "ResendOut",
    "RotateSecret",
    "TestRequest",
    "TokenOut",
    "TokenRequest",
    "WindowOut",
]

EVENT_TYPES: list[JsonValue] = [t.value for t in EventType]
UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
ENDPOINT = "a68e2fe3-5d0c-4a53-9d8e-0f6b1c2d3e4f"
EVENT = "a5219bb6-41d2-4ee7-82d8-a95986454de3"
WHEN = "2026-11-29T21:16:11.990Z"

Time = Annotated[str, Field(json_schema_extra={"format": "date-time"}, examples=[WHEN])]
"""A time: ISO 8601, UTC, milliseconds."""
REASONS: list[JsonValue] = [*(r.value for r in DeadLetterReason), "unreadable"]


class _Request(BaseModel):
    """Bodies: camelCase names only, unknown names refused (a typo is not ignored),
    numbers finite (``Infinity`` and ``NaN`` are refused, naming the field)."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


# --- errors --------------------------------------------------------------------------------


class ProblemField(_Response):
    field: str | None = Field(description="The input at fault, as the API names it (botId, events[0], since, "
                              "Idempotency-Key).", examples=["botId"])
    pointer: str | None = Field(default=None, description="A JSON pointer into the body (RFC 6901), for a body field.",
                                examples=["/botId"])
    where: str | None = Field(default=None, alias="in", description="body, query, path or header.",
                              examples=["body"])
    detail: str = Field(examples=["bot id 'x' is not a UUID"])


class Problem(_Response):
    """Every error answer (RFC 9457, ``application/problem+json``)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow",
                              json_schema_extra={"examples": [{
                                  "type": "urn:webhook-gateway:problem:invalid", "title": "Invalid input",
                                  "status": 422, "detail": "bot id 'x' is not a UUID", "instance": "/v1/endpoints",
                                  "code": "invalid", "errors": [{"field": "botId", "pointer": "/botId", "in": "body",
                                                                 "detail": "bot id 'x' is not a UUID"}]}]})

    type: str = Field(description="urn:webhook-gateway:problem:<code>: the kind of problem.")
    title: str = Field(description="The kind of problem, in words.")
    status: int = Field(description="The HTTP status.")
    detail: str = Field(description="What was wrong, with the value, and what to do.")
    instance: str | None = Field(default=None, description="The path asked for.")
    code: str = Field(description="The kind of problem, short.", json_schema_extra={"enum": list(PROBLEMS)})
    errors: list[ProblemField] = Field(default_factory=list, description="Every input at fault.")
    endpoint_id: str | None = Field(default=None, description="On a 504 of a create: the id the endpoint was "
                                    "saved under (its Location too); retry with the same Idempotency-Key.")
    retry_after: int | None = Field(default=None, description="On a 429: seconds to wait (Retry-After too).")


class Health(_Response):
    status: str = Field(description="ok", examples=["ok"])


class ReadinessCheck(_Response):
    ok: bool
    detail: str
    checked_at: Time


class Readiness(_Response):
    status: str = Field(description="ready, or not_ready (then the answer is 503).",
                        json_schema_extra={"enum": ["ready", "not_ready"]})
    checks: dict[str, ReadinessCheck] = Field(description="kafka (cached a few seconds), endpoints, deliveries, "
                                              "deadLetters.")


# --- tokens ----------------------------------------------------------------------------------


class TokenRequest(_Request):
    bot_id: str = Field(description="The bot the token is for.", max_length=64,
                        json_schema_extra={"pattern": UUID_PATTERN}, examples=[BOT])
    ttl_seconds: int = Field(default=DEFAULT_MINTED_TTL, ge=1, le=MAX_MINTED_TTL,
                             description="How long the token is valid, in seconds (15 minutes by default).")


class TokenOut(_Response):
    token: str = Field(description="The bearer token; shown this once.", examples=["gwb1.eyJib3QiOi….Zm9v"])
    scope: Scope
    bot_id: str = Field(examples=[BOT])
    expires_at: Time


# --- endpoints -------------------------------------------------------------------------------

_EVENTS: dict[str, JsonValue] = {"items": {"type": "string", "enum": EVENT_TYPES}}


class EndpointCreate(_Request):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", allow_inf_nan=False, json_schema_extra={
        "examples": [{"botId": BOT, "url": "https://example.com/hook", "events": ["TICKET", "MESSAGE"],
                      "description": "CRM"}]})

    bot_id: str = Field(description="UUID of the bot whose events the endpoint receives.", max_length=64,
                        json_schema_extra={"pattern": UUID_PATTERN}, examples=[BOT])
    url: str = Field(description="http(s) URL the events are POSTed to.", max_length=MAX_URL_LENGTH,
                     examples=["https://example.com/hook"])
    events: list[str] | None = Field(
        default=None, max_length=len(EventType) * 4, description="Event types to receive (any case); empty or "
        "absent: all.", json_schema_extra=_EVENTS)
    secret: str | None = Field(default=None, max_length=200,
                               description="Signing secret whsec_<base64>; generated when absent.")
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH, description="Free text.")
    rate_limit: float | None = Field(
        default=None, gt=0, le=1_000_000,
        description="Most requests per second to it, per gateway process; absent or null: no limit.")
    max_in_flight: int | None = Field(
        default=None, ge=1, le=1000,
        description="Most requests in flight to it, per gateway process; absent or null: the process's default.")


class EndpointPatch(_Request):
    """A JSON merge patch (RFC 7396): a member absent keeps the value, null clears it to
    its default, any other value replaces it."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", allow_inf_nan=False, json_schema_extra={
        "examples": [{"events": ["TICKET"], "description": None, "rateLimit": 50}]})

    url: Annotated[str | None, WithJsonSchema({"type": "string", "maxLength": MAX_URL_LENGTH})] = Field(
        default=None, description="New URL; absent keeps it (it cannot be null).", max_length=MAX_URL_LENGTH)
    events: list[str] | None = Field(
        default=None, max_length=len(EventType) * 4,
        description="New event types; [] or null: every type; absent keeps them.", json_schema_extra=_EVENTS)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH,
                                    description="New description; null removes it; absent keeps it.")
    rate_limit: float | None = Field(
        default=None, gt=0, le=1_000_000,
        description="Most requests per second, per gateway process; null removes the limit; absent keeps it.")
    max_in_flight: int | None = Field(
        default=None, ge=1, le=1000,
        description="Most requests in flight, per gateway process; null: the process's default; absent keeps it.")


class RotateSecret(_Request):
    secret: str | None = Field(default=None, max_length=200,
                               description="The new secret whsec_<base64>; generated when absent.")
    grace_seconds: float = Field(default=86400.0, ge=0, le=MAX_GRACE_SECONDS,
                                 description="How long the old secret keeps signing too (at most 30 days).")


class EndpointOut(_Response):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, json_schema_extra={"examples": [{
        "id": ENDPOINT, "botId": BOT, "url": "https://example.com/hook", "events": ["TICKET"], "enabled": True,
        "description": "CRM", "rateLimit": None, "maxInFlight": None, "secret": "whsec_********",
        "previousSecretExpiresAt": None, "createdAt": WHEN, "updatedAt": WHEN, "version": "4f1c0a9e2b7d6c5a3e8f0b1d"}]})

    id: str
    bot_id: str
    url: str
    events: list[str] = Field(description="Event types delivered; empty: all.")
    enabled: bool
    description: str | None
    rate_limit: float | None = Field(default=None, description="Requests per second per gateway process, or null.")
    max_in_flight: int | None = Field(default=None, description="Requests in flight per gateway process, or null.")
    secret: str = Field(description="Masked, except in the answer that created or rotated it.")
    previous_secret_expires_at: Time | None = Field(
        default=None, description="After a rotation: until when the previous secret still signs too; null when "
        "there is none or its grace is over.")
    created_at: Time
    updated_at: Time
    version: str = Field(description="The endpoint's version: its ETag, unquoted. Send it back quoted in If-Match "
                         "to change the endpoint.")


class EndpointCreated(EndpointOut):
    warning: str | None = Field(
        default=None, description="Why deliveries to this URL would be refused under the gateway's destination "
        "policy (registered anyway), or null.")


class EndpointList(_Response):
    data: list[EndpointOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last.")


class CircuitOut(_Response):
    state: CircuitState = Field(description="As the workers last reported it; closed when it never opened.")
    since: Time | None
    failures: int
    probe_at: Time | None
    worker: str | None


class WindowOut(_Response):
    window: str = Field(examples=["1h"])
    seconds: int
    attempts: int = Field(description="Attempts made (deferrals are not attempts).")
    succeeded: int
    failed: int
    deferred: int
    success_rate: float | None = Field(description="succeeded / attempts, 0 to 1; null without attempts.")
    complete: bool = Field(description="False when the API's history index no longer covers the whole window.")


class FailureOut(_Response):
    id: str = Field(description="The attempt, PARTITION:OFFSET in the attempts topic.")
    at: Time
    event_id: str
    event_type: str
    outcome: Outcome
    status: int | None
    error: str | None


class EndpointStatsOut(_Response):
    endpoint_id: str
    circuit: CircuitOut
    windows: list[WindowOut] = Field(description="The last hour and the last 24 hours.")
    last_attempt_at: Time | None
    last_success_at: Time | None
    last_failure: FailureOut | None
    complete_since: Time | None


class TestRequest(_Request):
    events: list[str] | None = Field(
        default=None, max_length=len(EventType) * 4,
        description="Event types whose example to send; empty or absent: every type.", json_schema_extra=_EVENTS)
    malformed: bool = Field(default=False, description="Also send a request with a bad signature and one with a "
                            "stale timestamp, which the receiver should refuse.")


class ProbeOut(_Response):
    kind: ProbeKind
    event_type: str
    event_id: str = Field(description="The webhook-id sent.")
    ok: bool = Field(description="An example answered 2xx; a malformed request refused with a non-2xx status.")
    verdict: Verdict
    outcome: Outcome
    status: int | None
    duration_ms: float
    error: str | None
    response: str | None = Field(description="The start of the response body.")


class ProbeReportOut(_Response):
    endpoint_id: str
    url: str
    ok: bool
    results: list[ProbeOut]


class EventTypeOut(_Response):
    type: EventType
    description: str
    json_schema: dict[str, JsonValue] = Field(alias="schema", description="The JSON schema of the body.")
    example: dict[str, JsonValue] = Field(description="The example body, field for field.")
    documented: bool = Field(description="Whether the example is the platform documentation's own (CREATE_LEAD's "
                             "is the gateway's: the documentation gives its fields, no example).")


class EventTypeList(_Response):
    data: list[EventTypeOut]


# --- deliveries ------------------------------------------------------------------------------


class DeliveryOut(_Response):
    id: str = Field(description="PARTITION:OFFSET in the attempts topic.", examples=["2:418"])
    event_id: str
    event_type: str
    bot_id: str
    endpoint_id: str
    occurred_at: Time
    number: int = Field(description="1 for the first attempt, 2 for the first retry, …")
    tier: str
    at: Time = Field(description="When the attempt started.")
    duration_ms: float
    outcome: Outcome
    status: int | None
    error: str | None
    response: str | None
    next: str = Field(description="What followed: delivered, retry:<tier>, dead:<reason>, deferred:<topic> or test.",
                      json_schema_extra={"pattern": "^(delivered|test|(retry|dead|deferred):.+)$"})
    replay_of: str | None = Field(description="TOPIC:PARTITION:OFFSET of the dead letter replayed, or of the "
                                  "attempt resent.")


class DeliveryList(_Response):
    data: list[DeliveryOut] = Field(description="Newest first.")
    next_cursor: str | None
    complete_since: Time | None = Field(
        description="null when the answer covers the whole attempts topic; else the time of the oldest attempt "
        "the API still holds: older ones may exist that it does not show.")


class ResendOut(_Response):
    id: str = Field(description="The resend's id (the replay-id header of its record).")
    resend_of: str = Field(description="The attempt resent, PARTITION:OFFSET.")
    event_id: str
    event_type: str
    endpoint_id: str
    topic: str = Field(description="Where the new delivery waits: the first retry tier, due now.")
    replay_of: str = Field(description="What its attempts in the history carry as replayOf.")
    at: Time


# --- dead letters ----------------------------------------------------------------------------


class DeadLetterSummary(_Response):
    id: str = Field(description="PARTITION:OFFSET in the dead-letter topic.", examples=["0:42"])
    partition: int
    offset: int
    dead_at: Time | None
    reason: str = Field(json_schema_extra={"enum": REASONS})
    event_type: str | None
    bot_id: str | None
    endpoint_id: str | None
    attempts: int
    last_status: int | None
    last_outcome: str | None
    event_id: str | None
    replay_of: str | None


class DeadLetterList(_Response):
    data: list[DeadLetterSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as cursor for the next (older) page; null on the last.")
    complete_since: Time | None = Field(
        description="null when the answer covers the whole dead-letter topic; else when the oldest dead letter "
        "the API still holds died.")


class AttemptLogOut(_Response):
    at: Time
    tier: str
    duration_ms: float
    status: int | None
    error: str | None
    response: str | None


class DeadLetterOut(DeadLetterSummary):
    coordinate: str
    headers: dict[str, str]
    detail: str | None = None
    source: str | None = None
    original_key: str | None = None
    original_value_bytes: int | None = None
    error: str | None = None
    session_id: str | None = None
    occurred_at: Time | None = None
    payload: str | None = None
    attempt_log: list[AttemptLogOut] | None = None


class DeadLetterStats(_Response):
    total: int
    reason: dict[str, int]
    event_type: dict[str, int]
    endpoint_id: dict[str, int]
    hour: dict[str, int]
    complete_since: Time | None = None


class ReplayRequest(_Request):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", allow_inf_nan=False, json_schema_extra={
        "examples": [{"endpointId": ENDPOINT, "since": "1d ago", "rate": "50/s"}, {"all": True, "dryRun": True}]})

    event_type: str | None = Field(default=None, max_length=32)
    bot_id: str | None = Field(default=None, max_length=64)
    endpoint_id: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, max_length=64)
    status: str | None = Field(default=None, max_length=32,
                               description="Last attempt's outcome: 5xx, 404, timeout or connection.")
    since: str | None = Field(default=None, max_length=64, description="ISO time or relative (2h ago).")
    until: str | None = Field(default=None, max_length=64)
    partition: int | None = Field(default=None, ge=0, le=2**31 - 1)
    from_offset: int | None = Field(default=None, ge=0, le=2**63 - 1)
    to_offset: int | None = Field(default=None, ge=0, le=2**63 - 1)
    limit: int | None = Field(default=None, ge=1, le=2**31 - 1)
    all: bool = Field(default=False, description="Replay every dead letter: required when no filter is given.")
    dry_run: bool = Field(default=False, description="Plan only: report what would be replayed, send nothing.")
    rate: str | None = Field(default=None, max_length=32,
                             description="At most this many replays per second: 50, 50/s, 600/m.")
    to_endpoint: str | None = Field(default=None, max_length=64, description="Replay to this endpoint instead.")
    again: bool = Field(default=False, description="Also replay dead letters replayed before.")

    def filters(self) -> dict[str, Any]:
        """The filter fields, as the library names them."""
        return {name: getattr(self, name) for name in (
            "event_type", "bot_id", "endpoint_id", "reason", "status", "since", "until", "partition", "from_offset",
            "to_offset", "limit")}


class RefusalOut(_Response):
    id: str = Field(description="The dead letter, PARTITION:OFFSET.")
    reason: str = Field(json_schema_extra={"enum": ["not_a_delivery", "endpoint_not_registered", "unknown_target"]})
    message: str


class ReplayItemOut(_Response):
    dead_letter: str
    event_id: str
    event_type: str
    endpoint_id: str


class ReplayProgressOut(_Response):
    total: int
    sent: int
    acknowledged: int
    failed: int
    seconds: float
    rate: float


class ReplayResultOut(_Response):
    replayed: int
    failed: int
    first_failure: str | None
    unrecorded: int
    first_unrecorded: str | None
    seconds: float


class ReplayJobOut(_Response):
    id: str = Field(description="The replay id, also on every replayed record's replay-id header.")
    state: JobState
    dry_run: bool
    created_at: Time
    finished_at: Time | None
    topic: str
    rate: float | None
    selected: int
    planned: int
    skipped_already_replayed: int
    refused: list[RefusalOut] = Field(description="At most 100; refusedCount has them all.")
    refused_count: int
    items: list[ReplayItemOut] = Field(description="A dry run's planned replays, at most 1000.")
    progress: ReplayProgressOut | None
    result: ReplayResultOut | None
    error: str | None
    bot_id: str | None = Field(default=None, description="The bot whose token started it, or null.")
