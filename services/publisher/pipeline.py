"""The publishing pipeline (the "library path"): request → signed envelopes in the outbox → Kafka, exactly once
per request.

Owns: orchestrating a request — drawing its time and randomness, deciding it (the rules are ``decide``'s, fed the
stored facts), signing, recording and delivering it — so that the same ``Idempotency-Key`` (or, without one, the
same item id and content digest) returns the original result and never creates a second event; per-(key, topic)
sequence numbers; per-jurisdiction results. Publications and corrections are decided and signed in batches, one
unit of work per batch on the group committer's thread (:meth:`EvidencePublisher._publish_batch`). A publication
whose delivery failed for some jurisdictions reports exactly which (:class:`PartialDelivery`); repeating the
request, or the outbox relay, delivers the rest from the same stored envelopes — never re-signed, never duplicated
as a new event.

Does not own: getting envelopes into Kafka (a :class:`Deliverer`, ``outbox.Outbox`` in the service), which also
says whether a sequence number may be signed on a topic at all — it may not until what the key already signed
there has been established from Kafka.

The HTTP shell (``service.py``), ``evhub`` and ``bench/`` all publish through :class:`EvidencePublisher`.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from services.publisher import core, decide, state
from services.publisher.committer import Batcher, GroupCommitter
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
        self._batches: Batcher[_Publication, _Done] = Batcher(self.committer, self._publish_batch)

    @property
    def batches(self) -> int:
        """How many batches of publications and corrections were decided so far."""
        return self._batches.batches

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
        _require_key_for_correction(idempotency_key)
        return await self._version(meta, content, idempotency_key, correction_of=item_id)

    async def precheck(
        self, meta: core.EvidenceMetadata, sha256: str, *, idempotency_key: str | None, correction_of: str | None
    ) -> None:
        """Refuse a request that publishing would refuse, before its upload is kept: nothing is signed or written.

        Raises: as :meth:`publish` / :meth:`correct` would for these metadata and content (ValidationFailed,
        Conflict, NotFound), and UntrustedKey.
        """
        core.check_jurisdictions(meta, self.jurisdictions)
        if correction_of is not None:
            _require_key_for_correction(idempotency_key)
        self._may_sign()
        identity = decide.version_identity(meta, sha256, idempotency_key, correction_of)

        def check(conn: sqlite3.Connection) -> None:
            item = state.items_by_id(conn, [meta.item_id]).get(meta.item_id)
            decide.plan_version(
                identity, item_id=meta.item_id, jurisdictions=meta.jurisdictions, sha256=sha256,
                correction_of=correction_of, previous=state.requests_by_key(conn, [identity.key]).get(identity.key),
                item=item, original=state.originals(conn, [meta.item_id]).get(meta.item_id) if item else None,
            )  # fmt: skip

        await self.committer.run(check)

    async def _version(
        self, meta: core.EvidenceMetadata, content: ContentInfo, idempotency_key: str | None, correction_of: str | None
    ) -> PublishResult:
        core.check_jurisdictions(meta, self.jurisdictions)
        now = self._may_sign()
        random = self.entropy(16 * (len(meta.protected) + 1))
        request = _Publication(
            meta=meta, content=content, correction_of=correction_of, now=now,
            identity=decide.version_identity(meta, content.sha256, idempotency_key, correction_of),
            event_id=str(uuid.UUID(bytes=random[:16], version=4)),
            salts=[random[16 * (i + 1) : 16 * (i + 2)] for i in range(len(meta.protected))],
        )  # fmt: skip
        event_id, version, replayed, rows = await self._batches.submit(request)
        assert rows is not None  # a replay's rows are read in its batch
        operation = "correct" if correction_of else "publish"
        return await self._deliver_event(operation, event_id, meta.item_id, version, replayed, rows, content)

    def _publish_batch(self, conn: sqlite3.Connection, batch: list[_Publication]) -> list[_Done | Exception]:
        """One unit of work for a batch of publications and corrections (on the committer's thread): the facts of
        all of them read with one statement per table, each decided and signed in turn against those facts and
        what the batch itself did before it, the rows of all written with one statement per table."""
        facts = _Facts.read(conn, self.signer.key_id, batch)
        writes = state.VersionWrites()
        outcomes: list[_Done | Exception] = []
        replays: list[int] = []
        for request in batch:
            try:
                outcome = self._one(request, facts, writes)
            except Exception as exc:  # this request alone is refused; nothing of it was kept
                outcomes.append(exc)
                continue
            if outcome[3] is None:
                replays.append(len(outcomes))
            outcomes.append(outcome)
        state.write_versions(conn, writes)
        for i in replays:  # after the writes: a replay of a request made earlier in this batch finds its rows
            event_id, version, replayed, _ = outcomes[i]  # type: ignore[misc]
            outcomes[i] = (event_id, version, replayed, state.outbox(conn, event_id))
        return outcomes

    def _one(self, request: _Publication, facts: _Facts, writes: state.VersionWrites) -> _Done:
        """Decide and sign one request. Everything that can refuse happens before ``facts`` and ``writes`` change."""
        meta, identity = request.meta, request.identity
        item = facts.items.get(meta.item_id)
        plan = decide.plan_version(
            identity, item_id=meta.item_id, jurisdictions=meta.jurisdictions, sha256=request.content.sha256,
            correction_of=request.correction_of, previous=facts.requests.get(identity.key), item=item,
            original=facts.originals.get(meta.item_id),
        )  # fmt: skip
        if isinstance(plan, decide.Replay):
            return plan.event_id, plan.version, True, None
        content = request.content
        descriptor = {"media_type": content.media_type, "size": content.size, "sha256": content.sha256,
                      "file_name": content.file_name}  # fmt: skip
        events, disclosures = core.build_events(
            meta, event_id=request.event_id, version=plan.version, replaces_event_id=plan.replaces,
            organisation=self.organisation, key_id=self.signer.key_id, content=[descriptor],
            published_at=request.now, salts=request.salts,
        )  # fmt: skip
        rows = self._seal(request.event_id, "evidence_event", events, meta.case_ids[0], disclosures, facts.counters)
        # Nothing below raises: the request is decided, its facts change.
        operation = "correct" if request.correction_of else "publish"
        at = request.now.isoformat()
        stored = decide.StoredRequest(identity.fingerprint, operation, request.event_id, meta.item_id, plan.version)
        facts.requests[identity.key] = stored
        if operation == "publish":
            facts.originals[meta.item_id] = stored
        facts.items[meta.item_id] = decide.StoredItem(meta.item_id, plan.version, request.event_id,
                                                      tuple(meta.case_ids), plan.jurisdictions)  # fmt: skip
        facts.counters.update((r.topic, r.sequence) for r in rows)
        writes.outbox += rows
        writes.requests.append((identity.key, identity.fingerprint, operation, request.event_id, meta.item_id,
                                plan.version, at))  # fmt: skip
        writes.versions.append((meta.item_id, plan.version, request.event_id, content.sha256, content.media_type,
                                content.size, at))  # fmt: skip
        writes.items.append((meta.item_id, plan.version, request.event_id, json.dumps(meta.case_ids),
                             json.dumps(list(plan.jurisdictions))))  # fmt: skip
        return request.event_id, plan.version, False, rows

    async def references(self, sha256: str) -> bool:
        """Whether any version of any item was published with this content."""
        return await self.committer.run(lambda conn: state.content_referenced(conn, sha256))

    async def withdraw(self, item_id: str, reason: str, *, idempotency_key: str | None = None) -> PublishResult:
        """Withdraw every version of ``item_id`` from every jurisdiction it was published to.

        Raises: NotFound (unknown item), Conflict (already withdrawn, or key reused), PartialDelivery.
        """
        identity = decide.withdrawal_identity(item_id, reason, idempotency_key)
        now = self._may_sign()
        event_id = str(uuid.UUID(bytes=self.entropy(16), version=4))

        def unit(conn: sqlite3.Connection) -> tuple[str, int, bool, list[state.OutboxRow]]:
            plan = decide.plan_withdrawal(
                identity, item_id=item_id, previous=state.requests_by_key(conn, [identity.key]).get(identity.key),
                item=state.items_by_id(conn, [item_id]).get(item_id),
            )  # fmt: skip
            if isinstance(plan, decide.Replay):
                return plan.event_id, plan.version, True, state.outbox(conn, plan.event_id)
            records = core.build_withdrawals(
                item_id=item_id, event_id=event_id, withdrawn_version=plan.latest_version,
                case_ids=list(plan.case_ids), jurisdictions=list(plan.jurisdictions), organisation=self.organisation,
                key_id=self.signer.key_id, reason=reason, published_at=now,
            )  # fmt: skip
            counters = state.counters(conn, self.signer.key_id, [evidence_topic(j) for j in records])
            rows = self._seal(event_id, "evidence_withdrawal", records, plan.case_ids[0], [], counters)
            state.stage(conn, rows)
            conn.execute("UPDATE items SET withdrawn_at = ?, withdraw_reason = ? WHERE item_id = ?",
                         (now.isoformat(), reason, item_id))  # fmt: skip
            conn.execute("INSERT INTO requests (idempotency_key, fingerprint, operation, event_id, item_id, version, "
                         "created_at) VALUES (?, ?, 'withdraw', ?, ?, ?, ?)",
                         (identity.key, identity.fingerprint, event_id, item_id, plan.latest_version,
                          now.isoformat()))  # fmt: skip
            return event_id, plan.latest_version, False, rows

        eid, version, replayed, rows = await self.committer.run(unit)
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

    def _seal(self, event_id: str, schema: str, records: dict[str, dict[str, Any]], case_id: str,
              disclosures: list[str], counters: dict[str, int]) -> list[state.OutboxRow]:  # fmt: skip
        """Sign one envelope per jurisdiction with the next sequence number of its topic after ``counters`` (the last
        this state allocated, per topic). Writes nothing: everything that can refuse (Kafka's record of the key, the
        size limit) is checked before the caller's first write, as units run without savepoints (GroupCommitter)."""
        key_id = self.signer.key_id
        rows = []
        for jurisdiction, record in sorted(records.items()):
            topic = evidence_topic(jurisdiction)
            sequence = counters.get(topic, 0) + 1
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
        return rows

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


def _require_key_for_correction(idempotency_key: str | None) -> None:
    if not idempotency_key:
        # Without one, a retry after a lost answer could not be told apart from a new correction that
        # happens to say the same (e.g. reverting to an earlier version): fail closed.
        raise ValidationFailed(
            "a correction needs an Idempotency-Key header",
            errors=[{"field": "Idempotency-Key", "message": "required for corrections"}],
        )


@dataclass(frozen=True)
class _Publication:
    """One publish or correction request, with everything drawn before its batch (time, randomness, identity)."""

    meta: core.EvidenceMetadata
    content: ContentInfo
    correction_of: str | None
    now: datetime
    identity: decide.Identity
    event_id: str
    salts: list[bytes]


@dataclass
class _Facts:
    """What the state holds for a batch's requests, updated as the batch decides them (so a later request of the
    batch sees an earlier one's request, item and sequence numbers before they are written)."""

    requests: dict[str, decide.StoredRequest]
    items: dict[str, decide.StoredItem]
    originals: dict[str, decide.StoredRequest]
    counters: dict[str, int]

    @classmethod
    def read(cls, conn: sqlite3.Connection, key_id: str, batch: list[_Publication]) -> _Facts:
        """Three or four statements for the whole batch."""
        item_ids = {r.meta.item_id for r in batch}
        items = state.items_by_id(conn, item_ids)
        topics = sorted({evidence_topic(j) for r in batch for j in r.meta.jurisdictions})
        return cls(
            requests=state.requests_by_key(conn, {r.identity.key for r in batch}), items=items,
            originals=state.originals(conn, items) if items else {},  # only an existing item has an original
            counters=state.counters(conn, key_id, topics),
        )  # fmt: skip


#: What a unit of work decided: (event id, version, replayed, the outbox rows — None for a replay until read).
_Done = tuple[str, int, bool, list[state.OutboxRow] | None]


def _jurisdictions(row: sqlite3.Row | None) -> list[str]:
    return [] if row is None else list(json.loads(row["jurisdictions"]))
