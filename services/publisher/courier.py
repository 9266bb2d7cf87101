"""One (signing key, topic): the key's fence on the topic, what the key signed there, and delivery in rounds.

A :class:`TopicCourier`

1. **takes the key's fence** on its topic: a transactional producer whose id is derived from the key id and the
   topic. Initialising it bumps the id's epoch at the broker, so every older producer with that id — another process
   signing with the same key, on this machine or any other — is refused from then on, and a transaction it left open
   is resolved (committed or aborted) before this one goes on;
2. **establishes from Kafka what the key signed there** (``reconcile``, after the fence, so nothing of this key can
   be written behind the scan's back). Only then may the publisher sign on the topic (:meth:`TopicCourier.may_sign`);
3. **delivers in rounds**: whatever is queued goes into one transaction; after the commit every envelope's
   (partition, offset) is known and its waiters are answered. An envelope is in at most one round at a time and is
   never sent again once acknowledged; one refused meanwhile (a revocation) aborts the round instead of committing;
4. when a round fails (broker away, transaction timed out, fenced by another process), **replaces its producer** —
   which resolves the open transaction for good — and **reconciles again** before anything more is sent: an
   envelope whose commit did happen is found in Kafka and marked, not sent twice; if another process holds the
   key's fence and has published, the reconcile finds its envelopes and the courier stops for good (the service
   exits 5). After being fenced it waits a little before taking the fence back, so that two processes cannot fence
   each other forever without either committing.

Does not own: the delivery marks and the set of topics (``outbox``), the reconcile's decisions (``ledger``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from services.publisher import reconcile, state
from services.publisher.committer import GroupCommitter
from services.publisher.ledger import TopicLedger
from services.shared import wakeups
from services.shared.avro import AvroCodec
from services.shared.errors import EvidenceHubError, KafkaUnavailable, StateRefused, StoreUnavailable, UntrustedKey
from services.shared.kafka import make_consumer, make_producer
from services.shared.kafka_connection import Kafka
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)
#: A round (one transaction) holds at most this many envelopes / bytes: transactions stay short.
ROUND_RECORDS: Final = 1000
ROUND_BYTES: Final = 16 << 20
RETRY: Final = (0.5, 1.0, 2.0, 5.0)
#: How long a committed round may take to become readable before it is acknowledged anyway (normally milliseconds).
VISIBLE_WITHIN_S: Final = 5.0

Key = tuple[str, str]  # (event id, jurisdiction): one envelope


@dataclass(frozen=True)
class OutboxSettings:
    bootstrap: Kafka
    delivery_timeout_s: float = 10.0
    transaction_timeout_s: float = 30.0
    request_timeout_ms: int = 10_000
    establish_timeout_s: float = 120.0


def transactional_id(key_id: str, topic: str) -> str:
    """The fence of one (key, topic): every publisher process signing with the key uses the same id."""
    return f"evhub-publisher.{key_id}.{topic}"


@dataclass
class _Item:
    row: state.OutboxRow
    future: asyncio.Future[tuple[int, int]]


class _Refused(Exception):
    def __init__(self, items: list[tuple[_Item, str]]) -> None:
        super().__init__(f"{len(items)} envelopes refused")
        self.items = items


class TopicCourier:
    """One (key, topic): its fence, what the key signed there, and rounds of delivery (see the module docstring)."""

    def __init__(self, *, topic: str, key: PublicKey, codec: AvroCodec, committer: GroupCommitter,
                 settings: OutboxSettings, acked: Callable[[state.OutboxRow, int, int], None],
                 fatal: Callable[[EvidenceHubError], None]) -> None:  # fmt: skip
        self.topic = topic
        self._key, self._codec, self._committer, self._settings = key, codec, committer, settings
        self._on_acked, self._on_fatal = acked, fatal
        #: Why an envelope must not be sent any more (e.g. its key was revoked past its number), or None.
        self.gate: Callable[[state.OutboxRow], str | None] = lambda row: None
        self._queue: dict[Key, _Item] = {}
        self._in_round: dict[Key, _Item] = {}
        self._acked: dict[Key, tuple[int, int]] = {}  # acknowledged, mark not yet written
        self._wake = asyncio.Event()
        self._poke = asyncio.Event()  # cuts a re-acquisition's back-off short: someone is waiting to deliver
        self._producer: AIOKafkaProducer | None = None
        self._visibility: AIOKafkaConsumer | None = None  # asks for the last stable offset after a commit
        self._disposing: set[asyncio.Task[None]] = set()
        self.ledger: TopicLedger | None = None
        self.established = False
        self.refused: EvidenceHubError | None = None
        self.round_began: float | None = None
        self.idle = asyncio.Event()  # no round in progress
        self.idle.set()
        self.rounds = 0
        self.fenced = 0
        self.failed_rounds = 0
        self.records_sent = 0
        self.bytes_sent = 0  # envelope bytes acknowledged

    # -- fence and reconcile -----------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Take the key's fence on the topic, then establish what the key signed there.

        Raises:
            KafkaUnavailable: Kafka did not answer in time (retry). StateRefused: the state contradicts Kafka.
        """
        self.established = False
        self._retire()
        s = self._settings
        self._producer = await take_fence(self._key.key_id, self.topic, s)
        try:
            ledger = await reconcile.establish(
                bootstrap=s.bootstrap, topic=self.topic, codec=self._codec, key=self._key, committer=self._committer,
                timeout_s=s.establish_timeout_s,
            )  # fmt: skip
        except BaseException:
            self._retire()
            raise
        for held, found in ledger.marks:  # acknowledged before a crash or a failed round: answered, not re-sent
            item = self._queue.pop((held.event_id, held.jurisdiction), None)
            if item is not None and not item.future.done():
                item.future.set_result((found.partition, found.offset))
        self.ledger = ledger
        self.established = True
        if self._queue:
            self._wake.set()

    def may_sign(self, sequence: int) -> None:
        """Raises: KafkaUnavailable until the topic is established; StateRefused below Kafka's record (never
        expected once established — a last guard)."""
        if self.refused is not None:
            raise self.refused
        if not self.established or self.ledger is None:
            raise KafkaUnavailable(f"cannot sign on {self.topic} yet: what this key signed there is being "
                                   "established from Kafka")  # fmt: skip
        if not self.ledger.may_sign(sequence):
            raise StateRefused(f"refusing to sign sequence {sequence} on {self.topic}: Kafka already holds "
                               f"sequence {self.ledger.highest} of this key")  # fmt: skip

    # -- delivery ----------------------------------------------------------------------------------------
    def deliver(self, rows: Sequence[state.OutboxRow]) -> list[asyncio.Future[tuple[int, int]]]:
        """Queue rows of this topic (once each); their futures resolve to (partition, offset) when acknowledged."""
        loop = asyncio.get_running_loop()
        futures = []
        for row in rows:
            key = (row.event_id, row.jurisdiction)
            item = self._queue.get(key) or self._in_round.get(key)
            if item is None:
                future: asyncio.Future[tuple[int, int]] = loop.create_future()
                if (acked := self._acked.get(key)) is not None:
                    future.set_result(acked)
                else:
                    self._queue[key] = item = _Item(row, future)
            else:
                future = item.future
            futures.append(future)
        if self._queue:
            self._wake.set()
            self._poke.set()
        return futures

    def written(self, keys: Sequence[Key]) -> None:
        """The marks of ``keys`` are durable: forget them here."""
        for key in keys:
            self._acked.pop(key, None)

    async def run(self) -> None:
        """Rounds until cancelled. A failed round re-acquires the fence and reconciles before the next."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            if not self.established:
                await self._reacquire()
                continue
            batch = self._take()
            try:
                acks = await self._round(batch)
            except asyncio.CancelledError:
                self._requeue(batch)
                raise
            except _Refused as refusal:  # aborted for sure: the others go in the next round
                for item, why in refusal.items:
                    self._in_round.pop((item.row.event_id, item.row.jurisdiction), None)
                    if not item.future.done():
                        item.future.set_exception(UntrustedKey(why))
                        item.future.exception()
                self._requeue([i for i in batch if all(i is not x for x, _ in refusal.items)])
                continue
            except Exception as exc:  # aiokafka's errors, timeouts: the outcome of this round is unknown
                self.failed_rounds += 1
                self._requeue(batch)
                if type(exc).__name__ == "ProducerFenced":
                    # Wait before taking the fence back, so that another publisher holding it can commit what it
                    # has — then the reconcile finds it and one of the two stops — instead of two processes
                    # fencing each other forever.
                    self.fenced += 1
                    pause = min(5.0, 0.5 * self.fenced) * (1 + random.random())  # noqa: S311 - jitter
                    log.warning("%s: the key's fence was taken (another publisher with this key, or the "
                                "transaction timed out); taking it back in %.1fs and reconciling",
                                self.topic, pause)  # fmt: skip
                    self.established = False
                    await asyncio.sleep(pause)
                else:
                    log.warning("%s: a round of %d envelopes failed (%r); reconciling before sending again",
                                self.topic, len(batch), exc)  # fmt: skip
                self.established = False
                await self._reacquire()
                continue
            self.rounds += 1
            self.fenced = 0
            self.records_sent += len(batch)
            self.bytes_sent += sum(len(i.row.envelope) for i in batch)
            for item, (partition, offset) in zip(batch, acks, strict=True):
                key = (item.row.event_id, item.row.jurisdiction)
                self._in_round.pop(key, None)
                self._acked[key] = (partition, offset)
                self._on_acked(item.row, partition, offset)
            await self._visible(acks)  # committed and marked whatever happens now; answered once readable
            await wakeups.answer([(item.future, ack) for item, ack in zip(batch, acks, strict=True)])
            if self._queue:
                self._wake.set()

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        for key in list(self._queue):
            item = self._queue[key]
            if (why := self.gate(item.row)) is not None:  # checked as late as possible: never sent after a refusal
                del self._queue[key]
                if not item.future.done():
                    item.future.set_exception(UntrustedKey(why))
                    item.future.exception()
                continue
            if batch and (len(batch) >= ROUND_RECORDS or size + len(item.row.envelope) > ROUND_BYTES):
                break
            batch.append(self._queue.pop(key))
            self._in_round[key] = item
            size += len(item.row.envelope)
        return batch

    def _requeue(self, batch: list[_Item]) -> None:
        for item in reversed(batch):
            key = (item.row.event_id, item.row.jurisdiction)
            self._in_round.pop(key, None)
            self._queue = {key: item, **self._queue}

    async def _round(self, batch: list[_Item]) -> list[tuple[int, int]]:
        producer = self._producer
        assert producer is not None
        self.round_began = time.monotonic()
        self.idle.clear()
        try:
            # Bounded: aiokafka never expires an idempotent batch, so a round can wait for as long as a restarted
            # broker leaves its connection unanswered (seen: over 2 minutes). Past the transaction timeout the broker
            # aborts the transaction anyway; the round fails, and the next fence and reconcile settle its outcome.
            async with asyncio.timeout(self._settings.transaction_timeout_s):
                return await self._send_round(producer, batch)
        finally:
            self.round_began = None
            self.idle.set()

    async def _send_round(self, producer: AIOKafkaProducer, batch: list[_Item]) -> list[tuple[int, int]]:
        await producer.begin_transaction()
        futures = []
        for n, i in enumerate(batch, 1):
            future = await producer.send(self.topic, i.row.envelope, key=i.row.kafka_key)
            if n % wakeups.SLICE == 0:  # send() returns at once while its batch has room: let the loop run
                await asyncio.sleep(0)
            future.add_done_callback(_retrieved)  # a failed round's record errors are the round's error
            futures.append(future)
        refused = [(i, why) for i in batch if (why := self.gate(i.row)) is not None]
        if refused:  # refused while the round was sending (e.g. a revocation arrived): commit none of it
            await producer.abort_transaction()
            raise _Refused(refused)
        await producer.commit_transaction()
        return [(m.partition, m.offset) for m in (f.result() for f in futures)]

    async def _visible(self, acks: list[tuple[int, int]]) -> None:
        """Wait (briefly, bounded) until read_committed readers can see the round: the broker answers a commit once
        it is decided, and writes the markers that make the records readable just after. So an acknowledgement means
        that a reader reading to the end finds the envelope. Past the bound the commit stands all the same."""
        needed: dict[TopicPartition, int] = {}
        for partition, offset in acks:
            tp = TopicPartition(self.topic, partition)
            needed[tp] = max(needed.get(tp, 0), offset + 1)
        try:
            if self._visibility is None:
                self._visibility = make_consumer(self._settings.bootstrap, group_id=None,
                                                 client_id=f"evhub-publisher-visible-{self.topic}")  # fmt: skip
                await self._visibility.start()
            async with asyncio.timeout(VISIBLE_WITHIN_S):
                while True:
                    ends = await self._visibility.end_offsets(list(needed))  # read_committed: the last stable offset
                    if all(ends[tp] >= offset for tp, offset in needed.items()):
                        return
                    await asyncio.sleep(0.005)
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("%s: a committed round is not visible to readers yet (%r)", self.topic, exc)

    def _retire(self) -> None:
        """Stop using the current producer; it is stopped in the background (that may wait for Kafka)."""
        old, self._producer = self._producer, None
        if old is not None:
            task = asyncio.create_task(_dispose(old, fail=True))
            self._disposing.add(task)
            task.add_done_callback(self._disposing.discard)

    async def _reacquire(self) -> None:
        """Replace the producer (the old one's transaction is resolved by the new one's fence) and reconcile,
        retrying while Kafka does not answer. A state Kafka contradicts stops this courier for good."""
        attempt = 0
        while True:
            try:
                await self.acquire()
                return
            except StateRefused as exc:
                self.refused = exc
                self._fail_waiters(exc)
                self._on_fatal(exc)
                raise
            except (KafkaUnavailable, StoreUnavailable) as exc:
                delay = RETRY[min(attempt, len(RETRY) - 1)]
                attempt += 1
                log.warning("%s: %s; retrying in %.1fs", self.topic, exc.detail, delay)
                self._poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), delay)

    def _fail_waiters(self, exc: EvidenceHubError) -> None:
        for item in [*self._queue.values(), *self._in_round.values()]:
            if not item.future.done():
                item.future.set_exception(exc)
                item.future.exception()  # retrieved: nobody may be waiting any more

    def stuck_for(self) -> float:
        return 0.0 if self.round_began is None else time.monotonic() - self.round_began

    async def probe(self, within_s: float) -> bool:
        """Whether the cluster answers a metadata request within ``within_s``."""
        producer = self._producer
        if producer is None:
            return False
        try:
            async with asyncio.timeout(within_s):
                return bool(await producer.client.force_metadata_update())
        except (TimeoutError, KafkaError, OSError):
            return False

    async def close(self, within_s: float) -> None:
        producer, self._producer = self._producer, None
        visibility, self._visibility = self._visibility, None
        tasks = set(self._disposing)
        if visibility is not None:
            tasks.add(asyncio.create_task(_stop_consumer(visibility)))
        if producer is not None:
            tasks.add(asyncio.create_task(_dispose(producer, fail=False, within_s=within_s)))
        if tasks:
            await asyncio.wait(tasks, timeout=within_s)


class FencedNoise(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for ProducerFenced: aiokafka's transaction manager
    replaces its waiter future on a fatal error without anyone awaiting the old one. The courier has handled the
    fencing (the round failed, the fence was taken back); the log line would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Future exception was never retrieved")
                    and "ProducerFenced" in record.getMessage())  # fmt: skip


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    with contextlib.suppress(KafkaError, OSError):
        await consumer.stop()


async def take_fence(key_id: str, topic: str, settings: OutboxSettings) -> AIOKafkaProducer:
    """A started transactional producer holding the key's fence on ``topic`` (older holders are refused from now on).

    Raises:
        KafkaUnavailable: Kafka did not answer in time.
    """
    producer = make_producer(
        settings.bootstrap, client_id=f"evhub-publisher-{topic}", transactional_id=transactional_id(key_id, topic),
        transaction_timeout_ms=int(settings.transaction_timeout_s * 1000),
        request_timeout_ms=settings.request_timeout_ms,
    )  # fmt: skip
    try:
        async with asyncio.timeout(settings.request_timeout_ms / 1000 * 2):
            await producer.start()  # InitProducerId: the fence
    except (KafkaError, TimeoutError, OSError, AssertionError) as exc:
        # AssertionError: aiokafka asserts that its metadata names a broker before it looks up the transaction
        # coordinator ("Did we not perform bootstrap?"); right after a frozen broker comes back it may name none yet.
        # That is Kafka not answering, like the others: retried, never fatal.
        await _dispose(producer, fail=True)
        raise KafkaUnavailable(f"could not take the signing key's fence on {topic}: {exc!r}") from exc
    return producer


async def _dispose(producer: AIOKafkaProducer, *, fail: bool, within_s: float = 15.0) -> None:
    """Stop a producer within ``within_s``. ``fail``: give up on what it still holds first (a failed round's
    records — their outcome is settled by the next fence and reconcile, not by this producer)."""
    if fail:
        # aiokafka has no public way to abandon queued batches; without this, stop() waits for Kafka to return.
        producer._message_accumulator.fail_all(KafkaConnectionError("producer replaced"))
    try:
        async with asyncio.timeout(within_s):
            await producer.stop()
    except (TimeoutError, KafkaError, OSError) as exc:
        log.warning("a Kafka producer did not stop within %.0fs: %r", within_s, exc)
    # A fenced producer leaves its failure on a transaction waiter nobody awaits; it was handled (the round failed).
    waiter = getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None)
    if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
        waiter.exception()
