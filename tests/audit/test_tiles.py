"""C2SP tlog-tiles: paths as the spec spells them, the tiled tree agrees with plain RFC 6962, proofs from tiles."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit import merkle, tiles
from services.audit.tiles import ENTRIES, Tile, TiledTree, TileNodeReader
from services.shared.errors import DecodeError, InvalidProof


@pytest.mark.parametrize(
    ("tile", "path"),
    [
        (Tile(0, 0), "tile/0/000"),
        (Tile(0, 1234067), "tile/0/x001/x234/067"),
        (Tile(1, 999, 17), "tile/1/999.p/17"),
        (Tile(2, 1000, 1), "tile/2/x001/000.p/1"),
        (Tile(ENTRIES, 5), "tile/entries/005"),
        (Tile(ENTRIES, 273, 112), "tile/entries/273.p/112"),
    ],
)
def test_paths_are_spelled_as_the_spec_says_and_parse_back(tile: Tile, path: str) -> None:
    assert tile.path == path
    assert tiles.parse_path(path) == tile


@pytest.mark.parametrize(
    "path",
    ["tile/0/0", "tile/0/1234", "tile/0/x000/001", "tile/0/001.p/256", "tile/0/001.p/0", "tile/0/001.p/07",
     "tile/64/000", "tile/01/000", "tile/0/001/", "tile/0/../000", "tile/0/x001", "tile/data/000", "/tile/0/000"],
)  # fmt: skip
def test_non_canonical_paths_are_refused(path: str) -> None:
    with pytest.raises(DecodeError):
        tiles.parse_path(path)


def test_the_spec_example_of_a_tree_of_70000() -> None:
    # "273 full level 0 tiles, one partial level 0 tile of width 112, one full level 1 tile, one partial level 1
    # tile of width 17, and one partial level 2 tile of width 1"
    assert tiles.tiles_for_size(70_000) == [Tile(0, 273, 112), Tile(1, 1, 17), Tile(2, 0, 1)]
    assert tiles.tiles_for_size(256) == [Tile(1, 0, 1)]


def _entries(n: int, start: int = 0) -> list[bytes]:
    return [f"entry {i}".encode() for i in range(start, start + n)]


class Store:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, tile: Tile) -> bytes:
        return self.files[tile.path]


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=6))
def test_any_batching_gives_the_rfc6962_root_and_the_same_tiles(batches: list[int]) -> None:
    tree, store, total = TiledTree(), Store(), 0
    for n in batches:
        for w in tree.append(_entries(n, total)):
            assert store.files.setdefault(w.tile.path, w.data) == w.data  # a path never holds two contents
        total += n
        leaves = [merkle.leaf_hash(e) for e in _entries(total)]
        assert tree.size == total
        assert tree.root() == merkle.root_of(leaves)
        assert merkle.tree_root(TileNodeReader(total, store.read), total) == tree.root()
        restored = TiledTree.restore(total, store.read)
        assert restored.root() == tree.root()


def test_tiles_and_bundles_hold_the_hashes_and_entries() -> None:
    tree, store = TiledTree(), Store()
    for w in tree.append(_entries(70_000)):
        store.files[w.tile.path] = w.data
    leaves = [merkle.leaf_hash(e) for e in _entries(70_000)]
    assert tiles.tile_hashes(store.files["tile/0/005"], Tile(0, 5)) == leaves[1280:1536]
    assert tiles.bundle_entries(store.files["tile/entries/273.p/112"], Tile(ENTRIES, 273, 112)) == _entries(112, 69_888)
    assert store.files["tile/1/000"][:32] == merkle.root_of(leaves[:256])
    assert "tile/2/000.p/1" in store.files
    assert "tile/1/001.p/17" in store.files
    reader = TileNodeReader(70_000, store.read)
    for index, size in [(0, 70_000), (69_999, 70_000), (65_535, 65_537), (12_345, 40_000)]:
        proof = merkle.inclusion_proof(reader, index, size)
        merkle.verify_inclusion(index, size, leaves[index], proof, merkle.root_of(leaves[:size]))
    proof = merkle.consistency_proof(reader, 1000, 70_000)
    merkle.verify_consistency(1000, 70_000, merkle.root_of(leaves[:1000]), tree.root(), proof)


def test_a_bundle_with_a_changed_length_prefix_names_the_entry() -> None:
    tree, store = TiledTree(), Store()
    for w in tree.append(_entries(300)):
        store.files[w.tile.path] = w.data
    data = bytearray(store.files["tile/entries/001.p/44"])
    data[0] ^= 0x01
    with pytest.raises(InvalidProof) as info:
        tiles.bundle_entries(bytes(data), Tile(ENTRIES, 1, 44))
    assert info.value.index is not None
    assert 256 <= info.value.index < 300


def test_an_entry_too_large_for_a_bundle_is_refused_and_changes_nothing() -> None:
    tree = TiledTree()
    tree.append(_entries(3))
    with pytest.raises(ValueError, match="does not fit"):
        tree.append([b"ok", b"x" * 65_536])
    assert tree.size == 3


def test_a_changed_interior_full_tile_fails_when_read_for_a_proof() -> None:
    tree, store = TiledTree(), Store()
    for w in tree.append(_entries(1000)):
        store.files[w.tile.path] = w.data
    data = bytearray(store.files["tile/0/001"])
    data[40] ^= 1
    store.files["tile/0/001"] = bytes(data)
    with pytest.raises(InvalidProof, match=r"does not match its hash in tile/1/000\.p/3") as info:
        merkle.inclusion_proof(TileNodeReader(1000, store.read), 300, 1000)
    assert info.value.index == 256
