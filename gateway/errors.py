"""The gateway's errors: one tree, drawn here, and every error the gateway raises is in it.

A branch says what kind of trouble it is, and the branch is all the faces read: the HTTP
API turns it into a status and the command line into an exit code, each in one place
(``gateway/api/_errors.py``, ``gateway/cli.py``), never by an error's name or by whether
it has a field. ``message`` says what was wrong, with the value, and what to do;
``field`` names the input at fault as the library names it (``bot_id``, ``since``,
``cursor``), or is None when no single input is::

    GatewayError
     ├── InputError (ValueError)          a value given is refused     API 422, CLI exit 1 (2 for a flag)
     │    ├── ConfigError                 a setting (GATEWAY_* or its flag)
     │    ├── InvalidEvent                an event not of the documented shape
     │    ├── InvalidSecret               a signing secret that is not whsec_<base64>
     │    ├── WebhookVerificationError    a request that is not an authentic, fresh webhook
     │    ├── DecodeError                 bytes that are not a record the gateway reads
     │    ├── BlockedDestination          an address the SSRF guard refuses
     │    └── PreconditionRequired        a write without the version it changes        API 428
     ├── NotFound (LookupError)           no endpoint, dead letter or job of that id    API 404
     ├── Conflict                         the state forbids it now (a replay runs)      API 409
     │    ├── PreconditionFailed          the version given is not the current one      API 412
     │    └── RateLimited                 too many requests of this caller at once      API 429
     ├── Unauthorized                     no credentials, or not ones it knows          API 401
     ├── Forbidden                        known credentials, out of their scope         API 403
     ├── Unavailable                      Kafka, a topic, the registry, a port, the bundled
     │    │                               broker: what the gateway needs did not answer API 503
     │    ├── RegistryUnavailable         the schema registry did not answer
     │    ├── SchemaPending               a writer schema not fetched yet (its partition waits)
     │    ├── PublishError                the broker did not acknowledge an event
     │    └── NotVisible                  written and acknowledged, not read back yet  API 504
     ├── Stopping                         the process stopped under the work: it is left for
     │    │                               the next owner of its record
     │    └── SenderClosed                a send after the sender closed
     ├── LocalLimit                       the gateway's own limit held the work back: no
     │    │                               request made, the delivery is deferred
     │    └── LookupQueued                a name lookup waits behind its domain's others
     └── Internal                         the gateway itself failed (a bug)             API 500
          └── EncodeError                 a record that does not fit its own schema

Everything a user can do something about is one of the first six branches; ``Stopping``,
``LocalLimit`` and ``Internal`` are the pipeline's own (the record stays unsettled, the
delivery is deferred, or it is dead-lettered as ``internal_error``).
"""

from __future__ import annotations

__all__ = [
    "BlockedDestination",
    "ConfigError",
    "Conflict",
    "DecodeError",
    "EncodeError",
    "Forbidden",
    "GatewayError",
    "InputError",
    "Internal",
    "InvalidEvent",
    "InvalidSecret",
    "LocalLimit",
    "LookupQueued",
    "NotFound",
    "NotVisible",
    "PreconditionFailed",
    "PreconditionRequired",
    "PublishError",
    "RateLimited",
    "RegistryUnavailable",
    "SchemaPending",
    "SenderClosed",
    "Stopping",
    "Unauthorized",
    "Unavailable",
    "WebhookVerificationError",
]


class GatewayError(Exception):
    """Something the gateway refuses or cannot do, in words a user can act on."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        """The input at fault, as the library names it; None when no single input is."""


class InputError(GatewayError, ValueError):
    """A value given (a flag, a field of a request, a setting, a record) is refused."""


class ConfigError(InputError):
    """A setting has a value the gateway cannot use; the message names it and the value."""


class InvalidEvent(InputError):
    """An event that does not have the documented shape. Names the field and the value."""

    def __init__(self, field: str | None, value: object, problem: str, message: str) -> None:
        super().__init__(message, field=field)
        self.value = value
        self.problem = problem


class InvalidSecret(InputError):
    """A signing secret that is not ``whsec_`` followed by base64. Never shows the secret."""

    def __init__(self, message: str, *, field: str | None = "secret") -> None:
        super().__init__(message, field=field)


class WebhookVerificationError(InputError):
    """The request is not an authentic, fresh webhook; the message says which check failed."""


class DecodeError(InputError):
    """Bytes that are not a record this gateway can read; the message says why."""


class BlockedDestination(InputError):
    """The destination policy refuses an address (the SSRF guard); the message says which and why."""

    def __init__(self, message: str, *, field: str | None = "url") -> None:
        super().__init__(message, field=field)


class PreconditionRequired(InputError):
    """A change that must name the version it changes (``If-Match``) did not."""


class NotFound(GatewayError, LookupError):
    """Nothing has the id asked for (an endpoint, a dead letter, a replay job)."""


class Conflict(GatewayError):
    """The request is fine, but the state forbids it now (another replay is running)."""


class PreconditionFailed(Conflict):
    """A change named a version of the record that is no longer the current one: someone
    changed (or removed) it since it was read. Read it again, then decide."""


class RateLimited(Conflict):
    """The caller has too many requests in progress; ``retry_after`` says when to retry."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(GatewayError):
    """No credentials were given, or not ones this process accepts."""


class Forbidden(GatewayError):
    """The credentials are known, but what they ask is outside their scope (another bot's
    endpoint, a write with a read-only token)."""


class Unavailable(GatewayError):
    """What the gateway needs did not answer or is not there: Kafka, a topic, the schema
    registry, a port, the bundled broker. Trying again later may work."""

    @classmethod
    def no_broker(cls, bootstrap_servers: str, why: str) -> Unavailable:
        """No broker of the cluster at ``bootstrap_servers`` answered, for this reason."""
        return cls(f"no Kafka broker answered at {bootstrap_servers}: {why}")


class RegistryUnavailable(Unavailable):
    """The schema registry could not answer; the record may be fine: try again later."""


class SchemaPending(Unavailable):
    """The record's writer schema is not known yet and was not fetched (``fetch=False``)."""

    def __init__(self, schema_id: int) -> None:
        super().__init__(f"schema id {schema_id} is not fetched yet")
        self.schema_id = schema_id


class PublishError(Unavailable):
    """The broker did not acknowledge an event; the message says which and why."""


class NotVisible(Unavailable):
    """A write was acknowledged by the broker, but this process's table did not show it
    within its bound: it is saved, and reads show it shortly."""


class Stopping(GatewayError):
    """The process stopped under the work: nothing was done, the record stays unsettled
    and its next owner does it."""


class SenderClosed(Stopping):
    """A send after the HTTP sender closed: nothing was attempted."""


class LocalLimit(GatewayError):
    """The gateway's own limit held the work back: no request was made, and the delivery
    is deferred (no attempt spent)."""


class LookupQueued(LocalLimit):
    """A name lookup waits behind the lookups of its registrable domain (the per-domain
    cap), longer than a delivery may wait for it, or the domain's queue is full."""


class Internal(GatewayError):
    """The gateway itself failed: a bug, or a record it cannot write."""


class EncodeError(Internal):
    """A record that does not fit its schema; the message names the schema."""
