"""The publisher's pure core: what a documentation group may send, and the evidence events built from it.

Owns: the request models (validated with pydantic; every error carries its field path), the rules a publication
must satisfy (known jurisdictions, a detected media type that agrees with a declared one), and turning a request
into one Avro record per target jurisdiction with protected values replaced by salted digests.

Takes models, bytes and ``now``; returns values or raises. No I/O, no clock, no randomness (salts are passed in).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from services.shared import disclosure
from services.shared.errors import UnsupportedMediaType, ValidationFailed
from services.shared.filenames import normalised_file_name
from services.shared.media import OCTET_STREAM, agrees

Kind = Literal["PHOTOGRAPH", "VIDEO", "DOCUMENT", "TESTIMONY", "AUDIO", "DATASET", "OTHER"]
Classification = Literal["PUBLIC", "RESTRICTED", "CONFIDENTIAL", "SECRET"]
Label = Literal[
    "WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT", "MINOR", "GRAPHIC", "PERPETRATOR_IDENTIFYING"
]
ProtectedLabel = Literal["WITNESS_IDENTIFYING", "VICTIM_IDENTIFYING", "LOCATION_EXACT", "MINOR"]
Jurisdiction = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,8})?$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True)]


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps need a time zone (e.g. 2024-05-01T10:00:00Z)")
    return value


Timestamp = Annotated[datetime, AfterValidator(_aware)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CustodyStep(_Model):
    at: Timestamp
    actor: ShortText
    action: ShortText
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None


class Sharing(_Model):
    allowed_jurisdictions: list[Jurisdiction] = Field(default_factory=list, max_length=64)
    purposes: list[ShortText] = Field(default_factory=list, max_length=32)
    consent_reference: ShortText | None = None
    embargo_until: Timestamp | None = None


class ProtectedValue(_Model):
    field: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    label: ProtectedLabel
    value: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class EvidenceMetadata(_Model):
    """What the documentation group says about one file. ``jurisdictions`` are where it is published."""

    item_id: Identifier
    case_ids: list[Identifier] = Field(min_length=1, max_length=32)
    jurisdictions: list[Jurisdiction] = Field(min_length=1, max_length=32)
    kind: Kind
    title: ShortText
    description: Annotated[str, StringConstraints(max_length=20_000)] = ""
    media_type: Annotated[str, StringConstraints(max_length=200)] | None = None
    file_name: Annotated[str, AfterValidator(normalised_file_name)] | None = None
    captured_at: Timestamp | None = None
    device: ShortText | None = None
    collector_pseudonym: ShortText | None = None
    region: ShortText | None = None
    custody: list[CustodyStep] = Field(default_factory=list, max_length=256)
    classification: Classification = "RESTRICTED"
    sensitivity: list[Label] = Field(default_factory=list, max_length=16)
    sharing: Sharing = Field(default_factory=Sharing)
    related_items: list[Identifier] = Field(default_factory=list, max_length=256)
    protected: list[ProtectedValue] = Field(default_factory=list, max_length=64)


def parse_metadata(raw: Mapping[str, Any] | bytes) -> EvidenceMetadata:
    """Raises: ValidationFailed with ``errors=[{"field": "a.b.0", "message": …}]`` for every problem at once."""
    try:
        if isinstance(raw, bytes):
            return EvidenceMetadata.model_validate_json(raw)
        return EvidenceMetadata.model_validate(raw)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]} for e in exc.errors()]
        raise ValidationFailed("the evidence metadata is invalid", errors=errors) from None


def check_jurisdictions(meta: EvidenceMetadata, known: Sequence[str]) -> None:
    """Raises: ValidationFailed naming each jurisdiction the hub does not serve."""
    errors = [
        {"field": f"jurisdictions.{i}", "message": f"unknown jurisdiction {j!r}; this hub serves {', '.join(known)}"}
        for i, j in enumerate(meta.jurisdictions)
        if j not in known
    ]
    if len(set(meta.jurisdictions)) != len(meta.jurisdictions):
        errors.append({"field": "jurisdictions", "message": "listed more than once"})
    if errors:
        raise ValidationFailed("the evidence metadata is invalid", errors=errors)


def check_media_type(meta: EvidenceMetadata, sniffed: str) -> str:
    """The media type to record: the one detected from the bytes.

    Raises:
        UnsupportedMediaType: a declared type contradicts the bytes.
    """
    if meta.media_type is not None and not agrees(meta.media_type, sniffed):
        raise UnsupportedMediaType(
            f"declared {meta.media_type} but the bytes are {sniffed}", declared=meta.media_type, detected=sniffed
        )
    if sniffed == OCTET_STREAM and meta.media_type is not None:
        return meta.media_type.split(";")[0].strip().lower()
    return sniffed


def request_fingerprint(meta: EvidenceMetadata, content_sha256: str | None) -> str:
    """Identifies the request's meaning, for idempotency: same key + different fingerprint is a conflict.

    pydantic's JSON of a validated model is canonical enough: fields in declaration order, values normalised by
    validation (24 → 3 µs against ``json.dumps(model_dump(), sort_keys=True)``)."""
    digest = hashlib.sha256(meta.model_dump_json().encode())
    digest.update(b"\0" + (content_sha256 or "").encode())
    return digest.hexdigest()


def build_events(
    meta: EvidenceMetadata, *, event_id: str, version: int, replaces_event_id: str | None, organisation: str,
    key_id: str, content: Sequence[Mapping[str, Any]], published_at: datetime, salts: Sequence[bytes],
) -> tuple[dict[str, dict[str, Any]], list[str]]:  # fmt: skip
    """One ``evidence_event`` record per jurisdiction, and the disclosures of the protected values.

    ``salts`` holds one salt per protected value (drawn by the caller). The same digests are used for every
    jurisdiction, so an office can recognise the same withheld value across topics, never read it.
    """
    if len(salts) != len(meta.protected):
        raise ValueError("one salt per protected value")
    disclosures = [
        disclosure.make(p.field, p.value, label=p.label, salt=salt)
        for p, salt in zip(meta.protected, salts, strict=True)
    ]
    labels = sorted(set(meta.sensitivity) | {p.label for p in meta.protected})
    common: dict[str, Any] = {
        "event_id": event_id, "item_id": meta.item_id, "version": version, "replaces_event_id": replaces_event_id,
        "publisher": {"organisation": organisation, "key_id": key_id}, "case_ids": list(meta.case_ids),
        "kind": meta.kind, "title": meta.title, "description": meta.description, "content": list(content),
        "capture": {
            "captured_at": meta.captured_at, "device": meta.device,
            "collector_pseudonym": meta.collector_pseudonym, "region": meta.region,
        },
        "custody": [c.model_dump() for c in meta.custody],
        "classification": meta.classification, "sensitivity": labels,
        "sharing": meta.sharing.model_dump(), "related_items": list(meta.related_items),
        "published_at": published_at,
        "protected": [{"label": d.label, "digest": d.digest} for d in disclosures],
    }  # fmt: skip
    events = {j: {**common, "jurisdiction": j} for j in meta.jurisdictions}
    return events, [d.encoded for d in disclosures]


def build_withdrawals(
    *, item_id: str, event_id: str, withdrawn_version: int, case_ids: Sequence[str], jurisdictions: Sequence[str],
    organisation: str, key_id: str, reason: str, published_at: datetime,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    return {
        j: {
            "event_id": event_id, "item_id": item_id, "withdrawn_version": withdrawn_version,
            "publisher": {"organisation": organisation, "key_id": key_id}, "case_ids": list(case_ids),
            "jurisdiction": j, "reason": reason, "published_at": published_at,
        }
        for j in jurisdictions
    }  # fmt: skip
