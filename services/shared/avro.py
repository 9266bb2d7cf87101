"""The Avro codec: single-object encoding with schemas from ``schemas/``, and bounded decoding of untrusted bytes.

Owns: loading the contract (current schemas and every released version under ``schemas/released/``), the
CRC-64-AVRO fingerprint, encoding to single-object form (``C3 01`` + 8-byte little-endian fingerprint + body),
and decoding such bytes with the writer's schema resolved to the current reader schema.

Untrusted bytes are bounded before and while they are decoded (fastavro segfaults on deep recursion and grows
without limit on zero-byte array items — see shared/notes/measured-facts.md):
- schemas that are recursive, nest deeper than ``MAX_SCHEMA_DEPTH``, or let an array/map item encode to zero
  bytes are refused when the contract is loaded, so no payload can nest deeper than the schema, and every
  declared collection item costs at least one byte of input: the item count is bounded by the input size;
- the input is refused above ``max_bytes`` before any decoding, and must be consumed exactly.
Every failure is one :class:`DecodeError`.

Does not own: signatures (``envelope``) or what the records mean.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import fastavro

from services.shared.errors import ConfigurationError, DecodeError, PayloadTooLarge

SCHEMA_DIR: Final = Path(__file__).resolve().parents[2] / "schemas"
MAGIC: Final = b"\xc3\x01"
HEADER_LEN: Final = 10
MAX_SCHEMA_DEPTH: Final = 16
DEFAULT_MAX_BYTES: Final = 1 << 20

_EMPTY64 = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_TABLE: Final = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint the Avro spec calls CRC-64-AVRO."""
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def canonical_form(schema: Any) -> str:
    return str(fastavro.schema.to_parsing_canonical_form(schema))


def fingerprint(schema: Any) -> bytes:
    """8-byte little-endian CRC-64-AVRO of the schema's Parsing Canonical Form."""
    return crc64_avro(canonical_form(schema).encode("utf-8")).to_bytes(8, "little")


def _check_safe(schema: Any) -> None:
    """Refuse schemas whose data could nest without bound or hold zero-byte collection items.

    Raises:
        ConfigurationError: the schema is recursive, too deep, or has zero-byte array/map items.
    """
    defined: dict[str, Any] = {}

    def min_size(node: Any, path: tuple[str, ...]) -> int:
        if len(path) > MAX_SCHEMA_DEPTH:
            raise ConfigurationError(f"schema nests deeper than {MAX_SCHEMA_DEPTH}: {'/'.join(path)}")
        if isinstance(node, str):
            if node in ("null",):
                return 0
            if node in ("boolean", "int", "long", "float", "double", "bytes", "string"):
                return 1
            if node in path:
                raise ConfigurationError(f"recursive schemas are refused: {node} refers to itself")
            if node not in defined:
                raise ConfigurationError(f"unknown type {node}")
            return min_size(defined[node], path)
        if isinstance(node, list):
            # Every branch is checked too: ["null", "Node"] is the usual way to write a recursive type, and a
            # zero-byte collection behind a union is as dangerous as one outside it.
            for branch in node:
                min_size(branch, path)
            return 1  # a union always writes its branch index
        kind = node["type"]
        if kind == "record":
            name = node["name"]
            defined[name] = node
            return sum(min_size(f["type"], (*path, name)) for f in node["fields"])
        if kind in ("array", "map"):
            child = node["items"] if kind == "array" else node["values"]
            if min_size(child, (*path, kind)) == 0:
                raise ConfigurationError(f"{kind} items that encode to zero bytes are refused at {'/'.join(path)}")
            return 1
        if kind == "enum":
            defined[node["name"]] = node
            return 1
        if kind == "fixed":
            defined[node["name"]] = node
            return int(node["size"])
        return min_size(kind, path)  # {"type": "long", "logicalType": …}

    min_size(schema, ())


def _parse(name: str, schema: Any) -> Any:
    """Raises: ConfigurationError if ``schema`` is not a valid Avro schema or is unsafe (see ``_check_safe``)."""
    try:
        # The write hint marks the dict as parsed: without it fastavro parses the schema again on every call
        # (measured: 55 → 27 µs to write an evidence event, 48 → 22 µs to read one).
        parsed = fastavro.parse_schema(schema)
    except (fastavro.schema.SchemaParseException, ValueError, TypeError, KeyError) as exc:
        raise ConfigurationError(f"schema {name} is not a valid Avro schema: {exc}") from exc
    _check_safe(parsed)
    return parsed


@dataclass(frozen=True)
class _Writer:
    name: str
    version: int
    parsed: Any


class AvroCodec:
    """All schemas of the contract, by name (for writing) and by fingerprint (for reading)."""

    def __init__(self, *, current: Mapping[str, Any], released: Mapping[str, Mapping[int, Any]]) -> None:
        self._current: dict[str, tuple[Any, bytes]] = {}
        self._by_fingerprint: dict[bytes, _Writer] = {}
        for name, schema in current.items():
            parsed = _parse(name, schema)
            self._current[name] = (parsed, fingerprint(parsed))
            self._by_fingerprint[fingerprint(parsed)] = _Writer(name, 0, parsed)
        for name, versions in released.items():
            for version, schema in versions.items():
                parsed = _parse(f"{name} version {version}", schema)
                self._by_fingerprint.setdefault(fingerprint(parsed), _Writer(name, version, parsed))

    @classmethod
    def load(cls, directory: Path = SCHEMA_DIR) -> AvroCodec:
        """Read ``<dir>/*.avsc`` (current) and ``<dir>/released/<name>/<n>.avsc`` (every released version).

        Raises:
            ConfigurationError: a schema file is unreadable or unsafe.
        """
        try:
            current = {p.stem: json.loads(p.read_text("utf-8")) for p in sorted(directory.glob("*.avsc"))}
            released: dict[str, dict[int, Any]] = {}
            for p in sorted(directory.glob("released/*/*.avsc")):
                released.setdefault(p.parent.name, {})[int(p.stem)] = json.loads(p.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot load schemas from {directory}: {exc}") from exc
        return cls(current=current, released=released)

    def names(self) -> list[str]:
        return sorted(self._current)

    def schema(self, name: str) -> Any:
        return self._current[name][0]

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Single-object encoding of ``record`` with the current schema ``name``.

        Raises:
            ValueError: the record does not fit the schema. Records are built by our own code from validated
                models, so this is a bug, not bad input.
        """
        parsed, fp = self._current[name]
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(fp)
        fastavro.schemaless_writer(out, parsed, record, strict_allow_default=True)
        return out.getvalue()

    def decode(self, data: bytes, *, expect: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
        """Decode single-object bytes written with any released version of schema ``expect``.

        Raises:
            PayloadTooLarge: ``data`` is over ``max_bytes`` (nothing was decoded).
            DecodeError: wrong header, unknown fingerprint, another schema, malformed or trailing bytes.
        """
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"Avro payload of {len(data)} bytes is over the {max_bytes}-byte limit")
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding")
        writer = self._by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if writer is None:
            raise DecodeError("unknown schema fingerprint")
        if writer.name != expect:
            raise DecodeError(f"expected a {expect} record, got {writer.name}")
        reader = self._current[expect][0]
        body = io.BytesIO(data[HEADER_LEN:])
        try:
            # Same schema on both sides: skip resolution (it costs as much as the decoding itself).
            same = bytes(data[2:HEADER_LEN]) == self._current[expect][1]
            record = fastavro.schemaless_reader(body, writer.parsed, None if same else reader)
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, IndexError, …
            raise DecodeError(f"malformed {expect} record") from exc
        if body.tell() != len(data) - HEADER_LEN:
            raise DecodeError(f"trailing bytes after {expect} record")
        if not isinstance(record, dict):
            raise DecodeError(f"malformed {expect} record")
        return record
