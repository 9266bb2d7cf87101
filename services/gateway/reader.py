"""Reading evidence topics once per gateway: the live reader of each topic, and the catch-up lane for old offsets.

Owns:
- :class:`TopicReader` — one consumer per evidence topic (every partition assigned, no group, positions from the
  gateway's own state): verifies each record once (signature, key trusted for that sequence number and time,
  sequence not replayed), dead-letters what fails, records what it learned (``store``) and keeps the newest
  ``tail_records`` verified records of each partition in memory. Offices at or near the head are served from that
  tail — read once, serve many; the reader never waits for any office.
- :class:`CatchUp` — a small pool of consumers (``catchup_concurrency``) for offices asking for offsets older than
  the tail. It re-verifies signatures under today's registry and refuses what the live reader rejected. A slow
  catch-up holds one pool slot, never the live reader or the offices served from the tail; memory is bounded by the
  pool size times the batch size.
- :class:`DeadLetters` — every record that fails verification goes to ``hub.deadletter`` (acks=all) with the
  reason, and is counted; the feed continues past it.

A record is *known* once the live reader has verified it (offset < :meth:`TopicReader.position`); no office is
served an offset the live reader has not verified. Does not own: decisions and releases (``gateway``).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from services.gateway.cursor import micros
from services.gateway.release import EvidenceRecord
from services.gateway.store import GatewayStore, IndexedRecord
from services.shared.avro import AvroCodec
from services.shared.envelope import KeyResolver, open_envelope
from services.shared.errors import DecodeError, EvidenceHubError, KafkaUnavailable, TrustError, UntrustedKey
from services.shared.follower import TopicFollower
from services.shared.kafka import make_consumer, partitions_of
from services.shared.sequences import SequenceTracker

log = logging.getLogger(__name__)
MAX_RECORDS: Final = 500
KEY_WAIT_S: Final = 10.0


@dataclass(frozen=True)
class Rejected:
    """A record that failed verification: never released; the cursor moves past it."""

    topic: str
    partition: int
    offset: int
    reason: str


Entry = EvidenceRecord | Rejected


def verify(codec: AvroCodec, keys: KeyResolver, *, topic: str, partition: int, offset: int,
           value: bytes | None) -> EvidenceRecord:  # fmt: skip
    """Verify and decode one record as read from ``topic``.

    Raises:
        DecodeError / PayloadTooLarge / TrustError: see ``envelope.open_envelope``.
    """
    if not value:
        raise DecodeError("empty record")
    v = open_envelope(codec, value, topic=topic, keys=keys)
    return EvidenceRecord(topic=topic, partition=partition, offset=offset, envelope=value,
                          envelope_sha256=hashlib.sha256(value).hexdigest(), payload_type=v.payload_type,
                          schema=v.schema, record=v.record, key_id=v.key_id, sequence=v.sequence,
                          disclosures=v.disclosures)  # fmt: skip


def index_entry(record: EvidenceRecord) -> IndexedRecord:
    attributes = None
    content: tuple[str, ...] = ()
    embargo = None
    if record.kind == "event":
        attrs = record.signed_attributes
        assert attrs is not None  # an event has them
        attributes = attrs.model_dump(mode="json")
        content = tuple(c["sha256"] for c in record.record["content"])
        if attrs.embargo_until is not None:  # whole seconds, as the policy engine compares it (see ``gateway``)
            embargo = micros(attrs.embargo_until.replace(microsecond=0))
    return IndexedRecord(record.topic, record.partition, record.offset, record.kind, record.item_id, record.version,
                         record.event_id, attributes, content, embargo)  # fmt: skip


class DeadLetters:
    """``hub.deadletter``: the original bytes, keyed ``topic/partition/offset``, the reason in headers."""

    def __init__(self, producer: AIOKafkaProducer, *, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self.counts: Counter[str] = Counter()

    async def send(self, rejected: Rejected, value: bytes | None) -> None:
        """Raises: KafkaUnavailable — the caller retries the record; it is never skipped unrecorded."""
        headers = [
            ("reason", rejected.reason.encode()), ("topic", rejected.topic.encode()),
            ("partition", str(rejected.partition).encode()), ("offset", str(rejected.offset).encode()),
        ]  # fmt: skip
        key = f"{rejected.topic}/{rejected.partition}/{rejected.offset}".encode()
        try:
            await self._producer.send_and_wait(self._topic, value or b"", key=key, headers=headers)
        except KafkaError as exc:
            raise KafkaUnavailable(f"could not dead-letter {key.decode()}: {exc}") from exc
        self.counts[rejected.reason.split(":")[0]] += 1


class _Tail:
    """The newest verified entries of one partition, oldest dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._offsets: list[int] = []
        self._entries: list[Entry] = []

    def extend(self, entries: list[Entry]) -> None:
        self._offsets += [e.offset for e in entries]
        self._entries += entries
        if len(self._entries) > 2 * self._size:
            del self._offsets[: -self._size], self._entries[: -self._size]

    def read(self, offset: int, limit: int) -> list[Entry] | None:
        """Entries from ``offset`` on, or None if the tail does not reach back that far."""
        if not self._offsets or offset < self._offsets[0]:
            return None
        start = bisect.bisect_left(self._offsets, offset)
        return self._entries[start : start + limit]


class _RetryLater(Exception):
    pass


class TopicReader:
    def __init__(
        self, *, topic: str, bootstrap: str, codec: AvroCodec, keys: KeyResolver, keys_follower: TopicFollower,
        store: GatewayStore, deadletters: DeadLetters, tail_records: int, client_id: str, window: int = 256,
    ) -> None:  # fmt: skip
        self.topic = topic
        self._bootstrap, self._codec, self._keys = bootstrap, codec, keys
        self._keys_follower, self._store, self._deadletters = keys_follower, store, deadletters
        self._tail_records, self._client_id, self._window = tail_records, client_id, window
        self.partitions: list[int] = []
        self._positions: dict[int, int] = {}
        self._tails: dict[int, _Tail] = {}
        self.rejected: dict[tuple[int, int], str] = {}
        self.withdrawn: set[str] = set()
        self._tracker = SequenceTracker(window=window)
        self._changed = asyncio.Event()
        self.ready = asyncio.Event()
        self.verified = 0
        #: Whether the reader had verified every record up to the end of the topic as of its last fetch (the end:
        #: the last stable offset, i.e. past transaction markers too). False until the first fetch was answered.
        self.at_end = False

    async def load(self) -> None:
        """Where the reader stopped, and what it knew, from the gateway's state; the topic's partitions.

        Raises:
            KafkaUnavailable: the topic does not exist or the cluster does not answer. StoreUnavailable.
        """
        self.partitions = await partitions_of(self._bootstrap, self.topic)
        stored = await asyncio.to_thread(self._store.positions, self.topic)
        self._positions = {p: stored.get(p, 0) for p in self.partitions}
        self._tails = {p: _Tail(self._tail_records) for p in self.partitions}
        self.rejected = await asyncio.to_thread(self._store.rejected, self.topic)
        self.withdrawn = await asyncio.to_thread(self._store.withdrawn, self.topic)
        self._tracker = await asyncio.to_thread(self._store.tracker, window=self._window)

    def position(self, partition: int) -> int:
        """The next offset the live reader will verify: every offset below it is known."""
        return self._positions.get(partition, 0)

    def tail(self, partition: int, offset: int, limit: int) -> list[Entry] | None:
        return self._tails[partition].read(offset, limit)

    def changed(self) -> asyncio.Event:
        """An event set the next time the reader advances (take it *before* checking positions)."""
        return self._changed

    async def run(self) -> None:
        """Verify the topic from where the reader stopped, forever.

        Raises:
            KafkaUnavailable: the cluster failed unrecoverably. StoreUnavailable: the state could not be written.
        """
        consumer = make_consumer(self._bootstrap, group_id=None, client_id=self._client_id)
        tps = [TopicPartition(self.topic, p) for p in self.partitions]
        try:
            await consumer.start()
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, self._positions[tp.partition])
            self.ready.set()
            while True:
                batches = await consumer.getmany(*tps, timeout_ms=500, max_records=MAX_RECORDS)
                if batches:
                    await self._apply(consumer, batches)
                self.at_end = await self._reached_end(consumer, tps)
        except KafkaError as exc:
            raise KafkaUnavailable(f"lost {self.topic}: {exc}") from exc
        finally:
            await consumer.stop()

    @staticmethod
    async def _reached_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
        for tp in tps:
            end = consumer.last_stable_offset(tp)
            end = consumer.highwater(tp) if end is None or end < 0 else end
            if end is None or await consumer.position(tp) < end:
                return False
        return True

    async def _verify_one(self, tp: TopicPartition, offset: int, value: bytes | None) -> Entry:
        try:
            try:
                record = verify(self._codec, self._keys, topic=tp.topic, partition=tp.partition, offset=offset,
                                value=value)  # fmt: skip
            except UntrustedKey:
                # The key (or its renewal) may have been registered just before this record was appended: make
                # sure the registry holds everything appended before now, then decide for good.
                if not await self._keys_follower.confirmed_after(time.time(), timeout_s=KEY_WAIT_S):
                    raise _RetryLater from None
                record = verify(self._codec, self._keys, topic=tp.topic, partition=tp.partition, offset=offset,
                                value=value)  # fmt: skip
            self._tracker.observe(record.key_id, tp.topic, record.sequence, record.envelope)
            return record
        except (TrustError, DecodeError) as exc:
            return Rejected(tp.topic, tp.partition, offset, f"{type(exc).__name__}: {exc.detail}")
        except EvidenceHubError as exc:  # PayloadTooLarge and any other refusal of untrusted bytes
            return Rejected(tp.topic, tp.partition, offset, f"{type(exc).__name__}: {exc.detail}")

    async def _apply(self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]) -> None:
        learned: dict[int, list[Entry]] = {}
        values: dict[tuple[int, int], bytes | None] = {}
        for tp, records in batches.items():
            entries: list[Entry] = []
            for rec in records:
                offset, value = rec.offset, rec.value
                try:
                    entry = await self._verify_one(tp, offset, value)
                except _RetryLater:
                    log.warning("%s[%d]@%d: key registry not current; retrying", tp.topic, tp.partition, offset)
                    consumer.seek(tp, offset)
                    break
                entries.append(entry)
                values[(tp.partition, offset)] = value
            learned[tp.partition] = entries
        rejected = [e for es in learned.values() for e in es if isinstance(e, Rejected)]
        try:
            for r in rejected:
                log.error("%s[%d]@%d rejected: %s", r.topic, r.partition, r.offset, r.reason)
                await self._deadletters.send(r, values[(r.partition, r.offset)])
        except KafkaUnavailable as exc:
            log.warning("dead-lettering failed (%s); the batch will be read again", exc.detail)
            for p in learned:
                consumer.seek(TopicPartition(self.topic, p), self._positions[p])
            await asyncio.sleep(1)
            return
        positions = {p: es[-1].offset + 1 for p, es in learned.items() if es}
        records = [index_entry(e) for es in learned.values() for e in es if isinstance(e, EvidenceRecord)]
        self._store.commit(  # on the loop: no fsync (see store); a worker thread waited for the GIL instead
            self.topic, positions=positions, sequences=self._tracker.take_dirty(),
            rejected=[(r.partition, r.offset, r.reason) for r in rejected], records=records,
        )  # fmt: skip
        for p, entries in learned.items():
            self._tails[p].extend(entries)
        for r in rejected:
            self.rejected[(r.partition, r.offset)] = r.reason
        self.withdrawn |= {e.item_id for es in learned.values() for e in es
                           if isinstance(e, EvidenceRecord) and e.kind == "withdrawal"}  # fmt: skip
        self._positions.update(positions)
        self.verified += sum(len(es) for es in learned.values())
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class CatchUp:
    """Old offsets for offices catching up: a bounded pool of consumers, verification under today's registry."""

    def __init__(self, *, bootstrap: str, codec: AvroCodec, keys: KeyResolver, concurrency: int, client_id: str,
                 timeout_s: float = 10.0) -> None:  # fmt: skip
        self._bootstrap, self._codec, self._keys = bootstrap, codec, keys
        self._client_id, self._timeout_s = client_id, timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._idle: list[AIOKafkaConsumer] = []
        self._all: list[AIOKafkaConsumer] = []
        self.reads = 0

    async def close(self) -> None:
        for consumer in self._all:
            await consumer.stop()

    async def read(self, topic: str, partition: int, offset: int, *, limit: int, until: int,
                   rejected: dict[tuple[int, int], str]) -> list[Entry]:  # fmt: skip
        """Verified entries of one partition from ``offset`` (below ``until``, at most ``limit``).

        Raises:
            KafkaUnavailable: the cluster did not answer in time.
        """
        async with self._slots:
            consumer = self._idle.pop() if self._idle else await self._new()
            try:
                return await self._read(consumer, topic, partition, offset, limit, until, rejected)
            except KafkaError as exc:
                raise KafkaUnavailable(f"could not read {topic}[{partition}]@{offset}: {exc}") from exc
            finally:
                self._idle.append(consumer)

    async def _new(self) -> AIOKafkaConsumer:
        consumer = make_consumer(self._bootstrap, group_id=None, client_id=self._client_id)
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise KafkaUnavailable(f"could not start a catch-up reader: {exc}") from exc
        self._all.append(consumer)
        return consumer

    async def _read(self, consumer: AIOKafkaConsumer, topic: str, partition: int, offset: int, limit: int,
                    until: int, rejected: dict[tuple[int, int], str]) -> list[Entry]:  # fmt: skip
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        out: list[Entry] = []
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        following = offset
        self.reads += 1
        while len(out) < limit and following < until:
            if asyncio.get_running_loop().time() > deadline:
                if out:
                    break
                raise KafkaUnavailable(f"no answer reading {topic}[{partition}]@{offset}")
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=limit - len(out))
            for rec in batch.get(tp, []):
                if rec.offset >= until or len(out) >= limit:
                    break
                if rec.offset < following:
                    continue
                following = rec.offset + 1
                known = rejected.get((partition, rec.offset))
                if known is not None:
                    out.append(Rejected(topic, partition, rec.offset, known))
                    continue
                try:
                    out.append(verify(self._codec, self._keys, topic=topic, partition=partition, offset=rec.offset,
                                      value=rec.value))  # fmt: skip
                except EvidenceHubError as exc:  # e.g. a key revoked since: refused now, never released
                    out.append(Rejected(topic, partition, rec.offset, f"{type(exc).__name__}: {exc.detail}"))
        return out
