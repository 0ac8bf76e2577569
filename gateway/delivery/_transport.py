"""The HTTP/1.1 connection every delivery goes through: an httpx transport of our own.

httpx describes the exchange (``httpx.Request``, ``httpx.Response``, its exception
types); this module moves the bytes. A :class:`Connection` holds at most one keep-alive
TCP or TLS connection and carries one request at a time; the sender gives each endpoint
``endpoint_concurrency`` of them (its lanes).

Why not httpx's own transport (httpcore over anyio, parsing with h11): it costs most of
a millisecond of CPU per request, which held a worker near 1,100 deliveries/s. An
asyncio protocol parsing with httptools (llhttp, the C parser of Node.js, which uvicorn
uses too) does the same work several times cheaper, and :meth:`Connection.exchange`
(the request already in bytes, no ``httpx.Request``/``Response`` objects) cheaper still.
``bench/http_clients.py``, one run on the 2-core machine: single-connection httpx
clients 1,698 requests/s; httpx clients over this transport 4,178/s; the sender through
``exchange`` 13,407/s.

What a connection does:

* Connects only to addresses the :class:`~gateway.delivery.DestinationPolicy` checked
  (the name is resolved once, there, as its IDNA A-label), trying them in order, each but
  the last for at most ``address_timeout``; TLS verifies the certificate against the
  hostname.
* Reuses a connection for the next request unless it was idle longer than
  ``keepalive_expiry`` (servers commonly close idle connections after 5 s; a request
  racing that close would fail). A reused connection closed before a single byte of the
  answer came back is retried once on a fresh one, the stale-keep-alive race every
  HTTP client meets; at least once is the contract anyway.
* Reads bodies framed by ``content-length``, chunked, or delimited by the close; skips
  1xx interim answers; takes only the first answer to a request (a second one, or bytes
  after the body, mean the connection is out of step and is not reused); refuses
  response heads over 64 KiB; streams the body, pausing the socket while more than
  256 KiB wait unread. Bodies are passed on as received (a gzip
  body is never inflated).
* Has no deadline of its own: the caller bounds the whole exchange (the sender wraps it
  in ``asyncio.timeout``). Cancelling at any point closes the connection, since its state
  is then unknown.
* No proxies, no HTTP/2, no ``Expect: 100-continue``, no request bodies but bytes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable

import httptools
import httpx

from ._destinations import Address, DestinationPolicy

__all__ = [
    "KEEPALIVE_EXPIRY",
    "MAX_HEAD_BYTES",
    "Answer",
    "Connection",
    "check_header",
    "destination",
    "head",
    "head_of",
]

MAX_HEAD_BYTES = 64 * 1024
KEEPALIVE_EXPIRY = 4.0
"""Seconds a connection may stay idle: servers commonly close theirs after 5 s, and a
request racing that close would fail."""
_HIGH_WATER = 256 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN = (b"\r", b"\n", b"\0")


class _Wire(asyncio.Protocol):
    """One TCP (or TLS) connection and the state of the response being read from it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reading_paused = False
        self.begin()
        self.active = False

    def begin(self) -> None:
        """Forget the last response: a request is about to be written."""
        self.active = True
        self.failure: httpx.TransportError | None = None
        self.answered = False  # any byte of the answer received
        self.head_bytes = 0
        self.head_size = 0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.has_length = False
        self.coding: bytes | None = None  # the last transfer-encoding header, if any
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0

    def resume(self) -> None:
        """Read from the socket again if reading was paused (a body left unread must not
        keep a reused connection deaf)."""
        if self.reading_paused and self.transport is not None:
            self.transport.resume_reading()
        self.reading_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self.fail(httpx.RemoteProtocolError("the server sent data while no request was outstanding"))
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # After a complete answer (an upgrade, bytes beyond the body): the answer
            # stands, the connection is not reused.
            self.fail(None if self.complete else httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))
            return
        if not self.head_done:
            # Counted as bytes arrive (the parser buffers an unfinished header) and per
            # header (a whole head can come in one read).
            self.head_bytes += len(data)
            if max(self.head_bytes, self.head_size) > MAX_HEAD_BYTES:
                self.fail(httpx.RemoteProtocolError(f"response head larger than {MAX_HEAD_BYTES} bytes"))
                return
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self.wake()

    def eof_received(self) -> bool:
        if self.head_done and not self.framed and not self.complete:
            self.complete = True  # a body delimited by the close
        self.keep_alive = False
        self.closed = True
        self.wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self.wake()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request (a confused or hostile server): the first
            # answer stands. Raising stops the parser before this one touches the status
            # or headers; the connection is not reused.
            raise httpx.RemoteProtocolError("a second response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        lowered = name.lower()
        if lowered == b"content-length":
            self.has_length = True
        elif lowered == b"transfer-encoding":
            self.coding = value

    @property
    def framed(self) -> bool:
        """Whether the body has an end of its own, so the close does not end it. A
        transfer coding overrides a length, and only a last coding of chunked frames
        the body: after identity or gzip it runs to the close (RFC 9112, 6.3)."""
        if self.coding is not None:
            return self.coding.rstrip().lower().endswith(b"chunked")
        return self.has_length

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.head_size > MAX_HEAD_BYTES:
            return  # refused once feed_data returns
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim answer: the final one follows
            self.has_length = False
            self.coding = None
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # -- used by Connection -----------------------------------------------------------------

    def fail(self, failure: httpx.TransportError | None) -> None:
        if failure is not None and self.failure is None:
            self.failure = failure
        self.close()

    def close(self) -> None:
        self.closed = True
        self.keep_alive = False
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # close() would wait to send the rest, maybe forever
            else:
                self.transport.close()
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def broken(self, what: str) -> httpx.TransportError:
        """Why no more of the answer will come."""
        return self.failure or httpx.RemoteProtocolError(f"the server closed the connection {what}")

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.reading_paused and self.buffered <= _HIGH_WATER // 2:
            self.resume()
        return chunk


class Answer:
    """A response's status and head, its body still to read: read it (or not), then close."""

    __slots__ = ("_connection", "_wire", "headers", "status")

    def __init__(self, connection: Connection, wire: _Wire) -> None:
        self.status = wire.status
        self.headers = wire.headers
        """As received: (name, value) bytes, names in the server's case."""
        self._connection: Connection | None = connection
        self._wire = wire

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), decoded as Latin-1."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        wire = self._wire
        while True:
            if wire.chunks:
                yield wire.take()
            elif wire.complete:
                return
            elif wire.closed:
                raise wire.broken("before the response body was complete")
            else:
                await wire.wait()

    async def read(self, limit: int) -> bytes:
        """The body, or its first ``limit`` bytes: the rest is never read (closing a
        connection whose body was not read to the end drops it)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection._release(self._wire)


class _Body(httpx.AsyncByteStream):
    def __init__(self, answer: Answer) -> None:
        self._answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._answer.chunks():
            yield chunk

    async def aclose(self) -> None:
        self._answer.close()


class Connection(httpx.AsyncBaseTransport):
    """One HTTP/1.1 connection, made when first needed, one request at a time.

    Two ways in: as an httpx transport (``handle_async_request``, the response's stream
    read or not, then closed), or, as the sender does, :meth:`exchange` with the request
    already in bytes, which skips building ``httpx.Request`` and ``httpx.Response``
    objects (a fifth of a worker's CPU, measured). Either way the response must be
    closed before the next request. Raises ``httpx`` transport errors
    (:class:`httpx.ConnectError` and the rest) and
    :class:`~gateway.errors.BlockedDestination`.
    """

    def __init__(
        self, policy: DestinationPolicy, ssl_context: ssl.SSLContext, *, keepalive_expiry: float = KEEPALIVE_EXPIRY,
        address_timeout: float = 2.0,
    ) -> None:
        self.policy = policy
        self.ssl_context = ssl_context
        self.keepalive_expiry = keepalive_expiry
        self.address_timeout = address_timeout
        self._wire: _Wire | None = None
        self._busy = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answer = await self.exchange(request.url, head(request) + await request.aread())
        return httpx.Response(
            answer.status, headers=answer.headers, stream=_Body(answer),
            extensions={"http_version": b"HTTP/1.1"}, request=request,
        )

    async def connect(self, url: httpx.URL) -> None:
        """Connect to ``url``'s server now unless a connection to reuse is open: the next
        :meth:`exchange` then writes at once."""
        if self._busy:
            raise RuntimeError("one request at a time per Connection: close the last response first")
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        try:
            await self._wire_for(url, fresh=False)
        except BaseException:
            self._drop()
            raise

    async def exchange(self, url: httpx.URL, request: bytes) -> Answer:
        """Write ``request`` (head and body, as bytes) to ``url``'s server; the answer
        once its head has arrived."""
        if self._busy:
            raise RuntimeError("one request at a time per Connection: close the last response first")
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        self._busy = True
        try:
            for fresh_retry in (False, True):
                wire, reused = await self._wire_for(url, fresh=fresh_retry)
                wire.begin()
                assert wire.transport is not None
                wire.transport.write(request)
                while not wire.head_done:
                    if wire.closed:
                        break
                    await wire.wait()
                if wire.head_done:
                    return Answer(self, wire)
                self._drop()
                if not (reused and not wire.answered and wire.failure is None):
                    raise wire.broken("without a response")
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._drop()  # cancelled or failed half-way: the connection's state is unknown
            self._busy = False
            raise

    async def _wire_for(self, url: httpx.URL, *, fresh: bool) -> tuple[_Wire, bool]:
        wire = self._wire
        if wire is not None and not fresh and self._reusable(wire):
            return wire, True
        self._drop()
        self._wire = await self._connect(url)
        return self._wire, False

    async def _connect(self, url: httpx.URL) -> _Wire:
        host, port = destination(url)
        addresses = await self.policy.addresses(host, port)  # raises BlockedDestination
        tls = self.ssl_context if url.scheme == "https" else None
        errors: list[str] = []
        for i, address in enumerate(addresses):
            last = i == len(addresses) - 1
            try:
                sock = await self._tcp(address, port, None if last else self.address_timeout)
                _, wire = await asyncio.get_running_loop().create_connection(
                    _Wire, sock=sock, ssl=tls, server_hostname=host if tls else None)
            except ssl.SSLError as exc:
                raise httpx.ConnectError(f"TLS with {host}: {exc}") from exc
            except OSError as exc:
                errors.append(f"{address}: {exc.strerror or exc}")
                continue
            except (OverflowError, ValueError) as exc:  # e.g. a port over 65535
                raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
            return wire
        raise httpx.ConnectError(f"cannot connect to {host}:{port} ({'; '.join(errors)})")

    @staticmethod
    async def _tcp(address: Address, port: int, bound: float | None) -> socket.socket:
        """A TCP connection to ``address``, within ``bound`` seconds if given. Only the
        TCP handshake is bounded: a listed address that drops packets (often a broken
        IPv6 one, listed first) must not use up the deadline while a working one waits,
        but a slow TLS handshake on a working address is no reason to leave it."""
        sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(bound):
                await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError) and exc.errno is None:  # the bound, not the kernel's ETIMEDOUT
                raise OSError(f"no answer within {bound:g} s") from None
            raise
        return sock

    def _reusable(self, wire: _Wire) -> bool:
        return not wire.closed and asyncio.get_running_loop().time() - wire.idle_since < self.keepalive_expiry

    def close_if_idle(self) -> bool:
        """Close the connection if no request uses it and it has been idle for
        ``keepalive_expiry``; True when nothing is left open."""
        wire = self._wire
        if wire is not None and not self._busy and not self._reusable(wire):
            self._drop()
        return self._wire is None

    def _release(self, wire: _Wire) -> None:
        """The response is closed: keep the connection for the next request if we can."""
        self._busy = False
        wire.active = False
        if wire is not self._wire:
            return
        if (wire.complete and wire.keep_alive and not wire.closed and wire.transport is not None
                and not wire.transport.get_write_buffer_size()):
            # (A server may answer before it read the whole request: bytes of it still
            # unsent would reach the server as the start of the next request.)
            wire.idle_since = asyncio.get_running_loop().time()
            wire.resume()  # reading while idle: bytes the server sends now are refused
        else:
            self._drop()

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

    async def aclose(self) -> None:
        """Close the connection and wait (briefly) until it is closed: a TLS connection
        says goodbye (close_notify) before its socket closes."""
        wire, self._wire = self._wire, None
        if wire is None or wire.transport is None:
            return
        wire.close()
        try:
            await asyncio.wait_for(asyncio.shield(wire.lost), 1.0)
        except TimeoutError:
            wire.transport.abort()


def destination(url: httpx.URL) -> tuple[str, int]:
    """The host and port ``url`` connects to. The host is the IDNA A-label ("xn--..."),
    as it goes on the wire: ``url.host`` decodes it, and Python's socket and ssl modules
    would encode it again with IDNA 2003, which maps some names to another domain
    ("faß.de" to "fass.de")."""
    return url.raw_host.decode("ascii"), url.port or _DEFAULT_PORTS[url.scheme]


def head(request: httpx.Request) -> bytes:
    """The request line and headers of ``request`` (httpx has set ``host`` and
    ``content-length``)."""
    return head_of(request.method, request.url, request.headers.raw)


def head_of(method: str, url: httpx.URL, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``METHOD target HTTP/1.1``, then ``headers``, which must include ``host`` and
    ``content-length``; refuses a name or value that would split the request."""
    parts = [method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        check_header(name, value)
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def check_header(name: bytes, value: bytes) -> None:
    for forbidden in _FORBIDDEN:
        if forbidden in name or forbidden in value:
            raise httpx.LocalProtocolError(f"invalid character in header {name!r}")
