"""Recomputing the log from its entries: a changed byte, a deleted or inserted entry, a changed tile — each named."""

from __future__ import annotations

import pytest

from services.audit.checkpoint import Checkpoint
from services.audit.tiles import Tile, TiledTree
from services.audit.verify import Recomputation, verify_entries
from services.shared.errors import InvalidProof

N = 70_000


@pytest.fixture(scope="module")
def log() -> tuple[list[bytes], dict[str, bytes], Checkpoint]:
    entries = [f"entry number {i}".encode() for i in range(N)]
    tree, files = TiledTree(), {}
    for w in tree.append(entries):
        files[w.tile.path] = w.data
    return entries, files, Checkpoint("o.example/log", N, tree.root())


def test_an_intact_copy_verifies(log: tuple[list[bytes], dict[str, bytes], Checkpoint]) -> None:
    entries, files, cp = log
    verify_entries(entries, cp, stored=lambda t: files[t.path])
    verify_entries(iter(entries), cp)


@pytest.mark.parametrize("index", [0, 255, 256, 12_345, N - 1])
def test_one_changed_byte_in_an_entry_is_named(
    log: tuple[list[bytes], dict[str, bytes], Checkpoint], index: int
) -> None:
    entries, files, cp = log
    copy = list(entries)
    copy[index] = copy[index][:-1] + bytes([copy[index][-1] ^ 1])
    with pytest.raises(InvalidProof) as info:
        verify_entries(copy, cp, stored=lambda t: files[t.path])
    assert info.value.index == index
    with pytest.raises(InvalidProof, match="root"):  # without tiles, the root still catches it
        verify_entries(copy, cp)


TILE_CHANGES = [("tile/0/010", 32 * 7 + 3, 2567), ("tile/1/000", 32 * 2, 512), ("tile/0/273.p/112", 0, 69_888),
                ("tile/2/000.p/1", 31, 0)]  # fmt: skip


@pytest.mark.parametrize(("path", "byte", "index"), TILE_CHANGES)
def test_one_changed_byte_in_a_tile_is_named(
    log: tuple[list[bytes], dict[str, bytes], Checkpoint], path: str, byte: int, index: int
) -> None:
    entries, files, cp = log
    tampered = dict(files)
    data = bytearray(tampered[path])
    data[byte] ^= 0x80
    tampered[path] = bytes(data)
    with pytest.raises(InvalidProof) as info:
        verify_entries(entries, cp, stored=lambda t: tampered[t.path])
    assert info.value.index == index


def test_a_deleted_or_inserted_entry_is_named(log: tuple[list[bytes], dict[str, bytes], Checkpoint]) -> None:
    entries, files, cp = log
    with pytest.raises(InvalidProof) as info:
        verify_entries(entries[:500] + entries[501:], cp, stored=lambda t: files[t.path])
    assert info.value.index == 500
    with pytest.raises(InvalidProof) as info:
        verify_entries([*entries[:500], b"inserted", *entries[500:]], cp, stored=lambda t: files[t.path])
    assert info.value.index == 500
    with pytest.raises(InvalidProof, match="entry 69999 is missing"):  # the last one: only the size tells
        verify_entries(entries[:-1], cp)


def test_the_recomputation_is_incremental() -> None:
    check = Recomputation()
    check.add([b"a", b"b"])
    check.add([b"c"])
    tree = TiledTree()
    tree.append([b"a", b"b", b"c"])
    check.finish(Checkpoint("o.example/log", 3, tree.root()))
    assert check.size == 3
    assert Tile(0, 0, 3).path == "tile/0/000.p/3"
