"""The SSRF guard's decisions (pure), and name resolution through the real resolver."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys

import pytest

from gateway.delivery import BLOCKED_PREFIX, DestinationPolicy, registrable_domain


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


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        # Fault: fec0::/10 (site-local, deprecated but still routed inside some networks)
        # was allowed, and 6to4 and Teredo were not judged by the IPv4 they carry.
        ("fec0::1", "site-local"), ("feff:ffff::1", "site-local"),
        ("2002:7f00:1::1", "loopback, carried in 127.0.0.1"),
        ("2002:a9fe:a9fe::1", "link-local, carried in 169.254.169.254"),
        ("2002:0a00:0001::", "private, carried in 10.0.0.1"),
        ("2002:5db8:d822::1", None),  # 6to4 of a public address
        # Teredo: server 65.54.227.120, client 192.0.2.45 (documentation range)
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private, carried in 192.0.2.45"),
        # Teredo with a client in 127.0.0.1 (obfuscated: each bit flipped)
        (f"2001:0:5db8:d822:0:0:{0xffff - 0x7f00:x}:{0xffff - 0x0001:x}", "loopback, carried in 127.0.0.1"),
        # Teredo of public server and client
        (f"2001:0:5db8:d822:0:0:{0xffff - 0x5db8:x}:{0xffff - 0xd823:x}", None),
        ("64:ff9b::7f00:1", "loopback, carried in 127.0.0.1"),  # NAT64
        ("64:ff9b::5db8:d822", None),
    ],
)
def test_ipv6_addresses_are_judged_by_the_ipv4_they_carry(address: str, refused: str | None) -> None:
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


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("example.com", "example.com"), ("hooks.example.com", "example.com"),
        ("a.b.c.hooks.example.com", "example.com"), ("Hooks.EXAMPLE.com.", "example.com"),
        ("hang-7.slow.test", "slow.test"), ("xn--fa-hia.test", "xn--fa-hia.test"),
        # Under a country code's public suffixes: one label more than the suffix.
        ("bbc.co.uk", "bbc.co.uk"), ("www.bbc.co.uk", "bbc.co.uk"), ("api.shop.com.au", "shop.com.au"),
        ("x.y.ne.jp", "y.ne.jp"), ("hooks.example.de", "example.de"), ("hooks.abc.de", "abc.de"),
        # One owner, one cap: a.abc.io and b.abc.io are one domain.
        ("a.abc.io", "abc.io"), ("b.abc.io", "abc.io"), ("a.b.example.io", "example.io"), ("hooks.abc.com", "abc.com"),
        # Tenants of a hosting suffix (the list's private section) each own their name.
        ("t1.herokuapp.com", "t1.herokuapp.com"), ("hooks.t2.herokuapp.com", "t2.herokuapp.com"),
        ("bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"), ("a.co.com", "a.co.com"),
        # A public suffix, or a name with none, is its own domain.
        ("co.uk", "co.uk"), ("s3.amazonaws.com", "s3.amazonaws.com"), ("localhost", "localhost"),
        ("2130706433", "2130706433"), ("127.1", "127.1"),
        # IP literals (never resolved) are their own domain.
        ("10.1.2.3", "10.1.2.3"), ("[2001:db8::1]", "2001:db8::1"),
    ],
)
def test_the_registrable_domain_is_read_from_the_public_suffix_list(host: str, domain: str) -> None:
    """Fault: domains were grouped by their last labels, so ``a.abc.io`` and ``b.abc.io``
    got a cap each while every tenant under ``*.amazonaws.com`` shared one."""
    assert registrable_domain(host) == domain


def test_the_public_suffix_list_is_never_fetched() -> None:
    """The list is the one installed with the package: loading it, in a fresh process
    where every connection is refused, opens none."""
    program = (
        "import socket\n"
        "def refuse(*a, **k): raise SystemExit('a connection was opened to read the public suffix list')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from gateway.delivery import registrable_domain\n"
        "print(registrable_domain('fresh.name.example.org'))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "example.org", done.stderr
