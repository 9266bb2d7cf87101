"""The access-policy vocabulary: offices, the resources they ask for, the actions, and the decision.

Owns: the shapes the gateway and the policy service exchange (:class:`Office`, :class:`ItemAttributes`,
:class:`FeedRef`, :class:`Decision`), the action names, and the protected-field labels. Pure: no I/O, no clock.

Does not own: what the rules say (the Cedar policy pack), how versions are signed (``version``), how decisions
are reached (``engine``).

Actions, as named in the Cedar schema and in every decision:

- ``ReadFeed`` — subscribe to ``evidence.<jurisdiction>`` (resource: a :class:`FeedRef`);
- ``ReadItem`` — receive an item's metadata in a feed; ``ReadContent`` — download its bytes;
- ``ReadProtected_<LABEL>`` for each label in :data:`PROTECTED_LABELS` — receive the disclosure of a protected
  field. Deciding ``ReadItem``/``ReadContent`` also decides each protected label present on the item.

Redaction is an allow-list: :attr:`Decision.disclosed_fields` names the labels that were decided *and* allowed;
a gateway forwards only disclosures with those labels. Everything else present on the item — refused labels,
labels the policy cannot decide (:attr:`ItemAttributes.undecidable_fields`: ``UNKNOWN``, ``GRAPHIC`` …) and,
when the read itself is denied, every label — is in :attr:`Decision.withheld_fields`.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

Classification = Literal["PUBLIC", "RESTRICTED", "CONFIDENTIAL", "SECRET"]
SensitivityLabel = Literal[
    "WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT", "MINOR", "GRAPHIC", "PERPETRATOR_IDENTIFYING"
]
ProtectedLabel = Literal["WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT", "MINOR"]

PROTECTED_LABELS: Final[tuple[ProtectedLabel, ...]] = (
    "WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT", "MINOR",
)  # fmt: skip
PROTECTED_PREFIX: Final = "ReadProtected_"
READ_FEED: Final = "ReadFeed"
READ_ITEM: Final = "ReadItem"
READ_CONTENT: Final = "ReadContent"
#: Actions after which the protected fields present on the item are decided too.
REDACTING_ACTIONS: Final = frozenset({READ_ITEM, READ_CONTENT})
ACTIONS: Final[tuple[str, ...]] = (
    READ_FEED, READ_ITEM, READ_CONTENT, *(PROTECTED_PREFIX + label for label in PROTECTED_LABELS),
)  # fmt: skip

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_LABEL = r"^[A-Z][A-Z0-9_]{0,63}$"
_CODE = r"^[A-Z]{2}(-[A-Z0-9]{1,8})?$"


def protected_action(label: ProtectedLabel) -> str:
    """``WITNESS_IDENTIFYING`` → ``ReadProtected_WITNESS_IDENTIFYING``."""
    return PROTECTED_PREFIX + label


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Office(_Frozen):
    """A prosecution office, as the policy sees it. Part of every policy version (its Cedar entities)."""

    office_id: str = Field(pattern=_ID)
    name: str = ""
    jurisdiction: str = Field(pattern=_CODE)
    #: Classification levels (``SECRET`` …) and special clearances (``PROTECTION``).
    clearances: tuple[str, ...] = ()
    assigned_cases: tuple[str, ...] = ()
    purposes: tuple[str, ...] = ()


class ItemAttributes(_Frozen):
    """The policy-relevant attributes of one evidence item. Frozen and hashable: the decision cache keys on it
    (without ``item_id``, see :meth:`policy_key`)."""

    item_id: str = Field(min_length=1, max_length=200)
    jurisdictions: tuple[str, ...] = ()
    case_ids: tuple[str, ...] = ()
    classification: Classification = "RESTRICTED"
    sensitivity: tuple[SensitivityLabel, ...] = ()
    embargo_until: AwareDatetime | None = None
    #: Jurisdictions the source consented to; empty means no restriction.
    consent_jurisdictions: tuple[str, ...] = ()
    #: Purposes the source consented to; empty means no restriction.
    consent_purposes: tuple[str, ...] = ()
    withdrawn: bool = False
    #: The protected-field labels present on the item that the policy decides (their disclosures travel
    #: separately).
    protected_fields: tuple[ProtectedLabel, ...] = ()
    #: Labels present on the item's protected digests that no policy decides (``UNKNOWN`` — what a label from a
    #: newer schema resolves to —, ``GRAPHIC``, ``PERPETRATOR_IDENTIFYING`` …): withheld from every office.
    undecidable_fields: tuple[Annotated[str, Field(pattern=_LABEL)], ...] = ()

    @field_validator("undecidable_fields")
    @classmethod
    def _not_a_decided_label(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        decided = sorted(set(labels) & set(PROTECTED_LABELS))
        if decided:
            raise ValueError(f"{', '.join(decided)} is decided by the policy: list it in protected_fields")
        return labels

    def policy_key(self) -> tuple[object, ...]:
        """Everything a decision may depend on, without the item's id: policies may not name items (checked
        when a version is compiled), so two items with equal keys get equal decisions."""
        return (
            tuple(sorted(set(self.jurisdictions))), tuple(sorted(set(self.case_ids))), self.classification,
            tuple(sorted(set(self.sensitivity))), self.embargo_until,
            tuple(sorted(set(self.consent_jurisdictions))), tuple(sorted(set(self.consent_purposes))),
            self.withdrawn, tuple(sorted(set(self.protected_fields))), tuple(sorted(set(self.undecidable_fields))),
        )  # fmt: skip


class FeedRef(_Frozen):
    """The resource of ``ReadFeed``: one jurisdiction's evidence feed."""

    jurisdiction: str = Field(pattern=_CODE)


class Decision(_Frozen):
    """The answer to "may this office do this to this item, at that time?" — with what a court will ask."""

    allowed: bool
    #: Protected-field labels on the item that the office may NOT see (their disclosures are withheld): every
    #: label present that is not in :attr:`disclosed_fields`, including the ones the policy cannot decide.
    withheld_fields: tuple[str, ...] = ()
    #: The allow-list: protected-field labels on the item that were decided and allowed for this office. A gateway
    #: forwards only disclosures with these labels. A denied decision discloses nothing.
    disclosed_fields: tuple[str, ...] = ()
    #: The content hash of the policy version that decided; None when no version was in force.
    policy_version: str | None = None
    #: The ``@id`` of each policy that determined the decision (permits if allowed, forbids if denied;
    #: empty for the default deny).
    determining_policies: tuple[str, ...] = ()
    #: Plain-language reasons (default deny, unknown office, which policies withheld which field …).
    reasons: tuple[str, ...] = ()
    #: Cedar evaluation errors, if any (a policy that errors is skipped; the decision fails closed).
    errors: tuple[str, ...] = ()

    @classmethod
    def deny(cls, reason: str, *, policy_version: str | None = None, errors: tuple[str, ...] = ()) -> Decision:
        return cls(allowed=False, policy_version=policy_version, reasons=(reason,), errors=errors)
