"""What one office may receive of one verified evidence record, and the audit entry that must be durable first.

Owns: the per-record decision (``ReadItem`` on the attributes the publisher signed; a withdrawal is decided on the
withdrawn item's last attributes, so exactly the offices that could read the item learn that it was withdrawn),
redaction — an allow-list: only disclosures whose signed label the decision allows are forwarded, in the
publisher's original envelope (``envelope.with_disclosures``) — the audit entry of a release or a refusal
(``schemas/audit_entry.avsc``), and the JSON shapes an office receives (``docs/gateway-api.md``). A refusal
reveals nothing of the record: the office gets only the receipt id of the audited refusal.

Pure: time, ids and decisions are parameters. Does not own: reading or verifying records (``reader``), writing
the audit log (``audit``), cursors (``cursor``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Final, Literal

from services.policy.attributes import item_attributes
from services.policy.model import READ_ITEM, Decision, ItemAttributes
from services.shared import disclosure
from services.shared.avro import AvroCodec
from services.shared.envelope import with_disclosures
from services.shared.principals import Principal

EVENT_SCHEMA: Final = "evidence_event"
WITHDRAWAL_SCHEMA: Final = "evidence_withdrawal"
Kind = Literal["event", "withdrawal"]


@dataclass(frozen=True)
class EvidenceRecord:
    """A record of an evidence topic, verified once by the gateway's reader (signature, key trusted for its
    sequence, sequence not replayed) and decoded once; offices are served from this."""

    topic: str
    partition: int
    offset: int
    envelope: bytes
    envelope_sha256: str
    payload_type: str
    schema: str
    record: Mapping[str, Any]
    key_id: str
    sequence: int
    disclosures: tuple[str, ...]
    #: What is rendered of this record for offices, by what they may see (see :func:`released_json`); filled on
    #: first use, so each record is rendered once per distinct view, not once per office and read.
    renders: dict[tuple[Any, ...], str] = field(default_factory=dict, compare=False, repr=False)
    #: The disclosures forwarded for each set of allowed labels (``forwarded_disclosures``), computed once.
    visible: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def signed_attributes(self) -> ItemAttributes | None:
        """The attributes the policy decides on, from the signed event (not withdrawn); None for a withdrawal."""
        return item_attributes(self.record, withdrawn=False) if self.kind == "event" else None

    @property
    def kind(self) -> Kind:
        return "withdrawal" if self.schema == WITHDRAWAL_SCHEMA else "event"

    @property
    def item_id(self) -> str:
        return str(self.record["item_id"])

    @property
    def version(self) -> int:
        return int(self.record["withdrawn_version"] if self.kind == "withdrawal" else self.record["version"])

    @property
    def event_id(self) -> str:
        return str(self.record["event_id"])

    @property
    def jurisdiction(self) -> str:
        return str(self.record["jurisdiction"])


@dataclass(frozen=True)
class Requester:
    """Who asks, and for which request: what every audit entry of the request names."""

    principal: Principal
    request_id: str
    gateway: str
    purpose: str | None


@dataclass(frozen=True)
class Outcome:
    """One record decided for one office: the audit entry (to be made durable first) and what may be sent."""

    record: EvidenceRecord
    decision: Decision
    attributes: ItemAttributes
    entry_id: str
    entry: dict[str, Any]
    #: The disclosures forwarded (empty for a refusal).
    disclosures: tuple[str, ...]

    @property
    def released(self) -> bool:
        return self.decision.allowed


Decide = Callable[[ItemAttributes], Decision]


def attributes_of(
    record: EvidenceRecord, *, withdrawn: bool, last_attributes: ItemAttributes | None = None
) -> ItemAttributes:
    """What the policy decides on: the signed event's attributes, with the item's withdrawal as the gateway knows it.
    A withdrawal record is decided on the withdrawn item's last event (``last_attributes``) as it was before it was
    withdrawn; without one (the item was never seen here) on nothing but its id and case ids, so it is refused."""
    if record.kind == "event":
        signed = record.signed_attributes
        assert signed is not None  # an event always has them
        return signed.model_copy(update={"withdrawn": True}) if withdrawn else signed
    if last_attributes is not None:
        return last_attributes.model_copy(update={"withdrawn": False})
    return ItemAttributes(item_id=record.item_id, case_ids=tuple(record.record["case_ids"]), withdrawn=True)


def allowed_labels(decision: Decision, attributes: ItemAttributes) -> tuple[str, ...]:
    """The protected-field labels whose disclosures may be forwarded: ``Decision.disclosed_fields`` — decided for
    this item *and* allowed — and nothing for a refusal. The one place redaction is decided (an allow-list: a label
    the policy did not decide is never forwarded)."""
    if not decision.allowed:
        return ()
    present = set(attributes.protected_fields)
    return tuple(label for label in decision.disclosed_fields if label in present)


def withheld_labels(decision: Decision, attributes: ItemAttributes) -> tuple[str, ...]:
    """Every label on the item whose disclosure is not forwarded (undecidable ones included)."""
    allowed = set(allowed_labels(decision, attributes))
    present = (*attributes.protected_fields, *attributes.undecidable_fields)
    return tuple(label for label in dict.fromkeys(present) if label not in allowed)


def forwarded_disclosures(record: EvidenceRecord, allowed: Sequence[str]) -> tuple[str, ...]:
    """The record's disclosures that match a signed digest whose label is in ``allowed``."""
    if record.kind != "event" or not allowed:
        return ()
    key = tuple(allowed)
    found = record.visible.get(key)
    if found is None:
        found = tuple(disclosure.visible(record.disclosures, record.record.get("protected", []), allowed=allowed))
        record.visible[key] = found
    return found


def deny_source(decision: Decision) -> str | None:
    if decision.allowed:
        return None
    if decision.policy_version is None:
        return "NO_POLICY"
    if any(r.startswith("unknown office") for r in decision.reasons):
        return "UNKNOWN_OFFICE"
    if decision.errors:
        return "ERROR"
    return "RULE" if decision.determining_policies else "DEFAULT_DENY"


def _attributes_entry(a: ItemAttributes) -> dict[str, Any]:
    return {
        "jurisdictions": list(a.jurisdictions), "case_ids": list(a.case_ids), "classification": a.classification,
        "sensitivity": list(a.sensitivity), "embargo_until": a.embargo_until,
        "consent_jurisdictions": list(a.consent_jurisdictions), "consent_purposes": list(a.consent_purposes),
        "withdrawn": a.withdrawn, "protected_fields": list(a.protected_fields),
    }  # fmt: skip


def audit_entry(
    *, entry_id: str, at: datetime, who: Requester, action: str, jurisdiction: str, decision: Decision,
    record: EvidenceRecord | None = None, attributes: ItemAttributes | None = None, disclosed: Sequence[str] = (),
    content_sha256: str | None = None, content_range: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """An ``audit_entry`` record: enough to re-decide the read later under the policy version it names."""
    item = None
    if record is not None:
        item = {
            "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "payload_type": record.payload_type, "event_id": record.event_id, "item_id": record.item_id,
            "version": record.version, "key_id": record.key_id, "sequence": record.sequence,
            "envelope_sha256": record.envelope_sha256, "content_sha256": content_sha256,
            "content_range": content_range,
        }  # fmt: skip
    return {
        "entry_id": entry_id, "at": at, "gateway": who.gateway, "office": who.principal.name,
        "client_cert_sha256": who.principal.cert_sha256, "request_id": who.request_id, "action": action,
        "purpose": who.purpose, "jurisdiction": jurisdiction, "item": item,
        "attributes": None if attributes is None else _attributes_entry(attributes),
        "decision": "RELEASED" if decision.allowed else "REFUSED", "deny_source": deny_source(decision),
        "disclosed_fields": list(disclosed),
        "withheld_fields": [] if attributes is None else list(withheld_labels(decision, attributes)),
        "policy_version": decision.policy_version, "determining_policies": list(decision.determining_policies),
        "errors": list(decision.errors),
    }  # fmt: skip


def decide_record(
    record: EvidenceRecord, *, who: Requester, at: datetime, entry_id: str, attributes: ItemAttributes,
    decide: Decide, action: str = READ_ITEM,
) -> Outcome:  # fmt: skip
    """Decide one record for one office and build its audit entry. ``decide`` is the policy engine bound to the
    office, the action, the time and the purpose."""
    decision = decide(attributes)
    allowed = allowed_labels(decision, attributes)
    forwarded = forwarded_disclosures(record, allowed)
    entry = audit_entry(entry_id=entry_id, at=at, who=who, action=action, jurisdiction=record.jurisdiction,
                        decision=decision, record=record, attributes=attributes, disclosed=allowed)  # fmt: skip
    return Outcome(record=record, decision=decision, attributes=attributes, entry_id=entry_id, entry=entry,
                   disclosures=forwarded)  # fmt: skip


@dataclass(frozen=True)
class AuditLocation:
    """Where the entry is in ``hub.audit``: known only once Kafka acknowledged it."""

    topic: str
    partition: int
    offset: int
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset, "index": self.index}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def released_event(
    outcome: Outcome, *, codec: AvroCodec, cursor: str | None, audit: AuditLocation, late: bool = False
) -> dict[str, Any]:
    """The JSON an office receives for a released record: the publisher's envelope carrying only the allowed
    disclosures (it verifies with the publisher's key alone), the decoded payload for convenience, the receipt."""
    record = outcome.record
    envelope = with_disclosures(codec, record.envelope, outcome.disclosures)
    body: dict[str, Any] = {
        "type": record.kind, "cursor": cursor, "receipt": outcome.entry_id, "audit": audit.to_json(),
        "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "envelope": base64.b64encode(envelope).decode("ascii"),
        "payload_type": record.payload_type, record.kind: _json_value(record.record),
        "disclosed_fields": list(allowed_labels(outcome.decision, outcome.attributes)),
        "withheld_fields": list(withheld_labels(outcome.decision, outcome.attributes)),
        "policy_version": outcome.decision.policy_version,
    }  # fmt: skip
    if late:
        body["late"] = True
    if cursor is None:
        del body["cursor"]
    return body


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def released_json(outcome: Outcome, *, codec: AvroCodec, cursor: str, audit: AuditLocation, late: bool = False) -> str:
    """:func:`released_event` as JSON text (ASCII, one line), for feeds. What is the same for every office that
    may see the same disclosures — the redacted envelope, the decoded payload, the labels, the policy version — is
    rendered once per record and view (``EvidenceRecord.renders``); only the cursor, the receipt and its location
    are rendered per office."""
    record = outcome.record
    disclosed = allowed_labels(outcome.decision, outcome.attributes)
    withheld = withheld_labels(outcome.decision, outcome.attributes)
    key = (outcome.disclosures, disclosed, withheld, outcome.decision.policy_version)
    static = record.renders.get(key)
    if static is None:
        envelope = with_disclosures(codec, record.envelope, outcome.disclosures)
        static = _compact({
            "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "envelope": base64.b64encode(envelope).decode("ascii"), "payload_type": record.payload_type,
            record.kind: _json_value(record.record), "disclosed_fields": list(disclosed),
            "withheld_fields": list(withheld), "policy_version": outcome.decision.policy_version,
        })[1:-1]  # fmt: skip
        record.renders[key] = static
    head = _compact({"type": record.kind, "cursor": cursor, "receipt": outcome.entry_id, "audit": audit.to_json()})
    tail = ',"late":true' if late else ""
    return f"{head[:-1]},{static}{tail}}}"


def withheld_json(outcome: Outcome, *, cursor: str, audit: AuditLocation) -> str:
    """:func:`withheld_event` as JSON text."""
    return _compact(withheld_event(outcome, cursor=cursor, audit=audit))


def withheld_event(outcome: Outcome, *, cursor: str | None, audit: AuditLocation) -> dict[str, Any]:
    """The JSON for a refused record: nothing about it but the receipt of the audited refusal."""
    body = {"type": "withheld", "receipt": outcome.entry_id, "audit": audit.to_json()}
    return body if cursor is None else {"type": "withheld", "cursor": cursor, **body}
