"""C2SP tlog-tiles: tile and entry-bundle paths and bytes, the append-only tiled tree, and proofs from tiles.

Owns:
- paths: ``tile/<L>/<N>[.p/<W>]`` and ``tile/entries/<N>[.p/<W>]`` with ``<N>`` in zero-padded 3-digit elements,
  all but the last prefixed by ``x`` (1234067 → ``x001/x234/067``); parsing them back, strictly;
- bytes: a tile is its hashes concatenated (a full tile is 256 hashes, 8,192 bytes); an entry bundle is its
  entries, each prefixed by its length as a big-endian uint16;
- :class:`TiledTree`: the right edge of the tree (the partial tile of every level and the partial entry bundle),
  which integrates a batch of entries and returns every tile and bundle to write, and gives the root;
- :class:`TileNodeReader`: any perfect-subtree hash of a tree of a given size, read from its tiles, so that
  :mod:`merkle` can generate inclusion and consistency proofs from stored tiles.

Pure: no I/O (tiles are read through a callable), no clock. Does not own storing tiles (the service's tile store).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from services.audit import merkle
from services.shared.errors import DecodeError, InvalidProof

TILE_HEIGHT: Final = 8
TILE_WIDTH: Final = 1 << TILE_HEIGHT
MAX_LEVEL: Final = 63
#: The largest entry a bundle can carry (its length prefix is a uint16).
MAX_ENTRY_BYTES: Final = 0xFFFF
ENTRIES: Final = -1  # the "level" of entry bundles in a :class:`Tile`


@dataclass(frozen=True, order=True)
class Tile:
    """A tile (``level`` ≥ 0) or an entry bundle (``level == ENTRIES``): its index and width (1..256)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    @property
    def path(self) -> str:
        level = "entries" if self.level == ENTRIES else str(self.level)
        suffix = "" if self.width == TILE_WIDTH else f".p/{self.width}"
        return f"tile/{level}/{encode_index(self.index)}{suffix}"

    @property
    def is_bundle(self) -> bool:
        return self.level == ENTRIES


def encode_index(n: int) -> str:
    """1234067 → ``x001/x234/067``; 0 → ``000``."""
    if n < 0:
        raise ValueError(f"negative tile index {n}")
    groups = []
    while True:
        groups.append(f"{n % 1000:03d}")
        n //= 1000
        if n == 0:
            break
    groups.reverse()
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


_PATH = re.compile(r"^tile/(entries|0|[1-9][0-9]?)/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?$")


def parse_path(path: str) -> Tile:
    """The tile or bundle named by ``path`` (relative to the log's prefix), refusing every non-canonical spelling.

    Raises:
        DecodeError: not a canonical tile or entry-bundle path.
    """
    m = _PATH.fullmatch(path)
    if m is None:
        raise DecodeError(f"not a tile path: {path[:80]!r}")
    level_text, index_text, width_text = m.groups()
    level = ENTRIES if level_text == "entries" else int(level_text)
    width = TILE_WIDTH if width_text is None else int(width_text)
    if level > MAX_LEVEL or not 1 <= width < TILE_WIDTH + (width_text is None):
        raise DecodeError(f"not a tile path: {path[:80]!r}")
    groups = index_text.split("/")
    index = int("".join(g.lstrip("x") for g in groups))
    if len(groups) > 1 and groups[0] == "x000":  # leading zero groups are not canonical
        raise DecodeError(f"not a tile path: {path[:80]!r}")
    return Tile(level, index, width)


def tile_bytes(hashes: Sequence[bytes]) -> bytes:
    return b"".join(hashes)


def tile_hashes(data: bytes, tile: Tile) -> list[bytes]:
    """Raises: InvalidProof if ``data`` is not exactly ``tile.width`` hashes (names the tile's first leaf)."""
    if len(data) != tile.width * merkle.HASH_SIZE:
        raise InvalidProof(f"{tile.path} holds {len(data)} bytes, not {tile.width * merkle.HASH_SIZE}",
                           index=first_leaf(tile))  # fmt: skip
    return [data[i : i + merkle.HASH_SIZE] for i in range(0, len(data), merkle.HASH_SIZE)]


def first_leaf(tile: Tile) -> int:
    level = 0 if tile.is_bundle else tile.level
    return int(tile.index * TILE_WIDTH ** (level + 1))


def bundle_bytes(entries: Iterable[bytes]) -> bytes:
    """Raises: ValueError for an empty entry or one over 65,535 bytes (a bug upstream: entries are bounded)."""
    out = bytearray()
    for entry in entries:
        if not 0 < len(entry) <= MAX_ENTRY_BYTES:
            raise ValueError(f"an entry of {len(entry)} bytes does not fit an entry bundle")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def bundle_entries(data: bytes, tile: Tile) -> list[bytes]:
    """The entries of a bundle, exactly ``tile.width`` of them, consuming every byte.

    Raises:
        InvalidProof: a truncated bundle, trailing bytes, or a different number of entries (names the index).
    """
    entries: list[bytes] = []
    pos, base = 0, first_leaf(tile)
    while pos < len(data):
        if pos + 2 > len(data):
            raise InvalidProof(f"{tile.path} is truncated at entry {base + len(entries)}", index=base + len(entries))
        n = int.from_bytes(data[pos : pos + 2], "big")
        if n == 0 or pos + 2 + n > len(data):
            raise InvalidProof(f"{tile.path} is truncated at entry {base + len(entries)}", index=base + len(entries))
        entries.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    if len(entries) != tile.width:
        index = base + min(len(entries), tile.width)
        raise InvalidProof(f"{tile.path} holds {len(entries)} entries, not {tile.width}", index=index)
    return entries


def partial_of(tile: Tile, full: bytes) -> bytes:
    """The bytes of partial ``tile`` cut from its full tile's bytes (a partial is a prefix of the full one).

    Raises:
        InvalidProof: ``full`` is not a well-formed full tile or bundle.
    """
    if tile.is_bundle:
        return bundle_bytes(bundle_entries(full, Tile(ENTRIES, tile.index))[: tile.width])
    return tile_bytes(tile_hashes(full, Tile(tile.level, tile.index))[: tile.width])


def tiles_for_size(size: int) -> list[Tile]:
    """The partial tiles (every level) a tree of ``size`` has at its right edge; full tiles are implied."""
    out, level = [], 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        if count % TILE_WIDTH:
            out.append(Tile(level, count // TILE_WIDTH, count % TILE_WIDTH))
        level += 1
    return out


def tile_for(level: int, index: int, size: int) -> Tile:
    """The tile of a tree of ``size`` that holds hash ``index`` of tile level ``level`` (full if it is full)."""
    count = size >> (TILE_HEIGHT * level)
    if index >= count:
        raise InvalidProof(f"hash {index} of tile level {level} is beyond tree size {size}", index=size)
    tile_index = index // TILE_WIDTH
    width = TILE_WIDTH if (tile_index + 1) * TILE_WIDTH <= count else count % TILE_WIDTH
    return Tile(level, tile_index, width)


@dataclass(frozen=True)
class TileWrite:
    tile: Tile
    data: bytes


class TiledTree:
    """The append-only tree's right edge: per tile level the hashes of its partial tile, and the partial bundle.

    That is all integration needs: full tiles never change, so appending only ever fills the edge, emits full tiles
    and new partial tiles, and moves full-tile roots one level up.
    """

    def __init__(self, *, size: int = 0, edges: Sequence[Sequence[bytes]] = (), bundle: Sequence[bytes] = ()) -> None:
        self._size = size
        self._edges = [list(e) for e in edges]
        self._bundle = list(bundle)
        expected = [t.width for t in _all_edge_tiles(size)]
        if [len(e) for e in self._edges] != expected or len(self._bundle) != size % TILE_WIDTH:
            raise InvalidProof(f"the right edge does not fit a tree of size {size}", index=size)

    @classmethod
    def restore(cls, size: int, read: Callable[[Tile], bytes]) -> TiledTree:
        """The edge of a stored tree of ``size``, from its partial tiles and bundle (read through ``read``).

        Raises:
            InvalidProof: a partial tile or bundle is malformed, or its hashes and entries disagree.
        """
        edges = []
        for tile in _all_edge_tiles(size):
            edges.append(tile_hashes(read(tile), tile) if tile.width else [])
        bundle: list[bytes] = []
        if size % TILE_WIDTH:
            tile = Tile(ENTRIES, size // TILE_WIDTH, size % TILE_WIDTH)
            bundle = bundle_entries(read(tile), tile)
            for i, (entry, h) in enumerate(zip(bundle, edges[0], strict=True)):
                if merkle.leaf_hash(entry) != h:
                    raise InvalidProof(f"entry {first_leaf(tile) + i} does not match its tile",
                                       index=first_leaf(tile) + i)  # fmt: skip
        return cls(size=size, edges=edges, bundle=bundle)

    @property
    def size(self) -> int:
        return self._size

    def copy(self) -> TiledTree:
        return TiledTree(size=self._size, edges=self._edges, bundle=self._bundle)

    def append(self, entries: Sequence[bytes], *, keep_bundles: bool = True) -> list[TileWrite]:
        """Integrate ``entries`` as the next leaves. Returns the tiles and bundles to write, full ones first, then
        the new partial ones, each level bottom-up (with ``keep_bundles=False`` only hash tiles: replaying a copy).

        Raises:
            ValueError: an empty entry or one over 65,535 bytes (nothing is changed).
        """
        for entry in entries:
            if not 0 < len(entry) <= MAX_ENTRY_BYTES:
                raise ValueError(f"an entry of {len(entry)} bytes does not fit an entry bundle")
        return self.append_hashes([merkle.leaf_hash(e) for e in entries], entries if keep_bundles else None)

    def append_hashes(self, leaves: Sequence[bytes], entries: Sequence[bytes] | None = None) -> list[TileWrite]:
        """Like :meth:`append` for leaf hashes computed elsewhere (``entries`` for the bundles, or None)."""
        before = self._size
        writes: list[TileWrite] = []
        for i, h in enumerate(leaves):
            if entries is not None:
                self._bundle.append(entries[i])
                if len(self._bundle) == TILE_WIDTH:
                    writes.append(TileWrite(Tile(ENTRIES, (before + i) // TILE_WIDTH), bundle_bytes(self._bundle)))
                    self._bundle = []
            self._push(h, before + i + 1, writes)
        self._size += len(leaves)
        if entries is None:
            self._bundle = []
        elif self._size % TILE_WIDTH and self._size != before:
            tile = Tile(ENTRIES, self._size // TILE_WIDTH, self._size % TILE_WIDTH)
            writes.append(TileWrite(tile, bundle_bytes(self._bundle)))
        old = set(_all_edge_tiles(before))
        for level, tile in enumerate(_all_edge_tiles(self._size)):
            if tile.width and tile not in old:
                writes.append(TileWrite(tile, tile_bytes(self._edges[level])))
        return writes

    def _push(self, h: bytes, leaves_after: int, writes: list[TileWrite]) -> None:
        level = 0
        while True:
            if level == len(self._edges):
                self._edges.append([])
            edge = self._edges[level]
            edge.append(h)
            if len(edge) < TILE_WIDTH:
                return
            full = (leaves_after >> (TILE_HEIGHT * (level + 1))) - 1
            writes.append(TileWrite(Tile(level, full), tile_bytes(edge)))
            h = merkle.root_of(edge)
            self._edges[level] = []
            level += 1

    def edge_tiles(self) -> list[TileWrite]:
        """The partial hash tiles of the current size (those a checkpoint of this size needs served)."""
        edge = _all_edge_tiles(self._size)
        return [TileWrite(t, tile_bytes(self._edges[level])) for level, t in enumerate(edge) if t.width]

    def root(self) -> bytes:
        """The root of the tree at its current size (RFC 6962), from the right edge alone."""
        subtrees: list[bytes] = []  # perfect subtrees, left to right, largest first
        for level in range(len(self._edges) - 1, -1, -1):
            edge, pos = self._edges[level], 0
            for bit in range(TILE_HEIGHT - 1, -1, -1):
                if len(edge) >> bit & 1:
                    subtrees.append(merkle.root_of(edge[pos : pos + (1 << bit)]))
                    pos += 1 << bit
        if not subtrees:
            return merkle.EMPTY_ROOT
        root = subtrees[-1]
        for h in reversed(subtrees[:-1]):
            root = merkle.node_hash(h, root)
        return root


def _all_edge_tiles(size: int) -> list[Tile]:
    """The edge tile of every level up to the highest a tree of ``size`` uses (width 0 where a level is full)."""
    out, level = [], 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        out.append(Tile(level, count // TILE_WIDTH, count % TILE_WIDTH))
        level += 1
    return out


class TileNodeReader:
    """Perfect-subtree hashes of the tree of ``size``, read from its tiles through ``read`` (cached per reader).

    Checks each tile's length, and each *full* tile against the hash its level above holds for it (as Go's
    ``tlog.TileHashReader`` does), so a changed interior tile fails here with :class:`InvalidProof` naming its
    first entry. The right-edge partial tiles are taken as read: the caller vouches for them (the service checked
    them against its committed root on start and has written every one since; a verifier compares the root it
    derives with a signed checkpoint).
    """

    def __init__(self, size: int, read: Callable[[Tile], bytes]) -> None:
        self._size = size
        self._read = read
        self._cache: dict[Tile, list[bytes]] = {}

    def hashes(self, tile: Tile) -> list[bytes]:
        """Raises: InvalidProof if the tile is malformed or (full) does not match its parent's hash."""
        if tile not in self._cache:
            hashes = tile_hashes(self._read(tile), tile)
            if tile.width == TILE_WIDTH:
                parent = tile_for(tile.level + 1, tile.index, self._size)
                if merkle.root_of(hashes) != self.hashes(parent)[tile.index % TILE_WIDTH]:
                    raise InvalidProof(f"{tile.path} does not match its hash in {parent.path}", index=first_leaf(tile))
            self._cache[tile] = hashes
        return self._cache[tile]

    def node(self, level: int, index: int) -> bytes:
        tile_level, height = divmod(level, TILE_HEIGHT)
        start = index << height
        if (start + (1 << height)) << (TILE_HEIGHT * tile_level) > self._size:
            raise InvalidProof(f"node ({level}, {index}) is not a complete subtree of size {self._size}",
                               index=self._size)  # fmt: skip
        tile = tile_for(tile_level, start + (1 << height) - 1, self._size)
        offset = start - tile.index * TILE_WIDTH
        return merkle.root_of(self.hashes(tile)[offset : offset + (1 << height)])
