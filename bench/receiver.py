"""A fast HTTP/1.1 receiver for the benchmark: answers 204 to every POST, notes when each
``webhook-id`` arrived, serves ``GET /stats`` (JSON counts) and writes every arrival as
``event_id time`` lines to the file named on the command line when it gets SIGTERM.

Minimal parsing on purpose: it must not be what limits the measurement.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

arrivals: list[tuple[bytes, float]] = []
unique: set[bytes] = set()  # kept as they arrive: /stats must not walk every arrival
RESPONSE = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


class Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
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
            self.buffer = self.buffer[end + 4 + length:]
            if head.startswith(b"GET /stats"):
                body = json.dumps({"count": len(arrivals), "unique": len(unique)}).encode()
                self.transport.write(  # type: ignore[attr-defined]
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                continue
            arrivals.append((event_id, time.time()))
            unique.add(event_id)
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


async def main(port: int, out: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(Http, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    with open(out, "w") as f:
        for event_id, at in arrivals:
            f.write(f"{event_id.decode()} {at:.6f}\n")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
