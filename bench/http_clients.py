"""What one request costs through each way of using httpx: the measurement behind
gateway/delivery/_transport.py.

    python bench/http_clients.py [--requests 20000] [--lanes 20] [--concurrency 1000]

Starts bench/receiver.py in its own process on 127.0.0.1 and posts the same JSON body
to it, ``--concurrency`` requests at a time over ``--lanes`` connections, through:

1. one ``httpx.AsyncClient`` pooling ``--lanes`` connections (httpx's default transport);
2. ``--lanes`` single-connection ``AsyncClient`` s (the gateway's sender before its own
   transport);
3. ``--lanes`` ``AsyncClient`` s over the gateway's :class:`~gateway.delivery.Connection`;
4. the gateway's :class:`~gateway.delivery.Sender` (its Connections, called without a
   client, plus signing and the attempt record: what a worker runs);
5. aiohttp, ``--lanes`` connections each posting in turn, with the same headers' names as
   a worker (``run.post_with_aiohttp``: the ceiling ``bench/bursts.py`` holds a worker to,
   there with 50 connections; with ``pip install -e '.[bench]'``).

and prints requests per second for each, with its ratio to the first, and the client's
CPU a request (its process, all threads; the receiver runs in another). One run, one
machine: the ratios are what to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from gateway.config import Config
from gateway.delivery import Connection, DestinationPolicy, Sender
from gateway.ops import new_endpoint
from gateway.records import Attempt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BOT, free_port, post_with_aiohttp  # noqa: E402

BODY = (b'{"event":"MESSAGE","botId":"6434515b-8541-4861-bb24-8acd6e77e8c4","sessionId":'
        b'"9a0c4d2e-27f1-4f0e-8a44-1f2c3b4d5e6f","role":"USER","message":"hi, I would like '
        b'to know more about pricing","messageId":"0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"}')


async def timed(requests: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with gate:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in range(requests)))
    return requests / (time.perf_counter() - started)


async def through_clients(url: str, clients: list[httpx.AsyncClient], requests: int, concurrency: int) -> float:
    idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    for client in clients:
        idle.put_nowait(client)

    async def one(i: int) -> None:
        client = await idle.get()
        try:
            response = await client.post(url, content=BODY, headers={"content-type": "application/json",
                                                                     "webhook-id": str(i)})
            assert response.status_code == 204, response
        finally:
            idle.put_nowait(client)

    try:
        return await timed(requests, concurrency, one)
    finally:
        await asyncio.gather(*(c.aclose() for c in set(clients)))


async def pooled(url: str, args: argparse.Namespace) -> float:
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=args.lanes), trust_env=False)
    return await through_clients(url, [client] * args.lanes, args.requests, args.concurrency)


async def single_connection_clients(url: str, args: argparse.Namespace) -> float:
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1), trust_env=False)
               for _ in range(args.lanes)]
    return await through_clients(url, clients, args.requests, args.concurrency)


async def clients_over_connections(url: str, args: argparse.Namespace) -> float:
    policy, context = DestinationPolicy(allow_private=True), ssl.create_default_context()
    clients = [httpx.AsyncClient(transport=Connection(policy, context)) for _ in range(args.lanes)]
    return await through_clients(url, clients, args.requests, args.concurrency)


async def sender(url: str, args: argparse.Namespace) -> float:
    config = Config(allow_private_networks=True, endpoint_concurrency=args.lanes)
    gateway_sender = Sender(config)
    endpoint = new_endpoint(bot_id=BOT, url=url)

    async def one(i: int) -> None:
        attempt = await gateway_sender.send(endpoint, str(i), BODY, "events")
        assert isinstance(attempt, Attempt) and attempt.succeeded, attempt

    try:
        return await timed(args.requests, args.concurrency, one)
    finally:
        await gateway_sender.aclose()


async def with_aiohttp(url: str, args: argparse.Namespace) -> float:
    return await post_with_aiohttp(url, [(str(i), BODY) for i in range(args.requests)], args.lanes)


WAYS = {
    "one AsyncClient pooling the connections (httpx default transport)": pooled,
    "single-connection AsyncClients (httpx default transport)": single_connection_clients,
    "single-connection AsyncClients over gateway.delivery.Connection": clients_over_connections,
    "the gateway's Sender (Connections, no client; signs each request)": sender,
    "aiohttp, one ClientSession (what bench/bursts.py compares a worker with)": with_aiohttp,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--lanes", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1000)
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(port), "/dev/null"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/hook"
        print(f"{args.requests:,} POSTs, {args.concurrency} at a time over {args.lanes} connections, "
              f"to a receiver process on 127.0.0.1")
        first = None
        for name, way in WAYS.items():
            cpu = time.process_time()
            rate = asyncio.run(way(url, args))
            cpu = (time.process_time() - cpu) / args.requests * 1e6
            first = first or rate
            print(f"  {rate:>8,.0f}/s  x{rate / first:4.1f}  {cpu:5.0f} µs CPU a request  {name}", flush=True)
    finally:
        receiver.terminate()
        receiver.wait(10)


if __name__ == "__main__":
    main()
