"""The sender's HTTP/1.1 transport (gateway/transport.py) against real sockets.

What the hostile-receiver tests do not already pin down: keep-alive reuse and its
limits, the stale-connection retry, the three ways a body is framed, interim answers,
the bytes put on the wire, TLS verification, and that it is a proper httpx transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from typing import Any

import httpx
import pytest
import trustme

from gateway.delivery import MAX_HEAD_BYTES, Connection, DestinationPolicy
from gateway.errors import BlockedDestination

from .raw_server import Conn, Handler, RawServer, respond

pytestmark = pytest.mark.timeout(30)

OPEN = DestinationPolicy(allow_private=True)


def connection(policy: DestinationPolicy = OPEN, context: ssl.SSLContext | None = None,
               **kwargs: Any) -> Connection:
    return Connection(policy, context or ssl.create_default_context(), **kwargs)


async def post(conn: Connection, url: str, body: bytes = b'{"a":1}',
               headers: dict[str, str] | None = None) -> tuple[int, bytes, httpx.Headers]:
    response = await conn.handle_async_request(
        httpx.Request("POST", url, content=body, headers=headers or {}))
    try:
        data = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return response.status_code, data, response.headers


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def several(url: str, n: int = 2, context: ssl.SSLContext | None = None) -> list[tuple[int, bytes]]:
    """``n`` requests one after the other through one Connection: (status, body) each."""
    conn = connection(context=context)
    try:
        return [(await post(conn, url))[:2] for _ in range(n)]
    finally:
        await conn.aclose()


async def once(url: str, policy: DestinationPolicy = OPEN, context: ssl.SSLContext | None = None,
               **kwargs: Any) -> tuple[int, bytes, httpx.Headers]:
    """One request on a new connection, closed after."""
    conn = connection(policy, context)
    try:
        return await post(conn, url, **kwargs)
    finally:
        await conn.aclose()


def raw(answer: bytes, keep: bool = True) -> Handler:
    def handle(conn: Conn, request: bytes) -> bool:
        return conn.send(answer) and keep
    return handle


# --- keep-alive ------------------------------------------------------------------------


def test_requests_reuse_one_connection() -> None:
    with RawServer(respond(204)) as server:
        assert run(several(server.url(), 3)) == [(204, b"")] * 3
        assert len(server.connections) == 1 and len(server.requests) == 3


def test_connection_close_and_http_1_0_are_not_reused() -> None:
    with RawServer(raw(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")) as server:
        assert run(several(server.url())) == [(200, b"ok")] * 2
        assert len(server.connections) == 2
    with RawServer(raw(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")) as server:
        assert run(several(server.url())) == [(200, b"ok")] * 2
        assert len(server.connections) == 2


def test_a_connection_idle_past_the_expiry_is_replaced() -> None:
    async def two(url: str) -> None:
        conn = connection(keepalive_expiry=0.2)
        try:
            await post(conn, url)
            await asyncio.sleep(0.3)
            await post(conn, url)
        finally:
            await conn.aclose()

    with RawServer(respond(204)) as server:
        run(two(server.url()))
        assert len(server.connections) == 2


def test_a_keep_alive_connection_the_server_dropped_is_retried_once_on_a_new_one() -> None:
    """The stale keep-alive race: the server closed the idle connection without saying
    so (no ``connection: close``), and the next request finds it dead."""
    answered: list[int] = []

    def answer_then_drop(conn: Conn, request: bytes) -> bool:
        answered.append(1)
        conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        return False  # hang up without saying so

    async def two(url: str) -> list[int]:
        conn = connection()
        try:
            first = (await post(conn, url))[0]
            await asyncio.sleep(0.01)  # the FIN has not always arrived when the next request goes
            return [first, (await post(conn, url))[0]]
        finally:
            await conn.aclose()

    with RawServer(answer_then_drop) as server:
        assert run(two(server.url())) == [204, 204]
        assert len(answered) == 2


def test_a_fresh_connection_that_hangs_up_is_not_retried() -> None:
    with RawServer(raw(b"", keep=False)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without a response"):
            run(once(server.url()))
        assert len(server.requests) == 1


# --- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "body"), [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n", b"hello"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nx: y\r\n\r\n"
     b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", b"ok"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
], ids=["content-length", "chunked", "interim-answers", "no-content"])
def test_bodies_are_read_whole_and_the_connection_reused(answer: bytes, body: bytes) -> None:
    status = int(answer.rsplit(b"HTTP/1.1 ", 1)[1][:3])
    with RawServer(raw(answer)) as server:
        assert run(several(server.url())) == [(status, body)] * 2
        assert len(server.connections) == 1


def test_a_body_delimited_by_the_close_is_read_to_the_close() -> None:
    with RawServer(raw(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", keep=False)) as server:
        status, body, _ = run(once(server.url()))
    assert (status, body) == (200, b"until the end")


def test_a_body_cut_short_is_an_error_after_what_arrived() -> None:
    async def read(url: str) -> list[bytes]:
        conn = connection()
        response = await conn.handle_async_request(httpx.Request("POST", url, content=b"{}"))
        got: list[bytes] = []
        with pytest.raises(httpx.RemoteProtocolError, match="before the response body was complete"):
            async for chunk in response.aiter_raw():
                got.append(chunk)
        await conn.aclose()
        return got

    with RawServer(raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", keep=False)) as server:
        assert b"".join(run(read(server.url()))) == b"short"


def test_a_head_over_the_limit_is_refused() -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"x-a: " + b"a" * MAX_HEAD_BYTES + b"\r\ncontent-length: 0\r\n\r\n"
    with RawServer(raw(huge, keep=False)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="head larger than"):
            run(once(server.url()))


def test_a_head_just_under_the_limit_is_fine() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"x-a: " + b"a" * (MAX_HEAD_BYTES - 100) + b"\r\ncontent-length: 0\r\n\r\n"
    with RawServer(raw(head)) as server:
        status, _, headers = run(once(server.url()))
    assert status == 200 and len(headers["x-a"]) == MAX_HEAD_BYTES - 100


# --- the request on the wire ---------------------------------------------------------------


def test_the_request_on_the_wire() -> None:
    with RawServer(respond(204)) as server:
        run(once(server.url("/hooks/in?token=abc%20d"), body=b'{"event":"MESSAGE"}',
                 headers={"webhook-id": "msg_1", "content-type": "application/json"}))
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /hooks/in?token=abc%20d HTTP/1.1"
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert fields[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert fields[b"content-length"] == b"19" and body == b'{"event":"MESSAGE"}'
    assert fields[b"webhook-id"] == b"msg_1"
    assert b"accept-encoding" not in fields  # compressed answers are never asked for


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b"])
def test_a_header_that_would_split_the_request_is_refused(value: str) -> None:
    with RawServer(respond(204)) as server:
        with pytest.raises(httpx.LocalProtocolError):
            run(once(server.url(), headers={"webhook-id": value}))
        assert server.requests == []


def test_only_http_and_https() -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        run(once("ftp://127.0.0.1/x"))


def test_the_destination_policy_is_applied_when_connecting() -> None:
    with RawServer(respond(204)) as server:
        with pytest.raises(BlockedDestination, match="loopback"):
            run(once(server.url(), DestinationPolicy()))
        assert server.connections == []


def test_a_refused_connection_is_a_connect_error() -> None:
    with RawServer(respond(204)) as server:
        url = server.url()
    with pytest.raises(httpx.ConnectError, match="cannot connect to 127.0.0.1"):
        run(once(url))


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(ca: trustme.CA, name: str) -> RawServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return RawServer(respond(200, body=b"secret"), tls=context)


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_https_with_a_trusted_certificate(ca: trustme.CA) -> None:
    with tls_server(ca, "localhost") as server:
        assert run(several(server.url(host="localhost"), context=trusting(ca))) == [(200, b"secret")] * 2
        assert len(server.connections) == 1


def test_https_refuses_an_untrusted_certificate(ca: trustme.CA) -> None:
    with tls_server(ca, "localhost") as server:
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            run(once(server.url(host="localhost")))


def test_https_refuses_a_certificate_for_another_name(ca: trustme.CA) -> None:
    with tls_server(ca, "hooks.example.test") as server:
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            run(once(server.url(host="localhost"), context=trusting(ca)))


def test_https_to_an_allowed_address_through_the_guard(ca: trustme.CA) -> None:
    """The production policy (no private networks) with one allowed network, TLS to an
    IP literal: the address is checked, then the certificate is verified against it."""
    policy = DestinationPolicy(allowed=[ipaddress.ip_network("127.0.0.0/8")])
    with tls_server(ca, "127.0.0.1") as server:
        status, body, _ = run(once(server.url(), policy, trusting(ca)))
    assert (status, body) == (200, b"secret")


# --- a proper httpx transport --------------------------------------------------------------


def test_it_works_under_httpx_async_client() -> None:
    async def get(url: str) -> tuple[int, str]:
        async with httpx.AsyncClient(transport=connection()) as client:
            response = await client.post(url, json={"a": 1})
            return response.status_code, response.text

    with RawServer(respond(200, "content-type: text/plain", body=b"fine")) as server:
        assert run(get(server.url())) == (200, "fine")


def test_one_request_at_a_time() -> None:
    async def overlap(url: str) -> None:
        conn = connection()
        response = await conn.handle_async_request(httpx.Request("POST", url, content=b"{}"))
        with pytest.raises(RuntimeError, match="one request at a time"):
            await conn.handle_async_request(httpx.Request("POST", url, content=b"{}"))
        await response.aclose()
        try:
            await post(conn, url)  # and free again once the response is closed
        finally:
            await conn.aclose()

    with RawServer(respond(204)) as server:
        run(overlap(server.url()))


def test_a_cancelled_request_closes_its_connection_and_the_next_gets_a_new_one() -> None:
    first: list[int] = []

    def slow_first(conn: Conn, request: bytes) -> bool:
        if not first:
            first.append(1)
            conn.wait(5)
            return False
        return conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def cut_then_send(url: str) -> int:
        conn = connection()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await post(conn, url)
            assert time.monotonic() - started < 2  # cut at 0.3 s; the server holds it 5 s
            return (await post(conn, url))[0]
        finally:
            await conn.aclose()

    with RawServer(slow_first) as server:
        assert run(cut_then_send(server.url())) == 204
        assert len(server.connections) == 2


# --- what a confused server sends ------------------------------------------------------------


def test_a_second_response_to_one_request_does_not_replace_the_first() -> None:
    """Two answers in one segment: the first stands (a 500 must not read as the 200 that
    followed it), and the connection, out of step with the server, is not reused."""
    both = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\nerror"
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-second: 1\r\n\r\nok")
    with RawServer(raw(both)) as server:
        assert run(several(server.url())) == [(500, b"error")] * 2
        assert len(server.connections) == 2


def test_bytes_after_the_answer_are_not_read_as_the_next_answer() -> None:
    with RawServer(raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 5")) as server:
        assert run(several(server.url())) == [(200, b"ok")] * 2
        assert len(server.connections) == 2


@pytest.mark.parametrize("codings", [b"identity", b"gzip", b"chunked\r\ntransfer-encoding: gzip"])
def test_a_transfer_coding_other_than_chunked_runs_to_the_close(codings: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + codings + b"\r\n\r\nhello"
    with RawServer(raw(answer, keep=False)) as server:
        status, body, _ = run(once(server.url()))
    assert (status, body) == (200, b"hello")


def test_a_body_left_unread_while_reading_was_paused_does_not_stall_the_next_request() -> None:
    """The whole body arrived while nobody read it (past the 256 KiB mark reading is
    paused), then the response was closed unread and the connection kept."""
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n" + b"A" * 300_000

    async def unread_then_read(url: str) -> int:
        conn = connection()
        try:
            response = await conn.handle_async_request(httpx.Request("POST", url, content=b"{}"))
            await asyncio.sleep(0.3)  # all of it arrives, unread
            await response.aclose()
            async with asyncio.timeout(3):
                status, body, _ = await post(conn, url)
            assert len(body) == 300_000
            return status
        finally:
            await conn.aclose()

    with RawServer(raw(big)) as server:
        assert run(unread_then_read(server.url())) == 200


def test_a_connection_whose_request_was_not_all_sent_is_not_reused() -> None:
    """A server may answer before reading the body (a 413, say) and keep the connection:
    the rest of our body, still queued, would be read as the start of the next request."""
    connections: list[int] = []
    second = asyncio.Event()

    async def early_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        if len(connections) == 2:
            second.set()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"content-length: 2\r\n" in head:
                await reader.readexactly(2)
            writer.write(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            # The big body stays unread until the client has come back on a new
            # connection (or 3 s have passed, the test failing then).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second.wait(), 3)
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def big_then_small() -> list[int]:
        server = await asyncio.start_server(early_answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
        conn = connection()
        try:
            async with asyncio.timeout(10):
                return [(await post(conn, url, body=body))[0] for body in (b"x" * 64_000_000, b"{}")]
        finally:
            await conn.aclose()
            server.close()
            await server.wait_closed()

    assert run(big_then_small()) == [413, 413]
    assert len(connections) == 2


def resolve(monkeypatch: pytest.MonkeyPatch, name: str, *addresses: str) -> None:
    """Make ``name`` resolve to ``addresses``, in that order (IPv4 only)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_an_address_that_drops_packets_gives_way_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with two addresses, the first silent (here a listener on 127.0.0.2 whose
    accept queue is full, so the kernel drops the SYN): the second is tried after
    ``address_timeout``, not after the whole deadline."""
    resolve(monkeypatch, "dual.test", "127.0.0.2", "127.0.0.1")
    with RawServer(respond(204)) as server, socket.socket() as hole:
        hole.bind(("127.0.0.2", server.port))
        hole.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.2", server.port))
        time.sleep(0.1)

        async def go() -> tuple[int, float]:
            conn = connection(address_timeout=0.5)
            started = time.monotonic()
            try:
                async with asyncio.timeout(5):
                    return (await post(conn, server.url(host="dual.test")))[0], time.monotonic() - started
            finally:
                await conn.aclose()

        try:
            status, seconds = run(go())
        finally:
            for filler in fillers:
                filler.close()
    assert status == 204 and 0.4 <= seconds < 4, seconds  # (the deadline is 5 s)


def test_a_slow_tls_handshake_on_the_first_address_is_not_abandoned(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-address bound is for the TCP handshake only: a working first address
    whose TLS handshake takes longer is kept, not left for the next."""
    resolve(monkeypatch, "hooks.example.test", "127.0.0.1", "127.0.0.2")
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.example.test").configure_cert(server_side)
    handshakes: list[str] = []

    async def go() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]

        class Answer204(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                handshakes.append("done")
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                if data.endswith(b"\r\n\r\n"):
                    self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # type: ignore[attr-defined]

        async def late_tls() -> None:  # accepts at once, starts TLS 0.8 s later
            sock, _ = await loop.sock_accept(listener)
            await asyncio.sleep(0.8)
            transport, _ = await loop.connect_accepted_socket(Answer204, sock, ssl=server_side)
            await asyncio.sleep(5)
            transport.close()

        serving = asyncio.create_task(late_tls())
        conn = connection(context=trusting(ca), address_timeout=0.3)
        started = time.monotonic()
        try:
            async with asyncio.timeout(5):
                status = (await post(conn, f"https://hooks.example.test:{port}/hook", body=b""))[0]
            return status, time.monotonic() - started
        finally:
            await conn.aclose()
            serving.cancel()
            listener.close()

    status, seconds = run(go())
    assert status == 204 and 0.7 <= seconds < 4.5, seconds  # (abandoning it would fail: nothing at .2)
    assert handshakes == ["done"]
