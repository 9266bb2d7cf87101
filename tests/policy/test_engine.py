"""The decision cache: what it keys on, that it is bounded, and that no version in force means deny."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import ItemAttributes
from services.policy.pack import PolicyPack
from services.policy.version import sign, trusted_keys
from services.shared.errors import ValidationFailed
from services.shared.keys import SigningKey

AT = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def _item(item_id: str = "a", **changes: object) -> ItemAttributes:
    base: dict[str, object] = {"item_id": item_id, "jurisdictions": ("DE",), "case_ids": ("CASE-SY-001",),
                               "classification": "PUBLIC"}  # fmt: skip
    return ItemAttributes.model_validate({**base, **changes})


def test_items_with_equal_attributes_share_a_cache_entry(engine: PolicyEngine) -> None:
    first = engine.decide("DE-GBA-WCU", "ReadItem", _item("a"), AT)
    second = engine.decide("DE-GBA-WCU", "ReadItem", _item("b"), AT + timedelta(milliseconds=500))
    assert first == second
    assert (engine.cache_info().hits, engine.cache_info().misses) == (1, 1)


CHANGES = {
    "office": ("FR-PNAT", "ReadItem", _item(), AT, None),
    "action": ("DE-GBA-WCU", "ReadContent", _item(), AT, None),
    "purpose": ("DE-GBA-WCU", "ReadItem", _item(), AT, "prosecution"),
    "an embargo": ("DE-GBA-WCU", "ReadItem", _item(embargo_until=AT + timedelta(days=1)), AT, None),
    "withdrawn": ("DE-GBA-WCU", "ReadItem", _item(withdrawn=True), AT, None),
    "case": ("DE-GBA-WCU", "ReadItem", _item(case_ids=("CASE-SY-002",)), AT, None),
}


@pytest.mark.parametrize("changed", CHANGES.values(), ids=CHANGES.keys())
def test_anything_policy_relevant_misses_the_cache(
    engine: PolicyEngine, changed: tuple[str, str, ItemAttributes, datetime, str | None]
) -> None:
    engine.decide("DE-GBA-WCU", "ReadItem", _item(), AT)
    engine.decide(*changed)
    assert engine.cache_info().misses == 2


def test_one_cached_decision_serves_until_the_next_moment_that_can_change_it(engine: PolicyEngine) -> None:
    ends = AT.replace(microsecond=0) + timedelta(hours=1)
    embargoed = _item(embargo_until=ends)
    before = [engine.decide("DE-GBA-WCU", "ReadItem", embargoed, AT + timedelta(minutes=m)) for m in range(0, 60, 7)]
    after = [engine.decide("DE-GBA-WCU", "ReadItem", embargoed, AT + timedelta(hours=1, minutes=m))
             for m in range(1, 60, 7)]  # fmt: skip
    assert {d.allowed for d in before} == {False}
    assert {d.determining_policies for d in before} == {("embargo",)}
    assert {d.allowed for d in after} == {True}
    at_the_moment = engine.decide("DE-GBA-WCU", "ReadItem", embargoed, ends)
    assert at_the_moment.allowed, "the embargo ends at that second (the pack: context.now < embargo_until)"
    assert engine.cache_info().misses == 3, "before, at, after the embargo: one evaluation each"
    assert engine.decide_uncached("DE-GBA-WCU", "ReadItem", embargoed, AT + timedelta(minutes=59)) == before[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'permit(principal, action, resource) when { context.now < datetime("2027-01-01T00:00:00Z") };',
            (datetime(2027, 1, 1, tzinfo=UTC),),
        ),
        ("permit(principal, action, resource) when { context.now < resource.embargo_until };", ()),
        (
            'permit(principal, action, resource) when { context.now < resource.embargo_until.offset(duration("1d")) };',
            None,
        ),
    ],
    ids=["literal", "attribute-only", "arithmetic-falls-back-to-seconds"],
)
def test_time_thresholds_are_read_from_the_policy_text(text: str, expected: tuple[datetime, ...] | None) -> None:
    from services.policy.compiled import time_thresholds

    assert time_thresholds(text) == expected


def test_cache_is_bounded(store: PolicyStore) -> None:
    engine = PolicyEngine(store, cache_size=3)
    for n in range(5):
        engine.decide("DE-GBA-WCU", "ReadItem", _item(case_ids=(f"CASE-SY-00{n}",)), AT)
    assert engine.cache_info().size == 3
    engine.clear_cache()
    assert engine.cache_info().size == 0


def test_with_no_valid_policy_everything_is_denied() -> None:
    engine = PolicyEngine(PolicyStore(trusted=trusted_keys([SigningKey.generate().public])))
    decision = engine.decide("DE-GBA-WCU", "ReadItem", _item(protected_fields=("MINOR",)), AT)
    assert (decision.allowed, decision.policy_version, decision.withheld_fields) == (False, None, ("MINOR",))
    assert "no valid policy version" in decision.reasons[0]


def test_a_naive_time_is_a_caller_bug(engine: PolicyEngine) -> None:
    with pytest.raises(ValidationFailed):
        engine.decide("DE-GBA-WCU", "ReadItem", _item(), datetime(2026, 1, 1))


def test_a_version_is_in_force_from_its_exact_moment_not_the_next_whole_second(
    pack: PolicyPack, admin_key: SigningKey
) -> None:
    effective = datetime(2026, 5, 1, 9, 0, 0, 600_000, tzinfo=UTC)
    store = PolicyStore(trusted=trusted_keys([admin_key.public]))
    version = store.accept(sign(pack.version(author="board", effective_from=effective), admin_key),
                           appended_at=effective - timedelta(minutes=1))  # fmt: skip
    decision = PolicyEngine(store).decide("DE-GBA-WCU", "ReadItem", _item(), effective + timedelta(milliseconds=300))
    assert decision.policy_version == version.content_hash, "0.3 s after it took effect, within the same second"
