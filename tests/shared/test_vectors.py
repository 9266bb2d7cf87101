"""Golden vectors: the wire format (keys, fingerprints, payload, PAE, signature, envelope, key record) is pinned.

A failure here means bytes on the wire changed. If that was meant, release the schema and regenerate the vectors
(see ``tests/shared/golden.py``); offices holding old envelopes must still be able to open them.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Final

import avro.io
import avro.schema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.shared import disclosure
from services.shared.avro import HEADER_LEN, SCHEMA_DIR, AvroCodec
from services.shared.envelope import open_envelope
from services.shared.errors import InvalidSignature
from services.shared.keys import PublicKey
from services.shared.registry import KeyRegistry
from tests.shared import golden
from tests.shared.records import ANCHOR_PUBLIC, PUBLISHER_PUBLIC, TOPIC_DE, TOPIC_FR

VECTORS: Final[dict[str, Any]] = json.loads(golden.VECTOR_FILE.read_text("utf-8"))
ENVELOPE: Final[dict[str, Any]] = VECTORS["envelope"]
CURRENT_BUILD: Final = golden.build()


def _apache_read(schema_name: str, body: bytes) -> Any:
    schema = avro.schema.parse((SCHEMA_DIR / f"{schema_name}.avsc").read_text("utf-8"))
    return avro.io.DatumReader(schema, schema).read(avro.io.BinaryDecoder(io.BytesIO(body)))


def test_key_vectors_match_rfc_8032() -> None:
    keys = VECTORS["ed25519"]
    assert bytes.fromhex(keys["publisher"]["public"]) == PUBLISHER_PUBLIC
    assert bytes.fromhex(keys["anchor"]["public"]) == ANCHOR_PUBLIC
    for key in keys.values():
        assert key["key_id"] == hashlib.sha256(bytes.fromhex(key["public"])).hexdigest()
    assert CURRENT_BUILD["ed25519"] == keys


def test_released_schema_fingerprints_never_change() -> None:
    # Released files are immutable: data written with them is retained forever, found by these fingerprints.
    assert CURRENT_BUILD["released_fingerprints"] == VECTORS["released_fingerprints"]


def test_pae_vector_follows_the_documented_encoding() -> None:
    payload = bytes.fromhex(ENVELOPE["payload"])
    fields = [b"application/vnd.evidencehub.evidence-event.v1+avro", TOPIC_DE.encode(),
              VECTORS["ed25519"]["publisher"]["key_id"].encode(), b"42", payload]  # fmt: skip
    expected = b"EVHUB-DSSEv1" + b"".join(b" %d %s" % (len(f), f) for f in fields)
    assert bytes.fromhex(ENVELOPE["pae"]) == expected


def test_signature_vector_verifies_with_plain_cryptography() -> None:
    Ed25519PublicKey.from_public_bytes(PUBLISHER_PUBLIC).verify(
        bytes.fromhex(ENVELOPE["signature"]), bytes.fromhex(ENVELOPE["pae"])
    )


def test_sealed_vector_is_read_by_apache_avro() -> None:
    """A verifier written by an office, with the Apache library and our .avsc files, can read the envelope."""
    sealed = bytes.fromhex(ENVELOPE["sealed"])
    envelope = _apache_read("signed_envelope", sealed[HEADER_LEN:])
    assert envelope == {
        "payload_type": "application/vnd.evidencehub.evidence-event.v1+avro",
        "topic": TOPIC_DE,
        "payload": bytes.fromhex(ENVELOPE["payload"]),
        "signatures": [
            {
                "key_id": VECTORS["ed25519"]["publisher"]["key_id"],
                "sequence": 42,
                "sig": bytes.fromhex(ENVELOPE["signature"]),
            }
        ],
        "disclosures": [VECTORS["disclosure"]["encoded"]],
    }
    record = _apache_read("evidence_event", envelope["payload"][HEADER_LEN:])
    assert record == golden.golden_event(VECTORS["ed25519"]["publisher"]["key_id"])


@pytest.mark.parametrize("part", ["envelope", "disclosure", "key_record"])
def test_the_code_still_produces_the_vector(part: str) -> None:
    assert CURRENT_BUILD[part] == VECTORS[part]


def test_the_golden_envelope_opens_and_reveals(codec: AvroCodec) -> None:
    registry = KeyRegistry(codec, anchors=[PublicKey.from_raw(ANCHOR_PUBLIC)])
    registry.apply(bytes.fromhex(VECTORS["key_record"]))
    verified = open_envelope(codec, bytes.fromhex(ENVELOPE["sealed"]), topic=TOPIC_DE, keys=registry)
    assert verified.record == golden.golden_event(VECTORS["ed25519"]["publisher"]["key_id"])
    assert (verified.sequence, verified.disclosures) == (42, (VECTORS["disclosure"]["encoded"],))
    revealed = disclosure.reveal(verified.disclosures, verified.record["protected"])
    assert revealed["witness_name"].value == "Ольга Шевченко"
    with pytest.raises(InvalidSignature):
        open_envelope(codec, bytes.fromhex(ENVELOPE["sealed"]), topic=TOPIC_FR, keys=registry)
