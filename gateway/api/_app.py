"""The management API's routes: HTTP and JSON over the operations layer the CLI calls.

What it serves (``/v1``): endpoints (list, create, read, change, remove, enable,
disable, rotate the secret, test sends, stats), the event types with their schema and
example, the delivery history (and resending one delivery), the dead letters (list,
show, count, replay as a job), and minted bot tokens; ``/healthz`` and ``/readyz`` for
load balancers, ``/metrics`` for Prometheus. Built on FastAPI: the pydantic models of
``_models`` validate requests and make the OpenAPI document, served at
``/openapi.json`` and committed as ``openapi.json`` (``gateway api --openapi``); every
operation has a hand-given ``operationId``.

The contracts it keeps, each in its own module:

* **The request guard** (``_guard``): size (413), token (401), media type (415) and one
  caller's share (429), before any route reads a body.
* **Scopes** (``_auth``, :class:`~gateway.ops.Access`): admin, read, one bot; a route hands
  the caller's access to the operation it calls, which applies it (403).
* **Versions**: every endpoint answer carries its ``ETag``; a write (PATCH, DELETE,
  enable, disable, rotate-secret) needs ``If-Match`` (428 without, 412 when stale) and
  runs under the endpoint's lock (``_service``).
* **Idempotency** (``_idempotency``): ``Idempotency-Key`` on the POSTs that make something
  (create, test send, resend, replay).
* **Read your writes** (``_service``): a write's answer waits until this process's table
  shows it; past the bound, 504 ``not_visible_yet`` (the write is saved).
* **Errors** (``_errors``): ``application/problem+json``, the error tree mapped to
  statuses in one table; never a 500 for what a client sent.
* **Blocking work**: the library functions block on Kafka; routes run them on worker
  threads, never on the event loop.
* **Metrics** (``_metrics``): every request counted under its route's template, the
  replay jobs by state; ``/metrics`` needs no token and is left out of the document.

A route parses nothing itself: filters, times, cursors, statuses and ids are read by the
operations layer (:mod:`gateway.ops`), as the command line reads them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib.metadata import version
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    Forbidden,
    GatewayError,
    InputError,
    NotFound,
    PreconditionRequired,
    RateLimited,
)
from ..ops import (
    KEEP,
    Access,
    Cursor,
    Filters,
    HistoryFilters,
    Keep,
    RecordId,
    Registration,
    circuit_json,
    endpoint_json,
    endpoint_stats,
    endpoint_version,
    event_types,
    find_dead_letters,
    get_endpoint,
    in_scope,
    iso,
    list_endpoints,
    parse_rate,
    parse_selector,
    plan_replay,
    register_endpoint,
    remove_endpoint,
    resend_delivery,
    rotate_secret,
    send_test_events,
    set_endpoint_enabled,
    stats,
    update_endpoint,
    validate_bot_id,
)
from ..records import Endpoint
from ._auth import TOKENS_ENV, require_token
from ._errors import PROBLEM_TYPE, on_gateway_error, on_http_error, on_unexpected, on_validation
from ._guard import RequestGuard
from ._idempotency import HEADER as IDEMPOTENCY_HEADER
from ._idempotency import Slot
from ._metrics import METRICS_PATH, RequestMetrics, metrics_response
from ._models import (
    DeadLetterList,
    DeadLetterOut,
    DeadLetterStats,
    DeliveryList,
    EndpointCreate,
    EndpointCreated,
    EndpointList,
    EndpointOut,
    EndpointPatch,
    EndpointStatsOut,
    EventTypeList,
    Health,
    ProbeReportOut,
    Problem,
    Readiness,
    ReplayJobOut,
    ReplayRequest,
    ResendOut,
    RotateSecret,
    TestRequest,
    TokenOut,
    TokenRequest,
)
from ._page import SettingsPage
from ._service import ApiService, NotVisibleYet

__all__ = ["create_app", "openapi_document"]

T = TypeVar("T")


def get_service(request: Request) -> ApiService:
    service: ApiService = request.app.state.service
    return service


Service = Annotated[ApiService, Depends(get_service)]
Caller = Annotated[Access, Depends(require_token)]
EndpointId = Annotated[str, Path(alias="id", max_length=64, description="The endpoint's id.")]
IfMatch = Annotated[str | None, Header(alias="If-Match", max_length=512, description=(
    "The endpoint's ETag, as its last answer gave it (\"<version>\"). Required: a write without it is 428, one "
    "whose ETag is no longer the endpoint's is 412 (someone changed it since; GET it again)."))]
IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match", max_length=512,
                                           description="An ETag: 304 when the endpoint still has it.")]
IdempotencyKey = Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, max_length=255, description=(
    "Any unique string (a UUID): a retry with the same key and body gets the first answer, even when that was a "
    "504 not_visible_yet; the same key with another body is 422. Kept 24 h in this API process."))]

health = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


@health.get("/healthz", response_model=Health, tags=["health"], operation_id="getHealth",
            openapi_extra={"security": []})
async def get_health() -> dict[str, str]:
    """Liveness: the API process answers (no token, no Kafka)."""
    return {"status": "ok"}


@health.get("/readyz", response_model=Readiness, tags=["health"], operation_id="getReadiness",
            openapi_extra={"security": []},
            responses={503: {"model": Readiness, "description": "Not ready: Kafka does not answer, or the endpoint "
                                                                "table is not loaded."}})
async def get_readiness(service: Service) -> JSONResponse:
    """Readiness: Kafka answers (checked at most every few seconds, whatever the number of
    requests) and the endpoint table is loaded (no token)."""
    ready, checks = await run_in_threadpool(service.readiness)
    body = {"status": "ready" if ready else "not_ready", "checks": {k: c.to_json() for k, c in checks.items()}}
    return JSONResponse(body, status_code=200 if ready else 503)


# --- helpers ---------------------------------------------------------------------------------


def _etag(endpoint: Endpoint) -> str:
    return f'"{endpoint_version(endpoint)}"'


def _endpoint_answer(endpoint: Endpoint, *, status: int = 200, show_secret: bool = False,
                     extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = endpoint_json(endpoint, show_secret=show_secret) | (extra or {})
    return JSONResponse(body, status_code=status, headers={"etag": _etag(endpoint)} | (headers or {}))


def _versions(if_match: str | None) -> tuple[str, ...]:
    """The versions an ``If-Match`` names; :class:`~gateway.errors.PreconditionRequired`
    without one (``*`` is not one: a write must say which version it changes)."""
    if if_match is None or not if_match.strip():
        raise PreconditionRequired("a change needs If-Match with the endpoint's ETag (from its last answer, or GET "
                                   "it): without it, it could undo a change made meanwhile", field="If-Match")
    tags = [t.strip() for t in if_match.split(",") if t.strip()]
    if "*" in tags:
        raise PreconditionRequired("If-Match: * names no version; send the endpoint's ETag", field="If-Match")
    return tuple(t.removeprefix("W/").strip('"') for t in tags)


async def _change(service: ApiService, access: Access, endpoint_id: str, if_match: str | None, what: str,
                  write: Callable[[tuple[str, ...]], T], written: Callable[[T], Endpoint], *,
                  removed: bool = False) -> T:
    """A versioned write: the caller's scope and the endpoint first (403, 404), then its
    version (428), then the write under the endpoint's lock, waiting until the table
    shows it (412 when the version is stale by then)."""
    access.require_write(what)
    await run_in_threadpool(lambda: get_endpoint(service.config, endpoint_id, table=service.table, access=access))
    versions = _versions(if_match)
    return await run_in_threadpool(lambda: service.change(endpoint_id, lambda: write(versions), written,
                                                          removed=removed))


def _created(registration: Registration) -> JSONResponse:
    endpoint = registration.endpoint
    return _endpoint_answer(endpoint, status=201, show_secret=True, extra={"warning": registration.warning},
                            headers={"location": f"/v1/endpoints/{endpoint.id}"})


# --- tokens and event types ------------------------------------------------------------------


@v1.post("/tokens", response_model=TokenOut, status_code=201, tags=["tokens"], operation_id="mintToken")
async def mint_token(service: Service, access: Caller, body: TokenRequest) -> dict[str, Any]:
    """Mint a short-lived token scoped to one bot (admin only): what a bot owner's settings
    page session uses. It expires after ttlSeconds (15 minutes by default); every API
    process sharing GATEWAY_API_TOKENS accepts it."""
    access.require_admin("minting a token")
    minted = service.tokens.mint(validate_bot_id(body.bot_id), ttl=body.ttl_seconds)
    return {"token": minted.token, "scope": "bot", "botId": minted.bot_id, "expiresAt": iso(minted.expires_at * 1000)}


@v1.get("/event-types", response_model=EventTypeList, tags=["event types"], operation_id="listEventTypes")
async def list_event_types() -> dict[str, Any]:
    """The four event types: what each means, the JSON schema of its body and its example,
    as receivers get them."""
    return {"data": [info.to_json() for info in event_types()]}


# --- endpoints -------------------------------------------------------------------------------


def _cursor_key(endpoint: Endpoint) -> tuple[str, int, str]:
    """Where an endpoint sits in the list: by bot, then oldest first."""
    return endpoint.bot_id.lower(), endpoint.created_at, endpoint.id


@v1.get("/endpoints", response_model=EndpointList, tags=["endpoints"], operation_id="listEndpoints")
async def list_endpoints_route(
    service: Service,
    access: Caller,
    bot_id: Annotated[str | None, Query(alias="botId", max_length=64,
                                        description="Only this bot's endpoints (any case). A bot token lists its "
                                        "own bot's.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="nextCursor of the previous page.")] = None,
) -> dict[str, Any]:
    """Registered endpoints, by bot then oldest first; secrets masked; each with its
    version (its ETag)."""
    after = Cursor.decode(cursor, (str, int, str)) if cursor is not None else None
    rows = await run_in_threadpool(lambda: list_endpoints(service.config, bot_id=bot_id, table=service.table,
                                                          access=access))
    if after is not None:
        rows = [e for e in rows if _cursor_key(e) > after]
    page = rows[:limit]
    more = len(rows) > limit
    return {"data": [endpoint_json(e) for e in page],
            "nextCursor": Cursor.encode(_cursor_key(page[-1])) if more else None}


@v1.post("/endpoints", response_model=EndpointCreated, status_code=201, tags=["endpoints"],
         operation_id="createEndpoint")
async def create_endpoint(request: Request, service: Service, access: Caller, body: EndpointCreate,
                          idempotency_key: IdempotencyKey = None) -> Response:
    """Register an endpoint. The answer holds its signing secret, shown this once, and its
    ETag. With an Idempotency-Key, a retry gets this answer (a 504's retry gets the
    endpoint once it is visible)."""

    async def run(slot: Slot) -> Response:
        def write() -> Registration:
            return register_endpoint(
                service.config, bot_id=body.bot_id, url=body.url, event_types=body.events or (), secret=body.secret,
                description=body.description, rate_limit=body.rate_limit, max_in_flight=body.max_in_flight,
                access=access)

        try:
            registration = await run_in_threadpool(lambda: service.write(write, lambda r: r.endpoint))
        except NotVisibleYet as exc:
            assert isinstance(exc.result, Registration)
            saved = exc.result
            slot.resume = lambda: _created(saved) if service.table.get(saved.endpoint.id) is not None else None
            raise
        return _created(registration)

    return await service.idempotency.answer(request, access, idempotency_key, run)


@v1.get("/endpoints/{id}", response_model=EndpointOut, tags=["endpoints"], operation_id="getEndpoint")
async def get_endpoint_route(service: Service, access: Caller, endpoint_id: EndpointId,
                             if_none_match: IfNoneMatch = None) -> Response:
    """One endpoint; secret masked; its version as the ETag (304 for an If-None-Match that
    still matches)."""
    endpoint = await run_in_threadpool(lambda: get_endpoint(service.config, endpoint_id, table=service.table,
                                                            access=access))
    if if_none_match is not None and endpoint_version(endpoint) in {
            t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}:
        return Response(status_code=304, headers={"etag": _etag(endpoint)})
    return _endpoint_answer(endpoint)


@v1.patch("/endpoints/{id}", response_model=EndpointCreated, tags=["endpoints"], operation_id="updateEndpoint")
async def patch_endpoint(service: Service, access: Caller, endpoint_id: EndpointId, body: EndpointPatch,
                         if_match: IfMatch = None) -> Response:
    """Change the URL, the event types, the description or the limits, as a JSON merge
    patch (application/merge-patch+json or application/json): a member absent keeps its
    value, null clears it (every event type, no description, no rate limit, the default
    in-flight cap). Needs If-Match."""
    given = body.model_fields_set
    if "url" in given and body.url is None:
        raise InputError("url cannot be null: an endpoint needs a URL", field="url")

    def member(name: str, value: T) -> T | Keep:
        return value if name in given else KEEP

    def write(versions: tuple[str, ...]) -> Registration:
        return update_endpoint(
            service.config, endpoint_id, url=KEEP if body.url is None else body.url,
            event_types=member("events", body.events), description=member("description", body.description),
            rate_limit=member("rate_limit", body.rate_limit), max_in_flight=member("max_in_flight", body.max_in_flight),
            table=service.table, access=access, if_match=versions)

    registration = await _change(service, access, endpoint_id, if_match, "changing an endpoint", write,
                                 lambda r: r.endpoint)
    return _endpoint_answer(registration.endpoint, extra={"warning": registration.warning})


@v1.delete("/endpoints/{id}", status_code=204, response_class=Response, tags=["endpoints"],
           operation_id="deleteEndpoint")
async def delete_endpoint(service: Service, access: Caller, endpoint_id: EndpointId,
                          if_match: IfMatch = None) -> Response:
    """Remove an endpoint. Its pending retries are dead-lettered as endpoint_removed.
    Needs If-Match."""
    await _change(service, access, endpoint_id, if_match, "removing an endpoint",
                  lambda versions: remove_endpoint(service.config, endpoint_id, table=service.table, access=access,
                                                   if_match=versions),
                  lambda removed: removed, removed=True)
    return Response(status_code=204)


async def _set_enabled(service: ApiService, access: Access, endpoint_id: str, enabled: bool,
                       if_match: str | None) -> Response:
    endpoint = await _change(
        service, access, endpoint_id, if_match, "enabling or disabling an endpoint",
        lambda versions: set_endpoint_enabled(service.config, endpoint_id, enabled, table=service.table,
                                              access=access, if_match=versions),
        lambda e: e)
    return _endpoint_answer(endpoint)


@v1.post("/endpoints/{id}/enable", response_model=EndpointOut, tags=["endpoints"], operation_id="enableEndpoint")
async def enable_endpoint(service: Service, access: Caller, endpoint_id: EndpointId,
                          if_match: IfMatch = None) -> Response:
    """Deliver to the endpoint (again). Needs If-Match."""
    return await _set_enabled(service, access, endpoint_id, True, if_match)


@v1.post("/endpoints/{id}/disable", response_model=EndpointOut, tags=["endpoints"], operation_id="disableEndpoint")
async def disable_endpoint(service: Service, access: Caller, endpoint_id: EndpointId,
                           if_match: IfMatch = None) -> Response:
    """Stop delivering to the endpoint without removing it. Needs If-Match."""
    return await _set_enabled(service, access, endpoint_id, False, if_match)


@v1.post("/endpoints/{id}/rotate-secret", response_model=EndpointOut, tags=["endpoints"],
         operation_id="rotateEndpointSecret")
async def rotate_secret_route(service: Service, access: Caller, endpoint_id: EndpointId,
                              body: RotateSecret | None = None, if_match: IfMatch = None) -> Response:
    """Give the endpoint a new secret, shown this once; the old one keeps signing too for
    graceSeconds (default 24 h): previousSecretExpiresAt says until when. Needs If-Match."""
    request = body or RotateSecret()
    endpoint = await _change(
        service, access, endpoint_id, if_match, "rotating a secret",
        lambda versions: rotate_secret(service.config, endpoint_id, secret=request.secret,
                                       grace_seconds=request.grace_seconds, table=service.table, access=access,
                                       if_match=versions),
        lambda e: e)
    return _endpoint_answer(endpoint, show_secret=True)


@v1.post("/endpoints/{id}/test", response_model=ProbeReportOut, tags=["endpoints"], operation_id="testEndpoint")
async def test_endpoint(request: Request, service: Service, access: Caller, endpoint_id: EndpointId,
                        body: TestRequest | None = None, idempotency_key: IdempotencyKey = None) -> Response:
    """Send the documented example of each event type (or those named) to the endpoint
    now, through the gateway's sender, and report each answer. Not a delivery: never
    retried, dead-lettered or recorded. One test send at a time per endpoint (429)."""
    asked = body or TestRequest()
    access.require_write("a test send")
    await run_in_threadpool(lambda: get_endpoint(service.config, endpoint_id, table=service.table, access=access))

    async def run(slot: Slot) -> Response:
        with service.testing(endpoint_id) as free:
            if not free:
                raise RateLimited(f"a test send to endpoint {endpoint_id} is already running; wait for its report",
                                  retry_after=max(1.0, service.config.request_timeout))
            report = await send_test_events(service.config, endpoint_id, event_types=asked.events or None,
                                            malformed=asked.malformed, table=service.table, access=access)
        return JSONResponse(report.to_json())

    return await service.idempotency.answer(request, access, idempotency_key, run)


@v1.get("/endpoints/{id}/stats", response_model=EndpointStatsOut, tags=["endpoints"],
        operation_id="getEndpointStats")
async def get_endpoint_stats(service: Service, access: Caller, endpoint_id: EndpointId) -> dict[str, Any]:
    """How the endpoint is doing: attempts, successes, failures and the success rate over
    the last hour and 24 hours, the last failure (from the delivery history), and its
    circuit breaker as the workers last reported it."""
    endpoint = await run_in_threadpool(lambda: get_endpoint(service.config, endpoint_id, table=service.table,
                                                            access=access))
    history = service.history_index()
    entries, complete_since = history.of_endpoint(endpoint.id)
    counted = endpoint_stats(endpoint.id, entries, now_ms=service.now_ms(), complete_since=complete_since)
    circuits = await run_in_threadpool(service.circuits)
    return counted.to_json() | {"circuit": circuit_json(circuits.get(endpoint.id))}


# --- deliveries ------------------------------------------------------------------------------


@v1.get("/deliveries", response_model=DeliveryList, tags=["deliveries"], operation_id="listDeliveries")
async def list_deliveries(
    service: Service,
    access: Caller,
    event_id: Annotated[str | None, Query(alias="eventId", max_length=64,
                                          description="Only this event's attempts.")] = None,
    endpoint_id: Annotated[str | None, Query(alias="endpointId", max_length=64,
                                             description="Only attempts at this endpoint.")] = None,
    bot_id: Annotated[str | None, Query(alias="botId", max_length=64,
                                        description="Only this bot's (any case); a bot token sees its own.")] = None,
    since: Annotated[str | None, Query(max_length=64,
                                       description="Attempts since: ISO time or relative (2h ago).")] = None,
    until: Annotated[str | None, Query(max_length=64, description="Attempts until: ISO time or relative.")] = None,
    status: Annotated[str | None, Query(max_length=32, description="success, failed, deferred, an outcome "
                                        "(timeout, …), a class (5xx) or a code (404).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="nextCursor of the previous page.")] = None,
) -> dict[str, Any]:
    """Every attempt, successful or not, newest first: what happened to event X, to
    endpoint Y, since T. Served from this process's index of the newest attempts."""
    history = service.history_index()
    filters = HistoryFilters.parse(event_id=event_id, endpoint_id=endpoint_id, bot_id=bot_id, status=status,
                                   since=since, until=until)
    if endpoint_id is not None and (known := service.table.get(endpoint_id)) is not None:
        access.check_endpoint(known)
    # A query may scan the whole index (tens of ms): off the event loop.
    page = await run_in_threadpool(lambda: history.query(filters, limit=limit, cursor=cursor, access=access))
    return page.to_json()


@v1.post("/deliveries/{id}/resend", response_model=ResendOut, status_code=202, tags=["deliveries"],
         operation_id="resendDelivery")
async def resend(request: Request, service: Service, access: Caller,
                 attempt_id: Annotated[str, Path(alias="id", max_length=64,
                                                 description="An attempt of the history: PARTITION:OFFSET.")],
                 idempotency_key: IdempotencyKey = None) -> Response:
    """Send this delivery's event to its endpoint again, whatever became of it (delivered
    too): a new delivery, due now, through the first retry tier, recorded in the history
    with replayOf naming this attempt. Same webhook-id: receivers that dedupe may ignore
    it. 202 once the broker has it."""
    record_id = RecordId.parse(attempt_id, field="id")
    access.require_write("resending a delivery")
    history = service.history_index()
    entry = history.get(record_id, access=access)
    if entry is None:
        raise NotFound(f"no attempt {attempt_id} in this API's delivery history", field="id")

    async def run(slot: Slot) -> Response:
        resent = await run_in_threadpool(lambda: resend_delivery(service.config, entry, table=service.table,
                                                                 access=access))
        return JSONResponse(resent.to_json(), status_code=202)

    return await service.idempotency.answer(request, access, idempotency_key, run)


# --- dead letters ----------------------------------------------------------------------------


class DlqQuery:
    """The dead-letter filters as query parameters, shared by list and stats."""

    def __init__(
        self,
        event_type: Annotated[str | None, Query(alias="eventType", max_length=32, description="MESSAGE, "
                                                "RATE_MESSAGE, TICKET or CREATE_LEAD.")] = None,
        bot_id: Annotated[str | None, Query(alias="botId", max_length=64, description="Only this bot's deliveries; "
                                            "a bot token sees its own.")] = None,
        endpoint_id: Annotated[str | None, Query(alias="endpointId", max_length=64,
                                                 description="Only deliveries that failed for it.")] = None,
        reason: Annotated[str | None, Query(max_length=64, description="retries_exhausted, undecodable, invalid, "
                                            "endpoint_removed, endpoint_disabled, blocked_destination, gone, "
                                            "…")] = None,
        status: Annotated[str | None, Query(max_length=32,
                                            description="Last attempt: 5xx, 404, timeout or connection.")] = None,
        since: Annotated[str | None, Query(max_length=64,
                                           description="Dead since: ISO time or relative (2h ago).")] = None,
        until: Annotated[str | None, Query(max_length=64, description="Dead until: ISO time or relative.")] = None,
        partition: Annotated[int | None, Query(ge=0, le=2**31 - 1,
                                               description="Only this partition of the dead-letter topic.")] = None,
        from_offset: Annotated[int | None, Query(alias="fromOffset", ge=0, le=2**63 - 1,
                                                 description="From this offset.")] = None,
        to_offset: Annotated[int | None, Query(alias="toOffset", ge=0, le=2**63 - 1,
                                               description="Up to this offset.")] = None,
    ) -> None:
        self.values: dict[str, Any] = {
            "event_type": event_type, "bot_id": bot_id, "endpoint_id": endpoint_id, "reason": reason,
            "status": status, "since": since, "until": until, "partition": partition, "from_offset": from_offset,
            "to_offset": to_offset}


def _dead_letter_filters(service: ApiService, access: Access, values: dict[str, Any]) -> Filters:
    filters = Filters.parse(**values)
    endpoint_id = values.get("endpoint_id")
    if endpoint_id is not None and (known := service.table.get(endpoint_id)) is not None:
        access.check_endpoint(known)
    return filters.scoped(access)


@v1.get("/dead-letters", response_model=DeadLetterList, tags=["dead letters"], operation_id="listDeadLetters")
async def list_dead_letters(
    service: Service, access: Caller, query: Annotated[DlqQuery, Depends()],
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="nextCursor of the previous page.")] = None,
) -> dict[str, Any]:
    """The dead letters the filters select, newest first, a page at a time. Served from
    this process's index of the newest dead letters (completeSince says from when)."""
    index = service.dead_letter_index()
    filters = _dead_letter_filters(service, access, query.values)
    page = await run_in_threadpool(lambda: index.query(filters, limit=limit, cursor=cursor, access=access))
    return page.to_json()


@v1.get("/dead-letters/stats", response_model=DeadLetterStats, tags=["dead letters"],
        operation_id="getDeadLetterStats")
async def dead_letter_stats(service: Service, access: Caller,
                            query: Annotated[DlqQuery, Depends()]) -> dict[str, Any]:
    """Counts of the selected dead letters by reason, event type, endpoint and hour (from
    this process's index)."""
    index = service.dead_letter_index()
    filters = _dead_letter_filters(service, access, query.values)
    entries, complete_since = await run_in_threadpool(lambda: index.select(filters, access=access))
    return stats(entries).to_json() | {"completeSince": iso(complete_since) if complete_since is not None else None}


@v1.get("/dead-letters/{id}", response_model=list[DeadLetterOut], tags=["dead letters"],
        operation_id="getDeadLetter")
async def get_dead_letter(
    service: Service, access: Caller,
    selector: Annotated[str, Path(alias="id", max_length=64, description="An event id (every dead letter of that "
                                  "event) or PARTITION:OFFSET.")],
) -> list[dict[str, Any]]:
    """The whole record with its attempt log, as `gateway dlq show`."""
    chosen = parse_selector(selector)  # a refusal before reading anything
    if service.dead_letters is not None:  # the index first; the topic for what it no longer holds
        found, _ = service.dead_letters.select(chosen)
        if found:
            return [entry.full() for entry in in_scope(found, access, selector=selector)]
    entries = await run_in_threadpool(lambda: find_dead_letters(service.config, selector, access=access))
    return [entry.full() for entry in entries]


@v1.post("/dead-letters/replay", response_model=ReplayJobOut, status_code=202, tags=["dead letters"],
         operation_id="replayDeadLetters",
         responses={200: {"model": ReplayJobOut, "description": "A dry run: the plan, nothing sent."}})
async def replay_dead_letters(request: Request, service: Service, access: Caller, body: ReplayRequest,
                              idempotency_key: IdempotencyKey = None) -> Response:
    """Replay the selected dead letters into the first retry tier, as `gateway dlq
    replay`: planned now, sent by a job whose progress GET /v1/replays/{id} reports. A
    selection needs a filter, or "all": true to replay every dead letter."""
    filters = Filters.parse(**body.filters())
    if filters.selects_all and not body.all:
        raise InputError('no filter given: name what to replay (endpointId, since, reason, …), or send "all": true '
                         "to replay every dead letter", field="all")
    rate = parse_rate(body.rate, field="rate") if body.rate is not None else None
    if not body.dry_run:
        access.require_write("a replay")

    async def run(slot: Slot) -> Response:
        plan = await run_in_threadpool(lambda: plan_replay(service.config, filters, again=body.again,
                                                           to_endpoint=body.to_endpoint, endpoints=service.table,
                                                           access=access))
        job = service.jobs.start(plan, rate=rate, dry_run=body.dry_run, bot_id=access.bot_id)
        return JSONResponse(job.to_json(), status_code=200 if body.dry_run else 202)

    return await service.idempotency.answer(request, access, idempotency_key, run)


@v1.get("/replays/{id}", response_model=ReplayJobOut, tags=["dead letters"], operation_id="getReplay")
async def get_replay(service: Service, access: Caller,
                     job_id: Annotated[str, Path(alias="id", max_length=64)]) -> dict[str, Any]:
    """A replay job: its plan, its progress, and what it did."""
    job = service.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no replay job {job_id!r} in this API process (jobs live in its memory)", field="id")
    if access.bot_id is not None and job.bot_id != access.bot_id:
        raise Forbidden(f"this token is scoped to bot {access.bot_id}: replay {job_id} was started by another caller")
    return job.to_json()


# --- the application ----------------------------------------------------------------------------


def create_app(service: ApiService) -> FastAPI:
    """The ASGI application serving ``service``: the routes behind the request guard."""
    app = FastAPI(
        title="webhook-gateway management API",
        version=version("webhook-gateway"),
        description="Endpoints, test sends, delivery history and dead letters of the webhook gateway. Every "
                    f"route but /healthz and /readyz needs Authorization: Bearer <a token of {TOKENS_ENV}, or a "
                    "bot token an admin minted>. Errors are application/problem+json.",
        openapi_url=None, docs_url=None, redoc_url=None,  # the document is served below, behind the token
    )
    app.state.service = service
    unlisted = APIRouter(include_in_schema=False)

    @unlisted.get("/openapi.json", dependencies=[Depends(require_token)])
    async def openapi() -> dict[str, Any]:
        return openapi_document(app)

    @unlisted.get(METRICS_PATH)
    async def metrics() -> Response:
        """Prometheus' scrape (no token: the guard lets it through)."""
        return metrics_response(service.metrics)

    for router in (health, v1, unlisted):
        app.include_router(router)
    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(RequestGuard, service=service)
    app.add_middleware(SettingsPage)  # after the guard, so before it: the page needs no token (gateway/api/_page.py)
    # Last, so first: the guard's refusals and the page are counted too.
    app.add_middleware(RequestMetrics, metrics=service.metrics, routes=(*health.routes, *v1.routes, *unlisted.routes))

    return app


# Problems any /v1 operation may answer, and those of some operations.
_COMMON = {
    400: "A body that is not JSON, or a Content-Length that is not a number.",
    401: f"No token, or not a token of {TOKENS_ENV} nor a valid minted one.",
    403: "Out of the token's scope (another bot's, or a write with a read token).",
    408: "The body did not arrive in time.",
    413: "The body is larger than GATEWAY_API_MAX_BODY_BYTES.",
    415: "The body is not JSON by its content type.",
    422: "Bad input; errors names each field.",
    429: "Too many requests of this caller at once; Retry-After says when to retry.",
    431: "The request head is larger than GATEWAY_API_MAX_HEADER_BYTES.",
    503: "Kafka (a topic, an index) cannot be read or written.",
}
_MORE: dict[str, dict[int, str]] = {
    "createEndpoint": {409: "A request with this Idempotency-Key is still being answered.",
                       504: "Saved, but not yet visible to this API's reads: endpointId names it; retry with the "
                            "same Idempotency-Key."},
    "getEndpoint": {404: "No such endpoint."},
    "updateEndpoint": {404: "No such endpoint.", 412: "If-Match is not the endpoint's version any more.",
                       428: "If-Match is missing.", 504: "Saved, but not yet visible to this API's reads."},
    "testEndpoint": {404: "No such endpoint.", 409: "A request with this Idempotency-Key is still being answered."},
    "getEndpointStats": {404: "No such endpoint."},
    "resendDelivery": {404: "No such attempt in this API's history, or its event is no longer on the events topic.",
                       409: "The endpoint is no longer registered, or the Idempotency-Key is in use."},
    "getDeadLetter": {404: "No such dead letter."},
    "replayDeadLetters": {409: "Another replay is running (or the Idempotency-Key is in use)."},
    "getReplay": {404: "No such job in this API process."},
}
for _name in ("deleteEndpoint", "enableEndpoint", "disableEndpoint", "rotateEndpointSecret"):
    _MORE[_name] = _MORE["updateEndpoint"]
_ETAG_ANSWERS = {"createEndpoint": "201", "getEndpoint": "200", "updateEndpoint": "200", "enableEndpoint": "200",
                 "disableEndpoint": "200", "rotateEndpointSecret": "200"}


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _finish(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document, made to say what the API does: every problem an operation may
    answer (as application/problem+json), the ETag of endpoint answers, merge-patch bodies."""
    document = copy.deepcopy(document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    problem_schema = Problem.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    for name, definition in problem_schema.pop("$defs", {}).items():
        schemas[name] = definition
    schemas["Problem"] = problem_schema
    for path, item in document["paths"].items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1/"):
                continue
            name = operation.get("operationId", "")
            for status, description in (_COMMON | _MORE.get(name, {})).items():
                responses[str(status)] = _problem_response(description)
            if name in _ETAG_ANSWERS:
                responses[_ETAG_ANSWERS[name]].setdefault("headers", {})["ETag"] = {
                    "description": "The endpoint's version, quoted: send it in If-Match to change it.",
                    "schema": {"type": "string"}}
            if name == "getEndpoint":
                responses["304"] = {"description": "Not modified: If-None-Match is still the endpoint's version.",
                                    "headers": {"ETag": {"schema": {"type": "string"}}}}
            if name == "createEndpoint":
                responses["201"]["headers"]["Location"] = {"description": "The endpoint's path.",
                                                           "schema": {"type": "string"}}
            if name == "updateEndpoint":
                content = operation["requestBody"]["content"]
                content["application/merge-patch+json"] = copy.deepcopy(content["application/json"])
    return document


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (what ``/openapi.json`` serves and ``openapi.json`` holds)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        app.openapi_schema = _finish(get_openapi(title=app.title, version=app.version, description=app.description,
                                                 routes=app.routes))
    return app.openapi_schema

