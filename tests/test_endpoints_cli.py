"""`gateway endpoints add|list|disable|enable|remove` as a subprocess against the real
bundled broker. Independent invocations run concurrently to keep the file fast."""

from __future__ import annotations

import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway.config import Config
from gateway.records import Endpoint
from gateway.signing import new_secret, secret_key
from gateway.store import save_endpoint

from .conftest import run_gateway

pytestmark = pytest.mark.integration

BOT_A = "6434515b-8541-4861-bb24-8acd6e77e8c4"
BOT_B = "0b8c7f7e-2f5a-4c55-9a3b-6a4c0e0f1d2e"
PUBLIC_URL = "https://example.com/hook"
PRIVATE_URL = "http://127.0.0.1:9/hook"

Result = subprocess.CompletedProcess[str]


def run_all(config: Config, *commands: tuple[str, ...]) -> list[Result]:
    """Run several `gateway` invocations at once; results in the order given."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: run_gateway(config, *args), commands))


def ok(result: Result) -> Result:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def json_lines(result: Result) -> list[dict[str, Any]]:
    ok(result)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def listed(config: Config, *args: str) -> list[dict[str, Any]]:
    return json_lines(run_gateway(config, "endpoints", "list", "--json", *args))


def test_endpoint_lifecycle(topics: Config) -> None:
    added_a, added_b = run_all(
        topics,
        ("endpoints", "add", "--bot-id", BOT_A, "--url", PUBLIC_URL, "--events", "TICKET,message",
         "--description", "crm", "--json"),
        ("endpoints", "add", "--bot-id", BOT_B, "--url", PRIVATE_URL,
         "--allow-private-networks", "false"),
    )

    # add --json: one object with the full secret.
    [a] = json_lines(added_a)
    assert set(a) >= {"id", "botId", "url", "events", "enabled", "secret"}
    assert uuid.UUID(a["id"])
    assert a["botId"] == BOT_A
    assert a["url"] == PUBLIC_URL
    assert a["events"] == ["TICKET", "MESSAGE"]
    assert a["enabled"] is True
    assert a["description"] == "crm"
    assert a["secret"].startswith("whsec_")
    assert len(secret_key(a["secret"])) == 32
    assert "warning" not in added_a.stderr  # a public URL draws no warning
    secret_a = a["secret"]

    # add without --json: human output, the secret printed exactly once.
    ok(added_b)
    fields = dict(line.split(None, 1) for line in added_b.stdout.splitlines() if line.strip())
    id_b = fields["id"].strip()
    assert uuid.UUID(id_b)
    assert fields["bot"].strip() == BOT_B
    assert fields["events"].strip() == "all"
    secret_b = fields["secret"].split()[0]
    assert len(secret_key(secret_b)) == 32
    assert added_b.stdout.count(secret_b) == 1
    assert secret_b not in added_b.stderr
    # ... and a private destination is registered, with a warning.
    assert "warning" in added_b.stderr and PRIVATE_URL in added_b.stderr

    masked, shown, table, only_b = run_all(
        topics,
        ("endpoints", "list", "--json"),
        ("endpoints", "list", "--json", "--show-secrets", "--bot-id", BOT_A),
        ("endpoints", "list"),
        ("endpoints", "list", "--json", "--bot-id", BOT_B),
    )

    # list --json: one object per endpoint, secrets masked and nowhere in the output.
    rows = {r["id"]: r for r in json_lines(masked)}
    assert set(rows) == {a["id"], id_b}
    assert rows[a["id"]]["events"] == ["TICKET", "MESSAGE"]
    assert rows[a["id"]]["url"] == PUBLIC_URL and rows[a["id"]]["botId"] == BOT_A
    assert rows[id_b]["events"] == [] and rows[id_b]["url"] == PRIVATE_URL
    assert rows[a["id"]]["secret"] != secret_a
    assert rows[id_b]["secret"] != secret_b
    for result in (masked, table, only_b):
        for secret in (secret_a, secret_b):
            assert secret not in result.stdout and secret not in result.stderr
            assert secret.removeprefix("whsec_") not in result.stdout + result.stderr

    # --show-secrets shows it; --bot-id filters.
    [shown_a] = json_lines(shown)
    assert shown_a["id"] == a["id"] and shown_a["secret"] == secret_a
    assert [r["id"] for r in json_lines(only_b)] == [id_b]

    # The table lists both.
    ok(table)
    assert a["id"] in table.stdout and id_b in table.stdout

    # disable, then enable back.
    disabled = ok(run_gateway(topics, "endpoints", "disable", a["id"]))
    assert a["id"] in disabled.stderr
    [row] = listed(topics, "--bot-id", BOT_A)
    assert row["id"] == a["id"] and row["enabled"] is False
    # The rest is unchanged.
    assert row["events"] == ["TICKET", "MESSAGE"] and row["url"] == PUBLIC_URL

    ok(run_gateway(topics, "endpoints", "enable", a["id"]))
    [row] = listed(topics, "--bot-id", BOT_A, "--show-secrets")
    assert row["enabled"] is True
    assert row["secret"] == secret_a  # enabling keeps the secret

    # remove: gone from the list; removing again (or changing it) fails clearly.
    removed = ok(run_gateway(topics, "endpoints", "remove", a["id"]))
    assert a["id"] in removed.stderr
    after, again, disable_gone = run_all(
        topics,
        ("endpoints", "list", "--json"),
        ("endpoints", "remove", a["id"]),
        ("endpoints", "disable", a["id"]),
    )
    assert [r["id"] for r in json_lines(after)] == [id_b]
    for result in (again, disable_gone):
        assert result.returncode == 1, result.stderr
        assert "no endpoint" in result.stderr and a["id"] in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


INVALID = {
    "bot id": (("--bot-id", "not-a-uuid", "--url", PUBLIC_URL), "not-a-uuid"),
    "ftp url": (("--bot-id", BOT_A, "--url", "ftp://example.com/hook"), "ftp://example.com/hook"),
    "event type": (("--bot-id", BOT_A, "--url", PUBLIC_URL, "--events", "MESSAGE,bogus"), "BOGUS"),
    "credentials": (("--bot-id", BOT_A, "--url", "https://u:p@example.com/"), "credentials"),
    # urlsplit takes these; the sender's parser (httpx) does not:
    "bad IDNA host": (("--bot-id", BOT_A, "--url", "http://\u2603.example/hook"), "not a valid URL"),
    "bad IPv4 host": (("--bot-id", BOT_A, "--url", "http://1.2.3.999/hook"), "not a valid URL"),
    "secret": (("--bot-id", BOT_A, "--url", PUBLIC_URL, "--secret", "whsec_short"), "secret"),
}


def test_invalid_input_is_refused_and_nothing_is_registered(topics: Config) -> None:
    unknown = str(uuid.uuid4())
    results = run_all(
        topics,
        *(("endpoints", "add", *args) for args, _ in INVALID.values()),
        ("endpoints", "add", "--bot-id", BOT_A),  # --url missing: a usage error
        ("endpoints", "remove", unknown),
        ("endpoints", "enable", unknown),
    )
    for (name, (_, named)), result in zip(INVALID.items(), results, strict=False):
        assert result.returncode == 1, f"{name}: exit {result.returncode}\n{result.stderr}"
        assert result.stderr.startswith("error: "), f"{name}: {result.stderr}"
        assert named in result.stderr, f"{name}: {result.stderr}"
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
    usage, remove_unknown, enable_unknown = results[len(INVALID):]
    assert usage.returncode == 2
    assert "--url" in usage.stderr
    for result in (remove_unknown, enable_unknown):
        assert result.returncode == 1
        assert f"no endpoint with id {unknown!r}" in result.stderr
        assert "Traceback" not in result.stderr

    as_json, as_table = run_all(topics, ("endpoints", "list", "--json"), ("endpoints", "list"))
    assert json_lines(as_json) == []
    ok(as_table)
    assert as_table.stdout == ""
    assert "no endpoints" in as_table.stderr


def test_list_without_topics_fails_clearly(config: Config) -> None:
    result = run_gateway(config, "endpoints", "list", "--json")
    assert result.returncode == 1
    assert f"{config.topic_prefix}.endpoints" in result.stderr
    assert "topics create" in result.stderr
    assert "Traceback" not in result.stderr


def stored(bot_id: str, url: str = PUBLIC_URL, **fields: Any) -> Endpoint:
    """A registration as the platform might write it straight to the endpoints topic,
    without the CLI's validation."""
    return Endpoint(id=str(uuid.uuid4()), bot_id=bot_id, url=url,
                    secret=new_secret(),
                    created_at=1, updated_at=1, **fields)


def test_list_by_bot_id_ignores_case(topics: Config) -> None:
    [added] = json_lines(run_gateway(topics, "endpoints", "add", "--bot-id", BOT_A.upper(),
                                     "--url", PUBLIC_URL, "--json"))
    written = stored(BOT_A.upper())  # not lower-cased by the CLI on the way in
    save_endpoint(topics, written)
    save_endpoint(topics, stored(BOT_B))
    upper, lower, table = run_all(
        topics,
        ("endpoints", "list", "--json", "--bot-id", BOT_A.upper()),
        ("endpoints", "list", "--json", "--bot-id", BOT_A),
        ("endpoints", "list", "--bot-id", BOT_A.upper()),
    )
    for result in (upper, lower):
        assert sorted(r["id"] for r in json_lines(result)) == sorted([added["id"], written.id])
    ok(table)
    assert added["id"] in table.stdout and written.id in table.stdout


CONTROL = "\x1b[2J\x1b]0;owned\x07\r\x08\x00\u202e"


def test_list_escapes_control_characters_written_straight_to_the_topic(topics: Config) -> None:
    url = f"https://example.com/{CONTROL}hook"
    hostile = stored(BOT_A, url, description=f"crm{CONTROL}", event_types=(f"MESSAGE{CONTROL}",))
    save_endpoint(topics, hostile)
    table, as_json = run_all(topics, ("endpoints", "list"), ("endpoints", "list", "--json"))
    ok(table)
    for char in CONTROL:
        if not char.isprintable():
            assert char not in table.stdout + table.stderr, repr(char)
    # Escaped, so the reader sees what is there.
    assert r"https://example.com/\x1b[2J\x1b]0;owned\x07\r\x08\x00\u202ehook" in table.stdout
    assert hostile.id in table.stdout
    # JSON keeps the exact value (json escapes control characters itself).
    [row] = json_lines(as_json)
    assert row["url"] == url and row["description"] == f"crm{CONTROL}"
    assert "\x1b" not in as_json.stdout
