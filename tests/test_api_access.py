"""Scopes, over real HTTP on a real broker: a bot token sees and touches its own bot's
endpoints, history and dead letters, and gets 403 for another's (test sends, replays and
resends included); a read token reads and never writes; minted tokens expire, cannot
be forged and are accepted by every process sharing the tokens; the library functions
the CLI calls apply the same scopes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from gateway.api import Tokens
from gateway.codec import Codec
from gateway.config import Config
from gateway.errors import Forbidden
from gateway.ops import (
    Access,
    HistoryFilters,
    Scope,
    find_dead_letters,
    get_endpoint,
    list_endpoints,
    plan_replay,
    read_dead_letters,
    read_history,
    register_endpoint,
    update_endpoint,
)
from gateway.records import (
    DEAD_LETTER_SCHEMA,
    DELIVERY_ATTEMPT_SCHEMA,
    Attempt,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    DeliveryAttempt,
    Next,
    Outcome,
)
from gateway.store import Topics, dead_letter_headers

from .test_api import (
    BOT,
    BOT_TOKEN,
    OTHER_BOT,
    READ_TOKEN,
    TOKEN,
    TOKENS,
    Served,
    create,
    etag,
    eventually,
    is_problem,
    served,
)

pytestmark = pytest.mark.integration


def write_dead_letters(config: Config, *pairs: tuple[str, str], dead_at: int | None = None) -> list[str]:
    """A dead letter (retries exhausted) per (bot, endpoint), oldest first, one ms apart;
    their event ids."""
    topic = Topics.from_config(config).dlq
    codec = Codec()
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    start = dead_at if dead_at is not None else time.time_ns() // 1_000_000 - 60_000
    ids = []
    for number, (bot, endpoint_id) in enumerate(pairs):
        at = start + number
        delivery = Delivery(
            event_id=str(uuid.uuid4()), event_type="MESSAGE", bot_id=bot, session_id=str(uuid.uuid4()),
            occurred_at=at - 1000, payload='{"event":"MESSAGE","message":"private chat text"}',
            endpoint_id=endpoint_id, attempt=4, due_at=at,
            attempts=(Attempt(at=at, tier="retry-3s", duration_ms=1.0, outcome=Outcome.HTTP_ERROR, status=503),))
        dead = DeadLetter(reason=DeadLetterReason.RETRIES_EXHAUSTED, detail="HTTP 503", dead_at=at,
                          source_topic="t", source_partition=0, source_offset=number, delivery=delivery)
        producer.produce(topic, key=endpoint_id.encode(), value=codec.encode(DEAD_LETTER_SCHEMA, dead.to_record(),
                                                                             topic=topic),
                         headers=dead_letter_headers(dead))
        ids.append(delivery.event_id)
    assert producer.flush(10) == 0
    return ids


def write_attempts(config: Config, *lines: DeliveryAttempt) -> None:
    topic = Topics.from_config(config).attempts
    codec = Codec()
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    for item in lines:
        producer.produce(topic, key=item.endpoint_id.encode(),
                         value=codec.encode(DELIVERY_ATTEMPT_SCHEMA, item.to_record(), topic=topic))
    assert producer.flush(10) == 0


def attempt(bot: str, endpoint_id: str, *, at: int | None = None, outcome: Outcome = Outcome.SUCCESS,
            status: int | None = 200, event_id: str | None = None) -> DeliveryAttempt:
    when = at if at is not None else time.time_ns() // 1_000_000
    return DeliveryAttempt(event_id=event_id or str(uuid.uuid4()), event_type="MESSAGE", bot_id=bot,
                           endpoint_id=endpoint_id, occurred_at=when - 10, number=1,
                           attempt=Attempt(at=when, tier="events", duration_ms=2.0, outcome=outcome, status=status),
                           next=Next.read("delivered" if outcome is Outcome.SUCCESS else "retry:retry-1s"))


@pytest.fixture
def api_http(topics: Config) -> Iterator[Served]:
    with served(topics) as api:
        yield api


def test_a_bot_token_sees_and_touches_its_own_bot_only(api_http: Served, topics: Config) -> None:
    admin = api_http.client(TOKEN)
    minted = admin.post("/v1/tokens", json={"botId": BOT, "ttlSeconds": 600})
    assert minted.status_code == 201 and minted.json()["scope"] == "bot" and minted.json()["botId"] == BOT
    mine_made = create(admin, BOT, "http://127.0.0.1:9/mine")  # test sends to it are refused at once
    theirs_made = create(admin, OTHER_BOT, "https://example.com/theirs")
    mine, theirs = mine_made.json()["id"], theirs_made.json()["id"]
    write_attempts(topics, attempt(BOT, mine), attempt(OTHER_BOT, theirs))
    mine_dead, theirs_dead = write_dead_letters(topics, (BOT, mine), (OTHER_BOT, theirs))
    eventually(lambda: len(admin.get("/v1/dead-letters").json()["data"]) == 2
               and len(admin.get("/v1/deliveries").json()["data"]) == 2, "the indexes follow the topics")

    for token in (BOT_TOKEN, minted.json()["token"]):  # a configured bot token, a minted one
        bot = api_http.client(token)
        # Reads: its own only; another bot's is 403, never an empty answer.
        listed = bot.get("/v1/endpoints").json()["data"]
        assert mine in [e["id"] for e in listed] and {e["botId"] for e in listed} == {BOT}
        is_problem(bot.get("/v1/endpoints", params={"botId": OTHER_BOT}), 403, "forbidden")
        assert bot.get(f"/v1/endpoints/{mine}").status_code == 200
        for path in (f"/v1/endpoints/{theirs}", f"/v1/endpoints/{theirs}/stats"):
            is_problem(bot.get(path), 403, "forbidden")
        assert [d["endpointId"] for d in bot.get("/v1/deliveries").json()["data"]] == [mine]
        is_problem(bot.get("/v1/deliveries", params={"endpointId": theirs}), 403, "forbidden")
        is_problem(bot.get("/v1/deliveries", params={"botId": OTHER_BOT}), 403, "forbidden")
        assert [d["eventId"] for d in bot.get("/v1/dead-letters").json()["data"]] == [mine_dead]
        assert bot.get("/v1/dead-letters/stats").json()["total"] == 1
        is_problem(bot.get("/v1/dead-letters", params={"endpointId": theirs}), 403, "forbidden")
        is_problem(bot.get("/v1/dead-letters", params={"botId": OTHER_BOT}), 403, "forbidden")
        is_problem(bot.get(f"/v1/dead-letters/{theirs_dead}"), 403, "forbidden")
        assert bot.get(f"/v1/dead-letters/{mine_dead}").json()[0]["payload"]
        # Writes, sends, replays and resends of another bot's: 403, whatever the version.
        current = admin.get(f"/v1/endpoints/{theirs}")
        for method, path, body in (("PATCH", f"/v1/endpoints/{theirs}", {"description": "x"}),
                                   ("DELETE", f"/v1/endpoints/{theirs}", None),
                                   ("POST", f"/v1/endpoints/{theirs}/disable", None),
                                   ("POST", f"/v1/endpoints/{theirs}/rotate-secret", {}),
                                   ("POST", f"/v1/endpoints/{theirs}/test", {})):
            is_problem(bot.request(method, path, json=body, headers=etag(current)), 403, "forbidden")
            is_problem(bot.request(method, path, json=body), 403, "forbidden")  # 403 before 428
        is_problem(bot.post("/v1/endpoints", json={"botId": OTHER_BOT, "url": "https://example.com/x"}),
                   403, "forbidden")
        their_attempt = admin.get("/v1/deliveries", params={"endpointId": theirs}).json()["data"][0]["id"]
        is_problem(bot.post(f"/v1/deliveries/{their_attempt}/resend"), 403, "forbidden")
        is_problem(bot.post("/v1/dead-letters/replay", json={"endpointId": theirs}), 403, "forbidden")
        is_problem(bot.post("/v1/dead-letters/replay", json={"all": True, "toEndpoint": theirs}), 403, "forbidden")
        is_problem(bot.post("/v1/dead-letters/replay", json={"botId": OTHER_BOT}), 403, "forbidden")
        is_problem(bot.post("/v1/tokens", json={"botId": BOT}), 403, "forbidden")
        # "all" is all of its own.
        planned = bot.post("/v1/dead-letters/replay", json={"all": True, "dryRun": True}).json()
        assert planned["selected"] == 1 and [i["eventId"] for i in planned["items"]] == [mine_dead]
        assert planned["botId"] == BOT
        # Its own: read, write, send.
        assert bot.get(f"/v1/endpoints/{mine}/stats").status_code == 200
        changed = bot.patch(f"/v1/endpoints/{mine}", json={"description": token[:4]},
                            headers=etag(bot.get(f"/v1/endpoints/{mine}")))
        assert changed.status_code == 200, changed.text
        assert bot.post(f"/v1/endpoints/{mine}/test", json={"events": ["MESSAGE"]}).status_code == 200
        own = bot.post("/v1/endpoints", json={"botId": BOT.upper(), "url": "https://example.com/own"})
        assert own.status_code == 201 and own.json()["botId"] == BOT
    # A replay job started by an admin is not a bot's to read.
    job = admin.post("/v1/dead-letters/replay", json={"all": True, "dryRun": True}).json()
    assert admin.get(f"/v1/replays/{job['id']}").status_code == 200
    is_problem(api_http.client(BOT_TOKEN).get(f"/v1/replays/{job['id']}"), 403, "forbidden")


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_a_read_token_reads_everything_and_writes_nothing(api_http: Served, topics: Config) -> None:
    admin, reader = api_http.client(TOKEN), api_http.client(READ_TOKEN)
    made = create(admin, BOT)
    create(admin, OTHER_BOT)
    endpoint_id = made.json()["id"]
    assert len(reader.get("/v1/endpoints").json()["data"]) == 2
    assert reader.get(f"/v1/endpoints/{endpoint_id}").json()["secret"] == "whsec_********"
    for path in ("/v1/deliveries", "/v1/dead-letters", "/v1/dead-letters/stats", "/v1/event-types",
                 f"/v1/endpoints/{endpoint_id}/stats"):
        assert reader.get(path).status_code == 200, path
    for method, path, body in (("POST", "/v1/endpoints", {"botId": BOT, "url": "https://example.com/r"}),
                               ("PATCH", f"/v1/endpoints/{endpoint_id}", {"description": "x"}),
                               ("DELETE", f"/v1/endpoints/{endpoint_id}", None),
                               ("POST", f"/v1/endpoints/{endpoint_id}/enable", None),
                               ("POST", f"/v1/endpoints/{endpoint_id}/rotate-secret", {}),
                               ("POST", f"/v1/endpoints/{endpoint_id}/test", {}),
                               ("POST", "/v1/dead-letters/replay", {"all": True}),
                               ("POST", "/v1/deliveries/0:0/resend", None),
                               ("POST", "/v1/tokens", {"botId": BOT})):
        is_problem(reader.request(method, path, json=body, headers=etag(made)), 403, "forbidden")
    assert reader.post("/v1/dead-letters/replay", json={"all": True, "dryRun": True}).status_code == 200
    assert admin.get(f"/v1/endpoints/{endpoint_id}").json()["version"] == made.json()["version"]


@pytest.mark.brokers("tansu")  # the tokens' own rules: no broker behaviour in them
def test_minted_tokens_expire_and_cannot_be_forged(topics: Config) -> None:
    now = [1_900_000_000.0]
    with served(topics, Tokens(TOKENS, now=lambda: now[0])) as api:
        admin = api.client()
        minted = admin.post("/v1/tokens", json={"botId": BOT, "ttlSeconds": 60})
        assert minted.status_code == 201
        token = minted.json()["token"]
        assert minted.json()["expiresAt"] == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now[0] + 60))
        assert token.startswith("gwb1.") and BOT not in token  # the claims are encoded, not in clear
        session = api.client(token)
        assert session.get("/v1/endpoints").status_code == 200
        now[0] += 59
        assert session.get("/v1/endpoints").status_code == 200
        now[0] += 1
        expired = is_problem(session.get("/v1/endpoints"), 401, "unauthorized")
        assert "minted" in expired["detail"]
        # Another bot in the claims, the same signature: refused.
        head, payload, signature = admin.post("/v1/tokens", json={"botId": BOT}).json()["token"].split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        forged_payload = base64.urlsafe_b64encode(
            json.dumps(claims | {"bot": OTHER_BOT}).encode()).decode().rstrip("=")
        is_problem(api.client(f"{head}.{forged_payload}.{signature}").get("/v1/endpoints"), 401, "unauthorized")
        is_problem(api.client(f"{head}.{payload}.{signature[:-2]}AA").get("/v1/endpoints"), 401, "unauthorized")
        is_problem(api.client("gwb1.x.y").get("/v1/endpoints"), 401, "unauthorized")
    # Every process configured with the same tokens accepts it; other tokens (another key) do not.
    fresh = Tokens(TOKENS, now=lambda: 1_900_000_000.0).mint(BOT, ttl=60).token
    same = Tokens(TOKENS, now=lambda: 1_900_000_010.0).access(fresh)
    assert same is not None and same.scope is Scope.BOT and same.bot_id == BOT
    assert Tokens(["another-admin-" + "z" * 20], now=lambda: 1_900_000_010.0).access(fresh) is None
    # With a key: of its own, minted tokens survive a rotation of the admin tokens.
    key = "key:" + "k" * 40
    keyed = Tokens([TOKEN, key], now=lambda: 1_900_000_000.0).mint(BOT, ttl=60).token
    assert Tokens(["rotated-admin-" + "z" * 20, key], now=lambda: 1_900_000_001.0).access(keyed) is not None
    assert Tokens([f"read:{READ_TOKEN}"]).can_mint is False


def test_the_cli_mints_a_token_every_api_process_accepts(topics: Config) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {
        "GATEWAY_API_TOKENS": ",".join(TOKENS)}
    printed = subprocess.run([sys.executable, "-m", "gateway", "api", "--mint-token", BOT, "--token-ttl", "10m"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert printed.returncode == 0, printed.stderr
    token = printed.stdout.strip()
    assert "valid for 10m" in printed.stderr
    with served(topics) as api:
        session = api.client(token)
        assert session.get("/v1/endpoints").status_code == 200
        is_problem(session.get("/v1/endpoints", params={"botId": OTHER_BOT}), 403, "forbidden")
    refused = subprocess.run([sys.executable, "-m", "gateway", "api", "--mint-token", "not-a-bot"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2 and "--mint-token" in refused.stderr


def test_the_library_functions_apply_the_same_scopes(topics: Config) -> None:
    mine = register_endpoint(topics, bot_id=BOT, url="https://example.com/mine").endpoint
    theirs = register_endpoint(topics, bot_id=OTHER_BOT, url="https://example.com/theirs").endpoint
    write_attempts(topics, attempt(BOT, mine.id), attempt(OTHER_BOT, theirs.id))
    write_dead_letters(topics, (BOT, mine.id), (OTHER_BOT, theirs.id))
    bot, reader = Access.for_bot(BOT), Access(Scope.READ)
    assert [e.id for e in list_endpoints(topics, access=bot)] == [mine.id]
    with pytest.raises(Forbidden):
        list_endpoints(topics, bot_id=OTHER_BOT, access=bot)
    with pytest.raises(Forbidden):
        get_endpoint(topics, theirs.id, access=bot)
    with pytest.raises(Forbidden):
        update_endpoint(topics, theirs.id, description="x", access=bot)
    with pytest.raises(Forbidden):
        update_endpoint(topics, mine.id, description="x", access=reader)
    with pytest.raises(Forbidden):
        register_endpoint(topics, bot_id=OTHER_BOT, url="https://example.com/x", access=bot)
    assert {e.line.bot_id for e in read_history(topics, access=bot)} == {BOT}
    with pytest.raises(Forbidden):
        read_history(topics, HistoryFilters(bot_id=OTHER_BOT), access=bot)
    seen = list(read_dead_letters(topics, access=bot))
    assert [e.delivery.bot_id for e in seen if e.delivery] == [BOT]
    theirs_dead = next(e for e in read_dead_letters(topics) if e.delivery and e.delivery.bot_id == OTHER_BOT)
    with pytest.raises(Forbidden):
        find_dead_letters(topics, str(theirs_dead.id), access=bot)
    assert plan_replay(topics, access=bot).selected == 1
    with pytest.raises(Forbidden):
        plan_replay(topics, to_endpoint=theirs.id, access=bot)
    # The command line is the operator: everything.
    assert len(list_endpoints(topics)) == 2 and len(list(read_dead_letters(topics))) == 2

