"""The publishing pipeline (the "library path"): request → signed envelopes in the outbox → Kafka, exactly once
per request.

Owns: idempotency (the same ``Idempotency-Key`` — or, without one, the same item id and content digest — returns
the original result and never creates a second event), versioning (corrections and withdrawals), per-(key, topic)
sequence numbers, and per-jurisdiction results. A publication whose delivery failed for some jurisdictions reports
exactly which (:class:`PartialDelivery`); repeating the request, or the outbox relay, delivers the rest from the
same stored envelopes — never re-signed, never duplicated as a new event.

Does not own: getting envelopes into Kafka (a :class:`Deliverer`, ``outbox.Outbox`` in the service), which also
says whether a sequence number may be signed on a topic at all — it may not until what the key already signed
there has been established from Kafka.

The HTTP shell (``service.py``), ``evhub`` and ``bench/`` all publish through :class:`EvidencePublisher`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from services.publisher import core, state
from services.publisher.committer import GroupCommitter
from services.publisher.outbox import Delivery
from services.shared.avro import AvroCodec
from services.shared.envelope import MAX_ENVELOPE_BYTES, seal
from services.shared.errors import Conflict, KafkaUnavailable, NotFound, PayloadTooLarge, UntrustedKey, ValidationFailed
from services.shared.kafka import evidence_topic
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry

log = logging.getLogger(__name__)
#: Room left under the receivers' envelope limit (1 MiB, also aiokafka's default max_request_size) for the Kafka
#: record and batch headers and the key, so that a committed envelope can always be produced.
RECORD_OVERHEAD = 16 * 1024


class Deliverer(Protocol):
    async def deliver(self, rows: Sequence[state.OutboxRow]) -> list[Delivery]:
        """Deliver outbox rows; wait at most a bounded time; one result per row, in order."""
        ...

    def may_sign(self, topic: str, sequence: int) -> None:
        """Raises (KafkaUnavailable, StateRefused) unless ``sequence`` may be signed on ``topic`` now."""
        ...

    def refuse_when(self, gate: Callable[[state.OutboxRow], str | None]) -> None:
        """Never send an envelope for which ``gate`` gives a reason (checked just before sending)."""
        ...

    def begin_shutdown(self) -> None:
        """Waiting callers of :meth:`deliver` are answered now."""
        ...


class Clock(Protocol):
    def __call__(self) -> datetime: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ContentInfo:
    sha256: str
    size: int
    media_type: str
    file_name: str


@dataclass(frozen=True)
class PublishResult:
    operation: str
    event_id: str
    item_id: str
    version: int
    deliveries: tuple[Delivery, ...]
    replayed: bool = False
    content: ContentInfo | None = None

    @property
    def complete(self) -> bool:
        return all(d.delivered for d in self.deliveries)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "operation": self.operation, "event_id": self.event_id, "item_id": self.item_id,
            "version": self.version, "replayed": self.replayed, "complete": self.complete,
            "deliveries": [
                {"jurisdiction": d.jurisdiction, "topic": d.topic, "sequence": d.sequence, "partition": d.partition,
                 "offset": d.offset, "delivered": d.delivered, **({"error": d.error} if d.error else {})}
                for d in self.deliveries
            ],
        }  # fmt: skip
        if self.content is not None:
            out |= {"sha256": self.content.sha256, "size": self.content.size, "media_type": self.content.media_type}
        return out


class PartialDelivery(KafkaUnavailable):
    """Kafka did not acknowledge every jurisdiction; ``result`` says which were and weren't delivered."""

    title = "Not every jurisdiction was reached"
    type_slug = "partial-delivery"

    def __init__(self, result: PublishResult) -> None:
        failed = [d.jurisdiction for d in result.deliveries if not d.delivered]
        super().__init__(
            f"Kafka did not acknowledge {', '.join(failed)}; repeat the request with the same Idempotency-Key "
            "to complete it (nothing will be published twice)",
            **result.to_json(),
        )
        self.result = result


@dataclass
class EvidencePublisher:
    codec: AvroCodec
    signer: SigningKey
    outbox: Deliverer
    committer: GroupCommitter
    organisation: str
    jurisdictions: Sequence[str]
    registry: KeyRegistry | None = None
    clock: Clock = utc_now
    #: Randomness for salts and event ids, drawn once per request (one getrandom call, not one per value).
    entropy: Callable[[int], bytes] = secrets.token_bytes

    def __post_init__(self) -> None:
        self.outbox.refuse_when(self._refusal)

    def _refusal(self, row: state.OutboxRow) -> str | None:
        """Why receivers would refuse this envelope now (its key revoked before its sequence number), or None."""
        if self.registry is None:
            return None
        try:
            self.registry.resolve(row.key_id, sequence=row.sequence, topic=row.topic)
        except UntrustedKey as exc:
            return exc.detail
        return None

    async def publish(
        self, meta: core.EvidenceMetadata, content: ContentInfo, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Publish the first version of an item to each of its jurisdictions.

        Raises:
            ValidationFailed: unknown jurisdiction. Conflict: the key was used for another request, or the item
            exists with other content. UntrustedKey: the signing key is not (or no longer) trusted.
            PartialDelivery: some jurisdictions were not acknowledged (retry completes them).
        """
        return await self._version(meta, content, idempotency_key, correction_of=None)

    async def correct(
        self, item_id: str, meta: core.EvidenceMetadata, content: ContentInfo, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Publish a new version of ``item_id`` that names the version it replaces. Raises as :meth:`publish`,
        and NotFound for an unknown item, Conflict for a withdrawn one."""
        if meta.item_id != item_id:
            raise Conflict(f"metadata names item {meta.item_id!r}, the request {item_id!r}")
        if not idempotency_key:
            # Without one, a retry after a lost answer could not be told apart from a new correction that
            # happens to say the same (e.g. reverting to an earlier version): fail closed.
            raise ValidationFailed(
                "a correction needs an Idempotency-Key header",
                errors=[{"field": "Idempotency-Key", "message": "required for corrections"}],
            )
        return await self._version(meta, content, idempotency_key, correction_of=item_id)

    async def precheck(
        self, meta: core.EvidenceMetadata, sha256: str, *, idempotency_key: str | None, correction_of: str | None
    ) -> None:
        """Refuse a request that publishing would refuse, before its upload is kept: nothing is signed or written.

        Raises: as :meth:`publish` / :meth:`correct` would for these metadata and content (ValidationFailed,
        Conflict, NotFound), and UntrustedKey.
        """
        core.check_jurisdictions(meta, self.jurisdictions)
        if correction_of is not None and not idempotency_key:
            raise ValidationFailed(
                "a correction needs an Idempotency-Key header",
                errors=[{"field": "Idempotency-Key", "message": "required for corrections"}],
            )
        self._may_sign()
        key, fingerprint, reused = _identity(meta, sha256, idempotency_key, correction_of)
        await self.committer.run(lambda conn: _plan(conn, meta, sha256, key, fingerprint, reused, correction_of))

    async def _version(
        self, meta: core.EvidenceMetadata, content: ContentInfo, idempotency_key: str | None, correction_of: str | None
    ) -> PublishResult:
        core.check_jurisdictions(meta, self.jurisdictions)
        operation = "correct" if correction_of else "publish"
        key, fingerprint, reused = _identity(meta, content.sha256, idempotency_key, correction_of)
        now = self._may_sign()
        random = self.entropy(16 * (len(meta.protected) + 1))
        event_id = str(uuid.UUID(bytes=random[:16], version=4))
        salts = [random[16 * (i + 1) : 16 * (i + 2)] for i in range(len(meta.protected))]
        descriptor = {"media_type": content.media_type, "size": content.size, "sha256": content.sha256,
                      "file_name": content.file_name}  # fmt: skip

        def unit(conn: sqlite3.Connection) -> _Done:
            plan = _plan(conn, meta, content.sha256, key, fingerprint, reused, correction_of)
            if isinstance(plan, tuple):
                return *plan, None
            existing, version, replaces = plan.existing, plan.version, plan.replaces
            events, disclosures = core.build_events(
                meta, event_id=event_id, version=version, replaces_event_id=replaces,
                organisation=self.organisation, key_id=self.signer.key_id, content=[descriptor],
                published_at=now, salts=salts,
            )  # fmt: skip
            rows = self._stage(conn, event_id, "evidence_event", events, meta.case_ids[0], disclosures)
            all_jurisdictions = sorted(set(meta.jurisdictions) | set(_jurisdictions(existing)))
            conn.execute(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                (meta.item_id, version, event_id, json.dumps(meta.case_ids), json.dumps(all_jurisdictions)),
            )
            state.insert(
                conn,
                "versions",
                {
                    "item_id": meta.item_id,
                    "version": version,
                    "event_id": event_id,
                    "sha256": content.sha256,
                    "media_type": content.media_type,
                    "size": content.size,
                    "published_at": now.isoformat(),
                },
            )
            self._record(conn, key, fingerprint, operation, event_id, meta.item_id, version, now)
            return event_id, version, False, rows

        eid, version, replayed, rows = await self.committer.run(_with_outbox(unit))
        return await self._deliver_event(operation, eid, meta.item_id, version, replayed, rows, content)

    async def references(self, sha256: str) -> bool:
        """Whether any version of any item was published with this content."""
        return await self.committer.run(lambda conn: state.content_referenced(conn, sha256))

    async def withdraw(self, item_id: str, reason: str, *, idempotency_key: str | None = None) -> PublishResult:
        """Withdraw every version of ``item_id`` from every jurisdiction it was published to.

        Raises: NotFound (unknown item), Conflict (already withdrawn, or key reused), PartialDelivery.
        """
        key, reused = _idempotency(idempotency_key, f"withdraw:{item_id}", f"item {item_id} is already withdrawn")
        fingerprint = hashlib.sha256(f"withdraw\0{item_id}\0{reason}".encode()).hexdigest()
        now = self._may_sign()
        event_id = str(uuid.UUID(bytes=self.entropy(16), version=4))

        def unit(conn: sqlite3.Connection) -> _Done:
            done = _replay(conn, key, fingerprint, reused)
            if done is not None:
                return *done, None
            existing = state.item(conn, item_id)
            if existing is None:
                raise NotFound(f"no item {item_id}")
            if existing["withdrawn_at"] is not None:
                raise Conflict(f"item {item_id} is already withdrawn")
            case_ids = json.loads(existing["case_ids"])
            records = core.build_withdrawals(
                item_id=item_id, event_id=event_id, withdrawn_version=existing["latest_version"], case_ids=case_ids,
                jurisdictions=_jurisdictions(existing), organisation=self.organisation, key_id=self.signer.key_id,
                reason=reason, published_at=now,
            )  # fmt: skip
            rows = self._stage(conn, event_id, "evidence_withdrawal", records, case_ids[0], [])
            conn.execute("UPDATE items SET withdrawn_at = ?, withdraw_reason = ? WHERE item_id = ?",
                         (now.isoformat(), reason, item_id))  # fmt: skip
            self._record(conn, key, fingerprint, "withdraw", event_id, item_id, existing["latest_version"], now)
            return event_id, existing["latest_version"], False, rows

        eid, version, replayed, rows = await self.committer.run(_with_outbox(unit))
        return await self._deliver_event("withdraw", eid, item_id, version, replayed, rows, None)

    def _may_sign(self) -> datetime:
        """Now, if receivers would accept a signature made now by this publisher's key.

        Raises:
            UntrustedKey: unknown, revoked, expired, or registered for another organisation.
        """
        now = self.clock()
        if self.registry is not None:
            self.registry.check_can_sign(self.signer.key_id, now, organisation=self.organisation)
        return now

    def _stage(self, conn: sqlite3.Connection, event_id: str, schema: str, records: dict[str, dict[str, Any]],
               case_id: str, disclosures: list[str]) -> list[state.OutboxRow]:  # fmt: skip
        """Sign one envelope per jurisdiction with the next sequence number of its topic and write them to the
        outbox. Everything that can refuse (Kafka's record of the key, the size limit) is checked before the first
        write: the group committer runs units without savepoints (``GroupCommitter``)."""
        key_id = self.signer.key_id
        topics = {jurisdiction: evidence_topic(jurisdiction) for jurisdiction in records}
        last = state.counters(conn, key_id, list(topics.values()))
        rows = []
        for jurisdiction, record in sorted(records.items()):
            topic = topics[jurisdiction]
            sequence = last.get(topic, 0) + 1
            self.outbox.may_sign(topic, sequence)  # never at or below what Kafka holds of this key
            envelope = seal(self.codec, schema=schema, record=record, topic=topic, signer=self.signer,
                            sequence=sequence, disclosures=disclosures)  # fmt: skip
            if len(envelope) > MAX_ENVELOPE_BYTES - RECORD_OVERHEAD:  # never commit what can't be sent or verified
                raise PayloadTooLarge(
                    f"the signed event would be {len(envelope)} bytes; the limit is "
                    f"{MAX_ENVELOPE_BYTES - RECORD_OVERHEAD} (shorten the description or "
                    "protected values)"
                )
            rows.append(state.OutboxRow(event_id, jurisdiction, topic, case_id.encode(), key_id, sequence, envelope,
                                        None, None))  # fmt: skip
        state.stage(conn, rows)
        return rows

    @staticmethod
    def _record(conn: sqlite3.Connection, key: str, fingerprint: str, operation: str, event_id: str, item_id: str,
                version: int, now: datetime) -> None:  # fmt: skip
        state.insert(conn, "requests", {
            "idempotency_key": key, "fingerprint": fingerprint, "operation": operation, "event_id": event_id,
            "item_id": item_id, "version": version, "created_at": now.isoformat()})  # fmt: skip

    async def _deliver_event(self, operation: str, event_id: str, item_id: str, version: int, replayed: bool,
                             rows: list[state.OutboxRow], content: ContentInfo | None) -> PublishResult:  # fmt: skip
        deliveries = await self.outbox.deliver(rows)
        result = PublishResult(operation, event_id, item_id, version, tuple(deliveries), replayed, content)
        if not result.complete:
            raise PartialDelivery(result)
        return result

    async def deliver_pending(self, limit: int = 1000) -> int:
        """The outbox relay: send what Kafka has not acknowledged yet. Returns how many were delivered now."""
        rows = await self.committer.run(lambda conn: state.pending(conn, limit))
        sendable: list[state.OutboxRow] = []
        refused: list[tuple[str, str, str]] = []
        for row in rows:
            if (why := self._refusal(row)) is not None:  # every receiver would refuse it: never send, stop retrying
                log.warning("abandoning %s to %s: %s", row.event_id, row.topic, why)
                refused.append((why, row.event_id, row.jurisdiction))
                continue
            sendable.append(row)
        if refused:
            await self.committer.run(lambda conn: state.abandon(conn, refused))
        if not sendable:
            return 0
        return sum(d.sent_now for d in await self.outbox.deliver(sendable))

    async def status(self, item_id: str) -> dict[str, Any]:
        """Raises: NotFound."""

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            existing = state.item(conn, item_id)
            if existing is None:
                raise NotFound(f"no item {item_id}")
            versions = []
            for v in state.versions(conn, item_id):
                rows = state.outbox(conn, v["event_id"])
                versions.append({
                    "version": v["version"], "event_id": v["event_id"], "sha256": v["sha256"],
                    "media_type": v["media_type"], "size": v["size"], "published_at": v["published_at"],
                    "deliveries": [{"jurisdiction": r.jurisdiction, "partition": r.partition, "offset": r.offset,
                                    "sequence": r.sequence, "delivered": r.offset is not None} for r in rows],
                })  # fmt: skip
            return {
                "item_id": item_id, "latest_version": existing["latest_version"],
                "jurisdictions": _jurisdictions(existing), "withdrawn_at": existing["withdrawn_at"],
                "withdraw_reason": existing["withdraw_reason"], "versions": versions,
            }  # fmt: skip

        return await self.committer.run(read)


@dataclass(frozen=True)
class _NewVersion:
    existing: sqlite3.Row | None
    version: int
    replaces: str | None


def _identity(meta: core.EvidenceMetadata, sha256: str, client_key: str | None,
              correction_of: str | None) -> tuple[str, str, str]:  # fmt: skip
    """(stored idempotency key, request fingerprint, the conflict message if the key was used for something else)."""
    operation = "correct" if correction_of else "publish"
    # The operation is part of what a key stands for: a publish's key reused for a correction is a conflict.
    fingerprint = f"{operation}:{core.request_fingerprint(meta, sha256)}"
    # Without a key, a publication is identified by its item id and content digest.
    key, reused = _idempotency(
        client_key, f"publish:{meta.item_id}:{sha256}",
        f"item {meta.item_id} was already published with this file and other metadata; send a correction",
    )  # fmt: skip
    return key, fingerprint, reused


def _plan(conn: sqlite3.Connection, meta: core.EvidenceMetadata, sha256: str, key: str, fingerprint: str, reused: str,
          correction_of: str | None) -> tuple[str, int, bool] | _NewVersion:  # fmt: skip
    """What a publish or correction does: replay an earlier result, or make which version. Reads only.

    Raises: Conflict, NotFound.
    """
    done = _replay(conn, key, fingerprint, reused)
    if done is not None:
        return done
    existing = state.item(conn, meta.item_id)
    if correction_of is None:
        if existing is None:
            return _NewVersion(None, 1, None)
        original = state.original_publication(conn, meta.item_id)
        if original is not None and (original["fingerprint"] == fingerprint  # same item, same content
                                     or original["fingerprint"] == state.recovered(sha256)):  # fmt: skip
            return original["event_id"], original["version"], True
        raise Conflict(f"item {meta.item_id} is already published; send a correction to change it")
    if existing is None:
        raise NotFound(f"no item {correction_of}")
    if existing["withdrawn_at"] is not None:
        raise Conflict(f"item {correction_of} was withdrawn")
    left_out = sorted(set(_jurisdictions(existing)) - set(meta.jurisdictions))
    if left_out:
        raise Conflict(
            f"a correction must reach every jurisdiction the item was published to; "
            f"{', '.join(left_out)} would keep version {existing['latest_version']} as current"
        )
    return _NewVersion(existing, existing["latest_version"] + 1, existing["latest_event_id"])


#: What a unit of work decided: (event id, version, replayed, the outbox rows it staged — None for a replay).
_Done = tuple[str, int, bool, list[state.OutboxRow] | None]


def _with_outbox(
    unit: Callable[[sqlite3.Connection], _Done],
) -> Callable[[sqlite3.Connection], tuple[str, int, bool, list[state.OutboxRow]]]:
    """A replayed event's outbox rows are read in the same unit of work (one group, not two); a new event's are the
    rows it just staged."""

    def both(conn: sqlite3.Connection) -> tuple[str, int, bool, list[state.OutboxRow]]:
        event_id, version, replayed, staged = unit(conn)
        return event_id, version, replayed, state.outbox(conn, event_id) if staged is None else staged

    return both


def _idempotency(client_key: str | None, derived_key: str, derived_conflict: str) -> tuple[str, str]:
    """The stored key and the conflict message for a request. Client keys have their own namespace, so no key a
    client picks can collide with one derived from the request."""
    if client_key:
        return f"client:{client_key}", "this Idempotency-Key was already used for a different request"
    return derived_key, derived_conflict


def _replay(conn: sqlite3.Connection, key: str, fingerprint: str, reused: str) -> tuple[str, int, bool] | None:
    previous = state.request(conn, key)
    if previous is None:
        return None
    # A row rebuilt from Kafka by `recover` keeps only what the event says (item id and content digest, which its
    # derived key already names), not the request's full fingerprint: a repeat of that publication is a replay.
    if previous["fingerprint"] != fingerprint and not state.is_recovered(previous["fingerprint"]):
        raise Conflict(reused)
    return previous["event_id"], previous["version"], True


def _jurisdictions(row: sqlite3.Row | None) -> list[str]:
    return [] if row is None else list(json.loads(row["jurisdictions"]))
