"""A real HTTP receiver on 127.0.0.1 for the tests: records every request, answers with
whatever status a test programmed per path."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    """time.time() when the request arrived."""

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]


Responder = Callable[[Request, int], int]
"""Gets the request and how many requests its path had before it; returns the status."""


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._responders: dict[str, Responder] = {}
        self._lock = threading.Lock()
        self._counts: dict[str, int] = defaultdict(int)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver._lock:
                    seen = receiver._counts[self.path]
                    receiver._counts[self.path] += 1
                    receiver.requests.append(request)
                    responder = receiver._responders.get(self.path)
                status = responder(request, seen) if responder else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 512  # the default backlog of 5 resets bursts of connections

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client killed mid-request (kill -9 tests) is expected here

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(self, path: str, responder: Responder) -> None:
        self._responders[path] = responder

    def at(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
            time.sleep(0.05)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def receiver_fixture() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver
