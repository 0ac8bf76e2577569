"""`gateway publish` and the Python producer API against the real bundled broker."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config
from gateway.errors import InvalidEvent
from gateway.publisher import Publisher

from .conftest import DOCS, decode_all, read_topic, run_gateway

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "events.jsonl"


def documented_examples() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def test_examples_file_holds_the_documented_payloads() -> None:
    if not DOCS.exists():
        pytest.skip(f"the platform's webhook documentation is not at {DOCS}")
    blocks = re.findall(r"### \w+ Event Example\n```json\n(.*?)```", DOCS.read_text(), re.S)
    documented = [json.loads(block) for block in blocks]
    assert len(documented) == 3
    assert documented == documented_examples()[:3]


def test_publish_cli_round_trips_the_documented_events(topics: Config) -> None:
    result = run_gateway(topics, "publish", str(EXAMPLES))
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 4 and all(uuid.UUID(i).version == 4 for i in ids)
    assert "published 4 of 4 events" in result.stderr

    messages = read_topic(topics, f"{topics.topic_prefix}.events", expect=4)
    decoded = decode_all(messages)
    by_id = {record["eventId"]: (name, record, msg) for (name, record), msg in zip(decoded, messages, strict=False)}
    assert sorted(by_id) == sorted(ids)
    for event_id, doc in zip(ids, documented_examples(), strict=True):
        _name, record, msg = by_id[event_id]
        body = {k: v for k, v in record.items() if k not in ("eventId", "occurredAt")}
        assert body == doc
        assert list(body) == list(doc)  # the documented field order
        assert msg.key() == doc["sessionId"].encode()
        assert msg.value()[:2] == b"\xc3\x01"
        assert record["occurredAt"] > 1_700_000_000_000


def test_publish_keeps_given_event_id_and_accepts_a_json_array(topics: Config) -> None:
    events = documented_examples()[:2]
    events[0]["eventId"] = given = str(uuid.uuid4())
    result = run_gateway(topics, "publish", "-", "--json", input=json.dumps(events))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["MESSAGE", "RATE_MESSAGE"]
    assert lines[0]["eventId"] == given
    assert all(isinstance(line["offset"], int) for line in lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"event":"MESSAGE","botId":"not-a-uuid","sessionId":"b8e034be-90d8-477d-b919-8fcfcf37dc10",'
         '"role":"USER","message":"hi","messageId":"733b7d55-61ea-450f-b585-27755b015596"}',
         "line 1: field 'botId': is not a UUID"),
        ('{"event":"TICKET","customerName":"jd","botId":"6434515b-8541-4861-bb24-8acd6e77e8c4",'
         '"sessionId":"ee9181d5-33b0-4433-ad88-2c1e6e28a26b","customerEmail":"a@b.c"}',
         "line 1: field 'customerMessage': missing"),
        ('{"event":"RATE_MESSAGE","botId":"6434515b-8541-4861-bb24-8acd6e77e8c4",'
         '"sessionId":"ee9181d5-33b0-4433-ad88-2c1e6e28a26b","rating":"five",'
         '"messageId":"ad2deddc-6f36-4af7-8b2f-3ddeab122b64"}',
         "line 1: field 'rating': must be a number (got \"five\")"),
        ('{"event":"SIGNUP","botId":"6434515b-8541-4861-bb24-8acd6e77e8c4"}',
         "line 1: field 'event': unknown event type"),
        ('{"event": "MESSAGE", oops}', "line 1: invalid JSON at column 22"),
        ("", "the input is empty"),
        ("\n  \n", "the input is empty"),
        ("[]", "empty JSON array"),
        ('"MESSAGE"', "line 1: event: must be a JSON object, not a string"),
    ],
    ids=["non-uuid", "missing-field", "wrong-type", "unknown-type", "invalid-json",
         "empty", "blank", "empty-array", "not-an-object"],
)
def test_publish_refuses_bad_input_and_sends_nothing(topics: Config, text: str, expected: str) -> None:
    valid = EXAMPLES.read_text().splitlines()[0]
    # A valid event before the bad one must not be published either.
    data = f"{valid}\n{text}" if text.strip() and not text.startswith("[") else text
    result = run_gateway(topics, "publish", "-", input=data)
    assert result.returncode == 1, result.stderr
    assert expected.replace("line 1", "line 2" if data != text else "line 1") in result.stderr
    assert result.stdout == ""
    assert read_topic(topics, f"{topics.topic_prefix}.events") == []


def test_skip_invalid_publishes_the_valid_ones_and_says_so(topics: Config) -> None:
    lines = EXAMPLES.read_text().splitlines()
    data = "\n".join([lines[0], '{"event":"MESSAGE"}', lines[2]])
    result = run_gateway(topics, "publish", "--skip-invalid", "-", input=data)
    assert result.returncode == 1
    assert len(result.stdout.split()) == 2
    assert "published 2 of 3 events" in result.stderr and "1 invalid" in result.stderr
    assert len(read_topic(topics, f"{topics.topic_prefix}.events", expect=2)) == 2


def test_python_api_publishes_and_validates(topics: Config) -> None:
    with Publisher(topics) as publisher:
        event_id = publisher.publish(documented_examples()[2])
        with pytest.raises(InvalidEvent, match="sessionId"):
            publisher.publish({**documented_examples()[2], "sessionId": "123"})
    (message,) = read_topic(topics, f"{topics.topic_prefix}.events", expect=1)
    assert decode_all([message])[0][1]["eventId"] == event_id


def test_schema_registry_wire_format_round_trips(topics: Config) -> None:
    from gateway.codec import Codec

    codec = Codec("mock://publish-test")
    registry_config = topics.replace(schema_registry_url="mock://publish-test")
    with Publisher(registry_config, codec=codec) as publisher:
        publisher.publish(documented_examples()[0])
    (message,) = read_topic(topics, f"{topics.topic_prefix}.events", expect=1)
    assert message.value()[0] == 0
    name, record = codec.decode(message.value())
    assert name == "gateway.events.Message" and record["message"] == "hi"
