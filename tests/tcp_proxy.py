"""A TCP proxy between the gateway and a broker, for network faults in tests.

The broker advertises the proxy's port (``Broker(advertised_port=...)``, or Apache
Kafka's ``advertised.listeners``), so every connection a client opens after bootstrap
goes through the proxy too. Faults, each switched on and off from the test's thread:

* :meth:`TcpProxy.latency`: every chunk is forwarded that much later, both ways;
* :meth:`TcpProxy.drop`: every open connection is closed at once (new ones pass);
* :meth:`TcpProxy.blackhole`: nothing is forwarded any more, both ways, and no
  connection is closed: a half-open network the client only notices by its timeouts;
* :meth:`TcpProxy.blackhole_when`: the same, for each connection a rule picks. The proxy
  reads the Kafka request headers a client sends (api key, client id), so a rule can take
  one client's group coordinator connection only (:func:`group_connection_of`).

What the proxy saw, so a test can tell that its fault took: every connection ever
accepted (:attr:`TcpProxy.seen`, with the api keys and client id of its requests and the
``acks`` of its Produce requests), connections closed by :meth:`TcpProxy.drop`
(:attr:`TcpProxy.dropped`), bytes a blackhole swallowed (:attr:`TcpProxy.swallowed`) and
chunks forwarded late (:attr:`TcpProxy.delayed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["GROUP_REQUESTS", "INIT_PRODUCER_ID", "PRODUCE", "Connection", "TcpProxy", "group_connection_of",
           "produce_acks"]

GROUP_REQUESTS = frozenset({8, 9, 11, 12, 13, 14, 68})
"""Kafka api keys only the group coordinator is sent: OffsetCommit, OffsetFetch,
JoinGroup, Heartbeat, LeaveGroup, SyncGroup, ConsumerGroupHeartbeat."""

PRODUCE = 0
INIT_PRODUCER_ID = 22
"""What an idempotent producer asks first (its producer id); a plain producer never does."""


@dataclass
class Connection:
    """One client connection through the proxy, as far as its requests tell."""

    client_id: str | None = None
    api_keys: set[int] = field(default_factory=set)
    blackholed: bool = False
    acks: set[int] = field(default_factory=set)
    """The ``acks`` of every Produce request over it (-1: all in-sync replicas)."""
    _writers: list[asyncio.StreamWriter] = field(default_factory=list, repr=False)


def group_connection_of(client_id: str) -> Callable[[Connection], bool]:
    """A rule for :meth:`TcpProxy.blackhole_when`: the connections over which the client
    ``client_id`` talks to its group coordinator."""
    return lambda conn: conn.client_id == client_id and bool(conn.api_keys & GROUP_REQUESTS)


def produce_acks(request: bytes) -> int | None:
    """The ``acks`` of a Produce request (versions 3 and later; None for any other
    request). After the header come the transactional id and then ``acks``; from version
    9 on (flexible) the header ends with tagged fields and the id is a compact string."""
    api_key, version = struct.unpack_from(">hh", request, 0)
    if api_key != PRODUCE or version < 3:
        return None
    length = struct.unpack_from(">h", request, 8)[0]
    at = 10 + max(length, 0)
    if version >= 9:
        tags, at = _varint(request, at)
        for _ in range(tags):
            _, at = _varint(request, at)
            size, at = _varint(request, at)
            at += size
        length, at = _varint(request, at)  # length + 1; 0 is null
        at += max(length - 1, 0)
    else:
        length = struct.unpack_from(">h", request, at)[0]
        at += 2 + max(length, 0)
    return int(struct.unpack_from(">h", request, at)[0])


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """An unsigned varint at ``at``: its value and where the next field starts."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _request_header(frame: bytes) -> tuple[int, str | None]:
    """The api key and client id of one request (header v1 and later)."""
    api_key = struct.unpack_from(">h", frame, 0)[0]
    if len(frame) < 10:
        return api_key, None
    length = struct.unpack_from(">h", frame, 8)[0]
    client_id = None if length < 0 else frame[10:10 + length].decode("utf-8", "replace")
    return api_key, client_id


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` on a thread of its own.
    Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.connections: list[Connection] = []
        """The connections open now."""
        self.seen: list[Connection] = []
        """Every connection accepted, open or closed."""
        self.dropped = 0
        """Connections closed by :meth:`drop`."""
        self.swallowed = 0
        """Bytes a blackhole kept from their destination."""
        self.delayed = 0
        """Chunks forwarded later than they came, for :meth:`latency`."""
        self._delay = 0.0
        self._blackhole = False
        self._rule: Callable[[Connection], bool] | None = None
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    # -- from the test's thread ----------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def latency(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` late from now on (0: no delay)."""
        self._delay = seconds

    def drop(self) -> int:
        """Close every open connection (the clients see their connections reset); how
        many were open."""
        closed: int = self._call(self._close_all())
        self.dropped += closed
        return closed

    def blackhole(self, on: bool = True) -> None:
        """Forward nothing, both ways, on every connection, open or new; close none.
        Switched off, the connections blackholed meanwhile stay so (their bytes are lost);
        new connections pass."""
        self._blackhole = on

    def blackhole_when(self, rule: Callable[[Connection], bool] | None) -> None:
        """Blackhole for good each connection ``rule`` picks, checked at every request
        (None: no more)."""
        self._rule = rule
        if rule is not None:
            for conn in list(self.connections):
                if rule(conn):
                    conn.blackholed = True

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # -- the proxy's thread --------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        conn = Connection(blackholed=self._blackhole)
        try:
            broker_reader, broker_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        conn._writers = [client_writer, broker_writer]
        self.connections.append(conn)
        self.seen.append(conn)
        try:
            await asyncio.gather(self._pipe(conn, client_reader, broker_writer, requests=True),
                                 self._pipe(conn, broker_reader, client_writer, requests=False))
        finally:
            self._close(conn)

    async def _pipe(self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, requests: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(conn, queue, writer))
        pending = b""
        try:
            while data := await reader.read(65536):
                if requests:  # forward whole requests only, each looked at first
                    pending += data
                    data = b""
                    while len(pending) >= 4:
                        size = struct.unpack_from(">i", pending, 0)[0]
                        if len(pending) < 4 + size:
                            break
                        frame, pending = pending[:4 + size], pending[4 + size:]
                        self._look_at(conn, frame[4:])
                        data += frame
                if self._blackhole:
                    conn.blackholed = True
                if data and not conn.blackholed:
                    queue.put_nowait((self._loop.time() + self._delay, data))
                    if self._delay > 0:
                        self.delayed += 1
                elif data:
                    self.swallowed += len(data)
        except OSError:
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            if not conn.blackholed:
                self._close(conn)

    def _look_at(self, conn: Connection, request: bytes) -> None:
        if len(request) < 2:
            return
        api_key, client_id = _request_header(request)
        conn.api_keys.add(api_key)
        with contextlib.suppress(struct.error, IndexError):  # a request cut short is the broker's to refuse
            acks = produce_acks(request)
            if acks is not None:
                conn.acks.add(acks)
        if client_id is not None:
            conn.client_id = client_id
        if self._rule is not None and self._rule(conn):
            conn.blackholed = True

    async def _send(self, conn: Connection, queue: asyncio.Queue[tuple[float, bytes] | None],
                    writer: asyncio.StreamWriter) -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - self._loop.time()) > 0:
                await asyncio.sleep(wait)
            if conn.blackholed:
                self.swallowed += len(data)
                continue
            writer.write(data)
            with contextlib.suppress(OSError):
                await writer.drain()

    def _close(self, conn: Connection) -> None:
        for writer in conn._writers:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)

    async def _close_all(self) -> int:
        open_now = list(self.connections)
        for conn in open_now:
            self._close(conn)
        return len(open_now)

    async def _shutdown(self) -> None:
        await self._close_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
