"""The Settings > Webhooks page in a real browser: headless Chromium (Debian's package),
driven by Playwright, against the real API on a real broker, with `gateway listen` as the
receiver and a real worker where deliveries must flow.

Each flow a bot owner has is run end to end, as a person would, by the labels and names
they see: an endpoint made for a running listener, and test events it verifies; edits
racing another writer (412); rotate, disable and replay; a bot token that cannot see
another bot; hostile text shown inert; the keyboard alone, labels, and a phone-width
screen. The tests take the README's screenshots (``docs/screenshots/`` when
GATEWAY_TEST_SCREENSHOTS says so; a temporary directory otherwise, so a run leaves the
tree as it was).

One browser for the module, a fresh context (cookies, storage) per test. Without
Chromium the tests skip, saying so; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Locator, Page, ViewportSize, expect, sync_playwright

from gateway.api import ApiService, Tokens, create_app, openapi_document
from gateway.codec import Codec
from gateway.config import Config
from gateway.ops import Behaviour, Listener
from gateway.records import (
    DEAD_LETTER_SCHEMA,
    Attempt,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    DeliveryAttempt,
    Endpoint,
    Next,
    Outcome,
)
from gateway.signing import new_secret
from gateway.store import Topics, dead_letter_headers, save_endpoint

from .conftest import run_gateway
from .test_api import BOT, EXAMPLES, OTHER_BOT, TOKEN, Served, create, etag, eventually, served
from .test_api_access import write_attempts, write_dead_letters
from .test_listen import ListenProcess

SHOTS = Path(os.environ.get("GATEWAY_TEST_SCREENSHOTS") or tempfile.mkdtemp(prefix="settings-page-shots-"))
"""Where the screenshots go: a temporary directory, unless GATEWAY_TEST_SCREENSHOTS names
one (``GATEWAY_TEST_SCREENSHOTS=docs/screenshots`` renews the README's)."""
PAGE = "/settings/webhooks"
CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TYPES = {"MESSAGE", "RATE_MESSAGE", "TICKET", "CREATE_LEAD"}
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 375, "height": 812}

expect.set_options(timeout=20_000)


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (CI installs it in .ci/run), or set "
                    "GATEWAY_TEST_CHROMIUM")
    with sync_playwright() as playwright:
        # Debian's Chromium, never a browser Playwright downloads; no sandbox as root (CI).
        args = ["--disable-dev-shm-usage", *(["--no-sandbox"] if os.geteuid() == 0 else [])]
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield launched
        finally:
            launched.close()


class Tab:
    """A page in a fresh browser context, collecting what went wrong in it: script
    errors, console errors (but the browser's line for each 4xx the page expects and
    handles), and Content-Security-Policy violations."""

    def __init__(self, browser: Browser, viewport: ViewportSize) -> None:
        self.context = browser.new_context(viewport=viewport, locale="en-US", timezone_id="UTC", device_scale_factor=1)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"])
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", lambda message: self.errors.append(f"console: {message.text}")
                     if message.type == "error" and "Failed to load resource" not in message.text else None)
        self.page.add_init_script("window.__violations = []; document.addEventListener('securitypolicyviolation', "
                                  "(e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));")

    def open(self, api: Served, token: str | None, *, endpoint: str | None = None, ready: bool = True) -> Page:
        fragment = "&".join(f"{k}={v}" for k, v in (("token", token), ("endpoint", endpoint)) if v)
        self.page.goto(f"{api.url}{PAGE}" + (f"#{fragment}" if fragment else ""))
        if ready:
            expect(self.page.locator("body")).to_have_attribute("data-state", "ready")
        return self.page

    def check(self) -> None:
        """Nothing went wrong in the page."""
        violations = self.page.evaluate("window.__violations")
        assert violations == [], violations
        assert self.errors == [], self.errors

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser: Browser) -> Iterator[Any]:
    opened: list[Tab] = []

    def make(viewport: ViewportSize = DESKTOP) -> Tab:
        tab = Tab(browser, viewport)
        opened.append(tab)
        return tab

    yield make
    for tab in opened:
        tab.close()


def mint(api: Served, bot: str = BOT, ttl: int = 900) -> str:
    """A bot token, as the platform's backend gets one for an owner's session."""
    answer = api.client().post("/v1/tokens", json={"botId": bot, "ttlSeconds": ttl})
    assert answer.status_code == 201, answer.text
    token: str = answer.json()["token"]
    return token


def event_box(form: Any, kind: str) -> Any:
    """The checkbox of event type ``kind`` in ``form``, by its label."""
    return form.get_by_role("checkbox", name=re.compile(rf"^{kind}\b"))


def shoot(what: Page | Locator, name: str, *, down_to: Locator | None = None) -> None:
    """A screenshot for the README: of the window (a page), of an element, or from an
    element's top down to another's bottom."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = str(SHOTS / name)
    if isinstance(what, Page) or down_to is None:
        what.screenshot(path=path)
    else:
        top, bottom = what.bounding_box(), down_to.bounding_box()
        assert top is not None and bottom is not None
        scroll = what.page.evaluate("window.scrollY")
        y = top["y"] + scroll - 8
        what.page.screenshot(path=path, full_page=True, clip={
            "x": 0, "y": y, "width": what.page.viewport_size["width"] if what.page.viewport_size else 1280,
            "height": bottom["y"] + scroll + bottom["height"] + 8 - y})


def fits_the_screen(page: Page) -> None:
    """No horizontal scrolling: the page is no wider than the window."""
    width, inner = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"the page is {width}px wide in a {inner}px window"


def api_endpoints(api: Served, bot: str = BOT) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api.client().get("/v1/endpoints", params={"botId": bot}).json()["data"]
    return found


# --- without a broker -------------------------------------------------------------------------


def test_the_page_is_served_without_a_token_under_a_strict_policy() -> None:
    """The page and its files are public (they hold nothing of any bot's) and are served
    by the app both `gateway api` and `gateway up` run, outside the OpenAPI document;
    every other path still needs a token."""
    app = create_app(ApiService(Config(), Tokens([TOKEN])))
    with TestClient(app) as client:
        page = client.get(PAGE)
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "form-action 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert page.headers["referrer-policy"] == "no-referrer" and page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text  # only <script type="module" src=…> of its own
        assert all(f'<option value="{t}">' in page.text for t in TYPES)  # rendered from the catalog
        assert "&quot;event&quot;: &quot;MESSAGE&quot;" in page.text  # the examples, escaped
        scripts = re.findall(r'src="([^"]+)"', page.text)
        assert scripts == [f"{PAGE}/static/page.js"]
        for name, kind in (("page.js", "text/javascript"), ("api.js", "text/javascript"),
                           ("page.css", "text/css")):
            served_file = client.get(f"{PAGE}/static/{name}")
            assert served_file.status_code == 200 and served_file.headers["content-type"].startswith(kind)
        assert "innerHTML" not in "".join(client.get(f"{PAGE}/static/{n}").text for n in (
            "page.js", "api.js", "dom.js", "ui.js", "endpoints.js", "history.js", "deadletters.js"))
        assert client.get(PAGE, headers={"if-none-match": page.headers["etag"]}).status_code == 304
        assert client.head(PAGE).status_code == 200
        assert client.get(f"{PAGE}/static/../../v1/endpoints").status_code in (401, 404)
        assert client.get(f"{PAGE}/static/secrets.txt").status_code == 404
        assert client.post(PAGE, json={}).status_code == 405
        assert client.get(f"{PAGE}/", follow_redirects=False).headers["location"] == PAGE
        assert client.get("/v1/endpoints").status_code == 401
    assert not any(path.startswith("/settings") for path in openapi_document(app)["paths"])


# --- the flows, end to end --------------------------------------------------------------------


@pytest.mark.integration
def test_an_endpoint_made_on_the_page_for_a_running_listener_verifies_test_events(
    topics: Config, tabs: Any, tmp_path: Path
) -> None:
    """A bot owner starts `gateway listen`, pastes its secret into the page's form, and
    the endpoint is made (its secret shown once, copied); the test sends of the four
    documented types are verified by the listener and the malformed ones refused, each
    result shown. Then edits: one racing another writer (412: the page reloads it), one
    refused (422 naming the field), one saved; and the endpoint deleted."""
    listener = ListenProcess(tmp_path, None)
    try:
        printed = re.search(r"signing secret \(generated\): (whsec_\S+)", listener.err.read_text())
        assert printed is not None, listener.err.read_text()
        secret = printed.group(1)
        with served(topics) as api:
            tab = tabs()
            page = tab.open(api, mint(api))
            assert "token" not in page.url  # taken out of the address bar (and the history)
            expect(page.locator("#bot-id")).to_have_text(BOT)
            expect(page.locator("#endpoints-empty")).to_be_visible()

            form = page.locator("#create-form")
            form.get_by_label("URL").fill(listener.url)
            form.get_by_label("Description").fill("My laptop's listener")
            form.get_by_label("Signing secret").fill(secret)
            form.get_by_role("button", name="Create endpoint").click()
            created = page.locator("#create-result")
            expect(created.get_by_label("Signing secret, shown this once: copy it now")).to_have_value(secret)
            expect(page.locator("#status")).to_contain_text("Endpoint created")
            created.get_by_role("button", name="Copy secret").click()
            expect(created).to_contain_text("Copied to the clipboard.")
            assert page.evaluate("navigator.clipboard.readText()") == secret
            card = page.locator("#endpoint-list > li")
            expect(card).to_have_count(1)
            expect(card).to_contain_text(listener.url)
            expect(card).to_contain_text("My laptop's listener")
            [endpoint] = api_endpoints(api)
            assert endpoint["url"] == listener.url and endpoint["description"] == "My laptop's listener"
            assert endpoint["events"] == [] and endpoint["enabled"] is True
            shoot(page.locator("#endpoints"), "settings-webhooks-created.png")

            # Shown once: after a reload, the page (which kept its token in the tab) has it masked only.
            page.reload()
            expect(page.locator("body")).to_have_attribute("data-state", "ready")
            expect(page.locator("#create-result")).to_be_empty()
            assert secret not in page.content()

            card.get_by_role("button", name="Manage").click()
            expect(page.locator("#endpoint-h")).to_be_focused()
            expect(page.locator("#ep-url")).to_have_text(listener.url)
            test = page.locator("#test-form")
            for kind in TYPES:
                expect(event_box(test, kind)).to_be_checked()
            test.get_by_role("button", name="Send test events").click()
            rows = page.locator("#test-table tbody tr")
            expect(rows).to_have_count(6)
            expect(page.locator("#test-result")).to_contain_text(
                "Every example was accepted and every malformed request refused.")
            texts = rows.all_inner_texts()
            examples = [t for t in texts if t.startswith("Example")]
            assert len(examples) == 4 and all("delivered" in t and "200" in t for t in examples), texts
            malformed = [t for t in texts if not t.startswith("Example")]
            assert len(malformed) == 2 and all("refused, as it should be" in t and "401" in t for t in malformed)
            assert any("no matching signature" in t for t in malformed)
            assert any("message timestamp too old" in t for t in malformed)
            got = listener.wait_for(6, 15)
            assert {r["event"] for r in got if r["verified"]} == TYPES
            assert sorted(r["reason"] for r in got if not r["verified"]) == [
                "message timestamp too old", "no matching signature"]
            assert all(r["body"]["botId"] == BOT for r in got)
            shoot(page.locator("#endpoint-h"), "settings-webhooks-test-send.png", down_to=page.locator("#test"))

            # Someone else changes the endpoint meanwhile: the page's write is refused (412),
            # and the page shows their change.
            admin = api.client()
            theirs = admin.patch(f"/v1/endpoints/{endpoint['id']}", json={"description": "changed elsewhere"},
                                 headers=etag(admin.get(f"/v1/endpoints/{endpoint['id']}")))
            assert theirs.status_code == 200, theirs.text
            edit = page.locator("#edit-form")
            edit.get_by_label("Description").fill("mine")
            edit.get_by_role("button", name="Save changes").click()
            expect(page.locator("#problem")).to_contain_text("Someone changed this endpoint since you loaded it")
            expect(edit.get_by_label("Description")).to_have_value("changed elsewhere")

            # A URL the API refuses: the field is marked, with the API's words.
            edit.get_by_label("URL").fill("ftp://example.com/hook")
            edit.get_by_role("button", name="Save changes").click()
            expect(page.locator("#edit-url-error")).to_be_visible()
            expect(edit.get_by_label("URL")).to_have_attribute("aria-invalid", "true")
            expect(edit.get_by_label("URL")).to_be_focused()

            edit.get_by_label("URL").fill(listener.url)
            edit.get_by_label("Description").fill("mine, again")
            event_box(edit, "TICKET").check()
            event_box(edit, "MESSAGE").check()
            edit.get_by_label("Rate limit").fill("20")
            edit.get_by_role("button", name="Save changes").click()
            expect(page.locator("#status")).to_contain_text("Saved")
            expect(page.locator("#ep-facts")).to_contain_text("TICKET")
            saved = admin.get(f"/v1/endpoints/{endpoint['id']}").json()
            assert saved["description"] == "mine, again" and sorted(saved["events"]) == ["MESSAGE", "TICKET"]
            assert saved["rateLimit"] == 20 and saved["url"] == listener.url

            page.get_by_role("button", name="Delete…").click()
            expect(page.get_by_role("button", name="Cancel")).to_be_focused()
            page.get_by_role("button", name="Delete endpoint").click()
            expect(page.locator("#status")).to_contain_text("Endpoint deleted")
            expect(page.locator("#endpoints-empty")).to_be_visible()
            assert admin.get(f"/v1/endpoints/{endpoint['id']}").status_code == 404
            tab.check()
    finally:
        listener.stop()


@pytest.mark.integration
def test_rotate_disable_and_replay_on_the_page(topics: Config, tabs: Any, worker_factory: Any,
                                               tmp_path: Path) -> None:
    """Events to a failing receiver: the page shows each attempt (503, its duration and
    answer) and the endpoint's stats; the owner disables it (its waiting retries become
    dead letters), rotates the secret with an hour's grace, fixes the receiver (which
    still has the old secret) and enables it; the dead letters are previewed (a dry run
    sends nothing), then replayed with the job's progress shown, and every one arrives,
    verified with the old secret during its grace."""
    secret = new_secret()
    failing = ListenProcess(tmp_path, topics, "--secret", secret, "--status", "503")
    port = failing.port
    fixed = None
    try:
        with served(topics) as api:
            tab = tabs()
            page = tab.open(api, mint(api))
            form = page.locator("#create-form")
            form.get_by_label("URL").fill(failing.url)
            form.get_by_label("Signing secret").fill(secret)
            form.get_by_role("button", name="Create endpoint").click()
            expect(page.locator("#create-result .secret-value")).to_have_value(secret)
            [endpoint] = api_endpoints(api)

            # Every attempt reaches the receiver: its circuit does not open.
            worker_factory(topics.replace(circuit_failures=1000, circuit_failure_rate=0.0))
            published = run_gateway(topics, "publish", str(EXAMPLES))
            assert published.returncode == 0, published.stderr
            failing.wait_for(4, 30)

            page.locator("#endpoint-list > li").get_by_role("button", name="Manage").click()
            history = page.locator("#history-form")
            history.get_by_label("Status").select_option("failed")
            eventually(lambda: len(api.client().get("/v1/deliveries", params={
                "endpointId": endpoint["id"], "status": "failed"}).json()["data"]) >= 4, "four failed attempts")
            history.get_by_role("button", name="Show").click()
            attempts = page.locator("#history-table tr[data-attempt]")
            expect(attempts.first).to_be_visible()
            assert attempts.count() >= 4
            first = attempts.first
            expect(first).to_contain_text("503")
            first.get_by_role("button", name="Detail").click()
            detail = page.locator("#history-table tr.detail-row")
            expect(detail).to_contain_text("Duration")
            expect(detail).to_contain_text("503")
            expect(detail.get_by_role("button", name="Resend this event")).to_be_visible()
            page.locator("#health-refresh").click()
            expect(page.locator("#circuit")).to_contain_text("Circuit closed")
            expect(page.locator("#stats-table tbody tr").first).to_contain_text("last 1h")
            shoot(page.locator("#health"), "settings-webhooks-history.png", down_to=page.locator("#history"))

            # Disable: deliveries waiting for a retry become dead letters.
            page.get_by_role("button", name="Disable").click()
            expect(page.locator("#ep-facts")).to_contain_text("Disabled")
            expect(page.get_by_role("button", name="Enable")).to_be_visible()
            assert api.client().get(f"/v1/endpoints/{endpoint['id']}").json()["enabled"] is False

            # Rotate, keeping the old secret signing for an hour.
            rotate = page.locator("#rotate-form")
            rotate.get_by_label("Keep the old secret signing too for").select_option(label="1 hour")
            rotate.get_by_role("button", name="Rotate secret").click()
            fresh = page.locator("#rotate-result .secret-value")
            expect(fresh).to_have_value(re.compile(r"^whsec_"))
            new = fresh.input_value()
            assert new != secret
            expect(page.locator("#rotate-result .grace")).to_contain_text("The old secret keeps signing too until")
            rotated = api.client().get(f"/v1/endpoints/{endpoint['id']}").json()
            expires = rotated["previousSecretExpiresAt"]
            assert expires is not None
            expect(page.locator("#rotate-result .grace time")).to_have_attribute("datetime", expires)
            expect(page.locator("#secret-state")).to_contain_text("the previous one until")

            # Every event is now a dead letter (retries exhausted, or the endpoint disabled).
            def dead_letters() -> list[dict[str, Any]]:
                found: list[dict[str, Any]] = api.client().get("/v1/dead-letters", params={
                    "endpointId": endpoint["id"]}).json()["data"]
                return found

            eventually(lambda: len(dead_letters()) == 4, "four dead letters", timeout=40)
            assert {d["reason"] for d in dead_letters()} <= {"retries_exhausted", "endpoint_disabled"}

            # The receiver is fixed, still with the old secret only; the endpoint enabled again.
            failing.stop()
            fixed = ListenProcess(tmp_path, topics, "--secret", secret, port=port)
            page.get_by_role("button", name="Enable").click()
            expect(page.locator("#ep-facts")).to_contain_text("Enabled")

            dlq = page.locator("#dlq-form")
            dlq.get_by_label("Endpoint").select_option(endpoint["id"])
            dlq.get_by_role("button", name="Show").click()
            letters = page.locator("#dlq-table tr[data-dead-letter]")
            expect(letters).to_have_count(4)
            expect(page.locator("#dlq-summary")).to_have_text("4 dead letters.")
            letters.first.get_by_role("button", name="Detail").click()
            expect(page.locator("#dlq-table tr.detail-row .record")).to_contain_text("503")

            replay = page.locator("#replay-form")
            replay.get_by_role("button", name="Preview replay").click()
            expect(page.locator("#replay-plan")).to_contain_text("4 dead letters would be replayed")
            assert fixed.requests() == []  # a dry run sends nothing
            page.get_by_role("button", name="Replay 4 dead letters").click()
            expect(page.locator("#replay-done")).to_contain_text("Replayed 4 dead letters")
            expect(page.locator("#replay-progress")).to_have_attribute("value", "4")
            shoot(page.locator("#dead-letters"), "settings-webhooks-replay.png")

            got = fixed.wait_for(4, 30)
            assert all(r["verified"] and r["status"] == 200 for r in got), got
            assert {r["event"] for r in got} == TYPES
            assert sorted(r["webhookId"] for r in got) == sorted(published.stdout.split())

            # A second preview skips them: they were replayed.
            replay.get_by_role("button", name="Preview replay").click()
            expect(page.locator("#replay-plan")).to_contain_text("0 dead letters would be replayed")
            expect(page.locator("#replay-plan")).to_contain_text("4 replayed before are skipped")
            tab.check()
    finally:
        for listener in (failing, fixed):
            if listener is not None and listener.process.poll() is None:
                listener.stop()


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # the API's scopes and the page's handling of them: no broker behaviour
def test_a_bot_token_shows_its_own_bot_only(topics: Config, tabs: Any) -> None:
    """With bot A's token the page lists A's endpoints and dead letters, never B's (a
    link to B's endpoint is a 403, said as such); a token that is not a bot's, an expired
    one and a forged one each end at the sign-in form with the reason."""
    with served(topics) as api:
        admin = api.client()
        mine = create(admin, BOT, "https://example.com/mine", description="mine").json()
        theirs = create(admin, OTHER_BOT, "https://example.com/theirs", description="theirs").json()
        write_dead_letters(topics, (BOT, mine["id"]), (OTHER_BOT, theirs["id"]))
        eventually(lambda: len(admin.get("/v1/dead-letters").json()["data"]) == 2, "the dead letters indexed")

        tab = tabs()
        page = tab.open(api, mint(api, BOT), endpoint=theirs["id"])
        expect(page.locator("#problem")).to_contain_text("That endpoint is not one of this bot's")
        expect(page.locator("#endpoint-view")).to_be_hidden()
        expect(page.locator("#endpoint-list > li")).to_have_count(1)
        expect(page.locator("#endpoint-list")).to_contain_text("https://example.com/mine")
        expect(page.locator("#dlq-table tr[data-dead-letter]")).to_have_count(1)
        options = page.locator("#dlq-endpoint option").all_inner_texts()
        assert options == ["every endpoint", "https://example.com/mine"]
        text = page.locator("main").inner_text()
        assert "theirs" not in text and OTHER_BOT not in text

        # The page reads the bot from the token only to show it: the API decides. A token whose
        # payload names B but whose signature is A's is refused, and the page says the session ended.
        token = mint(api, BOT)
        head, _, signature = token.split(".")
        forged_payload = mint(api, OTHER_BOT).split(".")[1]
        forged = tab.open(api, f"{head}.{forged_payload}.{signature}", ready=False)
        expect(forged.locator("#signin-why")).to_contain_text("Your session has ended")
        assert forged.evaluate("sessionStorage.length") == 0

        signed_out = tabs().open(api, None, ready=False)
        expect(signed_out.locator("#signin-why")).to_contain_text("This page needs your bot's token")
        signed_out.get_by_label("Bot token").fill(TOKEN)  # an admin token: not for this page
        signed_out.get_by_role("button", name="Open").click()
        expect(signed_out.locator("#signin-why")).to_contain_text("not a token minted for one bot")
        signed_out.get_by_label("Bot token").fill(mint(api, BOT, ttl=4))
        signed_out.get_by_role("button", name="Open").click()
        expect(signed_out.locator("#endpoint-list > li")).to_have_count(1)
        expect(signed_out.locator("#signin-why")).to_contain_text("Your session has ended", timeout=10_000)
        expect(signed_out.locator("#app")).to_be_hidden()
        tab.check()


HOSTILE = ('<script>window.__pwned = "script"</script><img src=x onerror="window.__pwned = \'img\'">'
           '<a href="javascript:window.__pwned=1">click</a>')


class HostileReceiver:
    """A receiver whose every answer is a 500 with hostile HTML in its body."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = HOSTILE.encode()
                self.send_response(500)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # kept-alive connections do not hold up the end of the test
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostileReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def hostile_dead_letter(config: Config, endpoint_id: str) -> None:
    topic = Topics.from_config(config).dlq
    at = time.time_ns() // 1_000_000
    delivery = Delivery(
        event_id=str(uuid.uuid4()), event_type="MESSAGE", bot_id=BOT, session_id=str(uuid.uuid4()),
        occurred_at=at - 1000, payload='{"event":"MESSAGE","message":"' + HOSTILE.replace('"', '\\"') + '"}',
        endpoint_id=endpoint_id, attempt=4, due_at=at,
        attempts=(Attempt(at=at, tier="retry-3s", duration_ms=1.0, outcome=Outcome.HTTP_ERROR, status=500,
                          error=HOSTILE, response_snippet=HOSTILE),))
    dead = DeadLetter(reason=DeadLetterReason.RETRIES_EXHAUSTED, detail=HOSTILE, dead_at=at, source_topic="t",
                      source_partition=0, source_offset=0, delivery=delivery)
    producer = Producer({"bootstrap.servers": config.bootstrap_servers})
    producer.produce(topic, key=endpoint_id.encode(),
                     value=Codec().encode(DEAD_LETTER_SCHEMA, dead.to_record(), topic=topic),
                     headers=dead_letter_headers(dead))
    assert producer.flush(10) == 0


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # how the page shows text: no broker behaviour
def test_hostile_text_is_shown_inert(topics: Config, tabs: Any) -> None:
    """A description of 60 KB opening with <script> and an <img onerror> (written to the
    endpoints topic as it is, as an older or hostile writer could), a URL full of markup,
    and a receiver whose answers are HTML: the page shows all of it as text, runs none of
    it, makes no element of it, stays quick (it lays out 4,000 characters of a text at
    most) and still fits a phone's width."""
    now = time.time_ns() // 1_000_000
    # Latin and Arabic letters in turn, without a space: the slowest text to lay out found (a
    # bidirectional run per letter); 60,000 characters of it took Chromium 41 s.
    description = HOSTILE + "\n" + "Aب" * 30_000
    url = 'https://example.com/"><script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>'
    hostile = Endpoint(id=str(uuid.uuid4()), bot_id=BOT, url=url, secret=new_secret(), created_at=now,
                       updated_at=now, description=description)
    save_endpoint(topics, hostile)
    with HostileReceiver() as receiver, served(topics) as api:
        answering = create(api.client(), BOT, receiver.url, description=HOSTILE).json()
        write_attempts(topics, DeliveryAttempt(
            event_id=str(uuid.uuid4()), event_type="MESSAGE", bot_id=BOT, endpoint_id=answering["id"],
            occurred_at=now - 10, number=1,
            attempt=Attempt(at=now, tier="events", duration_ms=2.0, outcome=Outcome.HTTP_ERROR, status=500,
                            error=HOSTILE, response_snippet=HOSTILE),
            next=Next.read("retry:retry-1s")))
        hostile_dead_letter(topics, answering["id"])
        eventually(lambda: len(api_endpoints(api)) == 2, "both endpoints in the API's table")
        eventually(lambda: len(api.client().get("/v1/dead-letters").json()["data"]) == 1, "the dead letter")
        eventually(lambda: len(api.client().get("/v1/deliveries", params={"endpointId": answering["id"]}).json()[
            "data"]) == 1, "the attempt")

        tab = tabs(PHONE)
        page = tab.open(api, mint(api))
        cards = page.locator("#endpoint-list > li")
        expect(cards).to_have_count(2)
        written = cards.filter(has_text=url)
        expect(written).to_contain_text('<script>window.__pwned = "script"</script>')
        fits_the_screen(page)
        written.get_by_role("button", name="Manage").click()
        expect(page.locator("#ep-url")).to_have_text(url)
        show_all = page.locator("#ep-description").get_by_role("button", name=re.compile(r"^Show all \(60,"))
        show_all.click(timeout=10_000)  # quick: it lays out 4,000 characters
        shown = page.locator("#ep-description .text")
        expect(shown).to_contain_text(HOSTILE + "\n" + "Aب" * 500)
        expect(shown).to_contain_text("56,134 more characters, not shown")  # 4,000 are laid out, at most
        expect(page.locator("#edit-description-error")).to_contain_text("more than the 1,000 allowed now")
        expect(page.locator("#edit-form").get_by_label("Description")).to_have_value("")
        fits_the_screen(page)
        page.get_by_role("button", name="← All endpoints").click()

        cards.filter(has_text=receiver.url).get_by_role("button", name="Manage").click()
        page.locator("#test-form").get_by_role("button", name="Send test events").click()
        snippets = page.locator("#test-table pre.snippet")
        expect(snippets).to_have_count(6)
        expect(snippets.first).to_have_text(HOSTILE)
        history = page.locator("#history-table tr[data-attempt]")
        expect(history).to_have_count(1)
        history.first.get_by_role("button", name="Detail").click()
        expect(page.locator("#history-table tr.detail-row pre.snippet")).to_have_text(HOSTILE)
        letters = page.locator("#dlq-table tr[data-dead-letter]")
        expect(letters).to_have_count(1)
        letters.first.get_by_role("button", name="Detail").click()
        record = page.locator("#dlq-table tr.detail-row .record")
        expect(record).to_contain_text(HOSTILE)
        expect(record.locator("pre.json")).to_contain_text("<img src=x")
        fits_the_screen(page)

        assert page.evaluate("window.__pwned") is None
        assert page.locator("main img, main script, main a[href^='javascript']").count() == 0
        assert page.locator("body script").count() == 0
        tab.check()  # and no Content-Security-Policy violation: nothing even tried to run


@pytest.mark.integration
@pytest.mark.brokers("tansu")  # the page's own behaviour: no broker behaviour
def test_the_keyboard_alone_labels_and_a_phone_width_screen(topics: Config, tabs: Any) -> None:
    """Every field has a label and every control is a button, a link or a form field;
    an owner can make an endpoint, copy its secret and open it with the keyboard alone,
    seeing where the focus is; at 375 px wide the page is one column with no sideways
    scrolling (the README's phone screenshots)."""
    secret = new_secret()
    listener = Listener(host="127.0.0.1", port=0, secrets=[secret], behaviour=Behaviour(),
                        on_request=lambda received: None).start()
    with served(topics) as api:
        existing = create(api.client(), BOT, f"http://127.0.0.1:{listener.port}/webhooks/crm", secret=secret,
                          description="CRM sync", events=["TICKET", "CREATE_LEAD"]).json()
        write_attempts(topics, *(DeliveryAttempt(
            event_id=str(uuid.uuid4()), event_type=kind, bot_id=BOT, endpoint_id=existing["id"],
            occurred_at=time.time_ns() // 1_000_000 - 10, number=1,
            attempt=Attempt(at=time.time_ns() // 1_000_000, tier="events", duration_ms=3.2 + number,
                            outcome=Outcome.SUCCESS, status=200),
            next=Next.read("delivered")) for number, kind in enumerate(("TICKET", "CREATE_LEAD", "TICKET"))))
        write_dead_letters(topics, (BOT, existing["id"]))
        eventually(lambda: len(api.client().get("/v1/deliveries", params={"endpointId": existing["id"]}).json()[
            "data"]) == 3, "the attempts")
        eventually(lambda: len(api.client().get("/v1/dead-letters").json()["data"]) == 1, "the dead letter")

        tab = tabs()
        page = tab.open(api, mint(api))
        unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter((e) => e.type !== 'hidden' && e.labels.length === 0 && !e.getAttribute('aria-label'))
            .map((e) => e.id || e.name)""")
        assert unlabelled == []
        assert page.locator("[onclick], div[tabindex]:not([tabindex='-1']), span[tabindex]").count() == 0

        def tab_to(element_id: str, limit: int = 60) -> None:
            for _ in range(limit):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
                    return
            raise AssertionError(f"#{element_id} not reached by Tab")

        tab_to("create-url")
        outline = page.evaluate("""(() => { const s = getComputedStyle(document.activeElement);
            return [s.outlineStyle, parseFloat(s.outlineWidth)]; })()""")
        assert outline[0] != "none" and outline[1] >= 2, outline
        page.keyboard.type("https://example.com/webhooks/support")
        page.keyboard.press("Tab")
        page.keyboard.type("Support desk")
        for _ in range(3):  # the event types, to the third: TICKET
            page.keyboard.press("Tab")
        expect(page.locator("#create-events-ticket")).to_be_focused()
        page.keyboard.press("Space")
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Shift+Tab")
        expect(page.locator("#create-url")).to_be_focused()
        page.keyboard.press("Enter")
        copy = page.locator("#create-result").get_by_role("button", name="Copy secret")
        expect(copy).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#create-result")).to_contain_text("Copied to the clipboard.")
        made = [e for e in api_endpoints(api) if e["url"].endswith("/support")]
        assert len(made) == 1 and made[0]["events"] == ["TICKET"] and made[0]["description"] == "Support desk"
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")  # "I have saved it: hide it"
        expect(page.locator("#create-result")).to_be_empty()

        page.locator("#endpoint-list > li").first.get_by_role("button", name="Manage").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#endpoint-h")).to_be_focused()
        expect(page.locator("#history-table tr[data-attempt]")).to_have_count(3)
        page.locator("#health-refresh").click()
        expect(page.locator("#stats-table")).to_contain_text("100 %")

        phone = tabs(PHONE).open(api, mint(api))
        fits_the_screen(phone)
        shoot(phone, "settings-webhooks-phone-list.png")  # the window, as a phone shows it
        phone.locator("#endpoint-list > li").first.get_by_role("button", name="Manage").click()
        expect(phone.locator("#history-table tr[data-attempt]")).to_have_count(3)
        phone.locator("#history-table tr[data-attempt]").first.get_by_role("button", name="Detail").click()
        phone.locator("#test-form").get_by_role("button", name="Send test events").click()
        expect(phone.locator("#test-table tbody tr")).to_have_count(6)
        phone.locator("#dlq-table tr[data-dead-letter]").first.get_by_role("button", name="Detail").click()
        expect(phone.locator("#dlq-table tr.detail-row .record")).to_contain_text("HTTP 503")
        fits_the_screen(phone)
        widths = phone.evaluate("[...document.querySelectorAll('#history-table td')].map((td) => "
                                "td.getBoundingClientRect().width)")
        assert widths and max(widths) <= PHONE["width"]  # stacked rows, one cell a line
        phone.evaluate("document.getElementById('endpoint-view').scrollIntoView()")
        shoot(phone, "settings-webhooks-phone-endpoint.png")
        tab.check()
    listener.stop()
