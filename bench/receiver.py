"""A fast HTTP/1.1 receiver for the benchmarks, in its own process.

    python bench/receiver.py PORT OUT [/path=SECONDS ...]

Answers 204 to every POST: at once, or after SECONDS for a path given on the command line
(``/slow=0.2``). Serves ``GET /stats`` (JSON: requests and distinct ``webhook-id``s, in
all and per path). On SIGTERM writes every request to OUT as JSON lines: ``[path,
webhook-id, started, answered]`` (``time.time()``).

Minimal parsing on purpose: it must not be what limits the measurement.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESPONSE = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


class Log:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float, float]] = []
        self.unique: dict[str, set[str]] = {}
        self.counts: Counter[str] = Counter()

    def stats(self) -> bytes:
        return json.dumps(
            {
                "count": sum(self.counts.values()),
                "unique": sum(len(ids) for ids in self.unique.values()),
                "paths": {p: {"count": n, "unique": len(self.unique[p])} for p, n in self.counts.items()},
            }
        ).encode()


def protocol(log: Log, delays: dict[str, float]) -> type[asyncio.Protocol]:
    class Http(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end]
                length = 0
                event_id = b""
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"webhook-id":
                        event_id = value.strip()
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                if head.startswith(b"GET /stats"):
                    body = log.stats()
                    self.transport.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                        + str(len(body)).encode()
                        + b"\r\n\r\n"
                        + body
                    )
                    continue
                path = head.split(b" ", 2)[1].decode()
                started = time.time()
                delay = delays.get(path)
                if delay:
                    asyncio.get_running_loop().call_later(delay, self.answer, path, event_id.decode(), started)
                else:
                    self.answer(path, event_id.decode(), started)

        def answer(self, path: str, event_id: str, started: float) -> None:
            log.requests.append((path, event_id, started, time.time()))
            log.counts[path] += 1
            log.unique.setdefault(path, set()).add(event_id)
            if not self.transport.is_closing():
                self.transport.write(RESPONSE)

    return Http


async def main(port: int, out: str, delays: dict[str, float]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    log = Log()
    server = await loop.create_server(protocol(log, delays), "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in log.requests))


if __name__ == "__main__":
    given = dict(arg.split("=", 1) for arg in sys.argv[3:])
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], {p: float(s) for p, s in given.items()}))
