"""What every request must pass before a route reads it: an ASGI middleware, in this order.

1. **Size** (431, 413): a head (path, query and headers) over
   ``GATEWAY_API_MAX_HEADER_BYTES`` is a 431 (h11 bounds what it buffers of a head that
   comes in pieces, but not one that arrives whole); a ``Content-Length`` over
   ``GATEWAY_API_MAX_BODY_BYTES`` is a 413, before anything else, the token included: a
   5 MB body with no token costs nothing but its head. A body without a length (chunked)
   is counted as it is read, and refused as soon as it passes the limit. A
   ``Content-Length`` that is not a number is a 400.
2. **Token** (401): every path but ``/healthz``, ``/readyz`` and ``/metrics`` (which
   Prometheus scrapes without one: ``_metrics``) needs a bearer token
   (:func:`~gateway.api.authenticate`); the caller's :class:`~gateway.ops.Access` is kept in
   the request for the route. So a request with no token is a 401 whatever its body
   (malformed JSON included), and its body is never read.
3. **Media type** (415): a body must be JSON: ``application/json`` or
   ``application/<anything>+json`` (``application/merge-patch+json`` for a PATCH).
4. **One caller's share** (429): at most :data:`CALLER_CONCURRENCY` requests of one caller
   (one token, or one bot's minted tokens) at once; beyond, 429 with ``Retry-After``.
   uvicorn's own cap (``GATEWAY_API_CONCURRENCY``) bounds everyone together.
5. **Slow bodies** (408): the body must arrive within ``GATEWAY_API_HEADER_TIMEOUT``
   seconds of the route starting to read it. (A slow request head is the server's to cut:
   ``gateway.api._server``.)

Every refusal is ``application/problem+json``, as every other error (``_errors``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import GatewayError
from ._auth import authenticate
from ._errors import answer, on_gateway_error
from ._metrics import METRICS_PATH
from ._service import ApiService

__all__ = ["CALLER_CONCURRENCY", "OPEN_PATHS", "BodyTimeout", "BodyTooLarge", "RequestGuard"]

OPEN_PATHS = frozenset({"/healthz", "/readyz", METRICS_PATH})
"""Paths served without a token."""
CALLER_CONCURRENCY = 16
"""Requests of one caller in progress at once, at most."""

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyTooLarge(StarletteHTTPException):
    """A streamed body passed the limit while a route read it (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is larger than {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """A body did not arrive in time (answered 408)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the body did not arrive within {seconds:g} s")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


class RequestGuard:
    """The checks above, around the application. ``service`` holds the tokens and limits."""

    def __init__(self, app: ASGIApp, *, service: ApiService) -> None:
        self.app = app
        self.service = service
        self.max_body = service.config.api_max_body_bytes
        self.max_head = service.config.api_max_header_bytes
        self.body_timeout = service.config.api_header_timeout
        self._callers: dict[str, int] = {}
        self._callers_lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def refuse(code: str, detail: str, members: dict[str, Any] | None = None, **headers: str) -> None:
            response = answer(code, detail, instance=path, headers=headers, **(members or {}))
            await response(scope, receive, send)

        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(key) + len(value) + 4 for key, value in scope.get("headers", ()))
        if head > self.max_head:
            await refuse("headers_too_large", f"the request head is {head} bytes; at most {self.max_head} are read "
                         "(GATEWAY_API_MAX_HEADER_BYTES)", connection="close")
            return
        length_text = _header(scope, b"content-length")
        length: int | None = None
        if length_text is not None:
            if not length_text.strip().isdigit():
                await refuse("malformed", f"Content-Length {length_text!r} is not a number of bytes",
                             connection="close")
                return
            length = int(length_text)
            if length > self.max_body:
                await refuse("too_large", f"the body is {length} bytes; at most {self.max_body} are read "
                             "(GATEWAY_API_MAX_BODY_BYTES)", connection="close")
                return
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            access = authenticate(self.service.tokens, _header(scope, b"authorization"))
        except GatewayError as exc:
            await self._error(scope, receive, send, exc)
            return
        scope.setdefault("state", {})["access"] = access
        has_body = chunked or (length is not None and length > 0)
        if has_body and scope.get("method") in _BODY_METHODS:
            content_type = _header(scope, b"content-type")
            if content_type is None or not _is_json(content_type):
                await refuse("unsupported_media_type",
                             f"the body is {content_type or 'of no content type'}; send JSON with content-type: "
                             "application/json" + (" (or application/merge-patch+json)"
                                                   if scope.get("method") == "PATCH" else ""),
                             accept="application/json, application/merge-patch+json")
                return
        with self._callers_lock:
            busy = self._callers.get(access.subject, 0)
            if busy >= CALLER_CONCURRENCY:
                admitted = False
            else:
                admitted = True
                self._callers[access.subject] = busy + 1
        if not admitted:
            await refuse("too_many_requests", f"this caller has {CALLER_CONCURRENCY} requests in progress; wait for "
                         "one to finish", {"retryAfter": 1}, **{"retry-after": "1"})
            return
        try:
            await self.app(scope, self._counting(receive), send)
        finally:
            with self._callers_lock:
                left = self._callers[access.subject] - 1
                if left:
                    self._callers[access.subject] = left
                else:
                    del self._callers[access.subject]

    async def _error(self, scope: Scope, receive: Receive, send: Send, exc: GatewayError) -> None:
        response = await on_gateway_error(Request(scope, receive), exc)
        await response(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        """``receive`` counting the body's bytes (413 past the limit) and bounding the time
        the body takes to arrive (408)."""
        received = 0
        deadline: float | None = None
        complete = False
        loop = asyncio.get_running_loop()

        async def counted() -> Message:
            nonlocal received, deadline, complete
            if complete:  # the body is in: what follows (a disconnect) is not bounded here
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_timeout
            try:
                message: dict[str, Any] = dict(await asyncio.wait_for(receive(), max(0.0, deadline - loop.time())))
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return counted
