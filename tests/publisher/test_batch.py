"""``POST /v1/evidence/batch`` through real sockets and real mutual TLS, against the real broker: several files in
one request, each its own event with its own result; an item's problem refuses that item alone; a request's problem
refuses the whole request with problem+json and keeps nothing (no file in the store, no event in Kafka)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from services.cli.manifest import Entry
from services.cli.publish import Journal, publish_all
from services.publisher.core import parse_metadata
from services.publisher.service import create_app
from services.publisher.settings import PublisherSettings
from services.shared.kafka import read_to_end
from services.shared.serve import ProblemRunner
from services.shared.tls import client_context, create_dev_pki, server_context
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack

pytestmark = pytest.mark.kafka
MAX_ITEMS = 4
MAX_BATCH_BYTES = 64 << 10


@dataclass
class Batch:
    url: str
    session: aiohttp.ClientSession
    stack: Stack

    def stored(self) -> list[Path]:
        root = self.stack.store.path_of("0" * 64).parents[2]  # the whole store, temporary files included
        return [p for p in root.rglob("*") if p.is_file()]

    async def events(self) -> int:
        return sum(
            [len(await read_to_end(self.stack.bootstrap, self.stack.topic(j))) for j in self.stack.jurisdictions]
        )

    async def post(self, form: aiohttp.FormData) -> tuple[int, str, dict[str, Any]]:
        async with self.session.post(f"{self.url}/v1/evidence/batch", data=form) as response:
            return response.status, response.content_type, await response.json(content_type=None)


@pytest.fixture
async def batch(stack: Stack, tmp_path: Path) -> AsyncIterator[Batch]:
    pki = create_dev_pki(tmp_path / "pki", ["publisher", "archivist"])
    settings = PublisherSettings(
        tls_cert=pki["publisher"].cert, tls_key=pki["publisher"].key, tls_ca=pki["publisher"].ca,
        allowed_clients=["archivist"], jurisdictions=stack.jurisdictions, data_dir=tmp_path / "unused",
        max_batch_items=MAX_ITEMS, max_batch_bytes=MAX_BATCH_BYTES,
    )  # fmt: skip
    runner = ProblemRunner(create_app(settings, publisher=stack.publisher, store=stack.store))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki["publisher"])).start()
    connector = aiohttp.TCPConnector(ssl=client_context(pki["archivist"]))
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            yield Batch(f"https://127.0.0.1:{runner.addresses[0][1]}", session, stack)
    finally:
        await runner.cleanup()


def _item(item_id: str, data: bytes, jurisdictions: list[str], **overrides: Any) -> dict[str, Any]:
    entry = {"metadata": metadata(item_id, jurisdictions), "sha256": hashlib.sha256(data).hexdigest()}
    return {**entry, **overrides}


def _form(items: list[dict[str, Any]], files: list[bytes], *, first: str = "items") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(first, json.dumps({"items": items}), content_type="application/json")
    for data in files:
        form.add_field("file", data, filename="photo.png", content_type="application/octet-stream")
    return form


async def test_each_file_of_a_batch_is_its_own_event_and_a_repeat_replays_each(batch: Batch) -> None:
    js = batch.stack.jurisdictions
    files = [png(seed=n) for n in range(3)]
    items = [_item(f"SDG-B-{n}", data, js[: n + 1], idempotency_key=f"k-{n}") for n, data in enumerate(files)]
    status, _, body = await batch.post(_form(items, files))
    assert status == 200, body
    answers = body["items"]
    assert [a["status"] for a in answers] == [201, 201, 201]
    assert [a["item_id"] for a in answers] == ["SDG-B-0", "SDG-B-1", "SDG-B-2"]
    assert [a["result"]["sha256"] for a in answers] == [i["sha256"] for i in items]
    assert len({a["result"]["event_id"] for a in answers}) == 3
    assert await batch.events() == 1 + 2 + 3  # one envelope per item and jurisdiction

    status, _, again = await batch.post(_form(items, files))
    assert [a["status"] for a in again["items"]] == [200, 200, 200]
    assert [a["result"]["event_id"] for a in again["items"]] == [a["result"]["event_id"] for a in answers]
    assert await batch.events() == 6  # nothing published twice


async def test_an_items_problem_refuses_that_item_alone_and_keeps_nothing_of_it(batch: Batch) -> None:
    js = batch.stack.jurisdictions
    good, tampered, other, declared = png(seed=10), png(seed=11), png(seed=12), png(seed=13)
    items = [
        _item("SDG-OK", good, js[:1]),
        _item("SDG-TAMPERED", tampered, js[:1]) | {"sha256": hashlib.sha256(b"what the client hashed").hexdigest()},
        _item("SDG-NOWHERE", other, ["XX-UNSERVED"]),
        {"metadata": metadata("SDG-PDF", js[:1], media_type="application/pdf"),
         "sha256": hashlib.sha256(declared).hexdigest()},
    ]  # fmt: skip
    status, _, body = await batch.post(_form(items, [good, tampered, other, declared]))
    assert status == 200, body
    answers = body["items"]
    assert [a["status"] for a in answers] == [201, 422, 422, 415]
    assert answers[1]["problem"]["type"].endswith("digest-mismatch")
    assert answers[2]["problem"]["type"].endswith("validation")
    assert answers[3]["problem"]["type"].endswith("media-type")
    assert all(a["problem"]["instance"] == f"/v1/evidence/batch#items.{n}" for n, a in enumerate(answers) if n)
    assert [p.name for p in batch.stored()] == [answers[0]["result"]["sha256"]]  # only the accepted file
    assert await batch.events() == 1


async def test_an_item_named_twice_is_refused_the_second_time(batch: Batch) -> None:
    js = batch.stack.jurisdictions
    one, two = png(seed=20), png(seed=21)
    _, _, body = await batch.post(_form([_item("SDG-TWICE", one, js[:1]), _item("SDG-TWICE", two, js[:1])],
                                             [one, two]))  # fmt: skip
    assert [a["status"] for a in body["items"]] == [201, 409]
    assert await batch.events() == 1


@pytest.mark.parametrize(
    "case",
    [
        "not-multipart", "items-not-first", "items-not-json", "entry-without-sha256", "unknown-field",
        "too-many-items", "a-file-part-missing", "a-file-part-too-many", "over-the-batch-bytes",
    ],
)  # fmt: skip
async def test_a_malformed_request_is_one_problem_and_nothing_is_kept_or_published(batch: Batch, case: str) -> None:
    js = batch.stack.jurisdictions
    data = [png(seed=40 + n) for n in range(3)]
    items = [_item(f"SDG-R-{n}", d, js[:1]) for n, d in enumerate(data)]
    form: aiohttp.FormData | None = _form(items, data)
    expected = 422
    if case == "not-multipart":
        form = None
    elif case == "items-not-first":
        form = _form(items, data, first="metadata")
    elif case == "items-not-json":
        form = aiohttp.FormData()
        form.add_field("items", "{not json", content_type="application/json")
    elif case == "entry-without-sha256":
        form = _form([items[0], {"metadata": items[1]["metadata"]}, items[2]], data)
    elif case == "unknown-field":
        form = _form([items[0] | {"correction_of": "SDG-X"}, *items[1:]], data)
    elif case == "too-many-items":
        more = [png(seed=50 + n) for n in range(MAX_ITEMS + 1)]
        form = _form([_item(f"SDG-T-{n}", d, js[:1]) for n, d in enumerate(more)], more)
    elif case == "a-file-part-missing":
        form = _form(items, data[:2])  # the first two would be fine: neither is kept
    elif case == "a-file-part-too-many":
        form = _form(items, [*data, png(seed=49)])
    elif case == "over-the-batch-bytes":
        big = [d + bytes(MAX_BATCH_BYTES // 2) for d in data]
        form, expected = _form([_item(f"SDG-R-{n}", d, js[:1]) for n, d in enumerate(big)], big), 413
    if form is None:
        async with batch.session.post(f"{batch.url}/v1/evidence/batch", json={"items": items}) as response:
            status, content_type, body = response.status, response.content_type, await response.json(content_type=None)
    else:
        status, content_type, body = await batch.post(form)
    assert status == expected, body
    assert content_type == "application/problem+json"
    assert body["status"] == expected
    assert "items" not in body or not isinstance(body["items"], list)  # no per-item answers: nothing was done
    assert batch.stored() == []
    assert await batch.events() == 0


async def test_a_malformed_entry_is_named_by_its_index_and_field(batch: Batch) -> None:
    js = batch.stack.jurisdictions
    data = [png(seed=60), png(seed=61)]
    items = [_item("SDG-N-0", data[0], js[:1]), _item("SDG-N-1", data[1], js[:1]) | {"sha256": "ABC"}]
    status, _, body = await batch.post(_form(items, data))
    assert status == 422
    assert {"field": "items.1.sha256", "message": "the file's SHA-256: 64 lower-case hex characters"} in body["errors"]


async def test_the_client_falls_back_to_one_request_per_file_on_a_publisher_without_the_batch_route(
    stack: Stack, tmp_path: Path
) -> None:
    """An older publisher answers 404 to the batch route: ``evhub publish`` sends each file on its own, and every
    item is still published once."""
    pki = create_dev_pki(tmp_path / "pki", ["publisher", "archivist"])
    settings = PublisherSettings(
        tls_cert=pki["publisher"].cert, tls_key=pki["publisher"].key, tls_ca=pki["publisher"].ca,
        allowed_clients=["archivist"], jurisdictions=stack.jurisdictions, data_dir=tmp_path / "unused",
    )  # fmt: skip
    single: list[str] = []

    @web.middleware
    async def older(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/evidence/batch":
            raise web.HTTPNotFound()
        single.append(request.path)
        return await handler(request)

    app = create_app(settings, publisher=stack.publisher, store=stack.store)
    app.middlewares.insert(0, older)
    runner = ProblemRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki["publisher"])).start()
    try:
        entries = []
        for n in range(5):
            path = tmp_path / f"frame-{n}.png"
            path.write_bytes(png(seed=300 + n))
            meta = metadata(f"SDG-OLD-{n}", stack.jurisdictions[:1], file_name=path.name)  # as the manifest sets it
            entries.append(Entry(path, parse_metadata(meta), n + 1))
        outcomes = await publish_all(entries, url=f"https://127.0.0.1:{runner.addresses[0][1]}",
                                     ssl_context=client_context(pki["archivist"]),
                                     journal=Journal(tmp_path / "journal.jsonl"), concurrency=2)  # fmt: skip
    finally:
        await runner.cleanup()
    assert [o.status for o in outcomes] == ["published"] * 5, [o.error for o in outcomes]
    assert single.count("/v1/evidence") == 5, "one request per file"
    assert len(await read_to_end(stack.bootstrap, stack.topic(stack.jurisdictions[0]))) == 5
