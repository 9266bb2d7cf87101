"""Re-deciding a recorded access decision: what an auditor's replay does with every entry of the audit log.

Owns the comparison of one recorded decision with the policy: the resource rebuilt from what the entry recorded
(``ItemAttributes`` from its ``attributes`` and item id, or the feed's jurisdiction), the decision the policy
version the entry names gives at the recorded time (``PolicyEngine.decide_under``), the check that this version
was the one in force then (``PolicyStore.in_force``, replayed from ``hub.policy`` with the auditor's own trusted
policy-admin keys), and the reads that should never have happened whatever the policy said: a release of an item
whose recorded attributes say it was withdrawn, or embargoed at that moment. Each problem is one plain sentence.

What it cannot check: that the recorded attributes are the ones the publisher signed (the entry names the event
by topic, offset and envelope digest; checking them needs the evidence topics), and labels the gateway recorded
as withheld that no policy decides (they are taken from the record: they never change a decision).

Pure: no I/O, no clock. Does not own reading entries or policies (the replay driver), or reporting (``audit_report``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import ValidationError

from services.policy.engine import PolicyEngine
from services.policy.model import PROTECTED_LABELS, READ_FEED, Decision, FeedRef, ItemAttributes
from services.shared.errors import NotFound, ValidationFailed

ProblemKind = Literal[
    "undecodable", "attributes-invalid", "decision-unknown", "unknown-policy-version", "policy-not-in-force",
    "decision-differs", "disclosed-differs", "withheld-differs", "determining-differs", "released-under-embargo",
    "released-after-withdrawal",
]  # fmt: skip
RELEASED: Final = "RELEASED"
REFUSED: Final = "REFUSED"


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    detail: str


@dataclass(frozen=True)
class Replayed:
    """One entry re-decided: what it recorded, what the policy says, and every problem found."""

    index: int
    entry_id: str
    at: datetime | None
    office: str
    action: str
    item_id: str | None
    decision: str
    policy_version: str | None
    in_force: str | None
    redecided: str | None
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def undecodable(index: int, reason: str) -> Replayed:
    """An entry whose bytes are not an ``AuditEntry`` (the log accepts none such: the copy was altered)."""
    problem = Problem("undecodable", f"entry {index} is not a well-formed audit entry ({reason})")
    return Replayed(index, "", None, "", "", None, "", None, None, None, (problem,))


def _short(version: str | None) -> str:
    return "none" if version is None else version[:12]


#: Distinct resources remembered by :func:`resource_of` (a log reads few distinct items many times).
MAX_CACHED: Final = 65_536


def resource_of(fields: Mapping[str, Any], cache: dict[tuple[Any, ...], Any] | None = None) -> ItemAttributes | FeedRef:
    """The resource the decision was about, rebuilt from the entry (validated once per distinct resource when a
    ``cache`` is given: the model's validation is most of the cost).

    Raises:
        ValidationFailed: the entry's recorded attributes are not usable (say why).
    """
    try:
        if fields["action"] == READ_FEED:
            return FeedRef(jurisdiction=fields["jurisdiction"])
        item, attrs = fields.get("item"), fields.get("attributes")
        if item is None or attrs is None:
            raise ValidationFailed(f"a {fields['action']} decision without a recorded item and its attributes")
        protected = tuple(attrs["protected_fields"])
        # Labels no policy decides are recorded only among the withheld ones; they never change a decision.
        undecidable = tuple(w for w in fields.get("withheld_fields", []) if w not in protected
                            and w not in PROTECTED_LABELS)  # fmt: skip
        values = (item["item_id"], tuple(attrs["jurisdictions"]), tuple(attrs["case_ids"]), attrs["classification"],
                  tuple(attrs["sensitivity"]), attrs.get("embargo_until"), tuple(attrs["consent_jurisdictions"]),
                  tuple(attrs["consent_purposes"]), attrs["withdrawn"], protected, undecidable)  # fmt: skip
        found = None if cache is None else cache.get(values)
        if isinstance(found, ItemAttributes):
            return found
        resource = ItemAttributes(**dict(zip(_ITEM_FIELDS, values, strict=True)))
        if cache is not None:
            if len(cache) >= MAX_CACHED:
                cache.clear()
            cache[values] = resource
        return resource
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValidationFailed(f"recorded attributes are not valid: {where}: {first['msg']}") from exc


_ITEM_FIELDS: Final = (
    "item_id", "jurisdictions", "case_ids", "classification", "sensitivity", "embargo_until", "consent_jurisdictions",
    "consent_purposes", "withdrawn", "protected_fields", "undecidable_fields",
)  # fmt: skip


def _what(fields: Mapping[str, Any], resource: ItemAttributes | FeedRef) -> str:
    target = f"feed {resource.jurisdiction}" if isinstance(resource, FeedRef) else f"item {resource.item_id}"
    at = fields["at"].isoformat() if isinstance(fields["at"], datetime) else str(fields["at"])
    return f"{fields['action']} of {target} by {fields['office']} at {at}"


def _why(decision: Decision) -> str:
    return "; ".join(decision.reasons[:2]) or ("allowed" if decision.allowed else "denied")


def redecide(
    index: int, fields: Mapping[str, Any], engine: PolicyEngine, cache: dict[tuple[Any, ...], Any] | None = None
) -> Replayed:
    """Re-decide entry ``index`` (its decoded ``fields``) under the policy history ``engine`` holds (``cache``: see
    :func:`resource_of`; one per replay)."""
    at: datetime = fields["at"]
    named: str | None = fields.get("policy_version")
    recorded: str = str(fields["decision"])
    item_id = (fields.get("item") or {}).get("item_id")
    in_force_version = engine.store.in_force(at)
    in_force = None if in_force_version is None else in_force_version.content_hash
    problems: list[Problem] = []

    def done(redecided: str | None) -> Replayed:
        return Replayed(index, fields["entry_id"], at, fields["office"], fields["action"], item_id, recorded, named,
                        in_force, redecided, tuple(problems))  # fmt: skip

    try:
        resource = resource_of(fields, cache)
    except ValidationFailed as exc:
        problems.append(Problem("attributes-invalid", f"entry {index} cannot be re-decided: {exc.detail}"))
        return done(None)
    args = (fields["office"], fields["action"], resource, at, fields.get("purpose"))
    under = named

    def what() -> str:  # described only when something is wrong
        return _what(fields, resource)

    def started() -> str:
        return "" if in_force is None else f" (in force from {engine.store.in_force_from(in_force).isoformat()})"

    try:
        decision = engine.decide(*args) if named is None else engine.decide_under(named, *args)
        if named != in_force:
            problems.append(
                Problem(
                    "policy-not-in-force",
                    f"{what()} was decided under policy version "
                    f"{_short(named)}, but version {_short(in_force)} was in force then{started()}",
                )
            )
    except NotFound:
        problems.append(Problem("unknown-policy-version", f"{what()} names policy version {named}, which is not on "
                                "hub.policy signed by a policy-admin key you trust; version "
                                f"{_short(in_force)} was in force then{started()}"))  # fmt: skip
        decision, under = engine.decide(*args), in_force
    if recorded not in (RELEASED, REFUSED):
        problems.append(Problem("decision-unknown", f"{what()} records decision {recorded}, neither a release nor a "
                                "refusal"))  # fmt: skip
    elif decision.allowed != (recorded == RELEASED):
        verb = "allows" if decision.allowed else "refuses"
        problems.append(Problem("decision-differs", f"{what()} was {recorded}, but policy version {_short(under)} "
                                f"{verb} it ({_why(decision)})"))  # fmt: skip
    else:
        _compare_details(fields, decision, resource, what, problems)
    if recorded == RELEASED and isinstance(resource, ItemAttributes):
        if resource.withdrawn:
            problems.append(Problem("released-after-withdrawal", f"{what()} was RELEASED although its recorded "
                                    "attributes say the item was withdrawn"))  # fmt: skip
        if resource.embargo_until is not None and at < resource.embargo_until:
            problems.append(Problem("released-under-embargo", f"{what()} was RELEASED while the item was embargoed "
                                    f"until {resource.embargo_until.isoformat()}"))  # fmt: skip
    return done(RELEASED if decision.allowed else REFUSED)


def _compare_details(
    fields: Mapping[str, Any], decision: Decision, resource: ItemAttributes | FeedRef, what: Callable[[], str],
    problems: list[Problem],
) -> None:  # fmt: skip
    present: set[str] = set(resource.protected_fields) if isinstance(resource, ItemAttributes) else set()
    expected_disclosed: set[str] = {f for f in decision.disclosed_fields if f in present} if decision.allowed else set()
    checks: list[tuple[ProblemKind, str, set[str], set[str]]] = [
        ("disclosed-differs", "disclosed fields", set(fields.get("disclosed_fields", [])), expected_disclosed),
        ("withheld-differs", "withheld fields", set(fields.get("withheld_fields", [])), set(decision.withheld_fields)),
        ("determining-differs", "determining policies", set(fields.get("determining_policies", [])),
         set(decision.determining_policies)),
    ]  # fmt: skip
    for kind, label, got, want in checks:
        if got != want:
            problems.append(Problem(kind, f"{what()}: recorded {label} {sorted(got) or '[]'}, the policy gives "
                                    f"{sorted(want) or '[]'}"))  # fmt: skip
