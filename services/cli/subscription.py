"""What ``evhub subscribe`` decides without I/O: is a feed event genuine, is it new, where does it go, what to report.

Owns:
- the shapes of the gateway's feed events (``docs/gateway-api.md``), checked before anything else — the gateway is
  not trusted: every field is bounded and typed (:class:`WireEvent`);
- verification (:class:`FeedVerifier`), done by the office itself with the publisher keys *it* trusts: the
  envelope opened for the jurisdiction's own topic (never the topic the event names), one Ed25519 signature by a key
  its registry trusts for that sequence number and time, every disclosure matching a signed digest, the payload's
  kind matching the event's type, the gateway's decoded copy equal to the signed payload, and the (key, topic)
  sequence number not used by another envelope (``services.shared.sequences``). A redelivery — the same signed
  event again, whatever disclosures it carries — is told apart from a new event and never stored twice;
- the stored layout (:func:`item_dir_candidates`, :func:`content_name_candidates`): directory and file names come
  from the signed event, but only as names ``services.shared.filenames`` accepts exactly as they are; anything
  else gets a name derived from a hash, so a name is never a path;
- the bookkeeping and the summary (:class:`Tally`, :func:`summary`): new events, withdrawals, withheld records,
  redeliveries, late releases, content verified, failures, and whether every sequence-number gap can be a
  withheld record.

Pure: no I/O, no clock (``received_at`` is a parameter). Does not own: HTTP, files, SQLite (``subscribe_store``,
``subscribe_cmd``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.shared.avro import AvroCodec
from services.shared.disclosure import Disclosure, reveal
from services.shared.envelope import MAX_ENVELOPE_BYTES, SCHEMA_FOR_TYPE, KeyResolver, Verified, open_envelope
from services.shared.envelope import with_disclosures as _with_disclosures
from services.shared.errors import DecodeError, EvidenceHubError, UntrustedKey
from services.shared.filenames import normalised_file_name
from services.shared.sequences import SequenceTracker

#: Larger than any page the gateway sends (500), so a page read again after a crash is still recognised.
REDELIVERY_WINDOW: Final = 1024
MAX_CURSOR_CHARS: Final = 8192
_CURSOR = re.compile(r"^[A-Za-z0-9_-]{1,8192}$")
_RECEIPT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_TYPES: Final = {"event": "evidence_event", "withdrawal": "evidence_withdrawal"}
_HASHED_PREFIX: Final = "item-"
_HASHED = re.compile(r"^item-[0-9a-f]{24}$")


class AuditRef(BaseModel):
    """Where the gateway says the receipt's audit entry is (``hub.audit`` topic, partition, offset, batch index)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    topic: str = Field(min_length=1, max_length=249)
    partition: int = Field(ge=0, le=1 << 31)
    offset: int = Field(ge=0, le=1 << 62)
    index: int = Field(ge=0, le=1 << 20)


class WireEvent(BaseModel):
    """One feed event as the gateway sent it: nothing here is trusted until :class:`FeedVerifier` checked it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["event", "withdrawal", "withheld", "checkpoint"]
    cursor: str = Field(pattern=_CURSOR.pattern, max_length=MAX_CURSOR_CHARS)
    receipt: str | None = Field(default=None, pattern=_RECEIPT.pattern)
    audit: AuditRef | None = None
    topic: str | None = Field(default=None, max_length=249)
    partition: int | None = Field(default=None, ge=0, le=1 << 31)
    offset: int | None = Field(default=None, ge=0, le=1 << 62)
    envelope: str | None = Field(default=None, max_length=(MAX_ENVELOPE_BYTES * 4) // 3 + 4)
    payload_type: str | None = Field(default=None, max_length=200)
    event: dict[str, Any] | None = None
    withdrawal: dict[str, Any] | None = None
    withheld_fields: list[str] = Field(default_factory=list, max_length=64)
    policy_version: str | None = Field(default=None, max_length=128)
    late: bool = False


@dataclass(frozen=True)
class Released:
    """A released record that verified: the envelope as received, what it vouches for, and whether it is new."""

    kind: Literal["event", "withdrawal"]
    cursor: str
    receipt: str
    audit: AuditRef
    topic: str
    partition: int
    offset: int
    envelope: bytes
    verified: Verified
    disclosures: Mapping[str, Disclosure]
    policy_version: str | None
    late: bool
    received_at: datetime
    #: False for a redelivery: the same signed event was already received (at this or another offset).
    new: bool

    @property
    def item_id(self) -> str:
        return str(self.verified.record["item_id"])

    @property
    def version(self) -> int:
        record = self.verified.record
        return int(record["withdrawn_version"] if self.kind == "withdrawal" else record["version"])

    @property
    def withheld_labels(self) -> list[str]:
        """Signed protected labels whose value this office did not receive (computed, not the gateway's claim)."""
        received = Counter(d.label for d in self.disclosures.values())
        out = []
        for signed in self.verified.record.get("protected", ()):
            if received[signed["label"]]:
                received[signed["label"]] -= 1
            else:
                out.append(str(signed["label"]))
        return out


@dataclass(frozen=True)
class Withheld:
    """A record the office may not see: only the receipt of the audited refusal."""

    cursor: str
    receipt: str
    audit: AuditRef
    received_at: datetime


@dataclass(frozen=True)
class Checkpoint:
    """The cursor moved past records that produced no event."""

    cursor: str


@dataclass(frozen=True)
class Failure:
    """An event that did not verify: never stored as evidence, always reported. ``cursor`` is None when the event
    was too malformed to name one."""

    reason: str
    cursor: str | None
    raw: Mapping[str, Any]
    position: tuple[str, int, int] | None = None
    untrusted_key: bool = False


Outcome = Released | Withheld | Checkpoint | Failure


def json_value(value: Any) -> Any:
    """A decoded Avro value as JSON: datetimes in ISO 8601, bytes in standard base64 (what the gateway's copy uses)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


_IDENTITY: Final = ("event_id", "item_id", "jurisdiction", "published_at")


def _agrees(ours: Any, theirs: Any) -> bool:
    """The gateway's decoded copy says what the signed payload says: every field both have is equal (recursively).
    A field only one side has is skipped, so a gateway and an office on different released schema versions (fields
    added with defaults) still agree; the identity fields are checked to be present separately."""
    if isinstance(ours, dict):
        return isinstance(theirs, dict) and all(_agrees(v, theirs[k]) for k, v in ours.items() if k in theirs)
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(ours) == len(theirs) and all(map(_agrees, ours, theirs))
    return bool(ours == theirs) and type(ours) is type(theirs)


class FeedVerifier:
    """Checks feed events of one jurisdiction with the office's own key registry and sequence tracker.

    ``keys`` is usually a ``KeyRegistry`` built from the office's trust anchors; ``tracker`` is restored from the
    subscription's stored state and its changes are persisted by the caller together with what it stores."""

    def __init__(self, *, codec: AvroCodec, keys: KeyResolver, topic: str, tracker: SequenceTracker) -> None:
        self._codec, self._keys, self.topic, self.tracker = codec, keys, topic, tracker

    def check(self, raw: Any, *, received_at: datetime) -> Outcome:
        """Decide what one feed event is. Never raises for anything the gateway sent: a bad event is a
        :class:`Failure` (``untrusted_key`` set when the signing key was unknown or not trusted: the caller may
        fetch newer key records and check the event again — nothing was recorded)."""
        if not isinstance(raw, Mapping):
            return Failure("not a JSON object", None, {"value": str(raw)[:200]})
        try:
            wire = WireEvent.model_validate(raw)
        except ValidationError as exc:
            cursor = raw.get("cursor")
            ok = isinstance(cursor, str) and _CURSOR.fullmatch(cursor) is not None
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            return Failure(f"malformed feed event ({problems})", cursor if ok else None, raw)
        if wire.type == "checkpoint":
            return Checkpoint(wire.cursor)
        if wire.receipt is None or wire.audit is None:
            return Failure(f"a {wire.type} event without its receipt", wire.cursor, raw)
        if wire.type == "withheld":
            return Withheld(wire.cursor, wire.receipt, wire.audit, received_at)
        return self._released(wire, wire.receipt, wire.audit, raw, received_at)

    def _released(self, wire: WireEvent, receipt: str, audit: AuditRef, raw: Mapping[str, Any],
                  received_at: datetime) -> Outcome:  # fmt: skip
        if wire.topic is None or wire.partition is None or wire.offset is None or wire.envelope is None:
            return Failure(f"a {wire.type} event without its position or envelope", wire.cursor, raw)
        position = (wire.topic, wire.partition, wire.offset)
        if wire.topic != self.topic:
            return Failure(f"an event of {wire.topic!r} in the {self.topic} feed", wire.cursor, raw, position)
        try:
            envelope = base64.b64decode(wire.envelope, validate=True)
        except (binascii.Error, ValueError):
            return Failure("the envelope is not base64", wire.cursor, raw, position)
        try:
            verified = open_envelope(self._codec, envelope, topic=self.topic, keys=self._keys)
            if SCHEMA_FOR_TYPE.get(wire.payload_type or "") != verified.schema or _TYPES[wire.type] != verified.schema:
                return Failure(f"a {wire.type} event carrying a {verified.schema} payload", wire.cursor, raw, position)
            copy = wire.event if wire.type == "event" else wire.withdrawal
            ours = json_value(verified.record)
            if copy is None or not all(k in copy for k in _IDENTITY) or not _agrees(ours, copy):
                return Failure("the decoded copy differs from the signed payload", wire.cursor, raw, position)
            disclosures = reveal(verified.disclosures, verified.record.get("protected", ()))
            fingerprint = _with_disclosures(self._codec, envelope, [])  # the signed event, whatever is disclosed
            new = self.tracker.observe(verified.key_id, self.topic, verified.sequence, fingerprint)
        except UntrustedKey as exc:
            return Failure(f"UntrustedKey: {exc.detail}", wire.cursor, raw, position, untrusted_key=True)
        except EvidenceHubError as exc:  # InvalidSignature, ReplayDetected, DecodeError, PayloadTooLarge …
            return Failure(f"{type(exc).__name__}: {exc.detail}", wire.cursor, raw, position)
        kind: Literal["event", "withdrawal"] = "event" if wire.type == "event" else "withdrawal"
        return Released(kind=kind, cursor=wire.cursor, receipt=receipt, audit=audit, topic=wire.topic,
                        partition=wire.partition, offset=wire.offset, envelope=envelope, verified=verified,
                        disclosures=disclosures, policy_version=wire.policy_version, late=wire.late,
                        received_at=received_at, new=new)  # fmt: skip


# --- the stored layout ------------------------------------------------------------------------------------------


def _hashed(text: str) -> str:
    return _HASHED_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _as_name(text: str) -> str | None:
    """``text`` if it is, exactly as it is, an acceptable single file name (``filenames``), else None."""
    try:
        return text if normalised_file_name(text) == text else None
    except ValueError:
        return None


def item_dir_candidates(item_id: str) -> list[str]:
    """Directory names for an item under ``items/``, preferred first: the item id itself if it is a safe file name
    as it stands (and does not look like a hashed name), then a name derived from its SHA-256. The store takes the
    first one no other item holds (compared case-insensitively, for file systems that fold case)."""
    name = _as_name(item_id)
    hashed = _hashed(item_id)
    return [name, hashed] if name is not None and not _HASHED.fullmatch(name) else [hashed]


def version_dir(kind: Literal["event", "withdrawal"], version: int) -> str:
    return f"v{version}" if kind == "event" else f"withdrawal-v{version}"


def content_name_candidates(file_name: str, sha256: str) -> list[str]:
    """File names for one content file of a version, preferred first: the signed file name if safe as it stands,
    else (or if taken by another file of the version) one made from its digest."""
    name = _as_name(file_name)
    fallback = f"{sha256}.bin"
    return [name, fallback] if name is not None and name != fallback else [fallback]


def event_document(released: Released) -> dict[str, Any]:
    """What ``event.json`` (or ``withdrawal.json``) holds: the payload decoded from the verified envelope, and how
    it was signed and delivered."""
    v = released.verified
    return {
        "kind": released.kind, "payload_type": v.payload_type, "key_id": v.key_id, "sequence": v.sequence,
        "topic": released.topic, "partition": released.partition, "offset": released.offset,
        "receipt": released.receipt, "audit": released.audit.model_dump(), "policy_version": released.policy_version,
        "late": released.late, "received_at": released.received_at.isoformat(), released.kind: json_value(v.record),
    }  # fmt: skip


def disclosures_document(released: Released) -> dict[str, Any]:
    """What ``disclosures.json`` holds: each protected value received (verified against its signed digest), and
    the signed labels whose values were withheld from this office."""
    return {
        "received": [{"field": d.field, "label": d.label, "value": d.value, "digest": d.digest, "disclosure": d.encoded}
                     for d in sorted(released.disclosures.values(), key=lambda d: d.field)],
        "withheld_labels": released.withheld_labels,
    }  # fmt: skip


# --- bookkeeping and the summary --------------------------------------------------------------------------------

_COUNTERS: Final = ("events", "withdrawals", "withheld", "redelivered", "late", "checkpoints", "failures",
                    "content_files", "content_bytes", "content_refused")  # fmt: skip


@dataclass
class Tally:
    """Counts of one run, or of the whole subscription (persisted by the store)."""

    counts: Counter[str] = field(default_factory=Counter)
    disclosed: Counter[str] = field(default_factory=Counter)  # protected values received, by label
    withheld_fields: Counter[str] = field(default_factory=Counter)  # protected values withheld, by label

    def record(self, outcome: Outcome) -> None:
        if isinstance(outcome, Released):
            if not outcome.new:
                self.counts["redelivered"] += 1
                return
            self.counts["events" if outcome.kind == "event" else "withdrawals"] += 1
            self.counts["late"] += int(outcome.late)
            self.disclosed.update(d.label for d in outcome.disclosures.values())
            self.withheld_fields.update(outcome.withheld_labels)
        elif isinstance(outcome, Withheld):
            self.counts["withheld"] += 1
        elif isinstance(outcome, Checkpoint):
            self.counts["checkpoints"] += 1
        else:
            self.counts["failures"] += 1

    def content(self, *, size: int | None) -> None:
        """One content file verified (``size`` bytes) or, with None, refused by the gateway."""
        if size is None:
            self.counts["content_refused"] += 1
        else:
            self.counts["content_files"] += 1
            self.counts["content_bytes"] += size

    def merge(self, other: Tally) -> None:
        self.counts.update(other.counts)
        self.disclosed.update(other.disclosed)
        self.withheld_fields.update(other.withheld_fields)

    def to_json(self) -> dict[str, Any]:
        return {**{k: self.counts[k] for k in _COUNTERS}, "disclosed": dict(sorted(self.disclosed.items())),
                "withheld_fields": dict(sorted(self.withheld_fields.items()))}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tally:
        """Raises: DecodeError for anything but :meth:`to_json` output."""
        try:
            return cls(Counter({k: int(data[k]) for k in _COUNTERS if k in data}),
                       Counter({str(k): int(v) for k, v in data.get("disclosed", {}).items()}),
                       Counter({str(k): int(v) for k, v in data.get("withheld_fields", {}).items()}))  # fmt: skip
        except (TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"not a tally: {exc}") from exc


def missing_numbers(tracker: SequenceTracker, topic: str) -> int:
    """Sequence numbers of ``topic`` below the highest received that were not received (over every key)."""
    return sum(last - first + 1 for (_, t), ranges in tracker.gaps().items() if t == topic for first, last in ranges)


def summary(*, meta: Mapping[str, Any], total: Tally, run: Tally, missing: int, caught_up: bool | None,
            failures: Iterable[Mapping[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The ``--json`` summary. ``unexplained`` counts sequence numbers that are neither received nor can be a
    withheld record: a withheld record is a number the office did not receive, so every gap should be one,
    unless a record was dead-lettered by the gateway or lost (or a late release is still owed)."""
    withheld_now = total.counts["withheld"] - total.counts["late"]
    return {
        **meta, "caught_up": caught_up, "this_run": run.to_json(), "total": total.to_json(),
        "sequence": {"missing": missing, "withheld_records": withheld_now,
                     "unexplained": max(0, missing - withheld_now)},
        "failures": list(failures), "verified": run.counts["failures"] == 0,
    }  # fmt: skip
