"""The policy service's HTTP shell: decisions and version history over HTTP, versions from ``hub.policy``.

Owns: the composition root (:func:`create_app`), running the follower of ``hub.policy`` (``state.PolicyState``) as a
background task, the routes, and turning errors into RFC 9457 problem+json.

Routes:
    GET  /healthz                      200 once the topic has been replayed, 503 before or after a failure
    POST /v1/decisions                 {office, action, item | feed, at?, purpose?} → Decision
    GET  /v1/versions                  every accepted version (hash, author, effective_from, key id)
    GET  /v1/versions/in-force?at=T    the version in force at T (default: now)
    GET  /v1/versions/{hash}           one version with its policy text, schema and offices
    POST /v1/versions                  a signed version record: checked like the consumer would, then published

Does not own: decisions (``engine``), record format and signatures (``version``), Kafka details (``topic``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from services.policy.compiled import CompiledPolicy
from services.policy.engine import PolicyStore
from services.policy.model import FeedRef, ItemAttributes
from services.policy.settings import PolicySettings
from services.policy.state import PolicyState
from services.policy.topic import ensure_policy_topic
from services.policy.version import trusted_keys
from services.shared.errors import ConfigurationError, KafkaUnavailable, ValidationFailed
from services.shared.http import problem_middleware
from services.shared.kafka import make_producer
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


STATE = web.AppKey("policy_state", PolicyState)
PRODUCER = web.AppKey("policy_producer", AIOKafkaProducer)
SETTINGS = web.AppKey("policy_settings", PolicySettings)
CLOCK: web.AppKey[Clock] = web.AppKey("policy_clock")


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    office: str
    action: str
    item: ItemAttributes | None = None
    feed: FeedRef | None = None
    at: AwareDatetime | None = None
    purpose: str | None = None


async def _json_body(request: web.Request) -> bytes:
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ValidationFailed(f"request body over {limit} bytes")
    return await request.read()


def _summary(v: CompiledPolicy) -> dict[str, Any]:
    return {"hash": v.content_hash, "author": v.version.author,
            "effective_from": v.effective_from.isoformat(), "offices": sorted(v.offices)}  # fmt: skip


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    return web.json_response({"status": "ok", "versions": len(state.store.history()),
                              "rejected": dict(state.store.rejected)})  # fmt: skip


async def decide(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    try:
        body = DecisionRequest.model_validate_json(await _json_body(request))
    except ValidationError as exc:
        raise ValidationFailed("invalid decision request", errors=exc.errors(include_url=False)) from exc
    resource = body.item if body.item is not None else body.feed
    if resource is None or (body.item is not None and body.feed is not None):
        raise ValidationFailed("give exactly one of item and feed")
    at = body.at or request.app[CLOCK]()
    decision = state.engine.decide(body.office, body.action, resource, at, body.purpose)
    return web.json_response({**decision.model_dump(mode="json"), "at": at.isoformat()})


async def list_versions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    return web.json_response({"versions": [_summary(v) for v in state.store.history()]})


async def in_force(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    raw = request.query.get("at")
    try:
        at = datetime.fromisoformat(raw) if raw else request.app[CLOCK]()
    except ValueError as exc:
        raise ValidationFailed(f"not an ISO 8601 time: {raw!r}") from exc
    if at.tzinfo is None:
        raise ValidationFailed("the time must carry a time zone, e.g. 2026-01-31T12:00:00Z")
    version = state.store.in_force(at)
    return web.json_response({"at": at.isoformat(), "version": None if version is None else _summary(version)})


async def get_version(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.ready()
    v = state.store.get(request.match_info["hash"])
    body = {**_summary(v), "policy_text": v.version.policy_text, "schema_text": v.version.schema_text,
            "offices": [o.model_dump(mode="json") for o in v.version.offices]}  # fmt: skip
    return web.json_response(body)


async def post_version(request: web.Request) -> web.Response:
    """Check a signed record exactly as the consumer will (signature, Cedar, ordering, not back-dated), then
    publish it."""
    state = request.app[STATE]
    state.ready()
    data = await _json_body(request)
    checked = state.store.check_record(data, appended_at=request.app[CLOCK]())  # the record is appended now
    settings = request.app[SETTINGS]
    try:
        meta = await request.app[PRODUCER].send_and_wait(settings.topic, data,
                                                         key=checked.content_hash.encode("ascii"))  # fmt: skip
    except KafkaError as exc:
        raise KafkaUnavailable(f"could not publish the version: {exc}") from exc
    return web.json_response({"hash": checked.content_hash, "offset": meta.offset}, status=202)


def create_app(
    settings: PolicySettings, *, bootstrap: str | None = None, keys: Sequence[PublicKey] | None = None,
    clock: Clock | None = None,
) -> web.Application:  # fmt: skip
    """The one composition root. ``keys`` overrides the PEM files named in settings (tests).

    Raises:
        ConfigurationError: no Kafka bootstrap, or no usable policy-admin key.
    """
    bootstrap = bootstrap or settings.kafka.bootstrap
    if not bootstrap:
        raise ConfigurationError("the policy service needs a Kafka bootstrap (EVHUB_KAFKA_BOOTSTRAP)")
    trusted = trusted_keys(tuple(keys) if keys is not None else tuple(settings.load_admin_keys()))
    app = web.Application(middlewares=[problem_middleware], client_max_size=settings.max_body_bytes)
    store = PolicyStore(trusted=trusted, max_clock_skew=settings.max_clock_skew)
    app[STATE] = PolicyState.create(store, cache_size=settings.cache_size)
    app[SETTINGS] = settings
    app[CLOCK] = clock or (lambda: datetime.now(UTC))

    async def kafka(app: web.Application) -> AsyncIterator[None]:
        await ensure_policy_topic(bootstrap, settings.topic, kafka=settings.kafka)
        state = app[STATE]
        follower = state.follow(bootstrap=bootstrap, topic=settings.topic, client_id="evhub-policy-service")
        producer = make_producer(bootstrap, client_id="evhub-policy-service")
        task: asyncio.Task[None] | None = None

        def crashed(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                state.failure = t.exception()
                log.critical("policy follower failed: %r", state.failure)

        try:
            await producer.start()
            app[PRODUCER] = producer
            task = asyncio.create_task(follower.run(), name="policy-follower")
            task.add_done_callback(crashed)
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await producer.stop()

    app.cleanup_ctx.append(kafka)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/decisions", decide)
    app.router.add_get("/v1/versions", list_versions)
    app.router.add_get("/v1/versions/in-force", in_force)
    app.router.add_get("/v1/versions/{hash}", get_version)
    app.router.add_post("/v1/versions", post_version)
    return app
