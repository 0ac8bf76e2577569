"""``gateway listen``: a local webhook receiver for developers.

It verifies each request's signature with :mod:`gateway.verify`, as a receiver in
production should, and reports it (verified or rejected, and the event). A rejected
request is answered 401. A verified one is answered with the configured status, unless
the listener was told to fail a share of them or to answer late: that is how a developer
watches the gateway's retries without writing a failing server.

The decisions (what to answer, how a request is judged, how it is shown) are plain
functions and values, tested without a socket; :class:`Listener` is the thin HTTP
server around them (the standard library's threaded server: one thread per
connection, keep-alive, so a ``--delay`` holds one connection, not the others).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import WebhookVerificationError
from ..verify import verify

__all__ = ["MAX_BODY_BYTES", "Behaviour", "Listener", "Received", "judge", "render"]

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Larger bodies are refused (413) unread: the gateway never sends one."""


@dataclass
class Behaviour:
    """What the listener answers a verified webhook: ``status``, except that a share
    ``fail_rate`` of them (drawn at random) get ``fail_status``; every answer waits
    ``delay_ms`` first."""

    status: int = 200
    fail_rate: float = 0.0
    fail_status: int = 500
    delay_ms: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail rate {self.fail_rate} is not between 0 and 1")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status (100-599)")
        if self.delay_ms < 0:
            raise ValueError(f"delay {self.delay_ms} ms is negative")

    def answer(self, verified: bool) -> int:
        """The status for a request: 401 when it is not verified."""
        if not verified:
            return 401
        if self.fail_rate and self.rng.random() < self.fail_rate:
            return self.fail_status
        return self.status


@dataclass(frozen=True)
class Received:
    """One request the listener got, judged."""

    at: float
    """time.time() when it arrived."""
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    verified: bool
    reason: str | None
    """Why it was rejected (the verifier's words); None when verified."""
    status: int = 0
    """What the listener answered."""

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def document(self) -> Any:
        """The JSON body, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def event_type(self) -> str | None:
        document = self.document
        kind = document.get("event") if isinstance(document, dict) else None
        return kind if isinstance(kind, str) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at, "method": self.method, "path": self.path, "webhookId": self.webhook_id,
            "verified": self.verified, "reason": self.reason, "status": self.status,
            "event": self.event_type, "body": self.document if self.document is not None
            else self.body.decode("utf-8", errors="replace"),
        }


def judge(secrets: Sequence[str], method: str, path: str, headers: Mapping[str, str], body: bytes,
          *, now: float | None = None) -> Received:
    """Verify a request against each of ``secrets`` (any one may sign it)."""
    lower = {k.lower(): v for k, v in headers.items()}
    at = time.time() if now is None else now
    reason: str | None = "no secret to verify with (pass --secret)"
    for secret in secrets:
        try:
            verify(secret, lower, body, now=at)
        except WebhookVerificationError as exc:
            reason = str(exc)
            continue
        reason = None
        break
    return Received(at, method, path, lower, body, reason is None, reason)


def _printable(text: str) -> str:
    # A webhook's text is whatever a chat user typed: printed raw, an escape sequence
    # would rewrite the developer's terminal.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def render(received: Received, *, color: bool = False) -> str:
    """The request as the terminal shows it: one heading line, then the event as
    indented JSON (or the body as text)."""
    when = datetime.fromtimestamp(received.at).strftime("%H:%M:%S")
    mark = "VERIFIED" if received.verified else "REJECTED"
    if color:
        mark = f"\x1b[{'32' if received.verified else '31'}m{mark}\x1b[0m"
    parts = [when, mark, received.event_type or "-", f"webhook-id {received.webhook_id or '-'}",
             f"{received.method} {received.path}", f"-> {received.status}"]
    heading = "  ".join(_printable(p) if i != 1 else p for i, p in enumerate(parts))
    if received.reason:
        heading += f"  ({_printable(received.reason)})"
    document = received.document
    if document is not None:
        text = json.dumps(document, indent=2, ensure_ascii=False)
    else:
        text = received.body[:2000].decode("utf-8", errors="replace")
    lines = [heading, *("  " + _printable(line) for line in text.splitlines())]
    return "\n".join(lines)


class Listener:
    """The HTTP server: judges each POST, answers as ``behaviour`` says, then hands the
    request to ``on_request`` (from the connection's thread)."""

    def __init__(self, *, host: str, port: int, secrets: Sequence[str], behaviour: Behaviour,
                 on_request: Callable[[Received], None]) -> None:
        self.secrets = tuple(secrets)
        self.behaviour = behaviour
        self.on_request = on_request
        listener = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the gateway reuses its connections
            server_version = "gateway-listen"

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("content-length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    self._answer(413, b"body too large or of unknown length\n", close=True)
                    return
                body = self.rfile.read(length)
                received = judge(listener.secrets, "POST", self.path, dict(self.headers.items()), body)
                status = listener.behaviour.answer(received.verified)
                if listener.behaviour.delay_ms:
                    time.sleep(listener.behaviour.delay_ms / 1000)
                text = b"" if received.verified else f"{received.reason}\n".encode()
                self._answer(status, text)
                listener.on_request(replace(received, status=status))

            def do_GET(self) -> None:
                self._answer(200, b"gateway listen: POST webhooks here\n")

            def _answer(self, status: int, body: bytes, *, close: bool = False) -> None:
                self.send_response(status)
                self.send_header("content-type", "text/plain; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                if close:
                    self.send_header("connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # every request is reported through on_request instead

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client gone mid-request is the client's business

        self._server = Server((host, port), Handler)
        self.port = int(self._server.server_address[1])
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> Listener:
        """Serve on a thread (for tests and embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="listen", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
