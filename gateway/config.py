"""The one configuration object, and the table of settings behind it.

Every setting has one entry in ``SETTINGS``: its field on :class:`Config`, its
``GATEWAY_*`` environment variable, its command-line flag (none for a secret: a flag
shows in the process list), its parser and its help. The CLI builds its options from
that table, and :meth:`Config.from_env` reads the same variables, so a setting cannot be
spelled two ways. No ``GATEWAY_*`` variable is read anywhere but through this table
(:meth:`Config.from_env`, :func:`read_setting`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "SETTINGS", "SOCKET_TIMEOUT_MS", "Config", "Setting", "given_settings", "parse_delays", "read_setting", "setting",
]


def parse_delays(text: str) -> tuple[int, ...]:
    """Parse retry delays such as ``"60,300,900"`` or ``"1m,5m,15m"`` into whole seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    delays: list[int] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = units.get(part[-1], 0)
        number = part[:-1] if scale else part
        try:
            seconds = int(number) * (scale or 1)
        except ValueError:
            raise ConfigError(
                f"retry delay {part!r} is not a whole number of seconds "
                "(write e.g. 60,300,900 or 1m,5m,15m)"
            ) from None
        if seconds < 1:
            raise ConfigError(f"retry delay {part!r} must be at least 1 second")
        delays.append(seconds)
    if not delays:
        raise ConfigError(f"retry delays {text!r} name no delay (write e.g. 60,300,900)")
    if len(set(delays)) != len(delays):
        raise ConfigError(f"retry delays {text!r} repeat a delay; each tier needs its own topic")
    return tuple(delays)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{text!r} is not a boolean (use true or false)")


def _parse_networks(
    text: str,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{part!r} is not a network in CIDR form (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{text!r} must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise ConfigError(f"{text!r} is not a TCP port (1-65535)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{text!r} must be greater than 0")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{text!r} is not between 0 and 1")
    return value


def _duration(text: str) -> int:
    delays = parse_delays(text)
    if len(delays) != 1:
        raise ConfigError(f"{text!r} is not one duration (write e.g. 7d or 24h)")
    return delays[0]


def _replication_factor(text: str) -> int | None:
    if text.strip().lower() in ("", "auto"):
        return None
    return _positive_int(text)


def _group_protocol(text: str) -> str:
    value = text.strip().lower()
    if value not in ("classic", "consumer"):
        raise ConfigError(f"{text!r} is not a group protocol (classic or consumer)")
    return value


def _optional_str(text: str) -> str | None:
    return text.strip() or None


_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _instance_id(text: str) -> str | None:
    value = text.strip()
    if value and not _INSTANCE_ID.fullmatch(value):
        raise ConfigError(f"{text!r} is not an instance id (letters, digits, '.', '_', '-'; at most 200)")
    return value or None


def _optional_positive_int(text: str) -> int | None:
    """A whole number of at least 1; empty: None (the setting's own choice)."""
    return _positive_int(text) if text.strip() else None


def _port_or_any(text: str) -> int:
    if text.strip() == "0":
        return 0  # any free port
    return _port(text)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(text: str) -> str | None:
    value = text.strip().lower()
    if not value:
        return None
    if value not in _LOG_LEVELS:
        raise ConfigError(f"{text!r} is not a log level ({', '.join(_LOG_LEVELS)})")
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower() or "text"
    if value not in ("text", "json"):
        raise ConfigError(f"{text!r} is not a log format (text or json)")
    return value


SOCKET_TIMEOUT_MS = 30_000
"""librdkafka's ``socket.timeout.ms`` for every client: how long a request may go
unanswered before its connection is closed and it is sent again (see ``kafka_common``)."""


@dataclass(frozen=True)
class Setting:
    """One configurable value: where it lives and how it is read."""

    name: str
    """Field name on :class:`Config`."""
    flag: str | None
    """Command-line flag, e.g. ``--bootstrap``; None for a secret (the environment only)."""
    parse: Callable[[str], Any]
    """Turns the text of a flag or environment variable into the value."""
    help: str

    @property
    def env(self) -> str:
        return "GATEWAY_" + self.name.upper()

    def read(self, environ: Mapping[str, str] | None = None) -> Any:
        """The value of this setting's variable in ``environ`` (the process's by default),
        parsed; None when it is not set. A bad value is a :class:`ConfigError` naming it."""
        text = (os.environ if environ is None else environ).get(self.env)
        if text is None:
            return None
        try:
            return self.parse(text)
        except ConfigError as exc:
            raise ConfigError(f"{self.env}: {exc}", field=self.name) from None


SETTINGS: tuple[Setting, ...] = (
    Setting("bootstrap_servers", "--bootstrap", str.strip, "Kafka bootstrap servers, host:port[,…]."),
    Setting("topic_prefix", "--topic-prefix", str.strip, "Prefix of every topic name."),
    Setting("retry_delays", "--retry-delays", parse_delays,
            "Retry tier delays in seconds (or with s/m/h), comma-separated."),
    Setting("partitions", "--partitions", _positive_int,
            "Partition count used by `topics create` (bounds parallelism)."),
    Setting("replication_factor", "--replication-factor", _replication_factor,
            "Copies of each topic `topics create` makes: auto (3, or one per broker on a smaller "
            "cluster) or a number."),
    Setting("schema_registry_url", "--schema-registry-url", _optional_str,
            "Confluent schema registry URL; without it records use Avro single-object encoding."),
    Setting("group_id", "--group-id", str.strip,
            "Consumer group id prefix (default: the topic prefix); each tier consumes in its "
            "own group under it."),
    Setting("metrics_port", "--metrics-port", _port, "Port of the /metrics endpoint."),
    Setting("concurrency", "--concurrency", _positive_int,
            "Records in progress per worker process, across all partitions (the in-flight budget: "
            "one endpoint alone may use all of it; while others wait, each gets its fair share)."),
    Setting("endpoint_concurrency", "--endpoint-concurrency", _positive_int,
            "Requests in flight to one endpoint at once."),
    Setting("request_timeout", "--request-timeout", _positive_float,
            "Seconds a webhook request may take, connect to last byte."),
    Setting("endpoint_wait", "--endpoint-wait", _positive_float,
            "While others wait for room: the work an endpoint keeps waiting for its connections, in "
            "seconds of its measured pace (beyond that and its fair share, deliveries are deferred, no "
            "attempt spent); and the longest a delivery waits for its rate limit's slot."),
    Setting("circuit_failures", "--circuit-failures", _positive_int,
            "Consecutive failures (5xx, 408, 429, timeouts, refused connections) that open an "
            "endpoint's circuit."),
    Setting("circuit_failure_rate", "--circuit-failure-rate", _fraction,
            "Share of an endpoint's last 20 requests that, failed, opens its circuit too (0 turns "
            "this rule off; consecutive failures open it either way)."),
    Setting("circuit_open_seconds", "--circuit-open", _positive_float,
            "Seconds an endpoint's circuit stays open before a probe (jittered; doubles after each "
            "failed probe, up to 5 minutes)."),
    Setting("defer_delays", "--defer-delays", parse_delays,
            "Delays of the deferral topics, comma-separated (a delivery moves to a longer one "
            "after every three deferrals)."),
    Setting("defer_max_age", "--defer-max-age", _duration,
            "Longest a delivery may stay deferred before it is dead-lettered as deferral_expired."),
    Setting("max_response_bytes", "--max-response-bytes", _positive_int,
            "Bytes of a response body read; the rest is discarded."),
    Setting("max_record_bytes", "--max-record-bytes", _positive_int,
            "Largest event record accepted; larger ones are dead-lettered as invalid."),
    Setting("shutdown_timeout", "--shutdown-timeout", _positive_float,
            "Seconds a stopping worker waits for in-flight deliveries."),
    Setting("session_timeout_ms", "--session-timeout-ms", _optional_positive_int,
            "Kafka consumer session timeout; a dead worker's partitions move after it. Unset, "
            "each worker chooses it from the cluster when it starts: 10 s on a single broker, "
            "else three times the brokers' broker.session.timeout.ms (27 s on Kafka's defaults; "
            "30 s if they do not say). Set by hand, keep it well above broker.session.timeout.ms: "
            "a dead broker stalls offset commits until it is fenced, and heartbeats wait behind them."),
    Setting("group_protocol", "--group-protocol", _group_protocol,
            "Consumer group protocol: classic, or consumer (KIP-848, Kafka 4.0+; the broker then "
            "sets the session timeout)."),
    Setting("instance_id", "--instance-id", _instance_id,
            "Static group membership (Apache Kafka only): a name unique to this worker that it "
            "keeps across restarts (a StatefulSet's pod name). A worker restarted with it "
            "within its session, even after kill -9, takes its partitions back at once instead "
            "of after the session timeout; a worker stopped for good hands them on only after "
            "it. With "
            "--workers N, worker i gets NAME-i."),
    Setting("max_poll_interval_ms", "--max-poll-interval-ms", _positive_int,
            "Longest gap between two polls before Kafka evicts a worker from its group; the "
            "worker polls on whatever it waits for."),
    Setting("reader_check", "--reader-check", _positive_float,
            "Seconds between two checks that some process reads each tier this one does not run."),
    Setting("fetch_wait_ms", "--fetch-wait-ms", _positive_int,
            "Longest a fetch waits for new records (latency when idle; Tansu always waits it out)."),
    Setting("record_attempts", "--record-attempts", _parse_bool,
            "Write every attempt, successful or not, to the attempts topic (the delivery history)."),
    Setting("attempts_retention", "--attempts-retention", _duration,
            "How long `topics create` makes the attempts topic keep the history (e.g. 7d, 24h)."),
    Setting("allow_private_networks", "--allow-private-networks", _parse_bool,
            "Deliver to loopback/private/link-local addresses (demo and tests only)."),
    Setting("allowed_networks", "--allowed-networks", _parse_networks,
            "Non-public networks (CIDR, comma-separated) that deliveries may reach."),
    Setting("api_host", "--api-host", str.strip,
            "Address the management API serves on; off loopback it needs GATEWAY_API_TOKENS."),
    Setting("api_port", "--api-port", _port_or_any, "Port of the management API (0: any free port)."),
    Setting("api_history_size", "--api-history-size", _positive_int,
            "Newest attempts the API keeps in memory for /v1/deliveries."),
    Setting("api_dead_letters_size", "--api-dead-letters-size", _positive_int,
            "Newest dead letters the API keeps in memory for /v1/dead-letters."),
    Setting("api_concurrency", "--api-concurrency", _positive_int,
            "Connections and requests the API serves at once (uvicorn's limit_concurrency); beyond it, 503."),
    Setting("api_header_timeout", "--api-header-timeout", _positive_float,
            "Seconds a client of the API has to send a request's head, and again its body; then the "
            "connection is closed (the head) or answered 408 (the body)."),
    Setting("api_keepalive", "--api-keepalive", _positive_float,
            "Seconds an idle keep-alive connection to the API stays open (uvicorn's timeout_keep_alive)."),
    Setting("api_max_header_bytes", "--api-max-header-bytes", _positive_int,
            "Largest request head (request line and headers) the API reads: a larger one is answered 431 "
            "(400 from h11, its max incomplete event size, when it comes in pieces) and the connection closed."),
    Setting("api_max_body_bytes", "--api-max-body-bytes", _positive_int,
            "Largest request body the API reads; a larger one is answered 413 before its token is checked."),
    Setting("api_tokens", None, _comma_list,
            "Bearer tokens the management API accepts, comma-separated, 16 characters at least; "
            "admin:TOKEN, read:TOKEN or bot:BOT_ID:TOKEN give one its scope (plain: admin), and "
            "key:SECRET the key minted bot tokens are signed with (default: derived from the admin tokens)."),
    Setting("log_level", "--log-level", _log_level,
            "debug, info, warning or error (default: info for `up`, `run` and `api`, warning otherwise)."),
    Setting("log_format", None, _log_format, "text (key=value) or json: how log lines are written."),
    Setting("listen_secret", "--secret", _comma_list,
            "`gateway listen`: the signing secrets to verify with, comma-separated (during a rotation)."),
)


def setting(name: str) -> Setting:
    """The setting of :class:`Config` field ``name``."""
    for candidate in SETTINGS:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def read_setting(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting from the environment (None when unset): for what must be known before
    a whole :class:`Config` can be built (the log level, for one)."""
    return setting(name).read(environ)


def given_settings(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> set[str]:
    """The settings chosen by the user, in ``environ`` or among ``overrides`` (not None),
    rather than left at their defaults."""
    environ = os.environ if environ is None else environ
    chosen = {s.name for s in SETTINGS if s.env in environ}
    return chosen | {name for name, value in (overrides or {}).items() if value is not None}


@dataclass(frozen=True)
class Config:
    """Everything the gateway's processes are configured by. Immutable; build a new one
    with :meth:`replace`."""

    bootstrap_servers: str = "localhost:9092"
    topic_prefix: str = "webhooks"
    retry_delays: tuple[int, ...] = (60, 300, 900)
    partitions: int = 6
    replication_factor: int | None = None
    """None: three, or one per broker on a smaller cluster (see ``gateway topics create``)."""
    schema_registry_url: str | None = None
    group_id: str = ""
    """Empty: derived from the topic prefix (see :attr:`consumer_group`)."""
    metrics_port: int = 9400
    concurrency: int = 1000
    endpoint_concurrency: int = 20
    request_timeout: float = 15.0
    endpoint_wait: float = 1.0
    circuit_failures: int = 5
    circuit_failure_rate: float = 0.5
    circuit_open_seconds: float = 10.0
    defer_delays: tuple[int, ...] = (5, 60, 600)
    defer_max_age: int = 3600
    max_response_bytes: int = 64 * 1024
    max_record_bytes: int = 1024 * 1024
    shutdown_timeout: float = 30.0
    session_timeout_ms: int | None = None
    """None: chosen from the cluster when a worker starts (``streaming.settle_session``)."""
    group_protocol: str = "classic"
    instance_id: str | None = None
    """Static group membership (``group.instance.id``); None: dynamic."""
    max_poll_interval_ms: int = 300_000
    fetch_wait_ms: int = 25
    reader_check: float = 30.0
    record_attempts: bool = True
    attempts_retention: int = 7 * 86400
    """Seconds."""
    allow_private_networks: bool = False
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=tuple
    )
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_history_size: int = 100_000
    api_dead_letters_size: int = 20_000
    api_concurrency: int = 200
    api_header_timeout: float = 10.0
    api_keepalive: float = 5.0
    api_max_header_bytes: int = 16 * 1024
    api_max_body_bytes: int = 64 * 1024
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Never shown: a repr of the configuration leaves them out."""
    log_level: str | None = None
    """None: the command's default (info for long-running commands, warning otherwise)."""
    log_format: str = "text"
    listen_secret: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.topic_prefix or any(c in self.topic_prefix for c in "/\\ "):
            raise ConfigError(f"topic prefix {self.topic_prefix!r} is not a usable topic name", field="topic_prefix")
        if not self.bootstrap_servers:
            raise ConfigError("bootstrap servers are empty (set GATEWAY_BOOTSTRAP_SERVERS)",
                              field="bootstrap_servers")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, defaults: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> Config:
        """Read ``GATEWAY_*`` variables over ``defaults`` (a command's own defaults, such as
        ``gateway up``'s); ``overrides`` (already parsed values, flags) win over both."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = dict(defaults or {})
        for setting in SETTINGS:
            if setting.env in environ:
                values[setting.name] = setting.read(environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ConfigError as exc:
            if exc.field == "topic_prefix" and "topic_prefix" not in overrides:
                raise ConfigError(f"GATEWAY_TOPIC_PREFIX: {exc}", field="topic_prefix") from None
            raise

    @property
    def consumer_group(self) -> str:
        """Prefix of the gateway's consumer groups. Derived from the topic prefix unless
        set, so two gateways with different topics never share (and rebalance) a group."""
        return self.group_id or f"{self.topic_prefix}-gateway"

    def to_env(self) -> dict[str, str]:
        """The ``GATEWAY_*`` variables that rebuild this configuration in another process."""
        env = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(map(str, value))
            else:
                text = str(value)
            env[setting.env] = text
        return env

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def kafka_common(self) -> dict[str, Any]:
        """librdkafka settings every client of the gateway shares."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            # Topics are created explicitly (`gateway topics create`); a typo must not
            # silently create a new, empty topic.
            "allow.auto.create.topics": False,
            # librdkafka's own log lines go through Python logging, one line each.
            "logger": logging.getLogger("gateway.kafka"),
            # A request unanswered this long closes its connection and is sent again on a
            # new one. librdkafka's 60 s default is what a half-open connection (a broker's
            # machine gone, a firewall dropping state) costs before deliveries resume:
            # tests/test_cluster_network.py measured it. 30 s is the Java clients'
            # request.timeout.ms; requests that may rightly wait longer (a JoinGroup waits
            # for the rebalance) get their own timeouts from librdkafka.
            "socket.timeout.ms": SOCKET_TIMEOUT_MS,
        }
