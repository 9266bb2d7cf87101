"""The audit records on ``hub.audit``: one :data:`BATCH_SCHEMA` record carries the entries of one release.

Owns: encoding an audit batch from entries, and decoding a batch read from Kafka into the exact bytes of its
entries — bounded, and strict about what an entry is. Those exact bytes (an ``audit_entry`` in Avro single-object
encoding) are the audit log's leaves: the log never re-encodes an entry, so the tree is a function of the topic.

Pure: no I/O, no clock. Does not own: what goes into an entry (the gateway's core), the Merkle log (``audit``).

Why batches: the gateway writes the entries of one fetch or download (releases and refusals) in one Kafka record,
produced with acks=all and awaited before anything they cover is sent, so the audit costs one round trip per
fetch, not one per record. Entry ids are UUIDs; the audit log appends an entry id once, however often a producer
retry or a redelivery presents it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from services.shared.avro import AvroCodec
from services.shared.errors import DecodeError

ENTRY_SCHEMA: Final = "audit_entry"
BATCH_SCHEMA: Final = "audit_batch"
#: Kafka's default max.message.bytes is ~1 MiB; a batch stays well under it.
MAX_BATCH_BYTES: Final = 900 * 1024
#: An entry is one leaf, and C2SP entry bundles prefix each entry with a big-endian uint16 length: 65,535 at most.
MAX_ENTRY_BYTES: Final = 0xFFFF
MAX_ENTRIES: Final = 4096


def encode_entry(codec: AvroCodec, entry: Mapping[str, Any]) -> bytes:
    """One entry in single-object encoding (what becomes a leaf).

    Raises:
        ValueError: the entry does not fit the schema (a bug in the caller), or is over ``MAX_ENTRY_BYTES``.
    """
    data = codec.encode(ENTRY_SCHEMA, entry)
    if len(data) > MAX_ENTRY_BYTES:
        raise ValueError(f"audit entry of {len(data)} bytes is over {MAX_ENTRY_BYTES}")
    return data


def encode_batch(codec: AvroCodec, *, batch_id: str, gateway: str, entries: Sequence[bytes]) -> bytes:
    """A ``hub.audit`` record holding ``entries`` (each from :func:`encode_entry`), in order.

    Raises:
        ValueError: no entries, too many, or the batch would be over ``MAX_BATCH_BYTES`` (split it first).
    """
    if not entries or len(entries) > MAX_ENTRIES:
        raise ValueError(f"an audit batch holds 1 to {MAX_ENTRIES} entries, not {len(entries)}")
    data = codec.encode(BATCH_SCHEMA, {"batch_id": batch_id, "gateway": gateway, "entries": list(entries)})
    if len(data) > MAX_BATCH_BYTES:
        raise ValueError(f"audit batch of {len(data)} bytes is over {MAX_BATCH_BYTES}; split it")
    return data


def split_batches(entries: Sequence[bytes], *, max_bytes: int = MAX_BATCH_BYTES - 1024) -> list[list[bytes]]:
    """Group ``entries`` in order into batches that :func:`encode_batch` accepts (with room for the header)."""
    batches: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for entry in entries:
        cost = len(entry) + 8  # the bytes' length prefix and the array block overhead, generously
        if current and (size + cost > max_bytes or len(current) == MAX_ENTRIES):
            batches.append(current)
            current, size = [], 0
        current.append(entry)
        size += cost
    if current:
        batches.append(current)
    return batches


def decode_batch(codec: AvroCodec, data: bytes) -> tuple[str, str, list[bytes]]:
    """``(batch_id, gateway, entries)`` of a ``hub.audit`` record; every entry is checked to decode as an entry.

    Raises:
        DecodeError: not an audit batch, empty, too many entries, or an entry that is not an audit entry.
        PayloadTooLarge: over ``MAX_BATCH_BYTES``.
    """
    batch_id, gateway, decoded = decode_batch_entries(codec, data)
    return batch_id, gateway, [raw for raw, _ in decoded]


def decode_batch_entries(codec: AvroCodec, data: bytes) -> tuple[str, str, list[tuple[bytes, dict[str, Any]]]]:
    """Like :func:`decode_batch`, with each entry's exact bytes paired with its decoded fields (decoded once: the
    audit log indexes the fields and appends the bytes).

    Raises:
        DecodeError, PayloadTooLarge: as :func:`decode_batch`.
    """
    raw = codec.decode(data, expect=BATCH_SCHEMA, max_bytes=MAX_BATCH_BYTES)
    entries: list[bytes] = raw["entries"]
    if not entries or len(entries) > MAX_ENTRIES:
        raise DecodeError(f"an audit batch holds 1 to {MAX_ENTRIES} entries, not {len(entries)}")
    decoded = []
    for i, entry in enumerate(entries):
        try:
            decoded.append((entry, decode_entry(codec, entry)))
        except DecodeError as exc:  # say which entry spoiled the batch (dead letters carry this reason)
            raise DecodeError(f"entry {i} of the batch: {exc.detail}") from exc
    return raw["batch_id"], raw["gateway"], decoded


def decode_entry(codec: AvroCodec, data: bytes) -> dict[str, Any]:
    """Raises: DecodeError / PayloadTooLarge for anything but one well-formed audit entry."""
    return codec.decode(data, expect=ENTRY_SCHEMA, max_bytes=MAX_ENTRY_BYTES)
