"""Unit tests of retry delays, tier names, Config.from_env, and `gateway publish` input."""

from __future__ import annotations

import ipaddress
import json

import pytest

from gateway.config import SETTINGS, Config, parse_delays
from gateway.errors import ConfigError
from gateway.events import EventType
from gateway.publisher import read_events
from gateway.store import Topics, delay_label

MESSAGE = {
    "event": "MESSAGE",
    "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
    "sessionId": "b8e034be-90d8-477d-b919-8fcfcf37dc10",
    "role": "USER",
    "message": "hi",
    "messageId": "733b7d55-61ea-450f-b585-27755b015596",
}
TICKET = {
    "event": "TICKET",
    "customerName": "jd",
    "customerEmail": "test@email.com",
    "customerMessage": "hello",
    "botId": "6434515b-8541-4861-bb24-8acd6e77e8c4",
    "sessionId": "ee9181d5-33b0-4433-ad88-2c1e6e28a26b",
}


# --- parse_delays ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60,300,900", (60, 300, 900)),
        ("1m,5m,15m", (60, 300, 900)),
        ("1,2,3", (1, 2, 3)),
        ("1s,2s,3s", (1, 2, 3)),
        ("2h", (7200,)),
        (" 1M , 90s ,1h ", (60, 90, 3600)),
        ("60,,300,", (60, 300)),
        ("45", (45,)),
    ],
)
def test_parse_delays(text: str, expected: tuple[int, ...]) -> None:
    assert parse_delays(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "name no delay"),
        (" , ", "name no delay"),
        ("0", "at least 1 second"),
        ("0m", "at least 1 second"),
        ("-5", "at least 1 second"),
        ("x", "not a whole number"),
        ("1.5", "not a whole number"),
        ("1.5m", "not a whole number"),
        ("m", "not a whole number"),
        ("60,abc,900", "not a whole number"),
        ("5w", "not a whole number"),
    ],
)
def test_parse_delays_errors(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_delays(text)
    assert isinstance(info.value, ValueError)
    bad = [p.strip() for p in text.split(",") if p.strip()]
    if bad:  # names the offending part
        assert any(repr(p.lower()) in str(info.value) for p in bad)


# --- tier names --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("seconds", "label"),
    [(1, "1s"), (2, "2s"), (59, "59s"), (60, "1m"), (90, "90s"), (300, "5m"), (900, "15m"),
     (3600, "1h"), (5400, "90m"), (7200, "2h"), (86400, "24h")],
)
def test_delay_label(seconds: int, label: str) -> None:
    assert delay_label(seconds) == label


def test_default_tiers() -> None:
    topics = Topics.from_config(Config())
    assert [t.name for t in topics.tiers] == ["events", "retry-1m", "retry-5m", "retry-15m"]
    assert [t.topic for t in topics.tiers] == [
        "webhooks.events", "webhooks.retry-1m", "webhooks.retry-5m", "webhooks.retry-15m",
    ]
    assert [t.delay for t in topics.tiers] == [0, 60, 300, 900]
    assert [t.index for t in topics.tiers] == [0, 1, 2, 3]
    assert topics.dlq == "webhooks.dlq"
    assert topics.endpoints == "webhooks.endpoints"
    everything = topics.all()
    assert everything[:4] == (
        "webhooks.events", "webhooks.retry-1m", "webhooks.retry-5m", "webhooks.retry-15m",
    )
    assert {"webhooks.dlq", "webhooks.endpoints"} <= set(everything)
    assert len(set(everything)) == len(everything)
    assert all(t.startswith("webhooks.") for t in everything)


def test_tiers_of_short_delays() -> None:
    topics = Topics("t1", parse_delays("1,2,3"))
    assert [t.name for t in topics.tiers] == ["events", "retry-1s", "retry-2s", "retry-3s"]
    assert topics.tier("retry-2s").topic == "t1.retry-2s"
    assert topics.tier("retry-2s").delay == 2


def test_tier_in_hours() -> None:
    topics = Topics("p", parse_delays("2h"))
    assert [t.name for t in topics.tiers] == ["events", "retry-2h"]
    assert topics.tier("retry-2h").topic == "p.retry-2h"
    assert topics.tier("retry-2h").delay == 7200


def test_same_delay_spelled_differently_gives_same_tier() -> None:
    assert Topics("p", parse_delays("60,300,900")) == Topics("p", parse_delays("1m,5m,15m"))


def test_unknown_tier_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="retry-7m") as info:
        Topics.from_config(Config()).tier("retry-7m")
    assert "events, retry-1m, retry-5m, retry-15m" in str(info.value)


# --- Config.from_env ---------------------------------------------------------------------

def test_from_env_with_nothing_set_gives_defaults() -> None:
    assert Config.from_env({}) == Config()


def test_from_env_ignores_other_variables() -> None:
    assert Config.from_env({"PATH": "/bin", "GATEWAY": "x", "GATEWAY_NOPE": "1"}) == Config()


def test_from_env_reads_gateway_variables() -> None:
    config = Config.from_env({
        "GATEWAY_BOOTSTRAP_SERVERS": " kafka-1:9092,kafka-2:9092 ",
        "GATEWAY_TOPIC_PREFIX": "prod",
        "GATEWAY_RETRY_DELAYS": "1m,5m,15m,1h",
        "GATEWAY_PARTITIONS": "12",
        "GATEWAY_REPLICATION_FACTOR": "3",
        "GATEWAY_SCHEMA_REGISTRY_URL": "http://registry:8081",
        "GATEWAY_GROUP_ID": "gw",
        "GATEWAY_METRICS_PORT": "9500",
        "GATEWAY_CONCURRENCY": "50",
        "GATEWAY_ENDPOINT_CONCURRENCY": "4",
        "GATEWAY_REQUEST_TIMEOUT": "2.5",
        "GATEWAY_MAX_RESPONSE_BYTES": "1024",
        "GATEWAY_SHUTDOWN_TIMEOUT": "5",
        "GATEWAY_SESSION_TIMEOUT_MS": "6000",
        "GATEWAY_ALLOW_PRIVATE_NETWORKS": "yes",
        "GATEWAY_ALLOWED_NETWORKS": "10.0.0.0/8, fd00::/8,192.168.1.7",
    })
    assert config == Config(
        bootstrap_servers="kafka-1:9092,kafka-2:9092",
        topic_prefix="prod",
        retry_delays=(60, 300, 900, 3600),
        partitions=12,
        replication_factor=3,
        schema_registry_url="http://registry:8081",
        group_id="gw",
        metrics_port=9500,
        concurrency=50,
        endpoint_concurrency=4,
        request_timeout=2.5,
        max_response_bytes=1024,
        shutdown_timeout=5.0,
        session_timeout_ms=6000,
        allow_private_networks=True,
        allowed_networks=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("fd00::/8"),
            ipaddress.ip_network("192.168.1.7/32"),
        ),
    )


def test_every_setting_has_a_gateway_variable_and_a_config_field() -> None:
    fields = {f.name for f in Config.__dataclass_fields__.values()}
    assert {s.name for s in SETTINGS} == fields
    for setting in SETTINGS:
        assert setting.env == "GATEWAY_" + setting.name.upper()
        # A secret has no flag: a flag shows in the process list.
        assert setting.flag.startswith("--") if setting.flag is not None else setting.name == "api_tokens" \
            or setting.name == "log_format"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("ON", True), ("false", False), ("0", False), ("no", False),
     ("", False)],
)
def test_from_env_booleans(text: str, expected: bool) -> None:
    assert Config.from_env({"GATEWAY_ALLOW_PRIVATE_NETWORKS": text}).allow_private_networks is expected


def test_empty_schema_registry_url_means_none() -> None:
    assert Config.from_env({"GATEWAY_SCHEMA_REGISTRY_URL": "  "}).schema_registry_url is None


def test_overrides_win_over_the_environment() -> None:
    config = Config.from_env(
        {"GATEWAY_PARTITIONS": "3", "GATEWAY_TOPIC_PREFIX": "env"},
        partitions=9, topic_prefix=None,
    )
    assert config.partitions == 9
    assert config.topic_prefix == "env"  # a None override does not win


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("GATEWAY_RETRY_DELAYS", "1.5", "not a whole number"),
        ("GATEWAY_RETRY_DELAYS", "", "name no delay"),
        ("GATEWAY_RETRY_DELAYS", "0", "at least 1 second"),
        ("GATEWAY_PARTITIONS", "six", "not a whole number"),
        ("GATEWAY_PARTITIONS", "0", "at least 1"),
        ("GATEWAY_REPLICATION_FACTOR", "-1", "at least 1"),
        ("GATEWAY_METRICS_PORT", "70000", "not a TCP port"),
        ("GATEWAY_CONCURRENCY", "1e3", "not a whole number"),
        ("GATEWAY_REQUEST_TIMEOUT", "soon", "not a number"),
        ("GATEWAY_SHUTDOWN_TIMEOUT", "0", "greater than 0"),
        ("GATEWAY_ALLOW_PRIVATE_NETWORKS", "maybe", "not a boolean"),
        ("GATEWAY_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-net", "not a network"),
        ("GATEWAY_INSTANCE_ID", "pod 1", "not an instance id"),
    ],
)
def test_from_env_error_names_the_variable_and_value(
    variable: str, value: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        Config.from_env({variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}: ")
    if value:
        bad = value.split(",")[-1]
        assert repr(bad) in message


def test_the_defaults_go_to_a_worker_process_and_back_unchanged() -> None:
    """`gateway run --workers N` hands each worker its configuration as GATEWAY_*
    variables: a setting left to choose (None) must stay so, not fail to parse."""
    assert Config.from_env(Config().to_env()) == Config()
    assert Config.from_env({"GATEWAY_SESSION_TIMEOUT_MS": ""}).session_timeout_ms is None
    assert Config.from_env({"GATEWAY_SESSION_TIMEOUT_MS": "6000"}).session_timeout_ms == 6000


def test_an_instance_id_is_a_name_and_empty_means_none() -> None:
    assert Config.from_env({"GATEWAY_INSTANCE_ID": " gateway-0 "}).instance_id == "gateway-0"
    assert Config.from_env({"GATEWAY_INSTANCE_ID": ""}).instance_id is None


def test_empty_bootstrap_servers_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_BOOTSTRAP_SERVERS"):
        Config.from_env({"GATEWAY_BOOTSTRAP_SERVERS": "  "})


@pytest.mark.parametrize("prefix", ["", "a b", "a/b"])
def test_unusable_topic_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="topic prefix") as info:
        Config.from_env({"GATEWAY_TOPIC_PREFIX": prefix})
    assert repr(prefix) in str(info.value)


def test_config_replace() -> None:
    config = Config().replace(retry_delays=(1, 2, 3))
    assert config.retry_delays == (1, 2, 3)
    assert [t.name for t in Topics.from_config(config).tiers][1:] == [
        "retry-1s", "retry-2s", "retry-3s"
    ]


# --- read_events -------------------------------------------------------------------------

def test_read_events_json_lines() -> None:
    text = json.dumps(MESSAGE) + "\n" + json.dumps(TICKET) + "\n"
    items = read_events(text)
    assert [i.where for i in items] == ["line 1", "line 2"]
    assert all(i.error is None for i in items)
    assert [i.event.type for i in items if i.event] == [EventType.MESSAGE, EventType.TICKET]
    assert items[0].event is not None and dict(items[0].event.body) == MESSAGE


def test_read_events_skips_blank_lines_and_keeps_line_numbers() -> None:
    text = "\n  \n" + json.dumps(MESSAGE) + "\n\n\t\n" + json.dumps(TICKET) + "\r\n\n"
    items = read_events(text)
    assert [i.where for i in items] == ["line 3", "line 6"]
    assert all(i.event is not None for i in items)


def test_read_events_json_array() -> None:
    text = json.dumps([MESSAGE, TICKET], indent=2)
    items = read_events("\n  " + text + "\n")
    assert [i.where for i in items] == ["item 1", "item 2"]
    assert [i.event.type for i in items if i.event] == [EventType.MESSAGE, EventType.TICKET]


def test_read_events_invalid_json_line_is_reported_with_its_line_number() -> None:
    text = "\n".join([json.dumps(MESSAGE), "", '{"event": "MESSAGE",', json.dumps(TICKET)])
    items = read_events(text)
    assert [i.where for i in items] == ["line 1", "line 3", "line 4"]
    bad = items[1]
    assert bad.event is None
    assert bad.error is not None and bad.error.startswith("invalid JSON at column")
    assert items[0].event is not None and items[2].event is not None


def test_read_events_invalid_event_is_reported_with_the_field() -> None:
    items = read_events(json.dumps({**MESSAGE, "botId": "nope"}) + "\n" + json.dumps(TICKET))
    assert items[0].where == "line 1"
    assert items[0].event is None
    assert items[0].error is not None
    assert "'botId'" in items[0].error and '"nope"' in items[0].error
    assert items[1].event is not None


def test_read_events_invalid_item_of_an_array() -> None:
    items = read_events(json.dumps([MESSAGE, "MESSAGE", {**TICKET, "extra": 1}]))
    assert [i.where for i in items] == ["item 1", "item 2", "item 3"]
    assert items[0].event is not None
    assert items[1].error is not None and "JSON object" in items[1].error
    assert items[2].error is not None and "'extra'" in items[2].error


def test_read_events_a_line_that_is_not_an_object() -> None:
    items = read_events("42\n" + json.dumps(MESSAGE))
    assert items[0].where == "line 1" and items[0].error is not None
    assert "JSON object" in items[0].error
    assert items[1].event is not None


@pytest.mark.parametrize("text", ["", "   ", "\n\n \t\n"])
def test_read_events_empty_input_raises(text: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        read_events(text)


def test_read_events_empty_array_raises() -> None:
    with pytest.raises(ValueError, match="empty JSON array"):
        read_events(" [ ] ")


def test_read_events_invalid_array_raises_with_position() -> None:
    with pytest.raises(ValueError, match=r"invalid JSON array at line 2 column \d+"):
        read_events('[\n{"event": }]')


def test_read_events_keeps_event_ids_and_times() -> None:
    given = {**MESSAGE, "eventId": "0b6f6a52-3c51-4d2e-9a43-5b1b8f1c7e10", "occurredAt": 7}
    (item,) = read_events(json.dumps(given))
    assert item.event is not None
    assert item.event.event_id == given["eventId"]
    assert item.event.occurred_at == 7
    assert dict(item.event.body) == MESSAGE


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_read_events_unicode_line_separators_inside_strings(separator: str) -> None:
    """Fails: read_events splits JSON lines with str.splitlines() (publisher.py line 164),
    which also breaks at U+2028, U+2029 and U+0085. JSON allows these unescaped inside
    strings (json.dumps(..., ensure_ascii=False) writes them raw) and events accept them,
    so a valid one-event line becomes several "invalid JSON" lines and every later line
    number is off."""
    event = {**MESSAGE, "message": f"one{separator}two"}
    text = json.dumps(event, ensure_ascii=False) + "\n" + json.dumps(TICKET, ensure_ascii=False)
    items = read_events(text)
    assert [(i.where, i.error) for i in items] == [("line 1", None), ("line 2", None)]
    assert items[0].event is not None
    assert items[0].event.body["message"] == f"one{separator}two"


def test_parse_delays_accepts_days() -> None:
    assert parse_delays("1d") == (86400,)
