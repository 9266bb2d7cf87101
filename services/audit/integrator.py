"""The audit service's write path: follow ``hub.audit``, integrate, store, commit, publish — one fetch at a time.

Owns the order of the durable steps of one integration, which is the crash-consistency argument
(docs/architecture.md):

1. integrate the fetched records on a copy of the committed edge (pure; the new checkpoint is signed only if it
   is consistent with the last one, checked over the tiles about to be written);
2. write the new tiles and entry bundles (atomic, idempotent: a crash here leaves only files that a re-run
   writes again with the same bytes; no client is pointed at them, no checkpoint covers them yet);
3. produce the batch's dead letters to ``hub.deadletter`` (acks=all, awaited; a crash before 4 repeats them);
4. commit rows + state + next offset + checkpoint in one SQLite transaction — the commit point;
5. copy the checkpoint to the served ``checkpoint`` file, and only then show it to readers; delete the partial
   versions of tiles that became full.

Decoding a fetch (every entry checked to be an ``AuditEntry``) needs no tree state, so the next fetch is decoded
while the previous integration goes through these steps; the steps of one integration start only after the
previous one committed.

A store failure (a full disk) before 4 commits nothing: the integrator says why in :attr:`Integrator.stalled`
(``/readyz`` fails), keeps the fetched records and retries the same integration until it succeeds. Kafka errors
and anything unexpected end the task, which fails the service loudly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from services.audit.index import LogIndex
from services.audit.log import Decoded, Integration, Record, Sequencer
from services.audit.tiles import TILE_WIDTH, Tile
from services.audit.tilestore import TileStore
from services.shared.errors import KafkaUnavailable, NotFound, StoreUnavailable

log = logging.getLogger(__name__)
Clock = Callable[[], float]


@dataclass(frozen=True)
class LogView:
    """What readers see: the last committed checkpoint, and when the log last signed or confirmed it."""

    size: int
    root: bytes
    checkpoint: bytes
    signed_at: float
    dead_letters: int
    duplicates: int


class Integrator:
    def __init__(
        self, *, sequencer: Sequencer, index: LogIndex, tiles: TileStore, consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer, partition: TopicPartition, dead_letter_topic: str, view: LogView,
        checkpoint_interval_s: float, max_records: int, clock: Clock = time.time,
    ) -> None:  # fmt: skip
        self._sequencer = sequencer
        self._index = index
        self._tiles = tiles
        self._consumer = consumer
        self._producer = producer
        self._tp = partition
        self._dead_letter_topic = dead_letter_topic
        self._interval = checkpoint_interval_s
        self._max_records = max_records
        self._clock = clock
        self.view = view
        #: Why integration is stopped (a store failure being retried), or None while it runs.
        self.stalled: str | None = None
        self.integrated = asyncio.Event()  # set after every commit (tests and benchmarks wait on it)
        self._checkpoint_file_stale = False

    async def run(self) -> None:
        """Follow the partition until cancelled. One integration may be committing while the next fetch is
        decoded (decoding needs no tree state; the commit releases the interpreter lock while SQLite and fsync
        work): the durable steps of each integration keep their order, and one starts only after the previous
        one committed.

        Raises:
            KafkaUnavailable: fetching or dead-lettering failed (the service fails loudly).
        """
        pending: asyncio.Task[None] | None = None
        after = self._sequencer.next_offset
        try:
            while True:
                try:
                    fetched = await self._consumer.getmany(self._tp, timeout_ms=200, max_records=self._max_records)
                except KafkaError as exc:
                    raise KafkaUnavailable(f"could not read {self._tp.topic}: {exc}") from exc
                records = [Record(r.offset, r.value) for r in fetched.get(self._tp, [])]
                if records:
                    decoded = await asyncio.to_thread(self._sequencer.decode, records, after=after)
                    after = decoded.next_offset
                    if pending is not None:
                        await pending
                    pending = asyncio.create_task(self.integrate_decoded(decoded), name="audit-integration")
                elif pending is not None:
                    await pending
                    pending = None
                elif self._clock() - self.view.signed_at >= self._interval:
                    await self._confirm()
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)

    async def integrate(self, records: list[Record]) -> None:
        """Integrate ``records`` durably (see :meth:`integrate_decoded`)."""
        await self.integrate_decoded(self._sequencer.decode(records, after=self._sequencer.next_offset))

    async def integrate_decoded(self, decoded: Decoded) -> None:
        """Integrate decoded records durably, retrying store failures (with a bounded back-off) until it succeeds."""
        delay = 0.1
        while True:
            try:
                await self._integrate_once(decoded)
                if self.stalled is not None:
                    log.warning("audit integration resumed at size %d", self.view.size)
                self.stalled = None
                return
            except StoreUnavailable as exc:
                if self.stalled != exc.detail:
                    log.error("audit integration stopped: %s", exc.detail)
                self.stalled = exc.detail
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _integrate_once(self, decoded: Decoded) -> None:
        integration: Integration = await asyncio.to_thread(self._prepare, decoded)
        for dead in integration.dead_letters:
            await self._dead_letter(dead.offset, dead.value, dead.reason)
        signed_at = self._clock()
        await asyncio.to_thread(self._index.commit, integration, signed_at=signed_at)
        # Committed: from here on nothing may send this integration round again.
        self._sequencer.adopt(integration)
        view = self.view
        self.view = LogView(integration.size, integration.checkpoint.root, integration.signed, signed_at,
                            view.dead_letters + len(integration.dead_letters),
                            view.duplicates + integration.duplicates)  # fmt: skip
        log.info("integrated %d entries up to size %d (offset %d, %d dead letters, %d duplicates)",
                 len(integration.entries), integration.size, integration.next_offset - 1,
                 len(integration.dead_letters), integration.duplicates)  # fmt: skip
        self.integrated.set()
        self.integrated = asyncio.Event()
        await self._publish_checkpoint()
        full = [w.tile for w in integration.writes if w.tile.width == TILE_WIDTH]
        if full:
            await asyncio.to_thread(self._tiles.prune_partials, full)

    async def attach_cosignatures(self, size: int, checkpoint: bytes) -> None:
        """Serve ``checkpoint`` (the committed one of ``size``, now carrying witness cosignatures) if it is still
        the latest; an older one is served only when asked for by size."""
        view = self.view
        if view.size != size:
            return
        self.view = LogView(view.size, view.root, checkpoint, view.signed_at, view.dead_letters, view.duplicates)
        await self._publish_checkpoint()

    async def _publish_checkpoint(self) -> None:
        """Copy the committed checkpoint to the served file; on failure the next round tries again (the API
        serves the committed checkpoint from memory meanwhile)."""
        try:
            await asyncio.to_thread(self._tiles.write_checkpoint, self.view.checkpoint)
            self._checkpoint_file_stale = False
        except StoreUnavailable as exc:
            log.error("the checkpoint file is stale: %s", exc.detail)
            self._checkpoint_file_stale = True

    def _prepare(self, decoded: Decoded) -> Integration:
        """Steps 1 and 2, in a worker thread."""

        def read(tile: Tile) -> bytes:
            try:
                return self._tiles.read(tile)
            except NotFound as exc:
                raise StoreUnavailable(f"a committed tile is missing: {exc.detail}") from exc

        integration = self._sequencer.sequence(decoded, known=self._index.known, read_tile=read)
        self._tiles.write(integration.writes)
        return integration

    async def _dead_letter(self, offset: int, value: bytes, reason: str) -> None:
        headers = [("reason", reason.encode()[:1000]), ("source", f"{self._tp.topic}/{self._tp.partition}".encode()),
                   ("offset", str(offset).encode())]  # fmt: skip
        log.warning("hub.audit record at offset %d is dead-lettered: %s", offset, reason)
        try:
            await self._producer.send_and_wait(self._dead_letter_topic, value, headers=headers)
        except KafkaError as exc:
            raise KafkaUnavailable(f"could not dead-letter offset {offset}: {exc}") from exc

    async def _confirm(self) -> None:
        """Idle: confirm the current checkpoint (checkpoints carry no time: re-signing the same tree gives the
        same bytes, so the log records when it last vouched for it, which ``/readyz`` reads)."""
        now = self._clock()
        try:
            await asyncio.to_thread(self._index.touch, now)
        except StoreUnavailable as exc:
            self.stalled = exc.detail
            return
        self.view = LogView(self.view.size, self.view.root, self.view.checkpoint, now, self.view.dead_letters,
                            self.view.duplicates)  # fmt: skip
        if self._checkpoint_file_stale:
            await self._publish_checkpoint()
