"""What offices are sent, rendered once per record and view: the feed's JSON text is exactly the documented event,
the redaction is per view (never shared between views), and what is cached is never changed by a later read."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest

from services.gateway import sse
from services.gateway.release import (
    AuditLocation,
    EvidenceRecord,
    Outcome,
    Requester,
    attributes_of,
    decide_record,
    released_event,
    released_json,
    withheld_event,
    withheld_json,
)
from services.gateway.service import RandomIds
from services.policy.model import Decision
from services.shared import disclosure
from services.shared.avro import AvroCodec
from services.shared.envelope import seal
from services.shared.principals import Principal
from tests.shared.records import PUBLISHER_SEED, evidence_event, signing_key_from_seed

AT = datetime(2026, 5, 1, tzinfo=UTC)
WHERE = AuditLocation("hub.audit", 0, 41873, 3)
WITNESS = disclosure.make("witness.name", "A. K.", label="WITNESS_IDENTIFYING", salt=b"\x01" * 16)
PLACE = disclosure.make("location.exact", "33.5N", label="LOCATION_EXACT", salt=b"\x02" * 16)


def _record(codec: AvroCodec) -> EvidenceRecord:
    signer = signing_key_from_seed(PUBLISHER_SEED)
    event = evidence_event(key_id=signer.key_id, protected=[{"label": d.label, "digest": d.digest}
                                                            for d in (WITNESS, PLACE)])  # fmt: skip
    envelope = seal(codec, schema="evidence_event", record=event, topic="evidence.DE", signer=signer, sequence=3,
                    disclosures=[WITNESS.encoded, PLACE.encoded])  # fmt: skip
    return EvidenceRecord(topic="evidence.DE", partition=1, offset=7, envelope=envelope, envelope_sha256="0" * 64,
                          payload_type="application/vnd.evidencehub.evidence-event.v1+avro", schema="evidence_event",
                          record=event, key_id=signer.key_id, sequence=3,
                          disclosures=(WITNESS.encoded, PLACE.encoded))  # fmt: skip


def _outcome(record: EvidenceRecord, office: str, disclosed: tuple[str, ...]) -> Outcome:
    who = Requester(principal=Principal("office", office, "c" * 64), request_id="r", gateway="gw", purpose=None)
    decision = Decision(allowed=True, disclosed_fields=disclosed, policy_version="v")
    return decide_record(record, who=who, at=AT, entry_id=str(uuid.uuid4()),
                         attributes=attributes_of(record, withdrawn=False), decide=lambda a: decision)  # fmt: skip


@pytest.mark.parametrize("late", [False, True])
def test_the_feed_text_is_the_documented_event(codec: AvroCodec, late: bool) -> None:
    record = _record(codec)
    outcome = _outcome(record, "SE-IPC", ("LOCATION_EXACT",))
    text = released_json(outcome, codec=codec, cursor="c1", audit=WHERE, late=late)
    assert "\n" not in text
    assert text.isascii()
    assert json.loads(text) == released_event(outcome, codec=codec, cursor="c1", audit=WHERE, late=late)


def test_each_view_is_rendered_once_and_never_leaks_into_another(codec: AvroCodec) -> None:
    record = _record(codec)
    se = json.loads(released_json(_outcome(record, "SE-IPC", ("LOCATION_EXACT",)), codec=codec, cursor="a",
                                  audit=WHERE))  # fmt: skip
    other_se = json.loads(released_json(_outcome(record, "SE-X", ("LOCATION_EXACT",)), codec=codec, cursor="b",
                                        audit=WHERE))  # fmt: skip
    de = json.loads(released_json(_outcome(record, "DE-GBA-WCU", ("LOCATION_EXACT", "WITNESS_IDENTIFYING")),
                                  codec=codec, cursor="c", audit=WHERE))  # fmt: skip
    assert len(record.renders) == 2  # two views, whatever the number of offices and reads

    def carried(event: dict[str, object]) -> set[str]:
        raw = codec.decode(base64.b64decode(str(event["envelope"])), expect="signed_envelope")
        return set(raw["disclosures"])

    assert carried(se) == carried(other_se) == {PLACE.encoded}
    assert carried(de) == {PLACE.encoded, WITNESS.encoded}
    assert (se["receipt"], se["cursor"]) != (other_se["receipt"], other_se["cursor"])  # per office, per read
    assert se["withheld_fields"] == ["WITNESS_IDENTIFYING"]
    assert de["withheld_fields"] == []


def test_a_withdrawn_read_never_changes_the_cached_signed_attributes(codec: AvroCodec) -> None:
    record = _record(codec)
    assert attributes_of(record, withdrawn=True).withdrawn is True
    assert attributes_of(record, withdrawn=False).withdrawn is False
    assert record.signed_attributes is not None
    assert record.signed_attributes.withdrawn is False


def test_withheld_text_and_sse_frames_of_text(codec: AvroCodec) -> None:
    record = _record(codec)
    refused = Decision(allowed=False, policy_version="v")
    who = Requester(principal=Principal("office", "SE-IPC", "c" * 64), request_id="r", gateway="gw", purpose=None)
    outcome = decide_record(record, who=who, at=AT, entry_id="e1", attributes=attributes_of(record, withdrawn=False),
                            decide=lambda a: refused)  # fmt: skip
    text = withheld_json(outcome, cursor="c9", audit=WHERE)
    assert json.loads(text) == withheld_event(outcome, cursor="c9", audit=WHERE)
    assert set(json.loads(text)) == {"type", "cursor", "receipt", "audit"}
    data = {"type": "withheld", "cursor": "c9"}
    assert sse.frame_json("withheld", json.dumps(data, separators=(",", ":")), event_id="c9") == sse.frame(
        "withheld", data, event_id="c9")  # fmt: skip
    with pytest.raises(ValueError, match="line break"):
        sse.frame_json("event", '{"a":\n1}')


def test_receipt_ids_are_distinct_version_4_uuids() -> None:
    ids = RandomIds(batch=4)
    made = [ids() for _ in range(1000)]
    assert len(set(made)) == 1000
    for text in made:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
