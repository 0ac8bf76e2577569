"""How the API answers what went wrong: one format, ``application/problem+json`` (RFC 9457),
and the error tree of :mod:`gateway.errors` mapped to HTTP statuses in one table
(:data:`ANSWERS`).

Every error answer is::

    {"type": "urn:webhook-gateway:problem:invalid", "title": "Invalid input", "status": 422,
     "detail": "bot id 'x' is not a UUID", "instance": "/v1/endpoints",
     "code": "invalid", "errors": [{"field": "botId", "pointer": "/botId", "in": "body",
                                    "detail": "bot id 'x' is not a UUID"}]}

``type`` is a URN per kind of problem (:data:`PROBLEMS`; not a web page), ``code`` its
last part, ``errors`` every input at fault, named as the API names it (``botId``,
``events[0]``, ``since``) with a JSON pointer for body fields. Some answers add members:
``endpointId`` on a create that was saved but is not visible yet, ``retryAfter`` with a
``Retry-After`` header on 429.

Routes raise the tree's errors (or let the library's through) and never build an answer
themselves. The statuses: 400 a body that is not JSON (or not UTF-8), 401 no valid
token, 403 out of the token's scope, 404 no such id, 408 a body sent too slowly, 409 the
state forbids it (a replay runs, an idempotency key in use), 412 a stale ``If-Match``,
413 a body over the limit, 415 a body that is not JSON by its content type, 422 a value
refused (by pydantic or the library's own checks), 428 a write without ``If-Match``, 429
too many requests of one caller at once, 431 a request head over the limit, 503 Kafka
unreachable, 504 saved but not yet
visible. Never a 500 for what a client sent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    Conflict,
    Forbidden,
    GatewayError,
    InputError,
    Internal,
    NotFound,
    NotVisible,
    PreconditionFailed,
    PreconditionRequired,
    RateLimited,
    Stopping,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "ANSWERS",
    "PROBLEMS",
    "PROBLEM_TYPE",
    "answer",
    "api_field",
    "field_error",
    "on_gateway_error",
    "on_http_error",
    "on_unexpected",
    "on_validation",
    "problem",
]

log = logging.getLogger("gateway.api")

PROBLEM_TYPE = "application/problem+json"

PROBLEMS: dict[str, tuple[int, str]] = {
    "malformed": (400, "Malformed request"),
    "unauthorized": (401, "Unauthorized"),
    "forbidden": (403, "Forbidden"),
    "not_found": (404, "Not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "timeout": (408, "Request timeout"),
    "conflict": (409, "Conflict"),
    "precondition_failed": (412, "Precondition failed"),
    "too_large": (413, "Content too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "invalid": (422, "Invalid input"),
    "precondition_required": (428, "Precondition required"),
    "too_many_requests": (429, "Too many requests"),
    "headers_too_large": (431, "Request header fields too large"),
    "internal": (500, "Internal error"),
    "unavailable": (503, "Service unavailable"),
    "not_visible_yet": (504, "Saved, not visible yet"),
}
"""Each kind of problem by its code: its status and title. Its ``type`` is
``urn:webhook-gateway:problem:<code>``."""

ANSWERS: tuple[tuple[type[GatewayError], str], ...] = (
    (PreconditionRequired, "precondition_required"),
    (InputError, "invalid"),
    (NotFound, "not_found"),
    (PreconditionFailed, "precondition_failed"),
    (RateLimited, "too_many_requests"),
    (Conflict, "conflict"),
    (Unauthorized, "unauthorized"),
    (Forbidden, "forbidden"),
    (NotVisible, "not_visible_yet"),
    (Unavailable, "unavailable"),
    (Stopping, "unavailable"),
    (Internal, "internal"),
    (GatewayError, "internal"),
)
"""Each branch of the error tree and the problem it is. The first branch an error
belongs to answers (a :class:`~gateway.errors.NotVisible` is Unavailable too)."""

# The library's parameter names, as the API names the same inputs.
_FIELDS = {
    "bot_id": "botId", "event_types": "events", "grace_seconds": "graceSeconds", "endpoint_id": "id",
    "to_endpoint": "toEndpoint", "selector": "id", "event_id": "eventId", "from_offset": "fromOffset",
    "to_offset": "toOffset", "event_type": "eventType", "rate_limit": "rateLimit", "max_in_flight": "maxInFlight",
    "ttl_seconds": "ttlSeconds",
}


def api_field(name: str | None) -> str | None:
    """A library parameter's name as the API names the same input."""
    return None if name is None else _FIELDS.get(name, name)


def field_error(field: str | None, detail: str, *, where: str | None = None,
                pointer: str | None = None) -> dict[str, Any]:
    """One entry of a problem's ``errors``."""
    return {"field": field, "pointer": pointer, "in": where, "detail": detail}


def problem(code: str, detail: str, *, instance: str | None = None, errors: list[dict[str, Any]] | None = None,
            **members: Any) -> dict[str, Any]:
    """The body of a problem of kind ``code`` (one of :data:`PROBLEMS`)."""
    status, title = PROBLEMS[code]
    return {"type": f"urn:webhook-gateway:problem:{code}", "title": title, "status": status, "detail": detail,
            "instance": instance, "code": code, "errors": errors or []} | members


def answer(code: str, detail: str, *, instance: str | None = None, errors: list[dict[str, Any]] | None = None,
           headers: Mapping[str, str] | None = None, **members: Any) -> JSONResponse:
    """A problem answer: its body, its status, ``application/problem+json``."""
    body = problem(code, detail, instance=instance, errors=errors, **members)
    return JSONResponse(body, status_code=body["status"], headers=dict(headers or {}), media_type=PROBLEM_TYPE)


def _where(request: Request) -> str:
    return request.url.path


async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    code = next(name for branch, name in ANSWERS if isinstance(exc, branch))
    status = PROBLEMS[code][0]
    if status >= 500 and not isinstance(exc, Unavailable | Stopping):
        log.error("request failed inside the API", exc_info=exc, extra={"path": request.url.path})
    field = api_field(exc.field) if isinstance(exc, InputError | NotFound) else None
    headers: dict[str, str] = {}
    members: dict[str, Any] = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if isinstance(exc, RateLimited):
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
        members["retryAfter"] = max(1, round(exc.retry_after))
    endpoint_id = getattr(exc, "endpoint_id", None)
    if isinstance(exc, NotVisible) and isinstance(endpoint_id, str):
        members["endpointId"] = endpoint_id
        headers["location"] = f"/v1/endpoints/{endpoint_id}"
    errors = [field_error(field, exc.message)] if field else []
    return answer(code, exc.message, instance=_where(request), errors=errors, headers=headers, **members)


def _location(loc: tuple[int | str, ...]) -> tuple[str | None, str | None, str | None]:
    """(field as the API names it, JSON pointer, where) of a pydantic error location."""
    where = str(loc[0]) if loc and loc[0] in ("body", "query", "path", "header") else None
    parts = list(loc[1:] if where else loc)
    if not parts:
        return None, ("" if where == "body" else None), where
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    pointer = "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts) if where == "body" else None
    return text, pointer, where


async def on_validation(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's refusals of a request: 400 for a body that is not JSON, else 422."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for found in exc.errors():
        loc = tuple(found.get("loc", ()))
        if found.get("type") == "json_invalid":
            detail = f"the body is not valid JSON: {found.get('ctx', {}).get('error', 'parse error')}"
            return answer("malformed", detail, instance=_where(request), errors=[field_error(None, detail,
                                                                                                where="body")])
        field, pointer, where = _location(loc)
        if found.get("type") == "missing" and field is None:
            detail = "a JSON body is required (content-type: application/json)"
        elif field is None and where == "body":
            detail = "the body must be a JSON object, sent as content-type: application/json"
        else:
            detail = f"{field or 'input'}: {found.get('msg', 'invalid')}"
        errors.append(field_error(field, detail, where=where, pointer=pointer))
    first = errors[0]["detail"] if errors else "invalid request"
    return answer("invalid", str(first), instance=_where(request), errors=errors)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own answers (no route, a method not allowed, a body it cannot decode)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8, say)
        return answer("malformed", f"the body is not valid JSON: {exc.detail}", instance=_where(request))
    if exc.status_code == 404:
        return answer("not_found", f"no route {request.url.path}", instance=_where(request))
    if exc.status_code == 405:
        return answer("method_not_allowed", f"{request.method} is not allowed on {request.url.path}",
                      instance=_where(request), headers=exc.headers)
    code = next((name for name, (status, _) in PROBLEMS.items() if status == exc.status_code), "internal")
    return answer(code, str(exc.detail), instance=_where(request), headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed inside the API", exc_info=exc, extra={"path": request.url.path})
    return answer("internal", "the API failed on this request; see its log", instance=_where(request))
