"""One tenant's hanging DNS cannot starve another's: the resolver's per-domain cap.

Real asyncio, real sockets on 127.0.0.1, real resolver threads; only
``socket.getaddrinfo`` is stubbed (as in ``test_hostile_receivers.py``): a ``hang-*``
name blocks until the test releases it, then fails as a resolver timeout does; an
``ok.*`` name resolves to 127.0.0.1 at once; any other name goes to the real resolver.
Every hanging name is released when its test ends, so no thread outlives it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway.config import Config
from gateway.delivery import (
    DOMAIN_QUEUE_LIMIT,
    LOOKUPS_PER_DOMAIN,
    RESOLVER_THREADS,
    Address,
    Deferral,
    DestinationPolicy,
    Sender,
)
from gateway.errors import BlockedDestination, LookupQueued
from gateway.records import Attempt, DeferReason, Endpoint
from gateway.signing import new_secret

from .fakes import attempted
from .raw_server import RawServer, respond

pytestmark = pytest.mark.timeout(30)

BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
DEADLINE = 1.0
LOOPBACK_ADDRESS = ipaddress.ip_address("127.0.0.1")
_real_getaddrinfo = socket.getaddrinfo


@dataclass
class Dns:
    """The stubbed resolver, and what it was asked."""

    started: list[str] = field(default_factory=list)
    """Every stubbed name, in the order its lookup began."""
    blocked: int = 0
    """Lookups blocked right now (each holds a resolver thread)."""
    most_blocked: int = 0
    _gates: dict[str, threading.Event] = field(default_factory=dict)
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.startswith("ok."):
            with self._lock:
                self.started.append(name)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        if not name.startswith("hang-"):
            return _real_getaddrinfo(host, port, *args, **kwargs)
        with self._lock:
            self.started.append(name)
            self.blocked += 1
            self.most_blocked = max(self.most_blocked, self.blocked)
            gate = self._gate(name)
        try:
            gate.wait(20)  # bounded: a broken test must not hang the run
        finally:
            with self._lock:
                self.blocked -= 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def has_started(self, lookups: int) -> Callable[[], bool]:
        return lambda: len(self.started) == lookups

    def _gate(self, name: str) -> threading.Event:
        gate = self._gates.setdefault(name, threading.Event())
        if self._released:
            gate.set()
        return gate

    def release(self, name: str) -> None:
        """Let the lookup of ``name`` end (now, or at once when it begins)."""
        with self._lock:
            self._gate(name).set()

    def release_all(self) -> None:
        with self._lock:
            self._released = True
            for gate in self._gates.values():
                gate.set()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[Dns]:
    stub = Dns()
    monkeypatch.setattr(socket, "getaddrinfo", stub.getaddrinfo)
    try:
        yield stub
    finally:
        stub.release_all()
        deadline = time.monotonic() + 5
        while stub.blocked and time.monotonic() < deadline:
            time.sleep(0.01)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


def endpoint(url: str) -> Endpoint:
    return Endpoint(id=str(uuid.uuid4()), bot_id=BOT, url=url, secret=new_secret(), created_at=0, updated_at=0)


def config() -> Config:
    """The production policy with loopback allowed (the healthy name is 127.0.0.1), and a
    1 s request deadline."""
    return Config(request_timeout=DEADLINE, allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


@dataclass
class Sends:
    healthy: Attempt
    healthy_seconds: float
    hanging: list[Attempt | Deferral]


def hang_and_send_healthy(dns: Dns, hanging_hosts: list[str]) -> Sends:
    """Send to an endpoint on each of ``hanging_hosts`` at once; while their lookups hang,
    send to ``ok.fast.test`` (a RawServer answering 204); the hanging names are released
    once every send has ended."""

    async def go(port: int) -> Sends:
        sender = Sender(config())
        try:
            hanging = [
                asyncio.create_task(sender.send(endpoint(f"http://{host}:{port}/hook"), str(uuid.uuid4()),
                                                b"{}", "events"))
                for host in hanging_hosts
            ]
            await until(lambda: dns.blocked >= 4)  # the lookups are hanging, with and without a cap
            await asyncio.sleep(0.1)  # every hanging send has asked for its lookup
            started = time.perf_counter()
            healthy = attempted(await sender.send(endpoint(f"http://ok.fast.test:{port}/hook"), str(uuid.uuid4()),
                                             b"{}", "events"))
            seconds = time.perf_counter() - started
            return Sends(healthy, seconds, list(await asyncio.gather(*hanging)))
        finally:
            dns.release_all()
            await sender.aclose()

    with RawServer(respond(204)) as server:
        return asyncio.run(go(server.port))


def assert_healthy_unharmed(outcome: Sends, looked_up: int, queued: int) -> None:
    """The healthy name is answered at once; of the hanging ones, those whose lookup ran
    (on their domain's share of threads) time out as attempts, and those whose lookup
    waited for its domain's turn past the wait are deferred: a local wait is not an
    attempt."""
    healthy = outcome.healthy
    # Queued behind the hanging lookups, it would time out at the 1 s deadline.
    assert healthy.status == 204 and healthy.succeeded, healthy
    assert outcome.healthy_seconds < DEADLINE / 2, outcome.healthy_seconds
    attempts = [r for r in outcome.hanging if isinstance(r, Attempt)]
    deferred = [r for r in outcome.hanging if isinstance(r, Deferral)]
    assert [a.error for a in attempts] == [f"timeout after {DEADLINE:g} s"] * looked_up
    assert [d.reason for d in deferred] == [DeferReason.DNS] * queued


def test_thirty_two_hanging_names_on_one_domain_leave_a_healthy_name_its_lookup(dns: Dns) -> None:
    """The issue: 32 endpoints on one domain whose DNS hangs took all 32 resolver threads,
    so every other endpoint's new connections timed out."""
    hosts = [f"hang-{i}.slow.test" for i in range(32)]
    outcome = hang_and_send_healthy(dns, hosts)
    assert_healthy_unharmed(outcome, looked_up=LOOKUPS_PER_DOMAIN, queued=32 - LOOKUPS_PER_DOMAIN)
    assert dns.most_blocked == LOOKUPS_PER_DOMAIN  # 4 threads, not 32
    # The 28 that waited their turn (holding no thread) were looked up once released,
    # each once, though every send that asked had given up by then.
    deadline = time.monotonic() + 5
    while len(dns.started) < 33 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(dns.started) == sorted([*hosts, "ok.fast.test"])


def test_hanging_names_over_eight_domains_leave_a_ninth_its_lookup(dns: Dns) -> None:
    """32 hanging names, 4 on each of 8 domains: each domain is at its cap, and together
    they hold 32 threads, half the pool."""
    hosts = [f"hang-{i}.slow{i % 8}.test" for i in range(32)]
    outcome = hang_and_send_healthy(dns, hosts)
    assert_healthy_unharmed(outcome, looked_up=32, queued=0)
    assert dns.most_blocked == 32


def test_hanging_dns_on_fifteen_domains_leaves_a_healthy_name_a_thread(dns: Dns) -> None:
    """The pool is sized so that it takes hanging DNS on RESOLVER_THREADS //
    LOOKUPS_PER_DOMAIN domains (16) at once to fill it: with one fewer (15), each with
    more names than its cap, a healthy name still finds a thread."""
    cap = LOOKUPS_PER_DOMAIN
    domains = RESOLVER_THREADS // cap - 1
    hosts = [f"hang-{i}.slow{i % domains}.test" for i in range(domains * (cap + 2))]
    outcome = hang_and_send_healthy(dns, hosts)
    assert_healthy_unharmed(outcome, looked_up=domains * cap, queued=domains * 2)
    assert dns.most_blocked == domains * cap


def fill(policy: DestinationPolicy, hosts: list[str]) -> list[asyncio.Task[list[Address]]]:
    return [asyncio.create_task(policy.addresses(host, 80)) for host in hosts]


def test_lookups_beyond_the_cap_start_in_the_order_asked(dns: Dns) -> None:
    cap = LOOKUPS_PER_DOMAIN
    hosts = [f"hang-{i}.slow.test" for i in range(cap + 3)]

    async def go() -> None:
        policy = DestinationPolicy()
        tasks = fill(policy, hosts)
        await until(lambda: dns.blocked == cap)
        await asyncio.sleep(0.1)
        assert sorted(dns.started) == sorted(hosts[:cap])  # the rest wait, holding no thread
        for i in range(3):  # each time one of the domain's lookups ends, the next one starts
            dns.release(hosts[i])
            await until(dns.has_started(cap + i + 1))
            assert dns.started[-1] == hosts[cap + i]
        dns.release_all()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            assert isinstance(result, httpx.ConnectError) and "cannot resolve" in str(result)
        await policy.aclose()

    asyncio.run(go())


def test_a_waiting_lookup_is_shared_and_each_request_keeps_its_own_deadline(dns: Dns) -> None:
    """Two requests for a name queued behind its domain's cap: the one that gives up first
    does not cancel the lookup; the other gets its answer, checked like any other (here:
    refused, it is loopback). A lookup every request gave up on still runs in its turn."""
    cap = LOOKUPS_PER_DOMAIN
    hosts = [f"hang-{i}.slow.test" for i in range(cap)]

    async def go() -> None:
        policy = DestinationPolicy()
        tasks = fill(policy, hosts)
        await until(lambda: dns.blocked == cap)
        impatient = asyncio.create_task(asyncio.wait_for(policy.addresses("ok.slow.test", 80), 0.2))
        patient = asyncio.create_task(asyncio.wait_for(policy.addresses("ok.slow.test", 80), 5))
        abandoned = asyncio.create_task(asyncio.wait_for(policy.addresses("ok.again.slow.test", 80), 0.2))
        with pytest.raises(TimeoutError):
            await impatient
        with pytest.raises(TimeoutError):
            await abandoned
        assert not patient.done() and "ok.slow.test" not in dns.started
        dns.release(hosts[0])
        with pytest.raises(BlockedDestination, match=r"ok\.slow\.test is 127\.0\.0\.1 \(loopback\)"):
            await patient
        dns.release_all()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: "ok.again.slow.test" in dns.started)
        assert dns.started.count("ok.slow.test") == 1  # one lookup for both requests
        await policy.aclose()

    asyncio.run(go())


def test_the_names_waiting_per_domain_are_bounded(dns: Dns) -> None:
    """Beyond DOMAIN_QUEUE_LIMIT distinct names waiting on one domain, a lookup is refused
    at once (LookupQueued: the delivery is deferred, no attempt spent) instead of growing
    the queue; a name already waiting is still shared, and other domains are unaffected."""
    cap, limit = LOOKUPS_PER_DOMAIN, DOMAIN_QUEUE_LIMIT
    hosts = [f"hang-{i}.slow.test" for i in range(cap + limit)]

    async def go() -> None:
        policy = DestinationPolicy(allow_private=True)
        tasks = fill(policy, hosts)
        await until(lambda: dns.blocked == cap)
        started = time.perf_counter()
        with pytest.raises(LookupQueued) as refused:
            await policy.addresses("hang-one-too-many.slow.test", 80)
        assert time.perf_counter() - started < 0.1
        assert str(refused.value).startswith("the resolver queue for slow.test is full")
        again = asyncio.create_task(policy.addresses(hosts[-1], 80))  # waiting already: shared
        assert await policy.addresses("ok.fast.test", 80) == [LOOPBACK_ADDRESS]
        assert not again.done()
        dns.release_all()
        for result in await asyncio.gather(*tasks, again, return_exceptions=True):
            assert isinstance(result, httpx.ConnectError) and "Temporary failure" in str(result)
        assert await policy.addresses("ok.slow.test", 80) == [LOOPBACK_ADDRESS]  # room again
        await policy.aclose()

    asyncio.run(go())
    assert sorted(dns.started) == sorted([*hosts, "ok.fast.test", "ok.slow.test"])  # each once
    assert dns.most_blocked == cap


def test_closing_lets_the_waiting_lookups_finish_then_lets_the_threads_go(dns: Dns) -> None:
    cap = LOOKUPS_PER_DOMAIN
    before = set(threading.enumerate())

    def resolver_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("resolver") and t not in before]

    async def go() -> None:
        policy = DestinationPolicy(allow_private=True)
        tasks = fill(policy, [f"hang-{i}.slow.test" for i in range(cap)])
        waiting = asyncio.create_task(policy.addresses("ok.slow.test", 80))
        await until(lambda: dns.blocked == cap)
        await policy.aclose()
        dns.release_all()
        assert await asyncio.wait_for(waiting, 5) == [LOOPBACK_ADDRESS]  # an answer, not a cancellation
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: not resolver_threads())
        # A lookup after the close gets threads again (the registry's check does that).
        assert await policy.addresses("ok.fast.test", 80) == [LOOPBACK_ADDRESS]
        await policy.aclose()
        await until(lambda: not resolver_threads())

    asyncio.run(go())
