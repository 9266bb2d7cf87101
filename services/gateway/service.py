"""The gateway's HTTP shell (aiohttp over mutual TLS 1.3): offices' feeds, items and downloads.

Routes (every error is RFC 9457 problem+json; the full contract is docs/gateway-api.md):
    GET /v1/feeds/{jurisdiction}                      long-poll JSON page (?cursor=&max=&wait=&purpose=), or
                                                      Server-Sent Events with ``Accept: text/event-stream``
                                                      (resume with ``Last-Event-ID``)
    GET /v1/items/{item_id}                           the latest version the office may see, with its history
    GET /v1/items/{item_id}/content/{sha256}          the bytes, with Range (206/416) and Repr-Digest
    GET /v1/keys                                      the key registry records (anchor-signed bytes) offices verify
                                                      events with, checked by each office against its own anchors
    GET /healthz                                      views, readers, dead letters, audit counters
Offices are named by their client certificate (``urn:evhub:office:<ID>``, ``services.shared.principals``); a
certificate naming no office is refused with 403, a connection without a certificate from the configured CA
never completes the handshake.

Owns: the composition root (:func:`create_app`), the background tasks (followers of ``hub.keys`` and
``hub.policy``, one live reader per evidence topic), request parsing, and writing pages and bytes only after the
operation (``gateway.Gateway``) returned — which is after the audit acknowledgement.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from services.gateway import sse
from services.gateway.audit import AuditWriter
from services.gateway.gateway import Gateway
from services.gateway.ranges import parse_range
from services.gateway.reader import CatchUp, DeadLetters, TopicReader
from services.gateway.release import Requester
from services.gateway.settings import GatewaySettings
from services.gateway.store import GatewayStore
from services.policy.engine import PolicyStore
from services.policy.state import PolicyState
from services.policy.version import trusted_keys
from services.shared.avro import AvroCodec
from services.shared.content import ContentStore, LocalContentStore
from services.shared.errors import (
    ConfigurationError,
    EvidenceHubError,
    Forbidden,
    InfrastructureError,
    NotFound,
    RangeNotSatisfiable,
    ValidationFailed,
)
from services.shared.follower import TopicFollower
from services.shared.http import Handler, problem, problem_middleware
from services.shared.kafka import TopicSpec, ensure_hub_topics, evidence_topic, hub_topics, make_producer
from services.shared.keys import PublicKey
from services.shared.principals import Principal, principal_from_der
from services.shared.registry import KeyRegistry

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("gateway_settings", GatewaySettings)
CONTENT = web.AppKey("gateway_content", ContentStore)
FAILED = web.AppKey("gateway_failed", list[str])
CRASHED = web.AppKey("gateway_crashed", asyncio.Event)
#: The newest ``hub.keys`` record the gateway's registry accepted, per key id, as the bytes read from Kafka.
KEY_RECORDS = web.AppKey("gateway_key_records", dict[str, bytes])
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PURPOSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
CHUNK: Final = 1 << 20


class RandomIds:
    """UUID4 strings for audit entries (the offices' receipts), drawing the randomness for 256 of them at a time:
    one ``os.urandom`` call per id cost ~8 µs of every delivered record."""

    def __init__(self, *, batch: int = 256) -> None:
        self._batch, self._pool, self._at = batch, b"", 0

    def __call__(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(16 * self._batch), 0
        raw = self._pool[self._at : self._at + 16]
        self._at += 16
        return str(uuid.UUID(bytes=raw, version=4))


def principal_of(request: web.Request) -> Principal:
    """Raises: Forbidden unless the verified client certificate names exactly one hub principal."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise Forbidden("a client certificate naming an office is required")
    return principal_from_der(der)


def requester(request: web.Request) -> Requester:
    """The office asking, from its certificate. Raises: Forbidden for anyone but an office; ValidationFailed for
    a malformed purpose."""
    principal = principal_of(request)
    if principal.kind != "office":
        raise Forbidden(f"{principal.uri} is not an office")
    purpose = request.query.get("purpose")
    if purpose is not None and not _PURPOSE.fullmatch(purpose):
        raise ValidationFailed("purpose: 1 to 64 letters, digits, spaces, . _ -")
    supplied = request.headers.get("X-Request-Id", "")
    request_id = supplied if _TOKEN.fullmatch(supplied) else str(uuid.uuid4())
    return Requester(principal=principal, request_id=request_id, gateway=request.app[SETTINGS].instance,
                     purpose=purpose)  # fmt: skip


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ValidationFailed(f"{name} must be an integer from {low} to {high}",
                               errors=[{"field": name, "message": f"{low}..{high}"}])  # fmt: skip
    return int(raw)


def _seconds(request: web.Request, name: str, high: float) -> float:
    raw = request.query.get(name, "0")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= high:
        raise ValidationFailed(f"{name} must be a number of seconds from 0 to {high:g}",
                               errors=[{"field": name, "message": f"0..{high:g}"}])  # fmt: skip
    return value


def _jurisdiction(request: web.Request) -> str:
    jurisdiction = request.match_info["jurisdiction"]
    try:
        evidence_topic(jurisdiction)
    except ConfigurationError as exc:
        raise NotFound(f"no feed for {jurisdiction!r} here") from exc
    return jurisdiction


async def feed(request: web.Request) -> web.StreamResponse:
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await feed_events(request)
    gateway, settings = request.app[GATEWAY], request.app[SETTINGS]
    who, jurisdiction = requester(request), _jurisdiction(request)
    limit = _int(request, "max", settings.default_batch, 1, settings.max_batch)
    wait_s = _seconds(request, "wait", settings.max_wait_s)
    cursor = gateway.cursor(request.query.get("cursor") or None, office=who.principal.name, jurisdiction=jurisdiction)
    page = await gateway.feed(who, jurisdiction, cursor, limit=limit, wait_s=wait_s)
    # the events are JSON text already (rendered once per record and view): the page is assembled, not re-encoded
    body = (f'{{"jurisdiction":{json.dumps(jurisdiction)},"events":[{",".join(e.json for e in page.events)}],'
            f'"cursor":{json.dumps(page.cursor)},"caught_up":{json.dumps(page.caught_up)}}}')  # fmt: skip
    return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})


async def feed_events(request: web.Request) -> web.StreamResponse:
    """SSE: everything that can be refused is refused as an HTTP status before the stream starts; afterwards a
    failure ends the stream with an ``error`` event (the client resumes with ``Last-Event-ID``)."""
    gateway, settings = request.app[GATEWAY], request.app[SETTINGS]
    who, jurisdiction = requester(request), _jurisdiction(request)
    limit = _int(request, "max", settings.default_batch, 1, settings.max_batch)
    text = request.headers.get("Last-Event-ID") or request.query.get("cursor") or None
    cursor = gateway.cursor(text, office=who.principal.name, jurisdiction=jurisdiction)
    page = await gateway.feed(who, jurisdiction, cursor, limit=limit)  # refusals are still HTTP statuses here
    response = EventSourceResponse(ping_interval=settings.sse_ping_s, send_timeout=settings.sse_send_timeout_s,
                                   headers={"Cache-Control": "no-store"})  # fmt: skip
    await response.prepare(request)
    office = who.principal.name
    writing: asyncio.Task[None] | None = None

    async def send(frames: bytes) -> None:
        async with asyncio.timeout(settings.sse_send_timeout_s):  # a stalled client is dropped
            await response.write(frames)

    try:
        while True:
            frames = b"".join(sse.frame_json(e.type, e.json, event_id=e.cursor) for e in page.events)
            following = gateway.cursor(page.cursor, office=office, jurisdiction=jurisdiction)
            if not page.events and following.positions != cursor.positions:  # passed only rejected records
                frames = sse.frame("checkpoint", {"type": "checkpoint", "cursor": page.cursor}, event_id=page.cursor)
            cursor = following
            if writing is not None:
                await writing  # pages go out one at a time, in order
                writing = None
            if frames:
                writing = asyncio.create_task(send(frames))
            # the next page is decided and audited (write-ahead, as always) while this one drains to the client
            page = await gateway.feed(who, jurisdiction, cursor, limit=limit, wait_s=settings.sse_ping_s)
    except EvidenceHubError as exc:
        body = {"type": "error", "status": exc.http_status, "title": exc.title, "detail": exc.detail}
        if exc.retriable:
            body["retry_after"] = settings.retry_after_s
        with contextlib.suppress(Exception):
            if writing is not None:
                await writing
            await response.write(sse.frame("error", body))
    except TimeoutError:  # the client stopped reading: drop it (it resumes from its Last-Event-ID)
        log.info("SSE subscriber %s on %s too slow; disconnected", office, jurisdiction)
        if request.transport is not None:
            request.transport.abort()
    except (ConnectionResetError, RuntimeError) as exc:  # gone, or written after EOF
        log.info("SSE subscriber %s on %s dropped: %r", office, jurisdiction, exc)
    finally:
        if writing is not None:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)  # its failure is moot now; ours propagates
        with contextlib.suppress(Exception):
            response.stop_streaming()
    return response


def _office_jurisdiction(gateway: Gateway, office: str, requested: str | None) -> str:
    if requested is not None:
        return requested
    version = gateway.policy.store.in_force(gateway.clock())
    known = None if version is None else version.offices.get(office)
    if known is None:
        raise Forbidden(f"{office} is not an office of the policy in force")
    return known.jurisdiction


def _item_id(request: web.Request) -> str:
    item_id = request.match_info["item_id"]
    if not _TOKEN.fullmatch(item_id):
        raise NotFound("no such item")
    return item_id


async def get_item(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    who = requester(request)
    item_id = _item_id(request)
    jurisdiction = _office_jurisdiction(gateway, who.principal.name, request.query.get("jurisdiction"))
    body = await gateway.item(who, item_id, jurisdiction)
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def get_content(request: web.Request) -> web.StreamResponse:
    gateway, store = request.app[GATEWAY], request.app[CONTENT]
    who = requester(request)
    item_id, sha256 = _item_id(request), request.match_info["sha256"]
    jurisdiction = _office_jurisdiction(gateway, who.principal.name, request.query.get("jurisdiction"))
    try:
        wanted = request.headers.get("Range")
        grant = await gateway.download(who, item_id, sha256, jurisdiction, size_of=store.size,
                                       byte_range=lambda size: parse_range(wanted, size))  # fmt: skip
    except RangeNotSatisfiable as exc:
        response = problem(416, exc.title, exc.detail, type_slug=exc.type_slug, instance=request.path)
        response.headers["Content-Range"] = f"bytes */{exc.extensions.get('size', 0)}"
        return response
    last = grant.size - 1 if grant.last is None else grant.last
    length = max(0, last - grant.first + 1)
    headers = {
        "Content-Type": grant.media_type, "Content-Length": str(length), "Accept-Ranges": "bytes",
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(sha256)).decode()}:", "ETag": f'"{sha256}"',
        "Content-Disposition": f"attachment; filename*=UTF-8''{_quote(grant.file_name)}",
        "Evidence-Receipt": grant.receipt, "Cache-Control": "no-store",
        "Evidence-Audit": f"{grant.audit.topic};partition={grant.audit.partition};offset={grant.audit.offset};"
                          f"index={grant.audit.index}",
    }  # fmt: skip
    status = 200
    if grant.last is not None:
        status, headers["Content-Range"] = 206, f"bytes {grant.first}-{last}/{grant.size}"
    stream = web.StreamResponse(status=status, headers=headers)
    await stream.prepare(request)
    remaining = length
    async for chunk in store.read(sha256, offset=grant.first):
        if remaining <= 0:
            break
        await stream.write(chunk[:remaining])
        remaining -= min(len(chunk), remaining)
    await stream.write_eof()
    return stream


def _quote(name: str) -> str:
    return quote(name, safe="")


async def key_records(request: web.Request) -> web.Response:
    """The key registry as offices need it: each record exactly as read from ``hub.keys`` (signed by a trust
    anchor over those bytes), the newest accepted revision per key. Offices verify them with their own anchors;
    nothing here asks them to trust the gateway."""
    principal_of(request)  # any hub principal: the records are public keys, signed
    gateway = request.app.get(GATEWAY)
    if gateway is None:
        raise InfrastructureError("the gateway is starting")
    gateway.keys_follower.check_fresh(request.app[SETTINGS].max_view_age_s)
    records = [base64.b64encode(r).decode("ascii") for r in request.app[KEY_RECORDS].values()]
    body = {"records": records, "keys_age_s": gateway.keys_follower.age()}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    body: dict[str, Any] = {
        "status": "ok", "instance": request.app[SETTINGS].instance,
        "views": {"keys_age_s": gateway.keys_follower.age(),
                  "policy_age_s": None if gateway.policy.follower is None else gateway.policy.follower.age()},
        "readers": {j: {"positions": {str(p): r.position(p) for p in r.partitions}, "verified": r.verified,
                        "rejected": len(r.rejected)} for j, r in gateway.readers.items()},
        "dead_letters": dict(request.app[DEADLETTERS].counts), "catch_up_reads": gateway.catchup.reads,
        "audit": {"batches": gateway.audit.batches, "entries": gateway.audit.entries,
                  "failures": gateway.audit.failures},
        **gateway.counters,
    }  # fmt: skip
    try:
        gateway.check_ready()
        if not all(r.ready.is_set() for r in gateway.readers.values()):
            raise InfrastructureError("the evidence readers are starting")
    except EvidenceHubError as exc:
        return web.json_response({**body, "status": "unavailable", "detail": exc.detail}, status=503,
                                 headers={"Retry-After": str(request.app[SETTINGS].retry_after_s)})  # fmt: skip
    return web.json_response(body)


DEADLETTERS = web.AppKey("gateway_deadletters", DeadLetters)


@web.middleware
async def retry_after(request: web.Request, handler: Handler) -> web.StreamResponse:
    """503s carry the configured Retry-After (problem_middleware's default is 5 s)."""
    response = await handler(request)
    if isinstance(response, web.Response) and response.status == 503:
        response.headers["Retry-After"] = str(request.app[SETTINGS].retry_after_s)
    return response


def gateway_topics(settings: GatewaySettings) -> list[TopicSpec]:
    """The hub's topics under the names this gateway is configured with (created idempotently at start)."""
    topics = hub_topics(settings.jurisdictions)
    renamed = {"hub.keys": settings.keys_topic, "hub.policy": settings.policy_topic,
               "hub.audit": settings.audit_topic, "hub.deadletter": settings.deadletter_topic}  # fmt: skip
    return [TopicSpec(renamed.get(t.name, t.name), t.partitions, t.config) for t in topics]


def create_app(
    settings: GatewaySettings, *, bootstrap: str | None = None, anchors: Sequence[PublicKey] | None = None,
    admin_keys: Sequence[PublicKey] | None = None, clock: Clock | None = None, content: ContentStore | None = None,
) -> web.Application:  # fmt: skip
    """The one composition root. ``anchors``/``admin_keys`` override the PEM files named in settings (tests).

    Raises:
        ConfigurationError: no Kafka bootstrap, no trust anchor, no policy-admin key, or no cursor key.
    """
    bootstrap = bootstrap or settings.kafka.bootstrap
    if not bootstrap:
        raise ConfigurationError("the gateway needs a Kafka bootstrap (EVHUB_KAFKA_BOOTSTRAP)")
    codec = AvroCodec.load()
    registry = KeyRegistry(codec, anchors=list(anchors) if anchors is not None else settings.trust_anchors())
    trusted = trusted_keys(tuple(admin_keys) if admin_keys is not None else tuple(settings.admin_keys()))
    cursor_keys = settings.cursor_key_set()
    policy = PolicyState.create(PolicyStore(trusted=trusted), cache_size=settings.decision_cache)
    app = web.Application(middlewares=[retry_after, problem_middleware])
    app[SETTINGS] = settings
    app[FAILED] = []
    app[CRASHED] = asyncio.Event()
    app[CONTENT] = content if content is not None else LocalContentStore(settings.content_dir)
    app[KEY_RECORDS] = {}

    def apply_key(record: Any) -> None:
        try:
            entry = registry.apply(record.value or b"")
            app[KEY_RECORDS][entry.key.key_id] = record.value or b""
        except EvidenceHubError as exc:
            log.error("key record %s[%d]@%d refused: %s", record.topic, record.partition, record.offset, exc.detail)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await ensure_hub_topics(bootstrap, gateway_topics(settings), kafka=settings.kafka)
        store = GatewayStore(settings.data_dir / "gateway.sqlite3")
        keys_follower = TopicFollower(bootstrap=bootstrap, topic=settings.keys_topic, client_id="evhub-gateway-keys",
                                      on_record=apply_key)  # fmt: skip
        policy.follow(bootstrap=bootstrap, topic=settings.policy_topic, client_id="evhub-gateway-policy")
        dlq_producer = make_producer(bootstrap, client_id="evhub-gateway-deadletter")
        audit = AuditWriter(bootstrap=bootstrap, topic=settings.audit_topic, gateway=settings.instance, codec=codec,
                            timeout_s=settings.audit_timeout_s, client_id="evhub-gateway-audit")  # fmt: skip
        catchup = CatchUp(bootstrap=bootstrap, codec=codec, keys=registry, concurrency=settings.catchup_concurrency,
                          client_id="evhub-gateway-catchup")  # fmt: skip
        tasks: list[asyncio.Task[None]] = []
        try:
            await dlq_producer.start()
            deadletters = DeadLetters(dlq_producer, topic=settings.deadletter_topic)
            app[DEADLETTERS] = deadletters
            readers = {
                j: TopicReader(topic=evidence_topic(j), bootstrap=bootstrap, codec=codec, keys=registry,
                               keys_follower=keys_follower, store=store, deadletters=deadletters,
                               tail_records=settings.tail_records, client_id=f"evhub-gateway-{j}")
                for j in settings.jurisdictions
            }  # fmt: skip
            for reader in readers.values():
                await reader.load()
            await audit.start()
            app[GATEWAY] = Gateway(
                codec=codec, registry=registry, keys_follower=keys_follower, policy=policy, store=store,
                readers=readers, catchup=catchup, audit=audit, cursor_keys=cursor_keys,
                clock=clock or (lambda: datetime.now(UTC)), new_id=RandomIds(),
                instance=settings.instance, max_view_age_s=settings.max_view_age_s, failures=app[FAILED],
            )  # fmt: skip
            assert policy.follower is not None

            async def read_after_keys(reader: TopicReader) -> None:
                await keys_follower.caught_up.wait()  # verify nothing before the registry was replayed
                await reader.run()

            jobs: dict[str, Coroutine[Any, Any, None]] = {
                "keys-follower": keys_follower.run(), "policy-follower": policy.follower.run(),
                **{f"reader-{j}": read_after_keys(r) for j, r in readers.items()},
            }  # fmt: skip
            for name, job in jobs.items():
                task = asyncio.create_task(job, name=name)
                task.add_done_callback(_crash_reporter(app, name))
                tasks.append(task)
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await catchup.close()
            await audit.close()
            await dlq_producer.stop()
            store.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/feeds/{jurisdiction}", feed)
    app.router.add_get("/v1/items/{item_id}", get_item)
    app.router.add_get("/v1/items/{item_id}/content/{sha256:[0-9a-f]{64}}", get_content)
    app.router.add_get("/v1/keys", key_records)
    return app


def _crash_reporter(app: web.Application, name: str) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.critical("gateway task %s failed: %r", name, error)
            app[FAILED].append(f"{name}: {error!r}")
            app[CRASHED].set()

    return done
