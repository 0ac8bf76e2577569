"""Who is asking, and what they may see and do: the scopes every operation checks.

The HTTP API turns a bearer token into an :class:`Access`; the command line acts as the
:data:`OPERATOR` (whoever can reach Kafka with the gateway's settings can already read
and write every topic, so the tools give them everything). Every operation of this
package takes the caller's access and applies it itself, so a face cannot forget it:

* ``admin``: everything, minting bot tokens included.
* ``read``: every read (endpoints with secrets masked, the history, dead letters, event
  types, stats); no write, no send.
* ``bot``: one bot's endpoints (read, create, change, remove, test sends), its delivery
  history, its dead letters (read, replay) and resends of its deliveries. Anything of
  another bot is :class:`~gateway.errors.Forbidden`; a filter that names no bot is
  narrowed to its own. A dead letter that holds no delivery (an undecodable record) has
  no bot: only admin and read tokens see it.

Out of scope is always :class:`~gateway.errors.Forbidden` (403), never an empty answer
that looks like "nothing there", except where the question itself cannot tell (an event
id of another bot's event matches none of this bot's attempts).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..errors import Forbidden, InputError
from ..events import is_uuid
from ..records import Endpoint

__all__ = ["OPERATOR", "Access", "Scope"]


class Scope(StrEnum):
    """What a caller may do."""

    ADMIN = "admin"
    """Everything."""
    READ = "read"
    """Every read, no write."""
    BOT = "bot"
    """One bot's endpoints, history and dead letters: read, write, send."""


@dataclass(frozen=True)
class Access:
    """A caller's scope (and its bot, for ``bot``); ``subject`` names the caller in logs and
    keys its idempotency records (never a token)."""

    scope: Scope
    bot_id: str | None = None
    """The bot of a ``bot`` scope (lower case); None otherwise."""
    subject: str = "operator"

    def __post_init__(self) -> None:
        if self.scope is Scope.BOT:
            if not is_uuid(self.bot_id):
                raise InputError(f"a bot scope needs a bot id (a UUID), not {self.bot_id!r}", field="bot_id")
            object.__setattr__(self, "bot_id", str(self.bot_id).lower())
        elif self.bot_id is not None:
            raise InputError(f"only a bot scope names a bot, not {self.scope.value}", field="bot_id")

    @classmethod
    def for_bot(cls, bot_id: str, *, subject: str | None = None) -> Access:
        return cls(Scope.BOT, bot_id, subject or f"bot:{bot_id.lower()}")

    def __str__(self) -> str:
        return f"bot:{self.bot_id}" if self.scope is Scope.BOT else self.scope.value

    @property
    def is_admin(self) -> bool:
        return self.scope is Scope.ADMIN

    def require_admin(self, what: str) -> None:
        """Refuse anything but an admin caller."""
        if self.scope is not Scope.ADMIN:
            raise Forbidden(f"{what} needs an admin token; this one is {self}")

    def require_write(self, what: str) -> None:
        """Refuse a read-only caller: writes and sends need admin or a bot scope."""
        if self.scope is Scope.READ:
            raise Forbidden(f"{what} needs an admin or a bot token; this one is read-only")

    def sees_bot(self, bot_id: str | None) -> bool:
        """Whether this caller may see what belongs to ``bot_id`` (None: to no bot)."""
        if self.scope is not Scope.BOT:
            return True
        return bot_id is not None and bot_id.lower() == self.bot_id

    def check_bot(self, bot_id: str, *, what: str = "that bot") -> None:
        """Refuse ``bot_id`` unless this caller sees it."""
        if not self.sees_bot(bot_id):
            raise Forbidden(f"this token is scoped to bot {self.bot_id}: {what} is out of its scope")

    def check_endpoint(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint``, or :class:`~gateway.errors.Forbidden` when it is another bot's."""
        self.check_bot(endpoint.bot_id, what=f"endpoint {endpoint.id} belongs to another bot")
        return endpoint

    def bot_filter(self, requested: str | None) -> str | None:
        """The bot a query runs for: what was asked (any caller but ``bot``); for a ``bot``
        caller its own bot, and :class:`~gateway.errors.Forbidden` for another one."""
        if self.scope is not Scope.BOT:
            return requested
        if requested is not None and requested.lower() != self.bot_id:
            raise Forbidden(f"this token is scoped to bot {self.bot_id}: bot {requested!r} is out of its scope")
        return self.bot_id


OPERATOR = Access(Scope.ADMIN, subject="operator")
"""The command line, and library callers that hold the gateway's Kafka settings: admin."""
