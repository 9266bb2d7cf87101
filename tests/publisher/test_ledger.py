"""The start-up check's pure core: each way a record read back from Kafka can relate to what the state signed, as a
named row, and the one-line refusals. Real envelopes (sealed with a real key), a real outbox row type, no Kafka."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.publisher.ledger import TopicLedger, claimed, intact
from services.publisher.state import OutboxRow
from services.shared.avro import AvroCodec
from services.shared.envelope import seal
from services.shared.errors import StateRefused
from services.shared.keys import SigningKey

TOPIC = "evidence.DE"
KEY = SigningKey.generate()
OTHER = SigningKey.generate()


def _withdrawal(codec: AvroCodec, signer: SigningKey, sequence: int, reason: str = "duplicate") -> bytes:
    record = {"event_id": f"e-{sequence}-{reason}", "item_id": "ITEM-1", "withdrawn_version": 1,
              "publisher": {"organisation": "group", "key_id": signer.key_id}, "case_ids": ["C-1"],
              "jurisdiction": "DE", "reason": reason, "published_at": datetime(2026, 1, 1, tzinfo=UTC)}  # fmt: skip
    return seal(codec, schema="evidence_withdrawal", record=record, topic=TOPIC, signer=signer, sequence=sequence)


def _row(envelope: bytes, sequence: int, *, offset: int | None = None) -> OutboxRow:
    return OutboxRow(f"e-{sequence}", "DE", TOPIC, b"C-1", KEY.key_id, sequence, envelope,
                     None if offset is None else 0, offset)  # fmt: skip


def _ledger(counter: int = 10) -> TopicLedger:
    return TopicLedger(topic=TOPIC, key=KEY.public, counter=counter)


def test_an_envelope_the_state_holds_and_marked_is_known(codec: AvroCodec) -> None:
    env = _withdrawal(codec, KEY, 3)
    ledger = _ledger()
    found = claimed(codec, KEY.key_id, 0, 7, env)
    assert found is not None
    ledger.observe(found, _row(env, 3, offset=7))
    assert (ledger.known, ledger.marks, ledger.redeliveries, ledger.highest) == (1, [], 0, 3)
    ledger.verdict()


def test_an_envelope_acknowledged_but_never_marked_is_marked_not_sent_again(codec: AvroCodec) -> None:
    env = _withdrawal(codec, KEY, 4)
    ledger, held = _ledger(), _row(env, 4)
    found = claimed(codec, KEY.key_id, 2, 11, env)
    assert found is not None
    ledger.observe(found, held)
    assert ledger.marks == [(held, found)]
    again = claimed(codec, KEY.key_id, 1, 30, env)  # the same bytes at a second offset
    assert again is not None
    ledger.observe(again, held)
    assert ledger.redeliveries == 1
    assert len(ledger.marks) == 1, "marked once, at its first offset"
    ledger.verdict()


def test_a_signature_of_this_key_the_state_never_made_means_the_state_is_behind(codec: AvroCodec) -> None:
    ledger = _ledger(counter=2)
    for sequence in (5, 9, 7):
        found = claimed(codec, KEY.key_id, 0, sequence, _withdrawal(codec, KEY, sequence))
        assert found is not None
        ledger.observe(found, None)
    with pytest.raises(StateRefused) as refused:
        ledger.verdict()
    line = refused.value.detail
    assert "evidence.DE already holds sequence 9 signed by this key" in line, "the topic and Kafka's number"
    assert "its counter is 2" in line, "and the state's number"
    assert "evhub publisher recover" in line
    assert "\n" not in line


def test_another_envelope_under_a_number_the_state_used_is_a_conflict(codec: AvroCodec) -> None:
    ours, theirs = _withdrawal(codec, KEY, 6, "ours"), _withdrawal(codec, KEY, 6, "theirs")
    ledger = _ledger()
    found = claimed(codec, KEY.key_id, 0, 3, theirs)
    assert found is not None
    ledger.observe(found, _row(ours, 6))
    with pytest.raises(StateRefused, match=r"holds sequence 6 of this key .* with another envelope"):
        ledger.verdict()


def test_a_record_claiming_this_key_whose_signature_fails_is_ignored_as_forged(codec: AvroCodec) -> None:
    forged = bytearray(_withdrawal(codec, KEY, 8))
    forged[-40] ^= 1  # inside the signature bytes
    ledger = _ledger(counter=0)
    found = claimed(codec, KEY.key_id, 0, 0, bytes(forged))
    assert found is not None
    ledger.observe(found, None)
    assert (ledger.forged, ledger.unknown, ledger.highest) == (1, [], 0)
    ledger.verdict()  # a forger cannot stop the publisher


@pytest.mark.parametrize(
    "value", [None, b"", b"junk", b"\xc3\x01" + b"\x00" * 40], ids=["none", "empty", "junk", "bad-fingerprint"]
)
def test_other_keys_and_undecodable_records_are_not_this_keys(codec: AvroCodec, value: bytes | None) -> None:
    assert claimed(codec, KEY.key_id, 0, 0, value) is None
    assert claimed(codec, KEY.key_id, 0, 0, _withdrawal(codec, OTHER, 1)) is None


def test_a_damaged_stored_envelope_is_not_intact(codec: AvroCodec) -> None:
    env = _withdrawal(codec, KEY, 2)
    assert intact(codec, KEY.public, TOPIC, 2, env)
    assert not intact(codec, KEY.public, TOPIC, 3, env), "another sequence number"
    assert not intact(codec, KEY.public, "evidence.FR", 2, env), "another topic"
    damaged = bytearray(env)
    damaged[len(damaged) // 2] ^= 0x10
    assert not intact(codec, KEY.public, TOPIC, 2, bytes(damaged))


def test_signing_at_or_below_what_kafka_holds_is_refused(codec: AvroCodec) -> None:
    ledger = _ledger()
    env = _withdrawal(codec, KEY, 12)
    found = claimed(codec, KEY.key_id, 0, 0, env)
    assert found is not None
    ledger.observe(found, _row(env, 12, offset=0))
    assert not ledger.may_sign(12)
    assert not ledger.may_sign(3)
    assert ledger.may_sign(13)
