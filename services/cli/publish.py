"""``evhub publish``: an archivist's bulk upload of evidence files through the publisher API.

Owns: choosing the manifest rows to publish, hashing each file (its SHA-256 is the idempotency key, so a repeated
upload can never create a second event), streaming uploads with a progress bar, a journal that makes a re-run skip
what was already published, and the summary. Failures of single items are reported, never fatal to the batch.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
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
#: Uploads in flight at once (``evhub publish --concurrency``).
DEFAULT_CONCURRENCY = 4


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
        self.done[record["item_id"]] = record
        try:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise ConfigurationError(f"cannot write the resume journal {self.path}: {exc.strerror}") from exc


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
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            advance(len(chunk))
            yield chunk


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
    journal.add({"item_id": outcome.item_id, "sha256": sha, "fingerprint": fingerprint, "event_id": outcome.event_id})
    return outcome


async def publish_all(
    entries: Sequence[Entry], *, url: str, ssl_context: ssl.SSLContext | None, journal: Journal, concurrency: int,
    on_progress: Callable[[int], None] = lambda n: None, on_done: Callable[[Outcome], None] = lambda o: None,
) -> list[Outcome]:  # fmt: skip
    """Publish every entry, at most ``concurrency`` at once, in manifest order in the result."""
    semaphore = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def bounded(entry: Entry) -> Outcome:
            async with semaphore:
                outcome = await publish_one(session, url, entry, journal, on_progress)
                on_done(outcome)
                return outcome

        try:
            async with asyncio.TaskGroup() as group:  # the first fatal error (unreachable, journal) stops the rest
                tasks = [group.create_task(bounded(e)) for e in entries]
        except* EvidenceHubError as errors:
            raise errors.exceptions[0] from None
        return [t.result() for t in tasks]


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("published", "already-published", "failed")}
    return {
        "total": len(outcomes), **counts, "retriable": sum(o.status == "failed" and o.retriable for o in outcomes),
        "bytes": sum(o.size for o in outcomes), "items": [asdict(o) for o in outcomes],
    }  # fmt: skip
