"""The management API's routes: HTTP and JSON over the operations layer the CLI calls.

What it serves (``/v1``): endpoints (list, create, read, change, remove, enable,
disable, rotate the secret, test sends), the delivery history, and the dead letters
(list, show, count, replay as a job). Built on FastAPI: the pydantic models of
``_models`` validate requests and make the OpenAPI document, served at
``/openapi.json`` and committed as ``openapi.json`` (``gateway api --openapi``).

The contracts it keeps, each in its own module:

* **Auth** (``_auth``): every route but ``/healthz`` needs ``Authorization: Bearer
  <token>`` with one of the tokens of ``GATEWAY_API_TOKENS``; otherwise 401.
* **Read your writes** (``_service``): a write's answer waits until this process's table
  shows it; past the bound, 504 ``not_visible_yet`` (the write is saved).
* **Errors** (``_errors``): the error tree mapped to statuses in one table; never a 500
  for what a client sent.
* **Blocking work**: the library functions block on Kafka; routes run them on worker
  threads, never on the event loop.

A route parses nothing itself: filters, times, cursors, statuses and ids are read by the
operations layer (:mod:`gateway.ops`), as the command line reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GatewayError, NotFound
from ..ops import (
    DEFAULT_GRACE_SECONDS,
    KEEP,
    Cursor,
    Filters,
    HistoryFilters,
    endpoint_json,
    find_dead_letters,
    get_endpoint,
    list_endpoints,
    parse_rate,
    parse_selector,
    plan_replay,
    read_dead_letters,
    register_endpoint,
    remove_endpoint,
    rotate_secret,
    send_test_events,
    set_endpoint_enabled,
    stats,
    update_endpoint,
)
from ..records import Endpoint
from ._auth import TOKENS_ENV, require_token
from ._errors import on_gateway_error, on_http_error, on_unexpected, on_validation
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
    ErrorBody,
    Health,
    ProbeReportOut,
    ReplayJobOut,
    ReplayRequest,
    RotateSecret,
    TestRequest,
)
from ._service import ApiService

__all__ = ["create_app", "openapi_document"]

T = TypeVar("T")


def get_service(request: Request) -> ApiService:
    service: ApiService = request.app.state.service
    return service


Service = Annotated[ApiService, Depends(get_service)]
EndpointId = Annotated[str, Path(alias="id", description="The endpoint's id.")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No token, or not a token of GATEWAY_API_TOKENS."},
    422: {"model": ErrorBody, "description": "Bad input; field names it."},
    503: {"model": ErrorBody, "description": "Kafka (a topic) cannot be read or written."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such id."}}
_WRITE: dict[int | str, dict[str, Any]] = {
    504: {"model": ErrorBody, "description": "Saved, but not yet visible to this API's reads; GET it again."}
}

health = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=_ERRORS)


@health.get("/healthz", response_model=Health, tags=["health"], openapi_extra={"security": []})
async def get_health() -> dict[str, str]:
    """Whether the API process is up (no token needed)."""
    return {"status": "ok"}


def _cursor_key(endpoint: Endpoint) -> tuple[str, int, str]:
    """Where an endpoint sits in the list: by bot, then oldest first."""
    return endpoint.bot_id.lower(), endpoint.created_at, endpoint.id


@v1.get("/endpoints", response_model=EndpointList, tags=["endpoints"])
async def list_endpoints_route(
    service: Service,
    bot_id: Annotated[str | None, Query(alias="botId", description="Only this bot's endpoints (any case).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page.")] = None,
) -> dict[str, Any]:
    """Registered endpoints, by bot then oldest first; secrets masked."""
    after = Cursor.decode(cursor, (str, int, str)) if cursor is not None else None
    rows = await run_in_threadpool(lambda: list_endpoints(service.config, bot_id=bot_id, table=service.table))
    if after is not None:
        rows = [e for e in rows if _cursor_key(e) > after]
    page = rows[:limit]
    more = len(rows) > limit
    return {"data": [endpoint_json(e) for e in page],
            "nextCursor": Cursor.encode(_cursor_key(page[-1])) if more else None}


async def _write(service: ApiService, write: Callable[[], T], written: Callable[[T], Endpoint],
                 *, removed: bool = False) -> T:
    """``write``, then wait until the table shows it (read your writes), off the loop."""
    return await run_in_threadpool(lambda: service.write(write, written, removed=removed))


@v1.post("/endpoints", response_model=EndpointCreated, status_code=201, tags=["endpoints"], responses=_WRITE)
async def create_endpoint(service: Service, body: EndpointCreate) -> dict[str, Any]:
    """Register an endpoint. The answer holds its signing secret, shown this once."""
    registration = await _write(
        service,
        lambda: register_endpoint(service.config, bot_id=body.bot_id, url=body.url, event_types=body.events or (),
                                  secret=body.secret, description=body.description, rate_limit=body.rate_limit,
                                  max_in_flight=body.max_in_flight),
        lambda r: r.endpoint)
    return endpoint_json(registration.endpoint, show_secret=True) | {"warning": registration.warning}


@v1.get("/endpoints/{id}", response_model=EndpointOut, tags=["endpoints"], responses=_NOT_FOUND)
async def get_endpoint_route(service: Service, endpoint_id: EndpointId) -> dict[str, Any]:
    """One endpoint; secret masked."""
    endpoint = await run_in_threadpool(lambda: get_endpoint(service.config, endpoint_id, table=service.table))
    return endpoint_json(endpoint)


@v1.patch("/endpoints/{id}", response_model=EndpointCreated, tags=["endpoints"], responses=_NOT_FOUND | _WRITE)
async def patch_endpoint(service: Service, endpoint_id: EndpointId, body: EndpointPatch) -> dict[str, Any]:
    """Change the URL, the event types, the description or the limits; absent fields are
    kept (null removes a limit)."""
    given = body.model_fields_set
    registration = await _write(
        service,
        lambda: update_endpoint(service.config, endpoint_id, url=body.url, event_types=body.events,
                                description=body.description, table=service.table,
                                rate_limit=body.rate_limit if "rate_limit" in given else KEEP,
                                max_in_flight=body.max_in_flight if "max_in_flight" in given else KEEP),
        lambda r: r.endpoint)
    return endpoint_json(registration.endpoint) | {"warning": registration.warning}


@v1.delete("/endpoints/{id}", status_code=204, response_class=Response, tags=["endpoints"],
           responses=_NOT_FOUND | _WRITE)
async def delete_endpoint(service: Service, endpoint_id: EndpointId) -> Response:
    """Remove an endpoint. Its pending retries are dead-lettered as endpoint_removed."""
    await _write(service, lambda: remove_endpoint(service.config, endpoint_id, table=service.table),
                 lambda removed: removed, removed=True)
    return Response(status_code=204)


async def _set_enabled(service: ApiService, endpoint_id: str, enabled: bool) -> dict[str, Any]:
    endpoint = await _write(
        service, lambda: set_endpoint_enabled(service.config, endpoint_id, enabled, table=service.table),
        lambda e: e)
    return endpoint_json(endpoint)


@v1.post("/endpoints/{id}/enable", response_model=EndpointOut, tags=["endpoints"], responses=_NOT_FOUND | _WRITE)
async def enable_endpoint(service: Service, endpoint_id: EndpointId) -> dict[str, Any]:
    """Deliver to the endpoint (again)."""
    return await _set_enabled(service, endpoint_id, True)


@v1.post("/endpoints/{id}/disable", response_model=EndpointOut, tags=["endpoints"], responses=_NOT_FOUND | _WRITE)
async def disable_endpoint(service: Service, endpoint_id: EndpointId) -> dict[str, Any]:
    """Stop delivering to the endpoint without removing it."""
    return await _set_enabled(service, endpoint_id, False)


@v1.post("/endpoints/{id}/rotate-secret", response_model=EndpointOut, tags=["endpoints"],
         responses=_NOT_FOUND | _WRITE)
async def rotate_secret_route(service: Service, endpoint_id: EndpointId,
                              body: RotateSecret | None = None) -> dict[str, Any]:
    """Give the endpoint a new secret, shown this once; the old one keeps signing too
    for graceSeconds (default 24 h)."""
    secret = body.secret if body else None
    grace = body.grace_seconds if body else DEFAULT_GRACE_SECONDS
    endpoint = await _write(
        service, lambda: rotate_secret(service.config, endpoint_id, secret=secret, grace_seconds=grace,
                                       table=service.table),
        lambda e: e)
    return endpoint_json(endpoint, show_secret=True)


@v1.post("/endpoints/{id}/test", response_model=ProbeReportOut, tags=["endpoints"], responses=_NOT_FOUND)
async def test_endpoint(service: Service, endpoint_id: EndpointId, body: TestRequest | None = None) -> dict[str, Any]:
    """Send the documented example of each event type (or those named) to the endpoint
    now, through the gateway's sender, and report each answer. Not a delivery: never
    retried, dead-lettered or recorded."""
    request = body or TestRequest()
    report = await send_test_events(service.config, endpoint_id, event_types=request.events or None,
                                    malformed=request.malformed, table=service.table)
    return report.to_json()


@v1.get("/deliveries", response_model=DeliveryList, tags=["deliveries"])
async def list_deliveries(
    service: Service,
    event_id: Annotated[str | None, Query(alias="eventId", description="Only this event's attempts.")] = None,
    endpoint_id: Annotated[str | None, Query(alias="endpointId", description="Only attempts at this endpoint.")] = None,
    bot_id: Annotated[str | None, Query(alias="botId", description="Only this bot's (any case).")] = None,
    since: Annotated[str | None, Query(description="Attempts since: ISO time or relative (2h ago).")] = None,
    until: Annotated[str | None, Query(description="Attempts until: ISO time or relative.")] = None,
    status: Annotated[str | None, Query(description="success, failed, deferred, an outcome (timeout, …), "
                                        "a class (5xx) or a code (404).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page.")] = None,
) -> dict[str, Any]:
    """Every attempt, successful or not, newest first: what happened to event X, to
    endpoint Y, since T. Served from this process's index of the newest attempts."""
    history = service.history_index()
    filters = HistoryFilters.parse(event_id=event_id, endpoint_id=endpoint_id, bot_id=bot_id, status=status,
                                   since=since, until=until)
    # A query may scan the whole index (tens of ms): off the event loop.
    page = await run_in_threadpool(lambda: history.query(filters, limit=limit, cursor=cursor))
    return page.to_json()


class DlqQuery:
    """The dead-letter filters as query parameters, shared by list and stats."""

    def __init__(
        self,
        event_type: Annotated[str | None, Query(alias="eventType", description="MESSAGE, RATE_MESSAGE, TICKET or "
                                                "CREATE_LEAD.")] = None,
        bot_id: Annotated[str | None, Query(alias="botId", description="Only this bot's deliveries.")] = None,
        endpoint_id: Annotated[str | None, Query(alias="endpointId",
                                                 description="Only deliveries that failed for it.")] = None,
        reason: Annotated[str | None, Query(description="retries_exhausted, undecodable, invalid, endpoint_removed, "
                                            "endpoint_disabled, blocked_destination, gone, …")] = None,
        status: Annotated[str | None, Query(description="Last attempt: 5xx, 404, timeout or connection.")] = None,
        since: Annotated[str | None, Query(description="Dead since: ISO time or relative (2h ago).")] = None,
        until: Annotated[str | None, Query(description="Dead until: ISO time or relative.")] = None,
        partition: Annotated[int | None, Query(ge=0, le=2**31 - 1,
                                               description="Only this partition of the dead-letter topic.")] = None,
        from_offset: Annotated[int | None, Query(alias="fromOffset", ge=0, le=2**63 - 1,
                                                 description="Start at this offset.")] = None,
        to_offset: Annotated[int | None, Query(alias="toOffset", ge=0, le=2**63 - 1,
                                               description="Stop after this offset.")] = None,
    ) -> None:
        self.values: dict[str, Any] = {
            "event_type": event_type, "bot_id": bot_id, "endpoint_id": endpoint_id, "reason": reason,
            "status": status, "since": since, "until": until, "partition": partition, "from_offset": from_offset,
            "to_offset": to_offset}


@v1.get("/dead-letters", response_model=DeadLetterList, tags=["dead letters"])
async def list_dead_letters(
    service: Service, query: Annotated[DlqQuery, Depends()],
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
) -> dict[str, Any]:
    """The dead letters the filters select, as `gateway dlq list` shows them. Reads the
    dead-letter topic to its end."""
    filters = Filters.parse(**query.values, limit=limit + 1)
    rows = await run_in_threadpool(lambda: [e.summary() for e in read_dead_letters(service.config, filters)])
    return {"data": rows[:limit], "truncated": len(rows) > limit}


@v1.get("/dead-letters/stats", response_model=DeadLetterStats, tags=["dead letters"])
async def dead_letter_stats(service: Service, query: Annotated[DlqQuery, Depends()]) -> dict[str, Any]:
    """Counts of the selected dead letters by reason, event type, endpoint and hour."""
    filters = Filters.parse(**query.values)
    counts = await run_in_threadpool(lambda: stats(read_dead_letters(service.config, filters)))
    return counts.to_json()


@v1.get("/dead-letters/{id}", response_model=list[DeadLetterOut], tags=["dead letters"], responses=_NOT_FOUND)
async def get_dead_letter(
    service: Service,
    selector: Annotated[str, Path(alias="id", description="An event id (every dead letter of that event) or "
                                  "PARTITION:OFFSET.")],
) -> list[dict[str, Any]]:
    """The whole record with its attempt log, as `gateway dlq show`."""
    parse_selector(selector)  # a refusal before reading the topic
    entries = await run_in_threadpool(lambda: find_dead_letters(service.config, selector))
    return [entry.full() for entry in entries]


@v1.post("/dead-letters/replay", response_model=ReplayJobOut, status_code=202, tags=["dead letters"],
         responses={200: {"model": ReplayJobOut, "description": "A dry run: the plan, nothing sent."},
                    409: {"model": ErrorBody, "description": "Another replay is running."}})
async def replay_dead_letters(service: Service, body: ReplayRequest, response: Response) -> dict[str, Any]:
    """Replay the selected dead letters into the first retry tier, as `gateway dlq
    replay`: planned now, sent by a job whose progress GET /v1/replays/{id} reports."""
    filters = Filters.parse(event_type=body.event_type, bot_id=body.bot_id, endpoint_id=body.endpoint_id,
                            reason=body.reason, status=body.status, since=body.since, until=body.until,
                            partition=body.partition, from_offset=body.from_offset, to_offset=body.to_offset,
                            limit=body.limit)
    rate = parse_rate(body.rate, field="rate") if body.rate is not None else None
    plan = await run_in_threadpool(lambda: plan_replay(service.config, filters, again=body.again,
                                               to_endpoint=body.to_endpoint, endpoints=service.table))
    job = service.jobs.start(plan, rate=rate, dry_run=body.dry_run)
    if body.dry_run:
        response.status_code = 200
    return job.to_json()


@v1.get("/replays/{id}", response_model=ReplayJobOut, tags=["dead letters"], responses=_NOT_FOUND)
async def get_replay(service: Service, job_id: Annotated[str, Path(alias="id")]) -> dict[str, Any]:
    """A replay job: its plan, its progress, and what it did."""
    job = service.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no replay job {job_id!r} in this API process (jobs live in its memory)", field="id")
    return job.to_json()


# --- the application ----------------------------------------------------------------------------


def create_app(service: ApiService) -> FastAPI:
    """The ASGI application serving ``service``."""
    app = FastAPI(
        title="webhook-gateway management API",
        version=version("webhook-gateway"),
        description="Endpoints, test sends, delivery history and dead letters of the webhook gateway. Every "
                    f"route but /healthz needs Authorization: Bearer <one of {TOKENS_ENV}>.",
        openapi_url=None, docs_url=None, redoc_url=None,  # the document is served below, behind the token
    )
    app.state.service = service
    app.include_router(health)
    app.include_router(v1)
    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    async def openapi() -> dict[str, Any]:
        return openapi_document(app)

    return app


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (what ``/openapi.json`` serves and ``openapi.json`` holds)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                         routes=app.routes)
    return app.openapi_schema
