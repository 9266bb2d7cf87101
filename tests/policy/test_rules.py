"""Every rule of the sample pack, allowed and denied, one named row each (policies/evidence.cedar)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from services.policy.engine import PolicyEngine
from services.policy.model import FeedRef, ItemAttributes

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EMBARGO = datetime(2026, 6, 1, tzinfo=UTC)
ALL_PROTECTED = ("WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT", "MINOR")


def item(**changes: Any) -> ItemAttributes:
    """A PUBLIC item of CASE-SY-001 published to DE, FR and SE, with no restriction; rows change one thing."""
    base: dict[str, Any] = {"item_id": "item-1", "jurisdictions": ("DE", "FR", "SE"), "case_ids": ("CASE-SY-001",),
                            "classification": "PUBLIC"}  # fmt: skip
    return ItemAttributes(**{**base, **changes})


@dataclass(frozen=True)
class Row:
    office: str
    resource: ItemAttributes | FeedRef
    allowed: bool
    by: tuple[str, ...] = ()
    action: str = "ReadItem"
    at: datetime = NOW
    purpose: str | None = None
    withheld: tuple[str, ...] = field(default=())


PERMIT_ITEM = ("item-jurisdiction-and-assigned-case",)
ROWS = {
    # 1. feeds
    "feed: own jurisdiction": Row("DE-GBA-WCU", FeedRef(jurisdiction="DE"), True, ("feed-own-jurisdiction",),
                                  action="ReadFeed"),
    "feed: other jurisdiction": Row("DE-GBA-WCU", FeedRef(jurisdiction="FR"), False, action="ReadFeed"),
    # 2. jurisdiction of the item and case assignment
    "item: published to own jurisdiction": Row("SE-IPC", item(jurisdictions=("SE",)), True, PERMIT_ITEM),
    "item: not published to own jurisdiction": Row("SE-IPC", item(jurisdictions=("DE", "FR")), False),
    "case: assigned": Row("FR-PNAT", item(case_ids=("CASE-SY-003",)), True, PERMIT_ITEM),
    "case: not assigned": Row("FR-PNAT", item(case_ids=("CASE-SY-002",)), False),
    "case: one of several assigned": Row("FR-PNAT", item(case_ids=("CASE-SY-002", "CASE-SY-003")), True,
                                         PERMIT_ITEM),
    "case: none on the item": Row("DE-GBA-WCU", item(case_ids=()), False),
    "content: assigned case": Row("FR-PNAT", item(), True, PERMIT_ITEM, action="ReadContent"),
    # 3. classification clearance
    "classification: RESTRICTED with RESTRICTED": Row("SE-IPC", item(classification="RESTRICTED"), True,
                                                      PERMIT_ITEM),
    "classification: CONFIDENTIAL with RESTRICTED": Row("SE-IPC", item(classification="CONFIDENTIAL"), False,
                                                        ("classification-confidential",)),
    "classification: CONFIDENTIAL with CONFIDENTIAL": Row("FR-PNAT", item(classification="CONFIDENTIAL"), True,
                                                          PERMIT_ITEM),
    "classification: SECRET with CONFIDENTIAL": Row("FR-PNAT", item(classification="SECRET"), False,
                                                    ("classification-secret",)),
    "classification: SECRET with SECRET": Row("DE-GBA-WCU", item(classification="SECRET"), True, PERMIT_ITEM),
    "classification: content of SECRET with RESTRICTED": Row("SE-IPC", item(classification="SECRET"), False,
                                                             ("classification-secret",), action="ReadContent"),
    # 4. protected identities: redaction
    "protected: withheld without PROTECTION": Row("SE-IPC", item(protected_fields=ALL_PROTECTED), True, PERMIT_ITEM,
                                                  withheld=("WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "MINOR")),
    "protected: all shown with PROTECTION": Row("FR-PNAT", item(protected_fields=ALL_PROTECTED), True, PERMIT_ITEM),
    "protected: content withheld too": Row("SE-IPC", item(protected_fields=("VICTIM_IDENTIFYING",)), True,
                                           PERMIT_ITEM, action="ReadContent", withheld=("VICTIM_IDENTIFYING",)),
    "protected: witness field alone, no PROTECTION": Row(
        "SE-IPC", item(protected_fields=("WITNESS_IDENTIFYING",)), False,
        ("protected-identities-need-protection-clearance",), action="ReadProtected_WITNESS_IDENTIFYING",
        withheld=("WITNESS_IDENTIFYING",)),
    "protected: exact location without PROTECTION": Row(
        "SE-IPC", item(protected_fields=("LOCATION_EXACT",)), True, PERMIT_ITEM,
        action="ReadProtected_LOCATION_EXACT"),
    "protected: denied item withholds everything": Row("SE-IPC", item(jurisdictions=("DE",),
                                                       protected_fields=("LOCATION_EXACT",)), False,
                                                       withheld=("LOCATION_EXACT",)),
    # 5. embargo
    "embargo: before it ends": Row("DE-GBA-WCU", item(embargo_until=EMBARGO), False, ("embargo",)),
    "embargo: one second before": Row("DE-GBA-WCU", item(embargo_until=EMBARGO), False, ("embargo",),
                                      at=datetime(2026, 5, 31, 23, 59, 59, tzinfo=UTC)),
    "embargo: at its end": Row("DE-GBA-WCU", item(embargo_until=EMBARGO), True, PERMIT_ITEM, at=EMBARGO),
    "embargo: after it ends": Row("DE-GBA-WCU", item(embargo_until=EMBARGO), True, PERMIT_ITEM,
                                  at=datetime(2026, 7, 1, tzinfo=UTC)),
    "embargo: content before it ends": Row("DE-GBA-WCU", item(embargo_until=EMBARGO), False, ("embargo",),
                                           action="ReadContent"),
    # 6. consent: jurisdictions
    "consent: listed jurisdiction": Row("DE-GBA-WCU", item(consent_jurisdictions=("DE",)), True, PERMIT_ITEM),
    "consent: unlisted jurisdiction": Row("FR-PNAT", item(consent_jurisdictions=("DE",)), False,
                                          ("consent-jurisdictions",)),
    # 7. consent: purposes
    "consent: listed purpose": Row("DE-GBA-WCU", item(consent_purposes=("prosecution",)), True, PERMIT_ITEM,
                                   purpose="prosecution"),
    "consent: other purpose": Row("DE-GBA-WCU", item(consent_purposes=("prosecution",)), False,
                                  ("consent-purposes",), purpose="structural-investigation"),
    "consent: no purpose declared": Row("DE-GBA-WCU", item(consent_purposes=("prosecution",)), False,
                                        ("consent-purposes",)),
    # 8. declared purpose must be registered
    "purpose: registered": Row("DE-GBA-WCU", item(), True, PERMIT_ITEM, purpose="structural-investigation"),
    "purpose: not registered": Row("SE-IPC", item(), False, ("declared-purpose-registered",),
                                   purpose="structural-investigation"),
    # 9. withdrawn
    "withdrawn: item": Row("DE-GBA-WCU", item(withdrawn=True), False, ("withdrawn",)),
    "withdrawn: content": Row("DE-GBA-WCU", item(withdrawn=True), False, ("withdrawn",), action="ReadContent"),
    "withdrawn: not withdrawn": Row("DE-GBA-WCU", item(withdrawn=False), True, PERMIT_ITEM),
    # unknowns: deny, never crash
    "unknown office": Row("XX-NOBODY", item(protected_fields=("MINOR",)), False, withheld=("MINOR",)),
    "unknown action": Row("DE-GBA-WCU", item(), False, action="DeleteItem"),
    "ReadFeed on an item": Row("DE-GBA-WCU", item(), False, action="ReadFeed"),
}  # fmt: skip


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_rule(engine: PolicyEngine, row: Row) -> None:
    decision = engine.decide(row.office, row.action, row.resource, row.at, row.purpose)
    assert decision.allowed is row.allowed, decision.reasons
    assert decision.determining_policies == tuple(sorted(row.by))
    assert set(decision.withheld_fields) == set(row.withheld)
    present = set(row.resource.protected_fields) if isinstance(row.resource, ItemAttributes) else set()
    assert set(decision.disclosed_fields) == (present - set(row.withheld) if row.allowed else set())
    assert decision.policy_version == engine.store.history()[0].content_hash


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_every_variant_agrees(engine: PolicyEngine, row: Row) -> None:
    """The cache and the parse-once handles change speed, never the answer."""
    args = (row.office, row.action, row.resource, row.at, row.purpose)
    cached = engine.decide(*args)
    assert engine.decide(*args) == cached
    assert engine.decide_uncached(*args) == cached
    assert engine.decide_parse_every_call(*args) == cached


def test_default_deny_names_no_policy(engine: PolicyEngine) -> None:
    decision = engine.decide("SE-IPC", "ReadItem", item(jurisdictions=("DE",)), NOW)
    assert decision.determining_policies == ()
    assert decision.reasons == ("default deny: no policy permits this",)


def test_several_forbids_are_all_named(engine: PolicyEngine) -> None:
    decision = engine.decide("SE-IPC", "ReadItem", item(classification="SECRET", withdrawn=True), NOW)
    assert decision.determining_policies == ("classification-secret", "withdrawn")
