"""From a verified evidence event to the attributes a policy decides on. Pure.

The gateway and ``evhub`` use this so that what a policy sees is exactly what the publisher signed: the target
jurisdiction of each published copy, the case ids, the classification, the labels, the embargo and consent
restrictions, whether the item was withdrawn, and every label found on the item's protected digests — the ones the
policy decides (``protected_fields``) and the ones it cannot (``undecidable_fields``: ``UNKNOWN``, ``GRAPHIC`` …),
so that a value with an undecidable label is withheld from everyone rather than forgotten.

Does not own: whether an item was withdrawn (the caller knows from the withdrawal events it has seen, and must say).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from services.policy.model import PROTECTED_LABELS, ItemAttributes, ProtectedLabel, SensitivityLabel


def item_attributes(event: Mapping[str, Any], *, published_to: Iterable[str] = (), withdrawn: bool) -> ItemAttributes:
    """``event`` is a decoded ``evidence_event`` record; ``published_to`` adds the jurisdictions of the item's other
    copies (an item is one event per jurisdiction); ``withdrawn`` has no default — a caller that forgot to look
    would otherwise release withdrawn evidence."""
    sharing = event["sharing"]
    labels = [s for s in event["sensitivity"] if s != "UNKNOWN"]
    on_digests = {p["label"] for p in event["protected"]}
    protected = sorted(on_digests & set(PROTECTED_LABELS))
    return ItemAttributes(
        item_id=event["item_id"],
        jurisdictions=tuple(sorted({event["jurisdiction"], *published_to})),
        case_ids=tuple(event["case_ids"]),
        classification=event["classification"],
        sensitivity=tuple(cast(list[SensitivityLabel], labels)),
        embargo_until=sharing["embargo_until"],
        consent_jurisdictions=tuple(sharing["allowed_jurisdictions"]),
        consent_purposes=tuple(sharing["purposes"]),
        withdrawn=withdrawn,
        protected_fields=tuple(cast(list[ProtectedLabel], protected)),
        undecidable_fields=tuple(sorted(on_digests - set(PROTECTED_LABELS))),
    )
