"""The Settings > Webhooks page, at ``/settings/webhooks``: what a bot owner opens to manage
the bot's endpoints, send test events, read the delivery history and replay dead letters.

**What the server sends.** One HTML document and a few static files, all from the
package (``gateway/api/page/``): ES modules and a style sheet, written by hand, with no
build step and no third-party code. The event types (the catalog, and the checkboxes of
the forms that name types) are rendered into the document here, escaped, from
:func:`gateway.ops.event_types`; everything the bot owns (endpoints, history, dead
letters) the page's scripts fetch from the ``/v1`` routes with the bot's token, so the
same scopes, versions and problems apply as to any other client of the API.

**Served before the request guard.** The page and its files hold nothing of any bot's,
and a browser opening a link sends no ``Authorization`` header: :class:`SettingsPage`
answers the page's paths (``GET`` and ``HEAD`` only) in front of the guard, which asks
every other path for a token; every other request goes on to the application unchanged.

**The token.** The platform links to ``/settings/webhooks#token=<a minted bot token>``
(``POST /v1/tokens`` or ``gateway api --mint-token BOT_ID``). A fragment is never sent to
a server, so the token stays out of access logs and ``Referer`` headers; the script
moves it into ``sessionStorage`` (this tab only, gone when it closes), takes it out of the
address bar and sends it as ``Authorization: Bearer`` on each call. The page never needs
an admin token.

**Hostile text.** Endpoint URLs and descriptions, response snippets, errors and payloads
are whoever wrote them. The scripts build the DOM with ``createElement`` and
``textContent``, never HTML parsed from data; and the answer's Content-Security-Policy
runs only the page's own files (no inline script, no inline style, no other origin), so a
mistake there still could not run what a receiver sent.
"""

from __future__ import annotations

import hashlib
import html
import json
import string
from dataclasses import dataclass
from importlib import resources

from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..ops import event_types
from ._errors import answer

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_PATH", "STATIC_PATH", "SettingsPage", "page_route"]

PAGE_PATH = "/settings/webhooks"
"""Where the page is served."""
STATIC_PATH = PAGE_PATH + "/static/"
"""Where its scripts and style sheet are served."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Only the page's own files run; it talks to its own origin only; no form is ever
submitted by the browser itself (the scripts send them), so a token typed into the
sign-in form cannot end up in a URL."""

_STATIC = {
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "endpoints.js": "text/javascript; charset=utf-8",
    "history.js": "text/javascript; charset=utf-8",
    "deadletters.js": "text/javascript; charset=utf-8",
}
"""Every static file and its type: nothing else under ``STATIC_PATH`` is served."""

_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    # Revalidated on each load (by ETag): a new release's files are used at once.
    "cache-control": "no-cache",
}


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _file(body: bytes, content_type: str) -> _File:
    return _File(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:24] + '"')


def _read(name: str) -> bytes:
    return resources.files(__package__ or "gateway.api").joinpath("page", name).read_bytes()


def _event_checkboxes(prefix: str, *, checked: bool) -> str:
    """A checkbox per event type, each with its label; ``prefix`` keeps the ids apart."""
    rows = []
    for info in event_types():
        value = html.escape(info.type.value)
        ident = f"{prefix}-{value.lower()}"
        rows.append(f'<label class="check" for="{ident}"><input type="checkbox" id="{ident}" name="events" '
                    f'value="{value}"{" checked" if checked else ""}> <code>{value}</code> '
                    f'<span class="hint">{html.escape(info.description)}</span></label>')
    return "\n".join(rows)


def _endpoint_fields(prefix: str, *, url_attributes: str, optional: str, events_hint: str) -> tuple[str, str]:
    """An endpoint's fields in the form ``prefix`` names (``page/endpoint-fields.html``):
    the fields, and the limits that go after what the form adds between them."""
    fragment = string.Template(_read("endpoint-fields.html").decode("utf-8").split("-->\n", 1)[1])
    rendered = fragment.substitute(prefix=prefix, url_attributes=url_attributes, optional=optional,
                                   events_hint=events_hint,
                                   events=_event_checkboxes(f"{prefix}-events", checked=False))
    fields, limits = rendered.split("<!-- limits -->")
    return fields.strip(), limits.strip()


def _event_options() -> str:
    return "\n".join(f'<option value="{html.escape(t.type.value)}">{html.escape(t.type.value)}</option>'
                     for t in event_types())


def _catalog() -> str:
    """Each event type: what it means, its example body and its JSON schema."""
    parts = []
    for info in event_types():
        name = html.escape(info.type.value)
        source = ("the platform documentation's example" if info.documented else
                  "the gateway's example (the platform documentation gives this type's fields, no example)")
        parts.append(
            f'<details class="event-type" id="type-{name.lower()}"><summary><code>{name}</code> '
            f"{html.escape(info.description)}</summary>"
            f"<p>Example body ({html.escape(source)}); test sends post exactly this, with your bot's id:</p>"
            f'<pre class="json">{html.escape(json.dumps(info.example, indent=2))}</pre>'
            f"<p>Its JSON schema:</p>"
            f'<pre class="json">{html.escape(json.dumps(info.schema, indent=2))}</pre></details>')
    return "\n".join(parts)


def _render_page() -> bytes:
    template = string.Template(_read("webhooks.html").decode("utf-8"))
    create_fields, create_limits = _endpoint_fields(
        "create", url_attributes=' required placeholder="https://example.com/webhooks"',
        optional=' <span class="hint">(optional)</span>', events_hint="None checked: every type, new ones included.")
    edit_fields, edit_limits = _endpoint_fields("edit", url_attributes="", optional="",
                                                events_hint="None checked: every type.")
    return template.substitute(
        create_fields=create_fields,
        create_limits=create_limits,
        edit_fields=edit_fields,
        edit_limits=edit_limits,
        test_events=_event_checkboxes("test-events", checked=True),
        dlq_event_options=_event_options(),
        catalog=_catalog(),
    ).encode("utf-8")


class SettingsPage:
    """ASGI middleware serving the page's paths and passing every other request to
    ``app``. Added last in :func:`~gateway.api.create_app`, so it runs before the request
    guard. The files are read and the page rendered once, at the first request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._files: dict[str, _File] | None = None

    def files(self) -> dict[str, _File]:
        if self._files is None:
            found = {PAGE_PATH: _file(_render_page(), "text/html; charset=utf-8")}
            for name, content_type in _STATIC.items():
                found[STATIC_PATH + name] = _file(_read(name), content_type)
            self._files = found
        return self._files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PAGE_PATH and not path.startswith(PAGE_PATH + "/"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if path == PAGE_PATH + "/":
            await RedirectResponse(PAGE_PATH, status_code=308)(scope, receive, send)
            return
        found = self.files().get(path)
        if found is None:
            await answer("not_found", f"no page or file {path}", instance=path)(scope, receive, send)
            return
        if method not in ("GET", "HEAD"):
            await answer("method_not_allowed", f"{method} is not allowed on {path}: the page is only read",
                         instance=path, headers={"allow": "GET, HEAD"})(scope, receive, send)
            return
        headers = dict(_HEADERS, etag=found.etag)
        if found.etag in _if_none_match(scope):
            status, body = 304, b""
        else:
            status, body = 200, found.body
            headers |= {"content-type": found.content_type, "content-length": str(len(found.body))}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def page_route(path: str) -> str | None:
    """The route template a request for ``path`` counts under in the API's metrics: the
    page, or its static files (one template for all of them); None for other paths."""
    if path.startswith(STATIC_PATH):
        return STATIC_PATH + "{file}"
    if path == PAGE_PATH or path.startswith(PAGE_PATH + "/"):
        return PAGE_PATH
    return None


def _if_none_match(scope: Scope) -> set[str]:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"if-none-match":
            return {tag.strip().removeprefix("W/") for tag in bytes(value).decode("latin-1").split(",")}
    return set()
