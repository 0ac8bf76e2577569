"""Test sends (`gateway endpoints test`): the documented examples through the real
sender to a real receiver, reports, malformed requests, and nothing left in Kafka."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config
from gateway.events import EventType
from gateway.ops import Behaviour, Listener, ProbeKind, Received, example_body, examples, send_tests
from gateway.records import Endpoint, Outcome
from gateway.store import Topics
from gateway.verify import verify

from .conftest import read_topic, run_gateway
from .receiver import Receiver

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"
BOT = "0b8c7f7e-2f5a-4c55-9a3b-6a4c0e0f1d2e"


def test_the_examples_are_the_documented_ones_with_the_endpoints_bot() -> None:
    documented = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    assert list(examples().values()) == documented
    endpoint = Endpoint(id="e1", bot_id=BOT, url="http://x/", secret="whsec_" + "A" * 24, created_at=0, updated_at=0)
    for event_type, document in examples().items():
        body = json.loads(example_body(event_type, endpoint))
        assert body == document | {"botId": BOT}
        assert list(body) == list(document)  # the documented field order


def add(config: Config, url: str, *args: str) -> dict[str, Any]:
    result = run_gateway(config, "endpoints", "add", "--bot-id", BOT, "--url", url, "--json", *args)
    assert result.returncode == 0, result.stderr
    added: dict[str, Any] = json.loads(result.stdout)
    return added


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # a test send reads one endpoint: the broker plays no part
def test_endpoints_test_sends_every_example_signed_and_reports_each(topics: Config, receiver: Receiver) -> None:
    endpoint = add(topics, receiver.url("/ok"))
    receiver.respond("/ok", lambda request, seen: 200 if request.json["event"] != "TICKET" else 418)
    result = run_gateway(topics, "endpoints", "test", endpoint["id"], "--json")
    assert result.returncode == 1, result.stderr  # the TICKET example was refused
    report = json.loads(result.stdout)
    assert report["endpointId"] == endpoint["id"] and report["ok"] is False
    got = receiver.at("/ok")
    assert [r.json["event"] for r in got] == [t.value for t in EventType]
    for request in got:
        verify(endpoint["secret"], request.headers, request.body)  # signed like a delivery
        assert request.json["botId"] == BOT
        assert request.headers["user-agent"].startswith("webhook-gateway/")
    rows = report["results"]
    assert [(r["kind"], r["eventType"], r["status"], r["verdict"]) for r in rows] == [
        ("example", "MESSAGE", 200, "delivered"), ("example", "RATE_MESSAGE", 200, "delivered"),
        ("example", "TICKET", 418, "failed"), ("example", "CREATE_LEAD", 200, "delivered")]
    assert [r["eventId"] for r in rows] == [r.event_id for r in got]
    assert all(r["durationMs"] > 0 for r in rows)

    one = run_gateway(topics, "endpoints", "test", endpoint["id"], "--event", "message")
    assert one.returncode == 0, one.stderr
    assert "delivered" in one.stdout and "MESSAGE" in one.stdout and "TICKET" not in one.stdout
    assert "1 of 1 as expected" in one.stderr


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # a test send reads one endpoint: the broker plays no part
def test_malformed_requests_are_judged_by_what_the_receiver_answers(topics: Config, receiver: Receiver) -> None:
    """A receiver that verifies (gateway listen's) refuses both; one that takes anything
    is reported as accepting them, and the command fails."""
    lax = add(topics, receiver.url("/lax"))
    strict_secret = lax["secret"]
    got: list[Received] = []
    listener = Listener(host="127.0.0.1", port=0, secrets=[strict_secret], behaviour=Behaviour(),
                        on_request=got.append).start()
    try:
        strict = add(topics, f"http://127.0.0.1:{listener.port}/hook", "--secret", strict_secret)
        good = run_gateway(topics, "endpoints", "test", strict["id"], "--malformed", "--event", "TICKET")
        assert good.returncode == 0, good.stdout + good.stderr
        assert [(r.verified, r.reason) for r in got] == [
            (True, None), (False, "no matching signature"), (False, "message timestamp too old")]
        lines = good.stdout.splitlines()
        assert any(line.startswith("bad_signature") and "rejected" in line and "401" in line for line in lines)
        assert any(line.startswith("stale_timestamp") and "rejected" in line for line in lines)
        assert "3 of 3 as expected" in good.stderr
    finally:
        listener.stop()
    bad = run_gateway(topics, "endpoints", "test", lax["id"], "--malformed", "--json")
    assert bad.returncode == 1
    verdicts = {(r["kind"], r["verdict"]) for r in json.loads(bad.stdout)["results"]}
    assert {("bad_signature", "accepted"), ("stale_timestamp", "accepted")} <= verdicts


@pytest.mark.integration
def test_test_sends_are_not_deliveries(topics: Config, receiver: Receiver, worker_factory: Any) -> None:
    """A failing test send is not retried, dead-lettered or written to the history, even
    with every worker running."""
    endpoint = add(topics, receiver.url("/down"))
    receiver.respond("/down", lambda request, seen: 503)
    worker_factory(topics)
    result = run_gateway(topics, "endpoints", "test", endpoint["id"])
    assert result.returncode == 1
    assert result.stdout.count("failed") == 4
    time.sleep(4)  # past the first two retry delays (1 s, 2 s)
    assert len(receiver.at("/down")) == 4
    names = Topics.from_config(topics)
    for topic in (names.attempts, names.dlq, *(t.topic for t in names.tiers)):
        assert read_topic(topics, topic) == [], topic


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # a test send reads one endpoint: the broker plays no part
def test_a_refused_destination_and_an_unknown_endpoint(topics: Config) -> None:
    blocked = add(topics, "http://127.0.0.1:9/hook")
    result = run_gateway(topics, "endpoints", "test", blocked["id"], "--event", "MESSAGE",
                         GATEWAY_ALLOW_PRIVATE_NETWORKS="false")
    assert result.returncode == 1
    assert "blocked destination" in result.stdout
    report = asyncio.run(send_tests(topics.replace(allow_private_networks=False), _endpoint(blocked),
                                    event_types=["MESSAGE"], malformed=True))
    assert [p.attempt.outcome for p in report.probes] == [Outcome.BLOCKED] * 3
    assert [p.kind for p in report.probes] == [ProbeKind.EXAMPLE, ProbeKind.BAD_SIGNATURE, ProbeKind.STALE_TIMESTAMP]
    assert not any(p.ok for p in report.probes)  # no answer proves nothing
    unknown = run_gateway(topics, "endpoints", "test", "no-such-endpoint")
    assert unknown.returncode == 1 and "no endpoint with id 'no-such-endpoint'" in unknown.stderr
    typo = run_gateway(topics, "endpoints", "test", blocked["id"], "--event", "TICKETS")
    assert typo.returncode == 1 and "event type 'TICKETS' is unknown" in typo.stderr


def _endpoint(row: dict[str, Any]) -> Endpoint:
    return Endpoint(id=row["id"], bot_id=row["botId"], url=row["url"], secret=row["secret"],
                    created_at=row["createdAt"], updated_at=row["updatedAt"])
