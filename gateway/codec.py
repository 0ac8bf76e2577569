"""The one codec: Avro records to bytes and back, in either of the two wire formats.

* Without a schema registry: Avro single-object encoding, as the Avro specification
  defines it: ``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
  schema's Parsing Canonical Form, then the Avro binary body. The fingerprint is looked up
  among the bundled schemas in ``avro/``.
* With a schema registry (``GATEWAY_SCHEMA_REGISTRY_URL``): the Confluent framing (magic
  byte ``0``, 4-byte big-endian schema id, body), written by confluent-kafka's
  ``AvroSerializer`` under the record-name subject strategy (several event types share
  the events topic).

The decoder accepts both, whatever this process writes, and reads with the bundled
schema of the same full name as reader schema, so records written under an older or newer
compatible schema resolve. Everything it cannot read raises :class:`DecodeError`, whose
message says what was wrong with the bytes.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from .errors import DecodeError, EncodeError, RegistryUnavailable, SchemaPending

__all__ = [
    "SINGLE_OBJECT_MAGIC",
    "Codec",
    "SchemaSet",
    "schema_dir",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0


def schema_dir() -> Path:
    """The ``avro/`` folder: inside the installed package, or at the root of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "avro", here.parent / "avro"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no avro/ schema folder beside {here} or its parent")


@dataclass(frozen=True)
class _Schema:
    name: str
    parsed: Any
    """fastavro's parsed form, used to read and write."""
    canonical: str
    """Parsing Canonical Form: self-contained JSON, what fingerprints are taken of."""
    fingerprint: bytes
    full: str = ""
    """Self-contained JSON with docs and defaults: what is registered in a schema registry."""


class SchemaSet:
    """The bundled schemas, by full name and by CRC-64-AVRO fingerprint."""

    # Records that reference another by name come after it.
    ORDER = (
        "gateway.events.Message",
        "gateway.events.RateMessage",
        "gateway.events.Ticket",
        "gateway.events.CreateLead",
        "gateway.Endpoint",
        "gateway.Delivery",
        "gateway.DeadLetter",
        "gateway.Replay",
        "gateway.DeliveryAttempt",
        "gateway.Circuit",
    )

    def __init__(self, folder: Path | None = None) -> None:
        folder = folder or schema_dir()
        named: dict[str, Any] = {}
        raws: dict[str, Any] = {}
        self.by_name: dict[str, _Schema] = {}
        self.by_fingerprint: dict[bytes, _Schema] = {}
        for name in self.ORDER:
            raw = json.loads((folder / f"{name}.avsc").read_text())
            raws[name] = raw
            parsed = parse_schema(raw, named_schemas=named)
            full = json.dumps(_inline(raw, raws, set()))
            # The fingerprint is of the self-contained form: references to other records
            # expanded, as any other Avro implementation computes it.
            canonical = to_parsing_canonical_form(parse_schema(json.loads(full)))
            schema = _Schema(
                name, parsed, canonical, bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")), full
            )
            self.by_name[name] = schema
            self.by_fingerprint[schema.fingerprint] = schema
        self._load_history(folder / "history")

    def _load_history(self, folder: Path) -> None:
        """Earlier versions of the schemas, as writer schemas only: records written under
        them (in single-object encoding, which names its writer by fingerprint alone) are
        read with the current schema of the same name, by Avro schema resolution. Every
        change to a schema leaves the version it replaces here, self-contained, named
        ``{full name}.{fingerprint}.avsc``."""
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.avsc")):
            full = path.read_text()
            raw = json.loads(full)
            name = f"{raw['namespace']}.{raw['name']}" if "namespace" in raw else raw["name"]
            if name not in self.by_name:
                raise ValueError(f"{path.name}: no current schema named {name}")
            parsed = parse_schema(raw, named_schemas={})
            canonical = to_parsing_canonical_form(parsed)
            printed = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
            if path.name != f"{name}.{printed.hex()}.avsc":
                raise ValueError(f"{path.name}: its fingerprint is {printed.hex()}")
            self.by_fingerprint.setdefault(printed, _Schema(name, parsed, canonical, printed, full))

    def __getitem__(self, name: str) -> _Schema:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no bundled schema named {name!r}") from None


def _inline(node: Any, raws: Mapping[str, Any], defined: set[str]) -> Any:
    """``node`` with references to other bundled records replaced by their definitions."""
    if isinstance(node, str):
        if node in raws and node not in defined:
            defined.add(node)
            return _inline(raws[node], raws, defined)
        return node
    if isinstance(node, list):
        return [_inline(item, raws, defined) for item in node]
    if isinstance(node, dict):
        if node.get("type") == "record":
            defined.add(f"{node['namespace']}.{node['name']}" if "namespace" in node else node["name"])
        return {key: _inline(value, raws, defined) if key in ("type", "fields", "items") else value
                for key, value in node.items()}
    return node


@cache
def _bundled() -> SchemaSet:
    return SchemaSet()


class Codec:
    """Encodes and decodes the gateway's Avro records. One per process: it caches schemas,
    and with a registry it holds the registry client."""

    def __init__(self, schema_registry_url: str | None = None) -> None:
        self.schemas = _bundled()
        self._registry: Any = None
        self._serializers: dict[str, Any] = {}
        self._writers_by_id: dict[int, _Schema] = {}
        self._refused_ids: dict[int, str] = {}
        self._lock = threading.Lock()
        if schema_registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            # No retries inside the client: a worker retries a lookup itself, off its event
            # loop, with the partition paused; a tool reports the outage.
            self._registry = SchemaRegistryClient.new_client(
                {"url": schema_registry_url, "timeout": 10, "max.retries": 0})

    @property
    def uses_registry(self) -> bool:
        return self._registry is not None

    def close(self) -> None:
        """Close the registry client's connections (a codec without one has none)."""
        if self._registry is not None:
            self._registry.close()

    def encode(self, schema_name: str, record: Mapping[str, Any], *, topic: str) -> bytes:
        """Encode ``record`` with the bundled schema ``schema_name`` for ``topic``."""
        schema = self.schemas[schema_name]
        if self._registry is not None:
            return self._encode_confluent(schema, record, topic)
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MAGIC)
        buf.write(schema.fingerprint)
        try:
            fastavro.schemaless_writer(buf, schema.parsed, record, strict=True)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise EncodeError(f"record does not fit schema {schema_name}: {exc}") from exc
        return buf.getvalue()

    def _registered(self, schema: _Schema) -> Any:
        """The registry's view of a bundled schema: one object, so that the client's cache
        answers for it once it was registered (by :meth:`register_schemas`)."""
        from confluent_kafka.schema_registry import Schema

        return Schema(schema.full, schema_type="AVRO")

    def register_schemas(self) -> None:
        """With a registry: register every bundled schema now (blocking; the registry may
        be asked for each). Encoding afterwards never asks the registry: a worker calls
        this before it starts, so an outage of the registry later cannot make it wait (on
        its event loop) to write a retry, a dead letter or the delivery history.

        Raises :class:`RegistryUnavailable` when the registry cannot register them."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if self._registry is None:
            return
        for schema in self.schemas.by_name.values():
            try:
                self._registry.register_schema_full_response(schema.name, self._registered(schema))
            except SchemaRegistryError as exc:
                raise RegistryUnavailable(f"the schema registry refused {schema.name}: HTTP {exc.http_status_code}: "
                                          f"{exc.error_message}") from exc
            except Exception as exc:  # httpx's transport errors, timeouts
                raise RegistryUnavailable(f"the schema registry did not answer registering {schema.name}: "
                                          f"{type(exc).__name__}: {exc}") from exc

    def _serializer(self, schema: _Schema) -> Any:
        serializer = self._serializers.get(schema.name)
        if serializer is None:
            from confluent_kafka.schema_registry import record_subject_name_strategy
            from confluent_kafka.schema_registry.avro import AvroSerializer

            with self._lock:
                serializer = self._serializers.setdefault(
                    schema.name,
                    AvroSerializer(
                        self._registry,
                        self._registered(schema),
                        conf={"subject.name.strategy": record_subject_name_strategy},
                    ),
                )
        return serializer

    def _encode_confluent(self, schema: _Schema, record: Mapping[str, Any], topic: str) -> bytes:
        from confluent_kafka.serialization import MessageField, SerializationContext

        serializer = self._serializer(schema)
        try:
            data: bytes = serializer(dict(record), SerializationContext(topic, MessageField.VALUE))
        except Exception as exc:  # the serializer wraps fastavro's errors in its own types
            raise EncodeError(f"record does not fit schema {schema.name}: {exc}") from exc
        return data

    def decode(self, data: bytes | None, *, fetch: bool = True) -> tuple[str, dict[str, Any]]:
        """Decode either wire format; returns the record's full schema name and the record.

        A Confluent-framed record names its writer schema by registry id. An id not seen
        yet is fetched from the registry here (blocking), unless ``fetch`` is False: then
        :class:`SchemaPending` is raised and the caller fetches it off its event loop
        (:meth:`fetch_schema`). A registry that cannot answer raises
        :class:`RegistryUnavailable`, never :class:`DecodeError`: the bytes may be fine.
        """
        if not data:
            raise DecodeError("empty value (a tombstone or an empty record), not an Avro record")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError(f"single-object header cut short: {len(data)} bytes")
            writer = self.schemas.by_fingerprint.get(data[2:10])
            if writer is None:
                raise DecodeError(
                    f"single-object record with unknown schema fingerprint {data[2:10].hex()}; "
                    "it was not written with one of the gateway's schemas"
                )
            return writer.name, self._read(data, 10, writer)
        if data[0] == CONFLUENT_MAGIC and len(data) >= 5:
            (schema_id,) = struct.unpack(">I", data[1:5])
            writer = self._writers_by_id.get(schema_id)
            if writer is None:
                if self._registry is None:
                    raise DecodeError(
                        f"Confluent-framed record (schema id {schema_id}) but no schema registry is "
                        "configured (set GATEWAY_SCHEMA_REGISTRY_URL)"
                    )
                refused = self._refused_ids.get(schema_id)
                if refused is not None:
                    raise DecodeError(refused)
                if not fetch:
                    raise SchemaPending(schema_id)
                writer = self.fetch_schema(schema_id)
            return writer.name, self._read(data, 5, writer)
        raise DecodeError(
            f"unknown framing: starts with {data[:4].hex()}, neither Avro single-object "
            f"encoding (c301) nor the Confluent framing (00 + schema id); {len(data)} bytes"
        )

    def fetch_schema(self, schema_id: int) -> _Schema:
        """Look a writer schema up in the registry (blocking) and keep it.

        Raises :class:`RegistryUnavailable` when the registry does not answer or answers
        with anything but the schema or a plain "no such schema" (try again later), and
        :class:`DecodeError` when the id is not registered or is not one of the gateway's
        records (remembered: those bytes will never decode).
        """
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        writer = self._writers_by_id.get(schema_id)
        if writer is not None:
            return writer
        try:
            registered = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                self._refuse(schema_id, f"schema id {schema_id} is not in the registry: {exc.error_message}")
            raise RegistryUnavailable(
                f"the schema registry answered HTTP {exc.http_status_code} for schema id {schema_id}: "
                f"{exc.error_message}"
            ) from exc
        except Exception as exc:  # httpx's transport errors, timeouts, bad JSON
            raise RegistryUnavailable(
                f"the schema registry did not answer for schema id {schema_id}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            parsed = parse_schema(json.loads(registered.schema_str))
            canonical = to_parsing_canonical_form(parsed)
        except Exception as exc:
            self._refuse(schema_id, f"schema id {schema_id} is not a usable Avro schema: {exc}")
        name = parsed.get("name") if isinstance(parsed, dict) else None
        if name not in self.schemas.by_name:
            self._refuse(schema_id, f"schema id {schema_id} is {name!r}, not one of the gateway's records")
        writer = _Schema(name, parsed, canonical, b"")
        self._writers_by_id[schema_id] = writer
        return writer

    def _refuse(self, schema_id: int, why: str) -> NoReturn:
        self._refused_ids[schema_id] = why
        raise DecodeError(why)

    def _read(self, data: bytes, offset: int, writer: _Schema) -> dict[str, Any]:
        reader = self.schemas.by_name[writer.name]
        buf = io.BytesIO(data)
        buf.seek(offset)
        try:
            record = fastavro.schemaless_reader(
                buf, writer.parsed, reader.parsed if reader is not writer else None
            )
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{writer.name}: a string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except (EOFError, StopIteration, IndexError) as exc:
            raise DecodeError(f"{writer.name}: record is truncated ({len(data)} bytes)") from exc
        except Exception as exc:  # fastavro raises assorted types on corrupt input
            raise DecodeError(f"{writer.name}: corrupt Avro body: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(
                f"{writer.name}: {len(data) - buf.tell()} bytes left over after the record "
                "(corrupt, or written with another schema)"
            )
        if not isinstance(record, dict):
            raise DecodeError(f"{writer.name}: decoded to {type(record).__name__}, not a record")
        return record
