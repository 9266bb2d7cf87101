"""Turning a policy version's text into Cedar handles, once, and refusing any version Cedar would not accept.

Owns: every check a version must pass before it can take effect (the schema parses; the policies parse and
validate against it; each policy has a unique ``@id``; no policy names a particular item; the office entities
and a probe item conform to the schema), Cedar's diagnostics in the error, and the JSON shapes of the entities
and requests the engine sends to Cedar. Pure: no I/O, no clock.

Does not own: signatures (``version``), choosing the version in force or caching (``engine``).

Time in Cedar: the ``datetime`` extension type (``datetime("2026-03-01T00:00:00Z")``), because lawyers can
read a date where they cannot read epoch seconds, and Cedar's validator type-checks comparisons of it.
Requests carry ``context.now`` truncated to whole seconds (see ``engine``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cedarpy

from services.policy.model import FeedRef, ItemAttributes, Office
from services.policy.version import PolicyVersion
from services.shared.errors import NotFound, PolicyError

#: The attributes the engine sends for an item: the schema of every version must describe exactly these.
_PROBE_ITEM = ItemAttributes(
    item_id="probe", jurisdictions=("DE",), case_ids=("C",), sensitivity=("GRAPHIC",),
    embargo_until=datetime(2000, 1, 1, tzinfo=UTC), consent_jurisdictions=("DE",), consent_purposes=("P",),
)  # fmt: skip


def cedar_datetime(moment: datetime) -> dict[str, Any]:
    """A datetime as a Cedar JSON extension value, UTC, whole seconds."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"__extn": {"fn": "datetime", "arg": text}}


def office_entity(office: Office) -> dict[str, Any]:
    attrs = {
        "jurisdiction": office.jurisdiction, "clearances": list(office.clearances),
        "assigned_cases": list(office.assigned_cases), "purposes": list(office.purposes),
    }  # fmt: skip
    return {"uid": {"type": "Office", "id": office.office_id}, "attrs": attrs, "parents": []}


def resource_uid(resource: ItemAttributes | FeedRef) -> dict[str, str]:
    if isinstance(resource, FeedRef):
        return {"type": "Feed", "id": resource.jurisdiction}
    return {"type": "Item", "id": resource.item_id}


def resource_entity(resource: ItemAttributes | FeedRef) -> dict[str, Any]:
    if isinstance(resource, FeedRef):
        return {"uid": resource_uid(resource), "attrs": {"jurisdiction": resource.jurisdiction}, "parents": []}
    attrs: dict[str, Any] = {
        "jurisdictions": list(resource.jurisdictions), "case_ids": list(resource.case_ids),
        "classification": resource.classification, "sensitivity": list(resource.sensitivity),
        "consent_jurisdictions": list(resource.consent_jurisdictions),
        "consent_purposes": list(resource.consent_purposes), "withdrawn": resource.withdrawn,
    }  # fmt: skip
    if resource.embargo_until is not None:
        attrs["embargo_until"] = cedar_datetime(resource.embargo_until)
    return {"uid": resource_uid(resource), "attrs": attrs, "parents": []}


def request(
    office_id: str, action: str, resource: ItemAttributes | FeedRef, now: datetime, purpose: str | None
) -> dict[str, Any]:
    context: dict[str, Any] = {"now": cedar_datetime(now)}
    if purpose is not None:
        context["purpose"] = purpose
    return {
        "principal": {"type": "Office", "id": office_id}, "action": {"type": "Action", "id": action},
        "resource": resource_uid(resource), "context": context,
    }  # fmt: skip


@dataclass(frozen=True)
class CompiledPolicy:
    """A verified, validated version with its Cedar handles parsed once."""

    version: PolicyVersion
    content_hash: str
    policies: cedarpy.PolicySet
    schema: cedarpy.Schema
    entities: cedarpy.Entities
    offices: Mapping[str, Office]
    #: Cedar's positional policy id (``policy3``) → the policy's ``@id`` annotation.
    policy_ids: Mapping[str, str]
    #: Every moment the policy text compares time with (its ``datetime("…")`` literals), or None when the text
    #: computes with time (durations, offsets…), so that decisions can only be cached to the second.
    time_thresholds: tuple[datetime, ...] | None = None

    @property
    def effective_from(self) -> datetime:
        return self.version.effective_from


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _structure(policy_text: str) -> tuple[dict[str, str], list[str]]:
    """Policy ids → ``@id`` and the structural diagnostics Cedar's validator does not give."""
    est = json.loads(cedarpy.policies_to_json_str(policy_text))
    problems: list[str] = []
    if est.get("templates"):
        problems.append("templates are not allowed; write concrete policies")
    ids: dict[str, str] = {}
    for pid, policy in est.get("staticPolicies", {}).items():
        annotation = policy.get("annotations", {}).get("id")
        if not annotation:
            problems.append(f'[{pid}] every policy needs an @id("…") annotation: it names the rule in decisions')
        elif annotation in ids.values():
            problems.append(f"[{pid}] duplicate @id({annotation!r})")
        else:
            ids[pid] = annotation
        if any(n.get("type") == "Item" and "id" in n for n in _walk(policy)):
            problems.append(f"[{annotation or pid}] policies decide on item attributes and may not name an Item")
    if not est.get("staticPolicies"):
        problems.append("the policy set is empty")
    return ids, problems


def diagnose(policy_text: str, schema_text: str, offices: tuple[Office, ...]) -> list[str]:
    """Every reason the pack would be refused, in Cedar's words where Cedar found it; empty if it is valid."""
    try:
        schema = cedarpy.Schema.from_str(schema_text)
    except ValueError as exc:
        return [f"schema: {exc}"]
    result = cedarpy.validate_policies(policy_text, schema)
    if result.errors:
        try:
            names, _ = _structure(policy_text)
        except ValueError:  # it did not parse: Cedar's message has no policy id to name
            names = {}
        return [f"[{names.get(e.policy_id, e.policy_id)}] {e.error}" if e.policy_id else e.error
                for e in result.errors]  # fmt: skip
    _, problems = _structure(policy_text)
    seen: set[str] = set()
    for office in offices:
        if office.office_id in seen:
            problems.append(f"duplicate office {office.office_id}")
        seen.add(office.office_id)
    try:
        base = cedarpy.Entities.from_json_str(json.dumps([office_entity(o) for o in offices]), schema)
    except ValueError as exc:
        return [*problems, f"offices: {exc}"]
    for probe in (_PROBE_ITEM, FeedRef(jurisdiction="DE")):
        try:
            base.with_added_json_str(json.dumps([resource_entity(probe)]), schema)
        except ValueError as exc:
            problems.append(f"schema does not describe the {type(probe).__name__} attributes the hub sends: {exc}")
    return problems


_DATETIME_LITERAL = re.compile(r'datetime\(\s*"([^"]+)"\s*\)')
_TIME_ARITHMETIC = ("duration", "offset", "toDate", "toTime", "toDays", "toHours", "toMinutes", "toSeconds",
                    "toMilliseconds")  # fmt: skip


def time_thresholds(policy_text: str) -> tuple[datetime, ...] | None:
    """The moments at which a decision under this text can change, as far as the text alone decides time.

    Pure comparisons of ``context.now`` with literals and with item attributes (the embargo) only change their
    outcome at those moments; arithmetic on time could change it at any moment, so it returns None.
    """
    if any(word in policy_text for word in _TIME_ARITHMETIC):
        return None
    moments = []
    for literal in _DATETIME_LITERAL.findall(policy_text):
        try:
            moments.append(datetime.fromisoformat(literal.replace("Z", "+00:00")))
        except ValueError:
            return None
    return tuple(sorted(m if m.tzinfo else m.replace(tzinfo=UTC) for m in moments))


def compile_version(version: PolicyVersion) -> CompiledPolicy:
    """Parse and validate once; the returned handles are reused for every decision under this version.

    Raises:
        PolicyError: the version would not be accepted; ``extensions["diagnostics"]`` lists Cedar's findings.
    """
    problems = diagnose(version.policy_text, version.schema_text, version.offices)
    if problems:
        raise PolicyError(
            f"policy version {version.content_hash[:16]} rejected: {'; '.join(problems)}", diagnostics=problems
        )
    schema = cedarpy.Schema.from_str(version.schema_text)
    ids, _ = _structure(version.policy_text)
    return CompiledPolicy(
        version=version, content_hash=version.content_hash,
        policies=cedarpy.PolicySet.from_str(version.policy_text), schema=schema,
        entities=cedarpy.Entities.from_json_str(json.dumps([office_entity(o) for o in version.offices]), schema),
        offices={o.office_id: o for o in version.offices}, policy_ids=ids,
        time_thresholds=time_thresholds(version.policy_text),
    )  # fmt: skip


def policy_source(compiled: CompiledPolicy, policy_id: str) -> str:
    """The Cedar text of the policy whose ``@id`` is ``policy_id`` (re-rendered by Cedar; comments are lost).

    Raises:
        NotFound: no policy has that ``@id`` in this version.
    """
    est = json.loads(cedarpy.policies_to_json_str(compiled.version.policy_text))
    for pid, policy in est.get("staticPolicies", {}).items():
        if compiled.policy_ids.get(pid) == policy_id:
            single = {"staticPolicies": {pid: policy}, "templates": {}, "templateLinks": []}
            return cedarpy.format_policies(cedarpy.policies_from_json_str(json.dumps(single))).strip()
    raise NotFound(f"no policy @id({policy_id!r}) in version {compiled.content_hash[:16]}")
