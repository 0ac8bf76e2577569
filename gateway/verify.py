"""Verifying the gateway's webhooks, for receivers (Python).

>>> from gateway.verify import verify, WebhookVerificationError
>>> verify(secret, request.headers, request.body)   # raises if not authentic

Conforms to the Standard Webhooks specification: the ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` headers, HMAC-SHA256 over
``"{id}.{timestamp}.{body}"``, any one of several space-separated ``v1,`` signatures may
match, a timestamp more than 5 minutes away from now is refused, comparisons are
constant-time.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

from .errors import InvalidSecret, WebhookVerificationError
from .signing import secret_key, sign

__all__ = ["TOLERANCE_SECONDS", "WebhookVerificationError", "verify"]

TOLERANCE_SECONDS = 5 * 60


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> None:
    """Raise :class:`WebhookVerificationError` unless the request was signed with ``secret``
    (``whsec_…``) and its timestamp is within ``tolerance`` seconds of ``now``."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id")
    stamp = lower.get("webhook-timestamp")
    signatures = lower.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not a Unix time") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError("message timestamp too old")
    if timestamp > current + tolerance:
        raise WebhookVerificationError("message timestamp too new")
    try:
        key = secret_key(secret)
    except InvalidSecret as exc:
        raise WebhookVerificationError(str(exc)) from None
    payload = body.encode() if isinstance(body, str) else body
    expected = sign(key, msg_id, timestamp, payload).encode()
    for candidate in signatures.split(" "):
        version, _, _ = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(candidate.encode(), expected):
            return
    raise WebhookVerificationError("no matching signature")
