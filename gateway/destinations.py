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

__all__ = ["DestinationPolicy", "BLOCKED_PREFIX"]

BLOCKED_PREFIX = "blocked destination"

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
        """None when ``host`` may be reached, else the error of a blocked attempt."""
        if self.allow_private:
            return None
        try:
            addresses: list[Address] = [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                return None  # the attempt itself will fail with a connection error
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        for address in addresses:
            why = self.refusal(address)
            if why is not None:
                return f"{BLOCKED_PREFIX}: {host} is {address} ({why})"
        return None
