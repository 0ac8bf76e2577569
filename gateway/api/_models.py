"""The management API's request and response bodies, as pydantic models.

They are the API's contract: FastAPI validates requests against them (a wrong type
gets a 422 naming the field) and builds the OpenAPI document from them. Field names are
camelCase on the wire, as in ``endpoint_json`` and the dead-letter tools' JSON.

Request models only check shapes (types, required fields, unknown fields refused); what
a value must be (a UUID bot id, a reachable URL, a known event type, a signing secret)
is judged by the same library functions the CLI calls, so the two faces cannot differ.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

from ..events import EventType

__all__ = [
    "AttemptLogOut",
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
    "ErrorBody",
    "FieldError",
    "Health",
    "ProbeOut",
    "ProbeReportOut",
    "RefusalOut",
    "ReplayItemOut",
    "ReplayJobOut",
    "ReplayProgressOut",
    "ReplayRequest",
    "ReplayResultOut",
    "RotateSecret",
    "TestRequest",
]

EVENT_TYPES: list[JsonValue] = [t.value for t in EventType]
UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class _Request(BaseModel):
    """Bodies: camelCase names only, unknown names refused (a typo is not ignored)."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


# --- errors --------------------------------------------------------------------------------


class FieldError(_Response):
    field: str | None = Field(description="The input at fault, as the API names it (botId, url, limit, …).")
    message: str


class ErrorBody(_Response):
    """Every error answer: 401, 404, 409, 422, 503, 504."""

    error: str = Field(description="unauthorized, not_found, invalid, conflict, unavailable, not_visible_yet, …")
    message: str = Field(description="What was wrong, with the value, and what to do.")
    field: str | None = Field(default=None, description="The input at fault, when one is.")
    errors: list[FieldError] = Field(default_factory=list, description="Every problem found in the input.")


class Health(_Response):
    status: str = Field(description="ok")


# --- endpoints -------------------------------------------------------------------------------


class EndpointCreate(_Request):
    bot_id: str = Field(description="UUID of the bot whose events the endpoint receives.",
                        json_schema_extra={"pattern": UUID_PATTERN}, examples=["6434515b-8541-4861-bb24-8acd6e77e8c4"])
    url: str = Field(description="http(s) URL the events are POSTed to.", examples=["https://example.com/hook"])
    events: list[str] | None = Field(
        default=None, description="Event types to receive (any case); empty or absent: all.",
        json_schema_extra={"items": {"type": "string", "enum": EVENT_TYPES}})
    secret: str | None = Field(default=None, description="Signing secret whsec_<base64>; generated when absent.")
    description: str | None = Field(default=None, description="Free text.")
    rate_limit: float | None = Field(
        default=None, gt=0, le=1_000_000,
        description="Most requests per second to it, per gateway process; absent or null: no limit.")
    max_in_flight: int | None = Field(
        default=None, ge=1, le=1000,
        description="Most requests in flight to it, per gateway process; absent or null: the process's default.")


class EndpointPatch(_Request):
    url: str | None = Field(default=None, description="New URL; absent keeps it.")
    events: list[str] | None = Field(
        default=None, description="New event types; [] means all; absent keeps them.",
        json_schema_extra={"items": {"type": "string", "enum": EVENT_TYPES}})
    description: str | None = Field(default=None, description="New description; absent keeps it.")
    rate_limit: float | None = Field(
        default=None, gt=0, le=1_000_000,
        description="Most requests per second, per gateway process; absent keeps it, null removes the limit.")
    max_in_flight: int | None = Field(
        default=None, ge=1, le=1000,
        description="Most requests in flight, per gateway process; absent keeps it, null: the process's default.")


class RotateSecret(_Request):
    secret: str | None = Field(default=None, description="The new secret whsec_<base64>; generated when absent.")
    grace_seconds: float = Field(default=86400.0, description="How long the old secret keeps signing too.")


class EndpointOut(_Response):
    id: str
    bot_id: str
    url: str
    events: list[str] = Field(description="Event types delivered; empty: all.")
    enabled: bool
    description: str | None
    rate_limit: float | None = Field(default=None, description="Requests per second per gateway process, or null.")
    max_in_flight: int | None = Field(default=None, description="Requests in flight per gateway process, or null.")
    secret: str = Field(description="Masked, except in the answer that created or rotated it.")
    created_at: int = Field(description="ms since the epoch")
    updated_at: int = Field(description="ms since the epoch")


class EndpointCreated(EndpointOut):
    warning: str | None = Field(
        default=None, description="Why deliveries to this URL would be refused under the gateway's destination "
        "policy (registered anyway), or null.")


class EndpointList(_Response):
    data: list[EndpointOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null on the last.")


class TestRequest(_Request):
    events: list[str] | None = Field(
        default=None, description="Event types whose example to send; empty or absent: every type.",
        json_schema_extra={"items": {"type": "string", "enum": EVENT_TYPES}})
    malformed: bool = Field(default=False, description="Also send a request with a bad signature and one with a "
                            "stale timestamp, which the receiver should refuse.")


class ProbeOut(_Response):
    kind: str = Field(description="example, bad_signature or stale_timestamp")
    event_type: str
    event_id: str = Field(description="The webhook-id sent.")
    ok: bool = Field(description="An example answered 2xx; a malformed request refused with a non-2xx status.")
    verdict: str = Field(description="delivered, failed, rejected, accepted or no answer")
    outcome: str
    status: int | None
    duration_ms: float
    error: str | None
    response: str | None = Field(description="The start of the response body.")


class ProbeReportOut(_Response):
    endpoint_id: str
    url: str
    ok: bool
    results: list[ProbeOut]


# --- deliveries ------------------------------------------------------------------------------


class DeliveryOut(_Response):
    id: str = Field(description="PARTITION:OFFSET in the attempts topic.")
    event_id: str
    event_type: str
    bot_id: str
    endpoint_id: str
    occurred_at: str
    number: int = Field(description="1 for the first attempt, 2 for the first retry, …")
    tier: str
    at: str = Field(description="When the attempt started (ISO 8601, UTC).")
    duration_ms: float
    outcome: str = Field(description="success, http_error, timeout, connection_error, blocked, invalid_endpoint, "
                         "internal_error, circuit_open or deferred")
    status: int | None
    error: str | None
    response: str | None
    next: str = Field(description="What followed: delivered, retry:<tier>, dead:<reason>, deferred:<topic> or test.")
    replay_of: str | None


class DeliveryList(_Response):
    data: list[DeliveryOut] = Field(description="Newest first.")
    next_cursor: str | None
    complete_since: str | None = Field(
        description="null when the answer covers the whole attempts topic; else the time of the oldest attempt "
        "the API still holds: older ones may exist that it does not show.")


# --- dead letters ----------------------------------------------------------------------------


class DeadLetterSummary(_Response):
    id: str = Field(description="PARTITION:OFFSET in the dead-letter topic.")
    partition: int
    offset: int
    dead_at: str | None
    reason: str
    event_type: str | None
    bot_id: str | None
    endpoint_id: str | None
    attempts: int
    last_status: int | None
    last_outcome: str | None
    event_id: str | None
    replay_of: str | None


class DeadLetterList(_Response):
    data: list[DeadLetterSummary]
    truncated: bool = Field(description="More dead letters matched than limit.")


class AttemptLogOut(_Response):
    at: str
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
    occurred_at: str | None = None
    payload: str | None = None
    attempt_log: list[AttemptLogOut] | None = None


class DeadLetterStats(_Response):
    total: int
    reason: dict[str, int]
    event_type: dict[str, int]
    endpoint_id: dict[str, int]
    hour: dict[str, int]


class ReplayRequest(_Request):
    event_type: str | None = None
    bot_id: str | None = None
    endpoint_id: str | None = None
    reason: str | None = None
    status: str | None = Field(default=None, description="Last attempt's outcome: 5xx, 404, timeout or connection.")
    since: str | None = Field(default=None, description="ISO time or relative (2h ago).")
    until: str | None = None
    partition: int | None = Field(default=None, ge=0, le=2**31 - 1)
    from_offset: int | None = Field(default=None, ge=0, le=2**63 - 1)
    to_offset: int | None = Field(default=None, ge=0, le=2**63 - 1)
    limit: int | None = Field(default=None, ge=1, le=2**31 - 1)
    dry_run: bool = Field(default=False, description="Plan only: report what would be replayed, send nothing.")
    rate: str | None = Field(default=None, description="At most this many replays per second: 50, 50/s, 600/m.")
    to_endpoint: str | None = Field(default=None, description="Replay to this endpoint instead.")
    again: bool = Field(default=False, description="Also replay dead letters replayed before.")


class RefusalOut(_Response):
    id: str = Field(description="The dead letter, PARTITION:OFFSET.")
    reason: str
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
    state: str = Field(description="dry_run, running, succeeded or failed")
    dry_run: bool
    created_at: str
    finished_at: str | None
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

