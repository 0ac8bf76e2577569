"""Who may call the management API: its bearer tokens, and where a request's token is
checked (:func:`require_token`, a dependency of every ``/v1`` route).

Tokens come from ``GATEWAY_API_TOKENS`` (comma-separated, 16 characters at least). They
are kept as SHA-256 digests and compared in constant time, every one of them, so neither
a token's length nor which one matched shows in the time an answer takes. Without a
token, the API serves nobody, except on a loopback address where ``gateway up`` makes
one for its run (:func:`tokens_for`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..config import Config, setting
from ..errors import ConfigError, Unauthorized

__all__ = ["MIN_TOKEN_LENGTH", "TOKENS_ENV", "Tokens", "is_loopback", "require_token", "tokens_for"]

TOKENS_ENV = setting("api_tokens").env
MIN_TOKEN_LENGTH = 16


class Tokens:
    """The bearer tokens the API accepts. Refuses (a :class:`~gateway.errors.ConfigError`,
    never showing a token) one that is short or holds whitespace or control characters."""

    def __init__(self, tokens: Iterable[str]) -> None:
        kept = []
        for number, token in enumerate(tokens, start=1):
            if len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"{TOKENS_ENV}: token {number} is {len(token)} characters; use at least "
                                  f"{MIN_TOKEN_LENGTH}, e.g. python3 -c "
                                  "'import secrets; print(secrets.token_urlsafe(32))'", field="api_tokens")
            if any(c.isspace() or not c.isprintable() for c in token):
                raise ConfigError(f"{TOKENS_ENV}: token {number} contains whitespace or control characters",
                                  field="api_tokens")
            kept.append(token)
        # Compared as digests: equal lengths, so a comparison reveals nothing of a token's length.
        self._digests = tuple(hashlib.sha256(t.encode()).digest() for t in kept)

    @classmethod
    def from_config(cls, config: Config) -> Tokens:
        return cls(config.api_tokens)

    @staticmethod
    def generate() -> str:
        """A fresh token (32 random bytes, URL-safe base64)."""
        return secrets.token_urlsafe(32)

    def accepts(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        # Every token compared, not the first match only: the time does not depend on which.
        return sum(hmac.compare_digest(digest, known) for known in self._digests) > 0

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)


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


_bearer = HTTPBearer(auto_error=False, description=f"One of the tokens of {TOKENS_ENV}.")


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Where the API checks a token: every ``/v1`` route depends on it."""
    tokens: Tokens = request.app.state.service.tokens
    if credentials is None:
        raise Unauthorized("missing bearer token: send Authorization: Bearer <token> "
                           f"with a token of {TOKENS_ENV}")
    if not tokens.accepts(credentials.credentials):
        raise Unauthorized(f"the bearer token is not one of {TOKENS_ENV}")
