"""The key registry: only anchor-signed, well-formed, fresh key records are applied; bad ones are counted."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import pytest

from services.shared.avro import AvroCodec
from services.shared.envelope import open_envelope, seal
from services.shared.errors import (
    ConfigurationError,
    DecodeError,
    EvidenceHubError,
    InvalidSignature,
    UntrustedKey,
)
from services.shared.keys import SigningKey
from services.shared.registry import KEY_RECORD_SCHEMA, KeyRegistry, issue
from tests.shared.records import NOT_AFTER, NOT_BEFORE, NOW, ORG, TOPIC_DE, evidence_event, seed_key

IDENTITY: Final = bytes([1]) + bytes(31)


def _record(anchor: SigningKey, key: SigningKey, **overrides: Any) -> dict[str, Any]:
    return {
        "key_id": key.key_id, "public_key": key.public.raw, "organisation": ORG, "not_before": NOT_BEFORE,
        "not_after": NOT_AFTER, "revoked_at": None, "last_valid_sequence": None, "revision": 1,
        "anchor_key_id": anchor.key_id, "anchor_sig": b"", **overrides,
    }  # fmt: skip


def _signed(codec: AvroCodec, signer: SigningKey, record: dict[str, Any]) -> bytes:
    """A key record signed the way the registry checks it: over the record with anchor_sig empty."""
    record = {**record, "anchor_sig": b""}
    record["anchor_sig"] = signer.sign(codec.encode(KEY_RECORD_SCHEMA, record))
    return codec.encode(KEY_RECORD_SCHEMA, record)


def test_an_issued_key_is_applied(codec: AvroCodec, anchor: SigningKey) -> None:
    key = seed_key(20)
    reg = KeyRegistry(codec, anchors=[anchor.public])
    entry = reg.apply(issue(codec, anchor, public_key=key.public, organisation=ORG, not_before=NOT_BEFORE))
    assert (entry.key.key_id, entry.organisation, entry.not_before, entry.not_after, entry.revision) == (
        key.key_id, ORG, NOT_BEFORE, None, 1)  # fmt: skip
    assert reg.resolve(key.key_id, sequence=1, topic=TOPIC_DE).raw == key.public.raw
    assert len(reg) == 1
    assert reg.rejected == 0


def test_issue_matches_the_documented_signing_rule(codec: AvroCodec, anchor: SigningKey) -> None:
    """issue() and an independent signer following the schema's doc produce the same record."""
    key = seed_key(21)
    issued = issue(codec, anchor, public_key=key.public, organisation=ORG, not_before=NOT_BEFORE,
                   not_after=NOT_AFTER)  # fmt: skip
    assert issued == _signed(codec, anchor, _record(anchor, key))


def test_a_registry_without_anchors_refuses_to_start(codec: AvroCodec) -> None:
    with pytest.raises(ConfigurationError):
        KeyRegistry(codec, anchors=[])


Build = Callable[[AvroCodec, SigningKey], bytes]
_ROGUE: Final = seed_key(30)
_KEY: Final = seed_key(31)


def _weak_key_record(codec: AvroCodec, anchor: SigningKey) -> bytes:
    # Even the anchor signing it (a compromised admin workstation, a bug) does not make a weak key trusted.
    return _signed(codec, anchor, _record(anchor, _KEY, public_key=IDENTITY,
                                          key_id=hashlib.sha256(IDENTITY).hexdigest()))  # fmt: skip


def _tampered_after_signing(codec: AvroCodec, anchor: SigningKey) -> bytes:
    raw = codec.decode(_signed(codec, anchor, _record(anchor, _KEY)), expect=KEY_RECORD_SCHEMA)
    raw["not_after"] = NOT_AFTER + timedelta(days=3650)
    return codec.encode(KEY_RECORD_SCHEMA, raw)


REJECTED: Final[list[tuple[str, Build, type[EvidenceHubError]]]] = [
    ("signed_by_a_key_that_is_not_an_anchor", lambda c, a: _signed(c, _ROGUE, _record(_ROGUE, _KEY)), UntrustedKey),
    ("names_the_anchor_but_signed_by_another_key", lambda c, a: _signed(c, _ROGUE, _record(a, _KEY)),
     InvalidSignature),
    ("self_signed_by_the_key_itself", lambda c, a: _signed(c, _KEY, _record(a, _KEY)), InvalidSignature),
    ("unsigned", lambda c, a: c.encode(KEY_RECORD_SCHEMA, _record(a, _KEY)), InvalidSignature),
    ("changed_after_signing", _tampered_after_signing, InvalidSignature),
    ("key_id_of_another_key", lambda c, a: _signed(c, a, _record(a, _KEY, key_id=_ROGUE.key_id)), UntrustedKey),
    ("key_id_not_a_hash_at_all", lambda c, a: _signed(c, a, _record(a, _KEY, key_id="publisher-1")), UntrustedKey),
    ("weak_identity_key", _weak_key_record, UntrustedKey),
    ("public_key_31_bytes", lambda c, a: _signed(c, a, _record(a, _KEY, public_key=_KEY.public.raw[:31])),
     UntrustedKey),
    ("not_a_key_record", lambda c, a: c.encode("evidence_event", evidence_event(key_id=_KEY.key_id)), DecodeError),
    ("garbage", lambda c, a: b"\xc3\x01garbage", DecodeError),
]  # fmt: skip


@pytest.mark.parametrize(("build", "error"), [row[1:] for row in REJECTED], ids=[row[0] for row in REJECTED])
def test_bad_key_records_are_rejected_and_counted(
    codec: AvroCodec, anchor: SigningKey, build: Build, error: type[EvidenceHubError]
) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    with pytest.raises(error):
        reg.apply(build(codec, anchor))
    assert reg.rejected == 1
    assert len(reg) == 0
    with pytest.raises(UntrustedKey):
        reg.resolve(_KEY.key_id, sequence=1, topic=TOPIC_DE)


def test_stale_revisions_are_rejected_and_counted(codec: AvroCodec, anchor: SigningKey) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY, revision=2, revoked_at=NOW, last_valid_sequence=5)))
    for revision in (1, 2):  # an older record, and the same revision again with different content
        with pytest.raises(UntrustedKey):
            reg.apply(_signed(codec, anchor, _record(anchor, _KEY, revision=revision)))
    assert reg.rejected == 2
    assert reg.entry(_KEY.key_id).revoked_at == NOW  # the un-revoking older record did not win
    with pytest.raises(UntrustedKey):
        reg.resolve(_KEY.key_id, sequence=6, topic=TOPIC_DE)


def test_apply_all_skips_bad_records_and_counts_them(codec: AvroCodec, anchor: SigningKey) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    records = [
        _signed(codec, anchor, _record(anchor, _KEY)),
        _signed(codec, _ROGUE, _record(anchor, _ROGUE)),
        b"junk",
        _signed(codec, anchor, _record(anchor, seed_key(32))),
    ]
    assert reg.apply_all(records) == 2
    assert reg.rejected == 2
    assert len(reg) == 2


def test_a_newer_revision_replaces_the_older_revocation(codec: AvroCodec, anchor: SigningKey) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY, revision=1)))
    assert reg.resolve(_KEY.key_id, sequence=1000, topic=TOPIC_DE).raw == _KEY.public.raw
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY, revision=2, revoked_at=NOW, last_valid_sequence=10)))
    assert reg.entry(_KEY.key_id).revision == 2
    assert reg.resolve(_KEY.key_id, sequence=10, topic=TOPIC_DE).raw == _KEY.public.raw
    with pytest.raises(UntrustedKey):
        reg.resolve(_KEY.key_id, sequence=11, topic=TOPIC_DE)
    with pytest.raises(UntrustedKey):
        reg.check_can_sign(_KEY.key_id, NOW, organisation=ORG)
    assert len(reg) == 1


def test_rotation_keeps_both_keys_of_an_organisation_valid(codec: AvroCodec, anchor: SigningKey) -> None:
    old, new = seed_key(40), seed_key(41)
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, old)))
    reg.apply(_signed(codec, anchor, _record(anchor, new)))
    for signer in (old, new):
        data = seal(codec, schema="evidence_event", record=evidence_event(key_id=signer.key_id), topic=TOPIC_DE,
                    signer=signer, sequence=1)  # fmt: skip
        assert open_envelope(codec, data, topic=TOPIC_DE, keys=reg).key_id == signer.key_id
    assert {reg.entry(k.key_id).organisation for k in (old, new)} == {ORG}


def test_records_from_a_second_anchor_are_trusted(codec: AvroCodec, anchor: SigningKey) -> None:
    second = seed_key(50)
    reg = KeyRegistry(codec, anchors=[anchor.public, second.public])
    reg.apply(_signed(codec, second, _record(second, _KEY)))
    assert reg.resolve(_KEY.key_id, sequence=1, topic=TOPIC_DE).key_id == _KEY.key_id


@pytest.mark.parametrize(
    ("now", "fields"),
    [
        (NOT_BEFORE - timedelta(seconds=1), {}),
        (NOT_AFTER, {}),
        (NOW, {"revoked_at": NOW, "last_valid_sequence": 100}),
    ],
    ids=["not_yet_valid", "expired", "revoked_even_with_a_last_valid_sequence"],
)
def test_a_publisher_may_not_sign_with_a_key_receivers_refuse(
    codec: AvroCodec, anchor: SigningKey, now: Any, fields: dict[str, Any]
) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY, **fields)))
    with pytest.raises(UntrustedKey):
        reg.check_can_sign(_KEY.key_id, now, organisation=ORG)


def test_a_publisher_may_sign_with_a_valid_key(codec: AvroCodec, anchor: SigningKey) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY)))
    reg.check_can_sign(_KEY.key_id, NOW, organisation=ORG)
    with pytest.raises(UntrustedKey):
        reg.check_can_sign(seed_key(60).key_id, NOW, organisation=ORG)
    with pytest.raises(UntrustedKey, match="registered for"):  # receivers would refuse the event's claim
        reg.check_can_sign(_KEY.key_id, NOW, organisation="Another group")


def test_revocation_cut_offs_are_per_topic(codec: AvroCodec, anchor: SigningKey) -> None:
    """Sequence numbers count per key and topic, so a compromise is cut off per topic; unlisted topics fall back."""
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(issue(codec, anchor, public_key=_KEY.public, organisation=ORG, not_before=NOT_BEFORE, revoked_at=NOW,
                    last_valid_sequences={"evidence.DE": 120, "evidence.FR": 7}, last_valid_sequence=0,
                    revision=2))  # fmt: skip
    assert reg.resolve(_KEY.key_id, sequence=120, topic="evidence.DE").key_id == _KEY.key_id
    assert reg.resolve(_KEY.key_id, sequence=7, topic="evidence.FR").key_id == _KEY.key_id
    for topic, sequence in (("evidence.DE", 121), ("evidence.FR", 8), ("evidence.SE", 1)):
        with pytest.raises(UntrustedKey, match="revoked"):
            reg.resolve(_KEY.key_id, sequence=sequence, topic=topic)


def test_a_record_written_with_the_first_released_schema_still_verifies(codec: AvroCodec, anchor: SigningKey) -> None:
    """The anchor signs the bytes as written, so schema evolution never invalidates old registry records."""
    import io
    import json

    import fastavro

    from services.shared.avro import MAGIC, SCHEMA_DIR, fingerprint

    v1 = fastavro.parse_schema(json.loads((SCHEMA_DIR / "released" / "key_record" / "1.avsc").read_text()))

    def encode_v1(record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(MAGIC + fingerprint(v1))
        fastavro.schemaless_writer(out, v1, record)
        return out.getvalue()

    record = _record(anchor, _KEY)
    record["anchor_sig"] = anchor.sign(encode_v1(record))
    entry = KeyRegistry(codec, anchors=[anchor.public]).apply(encode_v1(record))
    assert (entry.key.key_id, entry.last_valid_sequences) == (_KEY.key_id, {})


SUCCESSION_REFUSED: Final = {
    "another organisation": ({"organisation": "Someone else"}, "organisation"),
    "not_before moved later (a revocation dated now)": ({"not_before": NOW}, "not_before"),
    "not_before moved earlier": ({"not_before": NOT_BEFORE - timedelta(days=365)}, "not_before"),
}


@pytest.mark.parametrize("case", SUCCESSION_REFUSED.values(), ids=SUCCESSION_REFUSED.keys())
def test_an_anchor_signed_revision_may_not_rewrite_a_keys_past(
    codec: AvroCodec, anchor: SigningKey, case: tuple[dict[str, Any], str]
) -> None:
    """Even signed by the anchor: the registry owns the rule, as tuf's trusted metadata set owns its ordering."""
    changes, field = case
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY)))
    signed_before = seal(codec, schema="evidence_event", record=evidence_event(key_id=_KEY.key_id, published_at=NOW),
                         topic=TOPIC_DE, signer=_KEY, sequence=3)  # fmt: skip
    forged = _record(anchor, _KEY, revision=2, revoked_at=NOW, last_valid_sequence=3, **changes)
    with pytest.raises(UntrustedKey, match=field):
        reg.apply(_signed(codec, anchor, forged))
    assert (reg.rejected, reg.entry(_KEY.key_id).revision, reg.entry(_KEY.key_id).organisation) == (1, 1, ORG)
    assert open_envelope(codec, signed_before, topic=TOPIC_DE, keys=reg).key_id == _KEY.key_id


def test_a_revocation_that_keeps_the_keys_past_is_applied(codec: AvroCodec, anchor: SigningKey) -> None:
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY)))
    signed_before = seal(codec, schema="evidence_event", record=evidence_event(key_id=_KEY.key_id, published_at=NOW),
                         topic=TOPIC_DE, signer=_KEY, sequence=3)  # fmt: skip
    reg.apply(_signed(codec, anchor, _record(anchor, _KEY, revision=2, revoked_at=NOW + timedelta(days=1),
                                             last_valid_sequences={TOPIC_DE: 3}, last_valid_sequence=0)))  # fmt: skip
    assert open_envelope(codec, signed_before, topic=TOPIC_DE, keys=reg).sequence == 3
