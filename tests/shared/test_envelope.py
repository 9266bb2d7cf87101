"""Signed envelopes: what verifies, every way tampering is caught, and replays across sequence numbers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.shared.avro import AvroCodec
from services.shared.envelope import (
    ENVELOPE_SCHEMA,
    MAX_SIGNATURES,
    PAYLOAD_TYPES,
    Verified,
    open_envelope,
    pae,
    seal,
)
from services.shared.errors import (
    DecodeError,
    EvidenceHubError,
    InvalidSignature,
    PayloadTooLarge,
    ReplayDetected,
    TrustError,
    UntrustedKey,
)
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry, issue
from services.shared.sequences import SequenceTracker
from tests.shared.records import (
    ANCHOR_SEED,
    NOT_AFTER,
    NOT_BEFORE,
    NOW,
    ORG,
    PUBLISHER_SEED,
    TOPIC_DE,
    TOPIC_FR,
    evidence_event,
    evidence_withdrawal,
    seed_key,
    signing_key_from_seed,
)

EVENT_TYPE: Final = PAYLOAD_TYPES["evidence_event"]
WITHDRAWAL_TYPE: Final = PAYLOAD_TYPES["evidence_withdrawal"]


def _seal_event(codec: AvroCodec, signer: SigningKey, *, sequence: int = 1, topic: str = TOPIC_DE,
                **fields: Any) -> bytes:  # fmt: skip
    record = evidence_event(key_id=signer.key_id, **fields)
    return seal(codec, schema="evidence_event", record=record, topic=topic, signer=signer, sequence=sequence)


def test_pae_is_length_prefixed_and_binds_every_field() -> None:
    assert pae("t", "evidence.DE", "k", 7, b"\x00p") == b"EVHUB-DSSEv1 1 t 11 evidence.DE 1 k 1 7 2 \x00p"
    # Length prefixes keep fields from sliding into each other.
    assert pae("ab", "c", "k", 1, b"") != pae("a", "bc", "k", 1, b"")


def test_seal_and_open_round_trip(codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey) -> None:
    data = _seal_event(codec, publisher, sequence=5)
    verified = open_envelope(codec, data, topic=TOPIC_DE, keys=registry)
    assert verified == Verified(
        payload_type=EVENT_TYPE, schema="evidence_event", record=evidence_event(key_id=publisher.key_id),
        key_id=publisher.key_id, sequence=5, disclosures=(),
    )  # fmt: skip


def test_withdrawals_round_trip_too(codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey) -> None:
    record = evidence_withdrawal(key_id=publisher.key_id)
    data = seal(codec, schema="evidence_withdrawal", record=record, topic=TOPIC_DE, signer=publisher, sequence=2)
    verified = open_envelope(codec, data, topic=TOPIC_DE, keys=registry)
    assert (verified.schema, verified.payload_type, verified.record) == ("evidence_withdrawal", WITHDRAWAL_TYPE, record)


def test_sequence_numbers_start_at_one(codec: AvroCodec, publisher: SigningKey) -> None:
    with pytest.raises(ValueError, match="start at 1"):
        _seal_event(codec, publisher, sequence=0)


# --- tampering ---------------------------------------------------------------------------------------------------


def _edit(codec: AvroCodec, data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    raw = codec.decode(data, expect=ENVELOPE_SCHEMA)
    change(raw)
    return codec.encode(ENVELOPE_SCHEMA, raw)


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw[field] = value

    return change


def _set_sig(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["signatures"][0][field] = value

    return change


_OTHER: Final = seed_key(7)  # trusted too (same organisation), but did not sign the envelope under test
_UNKNOWN: Final = seed_key(8)  # never registered


def _world() -> tuple[AvroCodec, SigningKey, SigningKey]:
    return AvroCodec.load(), signing_key_from_seed(ANCHOR_SEED), signing_key_from_seed(PUBLISHER_SEED)


_CODEC, _ANCHOR, _PUBLISHER = _world()
_GOOD: Final = _seal_event(_CODEC, _PUBLISHER, sequence=3)
_GOOD_RAW: Final = _CODEC.decode(_GOOD, expect=ENVELOPE_SCHEMA)
_OTHER_ENVELOPE_RAW: Final = _CODEC.decode(
    _seal_event(_CODEC, _PUBLISHER, sequence=4, event_id="ev-0002"), expect=ENVELOPE_SCHEMA
)
_FR_EVENT_SIGNED_FOR_FR: Final = _seal_event(_CODEC, _PUBLISHER, sequence=3, topic=TOPIC_FR, jurisdiction="FR")


def _registry() -> KeyRegistry:
    reg = KeyRegistry(_CODEC, anchors=[_ANCHOR.public])
    for key in (_PUBLISHER, _OTHER):
        reg.apply(issue(_CODEC, _ANCHOR, public_key=key.public, organisation=ORG, not_before=NOT_BEFORE,
                        not_after=NOT_AFTER))  # fmt: skip
    return reg


def _sig_by(signer: SigningKey, **overrides: Any) -> dict[str, Any]:
    fields = {"payload_type": EVENT_TYPE, "topic": TOPIC_DE, "key_id": signer.key_id, "sequence": 3,
              "payload": _GOOD_RAW["payload"], **overrides}  # fmt: skip
    message = pae(fields["payload_type"], fields["topic"], fields["key_id"], fields["sequence"], fields["payload"])
    return {"key_id": fields["key_id"], "sequence": fields["sequence"], "sig": signer.sign(message)}


TAMPERED: Final[list[tuple[str, bytes, str, type[EvidenceHubError]]]] = [
    ("read_from_another_jurisdictions_topic", _GOOD, TOPIC_FR, InvalidSignature),
    ("topic_field_rewritten_and_read_there", _edit(_CODEC, _GOOD, _set("topic", TOPIC_FR)), TOPIC_FR,
     InvalidSignature),
    ("topic_field_rewritten_read_from_signed_topic", _edit(_CODEC, _GOOD, _set("topic", TOPIC_FR)), TOPIC_DE,
     InvalidSignature),
    ("signed_for_FR_read_from_DE", _FR_EVENT_SIGNED_FOR_FR, TOPIC_DE, InvalidSignature),
    ("signed_for_topic_but_record_names_other_jurisdiction",
     _seal_event(_CODEC, _PUBLISHER, topic=TOPIC_FR, jurisdiction="DE"), TOPIC_FR, InvalidSignature),
    ("payload_type_swapped_to_withdrawal", _edit(_CODEC, _GOOD, _set("payload_type", WITHDRAWAL_TYPE)), TOPIC_DE,
     InvalidSignature),
    ("payload_type_unknown", _edit(_CODEC, _GOOD, _set("payload_type", "application/json")), TOPIC_DE, DecodeError),
    ("payload_from_another_envelope", _edit(_CODEC, _GOOD, _set("payload", _OTHER_ENVELOPE_RAW["payload"])),
     TOPIC_DE, InvalidSignature),
    ("signatures_emptied", _edit(_CODEC, _GOOD, _set("signatures", [])), TOPIC_DE, InvalidSignature),
    ("too_many_signatures", _edit(_CODEC, _GOOD, _set("signatures", _GOOD_RAW["signatures"] * (MAX_SIGNATURES + 1))),
     TOPIC_DE, InvalidSignature),
    ("signature_from_another_envelope", _edit(_CODEC, _GOOD, _set_sig("sig", _OTHER_ENVELOPE_RAW["signatures"][0][
        "sig"])), TOPIC_DE, InvalidSignature),
    ("sequence_renumbered", _edit(_CODEC, _GOOD, _set_sig("sequence", 4)), TOPIC_DE, InvalidSignature),
    ("key_id_of_another_trusted_key", _edit(_CODEC, _GOOD, _set_sig("key_id", _OTHER.key_id)), TOPIC_DE,
     InvalidSignature),
    ("signature_truncated", _edit(_CODEC, _GOOD, _set_sig("sig", _GOOD_RAW["signatures"][0]["sig"][:32])), TOPIC_DE,
     InvalidSignature),
    ("signed_by_unknown_key", _edit(_CODEC, _GOOD, _set("signatures", [_sig_by(_UNKNOWN)])), TOPIC_DE, UntrustedKey),
    ("unknown_key_claims_trusted_key_id", _edit(_CODEC, _GOOD, _set("signatures", [
        {**_sig_by(_UNKNOWN), "key_id": _PUBLISHER.key_id}])), TOPIC_DE, InvalidSignature),
    ("not_an_envelope", _CODEC.encode("evidence_event", evidence_event(key_id=_PUBLISHER.key_id)), TOPIC_DE,
     DecodeError),
    ("over_the_size_limit", _GOOD + bytes(1 << 20), TOPIC_DE, PayloadTooLarge),
]  # fmt: skip


@pytest.mark.parametrize(("data", "topic", "error"), [row[1:] for row in TAMPERED], ids=[row[0] for row in TAMPERED])
def test_tampered_envelope_is_refused(data: bytes, topic: str, error: type[EvidenceHubError]) -> None:
    with pytest.raises(error):
        open_envelope(_CODEC, data, topic=topic, keys=_registry())


def test_the_untampered_envelope_of_the_table_verifies() -> None:
    assert open_envelope(_CODEC, _GOOD, topic=TOPIC_DE, keys=_registry()).sequence == 3
    assert open_envelope(_CODEC, _FR_EVENT_SIGNED_FOR_FR, topic=TOPIC_FR, keys=_registry()).record[
        "jurisdiction"] == "FR"  # fmt: skip


def test_one_good_signature_among_bad_ones_is_enough() -> None:
    signatures = [_sig_by(_UNKNOWN), {**_GOOD_RAW["signatures"][0], "sig": bytes(64)}, _GOOD_RAW["signatures"][0]]
    data = _edit(_CODEC, _GOOD, _set("signatures", signatures))
    assert open_envelope(_CODEC, data, topic=TOPIC_DE, keys=_registry()).key_id == _PUBLISHER.key_id


_REGISTRY: Final = _registry()


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_rejected(data: st.DataObject) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(_GOOD) - 1), label="position")
    xor = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    changed = bytearray(_GOOD)
    changed[position] ^= xor
    try:
        verified = open_envelope(_CODEC, bytes(changed), topic=TOPIC_DE, keys=_REGISTRY)
    except (DecodeError, PayloadTooLarge, TrustError):
        return
    same = verified.record == evidence_event(key_id=_PUBLISHER.key_id)
    pytest.fail(f"byte {position} ^ {xor:#04x} was accepted; the record is {'the same' if same else 'CHANGED'}")


def test_every_byte_position_with_one_bit_flipped_is_rejected() -> None:
    """Exhaustive companion of the property above, for the lowest bit of every byte."""
    accepted = []
    for position in range(len(_GOOD)):
        changed = bytearray(_GOOD)
        changed[position] ^= 0x01
        try:
            open_envelope(_CODEC, bytes(changed), topic=TOPIC_DE, keys=_REGISTRY)
        except (DecodeError, PayloadTooLarge, TrustError):
            continue
        accepted.append(position)
    assert accepted == []


# --- key validity: revocation, expiry --------------------------------------------------------------------------


def _registry_with(codec: AvroCodec, anchor: SigningKey, signer: SigningKey, **validity: Any) -> KeyRegistry:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    fields: dict[str, Any] = {"not_before": NOT_BEFORE, "not_after": NOT_AFTER, **validity}
    reg.apply(issue(codec, anchor, public_key=signer.public, organisation=ORG, **fields))
    return reg


def test_events_signed_before_a_revocation_still_verify(
    codec: AvroCodec, anchor: SigningKey, publisher: SigningKey
) -> None:
    reg = _registry_with(codec, anchor, publisher, revoked_at=NOW, last_valid_sequence=10, revision=2)
    assert open_envelope(codec, _seal_event(codec, publisher, sequence=10), topic=TOPIC_DE, keys=reg).sequence == 10
    assert open_envelope(codec, _seal_event(codec, publisher, sequence=1), topic=TOPIC_DE, keys=reg).sequence == 1
    with pytest.raises(UntrustedKey):
        open_envelope(codec, _seal_event(codec, publisher, sequence=11), topic=TOPIC_DE, keys=reg)


def test_revoked_without_a_last_valid_sequence_verifies_nothing(
    codec: AvroCodec, anchor: SigningKey, publisher: SigningKey
) -> None:
    reg = _registry_with(codec, anchor, publisher, revoked_at=NOW, revision=2)
    with pytest.raises(UntrustedKey):
        open_envelope(codec, _seal_event(codec, publisher, sequence=1), topic=TOPIC_DE, keys=reg)


@pytest.mark.parametrize(
    ("published_at", "error"),
    [
        (NOT_AFTER, UntrustedKey),
        (NOT_AFTER + timedelta(days=30), UntrustedKey),
        (NOT_BEFORE - timedelta(milliseconds=1), UntrustedKey),
        (NOT_AFTER - timedelta(milliseconds=1), None),
        (NOT_BEFORE, None),
    ],
    ids=["at_not_after_expired", "after_not_after", "before_not_before", "last_valid_millisecond", "at_not_before"],
)
def test_key_must_be_valid_when_the_event_was_published(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey, published_at: Any, error: type[Exception] | None
) -> None:
    data = _seal_event(codec, publisher, published_at=published_at)
    if error is None:
        assert open_envelope(codec, data, topic=TOPIC_DE, keys=registry).record["published_at"] == published_at
    else:
        with pytest.raises(error):
            open_envelope(codec, data, topic=TOPIC_DE, keys=registry)


# --- sequence tracking ------------------------------------------------------------------------------------------


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_replaying_a_verified_envelope_under_its_own_sequence_is_detected(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey
) -> None:
    """End to end: two different events signed with the same sequence number (e.g. a signer restored from backup)."""
    tracker = SequenceTracker()
    first, second = _seal_event(codec, publisher, sequence=1), _seal_event(codec, publisher, sequence=1, event_id="x")
    verified = open_envelope(codec, first, topic=TOPIC_DE, keys=registry)
    assert tracker.observe(verified.key_id, TOPIC_DE, verified.sequence, _digest(first))
    verified = open_envelope(codec, second, topic=TOPIC_DE, keys=registry)  # the signature itself is fine
    with pytest.raises(ReplayDetected):
        tracker.observe(verified.key_id, TOPIC_DE, verified.sequence, _digest(second))


@pytest.mark.parametrize(
    "claim",
    [{"organisation": "Another group"}, {"key_id": "0" * 64}],
    ids=["another-organisation", "another-key-id"],
)
def test_an_event_naming_another_publisher_than_its_signer_is_refused(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey, claim: dict[str, str]
) -> None:
    record = evidence_event(key_id=publisher.key_id)
    record["publisher"] = {**record["publisher"], **claim}
    data = seal(codec, schema="evidence_event", record=record, topic=TOPIC_DE, signer=publisher, sequence=1)
    with pytest.raises(UntrustedKey, match="another publisher"):
        open_envelope(codec, data, topic=TOPIC_DE, keys=registry)
