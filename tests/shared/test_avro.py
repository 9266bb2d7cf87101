"""The Avro codec: single-object framing, fingerprints checked against other implementations, bounded decoding."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Final

import avro.io
import avro.schema
import fastavro
import pytest

from services.shared.avro import (
    HEADER_LEN,
    MAGIC,
    MAX_SCHEMA_DEPTH,
    SCHEMA_DIR,
    AvroCodec,
    canonical_form,
    crc64_avro,
    fingerprint,
)
from services.shared.errors import ConfigurationError, DecodeError, PayloadTooLarge
from tests.shared.records import sample_record

SCHEMA_NAMES: Final = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))
CODEC: Final = AvroCodec.load()


def test_every_schema_file_is_in_the_contract() -> None:
    assert SCHEMA_NAMES  # the glob found the schemas
    assert CODEC.names() == SCHEMA_NAMES


@pytest.mark.parametrize(
    ("schema", "expected"),
    [('"int"', "8f5c393f1ad57572"), ('"long"', "b71df49344e154d0"), ('"double"', "7e95ab32c035758e"),
     ('"bytes"', "651920c3da16c04f")],
    ids=["int", "long", "double", "bytes"],
)  # fmt: skip
def test_crc64_avro_matches_published_values(schema: str, expected: str) -> None:
    # Values from the Avro implementations' test suites (Java SchemaNormalization, fastavro, avro-rs, Go).
    assert crc64_avro(schema.encode()).to_bytes(8, "little").hex() == expected
    assert fingerprint(json.loads(schema)).hex() == expected


def test_crc64_of_nothing_is_the_empty_constant() -> None:
    assert crc64_avro(b"") == 0xC15D213AA4D7A795  # the spec's EMPTY: the fingerprint before any byte


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_fingerprint_agrees_with_fastavro(name: str) -> None:
    schema = CODEC.schema(name)
    assert fingerprint(schema).hex() == fastavro.schema.fingerprint(canonical_form(schema), "CRC-64-AVRO")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_single_object_header(name: str) -> None:
    data = CODEC.encode(name, sample_record(name))
    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:HEADER_LEN] == fingerprint(CODEC.schema(name))
    assert len(fingerprint(CODEC.schema(name))) == 8


def _apache_schema(name: str) -> avro.schema.Schema:
    return avro.schema.parse((SCHEMA_DIR / f"{name}.avsc").read_text("utf-8"))


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_apache_avro_decodes_what_we_encode(name: str) -> None:
    """A second, independent implementation reads our bytes: the wire format is Avro, not fastavro's dialect."""
    record = sample_record(name)
    data = CODEC.encode(name, record)
    schema = _apache_schema(name)
    decoded = avro.io.DatumReader(schema, schema).read(avro.io.BinaryDecoder(io.BytesIO(data[HEADER_LEN:])))
    assert decoded == record


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_we_decode_what_apache_avro_encodes(name: str) -> None:
    record = sample_record(name)
    out = io.BytesIO()
    avro.io.DatumWriter(_apache_schema(name)).write(record, avro.io.BinaryEncoder(out))
    data = MAGIC + fingerprint(CODEC.schema(name)) + out.getvalue()
    assert data == CODEC.encode(name, record)
    assert CODEC.decode(data, expect=name) == record


# --- hostile input ---------------------------------------------------------------------------------------------


def _long(n: int) -> bytes:
    """Avro zig-zag varint."""
    z = (n << 1) ^ (n >> 63) if -(2**63) <= n < 2**63 else (n << 1) ^ (-1 if n < 0 else 0)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(text: str) -> bytes:
    raw = text.encode()
    return _long(len(raw)) + raw


def _framed(name: str, body: bytes) -> bytes:
    return MAGIC + fingerprint(CODEC.schema(name)) + body


# evidence_withdrawal up to its first array: event_id, item_id, withdrawn_version, publisher{organisation, key_id}
_WITHDRAWAL_PREFIX: Final = _str("e") + _str("i") + _long(1) + _str("o") + _str("k")
_GOOD_WITHDRAWAL: Final = CODEC.encode("evidence_withdrawal", sample_record("evidence_withdrawal"))
_GOOD_EVENT: Final = CODEC.encode("evidence_event", sample_record("evidence_event"))


def _other_schema_in_event_frame() -> bytes:
    return _GOOD_WITHDRAWAL[:2] + fingerprint(CODEC.schema("evidence_event")) + _GOOD_WITHDRAWAL[HEADER_LEN:]


HOSTILE: Final[list[tuple[str, str, bytes, type[Exception]]]] = [
    ("empty", "evidence_withdrawal", b"", DecodeError),
    ("header_only_part", "evidence_withdrawal", MAGIC + b"\x00\x01", DecodeError),
    ("wrong_magic", "evidence_withdrawal", b"\xc3\x02" + _GOOD_WITHDRAWAL[2:], DecodeError),
    ("avro_container_file_magic", "evidence_withdrawal", b"Obj\x01" + _GOOD_WITHDRAWAL[4:], DecodeError),
    ("unknown_fingerprint", "evidence_withdrawal", MAGIC + bytes(8) + _GOOD_WITHDRAWAL[HEADER_LEN:], DecodeError),
    ("another_schemas_fingerprint", "evidence_event", _GOOD_WITHDRAWAL, DecodeError),
    ("another_schemas_body", "evidence_event", _other_schema_in_event_frame(), DecodeError),
    ("header_without_body", "evidence_withdrawal", _GOOD_WITHDRAWAL[:HEADER_LEN], DecodeError),
    ("truncated_by_one", "evidence_withdrawal", _GOOD_WITHDRAWAL[:-1], DecodeError),
    ("truncated_event", "evidence_event", _GOOD_EVENT[: len(_GOOD_EVENT) // 2], DecodeError),
    ("trailing_byte", "evidence_withdrawal", _GOOD_WITHDRAWAL + b"\x00", DecodeError),
    ("trailing_record", "evidence_withdrawal", _GOOD_WITHDRAWAL + _GOOD_WITHDRAWAL[HEADER_LEN:], DecodeError),
    (
        "array_count_1e9",
        "evidence_withdrawal",
        _framed("evidence_withdrawal", _WITHDRAWAL_PREFIX + _long(10**9) + _str("x") * 3),
        DecodeError,
    ),
    (
        "array_count_2_62",
        "evidence_withdrawal",
        _framed("evidence_withdrawal", _WITHDRAWAL_PREFIX + _long(2**62) + b"\x00" * 64),
        DecodeError,
    ),
    (
        "array_count_negative_with_block_size",
        "evidence_withdrawal",
        _framed("evidence_withdrawal", _WITHDRAWAL_PREFIX + _long(-(10**9)) + _long(10**9) + b"\x00" * 8),
        DecodeError,
    ),
    (
        "array_count_most_negative",
        "evidence_withdrawal",
        _framed("evidence_withdrawal", _WITHDRAWAL_PREFIX + _long(-(2**63)) + _long(4) + b"\x00" * 8),
        DecodeError,
    ),
    (
        "array_of_records_count_1e9",
        "evidence_event",
        _framed(
            "evidence_event",
            _str("e") + _str("i") + _long(1) + _long(0) + _str("o") + _str("k") + _long(10**9) + b"\x00" * 16,
        ),
        DecodeError,
    ),
    ("string_length_2_62", "evidence_withdrawal", _framed("evidence_withdrawal", _long(2**62) + b"abc"), DecodeError),
    ("string_length_negative", "evidence_withdrawal", _framed("evidence_withdrawal", _long(-5) + b"abc"), DecodeError),
    ("bytes_length_2_62", "key_record", _framed("key_record", _str("k") + _long(2**62) + b"\x00" * 32), DecodeError),
    (
        "envelope_payload_length_1e18",
        "signed_envelope",
        _framed("signed_envelope", _str("t") + _str("evidence.DE") + _long(10**18) + b"\x00" * 16),
        DecodeError,
    ),
    ("endless_varint", "evidence_withdrawal", _framed("evidence_withdrawal", b"\xff" * 64), DecodeError),
    ("invalid_utf8", "evidence_withdrawal", _framed("evidence_withdrawal", _long(2) + b"\xff\xfe"), DecodeError),
    (
        "union_index_out_of_range",
        "evidence_event",
        _framed("evidence_event", _str("e") + _str("i") + _long(1) + _long(7) + b"\x00" * 32),
        DecodeError,
    ),
    (
        "union_index_negative",
        "evidence_event",
        _framed("evidence_event", _str("e") + _str("i") + _long(1) + _long(-1) + b"\x00" * 32),
        DecodeError,
    ),
    ("over_max_bytes", "evidence_withdrawal", _GOOD_WITHDRAWAL + b"\x00" * (1 << 20), PayloadTooLarge),
]


@pytest.mark.parametrize(("expect", "data", "error"), [row[1:] for row in HOSTILE], ids=[row[0] for row in HOSTILE])
def test_hostile_input_is_refused(expect: str, data: bytes, error: type[Exception]) -> None:
    # Each of these used to be able to hang, exhaust memory or crash a naive decoder; returning at all is the point.
    with pytest.raises(error):
        CODEC.decode(data, expect=expect)


def test_max_bytes_is_checked_before_decoding() -> None:
    assert CODEC.decode(_GOOD_WITHDRAWAL, expect="evidence_withdrawal", max_bytes=len(_GOOD_WITHDRAWAL))
    with pytest.raises(PayloadTooLarge):
        CODEC.decode(_GOOD_WITHDRAWAL, expect="evidence_withdrawal", max_bytes=len(_GOOD_WITHDRAWAL) - 1)
    with pytest.raises(PayloadTooLarge):  # too large wins over malformed: nothing is looked at
        CODEC.decode(b"\x00" * 100, expect="evidence_withdrawal", max_bytes=99)


# --- unsafe schemas are refused when the contract is loaded ----------------------------------------------------


def _record(name: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": fields}


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = _record(f"R{depth}", [{"name": "leaf", "type": "int"}])
    for level in range(depth - 1, 0, -1):
        schema = _record(f"R{level}", [{"name": "child", "type": schema}])
    return schema


UNSAFE: Final[list[tuple[str, Any]]] = [
    ("recursive_direct_array", _record("Node", [{"name": "children", "type": {"type": "array", "items": "Node"}}])),
    ("recursive_through_union", _record("Node", [{"name": "next", "type": ["null", "Node"]}])),
    ("recursive_through_map", _record("Node", [{"name": "kids", "type": {"type": "map", "values": "Node"}}])),
    ("mutually_recursive", _record("A", [{"name": "b", "type": _record(
        "B", [{"name": "a", "type": ["null", "A"]}])}])),
    ("array_of_null", _record("R", [{"name": "xs", "type": {"type": "array", "items": "null"}}])),
    ("array_of_record_with_only_null_fields", _record("R", [{"name": "xs", "type": {"type": "array", "items": _record(
        "Empty", [{"name": "a", "type": "null"}, {"name": "b", "type": "null"}])}}])),
    ("array_of_record_without_fields", _record("R", [{"name": "xs", "type": {"type": "array", "items": _record(
        "Nothing", [])}}])),
    ("array_of_zero_size_fixed", _record("R", [{"name": "xs", "type": {"type": "array", "items": {
        "type": "fixed", "name": "F0", "size": 0}}}])),
    ("map_of_null", _record("R", [{"name": "m", "type": {"type": "map", "values": "null"}}])),
    ("array_of_null_behind_union", _record("R", [{"name": "xs", "type": [
        "null", {"type": "array", "items": "null"}]}])),
    ("array_of_array_of_null", _record("R", [{"name": "xs", "type": {"type": "array", "items": {
        "type": "array", "items": "null"}}}])),
    ("too_deep", _nested(MAX_SCHEMA_DEPTH + 1)),
]  # fmt: skip


def _write_contract(directory: Path, current: dict[str, Any], released: dict[str, dict[int, Any]]) -> None:
    for name, schema in current.items():
        (directory / f"{name}.avsc").write_text(json.dumps(schema), "utf-8")
    for name, versions in released.items():
        folder = directory / "released" / name
        folder.mkdir(parents=True)
        for version, schema in versions.items():
            (folder / f"{version}.avsc").write_text(json.dumps(schema), "utf-8")


@pytest.mark.parametrize("schema", [row[1] for row in UNSAFE], ids=[row[0] for row in UNSAFE])
def test_unsafe_current_schema_is_refused(tmp_path: Path, schema: Any) -> None:
    _write_contract(tmp_path, {"thing": schema}, {})
    with pytest.raises(ConfigurationError):
        AvroCodec.load(tmp_path)


@pytest.mark.parametrize("schema", [row[1] for row in UNSAFE], ids=[row[0] for row in UNSAFE])
def test_unsafe_released_schema_is_refused(tmp_path: Path, schema: Any) -> None:
    _write_contract(tmp_path, {"thing": _record("Safe", [{"name": "a", "type": "int"}])}, {"thing": {1: schema}})
    with pytest.raises(ConfigurationError):
        AvroCodec.load(tmp_path)


SAFE: Final[list[tuple[str, Any]]] = [
    ("nested_to_the_limit", _nested(MAX_SCHEMA_DEPTH)),
    ("array_of_union_with_null", _record("R", [{"name": "xs", "type": {"type": "array", "items": ["null", "int"]}}])),
    ("array_of_record_with_one_non_null_field", _record("R", [{"name": "xs", "type": {"type": "array", "items": _record(
        "Item", [{"name": "a", "type": "null"}, {"name": "b", "type": "boolean"}])}}])),
    ("named_type_defined_in_union_used_later", _record("R", [
        {"name": "a", "type": ["null", _record("Q", [{"name": "z", "type": "int"}])]},
        {"name": "b", "type": {"type": "array", "items": "Q"}}])),
    ("same_record_used_twice_is_not_recursion", _record("R", [
        {"name": "a", "type": _record("P", [{"name": "z", "type": "string"}])}, {"name": "b", "type": "P"}])),
]  # fmt: skip


@pytest.mark.parametrize("schema", [row[1] for row in SAFE], ids=[row[0] for row in SAFE])
def test_safe_schemas_are_accepted(tmp_path: Path, schema: Any) -> None:
    _write_contract(tmp_path, {"thing": schema}, {})
    assert AvroCodec.load(tmp_path).names() == ["thing"]


BROKEN: Final[list[tuple[str, str, str]]] = [
    ("not_json", "thing.avsc", "{not json"),
    ("field_without_type", "thing.avsc", '{"type": "record", "name": "R", "fields": [{"name": "a"}]}'),
    ("unknown_named_type", "thing.avsc", '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "Nope"}]}'),
    ("fixed_without_size", "thing.avsc", '{"type": "fixed", "name": "F"}'),
    ("not_a_schema", "thing.avsc", "5"),
    ("released_version_not_a_number", "released/thing/latest.avsc", '"int"'),
    ("released_version_not_json", "released/thing/1.avsc", "{"),
]


@pytest.mark.parametrize(("file_name", "text"), [row[1:] for row in BROKEN], ids=[row[0] for row in BROKEN])
def test_broken_schema_files_are_configuration_errors(tmp_path: Path, file_name: str, text: str) -> None:
    # A service with a broken contract must refuse to start with a ConfigurationError, not crash with whatever
    # fastavro raises.
    _write_contract(tmp_path, {"ok": _record("Ok", [{"name": "a", "type": "int"}])}, {})
    (tmp_path / file_name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file_name).write_text(text, "utf-8")
    with pytest.raises(ConfigurationError):
        AvroCodec.load(tmp_path)


# --- evolution ---------------------------------------------------------------------------------------------------

_V1: Final = _record("Thing", [{"name": "id", "type": "string"}, {"name": "count", "type": "long"}])
_V2: Final = _record("Thing", [
    {"name": "id", "type": "string"}, {"name": "count", "type": "long"},
    {"name": "note", "type": ["null", "string"], "default": None},
    {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
])  # fmt: skip


def test_released_old_version_decodes_into_the_current_reader_schema(tmp_path: Path) -> None:
    _write_contract(tmp_path, {"thing": _V2}, {"thing": {1: _V1, 2: _V2}})
    old_writer = AvroCodec(current={"thing": _V1}, released={})
    data = old_writer.encode("thing", {"id": "a", "count": 3})
    assert data[2:HEADER_LEN] == fingerprint(fastavro.parse_schema(_V1))

    codec = AvroCodec.load(tmp_path)
    assert codec.decode(data, expect="thing") == {"id": "a", "count": 3, "note": None, "tags": []}
    assert codec.decode(codec.encode("thing", {"id": "b", "count": 1, "note": "n", "tags": ["x"]}), expect="thing") == {
        "id": "b", "count": 1, "note": "n", "tags": ["x"]}  # fmt: skip


def test_a_version_that_was_never_released_is_unknown(tmp_path: Path) -> None:
    _write_contract(tmp_path, {"thing": _V2}, {"thing": {2: _V2}})
    data = AvroCodec(current={"thing": _V1}, released={}).encode("thing", {"id": "a", "count": 3})
    with pytest.raises(DecodeError):
        AvroCodec.load(tmp_path).decode(data, expect="thing")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_released_version_of_the_contract_decodes(name: str) -> None:
    for path in sorted((SCHEMA_DIR / "released" / name).glob("*.avsc")):
        released = json.loads(path.read_text("utf-8"))
        writer = AvroCodec(current={name: released}, released={})
        fields = {f["name"] for f in released["fields"]}
        data = writer.encode(name, {k: v for k, v in sample_record(name).items() if k in fields})
        decoded = CODEC.decode(data, expect=name)
        assert decoded.keys() == {f["name"] for f in CODEC.schema(name)["fields"]}, path
