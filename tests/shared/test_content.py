"""The local content store on a real filesystem: streaming, dedup, size limits, reading back, safe digests."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Final

import pytest

from services.shared.content import LocalContentStore, check_digest
from services.shared.errors import NotFound, PayloadTooLarge, UnsupportedMediaType, UploadInterrupted, ValidationFailed
from services.shared.media import HEAD_BYTES
from tests.waiting import until

MIB: Final = 1 << 20


def _chunk(index: int) -> bytes:
    """1 MiB of bytes that differ per chunk (so a dropped or reordered chunk changes the digest)."""
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * (MIB // 32)


async def _stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _read_all(store: LocalContentStore, sha256: str, *, offset: int = 0) -> bytes:
    return b"".join([chunk async for chunk in store.read(sha256, offset=offset)])


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


async def test_a_64_mib_file_streams_in_with_its_digest_and_size(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    expected = hashlib.sha256()
    for i in range(64):
        expected.update(_chunk(i))
    stored = await store.put(_stream(_chunk(i) for i in range(64)), max_size=64 * MIB)
    assert stored.sha256 == expected.hexdigest()
    assert stored.size == 64 * MIB == await store.size(stored.sha256)
    assert stored.head == _chunk(0)[:HEAD_BYTES]
    assert store.path_of(stored.sha256) == tmp_path / "sha256" / stored.sha256[:2] / stored.sha256
    streamed = hashlib.sha256()
    async for chunk in store.read(stored.sha256):
        streamed.update(chunk)
    assert streamed.hexdigest() == stored.sha256
    assert _files(tmp_path / "tmp") == []


async def test_the_same_bytes_are_stored_once(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    first = await store.put(_stream([b"photo ", b"bytes"]), max_size=100)
    second = await store.put(_stream([b"photo bytes"]), max_size=100)  # other chunking, same content
    assert first == second
    assert _files(tmp_path) == [store.path_of(first.sha256)]
    assert first.sha256 == hashlib.sha256(b"photo bytes").hexdigest()


async def test_different_bytes_are_stored_apart(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    a = await store.put(_stream([b"a"]), max_size=10)
    b = await store.put(_stream([b"b"]), max_size=10)
    assert a.sha256 != b.sha256
    assert sorted(_files(tmp_path)) == sorted([store.path_of(a.sha256), store.path_of(b.sha256)])


@pytest.mark.parametrize(
    ("chunks", "max_size"),
    [([b"x" * 11], 10), ([b"x" * 6, b"x" * 5], 10), ([_chunk(0)] * 3, 2 * MIB + 1)],
    ids=["one_chunk_over", "over_on_the_second_chunk", "over_after_megabytes"],
)
async def test_over_max_size_is_refused_and_leaves_nothing(tmp_path: Path, chunks: list[bytes], max_size: int) -> None:
    store = LocalContentStore(tmp_path)
    with pytest.raises(PayloadTooLarge):
        await store.put(_stream(chunks), max_size=max_size)
    assert _files(tmp_path) == []


async def test_exactly_max_size_is_accepted(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    stored = await store.put(_stream([b"x" * 6, b"x" * 4]), max_size=10)
    assert stored.size == 10


async def test_an_upload_cancelled_midway_leaves_nothing(tmp_path: Path) -> None:
    """aiohttp cancels the handler when the client goes away: the half-written file must not stay behind."""
    first_chunk_taken, never = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield _chunk(0)  # a whole MiB: handed to a worker thread, which creates the file and writes it
        yield b"part of a file"
        first_chunk_taken.set()
        await never.wait()
        yield b"never sent"

    store = LocalContentStore(tmp_path)
    upload = asyncio.create_task(store.put(stalled(), max_size=4 * MIB))
    await asyncio.wait_for(first_chunk_taken.wait(), timeout=10)
    await until("the upload is in progress, in the tmp folder", 10, lambda: len(_files(tmp_path / "tmp")) == 1)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert _files(tmp_path) == []


async def test_a_refused_upload_leaves_nothing(tmp_path: Path) -> None:
    def refuse(head: bytes) -> None:
        raise UnsupportedMediaType(f"declared image/jpeg but the bytes start {head[:4]!r}")

    store = LocalContentStore(tmp_path)
    with pytest.raises(UnsupportedMediaType):
        await store.put(_stream([b"%PDF-1.7 ..."]), max_size=MIB, accept=refuse)
    assert _files(tmp_path) == []


async def test_read_streams_back_identical_bytes_and_from_an_offset(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    content = _chunk(1) + _chunk(2) + b"tail"
    stored = await store.put(_stream([content[:1000], content[1000:]]), max_size=4 * MIB)
    assert await _read_all(store, stored.sha256) == content
    assert await _read_all(store, stored.sha256, offset=MIB + 3) == content[MIB + 3 :]
    assert await _read_all(store, stored.sha256, offset=len(content)) == b""
    assert await store.exists(stored.sha256)


async def test_an_empty_file_is_content_too(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    stored = await store.put(_stream([]), max_size=10)
    assert (stored.sha256, stored.size, stored.head) == (hashlib.sha256(b"").hexdigest(), 0, b"")
    assert await _read_all(store, stored.sha256) == b""


async def test_unknown_digest_is_not_found(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path)
    unknown = hashlib.sha256(b"never stored").hexdigest()
    assert not await store.exists(unknown)
    with pytest.raises(NotFound):
        await store.size(unknown)
    with pytest.raises(NotFound):
        await _read_all(store, unknown)


BAD_DIGESTS: Final[list[tuple[str, str]]] = [
    ("parent_traversal", "../../etc/passwd"),
    ("traversal_padded_to_64", "../.." + "a" * 59),
    ("absolute_path", "/" + "a" * 63),
    ("upper_case_hex", "AB" * 32),
    ("too_short", "ab" * 31),
    ("too_long", "ab" * 33),
    ("trailing_newline", "ab" * 32 + "\n"),
    ("empty", ""),
    ("not_hex", "zz" * 32),
]


@pytest.mark.parametrize("digest", [row[1] for row in BAD_DIGESTS], ids=[row[0] for row in BAD_DIGESTS])
async def test_digests_with_path_characters_are_refused(tmp_path: Path, digest: str) -> None:
    store = LocalContentStore(tmp_path / "store")
    (tmp_path / "secret").write_bytes(b"outside the store")
    with pytest.raises(ValidationFailed):
        check_digest(digest)
    with pytest.raises(ValidationFailed):
        await store.exists(digest)
    with pytest.raises(ValidationFailed):
        await store.size(digest)
    with pytest.raises(ValidationFailed):
        await _read_all(store, digest)


async def test_a_client_that_disconnects_mid_upload_is_not_a_store_failure_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path / "store")

    async def broken() -> AsyncIterator[bytes]:
        yield b"\xff\xd8\xff" + bytes(1000)
        raise ConnectionResetError("peer went away")

    with pytest.raises(UploadInterrupted) as caught:
        await store.put(broken(), max_size=1 << 20)
    assert caught.value.http_status == 400
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


async def test_sweep_removes_old_temporary_files_but_never_an_upload_in_progress(tmp_path: Path) -> None:
    import os
    import time

    store = LocalContentStore(tmp_path / "store")
    leftover = tmp_path / "store" / "tmp" / "in-leftover"
    leftover.write_bytes(b"x" * 100)
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    fresh = tmp_path / "store" / "tmp" / "in-fresh"
    fresh.write_bytes(b"y")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"in progress"

    staged = await store.stage(chunks(), max_size=1 << 20)
    os.utime(staged.path, (old, old))  # old, but its upload is not finished: never swept
    assert await store.sweep(older_than_s=3600) == (1, 100)
    assert not leftover.exists()
    assert fresh.exists()
    assert staged.path.exists()
    await store.commit(staged)
    assert await store.sweep() == (1, 1), "at start-up every temporary file is a leftover"
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
