"""The gateway's pure cores: cursors, byte ranges, redaction and audit entries, SSE frames (no I/O)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway import sse
from services.gateway.cursor import ALL, Cursor, CursorKeys, micros, start
from services.gateway.ranges import ByteRange, parse_range
from services.gateway.release import (
    EvidenceRecord,
    Requester,
    allowed_labels,
    attributes_of,
    decide_record,
    deny_source,
    forwarded_disclosures,
    withheld_labels,
)
from services.policy.model import Decision, ItemAttributes
from services.shared import disclosure
from services.shared.audit_records import encode_entry
from services.shared.avro import AvroCodec
from services.shared.errors import ConfigurationError, InvalidCursor, RangeNotSatisfiable
from services.shared.principals import Principal

KEYS = CursorKeys({"k1": b"\x01" * 32, "k2": b"\x02" * 32}, current="k2")
CURSOR = Cursor((0, 17, 2**40), (1_700_000_000_000_000, 2, 41))


def test_a_cursor_round_trips_bound_to_its_office_and_jurisdiction() -> None:
    text = KEYS.encode(CURSOR, office="DE-GBA-WCU", jurisdiction="DE")
    assert KEYS.decode(text, office="DE-GBA-WCU", jurisdiction="DE") == CURSOR
    assert "DE-GBA-WCU" not in base64.urlsafe_b64decode(text + "==").decode("latin-1")  # bound, not stored
    for office, jurisdiction in (("FR-PNAT", "DE"), ("DE-GBA-WCU", "FR")):
        with pytest.raises(InvalidCursor):
            KEYS.decode(text, office=office, jurisdiction=jurisdiction)


def test_cursor_keys_rotate_and_retire() -> None:
    old = CursorKeys({"k1": b"\x01" * 32}, current="k1").encode(CURSOR, office="o", jurisdiction="DE")
    assert KEYS.decode(old, office="o", jurisdiction="DE") == CURSOR  # k1 still configured
    retired = CursorKeys({"k2": b"\x02" * 32}, current="k2")
    with pytest.raises(InvalidCursor):
        retired.decode(old, office="o", jurisdiction="DE")


@pytest.mark.parametrize(
    "keys", [{}, {"k": b"short"}, {"bad id!": b"\x00" * 32}], ids=["none", "short-key", "bad-key-id"]
)
def test_weak_cursor_key_configurations_are_refused(keys: dict[str, bytes]) -> None:
    with pytest.raises(ConfigurationError):
        CursorKeys(keys, current=next(iter(keys), "k"))


_TEXT = KEYS.encode(CURSOR, office="o", jurisdiction="DE")


@given(st.integers(min_value=0, max_value=len(base64.urlsafe_b64decode(_TEXT + "==")) - 1),
       st.integers(min_value=1, max_value=255))  # fmt: skip
def test_any_single_byte_change_to_a_cursor_is_refused(position: int, flip: int) -> None:
    raw = bytearray(base64.urlsafe_b64decode(_TEXT + "=="))
    raw[position] ^= flip
    with pytest.raises(InvalidCursor):
        KEYS.decode(base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode(), office="o", jurisdiction="DE")


@given(st.text(max_size=200))
def test_arbitrary_text_is_an_invalid_cursor_never_a_crash(text: str) -> None:
    with pytest.raises(InvalidCursor):
        KEYS.decode(text, office="o", jurisdiction="DE")


def test_a_fresh_cursor_starts_at_zero_and_owes_no_embargo_before_now() -> None:
    now = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    fresh = start(3, now_micros=micros(now))
    assert fresh.positions == (0, 0, 0)
    assert fresh.embargo_mark == (micros(now), ALL, ALL)
    assert fresh.advanced(1, 9).advanced(1, 4).positions == (0, 9, 0)  # never moves back


RANGES = {
    "none": (None, None),
    "first-ten": ("bytes=0-9", ByteRange(0, 9)),
    "open-ended": ("bytes=90-", ByteRange(90, 99)),
    "suffix": ("bytes=-5", ByteRange(95, 99)),
    "past-the-end-clamped": ("bytes=95-200", ByteRange(95, 99)),
    "several-ranges-ignored": ("bytes=0-1,5-6", None),
    "malformed-ignored": ("bytes=9-1", None),
    "other-unit-ignored": ("items=0-1", None),
}


@pytest.mark.parametrize(("header", "expected"), RANGES.values(), ids=RANGES.keys())
def test_byte_ranges(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=1000-2000", "bytes=-0"])
def test_ranges_outside_the_content_are_not_satisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range(header, 100)
    assert caught.value.extensions["size"] == 100


def _record(codec: AvroCodec, protected: list[tuple[str, str]]) -> tuple[EvidenceRecord, list[str]]:
    made = [disclosure.make(f"f{i}", value, label=label, salt=bytes([i]) * 16) for i, (label, value) in
            enumerate(protected)]  # fmt: skip
    from tests.shared.records import evidence_event

    event = evidence_event(key_id="k" * 64, protected=[{"label": d.label, "digest": d.digest} for d in made])
    record = EvidenceRecord(topic="evidence.DE", partition=0, offset=7, envelope=b"x", envelope_sha256="0" * 64,
                            payload_type="t", schema="evidence_event", record=event, key_id="k" * 64, sequence=3,
                            disclosures=tuple(d.encoded for d in made))  # fmt: skip
    return record, [d.encoded for d in made]


def test_redaction_forwards_only_labels_decided_and_allowed(codec: AvroCodec) -> None:
    """An allow-list: a disclosure whose label the policy never decided (here PERPETRATOR_IDENTIFYING, not a
    protected-field label) is not forwarded, even though nothing withheld it."""
    record, encoded = _record(codec, [("WITNESS_IDENTIFYING", "A. K."), ("LOCATION_EXACT", "33.5N"),
                                      ("PERPETRATOR_IDENTIFYING", "officer X")])  # fmt: skip
    attributes = attributes_of(record, withdrawn=False)
    assert attributes.protected_fields == ("LOCATION_EXACT", "WITNESS_IDENTIFYING")
    allowed = Decision(allowed=True, withheld_fields=("WITNESS_IDENTIFYING", "PERPETRATOR_IDENTIFYING"),
                       disclosed_fields=("LOCATION_EXACT",), policy_version="v")  # fmt: skip
    assert allowed_labels(allowed, attributes) == ("LOCATION_EXACT",)
    assert forwarded_disclosures(record, allowed_labels(allowed, attributes)) == (encoded[1],)
    assert withheld_labels(allowed, attributes) == ("WITNESS_IDENTIFYING", "PERPETRATOR_IDENTIFYING")
    careless = Decision(allowed=True, disclosed_fields=("LOCATION_EXACT", "PERPETRATOR_IDENTIFYING"),
                        policy_version="v")  # fmt: skip
    assert allowed_labels(careless, attributes) == ("LOCATION_EXACT",)  # never a label the item does not decide
    refused = Decision(allowed=False, withheld_fields=(), policy_version="v")
    assert forwarded_disclosures(record, allowed_labels(refused, attributes)) == ()


@pytest.mark.parametrize(
    ("decision", "source"),
    [
        (Decision(allowed=True, policy_version="v"), None),
        (Decision(allowed=False), "NO_POLICY"),
        (Decision(allowed=False, policy_version="v", reasons=("unknown office 'X'",)), "UNKNOWN_OFFICE"),
        (Decision(allowed=False, policy_version="v", errors=("boom",)), "ERROR"),
        (Decision(allowed=False, policy_version="v", determining_policies=("embargo",)), "RULE"),
        (Decision(allowed=False, policy_version="v"), "DEFAULT_DENY"),
    ],
    ids=["allowed", "no-policy", "unknown-office", "error", "rule", "default-deny"],
)
def test_deny_sources(decision: Decision, source: str | None) -> None:
    assert deny_source(decision) == source


def test_an_audit_entry_fits_the_contract_and_names_what_was_decided(codec: AvroCodec) -> None:
    record, _ = _record(codec, [("WITNESS_IDENTIFYING", "A. K."), ("LOCATION_EXACT", "33.5N")])
    who = Requester(principal=Principal("office", "SE-IPC", "c" * 64), request_id="r1", gateway="gw", purpose=None)
    decision = Decision(allowed=True, withheld_fields=("WITNESS_IDENTIFYING",), disclosed_fields=("LOCATION_EXACT",),
                        policy_version="v", determining_policies=("p",))  # fmt: skip
    at = datetime(2026, 5, 1, tzinfo=UTC)
    outcome = decide_record(record, who=who, at=at, entry_id="e1", attributes=attributes_of(record, withdrawn=False),
                            decide=lambda a: decision)  # fmt: skip
    entry = outcome.entry
    assert encode_entry(codec, entry)  # the Avro contract accepts it
    assert (entry["decision"], entry["disclosed_fields"], entry["withheld_fields"]) == (
        "RELEASED", ["LOCATION_EXACT"], ["WITNESS_IDENTIFYING"])  # fmt: skip
    assert (entry["item"]["offset"], entry["item"]["sequence"], entry["office"]) == (7, 3, "SE-IPC")


def test_a_withdrawal_of_an_unknown_item_is_decided_on_nothing_and_so_refused() -> None:
    from tests.shared.records import evidence_withdrawal

    record = EvidenceRecord(topic="evidence.DE", partition=0, offset=1, envelope=b"x", envelope_sha256="0",
                            payload_type="t", schema="evidence_withdrawal", record=evidence_withdrawal(key_id="k"),
                            key_id="k", sequence=1, disclosures=())  # fmt: skip
    assert attributes_of(record, withdrawn=True).withdrawn is True
    last = ItemAttributes(item_id="item-7f3a", jurisdictions=("DE",), case_ids=("C",), withdrawn=True)
    assert attributes_of(record, withdrawn=True, last_attributes=last).withdrawn is False


def test_sse_frames_are_one_event_each_and_refuse_line_breaks_in_ids() -> None:
    frame = sse.frame("event", {"a": "line\nbreak"}, event_id="c1")
    assert frame == b'event: event\nid: c1\ndata: {"a":"line\\nbreak"}\n\n'
    with pytest.raises(ValueError, match="line break"):
        sse.frame("event", {}, event_id="c\n1")
    assert hashlib.sha256(sse.comment("x\ny")).hexdigest() == hashlib.sha256(b": x y\n\n").hexdigest()
