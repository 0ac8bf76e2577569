"""Which network destinations deliveries may reach: the SSRF guard.

Customers type the URLs we POST to, so by default the gateway refuses loopback, private
(RFC 1918), link-local (169.254.0.0/16, including cloud metadata services), CGNAT,
multicast, reserved and unspecified addresses, and their IPv6 equivalents (IPv4-mapped
addresses are judged by the IPv4 address they carry). ``allow_private_networks`` lifts
the rule (the embedded demo and tests); ``allowed_networks`` lists CIDRs that stay
reachable.

A hostname is judged by every address it resolves to: one refused address refuses it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpx

from .records import BLOCKED_PREFIX  # the error text of a refusal starts with it

__all__ = ["DestinationPolicy", "BLOCKED_PREFIX", "BlockedDestination"]


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class DestinationPolicy:
    def __init__(self, *, allow_private: bool = False, allowed: Iterable[Network] = ()) -> None:
        self.allow_private = allow_private
        self.allowed = tuple(allowed)

    def refusal(self, address: Address) -> str | None:
        """Why ``address`` is refused, or None when deliveries may reach it."""
        if self.allow_private:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return None
        for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(address, f"is_{kind}"):
                return kind.replace("_", "-")
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
        addresses = await _resolve(host, port)
        for address in addresses:
            why = self.refusal(address)
            if why is not None:
                raise BlockedDestination(f"{BLOCKED_PREFIX}: {host} is {address} ({why})")
        return addresses


class BlockedDestination(Exception):
    """A connection the policy refuses; the message starts with ``blocked destination``."""


async def _resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
    seen: dict[Address, None] = {}
    for info in infos:
        seen[ipaddress.ip_address(str(info[4][0]).split("%")[0])] = None
    return list(seen)
