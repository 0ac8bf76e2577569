"""The management API on real brokers, over real HTTP: tokens on every route, hand-named
operations, read-your-writes, errors as problem+json that name the field, parity with
the CLI, test sends, the delivery history and replay jobs end to end. The committed
OpenAPI document is checked against the served one.

The harness here (:class:`Served`, :func:`served`, the tokens) is what the other
``test_api_*`` modules use: the real application behind uvicorn, on a thread of the
test, as ``gateway up`` serves it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.api import ApiService, ApiThread, Tokens, bind_address, create_app, is_loopback, openapi_document
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.ops import Scope
from gateway.verify import verify

from .conftest import free_port, gateway_env, run_gateway
from .receiver import Receiver

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "events.jsonl"
TOKEN = "test-token-" + "x" * 24
OTHER_TOKEN = "other-token-" + "y" * 24
READ_TOKEN = "read-token-" + "r" * 24
BOT = "6434515b-8541-4861-bb24-8acd6e77e8c4"
OTHER_BOT = "0b7e6f1a-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
BOT_TOKEN = "bot-token-" + "b" * 24
TOKENS = (TOKEN, f"read:{READ_TOKEN}", f"bot:{BOT}:{BOT_TOKEN}")
AUTH = {"authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --- the harness -----------------------------------------------------------------------------


class Served:
    """The API over real HTTP: uvicorn on a thread of the test (as `gateway up` runs it)."""

    def __init__(self, service: ApiService) -> None:
        self.service = service
        self.thread = ApiThread(service, bind_address("127.0.0.1", 0)).start()
        self.url = f"http://127.0.0.1:{self.thread.sock.getsockname()[1]}"
        self._clients: list[httpx.Client] = []

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        """A client sending ``token`` (None: no Authorization header)."""
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self.thread.stop()


@contextlib.contextmanager
def served(config: Config, tokens: Tokens | None = None, *, service: type[ApiService] = ApiService,
           **options: Any) -> Iterator[Served]:
    running = service(config, tokens or Tokens(TOKENS), **options).start()
    api = Served(running)
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def api_http(topics: Config) -> Iterator[Served]:
    with served(topics) as api:
        yield api


@pytest.fixture
def client(api_http: Served) -> httpx.Client:
    return api_http.client()


def etag(answer: httpx.Response) -> dict[str, str]:
    """The If-Match header a write after ``answer`` sends."""
    return {"if-match": answer.headers["etag"]}


def create(client: httpx.Client, bot: str = BOT, url: str = "https://example.com/hook",
           **fields: Any) -> httpx.Response:
    made = client.post("/v1/endpoints", json={"botId": bot, "url": url} | fields)
    assert made.status_code == 201, made.text
    return made


def is_problem(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``answer`` is an RFC 9457 problem of ``code``; its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM), answer.headers
    body: dict[str, Any] = answer.json()
    assert body["type"] == f"urn:webhook-gateway:problem:{code}" and body["code"] == code, body
    assert body["status"] == status and body["title"] and body["detail"] and isinstance(body["errors"], list)
    assert body["instance"] == answer.request.url.path
    return body


def eventually(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


# --- without a broker ------------------------------------------------------------------------


def test_the_committed_openapi_document_is_the_served_one() -> None:
    app = create_app(ApiService(Config(), Tokens([TOKEN])))
    committed = json.loads((ROOT / "openapi.json").read_text())
    assert committed == openapi_document(app), (
        "openapi.json differs from the API's document: regenerate it with `gateway api --openapi > openapi.json`")
    with TestClient(app) as client:
        served_document = client.get("/openapi.json", headers=AUTH)
        assert served_document.status_code == 200 and served_document.json() == committed
        assert client.get("/openapi.json").status_code == 401
    printed = subprocess.run([sys.executable, "-m", "gateway", "api", "--openapi"], capture_output=True, text=True,
                             timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")})
    assert printed.returncode == 0 and json.loads(printed.stdout) == committed


def test_tokens_are_refused_when_weak_and_compared_whole() -> None:
    tokens = Tokens.from_config(Config.from_env({"GATEWAY_API_TOKENS": f" {TOKEN}, {OTHER_TOKEN} ,"}))
    assert len(tokens) == 2 and tokens.accepts(TOKEN) and tokens.accepts(OTHER_TOKEN)
    assert not tokens.accepts(TOKEN[:-1]) and not tokens.accepts(TOKEN + "x") and not tokens.accepts("")
    assert not Tokens.from_config(Config.from_env({}))
    with pytest.raises(ConfigError, match="token 2 is 5 characters"):
        Tokens([TOKEN, "short"])
    with pytest.raises(ConfigError, match="whitespace"):
        Tokens(["a" * 20 + "\t"])
    assert len(Tokens.generate()) >= 40
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "example.com"))


def test_configured_tokens_get_their_scope_from_a_prefix() -> None:
    tokens = Tokens([TOKEN, f"admin:{OTHER_TOKEN}", f"read:{READ_TOKEN}", f"bot:{BOT.upper()}:{BOT_TOKEN}",
                     "odd:token-with-a-colon"])
    found = {t: tokens.access(t) for t in (TOKEN, OTHER_TOKEN, READ_TOKEN, BOT_TOKEN, "odd:token-with-a-colon")}
    assert {t: (a.scope, a.bot_id) for t, a in found.items() if a is not None} == {
        TOKEN: (Scope.ADMIN, None), OTHER_TOKEN: (Scope.ADMIN, None), READ_TOKEN: (Scope.READ, None),
        BOT_TOKEN: (Scope.BOT, BOT), "odd:token-with-a-colon": (Scope.ADMIN, None)}
    assert tokens.access(f"read:{READ_TOKEN}") is None  # the prefix is not part of the token
    assert all(TOKEN[:12] not in repr(a) for a in found.values())  # the subject is a digest, never the token
    with pytest.raises(ConfigError, match="bot:BOT_ID:TOKEN"):
        Tokens([f"bot:not-a-uuid:{BOT_TOKEN}"])
    with pytest.raises(ConfigError, match="the key"):
        Tokens([TOKEN, "key:too-short"])


def test_gateway_api_refuses_to_start_without_tokens() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run([sys.executable, "-m", "gateway", "api", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and "GATEWAY_API_TOKENS is not set (or empty)" in result.stderr
    # What docker-compose.yml's api service gets when the host has no token.
    empty = subprocess.run([sys.executable, "-m", "gateway", "api", "--port", str(free_port())],
                           capture_output=True, text=True, timeout=60, env=env | {"GATEWAY_API_TOKENS": ""})
    assert empty.returncode == 1 and "GATEWAY_API_TOKENS is not set (or empty)" in empty.stderr
    weak = subprocess.run([sys.executable, "-m", "gateway", "api"], capture_output=True, text=True, timeout=60,
                          env=env | {"GATEWAY_API_TOKENS": "letmein"})
    assert weak.returncode == 1 and "at least 16" in weak.stderr and "letmein" not in weak.stderr


def operations() -> dict[tuple[str, str], str]:
    document = openapi_document(create_app(ApiService(Config(), Tokens([TOKEN]))))
    return {(method.upper(), path): operation["operationId"]
            for path, item in document["paths"].items() for method, operation in item.items()}


def routes() -> list[tuple[str, str]]:
    return list(operations())


def test_every_route_has_its_hand_named_operation() -> None:
    assert operations() == {
        ("GET", "/healthz"): "getHealth",
        ("GET", "/readyz"): "getReadiness",
        ("POST", "/v1/tokens"): "mintToken",
        ("GET", "/v1/event-types"): "listEventTypes",
        ("GET", "/v1/endpoints"): "listEndpoints",
        ("POST", "/v1/endpoints"): "createEndpoint",
        ("GET", "/v1/endpoints/{id}"): "getEndpoint",
        ("PATCH", "/v1/endpoints/{id}"): "updateEndpoint",
        ("DELETE", "/v1/endpoints/{id}"): "deleteEndpoint",
        ("POST", "/v1/endpoints/{id}/enable"): "enableEndpoint",
        ("POST", "/v1/endpoints/{id}/disable"): "disableEndpoint",
        ("POST", "/v1/endpoints/{id}/rotate-secret"): "rotateEndpointSecret",
        ("POST", "/v1/endpoints/{id}/test"): "testEndpoint",
        ("GET", "/v1/endpoints/{id}/stats"): "getEndpointStats",
        ("GET", "/v1/deliveries"): "listDeliveries",
        ("POST", "/v1/deliveries/{id}/resend"): "resendDelivery",
        ("GET", "/v1/dead-letters"): "listDeadLetters",
        ("GET", "/v1/dead-letters/stats"): "getDeadLetterStats",
        ("GET", "/v1/dead-letters/{id}"): "getDeadLetter",
        ("POST", "/v1/dead-letters/replay"): "replayDeadLetters",
        ("GET", "/v1/replays/{id}"): "getReplay",
    }


def test_the_document_names_its_enums_examples_and_problems() -> None:
    document = openapi_document(create_app(ApiService(Config(), Tokens([TOKEN]))))
    schemas = document["components"]["schemas"]
    assert schemas["Outcome"]["enum"] == ["success", "http_error", "timeout", "connection_error", "blocked",
                                          "invalid_endpoint", "internal_error", "circuit_open", "deferred", "unknown"]
    assert set(schemas["CircuitState"]["enum"]) == {"closed", "open", "half_open", "unknown"}
    assert set(schemas["JobState"]["enum"]) == {"dry_run", "running", "succeeded", "failed"}
    assert "HTTPValidationError" not in schemas
    assert schemas["EndpointCreate"]["examples"] and schemas["EndpointOut"]["examples"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if int(status) >= 400 and path.startswith("/v1/"):
                    assert list(answer["content"]) == [PROBLEM], (method, path, status)
    patch = document["paths"]["/v1/endpoints/{id}"]["patch"]
    assert set(patch["requestBody"]["content"]) == {"application/json", "application/merge-patch+json"}
    assert {p["name"] for p in patch["parameters"]} >= {"id", "If-Match"}
    assert "ETag" in patch["responses"]["200"]["headers"]


# --- an API over a real broker ---------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # the API's own checks: no broker behaviour in them
def test_every_route_needs_a_good_token(api_http: Served) -> None:
    bodies = {"/v1/endpoints": {"botId": BOT, "url": "http://127.0.0.1:9/hook"},
              "/v1/dead-letters/replay": {"all": True, "dryRun": True}, "/v1/tokens": {"botId": BOT}}
    clients = {"none": api_http.client(None), "wrong": api_http.client(OTHER_TOKEN),
               "good": api_http.client(TOKEN)}
    basic = httpx.Client(base_url=api_http.url, headers={"authorization": f"Basic {TOKEN}"})
    checked = 0
    for method, path in routes():
        url = path.replace("{id}", "0:1" if "deliveries" in path else str(uuid.uuid4()))
        body = bodies.get(path, {}) if method in ("POST", "PATCH") else None
        answers = {name: c.request(method, url, json=body) for name, c in clients.items()}
        answers["basic"] = basic.request(method, url, json=body)
        if path in ("/healthz", "/readyz"):
            assert all(a.status_code == 200 for a in answers.values())
            continue
        for name in ("none", "wrong", "basic"):
            answer = answers[name]
            is_problem(answer, 401, "unauthorized")
            assert answer.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in answer.text
        good = answers["good"]
        assert good.status_code not in (401, 403) and good.status_code < 500, (method, path, good.text)
        checked += 1
    basic.close()
    assert checked == 19


@pytest.mark.integration
def test_writes_are_read_at_once(client: httpx.Client) -> None:
    """Each answer to a write comes once the API's own table shows it: the next GET,
    straight after, sees it."""
    created = create(client, BOT.upper(), "https://example.com/a", events=["ticket", "MESSAGE"], description="crm")
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and endpoint["secret"] != "whsec_********"
    assert endpoint["botId"] == BOT and endpoint["events"] == ["TICKET", "MESSAGE"] and endpoint["warning"] is None
    assert created.headers["etag"] == f'"{endpoint["version"]}"'
    assert created.headers["location"] == f"/v1/endpoints/{endpoint['id']}"
    path = f"/v1/endpoints/{endpoint['id']}"
    got = client.get(path)
    assert got.json() == {k: v for k, v in endpoint.items() if k != "warning"} | {"secret": "whsec_********"}
    assert got.headers["etag"] == created.headers["etag"]
    assert [e["id"] for e in client.get("/v1/endpoints", params={"botId": BOT}).json()["data"]] == [endpoint["id"]]

    patched = client.patch(path, json={"url": "https://example.com/b", "events": []}, headers=etag(got))
    assert patched.status_code == 200 and patched.json()["secret"] == "whsec_********"
    assert patched.headers["etag"] != got.headers["etag"]
    assert client.get(path).json()["url"] == "https://example.com/b"
    assert client.get(path).json()["events"] == [] and client.get(path).json()["description"] == "crm"

    disabled = client.post(f"{path}/disable", headers=etag(patched))
    assert disabled.json()["enabled"] is False and client.get(path).json()["enabled"] is False
    enabled = client.post(f"{path}/enable", headers=etag(disabled))
    assert enabled.json()["enabled"] is True and client.get(path).json()["enabled"] is True

    rotated = client.post(f"{path}/rotate-secret", json={"graceSeconds": 60}, headers=etag(enabled))
    assert rotated.status_code == 200 and rotated.json()["secret"] not in ("whsec_********", endpoint["secret"])
    assert client.get(path).json()["updatedAt"] == rotated.json()["updatedAt"]

    assert client.delete(path, headers=etag(rotated)).status_code == 204
    gone = is_problem(client.get(path), 404, "not_found")
    assert gone["errors"][0]["field"] == "id"
    is_problem(client.delete(path, headers=etag(rotated)), 404, "not_found")


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # the API's own checks: no broker behaviour in them
def test_pages_of_endpoints(client: httpx.Client) -> None:
    made = [create(client, url=f"https://example.com/{i}").json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        page = client.get("/v1/endpoints", params={"limit": 2} | ({"cursor": cursor} if cursor else {})).json()
        seen += [e["id"] for e in page["data"]]
        assert len(page["data"]) <= 2
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == made


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # the API's own checks: no broker behaviour in them
def test_bad_input_gets_422_naming_the_field(client: httpx.Client) -> None:
    made = create(client, url="https://example.com/a")
    path = f"/v1/endpoints/{made.json()['id']}"
    version = etag(made)
    cases: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None, str | None]] = [
        ("POST", "/v1/endpoints", {"botId": "bot-1", "url": "https://example.com"}, None, "botId"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "ftp://example.com"}, None, "url"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "https://u:p@example.com"}, None, "url"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "https://example.com", "events": ["NOPE"]}, None, "events"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "https://example.com", "secret": "abc"}, None, "secret"),
        ("POST", "/v1/endpoints", {"botID": BOT, "url": "https://example.com"}, None, "botId"),
        ("POST", "/v1/endpoints", {"botId": 7, "url": "https://example.com"}, None, "botId"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "https://example.com", "events": [1]}, None, "events[0]"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "https://example.com/" + "a" * 2100}, None, "url"),
        ("POST", "/v1/endpoints", {"botId": BOT, "url": "https://example.com", "description": "d" * 1001}, None,
         "description"),
        ("PATCH", path, {"url": "not a url"}, None, "url"),
        ("PATCH", path, {"url": None}, None, "url"),
        ("PATCH", path, {"events": ["TICKET", "X"]}, None, "events"),
        ("POST", f"{path}/rotate-secret", {"graceSeconds": -1}, None, "graceSeconds"),
        ("POST", f"{path}/rotate-secret", {"graceSeconds": 1e12}, None, "graceSeconds"),
        ("POST", f"{path}/rotate-secret", {"secret": "whsec_short"}, None, "secret"),
        ("POST", f"{path}/test", {"events": ["TICKETS"]}, None, "events"),
        ("GET", "/v1/endpoints", None, {"botId": "nope"}, "botId"),
        ("GET", "/v1/endpoints", None, {"limit": 0}, "limit"),
        ("GET", "/v1/endpoints", None, {"cursor": "???"}, "cursor"),
        ("GET", "/v1/deliveries", None, {"since": "yesterday"}, "since"),
        ("GET", "/v1/deliveries", None, {"until": "99999999999d ago"}, "until"),
        ("GET", "/v1/deliveries", None, {"status": "fine"}, "status"),
        ("GET", "/v1/deliveries", None, {"cursor": "bm9wZQ"}, "cursor"),
        ("GET", "/v1/dead-letters", None, {"status": "teapot"}, "status"),
        ("GET", "/v1/dead-letters", None, {"cursor": "bm9wZQ"}, "cursor"),
        ("GET", "/v1/dead-letters/stats", None, {"since": "soon"}, "since"),
        ("GET", "/v1/dead-letters/not-a-selector", None, None, "id"),
        ("POST", "/v1/dead-letters/replay", {"all": True, "rate": "fast"}, None, "rate"),
        ("POST", "/v1/dead-letters/replay", {"toEndpoint": str(uuid.uuid4()), "all": True}, None, "toEndpoint"),
        ("POST", "/v1/dead-letters/replay", {"dryRun": "maybe"}, None, "dryRun"),
        ("POST", "/v1/deliveries/nope/resend", {}, None, "id"),
        ("POST", "/v1/tokens", {"botId": BOT, "ttlSeconds": 0}, None, "ttlSeconds"),
    ]
    for method, url, body, params, field in cases:
        answer = client.request(method, url, json=body, params=params, headers=version)
        error = is_problem(answer, 422, "invalid")
        assert error["errors"] and error["errors"][0]["field"] == field, (method, url, body, params, error)
    not_json = is_problem(client.post("/v1/endpoints", content=b"{nope", headers={"content-type": "application/json"}),
                          400, "malformed")
    assert "not valid JSON" in not_json["detail"]
    form = is_problem(client.post("/v1/endpoints", content=b"botId=x", headers={"content-type": "text/plain"}),
                      415, "unsupported_media_type")
    assert "application/json" in form["detail"]
    # The secret given is never echoed in an error.
    secret_error = client.post("/v1/endpoints", json={"botId": BOT, "url": "https://x.example", "secret": "sekrit!"})
    assert "sekrit" not in secret_error.text
    for missing in (path + "x", f"{path}x/enable", "/v1/replays/nope", "/v1/deliveries/0:999999/resend"):
        answer = client.post(missing, headers=version) if missing.endswith(("enable", "resend")) \
            else client.get(missing)
        is_problem(answer, 404, "not_found")
    is_problem(client.get("/v1/nothing-here"), 404, "not_found")
    is_problem(client.put("/v1/endpoints"), 405, "method_not_allowed")


class ApiProcess:
    """A real `gateway api` subprocess."""

    def __init__(self, config: Config, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "api", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=gateway_env(config, GATEWAY_API_TOKENS=TOKEN))
        deadline = time.monotonic() + 30
        while not self.up():
            assert self.process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=AUTH, timeout=30)

    def up(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> int:
        self.http.close()
        self.process.terminate()
        return self.process.wait(30)


@pytest.fixture
def api(topics: Config, tmp_path: Path) -> Iterator[ApiProcess]:
    running = ApiProcess(topics, tmp_path / "api.log")
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.log.read_text()


def cli_rows(config: Config) -> dict[str, dict[str, Any]]:
    result = run_gateway(config, "endpoints", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {row["id"]: row for row in map(json.loads, result.stdout.splitlines())}


@pytest.mark.integration
def test_an_endpoint_made_by_one_face_is_seen_changed_and_removed_by_the_other(
    topics: Config, api: ApiProcess
) -> None:
    # Made by the API: the CLI sees it, changes it and removes it; the API follows.
    made = api.http.post("/v1/endpoints", json={"botId": BOT, "url": "https://example.com/api"})
    assert made.status_code == 201, made.text
    by_api = made.json()
    assert cli_rows(topics)[by_api["id"]]["url"] == "https://example.com/api"
    assert cli_rows(topics)[by_api["id"]]["createdAt"] == by_api["createdAt"]  # one JSON for both faces
    assert run_gateway(topics, "endpoints", "disable", by_api["id"]).returncode == 0
    eventually(lambda: api.http.get(f"/v1/endpoints/{by_api['id']}").json()["enabled"] is False,
               "the API sees the CLI's disable")
    # The CLI's change made a new version: the API's old ETag is stale.
    stale = api.http.post(f"/v1/endpoints/{by_api['id']}/enable", headers=etag(made))
    assert stale.status_code == 412, stale.text
    assert run_gateway(topics, "endpoints", "remove", by_api["id"]).returncode == 0
    eventually(lambda: api.http.get(f"/v1/endpoints/{by_api['id']}").status_code == 404,
               "the API sees the CLI's removal")

    # Made by the CLI: the API sees it, changes it and removes it; the CLI follows.
    added = run_gateway(topics, "endpoints", "add", "--bot-id", BOT, "--url", "https://example.com/cli", "--json")
    by_cli = json.loads(added.stdout)
    eventually(lambda: api.http.get(f"/v1/endpoints/{by_cli['id']}").status_code == 200, "the API sees the CLI's add")
    got = api.http.get(f"/v1/endpoints/{by_cli['id']}")
    assert got.json()["botId"] == BOT and got.json()["version"] == by_cli["version"]
    patched = api.http.patch(f"/v1/endpoints/{by_cli['id']}", json={"events": ["TICKET"]}, headers=etag(got))
    assert patched.status_code == 200
    assert cli_rows(topics)[by_cli["id"]]["events"] == ["TICKET"]
    rotated = api.http.post(f"/v1/endpoints/{by_cli['id']}/rotate-secret", headers=etag(patched))
    shown = run_gateway(topics, "endpoints", "list", "--json", "--show-secrets")
    assert json.loads(shown.stdout)["secret"] == rotated.json()["secret"]
    assert json.loads(shown.stdout)["previousSecretExpiresAt"] == rotated.json()["previousSecretExpiresAt"]
    assert api.http.delete(f"/v1/endpoints/{by_cli['id']}", headers=etag(rotated)).status_code == 204
    assert cli_rows(topics) == {}


@pytest.mark.integration
def test_test_sends_deliveries_and_replay_jobs_over_http(
    topics: Config, api: ApiProcess, receiver: Receiver, worker_factory: Any
) -> None:
    down = True
    receiver.respond("/hook", lambda request, seen: 503 if down else 200)
    endpoint = api.http.post("/v1/endpoints", json={"botId": BOT, "url": receiver.url("/hook")}).json()
    path = f"/v1/endpoints/{endpoint['id']}"

    # A test send: every example, through the real sender, answered 503: reported, not retried.
    tested = api.http.post(f"{path}/test", json={"malformed": True})
    assert tested.status_code == 200, tested.text
    report = tested.json()
    assert report["ok"] is False
    assert [(r["kind"], r["status"]) for r in report["results"]] == [
        ("example", 503)] * 4 + [("bad_signature", 503), ("stale_timestamp", 503)]
    for request in receiver.at("/hook")[:4]:
        verify(endpoint["secret"], request.headers, request.body)
    assert api.http.post(f"{path}/test", json={"events": ["CREATE_LEAD"]}).json()["results"][0]["eventType"] == \
        "CREATE_LEAD"

    # Real deliveries fail 4 times each (delays 1, 2, 3 s) and are dead-lettered.
    worker_factory(topics.replace(circuit_failures=1000, circuit_failure_rate=0.0))  # every attempt reaches the 503s
    published = run_gateway(topics, "publish", str(EXAMPLES))
    ids = published.stdout.split()
    eventually(lambda: len(api.http.get("/v1/dead-letters", params={"endpointId": endpoint["id"]}).json()["data"])
               == 4, "4 dead letters", timeout=40)
    history = api.http.get("/v1/deliveries", params={"eventId": ids[0]}).json()
    assert [(d["number"], d["status"], d["next"]) for d in history["data"]] == [
        (4, 503, "dead:retries_exhausted"), (3, 503, "retry:retry-3s"), (2, 503, "retry:retry-2s"),
        (1, 503, "retry:retry-1s")]
    assert history["completeSince"] is None and all(ISO.match(d["at"]) for d in history["data"])
    assert len(api.http.get("/v1/deliveries", params={"endpointId": endpoint["id"]}).json()["data"]) == 16
    assert api.http.get("/v1/deliveries", params={"botId": BOT, "status": "success"}).json()["data"] == []

    stats = api.http.get("/v1/dead-letters/stats").json()
    assert stats["total"] == 4 and stats["reason"] == {"retries_exhausted": 4}
    [shown] = api.http.get(f"/v1/dead-letters/{ids[1]}").json()
    assert shown["eventId"] == ids[1] and len(shown["attemptLog"]) == 4
    assert api.http.get(f"/v1/dead-letters/{shown['id']}").json()[0]["eventId"] == ids[1]

    # Replay: a dry run plans, a job sends, its progress is reported; a second replay skips them.
    dry = api.http.post("/v1/dead-letters/replay", json={"endpointId": endpoint["id"], "dryRun": True})
    assert dry.status_code == 200 and dry.json()["state"] == "dry_run" and dry.json()["planned"] == 4
    assert sorted(i["eventId"] for i in dry.json()["items"]) == sorted(ids)
    down = False
    started = api.http.post("/v1/dead-letters/replay", json={"endpointId": endpoint["id"], "rate": "20/s"})
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["state"] in ("running", "succeeded")
    eventually(lambda: api.http.get(f"/v1/replays/{job['id']}").json()["state"] == "succeeded", "the replay job")
    done = api.http.get(f"/v1/replays/{job['id']}").json()
    assert done["result"]["replayed"] == 4 and done["progress"]["acknowledged"] == 4
    # 16 failed attempts, then the 4 replays (test sends carry ids of their own).
    receiver.wait_for(lambda: sum(r.event_id in ids for r in receiver.at("/hook")) >= 20, 20, "the replays")
    eventually(lambda: len(api.http.get("/v1/deliveries", params={"endpointId": endpoint["id"],
                                                                   "status": "success"}).json()["data"]) == 4,
               "the replays' successes in the history")
    again = api.http.post("/v1/dead-letters/replay", json={"endpointId": endpoint["id"]}).json()
    assert again["planned"] == 0 and again["skippedAlreadyReplayed"] == 4
