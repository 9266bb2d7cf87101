"""The HTTP edge: trust errors reach the client as one generic problem, their details only the log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from services.shared.errors import EvidenceHubError, InvalidSignature, ReplayDetected, UntrustedKey, ValidationFailed
from services.shared.http import PROBLEM_JSON, UNTRUSTED_DETAIL, problem_middleware

Client = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
KEY_ID = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"

TRUST_ERRORS = {
    "revoked key": UntrustedKey(f"key {KEY_ID[:16]} revoked at 2026-05-01", key_id=KEY_ID),
    "bad signature": InvalidSignature(f"bad signature by key {KEY_ID[:16]} on evidence.DE"),
    "replay": ReplayDetected(f"sequence 7 of key {KEY_ID[:16]} on evidence.DE was already used"),
}


def _app(error: EvidenceHubError) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        raise error

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_post("/v1/things", handler)
    return app


@pytest.mark.parametrize("error", TRUST_ERRORS.values(), ids=TRUST_ERRORS.keys())
async def test_trust_errors_are_answered_generically_and_logged_in_detail(
    aiohttp_client: Client, error: EvidenceHubError, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(_app(error))
    response = await client.post("/v1/things")
    text = await response.text()
    assert (response.status, response.content_type) == (422, PROBLEM_JSON)
    body = await response.json()
    assert (body["title"], body["detail"], body["type"].rsplit("/", 1)[1]) == ("Untrusted", UNTRUSTED_DETAIL,
                                                                              "untrusted")  # fmt: skip
    assert KEY_ID[:16] not in text
    assert set(body) == {"type", "title", "status", "detail", "instance", "incident"}
    [logged] = [r.getMessage() for r in caplog.records if body["incident"] in r.getMessage()]
    assert error.detail in logged
    assert type(error).__name__ in logged


async def test_input_errors_still_say_what_is_wrong(aiohttp_client: Client) -> None:
    client = await aiohttp_client(_app(ValidationFailed("bad field", errors=[{"field": "x", "message": "y"}])))
    body = await (await client.post("/v1/things")).json()
    assert (body["detail"], body["errors"]) == ("bad field", [{"field": "x", "message": "y"}])
