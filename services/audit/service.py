"""The audit service's composition root: storage, the Kafka follower, the integrator task and the HTTP routes.

On start it opens the index (the commit point) and the tile store, restores the tree's right edge from the tiles
of the committed size and checks that they hash to the committed root (a store that lost or changed a tile
refuses to start rather than extend a different tree), re-publishes the committed checkpoint file, and seeks
``hub.audit`` (created like every hub topic if missing; it must have exactly one partition: its offset order is
the log's order) to the committed offset. A crash of the integrator task fails the service loudly: ``/healthz``
and every route answer 503.

Does not own: what integration does (``log``, ``integrator``) or what the routes answer (``api``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from services.audit import api
from services.audit.checkpoint import Checkpoint
from services.audit.index import LogIndex, SqliteIndex
from services.audit.integrator import Integrator, LogView
from services.audit.log import CheckpointSigner, Sequencer
from services.audit.note import NoteSigner, Verifier
from services.audit.settings import AuditSettings
from services.audit.tiles import TILE_HEIGHT, TILE_WIDTH, Tile, TiledTree, TileNodeReader
from services.audit.tilestore import PosixTileStore, TileStore
from services.shared.avro import AvroCodec
from services.shared.errors import (
    ConfigurationError,
    EvidenceHubError,
    InvalidProof,
    KafkaUnavailable,
    NotFound,
    StoreUnavailable,
)
from services.shared.http import problem_middleware
from services.shared.kafka import (
    AUDIT_TOPIC,
    DEAD_LETTER_TOPIC,
    TopicSpec,
    ensure_hub_topics,
    hub_topics,
    make_consumer,
    make_producer,
    partitions_of,
)

log = logging.getLogger(__name__)


def last_full_tiles(size: int) -> list[Tile]:
    """The last full tile of every level of a tree of ``size`` (the ones the right edge hangs from)."""
    out, level = [], 0
    while (count := size >> (TILE_HEIGHT * level)) >= TILE_WIDTH:
        out.append(Tile(level, count // TILE_WIDTH - 1))
        level += 1
    return out


def restore(index: LogIndex, tiles: TileStore, signer: NoteSigner, codec: AvroCodec) -> tuple[Sequencer, LogView]:
    """The committed log, checked: the edge tiles of the committed size must hash to the committed root, and the
    last full tile of each level must match its parent's hash.

    Raises:
        StoreUnavailable: a committed tile or bundle is missing, malformed, or does not match the committed root.
    """
    state = index.load()
    if state is None:
        sequencer = Sequencer(codec=codec, signer=CheckpointSigner(signer, last=None), tree=TiledTree(), next_offset=0)
        return sequencer, LogView(0, b"", b"", 0.0, 0, 0)
    try:
        tree = TiledTree.restore(state.size, tiles.read)
        reader = TileNodeReader(state.size, tiles.read)
        for tile in last_full_tiles(state.size):
            reader.hashes(tile)  # each checked against its parent's hash, up to the edge
    except (NotFound, InvalidProof) as exc:
        raise StoreUnavailable(f"the tiles of the committed log (size {state.size}) are damaged: {exc.detail}; "
                               "rebuild the log from hub.audit") from exc  # fmt: skip
    if tree.root() != state.root or state.checkpoint is None:
        raise StoreUnavailable(f"the tiles do not hash to the committed root of size {state.size}; rebuild the "
                               "log from hub.audit")  # fmt: skip
    last = Checkpoint(signer.name, state.size, state.root)
    sequencer = Sequencer(codec=codec, signer=CheckpointSigner(signer, last=last), tree=tree,
                          next_offset=state.next_offset)  # fmt: skip
    tiles.write_checkpoint(state.checkpoint)
    view = LogView(state.size, state.root, state.checkpoint, state.signed_at, state.dead_letters, state.duplicates)
    return sequencer, view


def create_app(
    settings: AuditSettings, *, bootstrap: str | None = None, signer: NoteSigner | None = None,
    codec: AvroCodec | None = None, clock: Callable[[], float] | None = None,
) -> web.Application:  # fmt: skip
    """The one composition root. ``signer`` overrides the key file named in settings (tests).

    Raises:
        ConfigurationError: no Kafka bootstrap, or no usable signing key.
    """
    bootstrap = bootstrap or settings.kafka.bootstrap
    if not bootstrap:
        raise ConfigurationError("the audit service needs a Kafka bootstrap (EVHUB_KAFKA_BOOTSTRAP)")
    signer = signer or settings.load_signer()
    if signer.name != settings.origin:
        raise ConfigurationError(f"the signing key's name {signer.name!r} is not the origin {settings.origin!r}")
    codec = codec or AvroCodec.load()
    wall = clock or time.time
    app = web.Application(middlewares=[problem_middleware])
    app[api.SETTINGS] = settings
    app[api.CLOCK] = wall
    app[api.FAILURE] = []
    app[api.LOG_KEY] = signer.verifier()
    witnesses: list[Verifier] = list(settings.witnesses())
    app[api.WITNESSES] = witnesses

    async def resources(app: web.Application) -> AsyncIterator[None]:
        specs = {s.name: s for s in hub_topics([])}
        await ensure_hub_topics(bootstrap, [TopicSpec(settings.topic, 1, specs[AUDIT_TOPIC].config),
                                            TopicSpec(settings.dead_letter_topic, 1, specs[DEAD_LETTER_TOPIC].config)],
                                kafka=settings.kafka)  # fmt: skip
        partitions = await partitions_of(bootstrap, settings.topic)
        if partitions != [0]:
            raise ConfigurationError(f"{settings.topic} must have exactly one partition (it has {len(partitions)}): "
                                     "its offset order is the log's order")  # fmt: skip
        index = await asyncio.to_thread(SqliteIndex, path=settings.index_file)
        tiles = PosixTileStore(root=settings.tiles_root)
        tp = TopicPartition(settings.topic, 0)
        consumer = make_consumer(bootstrap, group_id=None, client_id="evhub-audit",
                                 max_partition_fetch_bytes=settings.fetch_max_bytes,
                                 fetch_max_bytes=settings.fetch_max_bytes)  # fmt: skip
        producer = make_producer(bootstrap, client_id="evhub-audit")
        task: asyncio.Task[None] | None = None
        try:
            sequencer, view = await asyncio.to_thread(restore, index, tiles, signer, codec)
            await consumer.start()
            await producer.start()
            consumer.assign([tp])
            consumer.seek(tp, sequencer.next_offset)
            integrator = Integrator(
                sequencer=sequencer, index=index, tiles=tiles, consumer=consumer, producer=producer, partition=tp,
                dead_letter_topic=settings.dead_letter_topic, view=view,
                checkpoint_interval_s=settings.checkpoint_interval_s, max_records=settings.max_records, clock=wall,
            )  # fmt: skip
            if index.load() is None:
                await integrator.integrate([])  # the empty log's checkpoint, so /readyz has one to judge
            app[api.INTEGRATOR], app[api.INDEX], app[api.TILES] = integrator, index, tiles

            def crashed(t: asyncio.Task[None]) -> None:
                if not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    detail = exc.detail if isinstance(exc, EvidenceHubError) else repr(exc)
                    app[api.FAILURE].append(detail)
                    log.critical("audit integrator failed: %s", detail, exc_info=exc)

            task = asyncio.create_task(integrator.run(), name="audit-integrator")
            task.add_done_callback(crashed)
            yield
        except KafkaError as exc:
            raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await consumer.stop()
            await producer.stop()
            index.close()
            tiles.close()

    app.cleanup_ctx.append(resources)
    api.add_routes(app)
    return app
