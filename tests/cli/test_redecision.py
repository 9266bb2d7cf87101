"""The pure re-decision and report cores of ``evhub audit replay``: each way a recorded decision can disagree with the
policy history is a named row, and the report aggregates and bounds what it keeps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.audit.integrity import Finding
from services.cli import audit_report
from services.cli.audit_report import ReplayReport, row
from services.cli.redecision import redecide, undecodable
from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.pack import SAMPLE_PACK, load_pack
from services.policy.version import sign, trusted_keys
from services.shared.keys import SigningKey
from tests.audit.cli_support import ITEMS, decided_entry

V1 = datetime(2025, 1, 1, tzinfo=UTC)
V2 = datetime(2026, 1, 1, tzinfo=UTC)
AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    admin = SigningKey.generate()
    pack = load_pack(SAMPLE_PACK)
    store = PolicyStore(trusted=trusted_keys([admin.public]))
    for when, author in ((V1, "v1"), (V2, "v2")):
        store.accept(sign(pack.version(author=author, effective_from=when), admin), appended_at=when)
    return PolicyEngine(store)


def _v(engine: PolicyEngine, n: int) -> str:
    return engine.store.history()[n].content_hash


Case = Callable[[PolicyEngine], dict[str, Any]]
CASES: dict[str, tuple[Case, set[str]]] = {
    "release reproduced": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT), set()),
    "refusal reproduced": (lambda e: decided_entry(e, office="SE-IPC", item=ITEMS["item-testimony-0002"], at=AT,
                                                   jurisdiction="SE"), set()),
    "feed read reproduced": (lambda e: decided_entry(e, office="FR-PNAT", at=AT, jurisdiction="FR"), set()),
    "released what the policy refuses": (
        lambda e: decided_entry(e, office="SE-IPC", item=ITEMS["item-testimony-0002"], at=AT, jurisdiction="SE",
                                decision="RELEASED"), {"decision-differs"}),
    "refused what the policy allows": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT, decision="REFUSED"),
        {"decision-differs"}),
    "an unknown version": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT, policy_version="0" * 64),
        {"unknown-policy-version"}),
    "a version no longer in force": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT,
                                policy_version=_v(e, 0)), {"policy-not-in-force"}),
    "no version recorded while one was in force": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT, policy_version=None),
        {"policy-not-in-force"}),
    "a version before any took effect": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=V1 - timedelta(days=1),
                                policy_version=_v(e, 0), decision="REFUSED"),
        {"policy-not-in-force", "decision-differs"}),  # re-decided under the version it names, which allows it
    "released after withdrawal": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-withdrawn-0004"], at=AT, decision="RELEASED"),
        {"decision-differs", "released-after-withdrawal"}),
    "released under embargo": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-embargoed-0003"], at=AT, decision="RELEASED"),
        {"decision-differs", "released-under-embargo"}),
    "disclosed a withheld field": (
        lambda e: decided_entry(e, office="SE-IPC", item=ITEMS["item-photo-0001"], at=AT, jurisdiction="SE",
                                disclosed_fields=["VICTIM_IDENTIFYING", "LOCATION_EXACT"], withheld_fields=[]),
        {"disclosed-differs", "withheld-differs"}),
    "other determining policies": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT,
                                determining_policies=["made-up"]), {"determining-differs"}),
    "attributes that are not valid": (
        lambda e: {**decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT),
                   "attributes": {**decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"],
                                                  at=AT)["attributes"], "classification": "TOP"}},
        {"attributes-invalid"}),
    "an item read without attributes": (
        lambda e: {**decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT), "attributes": None},
        {"attributes-invalid"}),
    "a decision neither released nor refused": (
        lambda e: decided_entry(e, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT, decision="UNKNOWN"),
        {"decision-unknown"}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_each_disagreement_with_the_policy_is_named(engine: PolicyEngine, name: str) -> None:
    make, expected = CASES[name]
    replayed = redecide(7, make(engine), engine)
    assert {p.kind for p in replayed.problems} == expected, [p.detail for p in replayed.problems]
    assert replayed.ok == (not expected)
    assert all(p.detail for p in replayed.problems)


def test_a_problem_says_what_where_and_under_which_version(engine: PolicyEngine) -> None:
    entry = decided_entry(engine, office="SE-IPC", item=ITEMS["item-testimony-0002"], at=AT, jurisdiction="SE",
                          decision="RELEASED")  # fmt: skip
    [problem] = redecide(3, entry, engine).problems
    assert problem.detail.startswith("ReadItem of item item-testimony-0002 by SE-IPC at 2026-06-01T12:00:00+00:00 ")
    assert f"policy version {_v(engine, 1)[:12]} refuses it" in problem.detail


def test_the_report_counts_per_office_and_item_and_bounds_what_it_keeps(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = ReplayReport(origin="o", size=4, mode="full")
    good = redecide(0, decided_entry(engine, office="DE-GBA-WCU", item=ITEMS["item-photo-0001"], at=AT), engine)
    bad = redecide(1, CASES["released what the policy refuses"][0](engine), engine)
    for r in (good, bad, undecodable(2, "malformed")):
        report.add(r)
    report.add_findings([Finding("tile-changed", 77, "tile/0/000 was altered at entry 77")], dropped=1)
    assert report.offices == {"DE-GBA-WCU": {"RELEASED": 1}, "SE-IPC": {"RELEASED": 1}}
    assert report.items == {"item-photo-0001": {"RELEASED": 1}, "item-testimony-0002": {"RELEASED": 1}}
    assert not report.ok
    assert report.count == 4
    assert [(d.index, d.kind) for d in report.sorted_discrepancies()] == [
        (1, "decision-differs"), (2, "undecodable"), (77, "tile-changed")]  # fmt: skip
    assert row(bad)["ok"] is False
    assert set(row(good)) == set(audit_report.COLUMNS)
    monkeypatch.setattr(audit_report, "MAX_DISCREPANCIES", 2)
    small = ReplayReport(origin="o", size=9, mode="full")
    for i in range(5):
        small.add(redecide(i, CASES["released what the policy refuses"][0](engine), engine))
    assert (len(small.discrepancies), small.dropped, small.count) == (2, 3, 5)
    assert small.to_json()["discrepancies"] == 5
