"""The publishing pipeline (the "library path"): request → signed envelopes in the outbox → Kafka, exactly once
per request.

Owns: idempotency (the same ``Idempotency-Key`` — or, without one, the same item id and content digest — returns
the original result and never creates a second event), versioning (corrections and withdrawals), per-(key, topic)
sequence numbers, and delivery with per-jurisdiction results. A publication whose delivery failed for some
jurisdictions reports exactly which (:class:`PartialDelivery`); repeating the request, or the outbox relay,
delivers the rest from the same stored envelopes — never re-signed, never duplicated as a new event.

The HTTP shell (``service.py``), ``evhub`` and ``bench/`` all publish through :class:`EvidencePublisher`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from services.publisher import core, state
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


class Producer(Protocol):
    async def send(self, topic: str, value: bytes, *, key: bytes) -> asyncio.Future[Any]: ...


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
class Delivery:
    jurisdiction: str
    topic: str
    sequence: int
    partition: int | None
    offset: int | None
    error: str | None = None
    sent_now: bool = field(default=False, compare=False)  # acknowledged by this call (not earlier)

    @property
    def delivered(self) -> bool:
        return self.offset is not None


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
    producer: Producer
    committer: state.GroupCommitter
    organisation: str
    jurisdictions: Sequence[str]
    registry: KeyRegistry | None = None
    clock: Clock = utc_now
    #: Randomness for salts and event ids, drawn once per request (one getrandom call, not one per value).
    entropy: Callable[[int], bytes] = secrets.token_bytes
    #: Events being sent right now, by a request or by the relay: the other waits instead of sending them twice.
    _sending: dict[str, asyncio.Event] = field(default_factory=dict, init=False, repr=False)
    _enqueue: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    #: Acknowledged (event id, jurisdiction) → (partition, offset, at) not yet written to the outbox.
    _marks: dict[tuple[str, str], tuple[int, int, str]] = field(default_factory=dict, init=False, repr=False)

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

    async def _version(
        self, meta: core.EvidenceMetadata, content: ContentInfo, idempotency_key: str | None, correction_of: str | None
    ) -> PublishResult:
        core.check_jurisdictions(meta, self.jurisdictions)
        operation = "correct" if correction_of else "publish"
        # The operation is part of what a key stands for: a publish's key reused for a correction is a conflict.
        fingerprint = f"{operation}:{core.request_fingerprint(meta, content.sha256)}"
        # Without a key, a publication is identified by its item id and content digest.
        key, reused = _idempotency(
            idempotency_key, f"publish:{meta.item_id}:{content.sha256}",
            f"item {meta.item_id} was already published with this file and other metadata; send a correction",
        )  # fmt: skip
        now = self._may_sign()
        random = self.entropy(16 * (len(meta.protected) + 1))
        event_id = str(uuid.UUID(bytes=random[:16], version=4))
        salts = [random[16 * (i + 1) : 16 * (i + 2)] for i in range(len(meta.protected))]
        descriptor = {"media_type": content.media_type, "size": content.size, "sha256": content.sha256,
                      "file_name": content.file_name}  # fmt: skip

        def unit(conn: sqlite3.Connection) -> tuple[str, int, bool]:
            done = _replay(conn, key, fingerprint, reused)
            if done is not None:
                return done
            existing = state.item(conn, meta.item_id)
            version, replaces = 1, None
            if correction_of is None and existing is not None:
                original = state.original_publication(conn, meta.item_id)
                if original is not None and original["fingerprint"] == fingerprint:  # same item, same content
                    return original["event_id"], original["version"], True
                raise Conflict(f"item {meta.item_id} is already published; send a correction to change it")
            if correction_of is not None:
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
                version, replaces = existing["latest_version"] + 1, existing["latest_event_id"]
            events, disclosures = core.build_events(
                meta, event_id=event_id, version=version, replaces_event_id=replaces,
                organisation=self.organisation, key_id=self.signer.key_id, content=[descriptor],
                published_at=now, salts=salts,
            )  # fmt: skip
            self._stage(conn, event_id, "evidence_event", events, meta.case_ids[0], disclosures)
            all_jurisdictions = sorted(set(meta.jurisdictions) | set(_jurisdictions(existing)))
            conn.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                         (meta.item_id, version, event_id, json.dumps(meta.case_ids), json.dumps(all_jurisdictions)))
            state.insert(conn, "versions", {
                "item_id": meta.item_id, "version": version, "event_id": event_id, "sha256": content.sha256,
                "media_type": content.media_type, "size": content.size, "published_at": now.isoformat()})
            self._record(conn, key, fingerprint, operation, event_id, meta.item_id, version, now)
            return event_id, version, False

        eid, version, replayed, rows = await self.committer.run(_with_outbox(unit))
        return await self._deliver_event(operation, eid, meta.item_id, version, replayed, rows, content)

    async def withdraw(self, item_id: str, reason: str, *, idempotency_key: str | None = None) -> PublishResult:
        """Withdraw every version of ``item_id`` from every jurisdiction it was published to.

        Raises: NotFound (unknown item), Conflict (already withdrawn, or key reused), PartialDelivery.
        """
        key, reused = _idempotency(idempotency_key, f"withdraw:{item_id}", f"item {item_id} is already withdrawn")
        fingerprint = hashlib.sha256(f"withdraw\0{item_id}\0{reason}".encode()).hexdigest()
        now = self._may_sign()
        event_id = str(uuid.UUID(bytes=self.entropy(16), version=4))

        def unit(conn: sqlite3.Connection) -> tuple[str, int, bool]:
            done = _replay(conn, key, fingerprint, reused)
            if done is not None:
                return done
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
            self._stage(conn, event_id, "evidence_withdrawal", records, case_ids[0], [])
            conn.execute("UPDATE items SET withdrawn_at = ?, withdraw_reason = ? WHERE item_id = ?",
                         (now.isoformat(), reason, item_id))  # fmt: skip
            self._record(conn, key, fingerprint, "withdraw", event_id, item_id, existing["latest_version"], now)
            return event_id, existing["latest_version"], False

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
               case_id: str, disclosures: list[str]) -> None:  # fmt: skip
        for jurisdiction, record in records.items():
            topic = evidence_topic(jurisdiction)
            sequence = state.next_sequence(conn, self.signer.key_id, topic)
            envelope = seal(self.codec, schema=schema, record=record, topic=topic, signer=self.signer,
                            sequence=sequence, disclosures=disclosures)  # fmt: skip
            if len(envelope) > MAX_ENVELOPE_BYTES - RECORD_OVERHEAD:  # never commit what can't be sent or verified
                raise PayloadTooLarge(f"the signed event would be {len(envelope)} bytes; the limit is "
                                      f"{MAX_ENVELOPE_BYTES - RECORD_OVERHEAD} (shorten the description or "
                                      "protected values)")
            state.insert(conn, "outbox", {
                "event_id": event_id, "jurisdiction": jurisdiction, "topic": topic, "kafka_key": case_id.encode(),
                "key_id": self.signer.key_id, "sequence": sequence, "envelope": envelope})  # fmt: skip

    @staticmethod
    def _record(conn: sqlite3.Connection, key: str, fingerprint: str, operation: str, event_id: str, item_id: str,
                version: int, now: datetime) -> None:  # fmt: skip
        state.insert(conn, "requests", {
            "idempotency_key": key, "fingerprint": fingerprint, "operation": operation, "event_id": event_id,
            "item_id": item_id, "version": version, "created_at": now.isoformat()})  # fmt: skip

    async def _deliver_event(self, operation: str, event_id: str, item_id: str, version: int, replayed: bool,
                             rows: list[state.OutboxRow], content: ContentInfo | None) -> PublishResult:  # fmt: skip
        deliveries = await self._deliver_exclusively(event_id, rows)
        result = PublishResult(operation, event_id, item_id, version, tuple(deliveries), replayed, content)
        if not result.complete:
            raise PartialDelivery(result)
        return result

    async def _deliver_exclusively(self, event_id: str, rows: list[state.OutboxRow] | None) -> list[Delivery]:
        """Send an event's undelivered rows, unless someone else is: then wait for them and use their result.

        ``rows`` None (the relay) means: read them once this caller is the only sender of the event — rows read
        earlier may predate a delivery that has finished since."""
        while (busy := self._sending.get(event_id)) is not None:
            await busy.wait()
            rows = None
        done = self._sending[event_id] = asyncio.Event()
        try:
            if rows is None:
                rows = await self.committer.run(lambda conn: state.outbox(conn, event_id))
            return await self._deliver(rows)
        finally:
            del self._sending[event_id]
            done.set()

    async def _deliver(self, rows: Sequence[state.OutboxRow]) -> list[Delivery]:
        async def send(row: state.OutboxRow) -> Delivery:
            if row.offset is not None:
                return Delivery(row.jurisdiction, row.topic, row.sequence, row.partition, row.offset)
            if (acked := self._marks.get((row.event_id, row.jurisdiction))) is not None:
                return Delivery(row.jurisdiction, row.topic, row.sequence, acked[0], acked[1])
            try:
                # One caller at a time enqueues: when a batch is full aiokafka parks the sender until it drains,
                # and wakes every parked sender at once — with hundreds of concurrent publishes that herd cost
                # more than the publishing (measured 864/s with 2,048 in flight vs 1,923/s with 256).
                # Per topic: a jurisdiction whose partition has no leader must not hold up the others.
                async with self._enqueue.setdefault(row.topic, asyncio.Lock()):
                    acknowledged = await self.producer.send(row.topic, row.envelope, key=row.kafka_key)
                meta = await acknowledged
            except Exception as exc:  # aiokafka raises KafkaError subclasses and asyncio timeouts
                log.warning("delivery of %s to %s failed: %r", row.event_id, row.topic, exc)
                return Delivery(row.jurisdiction, row.topic, row.sequence, None, None, type(exc).__name__)
            return Delivery(row.jurisdiction, row.topic, row.sequence, meta.partition, meta.offset, sent_now=True)

        deliveries = await asyncio.gather(*(send(r) for r in rows))
        fresh = [(r, d) for r, d in zip(rows, deliveries, strict=True) if d.delivered and r.offset is None]
        if fresh:
            at = self.clock().isoformat()
            for r, d in fresh:
                assert d.partition is not None
                assert d.offset is not None
                self._marks[(r.event_id, r.jurisdiction)] = (d.partition, d.offset, at)
            if len(self._marks) == len(fresh):  # the first since the last flush schedules the next one
                # Not awaited: the answer depends on Kafka's acknowledgement, not on this bookkeeping. Were it
                # lost, the relay would send the same envelope again, which receivers recognise as a redelivery.
                self.committer.submit(self._flush_marks)
        return list(deliveries)

    def _flush_marks(self, conn: sqlite3.Connection) -> None:
        marks, self._marks = self._marks, {}
        state.mark_delivered(conn, [(p, o, at, event, j) for (event, j), (p, o, at) in marks.items()])

    async def deliver_pending(self, limit: int = 1000) -> int:
        """The outbox relay: send what Kafka has not acknowledged yet. Returns how many were delivered now."""
        rows = await self.committer.run(lambda conn: state.pending(conn, limit))
        events: set[str] = set()
        refused: list[tuple[str, str, str]] = []
        for row in rows:
            if self.registry is not None:
                try:
                    self.registry.resolve(row.key_id, sequence=row.sequence, topic=row.topic)
                except UntrustedKey as exc:  # every receiver would refuse it: never send it, stop retrying it
                    log.warning("abandoning %s to %s: %s", row.event_id, row.topic, exc.detail)
                    refused.append((exc.detail, row.event_id, row.jurisdiction))
                    continue
            if row.event_id not in self._sending:  # else a request is delivering it right now
                events.add(row.event_id)
        if refused:
            await self.committer.run(lambda conn: state.abandon(conn, refused))
        results = await asyncio.gather(*(self._deliver_exclusively(e, None) for e in events))
        return sum(d.sent_now for deliveries in results for d in deliveries)

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


def _with_outbox(
    unit: Callable[[sqlite3.Connection], tuple[str, int, bool]],
) -> Callable[[sqlite3.Connection], tuple[str, int, bool, list[state.OutboxRow]]]:
    """Read the event's outbox rows in the same unit of work (one trip to the writer thread, not two)."""

    def both(conn: sqlite3.Connection) -> tuple[str, int, bool, list[state.OutboxRow]]:
        event_id, version, replayed = unit(conn)
        return event_id, version, replayed, state.outbox(conn, event_id)

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
    if previous["fingerprint"] != fingerprint:
        raise Conflict(reused)
    return previous["event_id"], previous["version"], True


def _jurisdictions(row: sqlite3.Row | None) -> list[str]:
    return [] if row is None else list(json.loads(row["jurisdictions"]))
