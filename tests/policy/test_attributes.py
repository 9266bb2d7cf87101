"""What the policy sees of a signed event: ``item_attributes`` pinned field by field, from a decoded record."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any

import pytest

from services.policy.attributes import item_attributes
from services.policy.model import ItemAttributes
from services.shared.avro import AvroCodec
from tests.shared.records import evidence_event

EMBARGO = datetime(2026, 9, 1, 8, 30, tzinfo=UTC)
PROTECTED = [
    {"label": "WITNESS_IDENTIFYING", "digest": "w" * 43},
    {"label": "LOCATION_EXACT", "digest": "l" * 43},
    {"label": "UNKNOWN", "digest": "u" * 43},
    {"label": "GRAPHIC", "digest": "g" * 43},
    {"label": "WITNESS_IDENTIFYING", "digest": "v" * 43},
]


def _decoded(codec: AvroCodec, **changes: Any) -> dict[str, Any]:
    """An evidence_event as a receiver holds it: encoded with the contract and decoded again."""
    record = evidence_event(key_id="d1" * 32, protected=PROTECTED)
    record["sharing"] = {**record["sharing"], "embargo_until": EMBARGO}
    record["sensitivity"] = ["GRAPHIC", "WITNESS_IDENTIFYING", "UNKNOWN"]
    record.update(changes)
    decoded: dict[str, Any] = codec.decode(codec.encode("evidence_event", record), expect="evidence_event")
    return decoded


def test_every_policy_relevant_attribute_is_reported(codec: AvroCodec) -> None:
    attributes = item_attributes(_decoded(codec), published_to=["SE", "FR"], withdrawn=False)
    assert attributes == ItemAttributes(
        item_id="item-7f3a",
        jurisdictions=("DE", "FR", "SE"),
        case_ids=("case-DE-2024-17", "case-SE-ICC-3"),
        classification="CONFIDENTIAL",
        sensitivity=("GRAPHIC", "WITNESS_IDENTIFYING"),  # UNKNOWN says nothing a policy can use
        embargo_until=EMBARGO,
        consent_jurisdictions=("DE", "FR", "SE"),
        consent_purposes=("prosecution",),
        withdrawn=False,
        protected_fields=("LOCATION_EXACT", "WITNESS_IDENTIFYING"),
        undecidable_fields=("GRAPHIC", "UNKNOWN"),
    )


def test_no_embargo_and_no_consent_restriction_are_reported_as_such(codec: AvroCodec) -> None:
    event = _decoded(codec, protected=[])
    event["sharing"] = {**event["sharing"], "embargo_until": None, "allowed_jurisdictions": [], "purposes": []}
    attributes = item_attributes(event, withdrawn=False)
    assert (attributes.embargo_until, attributes.consent_jurisdictions, attributes.consent_purposes) == (None, (), ())
    assert (attributes.protected_fields, attributes.undecidable_fields, attributes.jurisdictions) == ((), (), ("DE",))


@pytest.mark.parametrize("withdrawn", [True, False])
def test_withdrawn_is_what_the_caller_says(codec: AvroCodec, withdrawn: bool) -> None:
    assert item_attributes(_decoded(codec), withdrawn=withdrawn).withdrawn is withdrawn


def test_withdrawn_has_no_fail_open_default() -> None:
    parameter = inspect.signature(item_attributes).parameters["withdrawn"]
    assert (parameter.kind, parameter.default) == (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty)
    with pytest.raises(TypeError, match="withdrawn"):
        item_attributes({})  # type: ignore[call-arg]  # the point of the test: omitting it is an error


def test_undecidable_labels_change_the_decision_key() -> None:
    """The cache keys decisions on ``policy_key``: an undecidable label changes what is withheld, so the key."""
    plain = ItemAttributes(item_id="a", protected_fields=("LOCATION_EXACT",))
    marked = plain.model_copy(update={"undecidable_fields": ("UNKNOWN",)})
    assert plain.policy_key() != marked.policy_key()


def test_a_decided_label_cannot_be_declared_undecidable() -> None:
    with pytest.raises(ValueError, match="protected_fields"):
        ItemAttributes(item_id="a", undecidable_fields=("MINOR",))
