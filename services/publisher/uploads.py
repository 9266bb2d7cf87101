"""Reading one upload from an HTTP request: a multipart body with a ``metadata`` part (JSON) and one ``file`` part.

Owns: checking everything checkable before a byte of the file is kept — the announced length, the metadata, the
announced digest (``Repr-Digest``, RFC 9530) and with it whether publishing would refuse the request — then streaming
the file into a staged upload, checking its media type, refusing a second ``file`` part, checking publishing's
refusals again with the digest now known, and only then committing it to the content store. Every read from the
client is bounded by an idle timeout; a client gone mid-body is the client's error (400), not an incident.

Does not own: who may upload (``service``), publishing (``pipeline``), the store (``services.shared.content``).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from services.publisher import core
from services.publisher.pipeline import ContentInfo, EvidencePublisher
from services.publisher.settings import PublisherSettings
from services.shared.content import ContentStore, Staged
from services.shared.errors import PayloadTooLarge, UploadInterrupted, UploadStalled, ValidationFailed
from services.shared.filenames import check_file_name
from services.shared.media import sniff

T = TypeVar("T")
CHUNK = 1 << 20
MULTIPART_OVERHEAD = 1 << 20  # boundaries and part headers on top of the file and the metadata


async def within(idle_s: float, read: Awaitable[T]) -> T:
    """One read from the client, bounded by the idle timeout; a client gone mid-body is the client's error.

    Raises:
        UploadStalled: nothing arrived for ``idle_s``. UploadInterrupted: the connection ended mid-body.
        ValidationFailed: the multipart framing is broken.
    """
    try:
        async with asyncio.timeout(idle_s):
            return await read
    except TimeoutError:
        raise UploadStalled(f"no bytes arrived for {idle_s:g}s; the upload is abandoned") from None
    except (HttpProcessingError, ConnectionError, asyncio.IncompleteReadError) as exc:
        raise UploadInterrupted(f"the upload stopped before its end: {exc.__class__.__name__}") from exc
    except ValueError as exc:  # aiohttp's multipart reader on a malformed part
        raise ValidationFailed("malformed multipart body", errors=[{"field": "(body)", "message": str(exc)}]) from exc


async def next_part(reader: MultipartReader, idle_s: float) -> BodyPartReader | None:
    part = await within(idle_s, reader.next())
    if part is not None and not isinstance(part, BodyPartReader):
        raise ValidationFailed("nested multipart is not accepted", errors=[{"field": "(body)", "message": "nested"}])
    return part


async def read_part(part: BodyPartReader, limit: int, idle_s: float, *, what: str = "metadata") -> bytes:
    """A small part (JSON) read whole, at most ``limit`` bytes.

    Raises: PayloadTooLarge, and as :func:`within`.
    """
    data = bytearray()
    while chunk := await within(idle_s, part.read_chunk(64 << 10)):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"{what} is larger than {limit} bytes")
    return bytes(data)


def check_length(request: web.Request, settings: PublisherSettings) -> None:
    """Raises: PayloadTooLarge for an announced body larger than any acceptable upload (before reading it)."""
    limit = settings.max_file_bytes + settings.max_metadata_bytes + MULTIPART_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request announces {request.content_length} bytes; an upload may carry at most "
                              f"{settings.max_file_bytes} bytes of file", limit=settings.max_file_bytes)  # fmt: skip


async def read_upload(
    request: web.Request, *, settings: PublisherSettings, store: ContentStore, publisher: EvidencePublisher,
    idempotency_key: str | None, correction_of: str | None,
) -> tuple[core.EvidenceMetadata, ContentInfo, Staged]:  # fmt: skip
    """Read, check and keep one upload. Everything publishing would refuse is refused before the file is kept.

    Raises: ValidationFailed, PayloadTooLarge, UnsupportedMediaType, DigestMismatch, Conflict, NotFound,
    UploadInterrupted/UploadStalled, UntrustedKey, StoreUnavailable.
    """
    idle = settings.body_idle_timeout_s
    if not request.content_type.startswith("multipart/"):
        raise ValidationFailed("send multipart/form-data: a 'metadata' part (JSON), then a 'file' part",
                               errors=[{"field": "(body)", "message": f"got {request.content_type}"}])  # fmt: skip
    reader = await within(idle, request.multipart())
    part = await next_part(reader, idle)
    if part is None or part.name != "metadata":
        raise ValidationFailed(
            "the first part must be 'metadata'", errors=[{"field": "metadata", "message": "missing"}]
        )
    meta = core.parse_metadata(await read_part(part, settings.max_metadata_bytes, idle))
    core.check_jurisdictions(meta, settings.jurisdictions)
    announced = repr_digest_sha256(request.headers.get("Repr-Digest"))
    if announced is not None:  # the digest is known before a byte of the file: refuse what would be refused now
        await publisher.precheck(meta, announced, idempotency_key=idempotency_key, correction_of=correction_of)
    part = await next_part(reader, idle)
    if part is None or part.name != "file":
        raise ValidationFailed("the second part must be 'file'", errors=[{"field": "file", "message": "missing"}])
    file_part = part
    name = meta.file_name or (check_file_name(part.filename, field="file.filename") if part.filename else None)
    detected: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await within(idle, file_part.read_chunk(CHUNK)):
            yield chunk

    def accept(head: bytes) -> None:
        detected.append(core.check_media_type(meta, sniff(head)))

    staged = await store.stage(chunks(), max_size=settings.max_file_bytes, accept=accept, expected_sha256=announced)
    try:
        if await next_part(reader, idle) is not None:
            raise ValidationFailed("one file per request", errors=[{"field": "file", "message": "a second part"}])
        if announced is None:
            await publisher.precheck(meta, staged.sha256, idempotency_key=idempotency_key,
                                     correction_of=correction_of)  # fmt: skip
        await store.commit(staged)
    finally:
        await store.discard(staged)
    return meta, ContentInfo(sha256=staged.sha256, size=staged.content.size, media_type=detected[0],
                             file_name=name or staged.sha256), staged  # fmt: skip


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
