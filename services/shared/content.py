"""The content-addressed store for evidence files (the bytes never travel through Kafka).

Owns: the :class:`ContentStore` port and its embedded default, a local directory. Files are streamed in and out
in chunks (a multi-GB video never sits in memory), hashed while they stream, written to a temporary file that is
fsynced and renamed to ``<root>/sha256/<aa>/<digest>`` (atomic: a reader sees the whole file or none), and stored
once per digest. A write over the size limit is refused mid-stream and leaves nothing behind.

Does not own: what the content means or who may read it. An S3-compatible store implements the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from services.shared.errors import (
    DigestMismatch,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UploadInterrupted,
    ValidationFailed,
)
from services.shared.media import HEAD_BYTES

CHUNK: Final = 1 << 20
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredContent:
    sha256: str
    size: int
    head: bytes  # the first HEAD_BYTES bytes, for media-type detection


Acceptor = Callable[[bytes], None]


class ContentStore(Protocol):
    async def put(
        self, chunks: AsyncIterable[bytes], *, max_size: int, accept: Acceptor | None = None,
        expected_sha256: str | None = None,
    ) -> StoredContent: ...
    async def exists(self, sha256: str) -> bool: ...
    async def size(self, sha256: str) -> int: ...
    def read(self, sha256: str, *, offset: int = 0) -> AsyncIterator[bytes]: ...


def check_digest(sha256: str) -> str:
    """Raises: ValidationFailed unless ``sha256`` is 64 lower-case hex characters (also keeps paths safe)."""
    if not _DIGEST.fullmatch(sha256):
        raise ValidationFailed("not a SHA-256 hex digest", errors=[{"field": "sha256", "message": "64 hex chars"}])
    return sha256


class LocalContentStore:
    """A directory on local disk. File I/O runs in worker threads so the event loop keeps serving."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._objects = root / "sha256"
        self._tmp = root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        check_digest(sha256)
        return self._objects / sha256[:2] / sha256

    async def put(
        self, chunks: AsyncIterable[bytes], *, max_size: int, accept: Acceptor | None = None,
        expected_sha256: str | None = None,
    ) -> StoredContent:
        """Stream ``chunks`` into the store. ``accept(head)`` runs after the last byte arrived and before anything
        is committed: whatever it raises aborts the write and leaves nothing behind (e.g. a media-type check).
        ``expected_sha256``, if given, must be the digest of what arrived, or nothing is kept.

        Raises:
            DigestMismatch: the bytes are not the ones the sender hashed (changed or corrupted on the way).
            PayloadTooLarge: more than ``max_size`` bytes arrived (nothing is kept).
            UploadInterrupted: the source of ``chunks`` failed (e.g. the client disconnected); nothing is kept.
            StoreUnavailable: the disk failed (full, read-only, …).
        """
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=self._tmp, prefix="in-")
        tmp = Path(tmp_name)
        digest, size, head = hashlib.sha256(), 0, bytearray()
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in _from_client(chunks):
                    size += len(chunk)
                    if size > max_size:
                        raise PayloadTooLarge(f"file is larger than the {max_size}-byte limit", limit=max_size)
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
                if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                    raise DigestMismatch(
                        f"the file received has SHA-256 {digest.hexdigest()}, the sender announced {expected_sha256}",
                        received=digest.hexdigest(), announced=expected_sha256,
                    )
                if accept is not None:
                    accept(bytes(head))
                await asyncio.to_thread(_flush_and_sync, out)
            sha = digest.hexdigest()
            await asyncio.to_thread(self._commit, tmp, sha)
        except OSError as exc:
            raise StoreUnavailable(f"content store write failed: {exc.strerror}") from exc
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        return StoredContent(sha256=sha, size=size, head=bytes(head))

    def _commit(self, tmp: Path, sha: str) -> None:
        final = self.path_of(sha)
        if final.exists():  # same bytes → stored once
            return
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path_of(sha256).is_file)

    async def size(self, sha256: str) -> int:
        try:
            return (await asyncio.to_thread(self.path_of(sha256).stat)).st_size
        except FileNotFoundError as exc:
            raise NotFound("no such content") from exc

    async def read(self, sha256: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream stored content from ``offset``.

        Raises:
            NotFound: nothing is stored under that digest.
        """
        try:
            handle = await asyncio.to_thread(self.path_of(sha256).open, "rb")
        except FileNotFoundError as exc:
            raise NotFound("no such content") from exc
        try:
            await asyncio.to_thread(handle.seek, offset)
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                yield chunk
        finally:
            handle.close()


async def _from_client(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Tell a failing source (a client gone mid-upload) apart from a failing disk: only the latter is a 503."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except OSError as exc:
            raise UploadInterrupted(f"the upload stopped before its end: {exc.__class__.__name__}") from exc
        yield chunk


def _flush_and_sync(out: object) -> None:
    from io import BufferedWriter

    assert isinstance(out, BufferedWriter)
    out.flush()
    os.fsync(out.fileno())
