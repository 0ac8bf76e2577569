"""A small Confluent Schema Registry for the tests: the REST calls confluent-kafka's
client makes to register a schema and to fetch one by id, over real HTTP on 127.0.0.1.

It can go away and come back on the same port with the same schemas (:meth:`stop`,
:meth:`start`), or hang: accept connections and never answer (:meth:`hang`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["SchemaRegistry"]


class SchemaRegistry:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.lookups: list[int] = []
        self._lock = threading.Lock()
        self._hanging = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SchemaRegistry:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/vnd.schemaregistry.v1+json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _hang(self) -> bool:
                """True when the registry went away while this request hung."""
                server = registry._server
                while registry._hanging.is_set():
                    time.sleep(0.05)
                if registry._server is not server:
                    self.close_connection = True
                    return True
                return False

            def do_GET(self) -> None:
                if self._hang():
                    return
                match = re.fullmatch(r"/schemas/ids/(\d+)", self.path.split("?")[0])
                if match is None:
                    self._answer(404, {"error_code": 404, "message": "not found"})
                    return
                schema_id = int(match.group(1))
                with registry._lock:
                    registry.lookups.append(schema_id)
                    schema = registry.schemas.get(schema_id)
                if schema is None:
                    self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                else:
                    self._answer(200, {"schema": schema})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                if self._hang():
                    return
                match = re.fullmatch(r"/subjects/([^/]+)/versions", self.path.split("?")[0])
                if match is None:
                    self._answer(404, {"error_code": 404, "message": "not found"})
                    return
                subject, schema = match.group(1), request["schema"]
                with registry._lock:
                    schema_id = next((i for i, s in registry.schemas.items() if s == schema), None)
                    if schema_id is None:
                        schema_id = len(registry.schemas) + 1
                        registry.schemas[schema_id] = schema
                    versions = registry.subjects.setdefault(subject, [])
                    if schema_id not in versions:
                        versions.append(schema_id)
                    version = versions.index(schema_id) + 1
                self._answer(200, {"id": schema_id, "subject": subject, "version": version, "schema": schema})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def hang(self) -> None:
        """Accept requests and never answer them (until :meth:`answer`)."""
        self._hanging.set()

    def answer(self) -> None:
        self._hanging.clear()

    def stop(self) -> None:
        """Go away (ending a hang): the port refuses connections; the schemas are kept
        for a restart."""
        server, self._server = self._server, None
        self._hanging.clear()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> SchemaRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._hanging.clear()
        self.stop()
