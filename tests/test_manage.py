"""The endpoint management functions the CLI and the HTTP API share (gateway.ops):
values back, typed errors naming the field, nothing printed."""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer

from gateway.codec import Codec
from gateway.config import Config
from gateway.errors import Forbidden, InputError, NotFound, PreconditionFailed, Unavailable
from gateway.ops import (
    KEEP,
    MAX_DESCRIPTION_LENGTH,
    MAX_URL_LENGTH,
    Access,
    Registration,
    Scope,
    endpoint_json,
    endpoint_version,
    get_endpoint,
    list_endpoints,
    register_endpoint,
    remove_endpoint,
    rotate_secret,
    rotated,
    set_endpoint_enabled,
    update_endpoint,
)
from gateway.records import ENDPOINT_SCHEMA, Endpoint
from gateway.signing import new_secret, secret_key
from gateway.store import EndpointTable, Topics, load_endpoints, save_endpoint

BOT_A = "6434515b-8541-4861-bb24-8acd6e77e8c4"
BOT_B = "0b8c7f7e-2f5a-4c55-9a3b-6a4c0e0f1d2e"
PUBLIC_URL = "https://example.com/hook"
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
# Nothing listens here: a test that reaches Kafka through it fails, so these prove the
# refusal came before any I/O.
NOWHERE = Config(bootstrap_servers="127.0.0.1:1")


# --- refusals name the field, before any I/O ----------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "named"),
    [
        ({"bot_id": "not-a-uuid"}, "bot_id", "not-a-uuid"),
        ({"url": "ftp://example.com/"}, "url", "ftp://example.com/"),
        ({"url": "https://u:p@example.com/"}, "url", "credentials"),
        ({"event_types": ["MESSAGE", "bogus"]}, "event_types", "BOGUS"),
        ({"secret": "whsec_short"}, "secret", "secret"),
        ({"secret": "no-prefix"}, "secret", "whsec_"),
        ({"url": "https://example.com/" + "a" * MAX_URL_LENGTH}, "url", str(MAX_URL_LENGTH)),
        ({"description": "d" * (MAX_DESCRIPTION_LENGTH + 1)}, "description", str(MAX_DESCRIPTION_LENGTH)),
        ({"description": "a\x1b[2Jb"}, "description", "U+001B"),
        ({"rate_limit": float("inf")}, "rate_limit", "inf"),
    ],
)
def test_register_refuses_naming_the_field(fields: dict[str, object], field: str, named: str) -> None:
    arguments: dict[str, object] = {"bot_id": BOT_A, "url": PUBLIC_URL} | fields
    with pytest.raises(InputError) as info:
        register_endpoint(NOWHERE, **arguments)  # type: ignore[arg-type]
    assert info.value.field == field
    assert named in str(info.value) and named in info.value.message
    assert not isinstance(info.value, (NotFound, Unavailable))


def test_other_refusals_name_their_field_before_any_io() -> None:
    with pytest.raises(InputError) as info:
        list_endpoints(NOWHERE, bot_id="bot-7")
    assert info.value.field == "bot_id" and "'bot-7'" in str(info.value)
    with pytest.raises(InputError) as info:
        rotate_secret(NOWHERE, "any", grace_seconds=-1)
    assert info.value.field == "grace_seconds" and "-1" in str(info.value)
    bad = "whsec_" + base64.b64encode(b"too-short").decode()
    with pytest.raises(InputError) as info:
        rotate_secret(NOWHERE, "any", secret=bad)
    assert info.value.field == "secret" and bad.removeprefix("whsec_") not in str(info.value)
    with pytest.raises(InputError) as info:
        update_endpoint(NOWHERE, "any", url="http://")
    assert info.value.field == "url"
    with pytest.raises(InputError) as info:
        update_endpoint(NOWHERE, "any", event_types=["NOPE"])
    assert info.value.field == "event_types"
    for grace in (float("inf"), float("nan"), 31 * 86400):
        with pytest.raises(InputError) as info:
            rotate_secret(NOWHERE, "any", grace_seconds=grace)
        assert info.value.field == "grace_seconds"


def test_an_error_can_be_built_with_field_and_message_by_name() -> None:
    error = InputError(field="url", message="url 'x' is not a URL")
    assert error.field == "url" and str(error) == "url 'x' is not a URL"
    with pytest.raises(NotFound) as info:
        get_endpoint(NOWHERE, "e-1", table=EndpointTable())
    assert info.value.field == "endpoint_id" and str(info.value) == "no endpoint with id 'e-1'"


# --- pure pieces -----------------------------------------------------------------------------


def endpoint(id: str, bot: str = BOT_A, *, created: int = 1, enabled: bool = True) -> Endpoint:
    return Endpoint(id=id, bot_id=bot, url=f"https://example.com/{id}", secret=SECRET,
                    created_at=created, updated_at=created, enabled=enabled)


def test_rotated_keeps_the_old_secret_for_the_grace() -> None:
    current = endpoint("e1")
    fresh = new_secret()
    changed = rotated(current, secret=fresh, grace_seconds=90, now_ms=1_000)
    assert changed.secret == fresh
    assert changed.previous_secret == SECRET
    assert changed.previous_secret_expires_at == 91_000
    assert changed.updated_at == 1_000
    assert (changed.id, changed.bot_id, changed.url) == (current.id, current.bot_id, current.url)
    assert changed.secrets_at(90_999) == (fresh, SECRET)
    assert changed.secrets_at(91_000) == (fresh,)
    generated = rotated(changed, grace_seconds=0, now_ms=2_000)
    assert len(secret_key(generated.secret)) == 32 and generated.previous_secret == fresh


def test_reads_from_a_given_table_need_no_broker() -> None:
    table = EndpointTable()
    table.load([("a1", endpoint("a1", BOT_A, created=2)), ("a0", endpoint("a0", BOT_A.upper())),
                ("b", endpoint("b", BOT_B))])
    assert get_endpoint(NOWHERE, "a1", table=table).id == "a1"
    with pytest.raises(NotFound) as info:
        get_endpoint(NOWHERE, "zz", table=table)
    assert info.value.field == "endpoint_id" and "'zz'" in str(info.value)
    assert [e.id for e in list_endpoints(NOWHERE, bot_id=BOT_A.upper(), table=table)] == ["a0", "a1"]
    assert [e.id for e in list_endpoints(NOWHERE, table=table)] == ["b", "a0", "a1"]


def test_endpoint_json_masks_the_secret_unless_asked() -> None:
    e = dataclasses.replace(endpoint("e1"), previous_secret=new_secret())
    shown, masked = endpoint_json(e, show_secret=True), endpoint_json(e)
    assert shown["secret"] == SECRET
    assert SECRET.removeprefix("whsec_") not in str(masked)
    assert e.previous_secret is not None and e.previous_secret not in str(shown)
    assert masked["botId"] == BOT_A and masked["events"] == [] and masked["enabled"] is True


def test_endpoint_json_shows_iso_times_and_until_when_the_previous_secret_signs() -> None:
    e = rotated(dataclasses.replace(endpoint("e1"), created_at=1_764_000_000_000), grace_seconds=3600,
                now_ms=1_764_000_000_500)
    shown = endpoint_json(e, now_ms=1_764_000_001_000)
    assert shown["createdAt"] == "2025-11-24T16:00:00.000Z" and shown["updatedAt"] == "2025-11-24T16:00:00.500Z"
    assert shown["previousSecretExpiresAt"] == "2025-11-24T17:00:00.500Z"
    assert endpoint_json(e, now_ms=1_764_003_600_500)["previousSecretExpiresAt"] is None  # the grace is over
    assert endpoint_json(endpoint("e1"))["previousSecretExpiresAt"] is None


def test_a_version_changes_with_any_change_and_guards_a_change() -> None:
    e = endpoint("e1")
    assert endpoint_version(e) == endpoint_version(dataclasses.replace(e))
    changes: list[dict[str, Any]] = [{"url": "https://example.com/x"}, {"secret": new_secret()}, {"enabled": False},
               {"description": "d"}, {"updated_at": 2}, {"event_types": ("TICKET",)}]
    assert len({endpoint_version(dataclasses.replace(e, **change)) for change in changes} | {endpoint_version(e)}) \
        == len(changes) + 1
    table = EndpointTable()
    table.load([("e1", e), ("b", endpoint("b", BOT_B))])
    with pytest.raises(PreconditionFailed):  # checked against the table before any write
        update_endpoint(NOWHERE, "e1", description="x", table=table, if_match="not-the-version")
    with pytest.raises(PreconditionFailed):
        rotate_secret(NOWHERE, "e1", table=table, if_match=("a", "b"))


def test_scopes_are_applied_before_any_write() -> None:
    table = EndpointTable()
    table.load([("a", endpoint("a", BOT_A)), ("b", endpoint("b", BOT_B))])
    bot, reader = Access.for_bot(BOT_A.upper()), Access(Scope.READ)
    assert bot.bot_id == BOT_A and str(bot) == f"bot:{BOT_A}"
    assert [e.id for e in list_endpoints(NOWHERE, table=table, access=bot)] == ["a"]
    assert [e.id for e in list_endpoints(NOWHERE, table=table, access=reader)] == ["b", "a"]
    for call in (lambda: get_endpoint(NOWHERE, "b", table=table, access=bot),
                 lambda: list_endpoints(NOWHERE, bot_id=BOT_B, table=table, access=bot),
                 lambda: update_endpoint(NOWHERE, "b", description=KEEP, table=table, access=bot),
                 lambda: set_endpoint_enabled(NOWHERE, "a", False, table=table, access=reader),
                 lambda: remove_endpoint(NOWHERE, "a", table=table, access=reader),
                 lambda: register_endpoint(NOWHERE, bot_id=BOT_B, url=PUBLIC_URL, access=bot),
                 lambda: register_endpoint(NOWHERE, bot_id=BOT_A, url=PUBLIC_URL, access=reader)):
        with pytest.raises(Forbidden):
            call()
    with pytest.raises(InputError):
        Access(Scope.BOT, "not-a-uuid")


# --- against the bundled broker --------------------------------------------------------------


@pytest.mark.integration
def test_manage_an_endpoint_through_its_life(topics: Config) -> None:
    registration = register_endpoint(topics, bot_id=BOT_A.upper(), url=PUBLIC_URL,
                                     event_types=["ticket"], description="crm")
    assert isinstance(registration, Registration) and registration.warning is None
    added = registration.endpoint
    assert added.bot_id == BOT_A and added.event_types == ("TICKET",)
    assert len(secret_key(added.secret)) == 32  # the secret comes back, to show once
    assert get_endpoint(topics, added.id) == added

    disabled = set_endpoint_enabled(topics, added.id, False)
    assert disabled.enabled is False and disabled.secret == added.secret
    assert get_endpoint(topics, added.id).enabled is False

    updated = update_endpoint(topics, added.id, event_types=[], description="crm v2")
    assert (updated.endpoint.event_types, updated.endpoint.description) == ((), "crm v2")
    assert updated.endpoint.url == PUBLIC_URL and updated.endpoint.enabled is False

    before = time.time()
    fresh = rotate_secret(topics, added.id, grace_seconds=3600)
    assert fresh.secret != added.secret and fresh.previous_secret == added.secret
    assert fresh.previous_secret_expires_at is not None
    assert abs(fresh.previous_secret_expires_at / 1000 - (before + 3600)) < 30
    assert get_endpoint(topics, added.id).secret == fresh.secret

    assert [e.id for e in list_endpoints(topics, bot_id=BOT_A)] == [added.id]
    assert list_endpoints(topics, bot_id=BOT_B) == []

    removed = remove_endpoint(topics, added.id)
    assert removed.id == added.id
    calls: list[Callable[[], object]] = [
        lambda: get_endpoint(topics, added.id), lambda: remove_endpoint(topics, added.id),
        lambda: set_endpoint_enabled(topics, added.id, True), lambda: rotate_secret(topics, added.id)]
    for call in calls:
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.field == "endpoint_id" and added.id in str(info.value)
    assert list_endpoints(topics) == []


@pytest.mark.integration
def test_a_refused_destination_is_registered_with_a_warning_as_a_value(topics: Config) -> None:
    strict = dataclasses.replace(topics, allow_private_networks=False)
    registration = register_endpoint(strict, bot_id=BOT_A, url="http://127.0.0.1:9/hook")
    assert registration.warning is not None
    assert "http://127.0.0.1:9/hook" in registration.warning and "loopback" in registration.warning
    assert get_endpoint(strict, registration.endpoint.id) == registration.endpoint
    moved = update_endpoint(strict, registration.endpoint.id, url=PUBLIC_URL)
    assert moved.warning is None and moved.endpoint.url == PUBLIC_URL


@pytest.mark.integration
def test_without_the_topic_the_store_is_unavailable(config: Config) -> None:
    with pytest.raises(Unavailable) as info:
        list_endpoints(config)
    assert info.value.field is None
    assert f"{config.topic_prefix}.endpoints" in str(info.value)


@pytest.mark.integration
def test_the_registry_loads_what_the_topic_holds_at_its_end(topics: Config) -> None:
    """Registrations, changes, moves between bots and removals written straight to the
    topic: the initial load keeps the latest of each."""
    kept = endpoint(str(uuid.uuid4()), BOT_A)
    moved = endpoint(str(uuid.uuid4()), BOT_A)
    gone = endpoint(str(uuid.uuid4()), BOT_B)
    for record in (kept, moved, gone, dataclasses.replace(moved, bot_id=BOT_B.upper()),
                   dataclasses.replace(kept, enabled=False)):
        save_endpoint(topics, record)
    remove_endpoint(topics, gone.id)
    table = load_endpoints(topics)
    assert len(table) == 2
    assert table.get(kept.id) == dataclasses.replace(kept, enabled=False)
    assert table.get(gone.id) is None
    assert [e.id for e in table.for_bot(BOT_B)] == [moved.id]
    assert table.for_bot(BOT_A) == [dataclasses.replace(kept, enabled=False)]
    assert table.for_event(BOT_A, "MESSAGE") == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_registry_loads_100k_endpoints_in_linear_time(topics: Config) -> None:
    """Half of them in one bot, half spread over 5,000 bots, written straight to the topic.
    Loading them takes a few seconds here; a table that rescans every endpoint per
    record needs minutes."""
    topic = Topics.from_config(topics).endpoints
    codec = Codec()
    big_bot = str(uuid.uuid4())
    small_bots = [str(uuid.uuid4()) for _ in range(5_000)]
    producer = Producer({"bootstrap.servers": topics.bootstrap_servers, "linger.ms": 50,
                         "queue.buffering.max.messages": 200_000})
    for i in range(100_000):
        bot = big_bot if i % 2 else small_bots[i % len(small_bots)]
        record = endpoint(f"e{i}", bot, created=i)
        producer.produce(topic, key=record.id.encode(),
                         value=codec.encode(ENDPOINT_SCHEMA, record.to_record(), topic=topic))
        if i % 1_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0

    started = time.monotonic()
    table = load_endpoints(topics, timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"100,000 endpoints loaded in {elapsed:.1f} s"
    assert len(table) == 100_000
    assert len(table.for_event(big_bot.upper(), "MESSAGE")) == 50_000
    assert [e.id for e in table.for_bot(small_bots[2])] == [f"e{i}" for i in range(2, 100_000, 5_000)]
