"""What the settings page needs, over real HTTP on a real broker: the event types with
their schema and documented example, an endpoint's stats from the history, resending a
delivery that succeeded, dead letters newest first a page at a time, health and
readiness, and the server's own limits (slow heads, big heads, slow bodies, too many
connections)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from gateway.api import CALLER_CONCURRENCY
from gateway.codec import Codec
from gateway.config import Config
from gateway.records import CIRCUIT_SCHEMA, Circuit, CircuitState, Outcome
from gateway.store import Topics, create_topics

from .conftest import DOCS, private_broker, run_gateway
from .receiver import Receiver
from .test_api import (
    BOT,
    BOT_TOKEN,
    EXAMPLES,
    ISO,
    OTHER_BOT,
    TOKEN,
    Served,
    create,
    eventually,
    is_problem,
    served,
)
from .test_api_access import attempt, write_attempts, write_dead_letters
from .test_api_writes import raw_request

pytestmark = pytest.mark.integration


@pytest.fixture
def api_http(topics: Config) -> Iterator[Served]:
    with served(topics) as api:
        yield api


def documented() -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """The documentation's example payloads by event type, and each type's fields in the
    documented order (from its shape, comments taken out)."""
    text = DOCS.read_text()
    examples_part = text.split("## Example Payloads", 1)[1]
    found = {}
    for block in re.findall(r"```json\n(.*?)```", examples_part, re.S):
        document = json.loads(block)
        found[document["event"]] = document
    fields = {}
    shapes = text.split("## Event Types and Their Specific Fields", 1)[1].split("## Notes", 1)[0]
    for block in re.findall(r"```json\n(.*?)```", shapes, re.S):
        names = re.findall(r'^\s*"(\w+)":', block, re.M)
        kind = re.search(r'"event":\s*"(\w+)"', block)
        assert kind is not None
        fields[kind.group(1)] = names
    return found, fields


def conforms(document: dict[str, Any], schema: dict[str, Any]) -> bool:
    """The little of JSON Schema the event schemas use: const, type, pattern, required,
    no other properties."""
    if set(schema["required"]) - set(document) or set(document) - set(schema["properties"]):
        return False
    for name, value in document.items():
        rule = schema["properties"][name]
        if "const" in rule and value != rule["const"]:
            return False
        if rule.get("type") == "string" and not isinstance(value, str):
            return False
        if rule.get("type") == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
            return False
        if "pattern" in rule and not re.match(rule["pattern"], value):
            return False
    return True


@pytest.mark.brokers("tansu")  # the API's own answers: no broker behaviour in them
def test_event_types_carry_the_documented_examples_exactly(api_http: Served) -> None:
    for token in (TOKEN, api_http.client().post("/v1/tokens", json={"botId": BOT}).json()["token"]):
        answer = api_http.client(token).get("/v1/event-types")
        assert answer.status_code == 200
        listed = answer.json()["data"]
        assert [t["type"] for t in listed] == ["MESSAGE", "RATE_MESSAGE", "TICKET", "CREATE_LEAD"]
    examples, fields = documented()
    assert set(examples) == {"MESSAGE", "RATE_MESSAGE", "TICKET"}  # the documentation has no CREATE_LEAD example
    shipped = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    for item in listed:
        kind, example = item["type"], item["example"]
        assert list(example) == fields[kind], kind  # the documented fields, in the documented order
        assert list(item["schema"]["properties"]) == fields[kind] and item["schema"]["required"] == fields[kind]
        assert conforms(example, item["schema"]), kind
        assert example == next(d for d in shipped if d["event"] == kind)  # what test sends send
        if kind in examples:
            assert item["documented"] is True
            assert json.dumps(example) == json.dumps(examples[kind]), kind  # the same members, order and values
        else:
            assert item["documented"] is False
    assert not conforms(listed[0]["example"] | {"extra": 1}, listed[0]["schema"])


def test_endpoint_stats_come_from_the_history(api_http: Served, topics: Config) -> None:
    client = api_http.client()
    endpoint_id = create(client).json()["id"]
    other_id = create(client, url="https://example.com/other").json()["id"]
    now = time.time_ns() // 1_000_000
    minute, hour = 60_000, 3_600_000
    write_attempts(
        topics,
        *(attempt(BOT, endpoint_id, at=now - 10 * minute - i) for i in range(3)),
        attempt(BOT, endpoint_id, at=now - 5 * minute, outcome=Outcome.HTTP_ERROR, status=503),
        attempt(BOT, endpoint_id, at=now - 2 * minute, outcome=Outcome.DEFERRED, status=None),
        *(attempt(BOT, endpoint_id, at=now - 5 * hour - i, outcome=Outcome.TIMEOUT, status=None) for i in range(2)),
        attempt(BOT, endpoint_id, at=now - 30 * hour, outcome=Outcome.CONNECTION_ERROR, status=None),
        attempt(BOT, other_id, at=now - minute, outcome=Outcome.HTTP_ERROR, status=500),
    )
    circuits = Topics.from_config(topics).circuits
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers})
    circuit = Circuit(endpoint_id, CircuitState.OPEN, failures=5, changed_at=now - minute, probe_at=now + minute,
                      worker="w1")
    producer.produce(circuits, key=endpoint_id.encode(),
                     value=Codec().encode(CIRCUIT_SCHEMA, circuit.to_record(), topic=circuits))
    assert producer.flush(10) == 0
    eventually(lambda: len(client.get("/v1/deliveries", params={"endpointId": endpoint_id}).json()["data"]) == 8,
               "the history index has the attempts")
    stats = client.get(f"/v1/endpoints/{endpoint_id}/stats")
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert [(w["window"], w["attempts"], w["succeeded"], w["failed"], w["deferred"], w["successRate"])
            for w in body["windows"]] == [("1h", 4, 3, 1, 1, 0.75), ("24h", 6, 3, 3, 1, 0.5)]
    assert all(w["complete"] for w in body["windows"]) and body["completeSince"] is None
    assert body["lastFailure"]["status"] == 503 and body["lastFailure"]["outcome"] == "http_error"
    assert ISO.match(body["lastFailure"]["at"]) and ISO.match(body["lastSuccessAt"])
    assert body["circuit"]["state"] == "open" and body["circuit"]["failures"] == 5
    assert ISO.match(body["circuit"]["since"]) and ISO.match(body["circuit"]["probeAt"])
    quiet = client.get(f"/v1/endpoints/{create(client, url='https://example.com/q').json()['id']}/stats").json()
    assert quiet["windows"][0]["successRate"] is None and quiet["circuit"]["state"] == "closed"
    is_problem(client.get(f"/v1/endpoints/{uuid.uuid4()}/stats"), 404, "not_found")


def test_a_delivery_that_succeeded_is_resent_and_recorded(
    api_http: Served, topics: Config, receiver: Receiver, worker_factory: Any, tmp_path: Path
) -> None:
    client = api_http.client()
    endpoint = create(client, url=receiver.url("/hook")).json()
    worker_factory(topics)
    event = tmp_path / "message.jsonl"
    event.write_text(EXAMPLES.read_text().splitlines()[0] + "\n")
    published = run_gateway(topics, "publish", str(event))
    assert published.returncode == 0, published.stderr
    [event_id] = published.stdout.split()
    receiver.wait_for(lambda: len(receiver.at("/hook")) == 1, 30, "the delivery")
    eventually(lambda: len(client.get("/v1/deliveries", params={"eventId": event_id}).json()["data"]) == 1,
               "the attempt in the history")
    [first] = client.get("/v1/deliveries", params={"eventId": event_id}).json()["data"]
    assert first["outcome"] == "success"

    resent = client.post(f"/v1/deliveries/{first['id']}/resend", headers={"idempotency-key": "resend-1"})
    assert resent.status_code == 202, resent.text
    assert resent.json()["eventId"] == event_id and resent.json()["endpointId"] == endpoint["id"]
    coordinate = f"{Topics.from_config(topics).attempts}:{first['id']}"
    assert resent.json()["replayOf"] == coordinate
    receiver.wait_for(lambda: len(receiver.at("/hook")) == 2, 30, "the resend")
    original, again = receiver.at("/hook")
    assert again.event_id == original.event_id == event_id and again.body == original.body
    eventually(lambda: len(client.get("/v1/deliveries", params={"eventId": event_id}).json()["data"]) == 2,
               "the resend in the history")
    newest = client.get("/v1/deliveries", params={"eventId": event_id}).json()["data"][0]
    assert newest["outcome"] == "success" and newest["replayOf"] == coordinate and newest["id"] != first["id"]
    # The same key: the first answer, nothing sent again.
    retried = client.post(f"/v1/deliveries/{first['id']}/resend", headers={"idempotency-key": "resend-1"})
    assert retried.status_code == 202 and retried.json() == resent.json()
    assert retried.headers["idempotent-replayed"] == "true"
    time.sleep(2)
    assert len(receiver.at("/hook")) == 2


@pytest.mark.brokers("tansu")  # the index's own order: no broker behaviour in it
def test_dead_letters_newest_first_a_page_at_a_time(topics: Config) -> None:
    endpoints = [str(uuid.uuid4()) for _ in range(3)]
    pairs = [(BOT if i % 3 else OTHER_BOT, endpoints[i % 3]) for i in range(7)]
    ids = write_dead_letters(topics, *pairs)
    with served(topics) as api:
        client = api.client()
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = client.get("/v1/dead-letters", params={"limit": 3} | ({"cursor": cursor} if cursor else {}))
            assert page.status_code == 200, page.text
            seen += [d["eventId"] for d in page.json()["data"]]
            pages += 1
            if cursor is None:  # a dead letter arriving meanwhile does not move the pages after the first
                later = write_dead_letters(topics, (BOT, endpoints[1]), dead_at=time.time_ns() // 1_000_000)
            cursor = page.json()["nextCursor"]
            if cursor is None:
                break
        assert seen == ids[::-1] and pages == 3
        assert page.json()["completeSince"] is None
        eventually(lambda: client.get("/v1/dead-letters", params={"limit": 1}).json()["data"][0]["eventId"]
                   == later[0], "the new dead letter first")
        bot_only = [d["eventId"] for d in client.get("/v1/dead-letters", params={"botId": BOT}).json()["data"]]
        assert bot_only == [later[0], *(i for (b, _), i in reversed(list(zip(pairs, ids, strict=True))) if b == BOT)]
        one = client.get("/v1/dead-letters", params={"endpointId": endpoints[2]}).json()["data"]
        assert [d["eventId"] for d in one] == [ids[5], ids[2]]
        assert all(ISO.match(d["deadAt"]) for d in one)
    with served(topics, dead_letters_capacity=4) as small:
        page = small.client().get("/v1/dead-letters").json()
        assert [d["eventId"] for d in page["data"]] == [later[0], *ids[::-1][:3]]
        assert ISO.match(page["completeSince"])


@pytest.mark.brokers("tansu")  # a private broker stopped under the API
def test_health_and_readiness(tmp_path: Path, config: Config) -> None:
    with private_broker("tansu", tmp_path) as broker:
        own = config.replace(bootstrap_servers=broker.bootstrap)
        create_topics(own)
        with served(own) as api:
            anonymous = api.client(None)
            assert anonymous.get("/healthz").json() == {"status": "ok"}
            ready = anonymous.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert all(check["ok"] for check in ready.json()["checks"].values())
            again = anonymous.get("/readyz").json()
            assert again["checks"]["kafka"]["checkedAt"] == ready.json()["checks"]["kafka"]["checkedAt"]  # cached
            broker.stop()
            eventually(lambda: anonymous.get("/readyz", timeout=10).status_code == 503, "not ready", timeout=30)
            down = anonymous.get("/readyz", timeout=10).json()
            assert down["status"] == "not_ready" and down["checks"]["kafka"]["ok"] is False
            assert anonymous.get("/healthz").status_code == 200  # alive all the same


@pytest.mark.brokers("tansu")  # the server's own limits: no broker behaviour in them
def test_the_server_bounds_slow_and_big_requests(topics: Config) -> None:
    limited = topics.replace(api_header_timeout=2.0, api_max_header_bytes=4096, api_concurrency=4)
    with served(limited) as api:
        host, port = api.url.removeprefix("http://").split(":")

        def connect() -> socket.socket:
            return socket.create_connection((host, int(port)), timeout=10)

        # A head that never ends: closed after the header timeout.
        with connect() as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            started = time.monotonic()
            for _ in range(5):  # a byte now and then does not keep it open
                time.sleep(0.3)
                slow.sendall(b"x")
            assert slow.recv(1024) == b""
            assert 1.5 < time.monotonic() - started < 6
        # A head larger than the limit: 431 when it comes whole, 400 (from h11) when in pieces.
        big = b"GET /v1/endpoints HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n"
        status, headers, _ = raw_request(api.url, big)
        assert status == 431 and headers["content-type"] == "application/problem+json"
        with connect() as pieces:
            pieces.sendall(big[:5000])
            time.sleep(0.3)
            answer = b""
            with contextlib.suppress(OSError):  # the server may have closed it already
                pieces.sendall(big[5000:])
                answer = pieces.recv(1024)
            assert answer.startswith(b"HTTP/1.1 400") or answer == b"", answer
        # A body that stops coming: 408, as a problem.
        status, headers, body = raw_request(api.url, b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\n"
                                            b"authorization: Bearer " + TOKEN.encode() + b"\r\n"
                                            b"content-type: application/json\r\ncontent-length: 40\r\n\r\n{\"bot")
        assert status == 408 and headers["content-type"] == "application/problem+json", body
        # More connections than the limit: 503 from the server itself.
        idle = [connect() for _ in range(4)]
        try:
            refused = httpx.get(f"{api.url}/healthz", timeout=5)
            assert refused.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        eventually(lambda: httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200, "served again")


@pytest.mark.brokers("tansu")  # the guard's own limit: no broker behaviour in it
def test_one_caller_has_at_most_its_share_of_requests(topics: Config) -> None:
    with served(topics.replace(api_header_timeout=3.0)) as api:
        host, port = api.url.removeprefix("http://").split(":")
        held = []
        try:
            for _ in range(CALLER_CONCURRENCY):  # requests whose bodies never finish: each holds a place
                sock = socket.create_connection((host, int(port)), timeout=10)
                sock.sendall(b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + TOKEN.encode() +
                             b"\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{")
                held.append(sock)
            eventually(lambda: api.client().get("/v1/event-types").status_code == 429, "the caller's share is used")
            refused = api.client().get("/v1/event-types")
            assert is_problem(refused, 429, "too_many_requests")["retryAfter"] == 1
            assert refused.headers["retry-after"] == "1"
            other = api.client(BOT_TOKEN).get("/v1/event-types")  # another caller is not held up
            assert other.status_code == 200
        finally:
            for sock in held:
                sock.close()
        eventually(lambda: api.client().get("/v1/event-types").status_code == 200, "the places are given back")
