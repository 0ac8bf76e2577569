"""How the API answers what went wrong: the error tree of :mod:`gateway.errors` mapped to
HTTP statuses in one table (:data:`ANSWERS`), and the JSON error body every error gets.

Routes raise the tree's errors (or let the library's through) and never build an answer
themselves. Bad input gets 422 naming the field the way the API names it (``botId``,
``events``, ``since``), from pydantic or from the library's own checks; unknown ids 404;
Kafka unreachable 503. Never a 500 for what a client sent.
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
    GatewayError,
    InputError,
    Internal,
    NotFound,
    NotVisible,
    Stopping,
    Unauthorized,
    Unavailable,
)

__all__ = ["ANSWERS", "answer", "api_field", "on_gateway_error", "on_http_error", "on_unexpected", "on_validation"]

log = logging.getLogger("gateway.api")

ANSWERS: tuple[tuple[type[GatewayError], int, str], ...] = (
    (InputError, 422, "invalid"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (Unauthorized, 401, "unauthorized"),
    (NotVisible, 504, "not_visible_yet"),
    (Unavailable, 503, "unavailable"),
    (Stopping, 503, "unavailable"),
    (Internal, 500, "internal"),
    (GatewayError, 500, "internal"),
)
"""Each branch of the error tree: its status and its ``error`` name. The first branch an
error belongs to answers (a :class:`~gateway.errors.NotVisible` is Unavailable too)."""

# The library's parameter names, as the API names the same inputs.
_FIELDS = {
    "bot_id": "botId", "event_types": "events", "grace_seconds": "graceSeconds", "endpoint_id": "id",
    "to_endpoint": "toEndpoint", "selector": "id", "event_id": "eventId", "from_offset": "fromOffset",
    "to_offset": "toOffset", "event_type": "eventType", "rate_limit": "rateLimit", "max_in_flight": "maxInFlight",
}


def api_field(name: str | None) -> str | None:
    """A library parameter's name as the API names the same input."""
    return None if name is None else _FIELDS.get(name, name)


def answer(status: int, error: str, message: str, field: str | None = None,
           errors: list[dict[str, Any]] | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON error body (``error``, ``message``, ``field``, ``errors``) with ``status``."""
    body = {"error": error, "message": message, "field": field,
            "errors": errors if errors is not None else ([{"field": field, "message": message}] if field else [])}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    status, name = next((status, name) for branch, status, name in ANSWERS if isinstance(exc, branch))
    if status >= 500 and not isinstance(exc, Unavailable | Stopping):
        log.error("request failed inside the API", exc_info=exc, extra={"path": request.url.path})
    field = api_field(exc.field) if isinstance(exc, InputError | NotFound) else None
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return answer(status, name, exc.message, field, headers=headers)


def _location(loc: tuple[int | str, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    text = str(parts[0])
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


async def on_validation(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's refusals of a request, as the API's 422."""
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
    return answer(422, "invalid", str(first["message"]), first["field"], errors)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own answers (no route, a method not allowed, a body it cannot decode)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8, say)
        return answer(422, "invalid", f"the body is not valid JSON: {exc.detail}")
    names = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return answer(exc.status_code, names.get(exc.status_code, "error"),
                  message.get(exc.status_code, str(exc.detail)), headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed inside the API", exc_info=exc, extra={"path": request.url.path})
    return answer(500, "internal", "the API failed on this request; see its log")
