"""Redaction is an allow-list, end to end: a signed event with a protected value of each label, opened, decided
under the sample pack, and filtered with ``disclosure.visible`` — only labels decided and allowed are forwarded."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest

from services.policy.attributes import item_attributes
from services.policy.engine import PolicyEngine
from services.policy.model import ItemAttributes
from services.shared import disclosure
from services.shared.avro import AvroCodec
from services.shared.envelope import open_envelope, seal
from services.shared.registry import KeyRegistry, issue
from tests.shared.records import ANCHOR_SEED, NOT_AFTER, NOT_BEFORE, ORG, PUBLISHER_SEED, signing_key_from_seed

AT: Final = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SCHEMA: Final = Path(__file__).resolve().parents[2] / "schemas" / "evidence_event.avsc"
PUBLISHER: Final = signing_key_from_seed(PUBLISHER_SEED)

# Which label's value each office receives under the sample pack (policies/evidence.cedar): PROTECTION clearance
# opens identities; exact locations follow the item's own rules; labels no policy decides reach nobody.
FORWARDED: Final[dict[str, dict[str, bool]]] = {
    "WITNESS_IDENTIFYING": {"SE-IPC": False, "FR-PNAT": True},
    "VICTIM_IDENTIFYING": {"SE-IPC": False, "FR-PNAT": True},
    "MINOR": {"SE-IPC": False, "FR-PNAT": True},
    "LOCATION_EXACT": {"SE-IPC": True, "FR-PNAT": True},
    "GRAPHIC": {"SE-IPC": False, "FR-PNAT": False},
    "PERPETRATOR_IDENTIFYING": {"SE-IPC": False, "FR-PNAT": False},
    "UNKNOWN": {"SE-IPC": False, "FR-PNAT": False},  # what a label from a newer schema resolves to
}


def _schema_labels() -> list[str]:
    fields = {f["name"]: f for f in json.loads(SCHEMA.read_text("utf-8"))["fields"]}
    symbols: list[str] = fields["sensitivity"]["type"]["items"]["symbols"]
    return symbols


def test_the_table_covers_every_label_the_contract_allows() -> None:
    assert sorted(FORWARDED) == sorted(_schema_labels())


@pytest.fixture
def registry(codec: AvroCodec) -> KeyRegistry:
    anchor = signing_key_from_seed(ANCHOR_SEED)
    reg = KeyRegistry(codec, anchors=[anchor.public])
    reg.apply(issue(codec, anchor, public_key=PUBLISHER.public, organisation=ORG, not_before=NOT_BEFORE,
                    not_after=NOT_AFTER))  # fmt: skip
    return reg


def _event(value: disclosure.Disclosure, **changes: Any) -> dict[str, Any]:
    """A PUBLIC item of CASE-SY-001 published to DE, FR and SE, with one protected value."""
    return {
        "event_id": "ev-1", "item_id": "item-1", "version": 1, "replaces_event_id": None,
        "publisher": {"organisation": ORG, "key_id": PUBLISHER.key_id}, "case_ids": ["CASE-SY-001"],
        "jurisdiction": "SE", "kind": "TESTIMONY", "title": "t", "description": "", "content": [],
        "capture": {"captured_at": None, "device": None, "collector_pseudonym": None, "region": None},
        "custody": [], "classification": "PUBLIC", "sensitivity": [],
        "sharing": {"allowed_jurisdictions": [], "purposes": [], "consent_reference": None, "embargo_until": None},
        "related_items": [], "published_at": AT, "protected": [{"label": value.label, "digest": value.digest}],
        **changes,
    }  # fmt: skip


def _forwarded(codec: AvroCodec, registry: KeyRegistry, engine: PolicyEngine, office: str, label: str,
               **changes: Any) -> tuple[list[str], disclosure.Disclosure]:  # fmt: skip
    """What the gateway would forward to ``office``: open, decide, keep only what the decision allows."""
    value = disclosure.make("field", f"a {label} value", label=label, salt=bytes(16))
    sealed = seal(codec, schema="evidence_event", record=_event(value, **changes), topic="evidence.SE",
                  signer=PUBLISHER, sequence=1, disclosures=[value.encoded])  # fmt: skip
    opened = open_envelope(codec, sealed, topic="evidence.SE", keys=registry)
    attributes = item_attributes(opened.record, published_to=["DE", "FR"], withdrawn=False)
    decision = engine.decide(office, "ReadItem", attributes, AT)
    shown = disclosure.visible(opened.disclosures, opened.record["protected"], allowed=decision.disclosed_fields)
    assert (label in decision.disclosed_fields) is bool(shown)
    assert (label in decision.withheld_fields) is not bool(shown)
    return shown, value


@pytest.mark.parametrize("office", ["SE-IPC", "FR-PNAT"])
@pytest.mark.parametrize("label", sorted(FORWARDED))
def test_each_label_reaches_exactly_the_offices_allowed_to_see_it(
    codec: AvroCodec, registry: KeyRegistry, engine: PolicyEngine, office: str, label: str
) -> None:
    shown, value = _forwarded(codec, registry, engine, office, label)
    assert shown == ([value.encoded] if FORWARDED[label][office] else [])


@pytest.mark.parametrize("label", sorted(FORWARDED))
def test_a_denied_read_discloses_nothing(
    codec: AvroCodec, registry: KeyRegistry, engine: PolicyEngine, label: str
) -> None:
    shown, _ = _forwarded(codec, registry, engine, "SE-IPC", label, classification="SECRET")
    assert shown == []


def test_a_label_no_code_knows_is_withheld_from_everyone(engine: PolicyEngine) -> None:
    future = disclosure.make("field", "v", label="SATELLITE_EXACT", salt=bytes(16))
    item = ItemAttributes(item_id="i", jurisdictions=("DE", "FR", "SE"), case_ids=("CASE-SY-001",),
                          classification="PUBLIC", undecidable_fields=("SATELLITE_EXACT",))  # fmt: skip
    for office in ("DE-GBA-WCU", "FR-PNAT", "SE-IPC"):
        decision = engine.decide(office, "ReadItem", item, AT)
        assert decision.allowed
        assert (decision.disclosed_fields, decision.withheld_fields) == ((), ("SATELLITE_EXACT",))
        signed = [{"label": future.label, "digest": future.digest}]
        assert disclosure.visible([future.encoded], signed, allowed=decision.disclosed_fields) == []
