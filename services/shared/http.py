"""The HTTP edge shared by every service: RFC 9457 problem+json for every error, and client identity from mTLS.

Owns: the one place an exception becomes an HTTP response. Hub errors carry their status and title; aiohttp's
own HTTP errors keep their status; anything else is a 500 whose details go to the log, never to the client.
Trust errors (which key, why a signature or key was refused) are answered with one generic 422 and an incident
id; their details go to the log under that id, never to the client (a prober learns nothing about keys).
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from services.shared.errors import EvidenceHubError, TrustError

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TYPE_BASE: Final = "https://evidence-hub.example/problems/"
UNTRUSTED_DETAIL: Final = "a signature or key could not be trusted; the details are logged under the incident id"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, title: str, detail: str, *, type_slug: str, instance: str, **extensions: Any) -> web.Response:
    body = {"type": TYPE_BASE + type_slug, "title": title, "status": status, "detail": detail, "instance": instance}
    text = json.dumps({**extensions, **body}, default=str)  # extensions may hold datetimes
    return web.Response(text=text, status=status, content_type=PROBLEM_JSON)


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
