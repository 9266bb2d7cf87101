"""``evhub publish``: an archivist's bulk upload of evidence files through the publisher API.

Owns: choosing the manifest rows to publish, hashing each file (its SHA-256 is the idempotency key, so a repeated
upload can never create a second event), sending small files several to a request (``POST /v1/evidence/batch``:
each still its own event with its own idempotency key and its own result) and large ones streamed one to a
request, a journal that makes a re-run skip what was already published, and the summary. Failures of single items
are reported, never fatal to the run. A publisher without the batch route gets one request per file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from services.cli.manifest import Entry
from services.publisher.core import request_fingerprint
from services.shared.errors import ConfigurationError, EvidenceHubError, InfrastructureError
from services.shared.media import HEAD_BYTES, sniff

CHUNK = 1 << 20
#: Requests in flight at once (``evhub publish --concurrency``).
DEFAULT_CONCURRENCY = 4
#: Files up to this size go several to a request: at most BATCH_ITEMS files and BATCH_BYTES bytes each (the
#: publisher's defaults allow 64 items and 64 MiB); they are read into memory once, hashed and sent from there.
BATCH_FILE_MAX = 1 << 20
BATCH_ITEMS = 32
BATCH_BYTES = 8 << 20


@dataclass
class Outcome:
    item_id: str
    file: str
    status: str  # published | already-published | failed
    sha256: str = ""
    media_type: str = ""
    size: int = 0
    event_id: str = ""
    version: int = 0
    jurisdictions: str = ""
    error: str = ""
    retriable: bool = False


class PublisherUnreachable(InfrastructureError):
    title = "Publisher unreachable"
    type_slug = "publisher-unreachable"


class Journal:
    """One JSON line per published item, fsynced: what a re-run may skip. Survives Ctrl-C and crashes."""

    def __init__(self, path: Path) -> None:
        """Raises: ConfigurationError if the journal can't be read or written (checked before anything is sent)."""
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        try:
            with path.open("a", encoding="utf-8"):
                pass
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigurationError(f"cannot use {path} as the resume journal: {exc.strerror}") from exc
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: that item is simply published (idempotently) again
            if isinstance(record, dict) and isinstance(record.get("item_id"), str):
                self.done[record["item_id"]] = record

    def skip(self, item_id: str, fingerprint: str) -> dict[str, Any] | None:
        record = self.done.get(item_id)
        return record if record is not None and record.get("fingerprint") == fingerprint else None

    def add(self, record: dict[str, Any]) -> None:
        """Raises: ConfigurationError if the journal can no longer be written (e.g. the disk is full)."""
        self.add_all([record])

    def add_all(self, records: Sequence[dict[str, Any]]) -> None:
        """Record several items with one fsync (safe from worker threads).

        Raises: ConfigurationError if the journal can no longer be written (e.g. the disk is full).
        """
        if not records:
            return
        with self._lock:
            try:
                with self.path.open("a", encoding="utf-8") as out:
                    out.write("".join(json.dumps(record) + "\n" for record in records))
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise ConfigurationError(f"cannot write the resume journal {self.path}: {exc.strerror}") from exc
            for record in records:
                self.done[record["item_id"]] = record


def _hash_file(path: Path) -> tuple[str, int, bytes]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
        digest.update(head)
        size += len(head)
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, head


async def _file_chunks(path: Path, advance: Callable[[int], None]) -> AsyncGenerator[bytes, None]:
    """The file in chunks, the next one read by a worker thread while this one is sent (two in memory)."""
    with path.open("rb") as f:
        ahead = asyncio.ensure_future(asyncio.to_thread(f.read, CHUNK))
        try:
            while chunk := await ahead:
                ahead = asyncio.ensure_future(asyncio.to_thread(f.read, CHUNK))
                advance(len(chunk))
                yield chunk
        finally:
            if not ahead.done():
                await asyncio.wait([ahead])  # the file is closed only once no thread reads it


def _problem_text(status: int, body: Any) -> str:
    if not isinstance(body, dict):
        return f"HTTP {status}"
    text = f"{status} {body.get('title', '')}: {body.get('detail', '')}".strip()
    errors = body.get("errors") or []
    if errors:
        text += " (" + "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors[:5]) + ")"
    failed = [d["jurisdiction"] for d in body.get("deliveries", []) if not d.get("delivered")]
    if failed:
        text += f" — not yet delivered to {', '.join(failed)}; run again to complete"
    return text


async def publish_one(
    session: aiohttp.ClientSession, url: str, entry: Entry, journal: Journal, advance: Callable[[int], None]
) -> Outcome:
    try:
        sha, size, head = await asyncio.to_thread(_hash_file, entry.path)
    except OSError as exc:
        return Outcome(entry.metadata.item_id, str(entry.path), "failed", error=f"cannot read the file: {exc.strerror}")
    outcome = Outcome(entry.metadata.item_id, str(entry.path), "failed", sha, sniff(head), size)
    fingerprint = request_fingerprint(entry.metadata, sha)
    previous = journal.skip(entry.metadata.item_id, fingerprint)
    if previous is not None:
        advance(size)
        outcome.status, outcome.event_id, outcome.version = "already-published", previous["event_id"], 1
        outcome.jurisdictions = ",".join(entry.metadata.jurisdictions)
        return outcome
    form = aiohttp.FormData()
    form.add_field("metadata", entry.metadata.model_dump_json(exclude_none=True), content_type="application/json")
    # The name the manifest check accepted (services.shared.filenames), never the raw name on disk.
    chunks = _file_chunks(entry.path, advance)
    form.add_field("file", chunks, filename=entry.metadata.file_name,
                   content_type="application/octet-stream")  # fmt: skip
    headers = {
        "Idempotency-Key": f"evhub-publish:{entry.metadata.item_id}:{sha}",
        # The publisher refuses the upload before committing anything if the bytes it gets are not these.
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:",
    }
    try:
        async with session.post(f"{url}/v1/evidence", data=form, headers=headers) as response:
            body = await response.json(content_type=None)
            if response.status not in (200, 201):
                outcome.error = _problem_text(response.status, body)
                outcome.retriable = response.status >= 500
                return outcome
    except aiohttp.ClientConnectorError as exc:  # nothing will get through: stop the batch, don't fail each item
        raise PublisherUnreachable(f"cannot reach the publisher at {url}: {exc}") from exc
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = f"the upload was interrupted: {exc.__class__.__name__}: {exc}"
        outcome.retriable = True
        return outcome
    finally:
        await chunks.aclose()  # the server may stop reading mid-file (refused, shutting down): close the file now
    if body.get("sha256") != sha:  # the file changed between hashing and upload: don't record a wrong digest
        got = str(body.get("sha256"))[:12]
        outcome.error = f"the file changed while it was sent (hashed {sha[:12]}…, the publisher got {got}…)"
        return outcome
    outcome.status = "published" if response.status == 201 else "already-published"
    outcome.event_id, outcome.version = body["event_id"], body["version"]
    outcome.media_type = body.get("media_type", outcome.media_type)
    outcome.jurisdictions = ",".join(d["jurisdiction"] for d in body["deliveries"])
    record = {"item_id": outcome.item_id, "sha256": sha, "fingerprint": fingerprint, "event_id": outcome.event_id}
    await asyncio.to_thread(journal.add, record)
    return outcome


def _read_and_hash(paths: Sequence[Path]) -> list[tuple[str, bytes] | OSError]:
    """Each small file's SHA-256 and bytes, in one worker-thread call for the whole batch."""
    read: list[tuple[str, bytes] | OSError] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            read.append(exc)
            continue
        read.append((hashlib.sha256(data).hexdigest(), data))
    return read


class BatchUnsupported(Exception):
    """The publisher has no batch route (an older one): send these files one to a request."""


async def publish_batch(
    session: aiohttp.ClientSession, url: str, entries: Sequence[Entry], journal: Journal,
    advance: Callable[[int], None],
) -> list[Outcome]:  # fmt: skip
    """Publish small files in one request, each its own event and result; what the journal holds is skipped.

    Raises:
        PublisherUnreachable: nothing will get through. BatchUnsupported: the publisher has no batch route.
        ConfigurationError: the journal can no longer be written.
    """
    read = await asyncio.to_thread(_read_and_hash, [e.path for e in entries])
    outcomes: list[Outcome] = []
    sending: list[tuple[Outcome, str, bytes]] = []  # (outcome, fingerprint, bytes)
    for entry, got in zip(entries, read, strict=True):
        meta = entry.metadata
        if isinstance(got, OSError):
            outcomes.append(Outcome(meta.item_id, str(entry.path), "failed",
                                    error=f"cannot read the file: {got.strerror}"))  # fmt: skip
            continue
        sha, data = got
        outcome = Outcome(meta.item_id, str(entry.path), "failed", sha, sniff(data[:HEAD_BYTES]), len(data))
        outcomes.append(outcome)
        fingerprint = request_fingerprint(meta, sha)
        previous = journal.skip(meta.item_id, fingerprint)
        if previous is not None:
            advance(len(data))
            outcome.status, outcome.event_id, outcome.version = "already-published", previous["event_id"], 1
            outcome.jurisdictions = ",".join(meta.jurisdictions)
            continue
        sending.append((outcome, fingerprint, data))
    if not sending:
        return outcomes
    by_id = {e.metadata.item_id: e for e in entries}
    form = aiohttp.FormData()
    listed = [{"metadata": json.loads(by_id[o.item_id].metadata.model_dump_json(exclude_none=True)), "sha256": o.sha256,
               "idempotency_key": f"evhub-publish:{o.item_id}:{o.sha256}"} for o, _, _ in sending]  # fmt: skip
    form.add_field("items", json.dumps({"items": listed}), content_type="application/json")
    for outcome, _, data in sending:
        form.add_field("file", data, filename=by_id[outcome.item_id].metadata.file_name,
                       content_type="application/octet-stream")  # fmt: skip
    try:
        async with session.post(f"{url}/v1/evidence/batch", data=form) as response:
            if response.status in (404, 405):
                raise BatchUnsupported(f"HTTP {response.status}")
            body = await response.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        raise PublisherUnreachable(f"cannot reach the publisher at {url}: {exc}") from exc
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        for outcome, _, data in sending:
            outcome.error, outcome.retriable = f"the upload was interrupted: {exc.__class__.__name__}: {exc}", True
            advance(len(data))
        return outcomes
    answers = body.get("items") if response.status == 200 and isinstance(body, dict) else None
    if not isinstance(answers, list) or len(answers) != len(sending):
        for outcome, _, data in sending:
            outcome.error, outcome.retriable = _problem_text(response.status, body), response.status >= 500
            advance(len(data))
        return outcomes
    records = []
    for (outcome, fingerprint, data), answer in zip(sending, answers, strict=True):
        advance(len(data))
        if _settle(outcome, answer):
            records.append({"item_id": outcome.item_id, "sha256": outcome.sha256, "fingerprint": fingerprint,
                            "event_id": outcome.event_id})  # fmt: skip
    await asyncio.to_thread(journal.add_all, records)
    return outcomes


def _settle(outcome: Outcome, answer: Any) -> bool:
    """Fill ``outcome`` from the batch's answer for it; True if it is published (to be journalled)."""
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, int):
        outcome.error = "the publisher's answer for this item is malformed"
        return False
    if status not in (200, 201):
        outcome.error, outcome.retriable = _problem_text(status, answer.get("problem")), status >= 500
        return False
    result = answer.get("result") or {}
    if result.get("sha256") != outcome.sha256:  # never journal a digest the publisher did not confirm
        outcome.error = f"the publisher confirmed another file ({str(result.get('sha256'))[:12]}…)"
        return False
    outcome.status = "published" if status == 201 else "already-published"
    outcome.event_id, outcome.version = result["event_id"], result["version"]
    outcome.media_type = result.get("media_type", outcome.media_type)
    outcome.jurisdictions = ",".join(d["jurisdiction"] for d in result["deliveries"])
    return True


def _groups(entries: Sequence[Entry]) -> list[list[int]]:
    """Indices of ``entries`` by request: small files several to a request (in manifest order), others alone."""
    groups: list[list[int]] = []
    batch: list[int] = []
    batched = 0
    for n, entry in enumerate(entries):
        try:
            size = entry.path.stat().st_size
        except OSError:
            size = BATCH_FILE_MAX + 1  # sent alone: its own request reports why it cannot be read
        if size > BATCH_FILE_MAX:
            groups.append([n])
            continue
        if len(batch) == BATCH_ITEMS or batched + size > BATCH_BYTES:
            groups.append(batch)
            batch, batched = [], 0
        batch.append(n)
        batched += size
    if batch:
        groups.append(batch)
    return groups


async def publish_all(
    entries: Sequence[Entry], *, url: str, ssl_context: ssl.SSLContext | None, journal: Journal, concurrency: int,
    on_progress: Callable[[int], None] = lambda n: None, on_done: Callable[[Outcome], None] = lambda o: None,
    batches: bool = True,
) -> list[Outcome]:  # fmt: skip
    """Publish every entry, at most ``concurrency`` requests at once (small files several to a request unless
    ``batches`` is off), in manifest order in the result.

    Raises: PublisherUnreachable, ConfigurationError (the journal) — the first one stops the rest.
    """
    semaphore = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False, limit=concurrency)
    outcomes: list[Outcome | None] = [None] * len(entries)
    groups = await asyncio.to_thread(_groups, entries) if batches else [[n] for n in range(len(entries))]
    use_batches = [batches]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(group: list[int]) -> None:
            async with semaphore:
                results: list[Outcome] | None = None
                if use_batches[0] and (len(group) > 1 or _small(entries[group[0]])):
                    try:
                        results = await publish_batch(session, url, [entries[n] for n in group], journal,
                                                      on_progress)  # fmt: skip
                    except BatchUnsupported:
                        use_batches[0] = False
                if results is None:
                    results = [await publish_one(session, url, entries[n], journal, on_progress) for n in group]
            for n, outcome in zip(group, results, strict=True):
                outcomes[n] = outcome
                on_done(outcome)

        try:
            async with asyncio.TaskGroup() as tasks:  # the first fatal error (unreachable, journal) stops the rest
                for group in groups:
                    tasks.create_task(send(group))
        except* EvidenceHubError as errors:
            raise errors.exceptions[0] from None
    return [o for o in outcomes if o is not None]


def _small(entry: Entry) -> bool:
    try:
        return entry.path.stat().st_size <= BATCH_FILE_MAX
    except OSError:
        return False


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("published", "already-published", "failed")}
    return {
        "total": len(outcomes), **counts, "retriable": sum(o.status == "failed" and o.retriable for o in outcomes),
        "bytes": sum(o.size for o in outcomes), "items": [asdict(o) for o in outcomes],
    }  # fmt: skip
