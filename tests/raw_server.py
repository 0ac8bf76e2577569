"""A raw TCP (or TLS) HTTP server that misbehaves on purpose, for the sender's tests.

Written with raw sockets in threads so it can do what an HTTP framework would not let it:
redirect, answer 10 MB or forever, trickle a byte a second, never answer, hang up.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = ["Conn", "Handler", "RawServer", "respond"]


@dataclass
class Conn:
    """One accepted connection, as the handler sees it."""

    sock: socket.socket
    server: RawServer
    sent: int = 0
    """Bytes this connection managed to hand to the kernel."""
    closed_by_peer: bool = False

    def send(self, data: bytes) -> bool:
        """Send ``data``; False once the client has gone."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed_by_peer = True
            return False
        self.sent += len(data)
        return True

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False when the server is stopping."""
        return not self.server.stopping.wait(seconds)


Handler = Callable[[Conn, bytes], bool]
"""Gets the connection and the raw request (head and body); returns True to keep the
connection open for another request."""


def _read_request(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


@dataclass
class RawServer:
    """A TCP server on ``host``; each connection runs ``handler`` in its own thread."""

    handler: Handler
    host: str = "127.0.0.1"
    port: int = 0
    accept: bool = True
    """False: listen, never accept (the kernel completes handshakes into the backlog)."""
    tls: ssl.SSLContext | None = None
    """Serve TLS with this (server-side) context."""
    requests: list[bytes] = field(default_factory=list)
    connections: list[Conn] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def __enter__(self) -> Self:
        if self.accept:
            self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in list(self._threads):
            thread.join(5)
        self._sock.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        if self.tls is not None:
            sock.settimeout(5)
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except OSError:  # the client refused our certificate
                sock.close()
                return
        conn = Conn(sock, self)
        with self._lock:
            self.connections.append(conn)
        with sock:
            sock.settimeout(10)
            try:
                while not self.stopping.is_set():
                    request = _read_request(sock)
                    if request is None:
                        return
                    with self._lock:
                        self.requests.append(request)
                    if not self.handler(conn, request):
                        return
            except OSError:
                conn.closed_by_peer = True


def respond(status: int, *headers: str, body: bytes = b"") -> Handler:
    """A handler answering every request with ``status``, ``headers`` and ``body``."""

    def handle(conn: Conn, request: bytes) -> bool:
        head = f"HTTP/1.1 {status} Whatever\r\n" + "".join(h + "\r\n" for h in headers)
        head += f"content-length: {len(body)}\r\n\r\n"
        return conn.send(head.encode("latin-1") + body)

    return handle
