"""The signed envelope: DSSE-style signing and verification of Avro payloads bound to a Kafka topic.

Each signature covers ``PAE(payload_type, topic, key_id, sequence, payload)``::

    "EVHUB-DSSEv1" + for each field: SP + len(field) in ASCII decimal + SP + field

(DSSE's pre-authentication encoding with three more fields.) Binding the topic means an event copied into another
jurisdiction's topic no longer verifies there; binding the sequence means a replayed or re-numbered event is
detected by ``sequences.SequenceTracker``. Verification uses the topic the record was *read from*, never the topic
field inside the envelope.

Owns: sealing, opening (verify → payload bytes), payload type ↔ schema names. Does not own: which keys are
trusted (a :class:`KeyResolver`, usually ``services.shared.registry.KeyRegistry``), the disclosure format
(``disclosure``; :func:`open_envelope` uses its :func:`~services.shared.disclosure.reveal` to check every
disclosure an envelope carries).

The exact bytes — PAE, the Avro single-object encodings, the key id, the disclosure digests — are written down,
with a worked example in hex, in ``docs/envelope.md``; ``tests/shared/test_envelope_doc.py`` checks the example
against this code and verifies it with an independent verifier written from the document alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from services.shared.avro import AvroCodec
from services.shared.disclosure import reveal
from services.shared.errors import DecodeError, InvalidSignature, TrustError, UntrustedKey
from services.shared.keys import PublicKey, SigningKey

log = logging.getLogger(__name__)

ENVELOPE_SCHEMA: Final = "signed_envelope"
PAYLOAD_TYPES: Final[dict[str, str]] = {
    "evidence_event": "application/vnd.evidencehub.evidence-event.v1+avro",
    "evidence_withdrawal": "application/vnd.evidencehub.evidence-withdrawal.v1+avro",
}
SCHEMA_FOR_TYPE: Final = {v: k for k, v in PAYLOAD_TYPES.items()}
MAX_SIGNATURES: Final = 4
MAX_ENVELOPE_BYTES: Final = 1 << 20


def pae(payload_type: str, topic: str, key_id: str, sequence: int, payload: bytes) -> bytes:
    fields = [payload_type.encode(), topic.encode(), key_id.encode(), str(sequence).encode(), payload]
    parts = [b"EVHUB-DSSEv1"]
    for f in fields:
        parts += [b" ", str(len(f)).encode(), b" ", f]
    return b"".join(parts)


class KeyResolver(Protocol):
    def resolve(self, key_id: str, *, sequence: int, topic: str) -> PublicKey:
        """The key, if it may have made a signature with this sequence number on this topic. Raises UntrustedKey
        otherwise."""
        ...

    def check_signed_at(self, key_id: str, signed_at: datetime) -> None:
        """Raises UntrustedKey if the key was not valid at ``signed_at`` (not yet valid, or expired)."""
        ...

    def organisation_of(self, key_id: str) -> str:
        """The organisation the key was registered for. Raises UntrustedKey for an unknown key."""
        ...


@dataclass(frozen=True)
class Verified:
    """What :func:`open_envelope` vouches for: the payload bytes, decoded, who signed them with which sequence, and
    the disclosures — each one well-formed and matching a digest the signer signed (unsigned bytes of the
    envelope, checked all the same)."""

    payload_type: str
    schema: str
    record: dict[str, Any]
    key_id: str
    sequence: int
    disclosures: tuple[str, ...]


def seal(
    codec: AvroCodec, *, schema: str, record: dict[str, Any], topic: str, signer: SigningKey, sequence: int,
    disclosures: Sequence[str] = (),
) -> bytes:  # fmt: skip
    """Encode ``record``, sign it for ``topic`` with ``sequence``, and return the encoded envelope."""
    if sequence < 1:
        raise ValueError("sequences start at 1")
    payload_type = PAYLOAD_TYPES[schema]
    payload = codec.encode(schema, record)
    sig = signer.sign(pae(payload_type, topic, signer.key_id, sequence, payload))
    return codec.encode(
        ENVELOPE_SCHEMA,
        {
            "payload_type": payload_type, "topic": topic, "payload": payload,
            "signatures": [{"key_id": signer.key_id, "sequence": sequence, "sig": sig}],
            "disclosures": list(disclosures),
        },
    )  # fmt: skip


def with_disclosures(codec: AvroCodec, envelope: bytes, disclosures: Sequence[str]) -> bytes:
    """The same envelope carrying only ``disclosures`` (the gateway's redaction; signatures stay valid)."""
    raw = codec.decode(envelope, expect=ENVELOPE_SCHEMA, max_bytes=MAX_ENVELOPE_BYTES)
    raw["disclosures"] = list(disclosures)
    return codec.encode(ENVELOPE_SCHEMA, raw)


def open_envelope(codec: AvroCodec, data: bytes, *, topic: str, keys: KeyResolver) -> Verified:
    """Verify an envelope read from ``topic`` and decode its payload.

    One valid signature from a key the resolver trusts is enough; the signing key must have been valid at the
    payload's ``published_at``. Every disclosure must be well-formed and match a digest in the signed payload.

    Raises:
        PayloadTooLarge / DecodeError: the bytes are not a well-formed envelope or payload, or a disclosure is
            malformed or oversized.
        InvalidSignature: no signature verifies (including: read from another topic than it was signed for), or
            a disclosure matches no signed digest (forged, altered or moved from another item).
        UntrustedKey: no signature is by a key trusted for that sequence number and time.
    """
    raw = codec.decode(data, expect=ENVELOPE_SCHEMA, max_bytes=MAX_ENVELOPE_BYTES)
    if raw["topic"] != topic:  # the field is not what is verified, but a mismatch is always tampering or a replay
        raise InvalidSignature("invalid signature")
    payload_type, payload = raw["payload_type"], raw["payload"]
    schema = SCHEMA_FOR_TYPE.get(payload_type)
    if schema is None:
        raise DecodeError("unknown payload type")
    signatures = raw["signatures"]
    if not signatures or len(signatures) > MAX_SIGNATURES:
        raise InvalidSignature("invalid signature")
    problem: TrustError = InvalidSignature("invalid signature")
    for sig in signatures:
        key_id, sequence = sig["key_id"], sig["sequence"]
        try:
            key = keys.resolve(key_id, sequence=sequence, topic=topic)
            key.verify(sig["sig"], pae(payload_type, topic, key_id, sequence, payload))
        except UntrustedKey as exc:
            log.info("signature by untrusted key %s: %s", key_id[:16], exc.detail)
            problem = exc
            continue
        except InvalidSignature:
            log.info("bad signature by key %s on topic %s", key_id[:16], topic)
            continue
        record = codec.decode(payload, expect=schema, max_bytes=MAX_ENVELOPE_BYTES)
        keys.check_signed_at(key_id, record["published_at"])
        claimed = record["publisher"]
        if claimed["key_id"] != key_id or claimed["organisation"] != keys.organisation_of(key_id):
            raise UntrustedKey("the event names another publisher than the key that signed it")
        if record.get("jurisdiction") is not None and not topic.endswith("." + record["jurisdiction"]):
            raise InvalidSignature("invalid signature")  # signed for this topic, but says another jurisdiction
        disclosures = tuple(raw["disclosures"])
        reveal(disclosures, record.get("protected", ()))  # a withdrawal signs no digest: it may carry none
        return Verified(payload_type, schema, record, key_id, sequence, disclosures)
    raise problem
