"""Serving the API: as a process of its own (``gateway api``: :func:`serve`), or on a thread
beside the workers (``gateway up``: :func:`start_thread`).

Both take their address, tokens and history size from the configuration
(``GATEWAY_API_*``). The socket is bound before anything else starts, so an address in
use is said at once; then the endpoint table and the history index are loaded, and
uvicorn serves on the bound socket, logging through the gateway's logging.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from ..config import Config
from ..errors import Unavailable
from ._app import create_app
from ._auth import tokens_for
from ._service import ApiService

__all__ = ["ApiThread", "Listening", "bind_address", "serve", "server", "start_thread"]


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


def server(app: FastAPI, sock: socket.socket) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``sock``, logging through the gateway's logging."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off",
                            proxy_headers=False, server_header=False)
    return uvicorn.Server(config)


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
        server(create_app(service), sock).run(sockets=[sock])
    finally:
        sock.close()
        service.stop()


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
