"""Uploads bounded and checked before a byte is kept, through real sockets and real mutual TLS: an absurd
``Content-Length`` (413 at once), malformed framing (problem+json, no traceback), a client gone mid-upload (400, not
an unhandled 500), a client that stops sending (408 after the idle timeout), too many uploads at once (429), a
second ``file`` part (422), and a refused request (409) — none of them leaves a file in the content store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from services.publisher.service import UPLOADS, create_app
from services.publisher.settings import PublisherSettings
from services.shared.serve import ProblemRunner
from services.shared.tls import CertFiles, client_context, create_dev_pki, server_context
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack
from tests.waiting import until

pytestmark = pytest.mark.kafka
BOUNDARY = "evhub-test-boundary"
IDLE_S = 2.0


@dataclass
class Server:
    port: int
    pki: dict[str, CertFiles]
    stack: Stack
    app: web.Application

    def uploads(self) -> int:
        """Uploads in progress (the service's per-client counter)."""
        return sum(self.app[UPLOADS].values())

    def files(self) -> list[Path]:
        root = self.stack.store.path_of("0" * 64).parents[2]  # the whole store, temporary files included
        return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture
async def server(stack: Stack, tmp_path: Path) -> AsyncIterator[Server]:
    pki = create_dev_pki(tmp_path / "pki", ["publisher", "archivist"])
    settings = PublisherSettings(
        tls_cert=pki["publisher"].cert, tls_key=pki["publisher"].key, tls_ca=pki["publisher"].ca,
        allowed_clients=["archivist"], jurisdictions=stack.jurisdictions, max_file_bytes=1 << 20,
        data_dir=tmp_path / "unused", body_idle_timeout_s=IDLE_S, max_uploads_per_client=2,
    )  # fmt: skip
    app = create_app(settings, publisher=stack.publisher, store=stack.store)
    runner = ProblemRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki["publisher"])).start()
    try:
        yield Server(runner.addresses[0][1], pki, stack, app)
    finally:
        await runner.cleanup()


def _parts(meta: dict[str, Any], *files: bytes) -> tuple[bytes, bytes]:
    """(the metadata part, the file parts and the closing boundary) of a multipart body."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(meta)}\r\n").encode()  # fmt: skip
    rest = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="f{i}.png"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    )
    return head, rest + f"--{BOUNDARY}--\r\n".encode()


def _headers(length: int | str, *extra: str) -> bytes:
    lines = ["POST /v1/evidence HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
             f"Content-Length: {length}", *extra]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Raw:
    """One mTLS connection, written byte by byte as a test needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: Server) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port,
                                                       ssl=client_context(server.pki["archivist"]))  # fmt: skip
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, within_s: float = 15.0) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Status, headers and JSON body of the answer; fails if none arrives within ``within_s``."""
        async with asyncio.timeout(within_s):
            status_line = await self.reader.readline()
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, json.loads(body or b"{}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def test_an_absurd_content_length_is_refused_with_413_before_reading_the_body(server: Server) -> None:
    raw = await Raw.open(server)
    try:
        await raw.send(_headers(10**15))
        status, headers, _ = await raw.response()
    finally:
        await raw.close()
    assert status == 413
    assert headers["content-type"].startswith("application/problem+json")
    assert headers.get("connection") == "close", "the rest of the announced body is never read"
    assert server.files() == []


@pytest.mark.parametrize(
    "framing",
    [(_headers(-1),), (_headers("99999999999999999999999999999"),), (_headers(10, "Transfer-Encoding: chunked"),)],
    ids=["negative", "overflowing", "with-chunked"],
)
async def test_malformed_framing_is_answered_with_problem_json_and_logged_without_a_traceback(
    server: Server, framing: tuple[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    raw = await Raw.open(server)
    try:
        await raw.send(framing[0])
        status, headers, body = await raw.response()
    finally:
        await raw.close()
    assert status == 400
    assert headers["content-type"].startswith("application/problem+json")
    assert body["status"] == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("cut", ["metadata", "file"])
async def test_a_client_gone_mid_upload_is_its_error_not_an_unhandled_one_and_leaves_nothing(
    server: Server, caplog: pytest.LogCaptureFixture, cut: str
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    head, rest = _parts(metadata("SDG-GONE", server.stack.jurisdictions), png(seed=1) + bytes(200_000))
    raw = await Raw.open(server)
    body = head[: len(head) // 2] if cut == "metadata" else head + rest[: len(rest) // 2]
    await raw.send(_headers(len(head) + len(rest)) + body)
    # the body is cut where it was sent: the server reads up to there, then meets the end of the connection
    await until("the upload has begun", 20, lambda: server.uploads())
    await raw.close()
    await until("the server is done with it", 20, lambda: server.files() == [] and _answered(caplog))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def _answered(caplog: pytest.LogCaptureFixture) -> bool:
    """The request was answered (aiohttp's access log), whatever the answer."""
    return any(r.name == "aiohttp.access" and "/v1/evidence" in r.getMessage() for r in caplog.records)


async def test_a_client_that_stops_sending_gets_408_after_the_idle_timeout_and_frees_its_slot(server: Server) -> None:
    head, rest = _parts(metadata("SDG-STALL", server.stack.jurisdictions), png(seed=2))
    raw = await Raw.open(server)
    try:
        await raw.send(_headers(len(head) + len(rest)) + head)  # and then nothing
        status, _, body = await raw.response(within_s=IDLE_S + 10)
    finally:
        await raw.close()
    assert status == 408
    assert body["type"].endswith("upload-stalled")
    assert server.files() == []


async def test_a_client_with_too_many_uploads_in_progress_gets_429(server: Server) -> None:
    head, rest = _parts(metadata("SDG-MANY", server.stack.jurisdictions), png(seed=3))
    stalled = [await Raw.open(server) for _ in range(2)]
    try:
        for raw in stalled:
            await raw.send(_headers(len(head) + len(rest)) + head)
        third = await Raw.open(server)
        try:
            await third.send(_headers(len(head) + len(rest)) + head + rest)
            status, _, body = await third.response()
        finally:
            await third.close()
        assert status == 429, body
        assert body["limit"] == 2
    finally:
        for raw in stalled:
            await raw.close()


async def test_a_second_file_part_is_refused_and_nothing_is_kept(server: Server) -> None:
    head, rest = _parts(metadata("SDG-TWO", server.stack.jurisdictions), png(seed=4), png(seed=5))
    raw = await Raw.open(server)
    try:
        await raw.send(_headers(len(head) + len(rest)) + head + rest)
        status, _, body = await raw.response()
    finally:
        await raw.close()
    assert status == 422
    assert body["errors"][0]["field"] == "file"
    assert server.files() == []


@pytest.mark.parametrize("announce_digest", [False, True], ids=["streamed-then-refused", "refused-up-front"])
async def test_a_file_sent_with_a_refused_request_is_not_kept(server: Server, announce_digest: bool) -> None:
    async def post(item: str, data: bytes, *extra: str) -> tuple[int, dict[str, Any]]:
        head, rest = _parts(metadata(item, server.stack.jurisdictions), data)
        if announce_digest:
            import base64
            import hashlib

            extra = (*extra, f"Repr-Digest: sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:")
        raw = await Raw.open(server)
        try:
            await raw.send(_headers(len(head) + len(rest), *extra) + head + rest)
            status, _, body = await raw.response()
        finally:
            await raw.close()
        return status, body

    status, _ = await post("SDG-409", png(seed=6), "Idempotency-Key: k-409")
    assert status == 201
    kept = server.files()
    assert len(kept) == 1
    status, body = await post("SDG-409", png(seed=7))  # the same item with another file: a correction is needed
    assert status == 409, body
    status, body = await post("SDG-410", png(seed=8), "Idempotency-Key: k-409")  # the key reused for another
    assert status == 409, body
    assert server.files() == kept, "what the refused requests uploaded is not in the store"
