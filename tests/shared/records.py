"""Fixed keys, times and records for the shared-core tests (no I/O, no randomness)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.shared.keys import SigningKey

# RFC 8032 §7.1 TEST 1 and TEST 2 secret keys: their public keys are published there, so the key vectors are
# checked against a source that is not this code.
PUBLISHER_SEED: Final = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUBLISHER_PUBLIC: Final = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
ANCHOR_SEED: Final = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
ANCHOR_PUBLIC: Final = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")

NOW: Final = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
NOT_BEFORE: Final = datetime(2026, 1, 1, tzinfo=UTC)
NOT_AFTER: Final = datetime(2027, 1, 1, tzinfo=UTC)
TOPIC_DE: Final = "evidence.DE"
TOPIC_FR: Final = "evidence.FR"
ORG: Final = "Syrian Archive of Detainee Photographs"


def signing_key_from_seed(seed: bytes) -> SigningKey:
    """A SigningKey from a 32-byte RFC 8032 seed, through the public PEM loader."""
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SigningKey.from_pem(pem)


def seed_key(n: int) -> SigningKey:
    """Another fixed key, distinct for each ``n``."""
    return signing_key_from_seed(n.to_bytes(32, "big"))


def evidence_event(
    *, key_id: str, jurisdiction: str = "DE", published_at: datetime = NOW, event_id: str = "ev-0001",
    protected: list[dict[str, str]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """An evidence_event record with every field set (what the publisher builds from validated metadata)."""
    return {
        "event_id": event_id,
        "item_id": "item-7f3a",
        "version": 2,
        "replaces_event_id": "ev-0000",
        "publisher": {"organisation": ORG, "key_id": key_id},
        "case_ids": ["case-DE-2024-17", "case-SE-ICC-3"],
        "jurisdiction": jurisdiction,
        "kind": "PHOTOGRAPH",
        "title": "Detention facility photograph 4711",
        "description": "Photograph from the 2013 set; metadata re-verified.",
        "content": [
            {
                "media_type": "image/jpeg",
                "size": 1_234_567,
                "sha256": "ab" * 32,
                "file_name": "IMG_4711.jpg",
            }
        ],
        "capture": {
            "captured_at": datetime(2013, 8, 21, 6, 30, tzinfo=UTC),
            "device": "Canon EOS 5D",
            "collector_pseudonym": "C-17",
            "region": "Rif Dimashq",
        },
        "custody": [
            {"at": datetime(2014, 1, 2, tzinfo=UTC), "actor": "C-17", "action": "exported", "sha256": "ab" * 32},
            {"at": datetime(2026, 4, 30, tzinfo=UTC), "actor": "archive", "action": "ingested", "sha256": None},
        ],
        "classification": "CONFIDENTIAL",
        "sensitivity": ["GRAPHIC", "WITNESS_IDENTIFYING", "LOCATION_EXACT"],
        "sharing": {
            "allowed_jurisdictions": ["DE", "FR", "SE"],
            "purposes": ["prosecution"],
            "consent_reference": "consent-2019-88",
            "embargo_until": None,
        },
        "related_items": ["item-7f3b"],
        "published_at": published_at,
        "protected": protected if protected is not None else [],
    }


def evidence_withdrawal(*, key_id: str, jurisdiction: str = "DE", published_at: datetime = NOW) -> dict[str, Any]:
    return {
        "event_id": "wd-0001",
        "item_id": "item-7f3a",
        "withdrawn_version": 2,
        "publisher": {"organisation": ORG, "key_id": key_id},
        "case_ids": ["case-DE-2024-17"],
        "jurisdiction": jurisdiction,
        "reason": "consent withdrawn",
        "published_at": published_at,
    }


def key_record(*, key_id: str, public_key: bytes, anchor_key_id: str) -> dict[str, Any]:
    return {
        "key_id": key_id,
        "public_key": public_key,
        "organisation": ORG,
        "not_before": NOT_BEFORE,
        "not_after": NOT_AFTER,
        "revoked_at": NOW + timedelta(days=1),
        "last_valid_sequence": 41,
        "last_valid_sequences": {"evidence.DE": 41, "evidence.FR": 9},
        "revision": 3,
        "anchor_key_id": anchor_key_id,
        "anchor_sig": b"\x01" * 64,
    }


def signed_envelope(*, key_id: str) -> dict[str, Any]:
    return {
        "payload_type": "application/vnd.evidencehub.evidence-event.v1+avro",
        "topic": TOPIC_DE,
        "payload": b"\xc3\x01" + bytes(range(8)) + b"\x00\x02",
        "signatures": [{"key_id": key_id, "sequence": 7, "sig": b"\x02" * 64}],
        "disclosures": ["WyJzYWx0IiwiZmllbGQiLCJ2YWx1ZSJd"],
    }


def audit_entry() -> dict[str, Any]:
    """A release, with every optional part set."""
    return {
        "entry_id": "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", "at": NOW, "gateway": "gw-1", "office": "DE-GBA-WCU",
        "client_cert_sha256": "c0" * 32, "request_id": "req-1", "action": "ReadItem", "purpose": "prosecution",
        "jurisdiction": "DE",
        "item": {"topic": TOPIC_DE, "partition": 2, "offset": 41, "payload_type": "application/vnd.evidencehub."
                 "evidence-event.v1+avro", "event_id": "ev-0001", "item_id": "item-7f3a", "version": 2,
                 "key_id": "d1" * 32, "sequence": 7, "envelope_sha256": "e0" * 32, "content_sha256": "ab" * 32,
                 "content_range": "0-1023"},
        "attributes": {"jurisdictions": ["DE"], "case_ids": ["case-DE-2024-17"], "classification": "CONFIDENTIAL",
                       "sensitivity": ["GRAPHIC"], "embargo_until": NOT_BEFORE, "consent_jurisdictions": ["DE"],
                       "consent_purposes": [], "withdrawn": False, "protected_fields": ["LOCATION_EXACT"]},
        "decision": "RELEASED", "deny_source": None, "disclosed_fields": ["LOCATION_EXACT"], "withheld_fields": [],
        "policy_version": "3f" * 32, "determining_policies": ["item-jurisdiction-and-assigned-case"], "errors": [],
    }  # fmt: skip


def sample_record(schema: str) -> dict[str, Any]:
    """One complete record for each schema under ``schemas/``."""
    key_id = "d1" * 32
    samples = {
        "evidence_event": evidence_event(key_id=key_id),
        "evidence_withdrawal": evidence_withdrawal(key_id=key_id),
        "key_record": key_record(key_id=key_id, public_key=PUBLISHER_PUBLIC, anchor_key_id="a0" * 32),
        "signed_envelope": signed_envelope(key_id=key_id),
        "audit_entry": audit_entry(),
        "audit_batch": {"batch_id": "b-1", "gateway": "gw-1", "entries": [b"\xc3\x01" + bytes(8) + b"\x00"]},
    }
    return samples[schema]
