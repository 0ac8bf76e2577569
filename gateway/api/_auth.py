"""Who may call the management API: its bearer tokens and their scopes, the short-lived
bot tokens an admin mints, and where a request's token is checked.

**Configured tokens** come from ``GATEWAY_API_TOKENS``, comma-separated, each 16
characters at least, and each with its scope (:class:`~gateway.ops.Scope`):

* ``admin:TOKEN``, or a plain ``TOKEN`` (what every token was before scopes): everything;
* ``read:TOKEN``: every read, no write, no send;
* ``bot:BOT_ID:TOKEN``: one bot's endpoints, history and dead letters (a long-lived token
  for one bot's own automation);
* ``key:SECRET`` is not a token: it is the key minted tokens are signed with (below).

They are kept as SHA-256 digests and compared in constant time, every one of them, so
neither a token's length nor which one matched shows in the time an answer takes.

**Minted tokens.** An admin mints a bot-scoped token for a bot owner's session
(``POST /v1/tokens``, or ``gateway api --mint-token BOT_ID``): no database, the token
carries its own claims, ``gwb1.<payload>.<signature>``, the payload URL-safe base64 of
``{"bot": BOT_ID, "iat": …, "exp": …, "jti": …}`` (seconds since the epoch) and the
signature HMAC-SHA256 over ``gwb1.<payload>`` with the signing key. It is refused after
``exp`` (15 minutes by default, 24 hours at most); there is no revocation list: rotating
the key revokes every minted token at once.

**The signing key** is ``key:SECRET`` of ``GATEWAY_API_TOKENS`` when given (32
characters at least), else derived from the admin tokens (HMAC-SHA256 of the sorted
admin tokens under a fixed label). Every API process of a deployment is configured with
the same ``GATEWAY_API_TOKENS``, so they all derive (or are given) the same key, and a
token minted by one is accepted by every other: nothing else is shared. Changing the
admin tokens changes a derived key (minted tokens stop working: they are short-lived);
give ``key:`` to keep them across a rotation of the admin tokens.

**Where.** Before any route reads a body, the request guard (``_guard``) calls
:func:`authenticate` and keeps the caller's :class:`~gateway.ops.Access` in the request;
:func:`require_token`, a dependency of every ``/v1`` route, hands it to the route. Without
a token, the API serves nobody, except on a loopback address where ``gateway up`` makes
one for its run (:func:`tokens_for`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..clock import SYSTEM
from ..config import Config, setting
from ..errors import ConfigError, InputError, Unauthorized
from ..events import is_uuid
from ..ops import Access, Scope

__all__ = [
    "DEFAULT_MINTED_TTL",
    "MAX_MINTED_TTL",
    "MINTED_PREFIX",
    "MIN_KEY_LENGTH",
    "MIN_TOKEN_LENGTH",
    "TOKENS_ENV",
    "Minted",
    "Tokens",
    "authenticate",
    "is_loopback",
    "require_token",
    "tokens_for",
]

TOKENS_ENV = setting("api_tokens").env
MIN_TOKEN_LENGTH = 16
MIN_KEY_LENGTH = 32
MINTED_PREFIX = "gwb1"
"""What a minted token begins with (and its format's version)."""
DEFAULT_MINTED_TTL = 15 * 60
"""Seconds a minted token lives unless told otherwise."""
MAX_MINTED_TTL = 24 * 3600

_DERIVATION_LABEL = b"webhook-gateway/api/minted-tokens/v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Minted:
    """A minted token and what it grants."""

    token: str
    bot_id: str
    expires_at: int
    """Seconds since the epoch."""


@dataclass(frozen=True)
class _Known:
    digest: bytes
    access: Access


class Tokens:
    """The tokens the API accepts, with their scopes, and the key minted ones are signed
    with. Refuses (a :class:`~gateway.errors.ConfigError`, never showing a token) one that
    is short, holds whitespace or control characters, or names a scope wrongly.

    ``now`` is the clock minted tokens are judged by (seconds since the epoch)."""

    def __init__(self, tokens: Iterable[str], *, now: Callable[[], float] | None = None) -> None:
        self._now = now or (lambda: SYSTEM.now_ms() / 1000)
        known: list[_Known] = []
        admins: list[str] = []
        key: bytes | None = None
        for number, entry in enumerate(tokens, start=1):
            scope, bot_id, token = self._parse(number, entry)
            if scope == "key":
                if len(token) < MIN_KEY_LENGTH:
                    raise ConfigError(f"{TOKENS_ENV}: the key (entry {number}) is {len(token)} characters; use at "
                                      f"least {MIN_KEY_LENGTH}", field="api_tokens")
                key = token.encode()
                continue
            digest = hashlib.sha256(token.encode()).digest()
            subject = f"token:{digest.hex()[:12]}"
            access = Access(Scope(scope), bot_id, subject) if scope == "bot" else Access(Scope(scope), None, subject)
            known.append(_Known(digest, access))
            if scope == "admin":
                admins.append(token)
        self._known = tuple(known)
        if key is None and admins:
            key = hmac.new(_DERIVATION_LABEL, "\n".join(sorted(admins)).encode(), hashlib.sha256).digest()
        self._key = key

    @staticmethod
    def _parse(number: int, entry: str) -> tuple[str, str | None, str]:
        """(scope, bot id, token) of one entry of the variable."""
        scope, bot_id, token = "admin", None, entry
        head, _, rest = entry.partition(":")
        if head in ("admin", "read", "key") and rest:
            scope, token = head, rest
        elif head == "bot" and rest:
            bot_id, _, token = rest.partition(":")
            if not is_uuid(bot_id) or not token:
                raise ConfigError(f"{TOKENS_ENV}: entry {number} is not bot:BOT_ID:TOKEN with a UUID bot id",
                                  field="api_tokens")
            scope, bot_id = "bot", bot_id.lower()
        if scope != "key" and len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{TOKENS_ENV}: token {number} is {len(token)} characters; use at least "
                              f"{MIN_TOKEN_LENGTH}, e.g. python3 -c "
                              "'import secrets; print(secrets.token_urlsafe(32))'", field="api_tokens")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError(f"{TOKENS_ENV}: token {number} contains whitespace or control characters",
                              field="api_tokens")
        return scope, bot_id, token

    @classmethod
    def from_config(cls, config: Config) -> Tokens:
        return cls(config.api_tokens)

    @staticmethod
    def generate() -> str:
        """A fresh token (32 random bytes, URL-safe base64)."""
        return secrets.token_urlsafe(32)

    def access(self, token: str) -> Access | None:
        """What ``token`` may do, or None when it is not one of these (or a minted token
        that is forged, malformed or expired)."""
        if token.startswith(MINTED_PREFIX + "."):
            return self._minted(token)
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        found = None
        # Every token compared, not the first match only: the time does not depend on which.
        for known in self._known:
            if hmac.compare_digest(digest, known.digest):
                found = known.access
        return found

    def accepts(self, token: str) -> bool:
        return self.access(token) is not None

    @property
    def can_mint(self) -> bool:
        """Whether there is a key to sign minted tokens with (a ``key:``, or an admin token)."""
        return self._key is not None

    def mint(self, bot_id: str, *, ttl: int = DEFAULT_MINTED_TTL) -> Minted:
        """A token for ``bot_id``'s scope, valid ``ttl`` seconds (1 to 24 hours' worth)."""
        if not is_uuid(bot_id):
            raise InputError(f"bot id {bot_id!r} is not a UUID", field="bot_id")
        if not 1 <= ttl <= MAX_MINTED_TTL:
            raise InputError(f"ttl {ttl} s is not from 1 to {MAX_MINTED_TTL} seconds", field="ttl_seconds")
        if self._key is None:
            raise ConfigError(f"no key to sign minted tokens with: {TOKENS_ENV} has no admin token and no key:",
                              field="api_tokens")
        now = int(self._now())
        claims = {"bot": bot_id.lower(), "iat": now, "exp": now + ttl, "jti": secrets.token_hex(8)}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signed = f"{MINTED_PREFIX}.{payload}"
        signature = _b64(hmac.new(self._key, signed.encode(), hashlib.sha256).digest())
        return Minted(f"{signed}.{signature}", bot_id.lower(), now + ttl)

    def _minted(self, token: str) -> Access | None:
        if self._key is None:
            return None
        parts = token.split(".")
        if len(parts) != 3:
            return None
        signed = f"{parts[0]}.{parts[1]}"
        expected = _b64(hmac.new(self._key, signed.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected.encode(), parts[2].encode(errors="surrogateescape")):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        if not isinstance(claims, dict) or not is_uuid(claims.get("bot")):
            return None
        expires = claims.get("exp")
        if not isinstance(expires, int) or isinstance(expires, bool) or self._now() >= expires:
            return None
        return Access.for_bot(str(claims["bot"]), subject=f"bot:{str(claims['bot']).lower()}")

    def __bool__(self) -> bool:
        return bool(self._known)

    def __len__(self) -> int:
        return len(self._known)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tokens_for(config: Config, *, generate: bool) -> tuple[Tokens, str | None]:
    """The tokens of ``config``, and the token generated for this run (or None). Without
    tokens, one is generated when ``generate`` and the API serves on loopback only
    (``gateway up``); otherwise it is a :class:`~gateway.errors.ConfigError` saying how
    to set one."""
    tokens = Tokens.from_config(config)
    if tokens:
        return tokens, None
    if generate and is_loopback(config.api_host):
        token = Tokens.generate()
        return Tokens([token]), token
    if generate:
        raise ConfigError(f"the API on {config.api_host} needs {TOKENS_ENV}: a token is generated only for a "
                          "loopback address (or pass --no-api)", field="api_tokens")
    raise ConfigError(
        f"{TOKENS_ENV} is not set (or empty): the API serves nobody without a token. Set it to one or more "
        "comma-separated tokens of 16 characters or more, e.g. "
        f"{TOKENS_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')", field="api_tokens")


def authenticate(tokens: Tokens, authorization: str | None) -> Access:
    """The caller an ``Authorization`` header stands for; :class:`~gateway.errors.Unauthorized`
    when there is none, it is not a bearer token, or not one these tokens accept."""
    if not authorization:
        raise Unauthorized("missing bearer token: send Authorization: Bearer <token> "
                           f"with a token of {TOKENS_ENV} (or one minted by an admin)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header is not Bearer <token>")
    access = tokens.access(token.strip())
    if access is None:
        raise Unauthorized(f"the bearer token is not one of {TOKENS_ENV}, nor a minted token still valid")
    return access


_bearer = HTTPBearer(auto_error=False, description=f"One of the tokens of {TOKENS_ENV}, or a minted bot token.")


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Access:
    """Where a route gets its caller: every ``/v1`` route depends on it. The request guard
    checked the token before the body was read; a request that did not pass through it
    (an application mounted without the guard) is checked here."""
    found = request.scope.get("state", {}).get("access")
    if isinstance(found, Access):
        return found
    tokens: Tokens = request.app.state.service.tokens
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    return authenticate(tokens, header)
