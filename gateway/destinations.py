"""Which network destinations deliveries may reach: the SSRF guard.

Customers type the URLs we POST to, so by default the gateway refuses loopback, private
(RFC 1918), link-local (169.254.0.0/16, including cloud metadata services), CGNAT,
multicast, reserved and unspecified addresses, and their IPv6 equivalents (site-local
``fec0::/10`` too). IPv6 addresses that carry an IPv4 address (IPv4-mapped, 6to4,
Teredo, NAT64) are judged by the IPv4 address they carry. ``allow_private_networks`` lifts
the rule (the embedded demo and tests); ``allowed_networks`` lists CIDRs that stay
reachable.

A hostname is judged by every address it resolves to: one refused address refuses it.

Names are resolved on the policy's own threads (``RESOLVER_THREADS``), one lookup per
name at a time however many requests wait for it: a name whose DNS hangs holds one
thread, not the event loop's default executor, so it cannot stall the lookups of other
endpoints.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpx

__all__ = ["BLOCKED_PREFIX", "BlockedDestination", "DestinationPolicy"]


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVER_THREADS = 32

BLOCKED_PREFIX = "blocked destination"
"""How the text of a refusal begins."""


class DestinationPolicy:
    def __init__(self, *, allow_private: bool = False, allowed: Iterable[Network] = ()) -> None:
        self.allow_private = allow_private
        self.allowed = tuple(allowed)
        self._lookups: dict[tuple[str, int], concurrent.futures.Future[Any]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

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
        ``httpx.ConnectError`` if the name does not resolve.
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
        key = (host, port)
        lookup = self._lookups.get(key)
        if lookup is None:  # the first to ask: later ones wait for the same lookup
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    RESOLVER_THREADS, thread_name_prefix="resolver")
            lookup = self._lookups[key] = self._executor.submit(_getaddrinfo, host, port)
            lookup.add_done_callback(lambda done: self._forget(key, done))
        try:
            # Shielded: a request that gives up (its deadline) leaves the lookup running
            # for the others waiting on it.
            infos = await asyncio.shield(asyncio.wrap_future(lookup))
        except (OSError, UnicodeError) as exc:  # a name IDNA cannot encode is one too
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
        seen: dict[Address, None] = {}
        for info in infos:
            seen[ipaddress.ip_address(str(info[4][0]).split("%")[0])] = None
        return list(seen)

    def _forget(self, key: tuple[str, int], done: concurrent.futures.Future[Any]) -> None:
        if self._lookups.get(key) is done:
            del self._lookups[key]

    async def aclose(self) -> None:
        """Let the resolver threads go once the lookups asked for are done (not cancelled:
        a request waiting on one gets its answer, not a cancellation it never asked for)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


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


class BlockedDestination(Exception):
    """A connection the policy refuses; the message starts with ``blocked destination``."""


def _getaddrinfo(host: str, port: int) -> list[Any]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
