"""Selective disclosure: protected values verify when revealed, can be withheld, and can't be forged or moved."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.shared import disclosure
from services.shared.avro import AvroCodec
from services.shared.envelope import ENVELOPE_SCHEMA, open_envelope, seal, with_disclosures
from services.shared.errors import DecodeError, InvalidSignature, PayloadTooLarge
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry
from tests.shared.records import TOPIC_DE, evidence_event, evidence_withdrawal

WITNESS: Final = disclosure.make("witness_name", "Ольга Шевченко", label="WITNESS_IDENTIFYING", salt=b"\x01" * 16)
LOCATION: Final = disclosure.make("location_exact", "33.5138,36.2765", label="LOCATION_EXACT", salt=b"\x02" * 16)
VICTIM: Final = disclosure.make("victim_name", "Ahmad K.", label="VICTIM_IDENTIFYING", salt=b"\x03" * 16)
ALL: Final = (WITNESS, LOCATION, VICTIM)
SIGNED: Final = [{"label": d.label, "digest": d.digest} for d in ALL]


def test_disclosure_format_is_sd_jwt_like() -> None:
    decoded = json.loads(base64.urlsafe_b64decode(WITNESS.encoded + "=" * (-len(WITNESS.encoded) % 4)))
    assert decoded == [base64.urlsafe_b64encode(b"\x01" * 16).rstrip(b"=").decode(), "witness_name", "Ольга Шевченко"]
    expected = base64.urlsafe_b64encode(hashlib.sha256(WITNESS.encoded.encode("ascii")).digest()).rstrip(b"=")
    assert WITNESS.digest == expected.decode()
    assert "=" not in WITNESS.encoded + WITNESS.digest


def test_make_and_reveal_round_trip() -> None:
    revealed = disclosure.reveal([d.encoded for d in ALL], SIGNED)
    assert {f: (d.value, d.label) for f, d in revealed.items()} == {
        "witness_name": ("Ольга Шевченко", "WITNESS_IDENTIFYING"),
        "location_exact": ("33.5138,36.2765", "LOCATION_EXACT"),
        "victim_name": ("Ahmad K.", "VICTIM_IDENTIFYING"),
    }


def test_same_value_with_another_salt_has_another_digest() -> None:
    again = disclosure.make("witness_name", "Ольга Шевченко", label="WITNESS_IDENTIFYING", salt=b"\x09" * 16)
    assert again.digest != WITNESS.digest  # a digest alone doesn't let anyone confirm a guessed name


def test_short_salts_are_refused() -> None:
    with pytest.raises(ValueError, match="128 bits"):
        disclosure.make("f", "v", label="MINOR", salt=b"\x00" * 15)


def _changed_char(text: str, index: int) -> str:
    replacement = "A" if text[index] != "A" else "B"
    return text[:index] + replacement + text[index + 1 :]


OTHER_ITEM: Final = disclosure.make("witness_name", "Someone else", label="WITNESS_IDENTIFYING", salt=b"\x04" * 16)
_SIGNED_NOT_JSON: Final = disclosure.digest_of("bm90IGpzb24")  # base64url("not json"), signed by a buggy publisher
_SIGNED_NOT_TRIPLE: Final = disclosure.digest_of("WzEsMiwzXQ")  # base64url("[1,2,3]")

REFUSED: Final[list[tuple[str, str, list[dict[str, str]], type[Exception]]]] = [
    ("one_character_changed", _changed_char(WITNESS.encoded, 10), SIGNED, InvalidSignature),
    ("last_character_changed", _changed_char(WITNESS.encoded, -1), SIGNED, InvalidSignature),
    ("padding_added", WITNESS.encoded + "==", SIGNED, InvalidSignature),
    ("moved_from_another_item", OTHER_ITEM.encoded, SIGNED, InvalidSignature),
    ("forged_with_a_fresh_salt", disclosure.make("witness_name", "Forged", label="WITNESS_IDENTIFYING",
                                                 salt=b"\x05" * 16).encoded, SIGNED, InvalidSignature),
    ("its_digest_not_among_the_signed", WITNESS.encoded, [SIGNED[1]], InvalidSignature),
    ("oversized", "A" * (disclosure.MAX_DISCLOSURE_CHARS + 1), SIGNED, DecodeError),
    ("non_ascii", WITNESS.encoded + "é", SIGNED, DecodeError),
    ("signed_but_not_json", "bm90IGpzb24", [*SIGNED, {"label": "MINOR", "digest": _SIGNED_NOT_JSON}], DecodeError),
    ("signed_but_not_a_string_triple", "WzEsMiwzXQ", [*SIGNED, {"label": "MINOR", "digest": _SIGNED_NOT_TRIPLE}],
     DecodeError),
]  # fmt: skip


@pytest.mark.parametrize(("encoded", "signed", "error"), [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_reveal_refuses(encoded: str, signed: list[dict[str, str]], error: type[Exception]) -> None:
    with pytest.raises(error):
        disclosure.reveal([LOCATION.encoded, encoded], signed)


@given(index=st.integers(min_value=0, max_value=len(WITNESS.encoded) - 1), char=st.characters(codec="ascii"))
def test_any_single_character_change_is_refused(index: int, char: str) -> None:
    changed = WITNESS.encoded[:index] + char + WITNESS.encoded[index + 1 :]
    if changed == WITNESS.encoded:
        return
    with pytest.raises(InvalidSignature):
        disclosure.reveal([changed], SIGNED)


def test_visible_forwards_only_allowed_labels_and_drops_unknown_digests() -> None:
    offered = [WITNESS.encoded, "forged", OTHER_ITEM.encoded, LOCATION.encoded, "é", VICTIM.encoded]
    assert disclosure.visible(offered, SIGNED, allowed={"LOCATION_EXACT"}) == [LOCATION.encoded]
    everything = {"WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT"}
    assert disclosure.visible(offered, SIGNED, allowed=everything) == [WITNESS.encoded, LOCATION.encoded,
                                                                       VICTIM.encoded]  # fmt: skip
    assert disclosure.visible(offered, SIGNED, allowed=()) == []


def test_visible_withholds_a_label_nobody_allowed() -> None:
    """The reproduction of issue 8: a value labelled UNKNOWN was forwarded because nobody withheld it."""
    unknown = disclosure.make("source_name", "N. N.", label="UNKNOWN", salt=b"\x07" * 16)
    signed = [*SIGNED, {"label": "UNKNOWN", "digest": unknown.digest}]
    allowed = {"LOCATION_EXACT", "VICTIM_IDENTIFYING"}  # what an office without PROTECTION clearance is allowed
    assert disclosure.visible([unknown.encoded, LOCATION.encoded], signed, allowed=allowed) == [LOCATION.encoded]


def test_a_reader_given_some_disclosures_still_verifies_and_sees_only_those(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey
) -> None:
    """The gateway's path: drop what the office may not see; the publisher's signature still holds."""
    record = evidence_event(key_id=publisher.key_id, protected=SIGNED)
    sealed = seal(codec, schema="evidence_event", record=record, topic=TOPIC_DE, signer=publisher, sequence=1,
                  disclosures=[d.encoded for d in ALL])  # fmt: skip
    forwarded = with_disclosures(
        codec,
        sealed,
        disclosure.visible([d.encoded for d in ALL], record["protected"], allowed={"LOCATION_EXACT"}),
    )
    assert WITNESS.encoded.encode() not in forwarded
    assert VICTIM.encoded.encode() not in forwarded

    verified = open_envelope(codec, forwarded, topic=TOPIC_DE, keys=registry)
    assert verified.disclosures == (LOCATION.encoded,)
    revealed = disclosure.reveal(verified.disclosures, verified.record["protected"])
    assert {f: d.value for f, d in revealed.items()} == {"location_exact": "33.5138,36.2765"}


def _sealed_with_all(codec: AvroCodec, publisher: SigningKey) -> bytes:
    record = evidence_event(key_id=publisher.key_id, protected=SIGNED)
    return seal(codec, schema="evidence_event", record=record, topic=TOPIC_DE, signer=publisher, sequence=1,
                disclosures=[d.encoded for d in ALL])  # fmt: skip


def test_a_disclosure_slipped_into_a_forwarded_envelope_is_refused_when_opened(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey
) -> None:
    """Disclosures are unsigned bytes of the envelope; open_envelope checks each against the signed digests."""
    record = evidence_event(key_id=publisher.key_id, protected=SIGNED)
    sealed = seal(codec, schema="evidence_event", record=record, topic=TOPIC_DE, signer=publisher, sequence=1)
    forged = disclosure.make("witness_name", "Framed person", label="WITNESS_IDENTIFYING", salt=b"\x06" * 16)
    with pytest.raises(InvalidSignature):
        open_envelope(codec, with_disclosures(codec, sealed, [forged.encoded]), topic=TOPIC_DE, keys=registry)
    assert codec.decode(sealed, expect=ENVELOPE_SCHEMA)["disclosures"] == []


def test_a_byte_flipped_inside_a_disclosure_is_refused_when_opened(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey
) -> None:
    """The issue 8 reproduction: only reveal() used to notice."""
    sealed = _sealed_with_all(codec, publisher)
    flipped = _changed_char(VICTIM.encoded, 20)
    tampered = with_disclosures(codec, sealed, [WITNESS.encoded, flipped])
    with pytest.raises(InvalidSignature):
        open_envelope(codec, tampered, topic=TOPIC_DE, keys=registry)
    assert open_envelope(codec, sealed, topic=TOPIC_DE, keys=registry).disclosures == tuple(d.encoded for d in ALL)


def test_every_bit_of_every_disclosure_is_covered(
    codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey
) -> None:
    """Exhaustive: the lowest bit flipped at each byte of the envelope, disclosures included, is refused."""
    sealed = _sealed_with_all(codec, publisher)
    start = sealed.index(WITNESS.encoded.encode())
    accepted = []
    for position in range(start, len(sealed)):
        changed = bytearray(sealed)
        changed[position] ^= 0x01
        try:
            open_envelope(codec, bytes(changed), topic=TOPIC_DE, keys=registry)
        except (DecodeError, InvalidSignature, PayloadTooLarge):
            continue
        accepted.append(position)
    assert accepted == []


def test_a_withdrawal_carries_no_disclosure(codec: AvroCodec, registry: KeyRegistry, publisher: SigningKey) -> None:
    withdrawal = seal(codec, schema="evidence_withdrawal", record=evidence_withdrawal(key_id=publisher.key_id),
                      topic=TOPIC_DE, signer=publisher, sequence=2)  # fmt: skip
    with pytest.raises(InvalidSignature):
        open_envelope(codec, with_disclosures(codec, withdrawal, [WITNESS.encoded]), topic=TOPIC_DE, keys=registry)
