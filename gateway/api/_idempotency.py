"""``Idempotency-Key`` on the API's POSTs: a retry of a request gets the first answer.

A client that did not get an answer (a timeout, a dropped connection, a double click)
sends the same request again with the same key. This process remembers, per caller
(:attr:`~gateway.ops.Access.subject`), route and key, the request's fingerprint (its
method, path and JSON body, canonicalized) and the answer it got:

* the same key and the same request: the first answer again, with
  ``Idempotent-Replayed: true``; nothing is done twice;
* the same key with another request: 422, naming ``Idempotency-Key``;
* the same key while the first request is still being answered: 409.

A create whose first answer was 504 ``not_visible_yet`` (saved, not shown by the table
in time) is answered again as it stands now: the endpoint with its id and secret once
the table shows it, the same 504 (with ``endpointId``) until then. Answers of 5xx
otherwise are not kept (nothing was done, a retry does it), nor are 401/403/429.

Keys live in this process's memory for :data:`TTL` seconds (at most :data:`CAPACITY`
of them, the oldest dropped first): a retry must reach the same API process, and a
restart forgets them. Keys are 1 to 255 printable ASCII characters.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import Request, Response

from ..errors import Conflict, GatewayError, InputError
from ..ops import Access
from ._errors import on_gateway_error

__all__ = ["CAPACITY", "HEADER", "TTL", "IdempotencyKeys", "Slot"]

TTL = 24 * 3600.0
"""Seconds a key is remembered."""
CAPACITY = 10_000
"""Keys remembered at most per process."""
HEADER = "Idempotency-Key"

_NOT_KEPT = {401, 403, 429}


@dataclass
class Slot:
    """What a route may leave for a replay of its answer: ``resume``, called on a replay,
    gives the answer as it stands now (or None to answer the kept one again)."""

    resume: Callable[[], Response | None] | None = None


@dataclass
class _Record:
    fingerprint: str
    expires: float
    status: int | None = None
    """None while the first request is being answered."""
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    media_type: str | None = None
    slot: Slot = field(default_factory=Slot)

    def response(self) -> Response:
        assert self.status is not None
        answer = Response(content=self.body, status_code=self.status, media_type=self.media_type)
        for name, value in self.headers:
            answer.headers.append(name, value)
        answer.headers["idempotent-replayed"] = "true"
        return answer


def _fingerprint(request: Request, body: bytes) -> str:
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode() if body else b""
    except ValueError:
        canonical = body
    return hashlib.sha256(b"\n".join((request.method.encode(), request.url.path.encode(), canonical))).hexdigest()


def _check_key(key: str) -> str:
    if not 1 <= len(key) <= 255 or not all(" " <= c <= "~" for c in key):
        raise InputError(f"{HEADER} must be 1 to 255 printable ASCII characters", field=HEADER)
    return key


class IdempotencyKeys:
    """The keys of one API process. Thread-safe; ``clock`` is monotonic seconds."""

    def __init__(self, *, ttl: float = TTL, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[tuple[str, str, str, str], _Record] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def _purge(self, now: float) -> None:
        while self._records:
            oldest = next(iter(self._records.values()))
            if oldest.expires > now and len(self._records) <= self.capacity:
                break
            self._records.popitem(last=False)

    async def answer(self, request: Request, access: Access, key: str | None,
                     run: Callable[[Slot], Awaitable[Response]]) -> Response:
        """``run``'s answer, or with ``key`` the first answer to this request."""
        if key is None:
            return await run(Slot())
        slot_key = (access.subject, request.method, request.url.path, _check_key(key))
        fingerprint = _fingerprint(request, await request.body())
        now = self._clock()
        with self._lock:
            self._purge(now)
            record = self._records.get(slot_key)
            if record is None:
                record = self._records[slot_key] = _Record(fingerprint, now + self.ttl)
                first = True
            else:
                first = False
        if not first:
            if record.fingerprint != fingerprint:
                raise InputError(f"{HEADER} {key!r} was used with another request (another body or route); "
                                 "use a new key for a new request", field=HEADER)
            if record.status is None:
                raise Conflict(f"a request with {HEADER} {key!r} is still being answered; retry shortly")
            if record.slot.resume is not None:
                now_answer = record.slot.resume()
                if now_answer is not None:
                    self._keep(slot_key, record, now_answer, Slot())
            return record.response()
        try:
            try:
                response = await run(record.slot)
            except GatewayError as exc:
                response = await on_gateway_error(request, exc)
        except BaseException:
            with self._lock:
                self._records.pop(slot_key, None)
            raise
        if (response.status_code >= 500 and record.slot.resume is None) or response.status_code in _NOT_KEPT:
            with self._lock:
                self._records.pop(slot_key, None)
        else:
            self._keep(slot_key, record, response, record.slot)
        return response

    def _keep(self, slot_key: tuple[str, str, str, str], record: _Record, response: Response, slot: Slot) -> None:
        with self._lock:
            record.status = response.status_code
            record.body = bytes(response.body)
            record.media_type = response.media_type
            record.headers = [(k, v) for k, v in response.headers.items()
                              if k.lower() not in ("content-length", "content-type")]
            record.slot = slot
            self._records[slot_key] = record
