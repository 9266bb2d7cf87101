"""The gateway's operations without HTTP: a feed page, an item, permission to download — each decided for the
office by the embedded policy engine, audited write-ahead, and only then handed to the HTTP layer.

Owns: the order of a read (views fresh enough → feed permission → records known to the live reader → decisions
→ audit entries acknowledged by Kafka → events), delayed releases at the end of an embargo, and the refusal to act
on an old view of ``hub.keys`` or ``hub.policy``. Every way a read can fail before the audit acknowledgement
releases nothing. Does not own: HTTP framing (``service``), reading Kafka (``reader``), the shapes (``release``).

Delayed releases (embargo): the cursor carries an *embargo mark* — every record whose embargo ended at or before
the mark was handled for this cursor. Each page first looks up, in the gateway's index, the records whose embargo
ended after the mark and by the current second, that the cursor had already passed (so they were decided while
still under embargo); it re-decides them now and releases those now allowed as ``late`` events; then it moves the
mark to the current second and reads on. Records passed after their embargo ended were decided normally, so each
record is owed at most one late release. Only the item's own ``embargo_until`` is handled this way: a new policy
version, or a policy that names a date, applies to records read after it takes effect (re-read the feed from the
beginning to have history decided again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.gateway.audit import AuditWriter
from services.gateway.cursor import ALL, Cursor, CursorKeys, EmbargoMark, micros, start
from services.gateway.ranges import ByteRange
from services.gateway.reader import CatchUp, Entry, Rejected, TopicReader
from services.gateway.release import (
    AuditLocation,
    EvidenceRecord,
    Outcome,
    Requester,
    attributes_of,
    audit_entry,
    decide_record,
    released_event,
    released_json,
    withheld_event,
    withheld_json,
)
from services.gateway.store import GatewayStore, IndexedRecord
from services.policy.model import READ_CONTENT, READ_FEED, READ_ITEM, FeedRef, ItemAttributes
from services.policy.state import PolicyState
from services.shared.avro import AvroCodec
from services.shared.errors import Forbidden, InfrastructureError, InvalidCursor, NotFound, UntrustedKey
from services.shared.follower import TopicFollower
from services.shared.registry import KeyRegistry

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]
NewId = Callable[[], str]


@dataclass(frozen=True)
class FeedEvent:
    """One event of a page, already rendered as JSON text (``release.released_json`` / ``withheld_json``)."""

    type: str
    cursor: str
    json: str


@dataclass
class FeedPage:
    events: list[FeedEvent]
    cursor: str
    caught_up: bool


@dataclass
class Step:
    """One record passed by a page: its outcome (None if it failed verification), and the cursor after it."""

    cursor: Cursor
    outcome: Outcome | None = None
    late: bool = False


@dataclass(frozen=True)
class Download:
    item_id: str
    sha256: str
    size: int
    receipt: str
    audit: AuditLocation
    media_type: str
    file_name: str
    first: int = 0
    last: int | None = None


@dataclass
class Gateway:
    codec: AvroCodec
    registry: KeyRegistry
    keys_follower: TopicFollower
    policy: PolicyState
    store: GatewayStore
    readers: dict[str, TopicReader]
    catchup: CatchUp
    audit: AuditWriter
    cursor_keys: CursorKeys
    clock: Clock
    new_id: NewId
    instance: str
    max_view_age_s: float
    failures: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: {"untrusted_at_release": 0})

    # --- preconditions -------------------------------------------------------------------------------------------

    def check_ready(self) -> None:
        """Raises: StaleView / InfrastructureError while the view of hub.keys or hub.policy is too old, or after a
        background task (a follower, a reader) failed."""
        if self.failures:
            raise InfrastructureError("the gateway is failing: " + "; ".join(self.failures))
        self.keys_follower.check_fresh(self.max_view_age_s)
        self.policy.ready(max_age_s=self.max_view_age_s)

    def reader_for(self, jurisdiction: str) -> TopicReader:
        """Raises: NotFound for a jurisdiction this gateway does not serve; InfrastructureError while its reader
        is starting."""
        reader = self.readers.get(jurisdiction)
        if reader is None:
            raise NotFound(f"no feed for {jurisdiction!r} here")
        if not reader.ready.is_set():
            raise InfrastructureError(f"the {jurisdiction} feed is starting")
        return reader

    def cursor(self, text: str | None, *, office: str, jurisdiction: str) -> Cursor:
        """The cursor an office presented (or the start of the feed).

        Raises:
            InvalidCursor: malformed, forged, another office's or jurisdiction's, under an unknown key, or naming
                more partitions than the topic has.
        """
        reader = self.reader_for(jurisdiction)
        if text is None:
            return start(len(reader.partitions), now_micros=micros(self.clock().replace(microsecond=0)))
        cursor = self.cursor_keys.decode(text, office=office, jurisdiction=jurisdiction)
        if len(cursor.positions) > len(reader.partitions):
            raise InvalidCursor("invalid cursor")
        missing = len(reader.partitions) - len(cursor.positions)  # the topic grew: new partitions from the start
        return Cursor((*cursor.positions, *([0] * missing)), cursor.embargo_mark)

    async def _audit(self, outcomes: list[Outcome]) -> list[AuditLocation]:
        return await self.audit.write([self.audit.encode(o.entry) for o in outcomes])

    async def authorize_feed(self, who: Requester, jurisdiction: str, at: datetime) -> None:
        """Raises: Forbidden (with the receipt of the audited refusal) if the office may not read this feed."""
        decision = self.policy.engine.decide(who.principal.name, READ_FEED, FeedRef(jurisdiction=jurisdiction), at,
                                             who.purpose)  # fmt: skip
        if decision.allowed:
            return
        entry_id = self.new_id()
        entry = audit_entry(entry_id=entry_id, at=at, who=who, action=READ_FEED, jurisdiction=jurisdiction,
                            decision=decision)  # fmt: skip
        [where] = await self.audit.write([self.audit.encode(entry)])
        raise Forbidden(f"{who.principal.name} may not read the {jurisdiction} feed", receipt=entry_id,
                        audit=where.to_json())  # fmt: skip

    # --- records ---------------------------------------------------------------------------------------------------

    async def entries(self, reader: TopicReader, partition: int, offset: int, limit: int) -> list[Entry]:
        """Known entries of one partition from ``offset``: from the live reader's tail, else the catch-up lane."""
        until = reader.position(partition)
        if offset >= until or limit <= 0:
            return []
        got = reader.tail(partition, offset, limit)
        if got is None:
            got = await self.catchup.read(reader.topic, partition, offset, limit=limit, until=until,
                                          rejected=reader.rejected)  # fmt: skip
        return got

    async def _record_at(self, reader: TopicReader, partition: int, offset: int) -> EvidenceRecord | None:
        got = await self.entries(reader, partition, offset, 1)
        if got and got[0].offset == offset and isinstance(got[0], EvidenceRecord):
            return got[0]
        return None

    def _trusted_now(self, record: EvidenceRecord) -> bool:
        """A key revoked after the record was verified stops its release (a revocation names its last valid
        sequence number)."""
        try:
            self.registry.resolve(record.key_id, sequence=record.sequence, topic=record.topic)
        except UntrustedKey:
            self.counters["untrusted_at_release"] += 1
            return False
        return True

    async def _last_attributes(self, reader: TopicReader, item_id: str) -> ItemAttributes | None:
        rows = self.store.item(reader.topic, item_id)  # indexed; on the loop (see store)
        events = [r for r in rows if r.kind == "event" and r.attributes is not None]
        return ItemAttributes.model_validate(events[-1].attributes) if events else None

    async def _decide(self, who: Requester, reader: TopicReader, record: EvidenceRecord, at: datetime,
                      action: str = READ_ITEM) -> Outcome:  # fmt: skip
        last = await self._last_attributes(reader, record.item_id) if record.kind == "withdrawal" else None
        attributes = attributes_of(record, withdrawn=record.item_id in reader.withdrawn, last_attributes=last)

        def decide(attrs: ItemAttributes) -> Any:
            return self.policy.engine.decide(who.principal.name, action, attrs, at, who.purpose)

        return decide_record(record, who=who, at=at, entry_id=self.new_id(), attributes=attributes, decide=decide,
                             action=action)  # fmt: skip

    # --- feeds -----------------------------------------------------------------------------------------------------

    async def _due(self, who: Requester, reader: TopicReader, cursor: Cursor, now_s: int, limit: int,
                   at: datetime) -> tuple[list[Step], EmbargoMark, bool]:  # fmt: skip
        """Late releases owed to this cursor; the new mark; whether every one due by ``now_s`` was handled."""
        rows: list[IndexedRecord] = self.store.embargoes_ending(reader.topic, after=cursor.embargo_mark, until=now_s,
                                                                limit=limit)  # fmt: skip
        steps, mark = [], cursor.embargo_mark
        for row in rows:
            mark = (row.embargo_until or 0, row.partition, row.offset)
            if row.kind != "event" or row.offset >= cursor.positions[row.partition]:
                continue  # not passed yet: it is decided (after its embargo) when the cursor reaches it
            record = await self._record_at(reader, row.partition, row.offset)
            if record is None or not self._trusted_now(record):
                continue
            outcome = await self._decide(who, reader, record, at)
            if outcome.released:
                steps.append(Step(cursor=Cursor(cursor.positions, mark), outcome=outcome, late=True))
        exhausted = len(rows) < limit
        return steps, ((now_s, ALL, ALL) if exhausted else mark), exhausted

    async def _pass(self, who: Requester, reader: TopicReader, cursor: Cursor, limit: int,
                    at: datetime) -> list[Step]:  # fmt: skip
        steps: list[Step] = []
        n = len(reader.partitions)
        first = sum(cursor.positions) % n  # rotate the starting partition so that a full page is fair
        for i in range(n):
            partition = reader.partitions[(first + i) % n]
            for entry in await self.entries(reader, partition, cursor.positions[partition], limit - len(steps)):
                cursor = cursor.advanced(partition, entry.offset + 1)
                if isinstance(entry, Rejected) or not self._trusted_now(entry):
                    steps.append(Step(cursor=cursor))
                    continue
                steps.append(Step(cursor=cursor, outcome=await self._decide(who, reader, entry, at)))
        return steps

    def caught_up(self, reader: TopicReader, cursor: Cursor) -> bool:
        """The cursor passed every record the reader verified, and the reader had reached the topic's end."""
        return reader.at_end and all(cursor.positions[p] >= reader.position(p) for p in reader.partitions)

    async def feed(self, who: Requester, jurisdiction: str, cursor: Cursor, *, limit: int,
                   wait_s: float = 0.0) -> FeedPage:  # fmt: skip
        """The next page of the feed for this office: up to ``limit`` records passed, waiting up to ``wait_s`` for
        one if there is none yet.

        Raises:
            StaleView / InfrastructureError: the view of keys or policy is too old. Forbidden: the feed is not
            this office's (refusal audited). AuditUnavailable: the audit log did not acknowledge (nothing sent).
            KafkaUnavailable: old records could not be read.
        """
        reader = self.reader_for(jurisdiction)
        deadline = asyncio.get_running_loop().time() + wait_s
        office = who.principal.name
        while True:
            changed = reader.changed()
            self.check_ready()
            at = self.clock()
            await self.authorize_feed(who, jurisdiction, at)
            now_s = micros(at.replace(microsecond=0))
            steps, mark, exhausted = await self._due(who, reader, cursor, now_s, limit, at)
            base = Cursor(cursor.positions, mark)
            if exhausted:
                steps += await self._pass(who, reader, base, limit - len(steps), at)
            final = base
            for step in steps:
                if not step.late:
                    final = step.cursor
            remaining = deadline - asyncio.get_running_loop().time()
            if steps or remaining <= 0:
                break
            cursor = final
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        decided = [s.outcome for s in steps if s.outcome is not None]
        where = iter(await self._audit(decided))  # write-ahead: nothing below runs unless Kafka acknowledged
        events = []
        for step in steps:
            if step.outcome is None:
                continue
            text = self.cursor_keys.encode(step.cursor, office=office, jurisdiction=jurisdiction)
            location = next(where)
            if step.outcome.released:
                body = released_json(step.outcome, codec=self.codec, cursor=text, audit=location, late=step.late)
                events.append(FeedEvent(step.outcome.record.kind, text, body))
            else:
                events.append(FeedEvent("withheld", text, withheld_json(step.outcome, cursor=text, audit=location)))
        return FeedPage(events=events, cursor=self.cursor_keys.encode(final, office=office, jurisdiction=jurisdiction),
                        caught_up=self.caught_up(reader, final))  # fmt: skip

    # --- items and content ---------------------------------------------------------------------------------------

    async def _item_records(self, reader: TopicReader, item_id: str) -> list[EvidenceRecord]:
        rows = self.store.item(reader.topic, item_id)  # indexed; on the loop (see store)
        records = [await self._record_at(reader, r.partition, r.offset) for r in rows]
        return [r for r in records if r is not None and self._trusted_now(r)]

    async def item(self, who: Requester, item_id: str, jurisdiction: str) -> dict[str, Any]:
        """Every version of the item on the jurisdiction's topic, decided now: the latest the office may see, and
        the history (released versions in full, refused ones as receipts only).

        Raises:
            NotFound: unknown item, or no version the office may see (the refusals are audited all the same).
            StaleView, AuditUnavailable: as :meth:`feed`.
        """
        reader = self.reader_for(jurisdiction)
        self.check_ready()
        records = await self._item_records(reader, item_id)
        if not records:
            raise NotFound(f"no item {item_id!r} in the {jurisdiction} feed")
        at = self.clock()
        outcomes = [await self._decide(who, reader, r, at) for r in records]
        locations = await self._audit(outcomes)
        if not any(o.released for o in outcomes):
            raise NotFound(f"no item {item_id!r} in the {jurisdiction} feed")
        history = [
            released_event(o, codec=self.codec, cursor=None, audit=w) if o.released
            else withheld_event(o, cursor=None, audit=w)
            for o, w in zip(outcomes, locations, strict=True)
        ]  # fmt: skip
        versions = [h for h in history if h["type"] == "event"]
        withdrawals = [h for h in history if h["type"] == "withdrawal"]
        return {"item_id": item_id, "jurisdiction": jurisdiction, "withdrawn": item_id in reader.withdrawn,
                "latest": versions[-1] if versions and not withdrawals else None,
                "withdrawal": withdrawals[-1] if withdrawals else None, "history": history}  # fmt: skip

    async def download(self, who: Requester, item_id: str, sha256: str, jurisdiction: str, *,
                       size_of: Callable[[str], Awaitable[int]],
                       byte_range: Callable[[int], ByteRange | None]) -> Download:  # fmt: skip
        """Permission to send ``sha256`` of the item, audited before any byte: the newest version of the item that
        lists the digest is decided for ``ReadContent`` (a withdrawn item is refused by policy). The store is not
        touched unless the decision allows. ``size_of(sha256)`` and ``byte_range(size)`` come from the shell.

        Raises:
            NotFound: unknown item, a digest the item does not list, or a refusal (audited). RangeNotSatisfiable.
            StaleView, AuditUnavailable: as :meth:`feed`.
        """
        reader = self.reader_for(jurisdiction)
        self.check_ready()
        rows = self.store.item(reader.topic, item_id)  # indexed; on the loop (see store)
        listing = [r for r in rows if r.kind == "event" and sha256 in r.content]
        if not listing:
            raise NotFound("no such content")
        record = await self._record_at(reader, listing[-1].partition, listing[-1].offset)
        if record is None or not self._trusted_now(record):
            raise NotFound("no such content")
        at = self.clock()
        outcome = await self._decide(who, reader, record, at, action=READ_CONTENT)
        if not outcome.released:
            await self._audit([_with_content(outcome, sha256, None)])
            raise NotFound("no such content")
        size = await size_of(sha256)
        chosen = byte_range(size)
        text = None if chosen is None else chosen.audit_text()
        entry = _with_content(outcome, sha256, text)
        [where] = await self._audit([entry])
        files = [c for c in record.record["content"] if c["sha256"] == sha256]
        return Download(item_id=item_id, sha256=sha256, size=size, receipt=entry.entry_id, audit=where,
                        media_type=files[0]["media_type"], file_name=files[0]["file_name"],
                        first=0 if chosen is None else chosen.first,
                        last=None if chosen is None else chosen.last)  # fmt: skip


def _with_content(outcome: Outcome, sha256: str, content_range: str | None) -> Outcome:
    item = {**outcome.entry["item"], "content_sha256": sha256, "content_range": content_range}
    return Outcome(record=outcome.record, decision=outcome.decision, attributes=outcome.attributes,
                   entry_id=outcome.entry_id, entry={**outcome.entry, "item": item}, disclosures=())  # fmt: skip
