"""The HTTP edge shared by every service: RFC 9457 problem+json for every error, and client identity from mTLS.

Owns: the one place an exception becomes an HTTP response. Hub errors carry their status and title; aiohttp's
own HTTP errors keep their status; anything else is a 500 whose details go to the log, never to the client.
Trust errors (which key, why a signature or key was refused) are answered with one generic 422 and an incident
id; their details go to the log under that id, never to the client (a prober learns nothing about keys). While Kafka
lacks in-sync replicas, writes are refused up front and every 503 says so (:func:`kafka_outage_middleware`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from services.shared.errors import EvidenceHubError, KafkaUnavailable, TrustError
from services.shared.kafka import replication_shortfall
from services.shared.kafka_connection import Kafka

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TYPE_BASE: Final = "https://evidence-hub.example/problems/"
UNTRUSTED_DETAIL: Final = "a signature or key could not be trusted; the details are logged under the incident id"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, title: str, detail: str, *, type_slug: str, instance: str, **extensions: Any) -> web.Response:
    body = {"type": TYPE_BASE + type_slug, "title": title, "status": status, "detail": detail, "instance": instance}
    text = json.dumps({**extensions, **body}, default=str)  # extensions may hold datetimes
    return web.Response(text=text, status=status, content_type=PROBLEM_JSON)


def problem_document(exc: EvidenceHubError, *, instance: str) -> dict[str, Any]:
    """The RFC 9457 problem object for a hub error, as the middleware would answer it — for a response that
    carries one per item (a batch). A trust error's details go to the log under an incident id, as always."""
    if isinstance(exc, TrustError):
        incident = uuid.uuid4().hex[:16]
        log.warning("%s untrusted (incident %s): %s: %s", instance, incident, type(exc).__name__, exc.detail)
        return {"type": TYPE_BASE + TrustError.type_slug, "title": TrustError.title, "status": exc.http_status,
                "detail": UNTRUSTED_DETAIL, "instance": instance, "incident": incident}  # fmt: skip
    body = {"type": TYPE_BASE + exc.type_slug, "title": exc.title, "status": exc.http_status, "detail": exc.detail,
            "instance": instance}  # fmt: skip
    document: dict[str, Any] = json.loads(json.dumps({**exc.extensions, **body}, default=str))  # datetimes → text
    return document


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TrustError as exc:
        incident = uuid.uuid4().hex[:16]
        log.warning("%s %s → %s untrusted (incident %s): %s: %s", request.method, request.path, exc.http_status,
                    incident, type(exc).__name__, exc.detail)  # fmt: skip
        return problem(exc.http_status, TrustError.title, UNTRUSTED_DETAIL, type_slug=TrustError.type_slug,
                       instance=request.path, incident=incident)  # fmt: skip
    except EvidenceHubError as exc:
        if exc.http_status >= 500:
            log.warning("%s %s → %s: %s", request.method, request.path, exc.http_status, exc.detail)
        headers = {"Retry-After": "5"} if exc.retriable else {}
        response = problem(exc.http_status, exc.title, exc.detail, type_slug=exc.type_slug,
                           instance=request.path, **exc.extensions)  # fmt: skip
        response.headers.update(headers)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason, exc.text or exc.reason, type_slug=f"http-{exc.status}",
                       instance=request.path)  # fmt: skip
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "Internal error", "the service failed; the incident is logged", type_slug="internal",
                       instance=request.path)  # fmt: skip


class _Shortfall:
    """The latest answer of ``kafka.replication_shortfall`` for some topics, asked at most every ``every_s`` and by
    one request at a time (the others use the last answer). An unanswered question counts as no shortfall."""

    def __init__(self, kafka: Kafka, topics: Sequence[str], every_s: float) -> None:
        self._kafka, self._topics, self._every = kafka, list(topics), every_s
        self._at, self._asking, self._lines = float("-inf"), False, list[str]()

    async def lines(self) -> list[str]:
        loop = asyncio.get_running_loop()
        if loop.time() - self._at >= self._every and not self._asking:
            self._asking = True
            try:
                self._lines = await replication_shortfall(self._kafka, self._topics, timeout_ms=3_000)
            except KafkaUnavailable:
                self._lines = []
            finally:
                self._at, self._asking = loop.time(), False
        return self._lines


def kafka_outage_middleware(kafka: Kafka, topics: Sequence[str], *, every_s: float = 2.0) -> Middleware:
    """While ``topics`` cannot take acks=all writes — a partition without a leader, or with fewer in-sync replicas
    than its ``min.insync.replicas`` (``kafka.replication_shortfall``) — a POST is refused with a 503 before its body
    is read: nothing is stored or signed that Kafka could not acknowledge. Any other 503 from Kafka
    (:class:`KafkaUnavailable`) says the same when it applies. The problem's ``kafka_shortfall`` lists the partitions.
    The cluster is asked at most once every ``every_s`` seconds, however many requests come."""
    watch = _Shortfall(kafka, topics, every_s)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and (lines := await watch.lines()):
            raise KafkaUnavailable("Kafka cannot acknowledge writes now, not enough in-sync replicas: "
                                   f"{'; '.join(lines[:3])}. Nothing was stored or signed; retry later",
                                   kafka_shortfall=lines)  # fmt: skip
        try:
            return await handler(request)
        except KafkaUnavailable as exc:
            if "kafka_shortfall" not in exc.extensions and (lines := await watch.lines()):
                exc.detail = f"{exc.detail}. Not enough in-sync replicas: {'; '.join(lines[:3])}"
                exc.extensions["kafka_shortfall"] = lines
            raise

    return middleware


def peer_common_name(request: web.Request) -> str | None:
    """The CN of the verified client certificate, or None on a connection without one."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject = cert.get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for pair in rdn:
            if isinstance(pair, tuple) and len(pair) == 2 and pair[0] == "commonName":
                return str(pair[1])
    return None
