"""An office's verifier, written from docs/envelope.md alone: plain ``cryptography`` (Ed25519), ``hashlib``,
``base64``/``json`` and the Apache ``avro`` package, reading the contract's schema files. It imports nothing from
``services`` — no PAE, codec or disclosure code of the hub (a test checks its imports) — so it can disagree with
the hub's code, and a test shows it does not.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
#: §2's table: the header bytes of each schema (Apache avro's own fingerprint() differs for the payload schemas).
FINGERPRINTS = {
    bytes.fromhex("85a48468d348aa9a"): "signed_envelope",
    bytes.fromhex("f596419dd7eda9be"): "evidence_event",
    bytes.fromhex("b3923b9010ce61e5"): "evidence_withdrawal",
}
PAYLOAD_SCHEMAS = {
    "application/vnd.evidencehub.evidence-event.v1+avro": "evidence_event",
    "application/vnd.evidencehub.evidence-withdrawal.v1+avro": "evidence_withdrawal",
}


class Refused(Exception):
    """The envelope does not verify (the reason is the message)."""


@dataclass(frozen=True)
class Opened:
    record: dict[str, Any]
    key_id: str
    sequence: int
    disclosed: dict[str, str]  # field → value


def _schema(name: str) -> avro.schema.Schema:
    return avro.schema.parse((SCHEMAS / f"{name}.avsc").read_text("utf-8"))


def _single_object(data: bytes, name: str) -> dict[str, Any]:
    """§2: C3 01, the schema's fingerprint (§2's table), the Avro binary body."""
    schema = _schema(name)
    if data[:2] != b"\xc3\x01" or FINGERPRINTS.get(data[2:10]) != name:
        raise Refused(f"not a single-object {name}")
    body = io.BytesIO(data[10:])
    record = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(body))
    if body.tell() != len(data) - 10:
        raise Refused("trailing bytes")
    if not isinstance(record, dict):
        raise Refused("not a record")
    return record


def _field(data: bytes) -> bytes:
    return b" " + str(len(data)).encode("ascii") + b" " + data


def pae(payload_type: str, topic: str, key_id: str, sequence: int, payload: bytes) -> bytes:
    """§4: "EVHUB-DSSEv1", then SP, length in decimal ASCII, SP, bytes — for each of the five fields."""
    fields = [payload_type.encode("utf-8"), topic.encode("utf-8"), key_id.encode("ascii"),
              str(sequence).encode("ascii"), payload]  # fmt: skip
    return b"EVHUB-DSSEv1" + b"".join(_field(f) for f in fields)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _reveal(disclosures: list[str], protected: list[dict[str, str]]) -> dict[str, str]:
    """§6: each disclosure's digest must be signed; it decodes to [salt, field, value]."""
    signed = {p["digest"] for p in protected}
    out = {}
    for d in disclosures:
        if not d.isascii() or len(d) > 65536:
            raise Refused("malformed disclosure")
        if _b64url(hashlib.sha256(d.encode("ascii")).digest()) not in signed:
            raise Refused("a disclosure matches no signed digest")
        triple = json.loads(base64.urlsafe_b64decode(d + "=" * (-len(d) % 4)))
        if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(x, str) for x in triple)):
            raise Refused("malformed disclosure")
        out[triple[1]] = triple[2]
    return out


def verify(envelope: bytes, *, topic: str, public_key: bytes) -> Opened:
    """§5, for one trusted publisher key: the envelope read from ``topic``, verified and opened.

    Raises:
        Refused: anything does not verify.
    """
    key_id = hashlib.sha256(public_key).hexdigest()  # §1
    env = _single_object(envelope, "signed_envelope")
    if env["topic"] != topic:
        raise Refused("read from another topic than it names")
    schema = PAYLOAD_SCHEMAS.get(env["payload_type"])
    if schema is None:
        raise Refused("unknown payload type")
    for sig in env["signatures"][:4]:
        if sig["key_id"] != key_id:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(
                sig["sig"], pae(env["payload_type"], topic, key_id, sig["sequence"], env["payload"])
            )
        except InvalidSignature:
            continue
        record = _single_object(env["payload"], schema)
        if record["publisher"]["key_id"] != key_id or topic != "evidence." + record["jurisdiction"]:
            raise Refused("the payload names another signer or jurisdiction")
        return Opened(record, key_id, sig["sequence"], _reveal(env["disclosures"], record.get("protected", [])))
    raise Refused("no valid signature by this key")
