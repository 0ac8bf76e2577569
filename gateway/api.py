"""The management API: HTTP and JSON over the library functions the CLI calls.

What it serves (``/v1``): endpoints (list, create, read, change, remove, enable,
disable, rotate the secret, test sends), the delivery history, and the dead letters
(list, show, count, replay as a job). Built on FastAPI: the pydantic models of
:mod:`gateway.api_models` validate requests and make the OpenAPI document, served at
``/openapi.json`` and committed as ``openapi.json`` (``gateway api --openapi``).

The contracts it keeps:

* **Auth.** Every route but ``/healthz`` needs ``Authorization: Bearer <token>`` with one
  of the tokens of ``GATEWAY_API_TOKENS`` (comma-separated, 16 characters at least);
  otherwise 401 and a JSON error. Tokens are compared in constant time.
* **Read your writes.** The process keeps an :class:`~gateway.endpoints.EndpointRegistry`
  following the endpoints topic and serves every read from its table. A write is
  acknowledged by the broker, then the answer waits (up to ``visible_timeout``) until
  that table shows it, so the next GET sees it; past the bound, 504 ``not_visible_yet``
  (the write is saved). Changes made elsewhere (the CLI, another API process) show up
  as the table follows the topic, within a second or so.
* **Errors.** Bad input gets 422 naming the field the way the API names it (``botId``,
  ``events``, ``since``), from pydantic or from the library's own validation; unknown
  ids 404; the topics unreachable 503. Never a 500 for what a client sent.
* **Blocking work.** The library functions block on Kafka: they run on worker threads,
  never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_jobs import JobConflict, ReplayJobs
from .api_models import (
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
from .config import Config
from .dlq import (
    DeadLetterNotFound,
    DlqError,
    Filters,
    find_dead_letters,
    parse_rate,
    parse_selector,
    plan_replay,
    read_dead_letters,
    stats,
)
from .endpoints import (
    DEFAULT_GRACE_SECONDS,
    KEEP,
    EndpointError,
    EndpointNotFound,
    EndpointRegistry,
    EndpointsUnavailable,
    EndpointTable,
    endpoint_json,
    get_endpoint,
    list_endpoints,
    register_endpoint,
    remove_endpoint,
    rotate_secret,
    set_endpoint_enabled,
    update_endpoint,
    validate_event_types,
)
from .history import DEFAULT_CAPACITY, HistoryError, HistoryFilters, HistoryIndex, parse_moment
from .records import Endpoint
from .testsend import send_tests
from .topics import Topics

__all__ = [
    "MIN_TOKEN_LENGTH",
    "TOKENS_ENV",
    "ApiService",
    "ApiThread",
    "NotVisible",
    "Tokens",
    "TokensError",
    "create_app",
    "is_loopback",
    "openapi_document",
]

log = logging.getLogger(__name__)

TOKENS_ENV = "GATEWAY_API_TOKENS"
MIN_TOKEN_LENGTH = 16
VISIBLE_TIMEOUT = 10.0
"""Seconds a write's answer waits for the table to show it."""

T = TypeVar("T")


# --- tokens ----------------------------------------------------------------------------------


class TokensError(ValueError):
    """``GATEWAY_API_TOKENS`` holds something that cannot be a token; never shows it."""


class Tokens:
    """The bearer tokens the API accepts."""

    def __init__(self, tokens: Iterable[str]) -> None:
        kept = []
        for number, token in enumerate(tokens, start=1):
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokensError(f"{TOKENS_ENV}: token {number} is {len(token)} characters; use at least "
                                  f"{MIN_TOKEN_LENGTH}, e.g. python3 -c "
                                  "'import secrets; print(secrets.token_urlsafe(32))'")
            if any(c.isspace() or not c.isprintable() for c in token):
                raise TokensError(f"{TOKENS_ENV}: token {number} contains whitespace or control characters")
            kept.append(token)
        # Compared as digests: equal lengths, so a comparison reveals nothing of a token's length.
        self._digests = tuple(hashlib.sha256(t.encode()).digest() for t in kept)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tokens:
        text = (os.environ if environ is None else environ).get(TOKENS_ENV, "")
        return cls(t.strip() for t in text.split(",") if t.strip())

    @staticmethod
    def generate() -> str:
        """A fresh token (32 random bytes, URL-safe base64)."""
        return secrets.token_urlsafe(32)

    def accepts(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        # Every token compared, not the first match only: the time does not depend on which.
        return sum(hmac.compare_digest(digest, known) for known in self._digests) > 0

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the service: what the routes read from ---------------------------------------------------


class NotVisible(RuntimeError):
    """A write was acknowledged, but the table did not show it within the bound."""


class ApiService:
    """What one API process holds: the configuration, the tokens, the endpoint table
    (following the topic), the delivery history index and the replay jobs.

    Made without I/O; :meth:`start` reads the topics (blocking), :meth:`stop` lets go.
    """

    def __init__(self, config: Config, tokens: Tokens, *, history_capacity: int = DEFAULT_CAPACITY,
                 visible_timeout: float = VISIBLE_TIMEOUT) -> None:
        self.config = config
        self.tokens = tokens
        self.history_capacity = history_capacity
        self.visible_timeout = visible_timeout
        self.jobs = ReplayJobs(config)
        self.history: HistoryIndex | None = None
        self.history_error: str | None = None
        self._registry: EndpointRegistry | None = None
        self._changed = threading.Condition()

    def start(self, *, timeout: float = 30.0) -> ApiService:
        """Load the endpoint table and the history, and follow both. Raises
        :class:`EndpointsUnavailable` when the endpoints topic cannot be read; a history
        that cannot be read only makes ``/v1/deliveries`` answer 503."""
        registry = EndpointRegistry(self.config, on_change=self._on_change)
        try:
            registry.start(timeout=timeout)
        except BaseException:
            registry.stop()
            raise
        self._registry = registry
        history = HistoryIndex(self.config, capacity=self.history_capacity)
        try:
            self.history = history.start(timeout=timeout)
        except HistoryError as exc:
            history.stop()
            self.history_error = f"the delivery history cannot be read: {exc}"
            log.warning("delivery history unavailable", extra={"error": str(exc)})
        return self

    def _on_change(self, table: EndpointTable) -> None:
        with self._changed:
            self._changed.notify_all()

    @property
    def table(self) -> EndpointTable:
        if self._registry is None:
            raise EndpointsUnavailable("the API has not loaded the endpoint table (not started)")
        return self._registry.table

    def wait_until(self, visible: Callable[[EndpointTable], bool], timeout: float | None = None) -> bool:
        """Block until ``visible(table)`` holds (True) or ``timeout`` passes (False)."""
        table = self.table
        with self._changed:
            return self._changed.wait_for(lambda: visible(table), self.visible_timeout if timeout is None else timeout)

    def stop(self) -> None:
        self.jobs.join(5)
        if self.history is not None:
            self.history.stop()
        if self._registry is not None:
            self._registry.stop()


# --- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than success, with the JSON error body."""

    def __init__(self, status: int, error: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field


# The library's parameter names, as the API names the same inputs.
_FIELDS = {
    "bot_id": "botId", "event_types": "events", "grace_seconds": "graceSeconds", "endpoint_id": "id",
    "to_endpoint": "toEndpoint", "selector": "id", "event_id": "eventId", "from_offset": "fromOffset",
    "to_offset": "toOffset", "event_type": "eventType", "rate_limit": "rateLimit", "max_in_flight": "maxInFlight",
}


def api_field(name: str | None) -> str | None:
    return None if name is None else _FIELDS.get(name, name)


def _error(status: int, error: str, message: str, field: str | None = None,
           errors: list[dict[str, Any]] | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": error, "message": message, "field": field,
            "errors": errors if errors is not None else ([{"field": field, "message": message}] if field else [])}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _library_error(exc: Exception) -> ApiError:
    """The API's answer to an error of the library functions."""
    if isinstance(exc, EndpointNotFound):
        if exc.field == "endpoint_id":
            return ApiError(404, "not_found", exc.message, field="id")
        return ApiError(422, "invalid", exc.message, field=api_field(exc.field))
    if isinstance(exc, EndpointsUnavailable):
        return ApiError(503, "unavailable", exc.message)
    if isinstance(exc, DeadLetterNotFound):
        return ApiError(404, "not_found", exc.message, field="id")
    if isinstance(exc, EndpointError | DlqError | HistoryError):
        if exc.field is None:  # no input at fault: a topic missing, unreadable
            return ApiError(503, "unavailable", exc.message)
        return ApiError(422, "invalid", exc.message, field=api_field(exc.field))
    raise exc


async def _blocking(work: Callable[[], T]) -> T:
    """Run blocking library work on a thread; its errors become the API's answers."""
    try:
        return await run_in_threadpool(work)
    except (EndpointError, DlqError, HistoryError) as exc:
        raise _library_error(exc) from None


def _location(loc: tuple[int | str, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for problem in exc.errors():
        field = _location(tuple(problem.get("loc", ())))
        if problem.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {problem.get('ctx', {}).get('error', 'parse error')}"
            field = None
        elif problem.get("type") == "missing" and field is None:
            message = "a JSON body is required (content-type: application/json)"
        elif field is None and tuple(problem.get("loc", ())) == ("body",):
            message = "the body must be a JSON object, sent as content-type: application/json"
        else:
            message = f"{field or 'input'}: {problem.get('msg', 'invalid')}"
        errors.append({"field": field, "message": message})
    first = errors[0] if errors else {"field": None, "message": "invalid request"}
    return _error(422, "invalid", str(first["message"]), first["field"], errors)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.error, exc.message, exc.field, headers=headers)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8, say)
        return _error(422, "invalid", f"the body is not valid JSON: {exc.detail}")
    names = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(exc.status_code, names.get(exc.status_code, "error"),
                  message.get(exc.status_code, str(exc.detail)), headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed inside the API", exc_info=exc, extra={"path": request.url.path})
    return _error(500, "internal", "the API failed on this request; see its log")


# --- routes ------------------------------------------------------------------------------------


def get_service(request: Request) -> ApiService:
    service: ApiService = request.app.state.service
    return service


_bearer = HTTPBearer(auto_error=False, description=f"One of the tokens of {TOKENS_ENV}.")


def require_token(
    service: Annotated[ApiService, Depends(get_service)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing bearer token: send Authorization: Bearer <token> "
                       f"with a token of {TOKENS_ENV}")
    if not service.tokens.accepts(credentials.credentials):
        raise ApiError(401, "unauthorized", f"the bearer token is not one of {TOKENS_ENV}")


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


def _cursor_key(endpoint: Endpoint) -> str:
    return f"{endpoint.bot_id.lower()}|{endpoint.created_at:020d}|{endpoint.id}"


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError(422, "invalid", f"cursor {cursor!r} is not a cursor returned by this API",
                       field="cursor") from None
    if text.count("|") < 2:
        raise ApiError(422, "invalid", f"cursor {cursor!r} is not a cursor returned by this API", field="cursor")
    return text


@v1.get("/endpoints", response_model=EndpointList, tags=["endpoints"])
async def list_endpoints_route(
    service: Service,
    bot_id: Annotated[str | None, Query(alias="botId", description="Only this bot's endpoints (any case).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page.")] = None,
) -> dict[str, Any]:
    """Registered endpoints, by bot then oldest first; secrets masked."""
    after = _decode_cursor(cursor) if cursor is not None else None
    rows = await _blocking(lambda: list_endpoints(service.config, bot_id=bot_id, table=service.table))
    if after is not None:
        rows = [e for e in rows if _cursor_key(e) > after]
    page = rows[:limit]
    more = len(rows) > limit
    return {"data": [endpoint_json(e) for e in page],
            "nextCursor": _encode(_cursor_key(page[-1])) if more else None}


def _saved(written: Endpoint) -> Callable[[EndpointTable], bool]:
    def visible(table: EndpointTable) -> bool:
        current = table.get(written.id)
        return current is not None and current.updated_at >= written.updated_at
    return visible


def _not_visible(endpoint_id: str, seconds: float) -> ApiError:
    return ApiError(504, "not_visible_yet",
                    f"endpoint {endpoint_id} was saved, but this API's table did not show it within {seconds:g} s; "
                    "GET it again shortly", field=None)


async def _write(service: ApiService, write: Callable[[], T], written: Callable[[T], Endpoint],
                 *, removed: bool = False) -> T:
    """``write``, then wait until the table shows it (read your writes)."""
    def work() -> T:
        result = write()
        endpoint = written(result)
        visible = (lambda table: table.get(endpoint.id) is None) if removed else _saved(endpoint)
        if not service.wait_until(visible):
            raise NotVisible(endpoint.id)
        return result
    try:
        return await _blocking(work)
    except NotVisible as exc:
        raise _not_visible(str(exc), service.visible_timeout) from None


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
    endpoint = await _blocking(lambda: get_endpoint(service.config, endpoint_id, table=service.table))
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
    try:
        types = validate_event_types(request.events or ())
    except EndpointError as exc:
        raise _library_error(exc) from None
    endpoint = await _blocking(lambda: get_endpoint(service.config, endpoint_id, table=service.table))
    report = await send_tests(service.config, endpoint, event_types=types or None, malformed=request.malformed)
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
    history = service.history
    if history is None:
        raise ApiError(503, "unavailable", service.history_error or "the delivery history is not loaded")
    try:
        filters = HistoryFilters(
            event_id=event_id, endpoint_id=endpoint_id, bot_id=bot_id, status=status,
            since=parse_moment(since, field="since") if since is not None else None,
            until=parse_moment(until, field="until") if until is not None else None)
    except (HistoryError, DlqError) as exc:
        raise _library_error(exc) from None
    # A query may scan the whole index (tens of ms): off the event loop.
    page = await _blocking(lambda: history.query(filters, limit=limit, cursor=cursor))
    return page.to_json()


def _dlq_filters(*, event_type: str | None, bot_id: str | None, endpoint_id: str | None, reason: str | None,
                 status: str | None, since: str | None, until: str | None, partition: int | None,
                 from_offset: int | None, to_offset: int | None, limit: int | None) -> Filters:
    try:
        return Filters(
            event_type=event_type, bot_id=bot_id, endpoint_id=endpoint_id, reason=reason, status=status,
            since=parse_moment(since, field="since") if since is not None else None,
            until=parse_moment(until, field="until") if until is not None else None,
            partition=partition, from_offset=from_offset, to_offset=to_offset, limit=limit)
    except (DlqError, HistoryError) as exc:
        raise _library_error(exc) from None


def _partitions(config: Config, topic: str) -> int:
    """How many partitions ``topic`` has; :class:`DlqError` if it does not exist."""
    from confluent_kafka.admin import AdminClient

    try:
        metadata = AdminClient(config.kafka_common()).list_topics(topic, timeout=10).topics.get(topic)
    except Exception as exc:  # librdkafka's KafkaException: no broker answered
        raise DlqError(f"no Kafka broker answered at {config.bootstrap_servers}: {exc}") from None
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise DlqError(f"topic {topic} does not exist on {config.bootstrap_servers}; run `gateway topics create`")
    return len(metadata.partitions)


async def _check_partition(service: ApiService, partition: int | None) -> None:
    """A partition the dead-letter topic does not have is bad input (422), not a topic
    that cannot be read (which is what the reader would say)."""
    if partition is None:
        return
    topic = Topics.from_config(service.config).dlq
    count = await _blocking(lambda: _partitions(service.config, topic))
    if partition >= count:
        raise ApiError(422, "invalid", f"partition {partition}: {topic} has {count} partitions (0-{count - 1})",
                       field="partition")


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


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return row | {"id": f"{row['partition']}:{row['offset']}",
                  "lastOutcome": None if row["lastOutcome"] is None else str(row["lastOutcome"])}


@v1.get("/dead-letters", response_model=DeadLetterList, tags=["dead letters"])
async def list_dead_letters(
    service: Service, query: Annotated[DlqQuery, Depends()],
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
) -> dict[str, Any]:
    """The dead letters the filters select, as `gateway dlq list` shows them. Reads the
    dead-letter topic to its end."""
    filters = _dlq_filters(**query.values, limit=limit + 1)
    await _check_partition(service, filters.partition)
    rows = await _blocking(lambda: [e.summary() for e in read_dead_letters(service.config, filters)])
    return {"data": [_summary(r) for r in rows[:limit]], "truncated": len(rows) > limit}


@v1.get("/dead-letters/stats", response_model=DeadLetterStats, tags=["dead letters"])
async def dead_letter_stats(service: Service, query: Annotated[DlqQuery, Depends()]) -> dict[str, Any]:
    """Counts of the selected dead letters by reason, event type, endpoint and hour."""
    filters = _dlq_filters(**query.values, limit=None)
    await _check_partition(service, filters.partition)
    counts = await _blocking(lambda: stats(read_dead_letters(service.config, filters)))
    return {"total": sum(counts["reason"].values())} | {k: dict(v) for k, v in counts.items()}


@v1.get("/dead-letters/{id}", response_model=list[DeadLetterOut], tags=["dead letters"], responses=_NOT_FOUND)
async def get_dead_letter(
    service: Service,
    selector: Annotated[str, Path(alias="id", description="An event id (every dead letter of that event) or "
                                  "PARTITION:OFFSET.")],
) -> list[dict[str, Any]]:
    """The whole record with its attempt log, as `gateway dlq show`."""
    try:
        selected = parse_selector(selector)
    except DlqError as exc:
        raise _library_error(exc) from None
    await _check_partition(service, selected.partition)
    entries = await _blocking(lambda: find_dead_letters(service.config, selector))
    return [_summary(entry.full()) for entry in entries]


@v1.post("/dead-letters/replay", response_model=ReplayJobOut, status_code=202, tags=["dead letters"],
         responses={200: {"model": ReplayJobOut, "description": "A dry run: the plan, nothing sent."},
                    409: {"model": ErrorBody, "description": "Another replay is running."}})
async def replay_dead_letters(service: Service, body: ReplayRequest, response: Response) -> dict[str, Any]:
    """Replay the selected dead letters into the first retry tier, as `gateway dlq
    replay`: planned now, sent by a job whose progress GET /v1/replays/{id} reports."""
    filters = _dlq_filters(event_type=body.event_type, bot_id=body.bot_id, endpoint_id=body.endpoint_id,
                           reason=body.reason, status=body.status, since=body.since, until=body.until,
                           partition=body.partition, from_offset=body.from_offset, to_offset=body.to_offset,
                           limit=body.limit)
    try:
        rate = parse_rate(body.rate) if body.rate is not None else None
    except DlqError as exc:
        raise _library_error(exc) from None
    await _check_partition(service, filters.partition)
    plan = await _blocking(lambda: plan_replay(service.config, filters, again=body.again,
                                               to_endpoint=body.to_endpoint, endpoints=service.table))
    try:
        job = service.jobs.start(plan, rate=rate, dry_run=body.dry_run)
    except JobConflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    if body.dry_run:
        response.status_code = 200
    return job.to_json()


@v1.get("/replays/{id}", response_model=ReplayJobOut, tags=["dead letters"], responses=_NOT_FOUND)
async def get_replay(service: Service, job_id: Annotated[str, Path(alias="id")]) -> dict[str, Any]:
    """A replay job: its plan, its progress, and what it did."""
    job = service.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no replay job {job_id!r} in this API process (jobs live in its memory)",
                       field="id")
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
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

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


# --- serving -------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; OSError (address in use, …) at once,
    before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def server(app: FastAPI, sock: socket.socket) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``sock``, logging through the gateway's logging."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off",
                            proxy_headers=False, server_header=False)
    return uvicorn.Server(config)


class ApiThread:
    """The API served on a thread of this process (what `gateway up` runs beside its
    workers): its own event loop; the workers' loop is not shared."""

    def __init__(self, service: ApiService, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self._server = server(create_app(service), sock)
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)

    def _run(self) -> None:
        self._server.run(sockets=[self.sock])

    def start(self) -> ApiThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()
        self.service.stop()
