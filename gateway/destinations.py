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
from typing import Any

import httpcore
from httpcore._backends.auto import AutoBackend

from .records import BLOCKED_PREFIX  # the error text of a refusal starts with it

__all__ = ["DestinationPolicy", "BLOCKED_PREFIX", "BlockedDestination", "GuardedBackend"]


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
            addresses = await _resolve(host, port)
        except httpcore.ConnectError:
            return None  # an attempt would fail with a connection error
        for address in addresses:
            why = self.refusal(address)
            if why is not None:
                return f"{BLOCKED_PREFIX}: {host} is {address} ({why})"
        return None


class BlockedDestination(Exception):
    """A connection the policy refuses; the message starts with ``blocked destination``."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy applied at connection time.

    The hostname is resolved once, here; every address is checked, and the connection
    goes to a checked address. A name that resolves to a public address when checked and
    to 127.0.0.1 a moment later (DNS rebinding) cannot slip through, because nothing
    resolves it again. TLS still verifies the certificate against the hostname (httpcore
    passes it to ``start_tls`` separately).
    """

    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy
        self._inner = AutoBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port)
        for address in addresses:
            why = self.policy.refusal(address)
            if why is not None:
                raise BlockedDestination(f"{BLOCKED_PREFIX}: {host} is {address} ({why})")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} resolved to no address")

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedDestination(f"{BLOCKED_PREFIX}: unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    seen: dict[Address, None] = {}
    for info in infos:
        seen[ipaddress.ip_address(str(info[4][0]).split("%")[0])] = None
    return list(seen)
