"""The endpoint table at scale and under concurrent reads (gateway.store.EndpointTable).

A worker loads the whole endpoints topic before it delivers anything, and the registry's
thread keeps applying changes while the dispatcher reads: loading must stay linear in the
number of endpoints, and a reader must never see a half-applied change or an iteration
over a dictionary that is being resized.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid

import pytest

from gateway.records import Endpoint
from gateway.store import EndpointTable

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
N = 100_000
# Linear work on 100,000 endpoints takes well under a second here; a table that rescans
# every endpoint per change needs ~5·10⁹ steps, minutes at the least.
BOUND = 15.0

pytestmark = pytest.mark.timeout(120)


def endpoints(count: int, bots: int) -> list[Endpoint]:
    bot_ids = [str(uuid.uuid4()) for _ in range(bots)]
    return [
        Endpoint(id=f"e{i}", bot_id=bot_ids[i % bots], url=f"https://example.com/{i}",
                 secret=SECRET, created_at=i, updated_at=i)
        for i in range(count)
    ]


def test_100k_endpoints_over_many_bots_apply_one_by_one_in_linear_time() -> None:
    registered = endpoints(N, bots=N // 10)
    table = EndpointTable()
    started = time.monotonic()
    for endpoint in registered:
        table.apply(endpoint.id, endpoint)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"{N} endpoints applied in {elapsed:.1f} s"
    assert len(table) == N
    first = registered[0]
    assert [e.id for e in table.for_event(first.bot_id, "MESSAGE")] == [f"e{i}" for i in range(0, N, N // 10)]


def test_100k_endpoints_of_one_bot_load_in_linear_time() -> None:
    registered = endpoints(N, bots=1)
    table = EndpointTable()
    started = time.monotonic()
    table.load((e.id, e) for e in registered)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"{N} endpoints of one bot loaded in {elapsed:.1f} s"
    assert len(table) == N
    assert len(table.for_event(registered[0].bot_id.upper(), "TICKET")) == N
    # One change after the load costs that bot's endpoints, not a reload.
    started = time.monotonic()
    table.apply("e0", None)
    assert time.monotonic() - started < BOUND / 10
    assert len(table.for_event(registered[0].bot_id, "TICKET")) == N - 1


def test_load_applies_records_in_order_as_apply_does() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = Endpoint(id="x", bot_id=a, url="https://example.com/x", secret=SECRET,
                     created_at=1, updated_at=1)
    moved = Endpoint(id="x", bot_id=b.upper(), url="https://example.com/x", secret=SECRET,
                     created_at=1, updated_at=2)
    other = Endpoint(id="y", bot_id=a, url="https://example.com/y", secret=SECRET,
                     created_at=2, updated_at=2)
    table = EndpointTable()
    table.load([("x", first), ("y", other), ("x", moved), ("y", None), ("z", None)])
    assert len(table) == 1 and table.counts() == (1, 0)
    assert table.get("x") is moved and table.get("y") is None
    assert table.for_event(a, "MESSAGE") == []
    assert table.for_event(b, "MESSAGE") == [moved]


def test_readers_never_see_a_half_applied_change() -> None:
    """Reader threads walk the table while the writer applies 20,000 changes that add,
    move between bots and remove endpoints: no reader ever fails, and every answer is one
    the table held between two changes."""
    bots = [str(uuid.uuid4()) for _ in range(4)]
    table = EndpointTable()
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = 0

    def read() -> None:
        nonlocal reads
        try:
            while not stop.is_set():
                everything = table.all()
                # Each id at most once: an endpoint being moved is never listed twice.
                assert len({e.id for e in everything}) == len(everything)
                for bot in bots:
                    for endpoint in table.for_event(bot, "MESSAGE"):
                        assert endpoint.bot_id == bot
                    for endpoint in table.for_bot(bot):
                        assert endpoint.bot_id == bot
                len(table)
                reads += 1
        except BaseException as exc:
            failures.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(20_000):
            endpoint_id = f"e{i % 500}"
            if i % 7 == 6:
                table.apply(endpoint_id, None)
            else:
                table.apply(endpoint_id, Endpoint(
                    id=endpoint_id, bot_id=bots[i % len(bots)], url="https://example.com/",
                    secret=SECRET, created_at=i, updated_at=i))
            if i % 100 == 0:
                time.sleep(0)  # let the readers in
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)
    assert failures == []
    assert reads > 0
