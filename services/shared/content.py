"""The content-addressed store for evidence files (the bytes never travel through Kafka).

Owns: the :class:`ContentStore` port and its embedded default, a local directory. Files are streamed in and out
in chunks (a multi-GB video never sits in memory), hashed while they stream, written to a temporary file that is
fsynced and renamed to ``<root>/sha256/<aa>/<digest>`` (atomic: a reader sees the whole file or none), and stored
once per digest. A write over the size limit is refused mid-stream and leaves nothing behind.

Two steps when the caller must decide after the bytes arrived and before they are kept: :meth:`stage` streams into
a temporary file and returns a :class:`Staged` upload, which the caller commits or discards. Temporary files left
by a process that died mid-upload are removed by :meth:`LocalContentStore.sweep` (at start-up: all of them; later:
those older than an age and not in use).

Does not own: what the content means or who may read it. An S3-compatible store implements the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from services.shared.errors import (
    DigestMismatch,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UploadInterrupted,
    ValidationFailed,
)
from services.shared.media import HEAD_BYTES

log = logging.getLogger(__name__)
CHUNK: Final = 1 << 20
#: Worker threads that fsync the files of one group commit at once (the file system joins concurrent fsyncs).
FSYNC_LANES: Final = 4
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredContent:
    sha256: str
    size: int
    head: bytes  # the first HEAD_BYTES bytes, for media-type detection


Acceptor = Callable[[bytes], None]


@dataclass
class Staged:
    """Bytes received in full and checked, not yet kept: :meth:`LocalContentStore.commit` or ``discard`` them."""

    content: StoredContent
    path: Path
    committed: bool = field(default=False)
    created: bool = field(default=False)  # the commit stored a file that was not there before

    @property
    def sha256(self) -> str:
        return self.content.sha256


class ContentStore(Protocol):
    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_size: int,
        accept: Acceptor | None = None,
        expected_sha256: str | None = None,
    ) -> StoredContent: ...
    async def stage(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_size: int,
        accept: Acceptor | None = None,
        expected_sha256: str | None = None,
    ) -> Staged: ...
    async def commit(self, staged: Staged) -> None: ...
    async def commit_all(self, staged: Sequence[Staged]) -> None: ...
    async def discard(self, staged: Staged) -> None: ...
    async def remove(self, sha256: str) -> bool: ...
    async def sweep(self, *, older_than_s: float = 0.0) -> tuple[int, int]: ...
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
        self._in_use: set[str] = set()  # temporary files of uploads in progress

    def path_of(self, sha256: str) -> Path:
        check_digest(sha256)
        return self._objects / sha256[:2] / sha256

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_size: int,
        accept: Acceptor | None = None,
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
        staged = await self.stage(chunks, max_size=max_size, accept=accept, expected_sha256=expected_sha256)
        try:
            await self.commit(staged)
        finally:
            await self.discard(staged)
        return staged.content

    async def stage(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_size: int,
        accept: Acceptor | None = None,
        expected_sha256: str | None = None,
    ) -> Staged:
        """Stream ``chunks`` into a temporary file and check them (as :meth:`put`), without keeping them yet.

        Raises: as :meth:`put`; on any error nothing is left behind.
        """
        tmp = self._tmp / f"in-{secrets.token_hex(12)}"
        self._in_use.add(tmp.name)
        sink = _Sink(tmp)  # the file is created by the first write, in a worker thread
        size, head = 0, bytearray()
        batch: list[bytes] = []
        batched = 0
        writing: asyncio.Future[None] | None = None  # the previous batch, hashed and written by a worker thread
        try:
            async for chunk in _from_client(chunks):
                size += len(chunk)
                if size > max_size:
                    raise PayloadTooLarge(f"file is larger than the {max_size}-byte limit", limit=max_size)
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                batch.append(chunk)
                batched += len(chunk)
                if batched >= CHUNK:  # one thread hand-off per MiB; the loop reads the next one meanwhile
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(asyncio.to_thread(sink.write, batch))
                    batch, batched = [], 0
            if writing is not None:
                await writing
            await asyncio.to_thread(sink.finish, batch)  # a small file: this is its only hand-off
            received = sink.digest.hexdigest()
            if expected_sha256 is not None and received != expected_sha256:
                raise DigestMismatch(f"the file received has SHA-256 {received}, the sender announced "
                                     f"{expected_sha256}", received=received, announced=expected_sha256)  # fmt: skip
            if accept is not None:
                accept(bytes(head))
        except BaseException as exc:
            self._in_use.discard(tmp.name)
            if writing is not None:
                writing.cancel()  # its outcome no longer matters; discard() waits for the thread itself
            await asyncio.to_thread(sink.discard)
            if isinstance(exc, OSError):
                raise StoreUnavailable(f"content store write failed: {exc.strerror}") from exc
            raise
        return Staged(StoredContent(sha256=received, size=size, head=bytes(head)), tmp)

    async def commit(self, staged: Staged) -> None:
        """Keep staged bytes under their digest (once per digest): fsync the file, rename it, fsync the directory.

        Raises:
            StoreUnavailable: the disk failed.
        """
        await self.commit_all([staged])

    async def commit_all(self, staged: Sequence[Staged]) -> None:
        """Keep several staged uploads at once, their fsyncs grouped: every new file's in parallel (the file
        system commits concurrent fsyncs together), then the renames, then one fsync per directory.

        Raises:
            StoreUnavailable: the disk failed; what was renamed before stays kept, the rest stays staged.
        """
        todo = [s for s in staged if not s.committed]
        if not todo:
            return
        try:
            fresh = await asyncio.to_thread(self._absent, todo)
            lanes = [[s.path for s in fresh[i::FSYNC_LANES]] for i in range(min(FSYNC_LANES, len(fresh)))]
            await asyncio.gather(*(asyncio.to_thread(_fsync_all, lane) for lane in lanes))
            await asyncio.to_thread(self._place, todo, fresh)
        except OSError as exc:
            raise StoreUnavailable(f"content store write failed: {exc.strerror}") from exc

    async def discard(self, staged: Staged) -> None:
        """Drop staged bytes that were not committed (a no-op after :meth:`commit`)."""
        self._in_use.discard(staged.path.name)
        await asyncio.to_thread(staged.path.unlink, missing_ok=True)

    async def remove(self, sha256: str) -> bool:
        """Remove stored content (a refused request's upload that nothing references). Returns whether it existed.

        Raises:
            StoreUnavailable: the disk failed.
        """
        try:
            path = self.path_of(sha256)
            existed = await asyncio.to_thread(path.is_file)
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"content store removal failed: {exc.strerror}") from exc
        return existed

    async def sweep(self, *, older_than_s: float = 0.0) -> tuple[int, int]:
        """Remove temporary files not in use by this process and older than ``older_than_s`` (0: all of them, as at
        start-up, when nothing can be in use). Returns (files, bytes) removed."""
        return await asyncio.to_thread(self._sweep, older_than_s, frozenset(self._in_use))

    def _sweep(self, older_than_s: float, in_use: frozenset[str]) -> tuple[int, int]:
        cutoff = time.time() - older_than_s
        files = size = 0
        for path in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                if path.name in in_use or not path.is_file() or info.st_mtime > cutoff:
                    continue
                path.unlink()
                files, size = files + 1, size + info.st_size
        if files:
            log.warning("removed %d temporary files (%d bytes) left by interrupted uploads", files, size)
        return files, size

    def _absent(self, staged: list[Staged]) -> list[Staged]:
        """The uploads whose digest is not stored yet (the first of several with the same digest)."""
        seen: set[str] = set()
        fresh = []
        for item in staged:
            if item.sha256 not in seen and not self.path_of(item.sha256).exists():
                fresh.append(item)
            seen.add(item.sha256)
        return fresh

    def _place(self, staged: list[Staged], fresh: list[Staged]) -> None:
        """Rename the fsynced new files into place and fsync their directories once each; drop the duplicates."""
        new = {id(item) for item in fresh}
        folders: dict[Path, None] = {}
        for item in staged:
            if id(item) in new:
                final = self.path_of(item.sha256)
                final.parent.mkdir(exist_ok=True)
                os.replace(item.path, final)
                folders[final.parent] = None
            else:  # same bytes → stored once
                item.path.unlink(missing_ok=True)
            item.committed, item.created = True, id(item) in new
            self._in_use.discard(item.path.name)
        for folder in folders:
            _fsync(folder)  # make the renames themselves durable

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


class _Sink:
    """One upload's temporary file and its running SHA-256, fed from worker threads one batch at a time (hashing
    and writing release the interpreter lock, so the event loop keeps reading the next batch meanwhile). The file
    is created by the first write (a small upload costs one hand-off in all); a lock makes :meth:`discard` wait for
    a write still in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self._out: BinaryIO | None = None
        self._lock = threading.Lock()

    def _write(self, chunks: list[bytes]) -> BinaryIO:
        if self._out is None:
            self._out = self.path.open("xb")
        for chunk in chunks:
            self.digest.update(chunk)
            self._out.write(chunk)
        return self._out

    def write(self, chunks: list[bytes]) -> None:
        with self._lock:
            self._write(chunks)

    def finish(self, chunks: list[bytes]) -> None:
        """The last bytes; the file is closed (its bytes are fsynced when it is committed)."""
        with self._lock:
            self._write(chunks).close()

    def discard(self) -> None:
        with self._lock:
            if self._out is not None:
                self._out.close()
            self.path.unlink(missing_ok=True)


def _fsync_all(paths: list[Path]) -> None:
    for path in paths:
        _fsync(path)


def _fsync(path: Path) -> None:
    """Make a file's bytes (or a directory's entries) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
