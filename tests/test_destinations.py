"""The SSRF guard's decisions (pure), and name resolution through the real resolver."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from gateway.destinations import BLOCKED_PREFIX, DestinationPolicy


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
        ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("100.64.1.1", "not public"),
        ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
        ("::1", "loopback"), ("fe80::1", "link-local"), ("fc00::1", "private"),
        ("::ffff:10.0.0.1", "private"), ("8.8.8.8", None), ("2001:4860::8888", None),
    ],
)
def test_non_public_addresses_are_refused(address: str, refused: str | None) -> None:
    assert DestinationPolicy().refusal(ipaddress.ip_address(address)) == refused


def test_allow_lists_open_exactly_what_they_name() -> None:
    policy = DestinationPolicy(allowed=[ipaddress.ip_network("10.0.0.0/8")])
    assert policy.refusal(ipaddress.ip_address("10.9.9.9")) is None
    assert policy.refusal(ipaddress.ip_address("192.168.0.1")) == "private"
    assert DestinationPolicy(allow_private=True).refusal(ipaddress.ip_address("127.0.0.1")) is None


def test_hostnames_are_judged_by_what_they_resolve_to() -> None:
    blocked = asyncio.run(DestinationPolicy().check("localhost", 80))
    assert blocked is not None and blocked.startswith(BLOCKED_PREFIX) and "localhost" in blocked
    assert asyncio.run(DestinationPolicy().check("[::1]", 80)) is not None
    assert asyncio.run(DestinationPolicy(allow_private=True).check("localhost", 80)) is None
