"""The publisher's HTTP shell (aiohttp): documentation-group clients upload evidence over mTLS.

Routes (all errors are RFC 9457 problem+json):
    POST /v1/evidence                          multipart: part ``metadata`` (JSON) then part ``file`` → 201
    POST /v1/evidence/batch                    multipart: part ``items`` (JSON) then a ``file`` part per item → 200,
                                               one result or problem per item (``batch``)
    POST /v1/evidence/{item_id}/corrections    same form; a new version naming the one it replaces → 201
    POST /v1/evidence/{item_id}/withdrawal     JSON {"reason": …} → 201
    GET  /v1/evidence/{item_id}                versions, deliveries, withdrawal
    GET  /healthz                              the process serves
    GET  /readyz                               200 when it can publish; 503 naming why not (Kafka not answering…)
A repeated request (same ``Idempotency-Key``) answers 200 with the original result and ``Idempotent-Replayed``.
Corrections require an ``Idempotency-Key``. An optional ``Repr-Digest: sha-256=:…:`` (RFC 9530) makes the service
refuse a file whose bytes are not the ones the client hashed.

Owns: the routes and who may use them (mTLS client CNs, uploads in progress per client), removing what a request
refused after its upload was kept uploaded (unless something references it), composing the service in
:func:`create_app` (data-directory lock, state integrity, the key's fences and what it signed, from Kafka), the
outbox relay task, readiness and the bounded shutdown. Reading an upload is ``uploads``; publishing
``pipeline.EvidencePublisher``; delivery ``outbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from services.publisher import state
from services.publisher.batch import check_batch_length, publish_batch, read_batch
from services.publisher.committer import GroupCommitter
from services.publisher.courier import OutboxSettings
from services.publisher.datadir import DataDir
from services.publisher.ledger import intact
from services.publisher.outbox import Outbox
from services.publisher.pipeline import EvidencePublisher, PartialDelivery
from services.publisher.settings import PublisherSettings
from services.publisher.uploads import check_length, read_upload
from services.shared.avro import AvroCodec
from services.shared.content import ContentStore, LocalContentStore
from services.shared.errors import (
    ConfigurationError,
    EvidenceHubError,
    Forbidden,
    InfrastructureError,
    KafkaUnavailable,
    NotReady,
    StateRefused,
    TooManyRequests,
    ValidationFailed,
)
from services.shared.http import kafka_outage_middleware, peer_common_name, problem_middleware
from services.shared.kafka import (
    EVIDENCE_PREFIX,
    KEYS_TOPIC,
    ensure_hub_topics,
    evidence_topic,
    hub_topics,
    read_to_end,
)
from services.shared.kafka_connection import Kafka
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

SETTINGS = web.AppKey("settings", PublisherSettings)
PUBLISHER = web.AppKey("publisher", EvidencePublisher)
STORE = web.AppKey("store", ContentStore)
Authenticator = Callable[[web.Request], str]
AUTHENTICATE: web.AppKey[Authenticator] = web.AppKey("authenticate")
CRASHED = web.AppKey("crashed", list[str])
#: Why the service stopped itself (state refused by Kafka, fenced): ``__main__`` exits with its code.
FATAL = web.AppKey("fatal", list[EvidenceHubError])
#: Set when the service must stop; ``services.shared.serve`` waits on it beside SIGTERM.
STOP = web.AppKey("stop", asyncio.Event)
OWN_REGISTRY = web.AppKey("own_registry", bool)  # built from settings (and so refreshed), not injected
UPLOADS = web.AppKey("uploads", Counter[str])  # uploads in progress per client
HELD = web.AppKey("held", Counter[str])  # content digests kept by requests still deciding
SWEEP_EVERY_S = 600.0
SWEEP_OLDER_THAN_S = 3600.0


def mtls_identity(allowed: list[str]) -> Callable[[web.Request], str]:
    def authenticate(request: web.Request) -> str:
        cn = peer_common_name(request)
        if cn is None or cn not in allowed:
            log.warning("refused publisher client %r", cn)
            raise Forbidden("this client certificate may not publish")
        return cn

    return authenticate


def _unsafe_anonymous(request: web.Request) -> str:
    return "anonymous (unsafe plaintext)"


@contextlib.asynccontextmanager
async def _upload_slot(app: web.Application, who: str) -> AsyncIterator[None]:
    """Raises: TooManyRequests when the client already has the maximum number of uploads in progress."""
    uploads, limit = app[UPLOADS], app[SETTINGS].max_uploads_per_client
    if uploads[who] >= limit:
        raise TooManyRequests(f"at most {limit} uploads at a time per client; wait for one to finish", limit=limit)
    uploads[who] += 1
    try:
        yield
    finally:
        uploads[who] -= 1
        if uploads[who] <= 0:
            del uploads[who]


def _respond(result: Any) -> web.Response:
    response = web.json_response(result.to_json(), status=200 if result.replayed else 201)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def _publish_upload(request: web.Request, *, correction_of: str | None) -> web.Response:
    app = request.app
    who = app[AUTHENTICATE](request)
    check_length(request, app[SETTINGS])
    key = request.headers.get("Idempotency-Key")
    async with _upload_slot(app, who):
        meta, content, staged = await read_upload(request, settings=app[SETTINGS], store=app[STORE],
                                                  publisher=app[PUBLISHER], idempotency_key=key,
                                                  correction_of=correction_of)  # fmt: skip
        app[HELD][content.sha256] += 1
        try:
            publisher = app[PUBLISHER]
            if correction_of is None:
                result = await publisher.publish(meta, content, idempotency_key=key)
            else:
                result = await publisher.correct(correction_of, meta, content, idempotency_key=key)
        except PartialDelivery:
            raise  # recorded and signed: the content is referenced
        except EvidenceHubError:
            if staged.created:  # refused after all (a concurrent request won a race): keep nothing it uploaded
                await _forget(app, content.sha256)
            raise
        finally:
            app[HELD][content.sha256] -= 1
            if app[HELD][content.sha256] <= 0:
                del app[HELD][content.sha256]
    log.info("%s %s %s v%s as %s", who, "corrected" if correction_of else "published", result.item_id,
             result.version, result.event_id)  # fmt: skip
    return _respond(result)


async def _forget(app: web.Application, sha256: str) -> None:
    """Remove content a refused request uploaded, unless another request holds it or an event references it."""
    if app[HELD][sha256] > 1:
        return
    try:
        if not await app[PUBLISHER].references(sha256):
            await app[STORE].remove(sha256)
    except InfrastructureError as exc:  # kept: it is unreferenced but harmless, and the same bytes may come back
        log.warning("could not remove unreferenced content %s: %s", sha256[:16], exc.detail)


async def post_evidence(request: web.Request) -> web.Response:
    return await _publish_upload(request, correction_of=None)


async def post_batch(request: web.Request) -> web.Response:
    """Several files, each its own event; one upload slot for the whole request."""
    app = request.app
    who = app[AUTHENTICATE](request)
    check_batch_length(request, app[SETTINGS])
    async with _upload_slot(app, who):
        items = await read_batch(request, settings=app[SETTINGS], store=app[STORE], publisher=app[PUBLISHER])

        @contextlib.contextmanager
        def hold(sha256: str) -> Iterator[None]:
            app[HELD][sha256] += 1
            try:
                yield
            finally:
                app[HELD][sha256] -= 1
                if app[HELD][sha256] <= 0:
                    del app[HELD][sha256]

        results = await publish_batch(items, publisher=app[PUBLISHER], hold=hold,
                                      forget=lambda sha: _forget(app, sha), instance=request.path)  # fmt: skip
    log.info("%s published a batch of %d: %d new, %d refused", who, len(results),
             sum(r["status"] == 201 for r in results), sum(r["status"] >= 400 for r in results))  # fmt: skip
    return web.json_response({"items": results})


async def post_correction(request: web.Request) -> web.Response:
    return await _publish_upload(request, correction_of=request.match_info["item_id"])


async def post_withdrawal(request: web.Request) -> web.Response:
    who = request.app[AUTHENTICATE](request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not 1 <= len(reason.strip()) <= 2000:
        raise ValidationFailed(
            "a withdrawal needs a reason", errors=[{"field": "reason", "message": "1 to 2000 characters"}]
        )
    result = await request.app[PUBLISHER].withdraw(
        request.match_info["item_id"], reason.strip(), idempotency_key=request.headers.get("Idempotency-Key")
    )
    log.info("%s withdrew %s", who, result.item_id)
    return _respond(result)


async def get_item(request: web.Request) -> web.Response:
    request.app[AUTHENTICATE](request)
    return web.json_response(await request.app[PUBLISHER].status(request.match_info["item_id"]))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Raises: NotReady naming why the publisher cannot publish right now (Kafka not answering, a delivery stuck,
    the state refused)."""
    outbox = request.app[PUBLISHER].outbox
    if not isinstance(outbox, Outbox):
        return web.json_response({"ready": True})
    status = outbox.readiness()
    if not status["ready"]:
        raise NotReady("; ".join(status["problems"]), **status)
    return web.json_response(status)


@web.middleware
async def close_unread_bodies(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:  # fmt: skip
    """A request answered before its body was read (refused up front) closes its connection: the rest of the body
    is never read, however large it claims to be."""
    response = await handler(request)
    if request.body_exists and not request.content.at_eof():
        response.force_close()
    return response


async def _load_registry(codec: AvroCodec, settings: PublisherSettings, bootstrap: Kafka) -> KeyRegistry:
    registry = KeyRegistry(codec, anchors=settings.trust_anchors())
    registry.apply_all(r.value for r in await read_to_end(bootstrap, KEYS_TOPIC) if r.value is not None)
    return registry


async def _relay(app: web.Application) -> None:
    """Every few seconds: deliver whatever the outbox still holds, check that Kafka answers (``/readyz``), re-read
    ``hub.keys`` so that a revocation stops this publisher from signing within one interval, and remove temporary
    files no upload uses. Store and Kafka errors are retried on the next turn, never fatal."""
    publisher, settings, store = app[PUBLISHER], app[SETTINGS], app[STORE]
    outbox = publisher.outbox if isinstance(publisher.outbox, Outbox) else None
    swept = time.monotonic()
    while True:
        if outbox is not None:
            await outbox.check_kafka()
        try:
            delivered = await publisher.deliver_pending()
            if delivered:
                log.info("outbox relay delivered %d envelopes", delivered)
        except InfrastructureError as exc:  # a lock held elsewhere, a disk error: the next turn retries
            log.warning("outbox relay: %s; retrying in %.0fs", exc.detail, settings.relay_interval_s)
        if app[OWN_REGISTRY] and settings.kafka.bootstrap:
            try:
                publisher.registry = await _load_registry(publisher.codec, settings, settings.kafka.connection())
            except KafkaUnavailable as exc:  # keep the registry we have; Kafka may be back next time
                log.warning("could not refresh the key registry: %s", exc.detail)
        if time.monotonic() - swept > SWEEP_EVERY_S:
            swept = time.monotonic()
            await store.sweep(older_than_s=SWEEP_OLDER_THAN_S)
        await asyncio.sleep(settings.relay_interval_s)


async def _retrying(what: str, deadline: float, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` until it succeeds or ``deadline`` (monotonic) passes: Kafka may still be coming up.

    Raises: the last KafkaUnavailable once the deadline has passed.
    """
    delay = 0.5
    while True:
        try:
            return await attempt()
        except KafkaUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; retrying in %.1fs", what, exc.detail, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _check_pending(committer: GroupCommitter, codec: AvroCodec, signer: SigningKey) -> None:
    """Raises: StateRefused if an envelope waiting to be sent no longer carries this key's valid signature
    (damaged bytes the integrity check cannot see)."""
    rows = await committer.run(lambda conn: state.pending(conn, 1_000_000))
    for row in rows:
        if row.key_id == signer.key_id and not intact(codec, signer.public, row.topic, row.sequence, row.envelope):
            raise StateRefused(f"publisher state is damaged: the envelope of event {row.event_id} for {row.topic} "
                               f"(sequence {row.sequence}) no longer verifies; restore a backup or recover "
                               "(docs/operations.md)")  # fmt: skip


async def _own_resources(app: web.Application) -> AsyncIterator[None]:
    """Data directory, SQLite state, Kafka fences, key registry and content store, when not injected (tests and
    bench inject them). In this order, each refusing to start rather than sign with something wrong: the data
    directory is locked (one process); the state passes ``PRAGMA integrity_check`` and its own invariants; Kafka
    answers (retried up to the start-up timeout); the key is trusted; each topic's fence is taken and what the key
    signed there is established from Kafka — a state that is behind Kafka is refused."""
    settings = app[SETTINGS]
    if PUBLISHER in app:
        yield
        return
    if not settings.kafka.bootstrap:
        raise ConfigurationError("EVHUB_KAFKA_BOOTSTRAP is required to run the publisher")
    bootstrap = settings.kafka.connection()  # with the publisher's client certificate on a locked-down cluster
    deadline = time.monotonic() + settings.startup_timeout_s
    codec, signer = AvroCodec.load(), settings.signing_key()
    datadir = DataDir(settings.data_dir)
    datadir.lock()
    outbox: Outbox | None = None
    try:
        if datadir.state.is_file():
            seconds = await asyncio.to_thread(state.check, datadir.state)
            log.info("integrity check of %s (%d bytes): %.2fs", datadir.state, datadir.state.stat().st_size, seconds)
        committer = GroupCommitter(state.connect(datadir.state), timeout=settings.store_timeout_s)
        try:
            await _check_pending(committer, codec, signer)

            async def prepare() -> KeyRegistry:
                # only the topics it uses: on a locked-down cluster it may not even see the others (kafka_acls)
                used = [s for s in hub_topics(settings.jurisdictions)
                        if s.name == KEYS_TOPIC or s.name.startswith(EVIDENCE_PREFIX)]  # fmt: skip
                await ensure_hub_topics(bootstrap, used, kafka=settings.kafka)
                return await _load_registry(codec, settings, bootstrap)

            registry = await _retrying("Kafka at start-up", deadline, prepare)
            organisation = registry.organisation_of(signer.key_id)
            registry.check_can_sign(signer.key_id, datetime.now(UTC), organisation=organisation)
            outbox = Outbox(
                key=signer.public, codec=codec, committer=committer,
                topics=[evidence_topic(j) for j in settings.jurisdictions],
                settings=OutboxSettings(
                    bootstrap=bootstrap, delivery_timeout_s=settings.delivery_timeout_s,
                    transaction_timeout_s=settings.transaction_timeout_s,
                    request_timeout_ms=settings.kafka.request_timeout_ms,
                    establish_timeout_s=settings.startup_timeout_s,
                ),
            )  # fmt: skip
            outbox.on_fatal = lambda exc: _stop(app, exc)
            await outbox.start(timeout_s=max(1.0, deadline - time.monotonic()))
            if STORE not in app:
                app[STORE] = LocalContentStore(datadir.content)
            await app[STORE].sweep()  # at start nothing is uploading: every temporary file is a leftover
            app[OWN_REGISTRY] = True
            app[PUBLISHER] = EvidencePublisher(
                codec=codec, signer=signer, outbox=outbox, committer=committer, organisation=organisation,
                jurisdictions=settings.jurisdictions, registry=registry,
            )  # fmt: skip
            yield
        finally:
            if outbox is not None:
                await outbox.stop(settings.shutdown_grace_s * 0.4)
            committer.close()
    finally:
        datadir.unlock()


async def _begin_shutdown(app: web.Application) -> None:
    """SIGTERM: requests waiting for Kafka are answered at once (503 naming what is not acknowledged)."""
    log.info("shutting down: waiting requests are answered now")
    if PUBLISHER in app:
        app[PUBLISHER].outbox.begin_shutdown()


def _stop(app: web.Application, exc: EvidenceHubError) -> None:
    log.critical("stopping the service: %s", exc.detail)
    app[FATAL].append(exc)
    app[STOP].set()


async def _relay_task(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_relay(app), name="outbox-relay")

    def crashed(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.critical("outbox relay crashed: %r; stopping the service", t.exception())
            app[CRASHED].append(repr(t.exception()))
            app[STOP].set()  # the service shuts down gracefully; __main__ exits non-zero

    task.add_done_callback(crashed)
    yield
    log.info("shutting down: the outbox relay stops")
    task.remove_done_callback(crashed)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: PublisherSettings, *, publisher: EvidencePublisher | None = None, store: ContentStore | None = None,
    authenticate: Callable[[web.Request], str] | None = None,
) -> web.Application:  # fmt: skip
    """The one composition root. Injected parts (tests, bench) replace the ones built from settings."""
    middlewares: list[Middleware] = [close_unread_bodies, problem_middleware]
    if settings.kafka.bootstrap:  # no publication is taken while Kafka lacks the in-sync replicas to keep it
        topics = [evidence_topic(j) for j in settings.jurisdictions]
        middlewares.append(kafka_outage_middleware(settings.kafka.connection(), topics))
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[CRASHED] = []
    app[FATAL] = []
    app[STOP] = asyncio.Event()
    app[OWN_REGISTRY] = False
    app[UPLOADS] = Counter()
    app[HELD] = Counter()
    if publisher is not None:
        app[PUBLISHER] = publisher
    if store is not None:
        app[STORE] = store
    if authenticate is None:
        files = settings.tls_files()
        authenticate = _unsafe_anonymous if files is None else mtls_identity(settings.allowed_clients)
    app[AUTHENTICATE] = authenticate
    app.cleanup_ctx.extend([_own_resources, _relay_task])
    app.on_shutdown.append(_begin_shutdown)
    app.router.add_post("/v1/evidence", post_evidence)
    app.router.add_post("/v1/evidence/batch", post_batch)
    app.router.add_post("/v1/evidence/{item_id}/corrections", post_correction)
    app.router.add_post("/v1/evidence/{item_id}/withdrawal", post_withdrawal)
    app.router.add_get("/v1/evidence/{item_id}", get_item)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
