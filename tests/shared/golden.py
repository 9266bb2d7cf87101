"""Builds the golden vectors in ``tests/vectors/golden.json``; ``test_vectors.py`` checks the code still matches them.

Regenerating (``python -m tests.shared.golden``) is a deliberate wire-format change: only do it together with a
schema release (``schemas/released/<name>/<n+1>.avsc``), and keep the old envelope vector so it keeps being opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from services.shared import disclosure
from services.shared.avro import SCHEMA_DIR, AvroCodec, fingerprint
from services.shared.envelope import pae, seal
from services.shared.registry import issue
from tests.shared.records import (
    ANCHOR_SEED,
    NOT_AFTER,
    NOT_BEFORE,
    ORG,
    PUBLISHER_SEED,
    TOPIC_DE,
    evidence_event,
    signing_key_from_seed,
)

VECTOR_FILE: Final = Path(__file__).resolve().parents[1] / "vectors" / "golden.json"
SEQUENCE: Final = 42
WITNESS: Final = disclosure.make("witness_name", "Ольга Шевченко", label="WITNESS_IDENTIFYING", salt=bytes(range(16)))


def golden_event(key_id: str) -> dict[str, Any]:
    return evidence_event(key_id=key_id, protected=[{"label": WITNESS.label, "digest": WITNESS.digest}])


def build() -> dict[str, Any]:
    codec = AvroCodec.load()
    publisher, anchor = signing_key_from_seed(PUBLISHER_SEED), signing_key_from_seed(ANCHOR_SEED)
    record = golden_event(publisher.key_id)
    payload = codec.encode("evidence_event", record)
    message = pae("application/vnd.evidencehub.evidence-event.v1+avro", TOPIC_DE, publisher.key_id, SEQUENCE, payload)
    envelope = seal(codec, schema="evidence_event", record=record, topic=TOPIC_DE, signer=publisher,
                    sequence=SEQUENCE, disclosures=[WITNESS.encoded])  # fmt: skip
    key_record = issue(codec, anchor, public_key=publisher.public, organisation=ORG, not_before=NOT_BEFORE,
                       not_after=NOT_AFTER)  # fmt: skip
    released = {
        f"{p.parent.name}/{p.stem}": fingerprint(json.loads(p.read_text("utf-8"))).hex()
        for p in sorted(SCHEMA_DIR.glob("released/*/*.avsc"))
    }
    return {
        "ed25519": {
            "publisher": {
                "seed": PUBLISHER_SEED.hex(),
                "public": publisher.public.raw.hex(),
                "key_id": publisher.key_id,
            },
            "anchor": {"seed": ANCHOR_SEED.hex(), "public": anchor.public.raw.hex(), "key_id": anchor.key_id},
        },
        "released_fingerprints": released,
        "disclosure": {"encoded": WITNESS.encoded, "digest": WITNESS.digest},
        "envelope": {
            "topic": TOPIC_DE,
            "sequence": SEQUENCE,
            "payload": payload.hex(),
            "pae": message.hex(),
            "signature": publisher.sign(message).hex(),
            "sealed": envelope.hex(),
        },
        "key_record": key_record.hex(),
    }


if __name__ == "__main__":
    VECTOR_FILE.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n", "utf-8")
