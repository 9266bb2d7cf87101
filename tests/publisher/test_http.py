"""The publisher's HTTP API through real sockets, real mutual TLS and the real broker."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.publisher.service import create_app
from services.publisher.settings import PublisherSettings
from services.shared.kafka import TopicSpec, ensure_topics, read_to_end
from services.shared.tls import CertFiles, client_context, create_dev_pki, server_context
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack, delete_topic

pytestmark = pytest.mark.kafka
MAX_FILE = 64 * 1024


@dataclass
class Api:
    url: str
    pki: dict[str, CertFiles]
    stack: Stack

    def session(self, who: str = "archivist") -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(self.pki[who])))


@pytest.fixture
async def api(stack: Stack, tmp_path: Path) -> AsyncIterator[Api]:
    pki = create_dev_pki(tmp_path / "pki", ["publisher", "archivist", "intruder"])
    settings = PublisherSettings(
        tls_cert=pki["publisher"].cert, tls_key=pki["publisher"].key, tls_ca=pki["publisher"].ca,
        allowed_clients=["archivist"], jurisdictions=stack.jurisdictions, max_file_bytes=MAX_FILE,
        data_dir=tmp_path / "unused",
    )  # fmt: skip
    app = create_app(settings, publisher=stack.publisher, store=stack.store)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki["publisher"]))
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Api(f"https://127.0.0.1:{port}", pki, stack)
    finally:
        await runner.cleanup()


def form(meta: dict[str, Any] | str, data: bytes | None, filename: str = "frame.png") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("metadata", meta if isinstance(meta, str) else json.dumps(meta), content_type="application/json")
    if data is not None:
        body.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return body


async def _post(api: Api, meta: dict[str, Any] | str, data: bytes | None, **headers: str) -> tuple[int, dict[str, Any]]:
    async with api.session() as s, s.post(f"{api.url}/v1/evidence", data=form(meta, data), headers=headers) as r:
        body = await r.json(content_type=None)
        if r.status >= 400:
            assert r.content_type == "application/problem+json"
            assert body["status"] == r.status
        return r.status, body


def _stored_files(api: Api) -> list[Path]:
    root = api.stack.store.path_of("0" * 64).parents[2]  # the whole store, temporary files included
    return [p for p in root.rglob("*") if p.is_file()]


async def test_upload_returns_201_with_digest_and_offsets_and_a_repeat_returns_the_original(api: Api) -> None:
    data = png(seed=11)
    meta = metadata("SDG-HTTP-1", api.stack.jurisdictions)
    status, body = await _post(api, meta, data, **{"Idempotency-Key": "batch-7/item-1"})
    assert status == 201
    assert body["media_type"] == "image/png"
    assert body["size"] == len(data)
    assert {d["jurisdiction"] for d in body["deliveries"]} == set(api.stack.jurisdictions)
    assert all(d["delivered"] and d["offset"] is not None for d in body["deliveries"])

    async with api.session() as s, s.post(f"{api.url}/v1/evidence", data=form(meta, data),
                                          headers={"Idempotency-Key": "batch-7/item-1"}) as again:  # fmt: skip
        assert again.status == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert (await again.json())["event_id"] == body["event_id"]
    for j in api.stack.jurisdictions:
        assert len(await read_to_end(api.stack.bootstrap, api.stack.topic(j))) == 1

    async with api.session() as s, s.get(f"{api.url}/v1/evidence/SDG-HTTP-1") as r:
        item = await r.json()
    assert item["latest_version"] == 1
    assert item["versions"][0]["sha256"] == body["sha256"]


async def test_malformed_metadata_names_every_bad_field(api: Api) -> None:
    meta = metadata("SDG-BAD", api.stack.jurisdictions, kind="SELFIE", case_ids=[], captured_at="yesterday")
    meta["custody"][1]["at"] = "2014-01-15T12:00:00"  # no time zone
    status, body = await _post(api, meta, png())
    assert status == 422
    fields = {e["field"] for e in body["errors"]}
    assert {"kind", "case_ids", "captured_at", "custody.1.at"} <= fields
    assert _stored_files(api) == [], "nothing is stored for a refused request"


@pytest.mark.parametrize(
    ("meta_text", "field"),
    [("{not json", "(body)"), ('{"item_id": "X"}', "case_ids"), ("[]", "(body)")],
    ids=["not-json", "incomplete", "not-an-object"],
)
async def test_unparseable_or_incomplete_metadata_is_a_422(api: Api, meta_text: str, field: str) -> None:
    status, body = await _post(api, meta_text, png())
    assert status == 422
    assert field in {e["field"] for e in body["errors"]}


async def test_unknown_jurisdiction_is_a_422_naming_it(api: Api) -> None:
    status, body = await _post(api, metadata("SDG-J", ["ZZ"]), png())
    assert status == 422
    assert body["errors"][0]["field"] == "jurisdictions.0"
    assert "ZZ" in body["errors"][0]["message"]


async def test_file_over_the_limit_is_a_413_and_leaves_nothing(api: Api) -> None:
    status, body = await _post(api, metadata("SDG-BIG", api.stack.jurisdictions), b"\xff\xd8\xff" + bytes(MAX_FILE))
    assert status == 413
    assert str(MAX_FILE) in body["detail"]
    assert _stored_files(api) == []


async def test_declared_media_type_that_contradicts_the_bytes_is_a_415_and_leaves_nothing(api: Api) -> None:
    meta = metadata("SDG-PDF", api.stack.jurisdictions, media_type="application/pdf")
    status, body = await _post(api, meta, png())
    assert status == 415
    assert body["detected"] == "image/png"
    assert _stored_files(api) == []


async def test_missing_file_part_is_a_422(api: Api) -> None:
    status, body = await _post(api, metadata("SDG-NOFILE", api.stack.jurisdictions), None)
    assert status == 422
    assert body["errors"][0]["field"] == "file"


async def test_a_client_certificate_not_allowed_to_publish_gets_403(api: Api) -> None:
    upload = form(metadata("SDG-I", api.stack.jurisdictions), png())
    async with api.session("intruder") as s, s.post(f"{api.url}/v1/evidence", data=upload) as r:
        assert r.status == 403
        assert r.content_type == "application/problem+json"


async def test_a_client_without_a_certificate_cannot_connect(api: Api) -> None:
    ctx = ssl.create_default_context(cafile=str(api.pki["publisher"].ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"{api.url}/healthz") as r:
                await r.read()


async def test_withdrawal_needs_a_reason_and_unknown_items_are_404(api: Api) -> None:
    async with api.session() as s:
        async with s.post(f"{api.url}/v1/evidence/SDG-NONE/withdrawal", json={}) as r:
            assert r.status == 422
        async with s.post(f"{api.url}/v1/evidence/SDG-NONE/withdrawal", json={"reason": "x"}) as r:
            assert r.status == 404
            assert (await r.json(content_type=None))["title"] == "Not found"
        async with s.get(f"{api.url}/v1/evidence/SDG-NONE") as r:
            assert r.status == 404


async def test_kafka_not_acknowledging_a_jurisdiction_is_a_503_naming_it_and_a_retry_completes(api: Api) -> None:
    missing = api.stack.jurisdictions[1]
    await delete_topic(api.stack.bootstrap, api.stack.topic(missing))
    meta = metadata("SDG-HTTP-503", api.stack.jurisdictions)
    async with api.session() as s:
        async with s.post(f"{api.url}/v1/evidence", data=form(meta, png(seed=5)),
                          headers={"Idempotency-Key": "k-503"}) as r:  # fmt: skip
            body = await r.json(content_type=None)
            assert r.status == 503
            assert r.content_type == "application/problem+json"
            assert r.headers["Retry-After"]
        assert missing in body["detail"]
        assert [d["jurisdiction"] for d in body["deliveries"] if not d["delivered"]] == [missing]
        await ensure_topics(api.stack.bootstrap, [TopicSpec(api.stack.topic(missing), 3)])
        async with s.post(f"{api.url}/v1/evidence", data=form(meta, png(seed=5)),
                          headers={"Idempotency-Key": "k-503"}) as r:  # fmt: skip
            again = await r.json()
            assert r.status == 200
        assert again["complete"] is True
        assert again["event_id"] == body["event_id"]
    for j in api.stack.jurisdictions:
        assert len(await read_to_end(api.stack.bootstrap, api.stack.topic(j))) == 1


@pytest.mark.parametrize(
    ("header", "slug"),
    [("sha-256=:" + "A" * 43 + "=:", "digest-mismatch"), ("md5=:abc:", "validation")],
    ids=["other-bytes", "malformed"],
)
async def test_an_announced_digest_that_does_not_match_keeps_nothing(api: Api, header: str, slug: str) -> None:
    status, body = await _post(api, metadata("SDG-DIGEST", api.stack.jurisdictions), png(), **{"Repr-Digest": header})
    assert status == 422
    assert body["type"].endswith(slug)
    assert _stored_files(api) == []


def raw_form(meta: dict[str, Any], data: bytes, disposition: str) -> aiohttp.MultipartWriter:
    """A form whose file part carries ``disposition`` exactly (as curl -F sends it; aiohttp's FormData would
    percent-encode the name)."""
    body = aiohttp.MultipartWriter("form-data")
    body.append(json.dumps(meta), {"Content-Type": "application/json"}).set_content_disposition(
        "form-data", name="metadata"
    )
    body.append(data, {"Content-Type": "application/octet-stream"}).headers["Content-Disposition"] = disposition
    return body


UNSAFE_NAMES = {
    "metadata: path traversal": ({"file_name": "../../evidence/x.png"}, 'filename="frame.png"', "file_name"),
    "metadata: right-to-left override": ({"file_name": "photo\u202egnp.exe"}, 'filename="frame.png"', "file_name"),
    "metadata: NUL": ({"file_name": "photo\x00.png"}, 'filename="frame.png"', "file_name"),
    "multipart: path traversal": ({}, 'filename="../../evidence/x.png"', "file.filename"),
    "multipart: absolute path": ({}, 'filename="/etc/cron.d/x"', "file.filename"),
    "multipart: right-to-left override": ({}, "filename*=UTF-8''photo%E2%80%AEgnp.exe", "file.filename"),
}  # fmt: skip


@pytest.mark.parametrize(("overrides", "filename", "field"), UNSAFE_NAMES.values(), ids=UNSAFE_NAMES.keys())
async def test_an_unsafe_file_name_is_a_422_naming_the_field_and_nothing_is_stored_or_signed(
    api: Api, overrides: dict[str, Any], filename: str, field: str
) -> None:
    meta = metadata("SDG-NAME", api.stack.jurisdictions, **overrides)
    data = raw_form(meta, png(), f'form-data; name="file"; {filename}')
    async with api.session() as s, s.post(f"{api.url}/v1/evidence", data=data) as r:
        body = await r.json(content_type=None)
        assert (r.status, r.content_type) == (422, "application/problem+json")
    assert [e["field"] for e in body["errors"]] == [field]
    assert _stored_files(api) == []
    for j in api.stack.jurisdictions:
        assert await read_to_end(api.stack.bootstrap, api.stack.topic(j)) == []
