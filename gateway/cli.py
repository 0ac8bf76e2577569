"""The ``gateway`` command line. Results go to stdout, progress and errors to stderr;
exit 0 on success, 1 when the work failed or input was refused, 2 on usage errors."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .config import SETTINGS, Config, ConfigError
from .logs import configure_logging

__all__ = ["main", "cli"]

F = TypeVar("F", bound=Callable[..., Any])


def config_options(*names: str) -> Callable[[F], F]:
    """Add the flags of the named settings to a command; they land in ``**settings``."""
    chosen = [s for s in SETTINGS if s.name in names]
    missing = set(names) - {s.name for s in chosen}
    assert not missing, f"unknown settings {missing}"

    def decorate(func: F) -> F:
        for setting in reversed(chosen):
            default = getattr(Config(), setting.name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            func = click.option(
                setting.flag,
                setting.name,
                default=None,
                metavar="VALUE",
                help=f"{setting.help} [env {setting.env}; default {shown}]",
            )(func)
        return func

    return decorate


def build_config(settings: dict[str, str | None], **fixed: Any) -> Config:
    """Environment first, then flags given on the command line, then ``fixed``."""
    overrides: dict[str, Any] = {}
    by_name = {s.name: s for s in SETTINGS}
    for name, text in settings.items():
        if text is None:
            continue
        setting = by_name[name]
        try:
            overrides[name] = setting.parse(text)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=setting.flag) from None
    try:
        return Config.from_env(**overrides, **fixed)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="webhook-gateway")
@click.option("--log-level", default=None, metavar="LEVEL",
              help="debug, info, warning or error [env GATEWAY_LOG_LEVEL; default info].")
def cli(log_level: str | None) -> None:
    """Kafka-based streaming webhook gateway.

    Platform services publish chat events as Avro records to Kafka; the gateway POSTs each
    one as signed JSON to every webhook endpoint registered for its bot, retries failures
    through the retry tiers, and dead-letters what still fails.

    Every setting can also be given as a GATEWAY_* environment variable.
    """
    configure_logging(log_level)


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True,
              help="Port to listen and advertise on, on 127.0.0.1.")
def broker(port: int) -> None:
    """Run the bundled Kafka-compatible broker (Tansu) in the foreground.

    It keeps everything in memory: stopping it loses every topic and record. Ctrl-C or
    SIGTERM stops it.
    """
    from .broker import Broker, BrokerError

    try:
        running = Broker(port=port).start()
    except BrokerError as exc:
        fail(str(exc))
        return
    click.echo(f"broker listening on {running.bootstrap} (in memory; Ctrl-C stops it)", err=True)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        running.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = running.wait()
    running.stop()
    if not stopping:
        fail(f"the broker exited by itself with code {code}")
    click.echo("broker stopped", err=True)


@cli.group()
def topics() -> None:
    """Create and check the gateway's topics."""


@topics.command("create")
@config_options("bootstrap_servers", "topic_prefix", "retry_delays", "partitions",
                "replication_factor")
def topics_create(**settings: str | None) -> None:
    """Create the events, retry tier, dead-letter and endpoints topics.

    Idempotent: topics that already exist are left as they are and reported.
    """
    from .topics import TopicsError, TopicStatus, create_topics

    config = build_config(settings)

    def report(status: TopicStatus) -> None:
        click.echo(f"{'created' if status.created else 'exists '}  {status.topic}")

    try:
        create_topics(config, on_status=report)
    except TopicsError as exc:
        fail(f"could not create topics: {exc}")


@cli.command()
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-")
@click.option("--skip-invalid", is_flag=True,
              help="Publish the valid events even when some are invalid (exit code is still 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per published event.")
@config_options("bootstrap_servers", "topic_prefix", "schema_registry_url")
def publish(source: Any, skip_invalid: bool, as_json: bool, **settings: str | None) -> None:
    """Validate events and publish them to the events topic as Avro.

    SOURCE is a file (or - for stdin) holding events in the documented JSON shape: one
    object per line, or one JSON array. An event id (UUID) and occurrence time are assigned
    unless the event carries "eventId" / "occurredAt". Each published event's id is printed
    once the broker has acknowledged it.

    If any event is invalid, nothing is published (unless --skip-invalid) and the exit
    code is 1.
    """
    import json

    from .publisher import Publisher, read_events

    config = build_config(settings)
    try:
        items = read_events(source.read())
    except UnicodeDecodeError as exc:
        fail(f"{source.name}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return
    except ValueError as exc:
        fail(f"{source.name}: {exc}")
        return
    if not items:
        fail(f"{source.name}: no events in the input")
    invalid = [item for item in items if item.error]
    for item in invalid:
        click.echo(f"error: {source.name} {item.where}: {item.error}", err=True)
    if invalid and not skip_invalid:
        fail(
            f"nothing was published: {len(invalid)} of {len(items)} events are invalid "
            "(fix them, or pass --skip-invalid to publish the valid ones)"
        )
    events = [item.event for item in items if item.event is not None]
    failed = 0
    if events:
        with Publisher(config) as publisher:
            results = publisher.publish_many(events)
        for item, result in zip((i for i in items if i.event), results, strict=True):
            if result.ok:
                if as_json:
                    click.echo(json.dumps({
                        "eventId": result.event.event_id, "event": result.event.type.value,
                        "partition": result.partition, "offset": result.offset,
                    }))
                else:
                    click.echo(result.event.event_id)
            else:
                failed += 1
                click.echo(f"error: {source.name} {item.where}: not published: {result.error}", err=True)
    sent = len(events) - failed
    click.echo(
        f"published {sent} of {len(items)} events to {config.topic_prefix}.events"
        + (f"; {len(invalid)} invalid, not published" if invalid else "")
        + (f"; {failed} not acknowledged by the broker" if failed else ""),
        err=True,
    )
    if invalid or failed:
        sys.exit(1)


def main() -> None:
    cli()
