"""Managing endpoint registrations: the operations `gateway endpoints …` and the HTTP API
both call, and the rules that judge a registration.

These functions print nothing: they return values and raise the errors of
:mod:`gateway.errors` (an :class:`~gateway.errors.InputError` naming the field at fault,
:class:`~gateway.errors.NotFound` for an unknown id, :class:`~gateway.errors.Forbidden`
for an endpoint out of the caller's scope (:class:`~gateway.ops.Access`),
:class:`~gateway.errors.Unavailable` when the endpoints topic cannot be read or written).
They block on Kafka; async code calls them from a thread.

**Versions.** A change is read-modify-write of one record. Each registration has a
version (:func:`endpoint_version`, a digest of the whole record: any change, the secret's
included, makes a new one); a change given ``if_match`` is refused with
:class:`~gateway.errors.PreconditionFailed` unless the record it read has that version,
so a change made on a stale read (a PATCH racing a rotation, or a removal) cannot write
the old state back. The check and the write are atomic only against writers that hold
the same lock (the API serializes its writes per endpoint, ``gateway.api``); between two
processes, the later write still wins whole.

The checks are pure and the same for every face: a bot id is a UUID (stored lower
case), a URL is http(s) with a host and no credentials and parses as the sender will
parse it, event types are known, a secret can sign. Whether the destination policy would
refuse the URL is a warning, judged by the sender's own :class:`DestinationPolicy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..clock import SYSTEM
from ..config import Config
from ..delivery import DestinationPolicy, destination
from ..errors import InputError, NotFound, PreconditionFailed
from ..events import is_uuid, parse_event_types
from ..records import Circuit, CircuitState, Endpoint
from ..signing import new_secret, secret_key
from ..store import EndpointTable, delete_endpoint, load_endpoints, save_endpoint
from ._access import OPERATOR, Access
from ._inputs import iso, parse_rate

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "KEEP",
    "MAX_DESCRIPTION_LENGTH",
    "MAX_GRACE_SECONDS",
    "MAX_URL_LENGTH",
    "Keep",
    "Registration",
    "Versions",
    "circuit_json",
    "destination_warning",
    "endpoint_json",
    "endpoint_version",
    "get_endpoint",
    "list_endpoints",
    "mask_secret",
    "new_endpoint",
    "register_endpoint",
    "remove_endpoint",
    "rotate_secret",
    "rotated",
    "set_enabled",
    "set_endpoint_enabled",
    "update_endpoint",
    "validate_bot_id",
    "validate_description",
    "validate_event_types",
    "validate_max_in_flight",
    "validate_rate_limit",
    "validate_secret",
    "validate_url",
]

DEFAULT_GRACE_SECONDS = 24 * 3600
"""How long a rotated-out secret keeps signing unless told otherwise."""
MAX_GRACE_SECONDS = 30 * 24 * 3600
"""The longest grace a rotation may give the old secret."""
MAX_URL_LENGTH = 2048
"""Characters of an endpoint's URL, at most (what browsers and proxies reliably carry)."""
MAX_DESCRIPTION_LENGTH = 1000
"""Characters of an endpoint's description, at most."""


def validate_bot_id(bot_id: str) -> str:
    """``bot_id`` in lower case, the form routing compares; refused unless a UUID."""
    if not is_uuid(bot_id):
        raise InputError(f"bot id {bot_id!r} is not a UUID", field="bot_id")
    return bot_id.lower()


def validate_url(url: str) -> str:
    """``url`` if deliveries can be POSTed to it (at most :data:`MAX_URL_LENGTH`
    characters, http or https, a host, no credentials, no whitespace, and parsed by the
    sender's own parser)."""
    if len(url) > MAX_URL_LENGTH:
        raise InputError(f"url is {len(url)} characters; at most {MAX_URL_LENGTH}", field="url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError as exc:
        raise InputError(f"url {url!r} is not a valid URL: {exc}", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"url {url!r} is not an http:// or https:// URL with a host", field="url")
    if parts.username or parts.password:
        shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        raise InputError(f"url {shown!r} carries credentials before the host; "
                            "the receiver must authenticate us by the signature instead", field="url")
    if any(c.isspace() for c in url):
        raise InputError(f"url {url!r} contains whitespace", field="url")
    try:  # what the sender will parse: the same judge here, so it cannot refuse it later
        httpx.URL(url).raw_host  # noqa: B018
    except httpx.InvalidURL as exc:
        raise InputError(f"url {url!r} is not a valid URL: {exc}", field="url") from None
    return url


def validate_description(description: str | None) -> str | None:
    """``description`` if it is at most :data:`MAX_DESCRIPTION_LENGTH` characters of text
    (no control characters but tabs and newlines); None (no description) stays None."""
    if description is None:
        return None
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InputError(f"description is {len(description)} characters; at most {MAX_DESCRIPTION_LENGTH}",
                         field="description")
    bad = next((c for c in description if not c.isprintable() and c not in "\t\n"), None)
    if bad is not None:
        raise InputError(f"description contains the control character U+{ord(bad):04X}", field="description")
    return description


def validate_event_types(event_types: Iterable[str]) -> tuple[str, ...]:
    """The event types as stored: upper case, without blanks or repeats; refused if unknown."""
    return tuple(t.value for t in parse_event_types(event_types))


class Keep(Enum):
    """An argument left out of a change: the value stays as it is (``None`` clears it)."""

    KEEP = "keep"


KEEP = Keep.KEEP


def validate_rate_limit(value: float | str | None) -> float | None:
    """A rate limit in requests per second: a number, or text such as ``50/s``, ``600/m``,
    ``36000/h``; ``None`` (or ``none``) is no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, str):
        rate = parse_rate(value, field="rate_limit")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"rate limit {value!r} is not a number of requests per second", field="rate_limit")
    else:
        rate = float(value)
    if not (math.isfinite(rate) and 0 < rate <= 1_000_000):
        raise InputError(f"rate limit {value!r} must be more than 0 and at most 1000000 per second",
                            field="rate_limit")
    return rate


def validate_max_in_flight(value: int | str | None) -> int | None:
    """The most requests in flight (1-1000); ``None`` (or ``default``): the process's."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default", "none")):
        return None
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not 1 <= number <= 1000:
        raise InputError(f"max in flight {value!r} is not a whole number from 1 to 1000", field="max_in_flight")
    return number


def validate_secret(secret: str) -> str:
    """``secret`` if it can sign (``whsec_`` and base64 of at least 16 bytes); the error
    never shows it."""
    if not secret.startswith("whsec_") or len(secret) > 200:
        raise InputError("the secret must look like whsec_<base64> (at most 200 characters)", field="secret")
    secret_key(secret)  # InvalidSecret, an InputError naming the secret
    return secret


def mask_secret(secret: str) -> str:
    """What is shown instead of a secret: the same for every secret, so it reveals nothing."""
    return "whsec_" + "*" * 8


def endpoint_version(endpoint: Endpoint) -> str:
    """The version of a registration: a digest of the whole record, secrets included (it
    reveals nothing of them), so any change makes a new one. The API sends it as the
    ``ETag`` (quoted) and takes it back in ``If-Match``."""
    text = json.dumps(endpoint.to_record(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def endpoint_json(endpoint: Endpoint, *, show_secret: bool = False, now_ms: int | None = None) -> dict[str, Any]:
    """The endpoint as ``gateway endpoints … --json`` and the HTTP API show it; the
    secret masked unless ``show_secret``. The previous secret is never shown, only until
    when it is still accepted (``previousSecretExpiresAt``, null when there is none or its
    grace is over). Times are ISO 8601, UTC."""
    now = now_ms if now_ms is not None else SYSTEM.now_ms()
    expires = endpoint.previous_secret_expires_at
    in_grace = endpoint.previous_secret is not None and expires is not None and expires > now
    return {
        "id": endpoint.id,
        "botId": endpoint.bot_id,
        "url": endpoint.url,
        "events": list(endpoint.event_types),
        "enabled": endpoint.enabled,
        "description": endpoint.description,
        "rateLimit": endpoint.rate_limit,
        "maxInFlight": endpoint.max_in_flight,
        "secret": endpoint.secret if show_secret else mask_secret(endpoint.secret),
        "previousSecretExpiresAt": iso(expires) if in_grace and expires is not None else None,
        "createdAt": iso(endpoint.created_at),
        "updatedAt": iso(endpoint.updated_at),
        "version": endpoint_version(endpoint),
    }


def circuit_json(circuit: Circuit | None) -> dict[str, Any]:
    """An endpoint's circuit as the workers last reported it (closed when never opened)."""
    if circuit is None:
        return {"state": CircuitState.CLOSED.value, "since": None, "failures": 0, "probeAt": None, "worker": None}
    return {"state": circuit.state.value, "since": iso(circuit.changed_at), "failures": circuit.failures,
            "probeAt": iso(circuit.probe_at) if circuit.probe_at is not None else None, "worker": circuit.worker}


def new_endpoint(
    *,
    bot_id: str,
    url: str,
    event_types: Iterable[str] = (),
    secret: str | None = None,
    description: str | None = None,
    rate_limit: float | str | None = None,
    max_in_flight: int | str | None = None,
    now_ms: int | None = None,
) -> Endpoint:
    """Validate a registration and build the endpoint (a new id, a new secret if none)."""
    bot_id = validate_bot_id(bot_id)  # routing compares lower-case ids
    validate_url(url)
    types = validate_event_types(event_types)
    secret = new_secret() if secret is None else validate_secret(secret)
    description = validate_description(description)
    now = now_ms if now_ms is not None else SYSTEM.now_ms()
    return Endpoint(
        id=str(uuid.uuid4()),
        bot_id=bot_id,
        url=url,
        secret=secret,
        event_types=types,
        description=description,
        rate_limit=validate_rate_limit(rate_limit),
        max_in_flight=validate_max_in_flight(max_in_flight),
        created_at=now,
        updated_at=now,
    )


def set_enabled(endpoint: Endpoint, enabled: bool, *, now_ms: int | None = None) -> Endpoint:
    """``endpoint`` enabled or disabled, everything else kept."""
    now = now_ms if now_ms is not None else SYSTEM.now_ms()
    return replace(endpoint, enabled=enabled, updated_at=now)


def _validate_grace(grace_seconds: float) -> None:
    if not (math.isfinite(grace_seconds) and 0 <= grace_seconds <= MAX_GRACE_SECONDS):
        raise InputError(f"grace {grace_seconds!r} s is not from 0 to {MAX_GRACE_SECONDS} seconds (30 days)",
                         field="grace_seconds")


def rotated(
    endpoint: Endpoint,
    *,
    secret: str | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    now_ms: int | None = None,
) -> Endpoint:
    """``endpoint`` with a new secret (``secret``, or a generated one); the current secret
    becomes the previous one and keeps signing for ``grace_seconds``. A previous secret
    still in its grace is dropped: two signatures at most."""
    _validate_grace(grace_seconds)
    fresh = new_secret() if secret is None else validate_secret(secret)
    now = now_ms if now_ms is not None else SYSTEM.now_ms()
    return replace(endpoint, secret=fresh, previous_secret=endpoint.secret,
                   previous_secret_expires_at=now + int(grace_seconds * 1000), updated_at=now)


@dataclass(frozen=True)
class Registration:
    """An endpoint as saved, and what the user should know about it."""

    endpoint: Endpoint
    """Including its signing secret: show it once, to whoever registered it."""
    warning: str | None = None
    """Why deliveries to its URL would be refused under the configured destination
    policy (a loopback or private address, say), or None. It is registered anyway: the
    policy may change, and the name may resolve elsewhere later."""


def destination_warning(config: Config, url: str) -> str | None:
    """Why deliveries to ``url`` would be refused, judged by the same
    :class:`DestinationPolicy` the sender applies when it connects (so the warning and
    the refusal cannot disagree), or None. ``url`` must be valid (:func:`validate_url`)."""
    policy = DestinationPolicy(allow_private=config.allow_private_networks,
                               allowed=config.allowed_networks)

    async def check() -> str | None:
        try:
            return await policy.check(*destination(httpx.URL(url)))
        finally:
            await policy.aclose()

    refused = asyncio.run(check())
    if refused is None:
        return None
    return (f"{url}: {refused}; deliveries to it are refused unless "
            "GATEWAY_ALLOW_PRIVATE_NETWORKS=true or GATEWAY_ALLOWED_NETWORKS covers it")


def register_endpoint(
    config: Config,
    *,
    bot_id: str,
    url: str,
    event_types: Iterable[str] = (),
    secret: str | None = None,
    description: str | None = None,
    rate_limit: float | str | None = None,
    max_in_flight: int | str | None = None,
    access: Access = OPERATOR,
    timeout: float = 30.0,
) -> Registration:
    """Validate and save a new endpoint (a new id; a generated secret unless ``secret``).

    Raises :class:`~gateway.errors.InputError` naming the field at fault,
    :class:`~gateway.errors.Forbidden` for a bot out of ``access``'s scope, or
    :class:`~gateway.errors.Unavailable` if the topic does not acknowledge the write.
    """
    access.require_write("registering an endpoint")
    endpoint = new_endpoint(bot_id=bot_id, url=url, event_types=event_types, secret=secret,
                            description=description, rate_limit=rate_limit, max_in_flight=max_in_flight)
    access.check_bot(endpoint.bot_id, what=f"bot {bot_id}")
    warning = destination_warning(config, url)
    save_endpoint(config, endpoint, timeout=timeout)
    return Registration(endpoint, warning)


def _current(config: Config, table: EndpointTable | None, timeout: float) -> EndpointTable:
    return table if table is not None else load_endpoints(config, timeout=timeout)


def get_endpoint(
    config: Config, endpoint_id: str, *, table: EndpointTable | None = None, access: Access = OPERATOR,
    timeout: float = 30.0,
) -> Endpoint:
    """The endpoint registered under ``endpoint_id``; :class:`~gateway.errors.NotFound` if
    none, :class:`~gateway.errors.Forbidden` if it is out of ``access``'s scope.

    Read from ``table`` when given (a running :class:`EndpointRegistry`'s, say), else
    from the topic, to its end.
    """
    endpoint = _current(config, table, timeout).get(endpoint_id)
    if endpoint is None:
        raise NotFound(f"no endpoint with id {endpoint_id!r}", field="endpoint_id")
    return access.check_endpoint(endpoint)


def list_endpoints(
    config: Config,
    *,
    bot_id: str | None = None,
    table: EndpointTable | None = None,
    access: Access = OPERATOR,
    timeout: float = 30.0,
) -> list[Endpoint]:
    """Every endpoint (by bot, oldest first), or only ``bot_id``'s, in any case. A bot
    scope lists its own bot's (asking for another is :class:`~gateway.errors.Forbidden`)."""
    if bot_id is not None:
        bot_id = validate_bot_id(bot_id)
    bot_id = access.bot_filter(bot_id)
    current = _current(config, table, timeout)
    return current.all() if bot_id is None else current.for_bot(bot_id)


Versions = str | tuple[str, ...] | None
"""What a change may be conditioned on: a version, any of several, or None (no condition)."""


def _check_version(endpoint: Endpoint, if_match: Versions) -> Endpoint:
    if if_match is None:
        return endpoint
    wanted = (if_match,) if isinstance(if_match, str) else if_match
    current = endpoint_version(endpoint)
    if current not in wanted:
        raise PreconditionFailed(
            f"endpoint {endpoint.id} changed since version {', '.join(wanted)} was read (it is now {current}); "
            "read it again and apply the change to what it is now")
    return endpoint


def _for_change(config: Config, endpoint_id: str, what: str, *, table: EndpointTable | None, access: Access,
                if_match: Versions, timeout: float) -> Endpoint:
    """The endpoint a change starts from: in scope, writable by ``access``, of the version given."""
    access.require_write(what)
    return _check_version(get_endpoint(config, endpoint_id, table=table, access=access, timeout=timeout), if_match)


def update_endpoint(
    config: Config,
    endpoint_id: str,
    *,
    url: str | Keep = KEEP,
    event_types: Iterable[str] | Keep | None = KEEP,
    description: str | Keep | None = KEEP,
    rate_limit: float | str | Keep | None = KEEP,
    max_in_flight: int | str | Keep | None = KEEP,
    table: EndpointTable | None = None,
    access: Access = OPERATOR,
    if_match: Versions = None,
    timeout: float = 30.0,
) -> Registration:
    """Change what is given and save; every argument left out is kept (:data:`KEEP`), and
    ``None`` clears a value to its default: every event type, no description, no rate
    limit, the process's in-flight cap (JSON merge-patch's rules: absent keeps, null
    clears). ``event_types=()`` means every type too. The URL cannot be cleared. The
    secret, the bot and the enabled state have functions of their own. With ``if_match``,
    refused unless the endpoint is still of that version (:func:`endpoint_version`)."""
    # Validate the inputs before reading the whole topic.
    types = event_types if isinstance(event_types, Keep) else validate_event_types(event_types or ())
    if not isinstance(url, Keep):
        validate_url(url)
    text = description if isinstance(description, Keep) else validate_description(description)
    rate = rate_limit if isinstance(rate_limit, Keep) else validate_rate_limit(rate_limit)
    in_flight = max_in_flight if isinstance(max_in_flight, Keep) else validate_max_in_flight(max_in_flight)
    current = _for_change(config, endpoint_id, "changing an endpoint", table=table, access=access,
                          if_match=if_match, timeout=timeout)
    changed = replace(
        current,
        url=current.url if isinstance(url, Keep) else url,
        event_types=current.event_types if isinstance(types, Keep) else types,
        description=current.description if isinstance(text, Keep) else text,
        rate_limit=current.rate_limit if isinstance(rate, Keep) else rate,
        max_in_flight=current.max_in_flight if isinstance(in_flight, Keep) else in_flight,
        updated_at=max(SYSTEM.now_ms(), current.updated_at + 1),
    )
    warning = destination_warning(config, changed.url) if not isinstance(url, Keep) else None
    save_endpoint(config, changed, timeout=timeout)
    return Registration(changed, warning)


def set_endpoint_enabled(
    config: Config,
    endpoint_id: str,
    enabled: bool,
    *,
    table: EndpointTable | None = None,
    access: Access = OPERATOR,
    if_match: Versions = None,
    timeout: float = 30.0,
) -> Endpoint:
    """Enable or disable ``endpoint_id`` and return it as saved."""
    current = _for_change(config, endpoint_id, "enabling or disabling an endpoint", table=table, access=access,
                          if_match=if_match, timeout=timeout)
    changed = set_enabled(current, enabled, now_ms=max(SYSTEM.now_ms(), current.updated_at + 1))
    save_endpoint(config, changed, timeout=timeout)
    return changed


def remove_endpoint(
    config: Config, endpoint_id: str, *, table: EndpointTable | None = None, access: Access = OPERATOR,
    if_match: Versions = None, timeout: float = 30.0,
) -> Endpoint:
    """Remove ``endpoint_id`` (write its tombstone) and return what was registered.
    Workers dead-letter its pending retries as ``endpoint_removed``."""
    removed = _for_change(config, endpoint_id, "removing an endpoint", table=table, access=access,
                          if_match=if_match, timeout=timeout)
    delete_endpoint(config, endpoint_id, timeout=timeout)
    return removed


def rotate_secret(
    config: Config,
    endpoint_id: str,
    *,
    secret: str | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    table: EndpointTable | None = None,
    access: Access = OPERATOR,
    if_match: Versions = None,
    timeout: float = 30.0,
) -> Endpoint:
    """Give ``endpoint_id`` a new secret (see :func:`rotated`), save it and return the
    endpoint, whose ``secret`` is the new one: show it once."""
    # Validate the inputs before reading the whole topic.
    _validate_grace(grace_seconds)
    if secret is not None:
        validate_secret(secret)
    current = _for_change(config, endpoint_id, "rotating a secret", table=table, access=access,
                          if_match=if_match, timeout=timeout)
    changed = rotated(current, secret=secret, grace_seconds=grace_seconds,
                      now_ms=max(SYSTEM.now_ms(), current.updated_at + 1))
    save_endpoint(config, changed, timeout=timeout)
    return changed
