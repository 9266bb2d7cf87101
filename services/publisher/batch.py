"""Publishing a batch: several evidence files in one request, each its own event (``POST /v1/evidence/batch``).

The request is multipart/form-data: first a part ``items`` (JSON ``{"items": [{"metadata": {…}, "sha256": "<hex>",
"idempotency_key": "…"}, …]}``; ``idempotency_key`` optional, as the header of a single upload), then one part
``file`` per item, in the same order. The answer is 200 with one entry per item, in order: ``{"index", "item_id",
"status": 201 | 200, "result": {…}}`` (a replay is 200) or ``{"index", "item_id", "status": 4xx | 5xx,
"problem": {RFC 9457}}``.

Owns: what is refused for the whole request and what for one item.
- The whole request (problem+json; nothing kept, nothing published): not multipart, the ``items`` part missing,
  not JSON or malformed (every malformed entry named, ``items.<n>.<field>``), more items than allowed, a file part
  missing or one too many, the files over the batch's byte limit or one over the file limit, a body cut off,
  stalled or malformed.
- One item (its problem in the answer; its file is read and dropped; the others go on): metadata invalid, a
  jurisdiction the publisher does not serve, publishing would refuse it (a conflict, a reused key), its bytes not
  the announced SHA-256, its media type contradicting the declared one, its item id twice in the batch, publishing
  failed or Kafka did not acknowledge every jurisdiction (503, retriable, as for a single upload).
Every file is staged (hashed, checked) while the body streams; only when the whole body has been read are the
accepted files committed together (their fsyncs grouped: ``ContentStore.commit_all``) and the items published
concurrently, so that their envelopes share group commits and Kafka rounds.

Does not own: who may publish (``service``), the single-file upload (``uploads``), publishing (``pipeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import BodyPartReader, web

from services.publisher import core
from services.publisher.pipeline import ContentInfo, EvidencePublisher, PartialDelivery
from services.publisher.settings import PublisherSettings
from services.publisher.uploads import CHUNK, MULTIPART_OVERHEAD, next_part, read_part, within
from services.shared.content import ContentStore, Staged
from services.shared.errors import (
    Conflict,
    DigestMismatch,
    EvidenceHubError,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from services.shared.filenames import check_file_name
from services.shared.http import problem_document
from services.shared.media import sniff

log = logging.getLogger(__name__)
MAX_ITEMS_PART: Final = 16 << 20
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
_FIELDS: Final = frozenset({"metadata", "sha256", "idempotency_key"})
Hold = Callable[[str], contextlib.AbstractContextManager[None]]


@dataclass
class BatchItem:
    index: int
    item_id: str | None
    sha256: str
    idempotency_key: str | None
    meta: core.EvidenceMetadata | None = None
    refusal: EvidenceHubError | None = None
    staged: Staged | None = None
    content: ContentInfo | None = None


def check_batch_length(request: web.Request, settings: PublisherSettings) -> None:
    """Raises: PayloadTooLarge for an announced body larger than any acceptable batch (before reading it)."""
    limit = settings.max_batch_bytes + _items_limit(settings) + MULTIPART_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the request announces {request.content_length} bytes; a batch may carry at most "
                              f"{settings.max_batch_bytes} bytes of files", limit=settings.max_batch_bytes)  # fmt: skip


def _items_limit(settings: PublisherSettings) -> int:
    return min(MAX_ITEMS_PART, settings.max_batch_items * settings.max_metadata_bytes)


def _entry_errors(i: int, entry: Any) -> list[dict[str, str]]:
    if not isinstance(entry, dict):
        return [{"field": f"items.{i}", "message": "an object is required"}]
    errors = [{"field": f"items.{i}.{k}", "message": "unknown field"} for k in sorted(set(entry) - _FIELDS)]
    if not isinstance(entry.get("metadata"), dict):
        errors.append({"field": f"items.{i}.metadata", "message": "an object is required"})
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        errors.append({"field": f"items.{i}.sha256", "message": "the file's SHA-256: 64 lower-case hex characters"})
    key = entry.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and 1 <= len(key) <= 256 and key.isprintable()):
        errors.append({"field": f"items.{i}.idempotency_key", "message": "1 to 256 printable characters"})
    return errors


def parse_items(raw: bytes, *, max_items: int, jurisdictions: Sequence[str]) -> list[BatchItem]:
    """The ``items`` part. Pure. An item's own problems (metadata, jurisdictions, its id twice) become its
    refusal; a malformed part is the request's.

    Raises:
        ValidationFailed: not JSON, not ``{"items": [...]}``, 0 or more than ``max_items`` entries, or entries that
        are not objects with ``metadata``, a well-formed ``sha256`` and optionally ``idempotency_key`` (all named).
    """
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ValidationFailed("the items part is not JSON", errors=[{"field": "items", "message": str(exc)}]) from None
    entries = document.get("items") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not 1 <= len(entries) <= max_items:
        raise ValidationFailed(f'the items part must be {{"items": [...]}} with 1 to {max_items} entries',
                               errors=[{"field": "items", "message": f"1 to {max_items} entries"}])  # fmt: skip
    errors = [e for i, entry in enumerate(entries) for e in _entry_errors(i, entry)]
    if errors:
        raise ValidationFailed("the batch's items are malformed; nothing was published", errors=errors[:100])
    items, seen = [], set()
    for i, entry in enumerate(entries):
        named = entry["metadata"].get("item_id")
        item = BatchItem(i, named if isinstance(named, str) else None, entry["sha256"], entry.get("idempotency_key"))
        try:
            item.meta = core.parse_metadata(entry["metadata"])
            core.check_jurisdictions(item.meta, jurisdictions)
            if item.meta.item_id in seen:
                raise Conflict(f"item {item.meta.item_id!r} appears more than once in this batch")
            seen.add(item.meta.item_id)
        except EvidenceHubError as exc:
            item.refusal = exc
        items.append(item)
    return items


async def read_batch(
    request: web.Request, *, settings: PublisherSettings, store: ContentStore, publisher: EvidencePublisher
) -> list[BatchItem]:
    """Read, check and keep a batch's files (the accepted ones committed together). On any error of the request
    nothing is kept.

    Raises: ValidationFailed, PayloadTooLarge, UploadInterrupted/UploadStalled, StoreUnavailable.
    """
    idle = settings.body_idle_timeout_s
    if not request.content_type.startswith("multipart/"):
        raise ValidationFailed("send multipart/form-data: an 'items' part (JSON), then a 'file' part per item",
                               errors=[{"field": "(body)", "message": f"got {request.content_type}"}])  # fmt: skip
    reader = await within(idle, request.multipart())
    part = await next_part(reader, idle)
    if part is None or part.name != "items":
        raise ValidationFailed("the first part must be 'items'", errors=[{"field": "items", "message": "missing"}])
    raw = await read_part(part, _items_limit(settings), idle, what="the items part")
    items = parse_items(raw, max_items=settings.max_batch_items, jurisdictions=settings.jurisdictions)
    await _precheck(items, publisher)
    budget = settings.max_batch_bytes
    try:
        for item in items:
            part = await next_part(reader, idle)
            if part is None or part.name != "file":
                field = f"items.{item.index}"
                raise ValidationFailed(f"item {item.index} has no 'file' part; send one per item, in order",
                                       errors=[{"field": field, "message": "no file part"}])  # fmt: skip
            budget -= await _stage(item, part, store=store, settings=settings, budget=budget)
        if await next_part(reader, idle) is not None:
            raise ValidationFailed("more file parts than items", errors=[{"field": "(body)", "message": "extra part"}])
        await store.commit_all([item.staged for item in items if item.staged is not None])
    except BaseException:
        for item in items:
            if item.staged is not None and not item.staged.committed:
                await store.discard(item.staged)
        raise
    return items


async def _precheck(items: list[BatchItem], publisher: EvidencePublisher) -> None:
    """Refuse, per item, what publishing would refuse, before any file is read (the digests are announced)."""

    async def one(item: BatchItem) -> None:
        assert item.meta is not None
        try:
            await publisher.precheck(item.meta, item.sha256, idempotency_key=item.idempotency_key, correction_of=None)
        except EvidenceHubError as exc:
            item.refusal = exc

    await asyncio.gather(*(one(item) for item in items if item.refusal is None))


async def _stage(item: BatchItem, part: BodyPartReader, *, store: ContentStore, settings: PublisherSettings,
                 budget: int) -> int:  # fmt: skip
    """Stage one item's file (or read and drop it if the item is refused). Returns the bytes read.

    Raises: PayloadTooLarge (the request's: over the file or batch limit), and what reading the body raises.
    """
    idle, limit, read = settings.body_idle_timeout_s, min(settings.max_file_bytes, budget), 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal read
        while chunk := await within(idle, part.read_chunk(CHUNK)):
            read += len(chunk)
            yield chunk

    name: str | None = None
    if item.refusal is None and item.meta is not None:
        try:
            name = item.meta.file_name or (
                check_file_name(part.filename, field=f"items.{item.index}.file.filename") if part.filename else None
            )
        except ValidationFailed as exc:
            item.refusal = exc
    try:
        if item.refusal is not None:
            async for _ in chunks():
                if read > limit:
                    raise PayloadTooLarge(f"file is larger than the {limit}-byte limit", limit=limit)
            return read
        meta = item.meta
        assert meta is not None
        detected: list[str] = []

        def accept(head: bytes) -> None:
            detected.append(core.check_media_type(meta, sniff(head)))

        try:
            item.staged = await store.stage(chunks(), max_size=limit, accept=accept, expected_sha256=item.sha256)
        except (DigestMismatch, UnsupportedMediaType) as exc:  # the whole part was read: only this item is refused
            item.refusal = exc
            return read
    except PayloadTooLarge as exc:
        if limit < settings.max_file_bytes:
            raise PayloadTooLarge(f"the batch's files are larger than the {settings.max_batch_bytes}-byte limit",
                                  limit=settings.max_batch_bytes) from exc  # fmt: skip
        raise
    item.content = ContentInfo(sha256=item.staged.sha256, size=item.staged.content.size, media_type=detected[0],
                               file_name=name or item.staged.sha256)  # fmt: skip
    return read


async def publish_batch(
    items: list[BatchItem], *, publisher: EvidencePublisher, hold: Hold, forget: Callable[[str], Awaitable[None]],
    instance: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Publish every accepted item concurrently, each its own event; one answer per item, in order. An item refused
    now (a concurrent request won a race) has what it uploaded forgotten, as for a single upload."""

    async def one(item: BatchItem) -> dict[str, Any]:
        if item.refusal is not None:
            return _refused(item, item.refusal, instance)
        assert item.meta is not None
        assert item.content is not None
        assert item.staged is not None
        with hold(item.content.sha256):
            try:
                result = await publisher.publish(item.meta, item.content, idempotency_key=item.idempotency_key)
            except EvidenceHubError as exc:
                if item.staged.created and not isinstance(exc, PartialDelivery):  # partial: signed, referenced
                    await forget(item.content.sha256)
                return _refused(item, exc, instance)
            except Exception:  # a bug must not lose the answers of the other items
                log.exception("publishing item %d of a batch failed", item.index)
                return _refused(item, EvidenceHubError("the service failed; the incident is logged"), instance)
        return {"index": item.index, "item_id": result.item_id, "status": 200 if result.replayed else 201,
                "result": result.to_json()}  # fmt: skip

    return list(await asyncio.gather(*(one(item) for item in items)))


def _refused(item: BatchItem, exc: EvidenceHubError, instance: str) -> dict[str, Any]:
    document = problem_document(exc, instance=f"{instance}#items.{item.index}")
    return {"index": item.index, "item_id": item.item_id, "status": document["status"], "problem": document}
