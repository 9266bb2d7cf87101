"""The publisher's HTTP shell (aiohttp): documentation-group clients upload evidence over mTLS.

Routes (all errors are RFC 9457 problem+json):
    POST /v1/evidence                          multipart: part ``metadata`` (JSON) then part ``file`` → 201
    POST /v1/evidence/{item_id}/corrections    same form; a new version naming the one it replaces → 201
    POST /v1/evidence/{item_id}/withdrawal     JSON {"reason": …} → 201
    GET  /v1/evidence/{item_id}                versions, deliveries, withdrawal
    GET  /healthz
A repeated request (same ``Idempotency-Key``) answers 200 with the original result and ``Idempotent-Replayed``.
Corrections require an ``Idempotency-Key``. An optional ``Repr-Digest: sha-256=:…:`` (RFC 9530) makes the service
refuse a file whose bytes are not the ones the client hashed.

Owns: reading the upload as a stream (metadata validated before a file byte is stored; the file hashed and
checked against its declared media type before it is committed), composing the service in :func:`create_app`,
and the outbox relay task. Publishing itself is ``pipeline.EvidencePublisher``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Middleware

from services.publisher import core, state
from services.publisher.pipeline import ContentInfo, EvidencePublisher
from services.publisher.settings import PublisherSettings
from services.shared.avro import AvroCodec
from services.shared.content import ContentStore, LocalContentStore
from services.shared.errors import ConfigurationError, Forbidden, KafkaUnavailable, PayloadTooLarge, ValidationFailed
from services.shared.filenames import check_file_name
from services.shared.http import kafka_outage_middleware, peer_common_name, problem_middleware
from services.shared.kafka import (
    EVIDENCE_PREFIX,
    KEYS_TOPIC,
    ensure_hub_topics,
    evidence_topic,
    hub_topics,
    make_producer,
    read_to_end,
)
from services.shared.kafka_connection import Kafka
from services.shared.media import sniff
from services.shared.registry import KeyRegistry

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", PublisherSettings)
PUBLISHER = web.AppKey("publisher", EvidencePublisher)
STORE = web.AppKey("store", ContentStore)
Authenticator = Callable[[web.Request], str]
AUTHENTICATE: web.AppKey[Authenticator] = web.AppKey("authenticate")
CRASHED = web.AppKey("crashed", list[str])
OWN_REGISTRY = web.AppKey("own_registry", bool)  # built from settings (and so refreshed), not injected
CHUNK = 1 << 20


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


async def _read_metadata(part: BodyPartReader, limit: int) -> core.EvidenceMetadata:
    data = bytearray()
    while chunk := await part.read_chunk(64 << 10):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"metadata is larger than {limit} bytes")
    return core.parse_metadata(bytes(data))


async def _read_upload(request: web.Request) -> tuple[core.EvidenceMetadata, ContentInfo]:
    settings, store = request.app[SETTINGS], request.app[STORE]
    if not request.content_type.startswith("multipart/"):
        raise ValidationFailed("send multipart/form-data: a 'metadata' part (JSON), then a 'file' part",
                               errors=[{"field": "(body)", "message": f"got {request.content_type}"}])  # fmt: skip
    reader = await request.multipart()
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "metadata":
        raise ValidationFailed(
            "the first part must be 'metadata'", errors=[{"field": "metadata", "message": "missing"}]
        )
    meta = await _read_metadata(part, settings.max_metadata_bytes)
    core.check_jurisdictions(meta, settings.jurisdictions)
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "file":
        raise ValidationFailed("the second part must be 'file'", errors=[{"field": "file", "message": "missing"}])
    file_part = part
    name = meta.file_name or (check_file_name(part.filename, field="file.filename") if part.filename else None)
    detected: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await file_part.read_chunk(CHUNK):
            yield chunk

    def accept(head: bytes) -> None:
        detected.append(core.check_media_type(meta, sniff(head)))

    announced = repr_digest_sha256(request.headers.get("Repr-Digest"))
    stored = await store.put(chunks(), max_size=settings.max_file_bytes, accept=accept, expected_sha256=announced)
    return meta, ContentInfo(sha256=stored.sha256, size=stored.size, media_type=detected[0],
                             file_name=name or stored.sha256)  # fmt: skip


def repr_digest_sha256(header: str | None) -> str | None:
    """The SHA-256 (hex) of an RFC 9530 ``Repr-Digest: sha-256=:<base64>:`` header; None without one.

    Raises:
        ValidationFailed: the header is present but has no well-formed sha-256 member.
    """
    if header is None:
        return None
    for member in header.split(","):
        name, _, value = member.strip().partition("=")
        if name.strip().lower() == "sha-256" and value.startswith(":") and value.endswith(":"):
            try:
                raw = base64.b64decode(value[1:-1], validate=True)
            except ValueError:
                break
            if len(raw) == 32:
                return raw.hex()
    raise ValidationFailed("Repr-Digest must carry sha-256=:<base64 of 32 bytes>: (RFC 9530)",
                           errors=[{"field": "Repr-Digest", "message": "no valid sha-256 member"}])  # fmt: skip


def _respond(result: Any) -> web.Response:
    response = web.json_response(result.to_json(), status=200 if result.replayed else 201)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def post_evidence(request: web.Request) -> web.Response:
    who = request.app[AUTHENTICATE](request)
    meta, content = await _read_upload(request)
    result = await request.app[PUBLISHER].publish(meta, content, idempotency_key=request.headers.get("Idempotency-Key"))
    log.info("%s published %s v%s as %s", who, result.item_id, result.version, result.event_id)
    return _respond(result)


async def post_correction(request: web.Request) -> web.Response:
    who = request.app[AUTHENTICATE](request)
    meta, content = await _read_upload(request)
    result = await request.app[PUBLISHER].correct(
        request.match_info["item_id"], meta, content, idempotency_key=request.headers.get("Idempotency-Key")
    )
    log.info("%s corrected %s to v%s", who, result.item_id, result.version)
    return _respond(result)


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


async def _load_registry(codec: AvroCodec, settings: PublisherSettings, bootstrap: Kafka) -> KeyRegistry:
    registry = KeyRegistry(codec, anchors=settings.trust_anchors())
    registry.apply_all(r.value for r in await read_to_end(bootstrap, KEYS_TOPIC) if r.value is not None)
    return registry


async def _relay(app: web.Application) -> None:
    """Every few seconds: deliver whatever the outbox still holds, and re-read ``hub.keys`` so that a revocation
    stops this publisher from signing within one interval. A crash here stops the service loudly (create_app)."""
    publisher, settings = app[PUBLISHER], app[SETTINGS]
    while True:
        delivered = await publisher.deliver_pending()
        if delivered:
            log.info("outbox relay delivered %d envelopes", delivered)
        if app[OWN_REGISTRY] and settings.kafka.bootstrap:
            try:
                publisher.registry = await _load_registry(publisher.codec, settings, settings.kafka.connection())
            except KafkaUnavailable as exc:  # keep the registry we have; Kafka may be back next time
                log.warning("could not refresh the key registry: %s", exc.detail)
        await asyncio.sleep(settings.relay_interval_s)


async def _own_resources(app: web.Application) -> AsyncIterator[None]:
    """Kafka producer, SQLite state, key registry and content store, when not injected (tests, bench inject)."""
    settings = app[SETTINGS]
    if PUBLISHER in app:
        yield
        return
    if not settings.kafka.bootstrap:
        raise ConfigurationError("EVHUB_KAFKA_BOOTSTRAP is required to run the publisher")
    kafka = settings.kafka.connection()  # with the publisher's client certificate on a locked-down cluster
    codec, signer = AvroCodec.load(), settings.signing_key()
    # only the topics it uses: on a locked-down cluster it may not even see the others (kafka_acls)
    used = [s for s in hub_topics(settings.jurisdictions) if s.name == KEYS_TOPIC or s.name.startswith(EVIDENCE_PREFIX)]
    await ensure_hub_topics(kafka, used, kafka=settings.kafka)
    registry = await _load_registry(codec, settings, kafka)
    app[OWN_REGISTRY] = True
    producer = make_producer(kafka, client_id="evhub-publisher", request_timeout_ms=settings.kafka.request_timeout_ms)
    await producer.start()
    committer = state.GroupCommitter(state.connect(settings.data_dir / "publisher.sqlite3"))
    try:
        app[STORE] = LocalContentStore(settings.data_dir / "content")
        app[PUBLISHER] = EvidencePublisher(
            codec=codec, signer=signer, producer=producer, committer=committer,
            organisation=registry.organisation_of(signer.key_id),
            jurisdictions=settings.jurisdictions, registry=registry,
        )  # fmt: skip
        publisher = app[PUBLISHER]  # fail closed: never start signing with a key receivers would refuse
        registry.check_can_sign(signer.key_id, publisher.clock(), organisation=publisher.organisation)
        yield
    finally:
        await producer.stop()
        committer.close()


async def _relay_task(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_relay(app), name="outbox-relay")

    def crashed(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.critical("outbox relay crashed: %r; stopping the service", t.exception())
            app[CRASHED].append(repr(t.exception()))
            os.kill(os.getpid(), signal.SIGTERM)  # run_app shuts down gracefully; __main__ exits non-zero

    task.add_done_callback(crashed)
    yield
    task.remove_done_callback(crashed)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: PublisherSettings, *, publisher: EvidencePublisher | None = None, store: ContentStore | None = None,
    authenticate: Callable[[web.Request], str] | None = None,
) -> web.Application:  # fmt: skip
    """The one composition root. Injected parts (tests, bench) replace the ones built from settings."""
    middlewares: list[Middleware] = [problem_middleware]
    if settings.kafka.bootstrap:  # no publication is taken while Kafka lacks the in-sync replicas to keep it
        topics = [evidence_topic(j) for j in settings.jurisdictions]
        middlewares.append(kafka_outage_middleware(settings.kafka.connection(), topics))
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[CRASHED] = []
    app[OWN_REGISTRY] = False
    if publisher is not None:
        app[PUBLISHER] = publisher
    if store is not None:
        app[STORE] = store
    if authenticate is None:
        files = settings.tls_files()
        authenticate = _unsafe_anonymous if files is None else mtls_identity(settings.allowed_clients)
    app[AUTHENTICATE] = authenticate
    app.cleanup_ctx.extend([_own_resources, _relay_task])
    app.router.add_post("/v1/evidence", post_evidence)
    app.router.add_post("/v1/evidence/{item_id}/corrections", post_correction)
    app.router.add_post("/v1/evidence/{item_id}/withdrawal", post_withdrawal)
    app.router.add_get("/v1/evidence/{item_id}", get_item)
    app.router.add_get("/healthz", healthz)
    return app
