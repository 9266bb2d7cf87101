"""The pure core of `evhub subscribe`: what it accepts from a gateway, what it refuses, how it names files, what it
counts. No I/O: feed events are built here by hand from docs/gateway-api.md, not with the gateway's code."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.cli.event_stream import EventStreamDecoder, Message
from services.cli.subscription import (
    Checkpoint,
    Failure,
    FeedVerifier,
    Released,
    Tally,
    Withheld,
    content_name_candidates,
    item_dir_candidates,
    missing_numbers,
    summary,
)
from services.shared import disclosure
from services.shared.avro import AvroCodec
from services.shared.envelope import PAYLOAD_TYPES, seal, with_disclosures
from services.shared.errors import DecodeError
from services.shared.filenames import check_file_name
from services.shared.registry import KeyRegistry, issue
from services.shared.sequences import SequenceTracker
from tests.shared.records import (
    ANCHOR_SEED,
    NOT_BEFORE,
    ORG,
    PUBLISHER_SEED,
    TOPIC_DE,
    TOPIC_FR,
    evidence_event,
    evidence_withdrawal,
    seed_key,
    signing_key_from_seed,
)

NOW: Final = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
SIGNER: Final = signing_key_from_seed(PUBLISHER_SEED)
ANCHOR: Final = signing_key_from_seed(ANCHOR_SEED)
WITNESS = disclosure.make("witness.name", "A. Witness", label="WITNESS_IDENTIFYING", salt=b"\x01" * 16)
PLACE = disclosure.make("location.exact", "33.51N 36.27E", label="LOCATION_EXACT", salt=b"\x02" * 16)
PROTECTED: Final = [{"label": d.label, "digest": d.digest} for d in (WITNESS, PLACE)]


def _json(value: Any) -> Any:
    """The gateway's decoded copy, per docs/gateway-api.md (ISO 8601 times, base64 bytes)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def _registry(codec: AvroCodec) -> KeyRegistry:
    registry = KeyRegistry(codec, anchors=[ANCHOR.public])
    registry.apply(issue(codec, ANCHOR, public_key=SIGNER.public, organisation=ORG, not_before=NOT_BEFORE))
    return registry


def _verifier(codec: AvroCodec, topic: str = TOPIC_DE) -> FeedVerifier:
    return FeedVerifier(codec=codec, keys=_registry(codec), topic=topic, tracker=SequenceTracker(window=8))


def _event(**fields: Any) -> dict[str, Any]:
    return evidence_event(key_id=SIGNER.key_id, protected=PROTECTED, **fields)


def _sealed(codec: AvroCodec, record: dict[str, Any], *, sequence: int = 1, topic: str = TOPIC_DE,
            schema: str = "evidence_event", disclosures: tuple[str, ...] = (WITNESS.encoded, PLACE.encoded),
            signer: Any = SIGNER) -> bytes:  # fmt: skip
    return seal(codec, schema=schema, record=record, topic=topic, signer=signer, sequence=sequence,
                disclosures=list(disclosures))  # fmt: skip


def _wire(envelope: bytes, record: dict[str, Any], *, kind: str = "event", offset: int = 7, topic: str = TOPIC_DE,
          receipt: str = "6f1c0a2e-0000-4000-8000-000000000001", **extra: Any) -> dict[str, Any]:  # fmt: skip
    schema = "evidence_event" if kind == "event" else "evidence_withdrawal"
    return {
        "type": kind, "cursor": f"cursor-{offset}", "receipt": receipt,
        "audit": {"topic": "hub.audit", "partition": 0, "offset": 41873, "index": 3},
        "topic": topic, "partition": 2, "offset": offset, "envelope": base64.b64encode(envelope).decode(),
        "payload_type": PAYLOAD_TYPES[schema], kind: _json(record), "disclosed_fields": ["LOCATION_EXACT"],
        "withheld_fields": ["WITNESS_IDENTIFYING"], "policy_version": "ab" * 32, **extra,
    }  # fmt: skip


def test_a_genuine_event_verifies_with_the_disclosures_it_carries(codec: AvroCodec) -> None:
    record = _event()
    envelope = _sealed(codec, record, disclosures=(PLACE.encoded,))  # the gateway withheld the witness's name
    got = _verifier(codec).check(_wire(envelope, record), received_at=NOW)
    assert isinstance(got, Released)
    assert got.new
    assert (got.kind, got.item_id, got.version, got.offset) == ("event", "item-7f3a", 2, 7)
    assert {f: d.value for f, d in got.disclosures.items()} == {"location.exact": "33.51N 36.27E"}
    assert got.withheld_labels == ["WITNESS_IDENTIFYING"]  # computed from the signed digests, not the gateway's word
    assert got.envelope == envelope


def test_a_redelivery_is_told_apart_from_a_new_event_whatever_it_discloses(codec: AvroCodec) -> None:
    verifier = _verifier(codec)
    record = _event()
    full = _sealed(codec, record)
    first = verifier.check(_wire(full, record, offset=7), received_at=NOW)
    again = verifier.check(_wire(full, record, offset=7), received_at=NOW)
    elsewhere = verifier.check(_wire(with_disclosures(codec, full, []), record, offset=9), received_at=NOW)
    assert isinstance(first, Released)
    assert first.new
    assert isinstance(again, Released)
    assert not again.new
    assert isinstance(elsewhere, Released)
    assert not elsewhere.new  # the same signed event at another offset (a publisher crash): no second event


def _flip(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def _forged_disclosure(codec: AvroCodec, envelope: bytes) -> bytes:
    forged = disclosure.make("witness.name", "someone else", label="WITNESS_IDENTIFYING", salt=b"\x03" * 16)
    return with_disclosures(codec, envelope, [forged.encoded])


REFUSALS: Final[list[tuple[str, Callable[[AvroCodec], dict[str, Any]], str]]] = [
    (
        "a byte flipped in the envelope",
        lambda c: {**(w := _wire(_sealed(c, _event()), _event())), "envelope": _flip(w["envelope"])},
        "",
    ),
    ("a forged disclosure", lambda c: _wire(_forged_disclosure(c, _sealed(c, _event())), _event()), "InvalidSignature"),
    (
        "signed for another jurisdiction's topic",
        lambda c: _wire(_sealed(c, _event(), topic=TOPIC_FR), _event()),
        "InvalidSignature",
    ),
    (
        "an event of another topic in this feed",
        lambda c: _wire(_sealed(c, _event()), _event(), topic=TOPIC_FR),
        "an event of 'evidence.FR'",
    ),
    (
        "a payload saying another jurisdiction",
        lambda c: _wire(_sealed(c, _event(jurisdiction="FR")), _event(jurisdiction="FR")),
        "InvalidSignature",
    ),
    (
        "the decoded copy altered",
        lambda c: {**_wire(_sealed(c, _event()), _event()), "event": {**_json(_event()), "title": "something else"}},
        "decoded copy differs",
    ),
    (
        "a nested field of the decoded copy altered",
        lambda c: {
            **(w := _wire(_sealed(c, _event()), _event())),
            "event": {
                **w["event"],
                "custody": [{**w["event"]["custody"][0], "actor": "someone"}, *w["event"]["custody"][1:]],
            },
        },
        "decoded copy differs",
    ),
    (
        "a decoded copy without its event id",
        lambda c: {
            **(w := _wire(_sealed(c, _event()), _event())),
            "event": {k: v for k, v in w["event"].items() if k != "event_id"},
        },
        "decoded copy differs",
    ),
    (
        "an event payload sent as a withdrawal",
        lambda c: {**_wire(_sealed(c, _event()), _event(), kind="withdrawal"), "withdrawal": _json(_event())},
        "carrying a evidence_event",
    ),
    (
        "a key this office does not trust",
        lambda c: _wire(_sealed(c, _event(), signer=seed_key(5)), _event()),
        "UntrustedKey",
    ),
    (
        "an envelope that is not base64",
        lambda c: {**_wire(_sealed(c, _event()), _event()), "envelope": "%%%"},
        "not base64",
    ),
    (
        "a release without its receipt",
        lambda c: {**_wire(_sealed(c, _event()), _event()), "receipt": None},
        "without its receipt",
    ),
    (
        "a receipt that could be a path",
        lambda c: {**_wire(_sealed(c, _event()), _event()), "receipt": "../x"},
        "malformed",
    ),
    (
        "a release without its position",
        lambda c: {**_wire(_sealed(c, _event()), _event()), "offset": None},
        "without its position",
    ),
    ("an unknown type", lambda c: {**_wire(_sealed(c, _event()), _event()), "type": "surprise"}, "malformed"),
]


@pytest.mark.parametrize(("name", "make", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_tampering_is_refused_and_leaves_the_sequence_state_alone(
    codec: AvroCodec, name: str, make: Callable[[AvroCodec], dict[str, Any]], reason: str
) -> None:
    verifier = _verifier(codec)
    got = verifier.check(make(codec), received_at=NOW)
    assert isinstance(got, Failure), name
    assert reason in got.reason
    assert got.untrusted_key == ("UntrustedKey" in reason)
    assert verifier.tracker.snapshot() == {}  # nothing was recorded: the genuine event is still new afterwards
    genuine = verifier.check(_wire(_sealed(codec, _event()), _event()), received_at=NOW)
    assert isinstance(genuine, Released)
    assert genuine.new


def test_a_gateway_on_another_released_schema_version_still_agrees(codec: AvroCodec) -> None:
    """Fields added with defaults in a later release: the copy may have a field the office's schema lacks, or lack
    one it has; only fields both have must agree."""
    record = _event()
    wire = _wire(_sealed(codec, record), record)
    newer = {**wire, "event": {**wire["event"], "field_from_a_later_release": "x"}}
    older = {**wire, "event": {k: v for k, v in wire["event"].items() if k != "related_items"}}
    for event in (newer, older):
        assert isinstance(_verifier(codec).check(event, received_at=NOW), Released)


def test_another_event_under_a_sequence_number_already_used_is_a_replay(codec: AvroCodec) -> None:
    verifier = _verifier(codec)
    first = verifier.check(_wire(_sealed(codec, _event()), _event()), received_at=NOW)
    other = _event(event_id="ev-0002")
    replay = verifier.check(_wire(_sealed(codec, other), other, offset=8), received_at=NOW)
    assert isinstance(first, Released)
    assert isinstance(replay, Failure)
    assert "ReplayDetected" in replay.reason
    assert replay.position == (TOPIC_DE, 2, 8)


@given(st.data())
def test_any_single_byte_change_to_the_envelope_is_refused(data: st.DataObject) -> None:
    codec = AvroCodec.load()
    envelope = bytearray(_sealed(codec, _event()))
    index = data.draw(st.integers(0, len(envelope) - 1))
    envelope[index] ^= data.draw(st.integers(1, 255))
    got = _verifier(codec).check(_wire(bytes(envelope), _event()), received_at=NOW)
    assert isinstance(got, Failure)


def test_a_withdrawal_a_withheld_record_and_a_checkpoint(codec: AvroCodec) -> None:
    verifier = _verifier(codec)
    withdrawal = evidence_withdrawal(key_id=SIGNER.key_id)
    envelope = _sealed(codec, withdrawal, schema="evidence_withdrawal", disclosures=())
    got = verifier.check(_wire(envelope, withdrawal, kind="withdrawal"), received_at=NOW)
    assert isinstance(got, Released)
    assert (got.kind, got.version, got.withheld_labels) == ("withdrawal", 2, [])
    withheld = verifier.check({"type": "withheld", "cursor": "c9", "receipt": "r-9",
                               "audit": {"topic": "hub.audit", "partition": 0, "offset": 5, "index": 0}},
                              received_at=NOW)  # fmt: skip
    assert withheld == Withheld("c9", "r-9", withheld.audit, NOW) if isinstance(withheld, Withheld) else False
    assert verifier.check({"type": "checkpoint", "cursor": "c10"}, received_at=NOW) == Checkpoint("c10")
    bad = verifier.check({"type": "withheld", "cursor": "not a cursor!"}, received_at=NOW)
    assert isinstance(bad, Failure)
    assert bad.cursor is None  # a cursor that is not one is never stored
    assert isinstance(verifier.check(["not", "an", "object"], received_at=NOW), Failure)


@pytest.mark.parametrize(
    ("item_id", "preferred"),
    [
        ("ITEM-0001", "ITEM-0001"),
        ("Fotos 2013 (Damaskus)", "Fotos 2013 (Damaskus)"),
        ("../../etc/passwd", None),
        ("a/b", None),
        ("..", None),
        ("CON", None),
        ("photo\u202egnp.exe", None),
        ("Cafe\u0301", None),  # not NFC: taken as it is, it would name another string's directory
        ("item-0123456789abcdef01234567", None),  # looks like a hashed name: hashed itself
        ("", None),
    ],
)
def test_an_item_id_names_a_directory_only_if_it_is_a_safe_file_name_as_it_stands(
    item_id: str, preferred: str | None
) -> None:
    candidates = item_dir_candidates(item_id)
    assert candidates[0] == preferred if preferred is not None else candidates[0].startswith("item-")
    for name in candidates:
        assert check_file_name(name) == name  # every candidate is one safe path component
    assert len(set(item_dir_candidates(item_id + "x")) & set(candidates)) == 0 or preferred is None


def test_distinct_item_ids_never_share_a_hashed_directory() -> None:
    ids = ["../a", "..\\a", "a/..", "CON", "con", "Cafe\u0301", "Caf\u00e9/"]
    hashed = [item_dir_candidates(i)[-1] for i in ids]
    assert len(set(hashed)) == len(ids)


def test_content_names_come_from_the_signed_file_name_only_when_safe() -> None:
    digest = "ab" * 32
    assert content_name_candidates("IMG_4711.jpg", digest) == ["IMG_4711.jpg", f"{digest}.bin"]
    assert content_name_candidates("../../.ssh/authorized_keys", digest) == [f"{digest}.bin"]
    assert content_name_candidates("NUL.txt", digest) == [f"{digest}.bin"]


def test_gaps_are_counted_against_the_records_withheld() -> None:
    tracker = SequenceTracker()
    for n in (1, 2, 4, 7):
        tracker.observe("k", TOPIC_DE, n, bytes([n]))
    tracker.observe("k", TOPIC_FR, 3, b"x")  # another topic's gap is not this feed's
    assert missing_numbers(tracker, TOPIC_DE) == 3  # 3, 5, 6
    total = Tally()
    total.counts.update(withheld=2)
    s = summary(meta={"jurisdiction": "DE"}, total=total, run=Tally(), missing=3, caught_up=True, failures=[])
    assert s["sequence"] == {"missing": 3, "withheld_records": 2, "unexplained": 1}
    total.counts.update(withheld=2, late=1)
    s = summary(meta={}, total=total, run=Tally(), missing=3, caught_up=True, failures=[])
    assert s["sequence"]["unexplained"] == 0
    assert s["verified"]


def test_a_tally_round_trips_and_counts_redeliveries_apart(codec: AvroCodec) -> None:
    verifier, tally = _verifier(codec), Tally()
    record = _event()
    envelope = _sealed(codec, record, disclosures=(PLACE.encoded,))
    for outcome in (verifier.check(_wire(envelope, record), received_at=NOW),
                    verifier.check(_wire(envelope, record), received_at=NOW),
                    verifier.check({"type": "checkpoint", "cursor": "c"}, received_at=NOW),
                    Failure("bad", None, {})):  # fmt: skip
        tally.record(outcome)
    tally.content(size=10)
    tally.content(size=None)
    data = tally.to_json()
    assert (data["events"], data["redelivered"], data["checkpoints"], data["failures"]) == (1, 1, 1, 1)
    assert (data["content_files"], data["content_bytes"], data["content_refused"]) == (1, 10, 1)
    assert data["disclosed"] == {"LOCATION_EXACT": 1}
    assert data["withheld_fields"] == {"WITNESS_IDENTIFYING": 1}
    assert Tally.from_json(data).to_json() == data
    with pytest.raises(DecodeError):
        Tally.from_json({"events": "many"})


# --- the event stream -------------------------------------------------------------------------------------------


def test_event_stream_messages_whatever_the_chunking() -> None:
    stream = (b": ping\r\n\r\nevent: event\r\nid: c1\r\ndata: {\"a\":\r\ndata:  1}\r\n\r\n"
              b"event: withheld\rid: c2\rdata: x\r\revent: error\ndata: {}\n\n")  # fmt: skip
    expected = [Message("event", '{"a":\n 1}', "c1"), Message("withheld", "x", "c2"), Message("error", "{}", None)]
    for size in (1, 2, 3, 7, len(stream)):
        decoder = EventStreamDecoder()
        got = [m for i in range(0, len(stream), size) for m in decoder.feed(stream[i : i + size])]
        assert got == expected, size
        assert decoder.last_id == "c2"


def test_event_stream_refuses_what_is_too_large_before_holding_it() -> None:
    decoder = EventStreamDecoder(max_message_bytes=64)
    with pytest.raises(DecodeError):
        decoder.feed(b"data: " + b"x" * 100)  # no line end yet: refused on the bytes alone
    decoder = EventStreamDecoder(max_message_bytes=64)
    decoder.feed(b"data: " + b"x" * 20 + b"\n" + b"data: " + b"x" * 20 + b"\n")
    with pytest.raises(DecodeError):  # one message of many short data lines
        decoder.feed(b"data: " + b"x" * 30 + b"\n")
    with pytest.raises(DecodeError):
        EventStreamDecoder().feed(b"data: \xff\n\n")
