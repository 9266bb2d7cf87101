"""The worked example of docs/envelope.md, built with the hub's own code (fixed key, salt, record and sequence; Ed25519
signatures are deterministic, so every byte is fixed). ``tests/shared/test_envelope_doc.py`` checks the document's
blocks against :func:`blocks`."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from services.shared import disclosure
from services.shared.avro import AvroCodec, fingerprint
from services.shared.envelope import ENVELOPE_SCHEMA, PAYLOAD_TYPES, pae, seal
from tests.shared.records import PUBLISHER_SEED, signing_key_from_seed

DOC: Final = Path(__file__).resolve().parents[2] / "docs" / "envelope.md"
KEY: Final = signing_key_from_seed(PUBLISHER_SEED)  # RFC 8032 §7.1 TEST 1
SALT: Final = bytes(range(16))
TOPIC: Final = "evidence.DE"
SEQUENCE: Final = 1
PUBLISHED_AT: Final = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
WITNESS: Final = disclosure.make("witness.name", "A. K.", label="WITNESS_IDENTIFYING", salt=SALT)


def record() -> dict[str, Any]:
    return {
        "event_id": "ev-1", "item_id": "item-1", "version": 1, "replaces_event_id": None,
        "publisher": {"organisation": "Example group", "key_id": KEY.key_id},
        "case_ids": ["CASE-1"], "jurisdiction": "DE", "kind": "PHOTOGRAPH", "title": "Example", "description": "",
        "content": [{"media_type": "image/png", "size": 4, "sha256": "ab" * 32, "file_name": "a.png"}],
        "capture": {"captured_at": None, "device": None, "collector_pseudonym": None, "region": None},
        "custody": [], "classification": "RESTRICTED", "sensitivity": ["WITNESS_IDENTIFYING"],
        "sharing": {"allowed_jurisdictions": [], "purposes": [], "consent_reference": None, "embargo_until": None},
        "related_items": [], "published_at": PUBLISHED_AT,
        "protected": [{"label": WITNESS.label, "digest": WITNESS.digest}],
    }  # fmt: skip


def as_json(value: dict[str, Any]) -> str:
    """The record as the document shows it: JSON, one top-level field a line, times as ISO 8601 UTC."""

    def default(o: object) -> str:
        assert isinstance(o, datetime)
        return o.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, default=default)}" for k, v in value.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


def hex_lines(data: bytes) -> str:
    text = data.hex()
    return "\n".join(text[i : i + 64] for i in range(0, len(text), 64))


def blocks() -> dict[str, str]:
    """Every block of the example, by name, exactly as the document must show it."""
    codec = AvroCodec.load()
    envelope = seal(codec, schema="evidence_event", record=record(), topic=TOPIC, signer=KEY, sequence=SEQUENCE,
                    disclosures=[WITNESS.encoded])  # fmt: skip
    raw = codec.decode(envelope, expect=ENVELOPE_SCHEMA)
    payload = raw["payload"]
    signed = pae(PAYLOAD_TYPES["evidence_event"], TOPIC, KEY.key_id, SEQUENCE, payload)
    return {
        "seed": hex_lines(PUBLISHER_SEED),
        "public_key": hex_lines(KEY.public.raw),
        "key_id": KEY.key_id,
        "salt": hex_lines(SALT),
        "disclosure_json": base64.urlsafe_b64decode(WITNESS.encoded + "=" * (-len(WITNESS.encoded) % 4)).decode(),
        "disclosure": WITNESS.encoded,
        "disclosure_digest": WITNESS.digest,
        "record": as_json(record()),
        "event_fingerprint": hex_lines(fingerprint(codec.schema("evidence_event"))),
        "envelope_fingerprint": hex_lines(fingerprint(codec.schema(ENVELOPE_SCHEMA))),
        "payload": hex_lines(payload),
        "pae_prefix": hex_lines(signed[: len(signed) - len(payload)]),
        "signature": hex_lines(raw["signatures"][0]["sig"]),
        "envelope": hex_lines(envelope),
    }


_BLOCK = re.compile(r"<!-- example: (\w+) -->\n```[a-z]*\n(.*?)\n```", re.DOTALL)


def documented() -> dict[str, str]:
    """The example's blocks as docs/envelope.md has them."""
    return dict(_BLOCK.findall(DOC.read_text("utf-8")))
