"""Safe writes and what a request must be, over real HTTP on a real broker: versions
(ETag, If-Match: 428 without, 412 when stale), writes racing each other, idempotent
creates (a not-visible-yet answer included), the size limit before the token, 401 before
any look at the body, non-finite numbers, merge-patch semantics, replay's explicit
"all", and ISO times."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.api import ApiService
from gateway.config import Config
from gateway.store import EndpointTable

from .test_api import BOT, BOT_TOKEN, ISO, Served, create, etag, is_problem, served

pytestmark = pytest.mark.integration


@pytest.fixture
def api_http(topics: Config) -> Iterator[Served]:
    with served(topics) as api:
        yield api


@pytest.fixture
def client(api_http: Served) -> httpx.Client:
    return api_http.client()


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_writes_need_the_version_they_change(client: httpx.Client) -> None:
    made = create(client)
    path = f"/v1/endpoints/{made.json()['id']}"
    writes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("PATCH", path, {"description": "x"}), ("POST", f"{path}/disable", None), ("POST", f"{path}/enable", None),
        ("POST", f"{path}/rotate-secret", {}), ("DELETE", path, None)]
    for method, url, body in writes:
        missing = is_problem(client.request(method, url, json=body), 428, "precondition_required")
        assert missing["errors"][0]["field"] == "If-Match"
        is_problem(client.request(method, url, json=body, headers={"if-match": "*"}), 428, "precondition_required")
    changed = client.patch(path, json={"description": "y"}, headers=etag(made))
    assert changed.status_code == 200 and changed.headers["etag"] != made.headers["etag"]
    for method, url, body in writes:  # the version of before the change: every write refused
        stale = is_problem(client.request(method, url, json=body, headers=etag(made)), 412, "precondition_failed")
        assert made.json()["version"] in stale["detail"]
    assert client.get(path).json()["description"] == "y"
    # A list of versions matches any of them; a GET says 304 while the version holds.
    either = {"if-match": f'{made.headers["etag"]}, {changed.headers["etag"]}'}
    assert client.post(f"{path}/disable", headers=either).status_code == 200
    current = client.get(path)
    assert client.get(path, headers={"if-none-match": current.headers["etag"]}).status_code == 304
    assert client.get(path, headers={"if-none-match": made.headers["etag"]}).status_code == 200


def race(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Run ``calls`` at once (released together), each on its own thread."""
    start = threading.Barrier(len(calls))
    answers: list[httpx.Response | None] = [None] * len(calls)

    def run(index: int) -> None:
        start.wait()
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def test_a_patch_racing_a_rotation_or_a_removal_cannot_undo_it(api_http: Served) -> None:
    client, other = api_http.client(), api_http.client()
    table: EndpointTable = api_http.service.table

    def one_round(number: int) -> None:
        made = create(client, url=f"https://example.com/{number}")
        endpoint_id, path = made.json()["id"], f"/v1/endpoints/{made.json()['id']}"
        patch, rotate = race(lambda: client.patch(path, json={"description": "patched"}, headers=etag(made)),
                             lambda: other.post(f"{path}/rotate-secret", json={}, headers=etag(made)))
        assert sorted((patch.status_code, rotate.status_code)) == [200, 412], (patch.text, rotate.text)
        saved = table.get(endpoint_id)
        assert saved is not None
        if rotate.status_code == 200:  # the rotation won: its secret stays, the old one is only the previous
            assert saved.secret == rotate.json()["secret"] and saved.previous_secret == made.json()["secret"]
            assert saved.description is None
        else:
            assert saved.secret == made.json()["secret"] and saved.description == "patched"
        # A change and a removal with one version: at most one happens; a removed endpoint stays removed.
        current = client.get(path)
        patch, delete = race(lambda: client.patch(path, json={"description": "again"}, headers=etag(current)),
                             lambda: other.delete(path, headers=etag(current)))
        assert sorted((patch.status_code, delete.status_code)) in ([200, 412], [204, 412], [204, 404]), (
            patch.text, delete.text)
        if delete.status_code == 204:
            time.sleep(0.5)  # long enough for a write that would bring it back to show
            assert client.get(path).status_code == 404 and table.get(endpoint_id) is None

    for number in range(5):
        one_round(number)


class HiddenWrites(ApiService):
    """An API whose table does not show its writes in time while ``hide`` is set: the
    answer a create gets when the broker acknowledged it but this process's table lags."""

    hide = False

    def wait_until(self, visible: Callable[[EndpointTable], bool], timeout: float | None = None) -> bool:
        if self.hide:
            return False
        return super().wait_until(visible, timeout)


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_a_create_retried_with_its_key_gets_the_first_answer(topics: Config) -> None:
    with served(topics, service=HiddenWrites) as api:
        client = api.client()
        body = {"botId": BOT, "url": "https://example.com/once"}
        first = client.post("/v1/endpoints", json=body, headers={"idempotency-key": "k-1"})
        again = client.post("/v1/endpoints", json=body, headers={"idempotency-key": "k-1"})
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert again.headers["etag"] == first.headers["etag"]
        other_body = client.post("/v1/endpoints", json=body | {"url": "https://example.com/twice"},
                                 headers={"idempotency-key": "k-1"})
        assert is_problem(other_body, 422, "invalid")["errors"][0]["field"] == "Idempotency-Key"
        fresh = client.post("/v1/endpoints", json=body, headers={"idempotency-key": "k-2"})
        assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]
        # Keys are the caller's own: another token's same key is another request.
        someone = api.client(BOT_TOKEN).post("/v1/endpoints", json=body, headers={"idempotency-key": "k-1"})
        assert someone.status_code == 201 and someone.json()["id"] != first.json()["id"]

        # Saved, but not visible in time: 504 with the id; the retry gets the endpoint and its secret.
        assert isinstance(api.service, HiddenWrites)
        api.service.hide = True
        late = client.post("/v1/endpoints", json=body | {"url": "https://example.com/late"},
                           headers={"idempotency-key": "k-3"})
        problem = is_problem(late, 504, "not_visible_yet")
        endpoint_id = problem["endpointId"]
        assert late.headers["location"] == f"/v1/endpoints/{endpoint_id}"
        still = client.post("/v1/endpoints", json=body | {"url": "https://example.com/late"},
                            headers={"idempotency-key": "k-3"})
        api.service.hide = False
        deadline = time.monotonic() + 10
        while still.status_code == 504 and time.monotonic() < deadline:
            assert still.json()["endpointId"] == endpoint_id
            time.sleep(0.2)
            still = client.post("/v1/endpoints", json=body | {"url": "https://example.com/late"},
                                headers={"idempotency-key": "k-3"})
        assert still.status_code == 201 and still.json()["id"] == endpoint_id
        assert still.json()["secret"].startswith("whsec_") and still.json()["secret"] != "whsec_********"
        listed = [e["id"] for e in client.get("/v1/endpoints").json()["data"]]
        assert sorted(listed) == sorted([first.json()["id"], fresh.json()["id"], someone.json()["id"], endpoint_id])
        # Without a key, the not-visible answer names the id too.
        api.service.hide = True
        unkeyed = is_problem(client.post("/v1/endpoints", json=body), 504, "not_visible_yet")
        api.service.hide = False
        assert client.get(f"/v1/endpoints/{unkeyed['endpointId']}").status_code == 200


def raw_request(url: str, sent: bytes) -> tuple[int, dict[str, str], bytes]:
    """``sent`` as it is on a fresh connection (a head, maybe a part of a body): the
    status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(sent)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_the_size_limit_and_the_token_come_before_the_body(api_http: Served) -> None:
    anonymous, client = api_http.client(None), api_http.client()
    # 5 MB announced, with no token and with one: answered before a byte of the body is sent.
    for auth in (b"", f"authorization: Bearer {BOT_TOKEN}\r\n".encode()):
        status, headers, body = raw_request(api_http.url, b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\n" + auth +
                                            b"content-type: application/json\r\ncontent-length: 5000000\r\n\r\n")
        assert status == 413 and headers["content-type"] == "application/problem+json", body
        assert b"GATEWAY_API_MAX_BODY_BYTES" in body

    def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 65536

    # A body without a length is counted as it comes: refused once past the limit.
    is_problem(client.post("/v1/endpoints", content=chunks(), headers={"content-type": "application/json"}),
               413, "too_large")
    # Without a token the body is never read, whatever it is (here: unfinished).
    status, headers, _ = raw_request(api_http.url, b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\n"
                                     b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                                     b"10\r\n{{{{{{{{{{{{{{{{\r\n")
    assert status == 401 and headers["content-type"] == "application/problem+json"
    # Malformed JSON: 401 without a token, 400 with one; never 422.
    for body in (b"{nope", b"[1,", b"\xff\xfe"):
        is_problem(anonymous.post("/v1/endpoints", content=body, headers={"content-type": "application/json"}),
                   401, "unauthorized")
        is_problem(client.post("/v1/endpoints", content=body, headers={"content-type": "application/json"}),
                   400, "malformed")
    is_problem(anonymous.post("/v1/endpoints", content=b"x=1", headers={"content-type": "text/plain"}),
               401, "unauthorized")
    is_problem(client.post("/v1/endpoints", content=b"x=1", headers={"content-type": "text/plain"}),
               415, "unsupported_media_type")
    is_problem(client.post("/v1/endpoints", content=b'{"botId": "x"}', headers={}), 415, "unsupported_media_type")
    status, _, _ = raw_request(api_http.url, b"POST /v1/endpoints HTTP/1.1\r\nhost: x\r\ncontent-length: 1e3\r\n\r\n")
    assert status == 400


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_numbers_must_be_finite(client: httpx.Client) -> None:
    made = create(client)
    path = f"/v1/endpoints/{made.json()['id']}"
    cases = [("POST", f"{path}/rotate-secret", b'{"graceSeconds": Infinity}', "graceSeconds"),
             ("POST", f"{path}/rotate-secret", b'{"graceSeconds": NaN}', "graceSeconds"),
             ("POST", f"{path}/rotate-secret", b'{"graceSeconds": -Infinity}', "graceSeconds"),
             ("PATCH", path, b'{"rateLimit": Infinity}', "rateLimit"),
             ("POST", "/v1/endpoints", b'{"botId": "' + BOT.encode() + b'", "url": "https://a.example", '
                                       b'"rateLimit": NaN}', "rateLimit"),
             ("POST", "/v1/dead-letters/replay", b'{"partition": Infinity}', "partition"),
             ("POST", f"{path}/rotate-secret", b'{"graceSeconds": 1e400}', "graceSeconds")]
    for method, url, body, field in cases:
        answer = client.request(method, url, content=body,
                                headers={"content-type": "application/json"} | etag(made))
        assert is_problem(answer, 422, "invalid")["errors"][0]["field"] == field, (url, body)
    assert client.get(path).json()["version"] == made.json()["version"]  # nothing was changed


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_a_replay_needs_a_filter_or_all(client: httpx.Client) -> None:
    for body in ({}, {"dryRun": True}, {"again": True, "rate": "5/s"}, {"limit": 10}):
        refused = is_problem(client.post("/v1/dead-letters/replay", json=body), 422, "invalid")
        assert refused["errors"][0]["field"] == "all" and '"all": true' in refused["detail"]
    everything = client.post("/v1/dead-letters/replay", json={"all": True, "dryRun": True})
    assert everything.status_code == 200 and everything.json()["state"] == "dry_run"
    filtered = client.post("/v1/dead-letters/replay", json={"reason": "gone", "dryRun": True})
    assert filtered.status_code == 200


@pytest.mark.brokers("tansu")  # the API's own rules: no broker behaviour in them
def test_patch_is_a_json_merge_patch(client: httpx.Client) -> None:
    made = create(client, events=["TICKET"], description="crm", rateLimit=5, maxInFlight=3)
    path = f"/v1/endpoints/{made.json()['id']}"
    merge = {"content-type": "application/merge-patch+json"}
    # Absent members keep their values.
    kept = client.patch(path, content=b'{"url": "https://example.com/moved"}', headers=merge | etag(made))
    assert kept.status_code == 200, kept.text
    assert {k: kept.json()[k] for k in ("url", "events", "description", "rateLimit", "maxInFlight")} == {
        "url": "https://example.com/moved", "events": ["TICKET"], "description": "crm", "rateLimit": 5.0,
        "maxInFlight": 3}
    # null clears each one to its default.
    cleared = client.patch(path, content=b'{"events": null, "description": null, "rateLimit": null, '
                           b'"maxInFlight": null}', headers=merge | etag(kept))
    assert cleared.status_code == 200, cleared.text
    assert {k: cleared.json()[k] for k in ("url", "events", "description", "rateLimit", "maxInFlight")} == {
        "url": "https://example.com/moved", "events": [], "description": None, "rateLimit": None,
        "maxInFlight": None}
    # application/json is read the same way; an empty patch changes nothing but the version.
    same = client.patch(path, json={}, headers=etag(cleared))
    assert same.status_code == 200 and same.json()["description"] is None and same.json()["events"] == []
    # What cannot be cleared or changed here is refused, naming it.
    for body, field in ((b'{"url": null}', "url"), (b'{"secret": "whsec_x"}', "secret"),
                        (b'{"enabled": false}', "enabled"), (b'{"botId": null}', "botId"), (b"[]", None)):
        refused = is_problem(client.patch(path, content=body, headers=merge | etag(same)), 422, "invalid")
        assert refused["errors"][0]["field"] == field, body
    is_problem(client.patch(path, content=b"{}", headers={"content-type": "application/xml"} | etag(same)),
               415, "unsupported_media_type")


def test_times_are_iso_8601_utc_everywhere(api_http: Served) -> None:
    client = api_http.client()
    made = create(client)
    endpoint = made.json()
    assert ISO.match(endpoint["createdAt"]) and ISO.match(endpoint["updatedAt"])
    assert endpoint["previousSecretExpiresAt"] is None
    rotated = client.post(f"/v1/endpoints/{endpoint['id']}/rotate-secret", json={"graceSeconds": 3600},
                          headers=etag(made)).json()
    assert ISO.match(rotated["previousSecretExpiresAt"]) and ISO.match(rotated["updatedAt"])
    expires = time.strptime(rotated["previousSecretExpiresAt"][:19], "%Y-%m-%dT%H:%M:%S")
    updated = time.strptime(rotated["updatedAt"][:19], "%Y-%m-%dT%H:%M:%S")
    assert 3590 <= time.mktime(expires) - time.mktime(updated) <= 3610
    assert client.get(f"/v1/endpoints/{endpoint['id']}").json()["previousSecretExpiresAt"] == \
        rotated["previousSecretExpiresAt"]
    assert ISO.match(client.post("/v1/tokens", json={"botId": BOT}).json()["expiresAt"])
    job = client.post("/v1/dead-letters/replay", json={"all": True, "dryRun": True}).json()
    assert ISO.match(job["createdAt"]) and ISO.match(job["finishedAt"])
    ready = client.get("/readyz").json()
    assert all(ISO.match(check["checkedAt"]) for check in ready["checks"].values())
