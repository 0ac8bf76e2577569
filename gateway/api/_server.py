"""Serving the API: as a process of its own (``gateway api``: :func:`serve`), or on a thread
beside the workers (``gateway up``: :func:`start_thread`).

Both take their address, tokens, index sizes and limits from the configuration
(``GATEWAY_API_*``). The socket is bound before anything else starts, so an address in
use is said at once; then the endpoint table and the indexes are loaded, and uvicorn
serves on the bound socket, logging through the gateway's logging.

**Limits** (uvicorn runs on none by default):

* ``GATEWAY_API_CONCURRENCY`` (200): connections and requests at once
  (``limit_concurrency``); beyond, uvicorn answers 503 itself (plain text).
* ``GATEWAY_API_HEADER_TIMEOUT`` (10 s): a request head must be complete this long after
  the connection opened, or after the previous answer on a kept-alive connection;
  otherwise the connection is closed. uvicorn has no such bound (its keep-alive timer
  stops at the first byte of a new request), so :func:`protocol` adds it to h11's
  protocol. The same bound applies to the body, in the request guard (408).
* ``GATEWAY_API_KEEPALIVE`` (5 s): an idle kept-alive connection is closed
  (``timeout_keep_alive``).
* ``GATEWAY_API_MAX_HEADER_BYTES`` (16 KiB): the largest request head h11 buffers
  (``h11_max_incomplete_event_size``); beyond, 400 and the connection closed. The API is
  served with h11 for this bound (httptools has none of its own).
* ``GATEWAY_API_MAX_BODY_BYTES`` (64 KiB): in the request guard (413).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import Config
from ..errors import Unavailable
from ._app import create_app
from ._auth import tokens_for
from ._service import ApiService

__all__ = ["ApiThread", "Listening", "bind_address", "protocol", "serve", "server", "start_thread"]


def bind_address(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; :class:`~gateway.errors.Unavailable` (the
    address in use, …) at once, before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise Unavailable(f"API address {host}:{port}: {exc.strerror or exc}; stop what listens there or choose "
                          "another port (--api-port, GATEWAY_API_PORT)") from None
    sock.set_inheritable(True)
    return sock


def protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete
    ``head_timeout`` seconds after it opened (or after its previous answer)."""

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:  # no request being answered
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a head came whole: its request is being answered
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return HeadTimeoutProtocol


def server(app: FastAPI, sock: socket.socket, config: Config | None = None) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``sock`` with ``config``'s limits (module
    docstring), logging through the gateway's logging."""
    settings = config or Config()
    host, port = sock.getsockname()[:2]
    served = uvicorn.Config(
        app, host=host, port=port, log_config=None, lifespan="off", proxy_headers=False, server_header=False,
        http=protocol(settings.api_header_timeout), limit_concurrency=settings.api_concurrency,
        timeout_keep_alive=settings.api_keepalive,  # type: ignore[arg-type]  # a float works: call_later
        h11_max_incomplete_event_size=settings.api_max_header_bytes, timeout_graceful_shutdown=5)
    return uvicorn.Server(served)


@dataclass(frozen=True)
class Listening:
    """Where the API answers, once it does."""

    url: str
    """``http://HOST:PORT``."""
    tokens: int
    generated_token: str | None = None
    """The token made for this run (``gateway up`` on loopback without tokens), or None."""


def serve(config: Config, *, on_listening: Callable[[Listening], None] | None = None) -> None:
    """``gateway api``: serve until SIGTERM or SIGINT, then let the tables go. Refuses to
    start without tokens (:class:`~gateway.errors.ConfigError`) or when the topics cannot
    be read (:class:`~gateway.errors.Unavailable`)."""
    tokens, _ = tokens_for(config, generate=False)
    sock = bind_address(config.api_host, config.api_port)
    service = ApiService(config, tokens)
    try:
        service.start()
        host, port = sock.getsockname()[:2]
        if on_listening is not None:
            on_listening(Listening(f"http://{host}:{port}", len(tokens)))
        # uvicorn stops on SIGTERM/SIGINT and then raises the signal again for the handler
        # it found: this one lets the process stop in order (the tables let go) and exit 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        server(create_app(service), sock, config).run(sockets=[sock])
    finally:
        sock.close()
        service.stop()


class ApiThread:
    """The API served on a thread of this process (what `gateway up` runs beside its
    workers): its own event loop; the workers' loop is not shared."""

    def __init__(self, service: ApiService, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self._server = server(create_app(service), sock, service.config)
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


def start_thread(config: Config, *, on_address_taken: Callable[[str], None]) -> tuple[ApiThread, Listening] | None:
    """``gateway up``'s API, on a thread: with a token made for this run unless
    ``GATEWAY_API_TOKENS`` is set (then only on loopback). An address already taken is
    told to ``on_address_taken`` and nothing is started (None): the workers are what
    ``up`` is for."""
    tokens, generated = tokens_for(config, generate=True)
    try:
        sock = bind_address(config.api_host, config.api_port)
    except Unavailable as exc:
        on_address_taken(exc.message)
        return None
    service = ApiService(config, tokens)
    try:
        service.start()
    except BaseException:
        sock.close()
        service.stop()
        raise
    host, port = sock.getsockname()[:2]
    return ApiThread(service, sock).start(), Listening(f"http://{host}:{port}", len(tokens), generated)
