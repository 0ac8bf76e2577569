"""Standard Webhooks signatures, as the gateway signs its requests.

``webhook-signature`` is ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed
by the base64-decoded part of the endpoint's ``whsec_…`` secret; during a secret rotation
one signature per secret, separated by spaces. Receivers verify with :mod:`gateway.verify`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

from .errors import InvalidSecret

__all__ = ["SECRET_PREFIX", "new_secret", "secret_key", "sign", "signature_header"]

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("the secret is not whsec_ followed by base64") from None
    if len(key) < 16:
        raise InvalidSecret(f"the secret's key is {len(key)} bytes; use at least 16 (24-64 is usual)")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.digest(key, content, "sha256")  # one call into OpenSSL
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per key, space-separated."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)
