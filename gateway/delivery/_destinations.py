"""Which network destinations deliveries may reach: the SSRF guard, and the name lookups it judges.

Customers type the URLs we POST to, so by default the gateway refuses loopback, private
(RFC 1918), link-local (169.254.0.0/16, including cloud metadata services), CGNAT,
multicast, reserved and unspecified addresses, and their IPv6 equivalents (site-local
``fec0::/10`` too). IPv6 addresses that carry an IPv4 address (IPv4-mapped, 6to4,
Teredo, NAT64) are judged by the IPv4 address they carry. ``allow_private_networks`` lifts
the rule (the embedded demo and tests); ``allowed_networks`` lists CIDRs that stay
reachable.

A hostname is judged by every address it resolves to: one refused address refuses it.

How names are resolved, so that one tenant's DNS cannot starve another's:

* With the system resolver (``getaddrinfo``), on the policy's own threads, never the
  event loop's default executor: a lookup cannot be abandoned half-way, so one that hangs
  holds its thread until the resolver gives up.
* One lookup per (name, port) at a time, however many requests wait for it. Each request
  keeps its own deadline; one that gives up leaves the lookup running for the others
  (and for the next request to that name).
* At most :data:`LOOKUPS_PER_DOMAIN` (4) lookups in flight per registrable domain
  (:func:`registrable_domain`). More wait in the domain's FIFO queue, holding no thread,
  and start one by one as the domain's lookups finish. Measured with the issue's case
  (``tests/test_dns_fairness.py``, 3 runs): 32 endpoints on one domain whose DNS hangs
  took all 32 threads, and a healthy endpoint's send timed out at its 1 s deadline
  waiting for one; now they hold 4, and the healthy send is answered in 1.4-2.9 ms.
* At most :data:`DOMAIN_QUEUE_LIMIT` (1,000) distinct names wait per domain; a lookup
  beyond that fails at once with a connection error (the attempt is retried later), so
  a domain whose DNS hangs cannot grow the queue without bound.
* :data:`RESOLVER_THREADS` (64) is 16 times the cap, the choice between raising the pool
  and sharing it out: 32 hanging names over 8 domains hold 32 threads, half of it, and it
  takes hanging DNS on 16 registrable domains at once, however many names each has, to
  fill it (on 15, a healthy name still finds a thread; with every thread taken, lookups
  queue in the pool in the order they started). Threads start only when lookups overlap,
  so the size costs nothing until it is needed. No share per tenant: the policy is given
  a host name, not the tenant asking (that would need the sender to pass the bot id
  down), and a tenant owning many domains gets a cap on each. What would remove the
  limit is a resolver needing no thread per lookup, with timeouts of its own (c-ares,
  through aiodns): a new native dependency, and it would resolve names differently from
  the system (hosts file and DNS only, not the other name services ``nsswitch.conf``
  may list).

The registrable domain comes from the public suffix list, as bundled (and kept up to
date) by the ``publicsuffixlist`` package, read offline: ``a.abc.io`` and ``b.abc.io`` share
one cap, while tenants of a hosting suffix (``t1.herokuapp.com``, ``x.s3.amazonaws.com``)
each get their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import socket
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from publicsuffixlist import PublicSuffixList

from ..errors import BlockedDestination, LookupQueued

__all__ = [
    "BLOCKED_PREFIX",
    "DOMAIN_QUEUE_LIMIT",
    "LOOKUPS_PER_DOMAIN",
    "RESOLVER_THREADS",
    "Address",
    "DestinationPolicy",
    "Network",
    "registrable_domain",
]


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVER_THREADS = 64
"""Threads each policy may use for lookups, started as lookups overlap. 16 times
:data:`LOOKUPS_PER_DOMAIN`: it takes 16 registrable domains with hanging DNS to fill."""

LOOKUPS_PER_DOMAIN = 4
"""Lookups in flight at once for names under one registrable domain; the rest wait,
holding no thread. Well below :data:`RESOLVER_THREADS`, so one domain whose DNS hangs
cannot hold up the lookups of others."""

DOMAIN_QUEUE_LIMIT = 1_000
"""Distinct (name, port) lookups that may wait for one registrable domain; a lookup
beyond that fails at once (``httpx.ConnectError``)."""

BLOCKED_PREFIX = "blocked destination"
"""How the text of a refusal begins."""


class DestinationPolicy:
    """Which addresses deliveries may reach, and the name lookups that find them.
    ``resolver_threads`` bounds the lookups in flight at once (:data:`RESOLVER_THREADS`)."""

    def __init__(self, *, allow_private: bool = False, allowed: Iterable[Network] = (),
                 resolver_threads: int = RESOLVER_THREADS, queue_wait: float | None = None) -> None:
        self.allow_private = allow_private
        self.allowed = tuple(allowed)
        self.queue_wait = queue_wait
        """Longest a request waits for its lookup to start, behind its domain's others
        (then :class:`~gateway.errors.LookupQueued`: a local wait is not an attempt);
        None: as long as the caller's own deadline."""
        self._resolver = _Resolver(resolver_threads)

    def refusal(self, address: Address) -> str | None:
        """Why ``address`` is refused, or None when deliveries may reach it. An IPv6
        address that carries an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64) is judged by
        what it carries: that is where the packets go."""
        if self.allow_private:
            return None
        if any(address in network for network in self.allowed):
            return None
        carried = embedded_ipv4(address)
        if not carried:
            return self._refusal(address)
        for inner in carried:
            why = self._refusal(inner)
            if why is not None:
                return why if inner == getattr(address, "ipv4_mapped", None) else f"{why}, carried in {inner}"
        return None

    def _refusal(self, address: Address) -> str | None:
        if any(address in network for network in self.allowed):
            return None
        for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(address, f"is_{kind}"):
                return kind.replace("_", "-")
        if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
            return "site-local"  # fec0::/10: deprecated, but routed inside some networks
        if not address.is_global:
            return "not public"
        return None

    async def check(self, host: str, port: int) -> str | None:
        """None when ``host`` may be reached, else why not (for warnings at registration)."""
        if self.allow_private:
            return None
        try:
            await self.addresses(host, port)
        except BlockedDestination as exc:
            return str(exc)
        except httpx.ConnectError:
            pass  # an attempt would fail with a connection error
        return None

    async def addresses(self, host: str, port: int) -> list[Address]:
        """The addresses to connect to for ``host``, every one checked.

        The name is resolved once, here, and the connection goes to one of these
        addresses: a name that resolves to a public address when checked and to
        127.0.0.1 a moment later (DNS rebinding) cannot slip through, because nothing
        resolves it again. Raises :class:`BlockedDestination` if any address is refused,
        ``httpx.ConnectError`` if the name does not resolve, and
        :class:`~gateway.errors.LookupQueued` if :data:`DOMAIN_QUEUE_LIMIT` names of its
        domain wait for a lookup already, or if its lookup did not start within
        :attr:`queue_wait`.
        """
        addresses = await self._resolve(host, port)
        for address in addresses:
            why = self.refusal(address)
            if why is not None:
                raise BlockedDestination(f"{BLOCKED_PREFIX}: {host} is {address} ({why})")
        return addresses

    async def _resolve(self, host: str, port: int) -> list[Address]:
        try:
            return [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            pass
        resolver = self._resolver
        try:
            lookup = resolver.lookup(host, port)
            if self.queue_wait is not None and resolver.queued(host, port):
                try:
                    async with asyncio.timeout(self.queue_wait):
                        infos = await _answer(lookup)
                except TimeoutError:
                    if not resolver.queued(host, port):  # its turn came just now
                        raise
                    raise LookupQueued(f"the lookup of {host} waits behind other names of "
                                       f"{registrable_domain(host)} for longer than {self.queue_wait:g} s") from None
            else:
                infos = await _answer(lookup)
        except (OSError, UnicodeError) as exc:  # a name IDNA cannot encode is one too
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
        seen: dict[Address, None] = {}
        for info in infos:
            seen[ipaddress.ip_address(str(info[4][0]).split("%")[0])] = None
        return list(seen)

    async def aclose(self) -> None:
        """Let the resolver threads go once the lookups asked for are done, those still
        waiting for their domain's turn included (not cancelled: a request waiting on one
        gets its answer, not a cancellation it never asked for). A lookup asked for
        afterwards gets threads again."""
        self._resolver.close()


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped (``::ffff:a.b.c.d``), 6to4
    (``2002::/16``), Teredo (``2001::/32``: its server and its client), NAT64
    (``64:ff9b::/96``). Empty for any other address."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    if address in _NAT64:
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return ()


@functools.cache
def _suffixes() -> PublicSuffixList:
    """The public suffix list bundled with the ``publicsuffixlist`` package (its ICANN
    and private sections): read from the installed package, never fetched at run time.
    Loaded when first needed, not at import."""
    return PublicSuffixList()


def registrable_domain(host: str) -> str:
    """The domain whose owner controls the DNS of ``host``: by the public suffix list,
    the public suffix and one label more (``hooks.example.com``: ``example.com``;
    ``api.bbc.co.uk``: ``bbc.co.uk``; ``t1.herokuapp.com``: itself, since every tenant of
    a hosting suffix owns its name). In lower case, without a final dot; a name that is
    itself a public suffix (or none: ``localhost``) is its own domain, and so is an IP
    literal."""
    name = host.strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    return _suffixes().privatesuffix(name) or name


def _getaddrinfo(host: str, port: int) -> list[Any]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)



_Key = tuple[str, int]
"""What one lookup answers: a name and a port."""
_Lookup = concurrent.futures.Future[list[Any]]
"""A lookup's ``getaddrinfo`` answer, shared by every request for its (name, port)."""


@dataclass
class _Domain:
    """One registrable domain's lookups: how many are in flight (each on a thread, or
    queued for one in the pool), and which wait for one of them to finish (FIFO)."""

    running: int = 0
    waiting: deque[_Key] = field(default_factory=deque)


class _Resolver:
    """``getaddrinfo`` on threads of its own: one lookup per (name, port) at a time, at
    most :data:`LOOKUPS_PER_DOMAIN` in flight per registrable domain, the rest waiting in
    the domain's queue (at most :data:`DOMAIN_QUEUE_LIMIT`).

    Lookups are asked for on event loops and end on the resolver threads, which start the
    domain's next waiting lookup there and then, loop or no loop: the state is kept under
    one lock. What is handed out is a ``concurrent.futures.Future``, which any loop can
    wait on (a policy can outlive a loop: the registry's check runs one per call)."""

    def __init__(self, threads: int = RESOLVER_THREADS) -> None:
        self._threads = threads
        self._lock = threading.Lock()
        self._lookups: dict[_Key, _Lookup] = {}
        """In flight or waiting, so that a second request for a name shares the first's."""
        self._domains: dict[str, _Domain] = {}
        """Domains with a lookup in flight; forgotten when their last one ends."""
        self._running = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        """Closed while lookups were in flight: the pool goes when the last one ends."""

    def lookup(self, host: str, port: int) -> _Lookup:
        """The lookup of (``host``, ``port``): shared if one is in flight or waiting, else
        started now or queued behind its domain's. Raises ``OSError`` when the domain's
        queue is full."""
        key = (host, port)
        with self._lock:
            lookup = self._lookups.get(key)
            if lookup is not None:
                return lookup
            name = registrable_domain(host)
            domain = self._domains.setdefault(name, _Domain())
            if domain.running >= LOOKUPS_PER_DOMAIN:
                if len(domain.waiting) >= DOMAIN_QUEUE_LIMIT:
                    raise LookupQueued(f"the resolver queue for {name} is full: {len(domain.waiting)} names wait for "
                                       f"its {domain.running} lookups in flight (its DNS answers slowly or not at all)")
                lookup = self._lookups[key] = concurrent.futures.Future()
                domain.waiting.append(key)
                return lookup
            lookup = self._lookups[key] = concurrent.futures.Future()
            domain.running += 1
            executor = self._pool_for_one_more()
        self._start(executor, key, lookup, name)
        return lookup

    def queued(self, host: str, port: int) -> bool:
        """Whether the lookup of (``host``, ``port``) waits for its domain's turn (not yet
        started on a thread)."""
        with self._lock:
            domain = self._domains.get(registrable_domain(host))
            return domain is not None and (host, port) in domain.waiting

    def _pool_for_one_more(self) -> concurrent.futures.ThreadPoolExecutor:
        """The pool, counting one more lookup in flight (under the lock)."""
        self._running += 1
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="resolver")
        return self._executor

    def _start(self, executor: concurrent.futures.ThreadPoolExecutor, key: _Key, lookup: _Lookup,
               name: str) -> None:
        try:
            running = executor.submit(_getaddrinfo, *key)
        except RuntimeError as exc:  # the interpreter is exiting
            running = concurrent.futures.Future()
            running.set_exception(OSError(f"no resolver thread: {exc}"))
        running.add_done_callback(functools.partial(self._finished, key, lookup, name))

    def _finished(self, key: _Key, lookup: _Lookup, name: str, done: _Lookup) -> None:
        """On the thread that ran ``key``'s lookup: hand its place to the domain's next
        waiting lookup, and answer the requests waiting for this one."""
        following: tuple[concurrent.futures.ThreadPoolExecutor, _Key, _Lookup] | None = None
        retired = None
        with self._lock:
            self._running -= 1
            del self._lookups[key]  # the next request for the name resolves it afresh
            domain = self._domains[name]
            if domain.waiting:
                waiting = domain.waiting.popleft()
                following = (self._pool_for_one_more(), waiting, self._lookups[waiting])
            else:
                domain.running -= 1
                if not domain.running:
                    del self._domains[name]
            if self._closing and not self._running:
                retired, self._executor, self._closing = self._executor, None, False
        error = done.exception()
        if error is None:
            lookup.set_result(done.result())
        else:
            lookup.set_exception(error)
        if following is not None:
            self._start(*following, name)
        if retired is not None:
            retired.shutdown(wait=False)

    def close(self) -> None:
        """Let the threads go once every lookup in flight or waiting has ended."""
        with self._lock:
            if self._running:
                self._closing = True
                return
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


async def _answer(lookup: _Lookup) -> list[Any]:
    """What the shared ``lookup`` answers. Cancelling this wait (a request's deadline)
    leaves the lookup alone, for the others, and leaves nothing behind: a shielded
    wrapped future, when every request had given up, ended with an exception nobody
    retrieved, and asyncio logged it as an error."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[list[Any]] = loop.create_future()

    def answered(done: _Lookup) -> None:  # on the resolver thread, or here if done already
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, waiter, done)

    lookup.add_done_callback(answered)
    return await waiter


def _settle(waiter: asyncio.Future[list[Any]], done: _Lookup) -> None:
    if waiter.done():  # the request gave up meanwhile
        return
    error = done.exception()
    if error is None:
        waiter.set_result(done.result())
    else:
        waiter.set_exception(error)
