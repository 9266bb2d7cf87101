"""hub.audit records: what the gateway writes is what the audit log reads, byte for byte, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.errors import DecodeError, PayloadTooLarge


def _entry(n: int) -> dict[str, Any]:
    return {
        "entry_id": f"00000000-0000-4000-8000-{n:012d}", "at": datetime(2026, 5, 1, 12, 0, n % 60, tzinfo=UTC),
        "gateway": "gw-1", "office": "DE-GBA-WCU", "client_cert_sha256": "ab" * 32, "request_id": f"r{n}",
        "action": "ReadItem", "jurisdiction": "DE", "decision": "RELEASED" if n % 2 else "REFUSED",
    }  # fmt: skip


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec.load()


def test_a_batch_returns_the_exact_entry_bytes_in_order(codec: AvroCodec) -> None:
    entries = [audit_records.encode_entry(codec, _entry(n)) for n in range(5)]
    data = audit_records.encode_batch(codec, batch_id="b1", gateway="gw-1", entries=entries)
    assert audit_records.decode_batch(codec, data) == ("b1", "gw-1", entries)
    assert audit_records.decode_entry(codec, entries[3])["request_id"] == "r3"
    _, _, decoded = audit_records.decode_batch_entries(codec, data)
    assert [raw for raw, _ in decoded] == entries
    assert [fields["request_id"] for _, fields in decoded] == [f"r{n}" for n in range(5)]


def test_an_entry_that_is_not_an_audit_entry_spoils_the_batch(codec: AvroCodec) -> None:
    good = audit_records.encode_entry(codec, _entry(1))
    batch = codec.encode("audit_batch", {"batch_id": "b", "gateway": "g", "entries": [good, b"\xc3\x01junkjunk"]})
    with pytest.raises(DecodeError):
        audit_records.decode_batch(codec, batch)


def test_an_empty_batch_is_refused_both_ways(codec: AvroCodec) -> None:
    with pytest.raises(ValueError, match="1 to"):
        audit_records.encode_batch(codec, batch_id="b", gateway="g", entries=[])
    with pytest.raises(DecodeError):
        audit_records.decode_batch(codec, codec.encode("audit_batch", {"batch_id": "b", "gateway": "g", "entries": []}))


def test_oversized_input_is_refused_before_decoding(codec: AvroCodec) -> None:
    with pytest.raises(PayloadTooLarge):
        audit_records.decode_batch(codec, b"\xc3\x01" + bytes(audit_records.MAX_BATCH_BYTES))


def test_split_batches_keeps_order_and_every_batch_fits(codec: AvroCodec) -> None:
    entries = [audit_records.encode_entry(codec, _entry(n)) for n in range(3000)]
    batches = audit_records.split_batches(entries, max_bytes=20_000)
    assert [e for b in batches for e in b] == entries
    assert len(batches) > 1
    for b in batches:
        audit_records.encode_batch(codec, batch_id="b", gateway="g", entries=b)


def test_an_entry_fits_a_c2sp_entry_bundle(codec: AvroCodec) -> None:
    # Bundles carry each leaf behind a uint16 length: an entry of 65,536 bytes could be logged but never served.
    assert audit_records.MAX_ENTRY_BYTES == 65_535
    with pytest.raises(PayloadTooLarge):
        audit_records.decode_entry(codec, b"\xc3\x01" + bytes(65_534))
    big = {**_entry(1), "request_id": "r" * 65_500}
    with pytest.raises(ValueError, match="over 65535"):
        audit_records.encode_entry(codec, big)
