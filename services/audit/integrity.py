"""Checking a copy of the audit log against a signed checkpoint, and saying what is wrong and where.

Owns :class:`CopyCheck` — what a full replay does with the log's entry bundles and tiles, bundle by bundle, in
bounded memory — and :class:`Finding`, one plain-language fault with the first entry index it concerns.
Unlike :mod:`verify` (which raises at the first fault), it collects every fault it can name and keeps going, so an
auditor's report lists them all. It builds the tree twice, once from the entries' leaf hashes and once from the
stored level-0 tiles, and decides at the end which of the two the signed root vouches for:

- the entries hash to the signed root → every entry is genuine; a stored tile that differs from the recomputed one
  was altered (its first differing hash names the entry);
- only the stored leaf-hash tiles hash to the signed root → those are genuine, and each entry whose leaf hash
  differs from them was changed, or deleted or inserted (a bundle with one entry too few or too many whose other
  entries match the tile, shifted by one);
- neither → the copy cannot be matched to the checkpoint; every place entries and tiles disagree is listed.

With ``earlier`` (the last checkpoint this auditor saw) it also checks that the first ``earlier.size`` entries
still hash to that checkpoint's root: a rewritten history, found from the entries themselves rather than from a
consistency proof the server computed.

Pure: no I/O, no clock. Does not own fetching (the CLI), signatures (``checkpoint.open_checkpoint`` first: only a
verified checkpoint should be checked against), or what an entry means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from services.audit import merkle
from services.audit.checkpoint import Checkpoint
from services.audit.tiles import ENTRIES, TILE_HEIGHT, TILE_WIDTH, Tile, TiledTree, TileNodeReader, TileWrite, tile_for
from services.shared.errors import InvalidProof

FindingKind = Literal[
    "entry-changed", "entry-deleted", "entry-inserted", "bundle-malformed", "tile-changed", "tile-malformed",
    "root-mismatch", "history-rewritten", "log-shrank",
]  # fmt: skip
#: Findings kept with their details; more are counted (a wholly rewritten copy would list every entry).
MAX_FINDINGS: Final = 1000
_ZERO: Final = bytes(merkle.HASH_SIZE)


@dataclass(frozen=True)
class Finding:
    """One fault in a copy of the log: what kind, the first entry index it concerns (if one can be named), and a
    sentence a person can act on."""

    kind: FindingKind
    index: int | None
    detail: str


def parse_bundle(data: bytes) -> tuple[list[bytes], bool]:
    """The length-prefixed entries of a bundle, however many there are, and whether every byte was consumed
    cleanly (False: truncated, or a zero length)."""
    entries: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            return entries, False
        n = int.from_bytes(data[pos : pos + 2], "big")
        if n == 0 or pos + 2 + n > len(data):
            return entries, False
        entries.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return entries, True


def upper_tiles(size: int) -> list[Tile]:
    """Every stored hash tile above level 0 of a tree of ``size`` (full and partial): few — one per 65,536 entries."""
    out: list[Tile] = []
    level = 1
    while (count := size >> (TILE_HEIGHT * level)) > 0:
        out += [Tile(level, n) for n in range(count // TILE_WIDTH)]
        if count % TILE_WIDTH:
            out.append(Tile(level, count // TILE_WIDTH, count % TILE_WIDTH))
        level += 1
    return out


def bundles(size: int) -> list[Tile]:
    """The entry bundles of a tree of ``size``, in order (the last one partial if ``size`` is not a multiple of 256)."""
    full = [Tile(ENTRIES, n) for n in range(size // TILE_WIDTH)]
    return full + ([Tile(ENTRIES, size // TILE_WIDTH, size % TILE_WIDTH)] if size % TILE_WIDTH else [])


class CopyCheck:
    """Feed every bundle of the checkpoint's tree in order with its stored level-0 tile (:meth:`add`), then
    :meth:`finish`. ``upper`` holds the stored tiles of :func:`upper_tiles` (a missing one counts as altered)."""

    def __init__(self, checkpoint: Checkpoint, *, upper: Mapping[Tile, bytes], earlier: Checkpoint | None = None):
        self._cp = checkpoint
        self._upper = upper
        self._earlier = earlier if earlier is not None and 0 < earlier.size <= checkpoint.size else None
        self._from_entries = TiledTree()
        self._from_tiles = TiledTree()
        self._entries_sound = True  # every bundle so far held exactly its width of entries
        self._tiles_sound = True  # every level-0 tile so far was well-formed
        self._next = 0
        self._leaf_diffs: list[tuple[int, Tile, FindingKind]] = []  # (index, tile, kind if a bundle says which)
        self._upper_diffs: dict[str, list[tuple[int, Tile]]] = {"entries": [], "tiles": []}
        self._prefix: dict[str, bool] = {}
        self._malformed: list[Finding] = []
        self.dropped = 0  # findings beyond MAX_FINDINGS, counted only

    @property
    def size(self) -> int:
        return self._cp.size

    @property
    def position(self) -> int:
        """How many entries have been fed so far."""
        return self._next

    def add(self, bundle: bytes, tile: bytes) -> list[bytes] | None:
        """The next bundle and its stored level-0 tile. Returns the bundle's entries when it held exactly its
        width of them (so they can be read and re-decided), else None (the finding says what is wrong)."""
        n = self._next // TILE_WIDTH
        width = min(TILE_WIDTH, self._cp.size - self._next)
        if width <= 0:
            raise ValueError("every bundle of the checkpoint's tree was already added")
        base = self._next
        entries, clean = parse_bundle(bundle)
        leaves = [merkle.leaf_hash(e) for e in entries]
        level0 = Tile(0, n, width)
        stored: list[bytes] | None = None
        if len(tile) == width * merkle.HASH_SIZE:
            stored = [tile[i : i + merkle.HASH_SIZE] for i in range(0, len(tile), merkle.HASH_SIZE)]
        else:
            self._tiles_sound = False
            self._note_malformed(Finding("tile-malformed", base, f"{level0.path} holds {len(tile)} bytes, not "
                                         f"{width * merkle.HASH_SIZE} ({width} hashes)"))  # fmt: skip
        ok = clean and len(entries) == width
        if not ok:
            self._entries_sound = False
            self._bundle_fault(Tile(ENTRIES, n, width), base, width, entries, leaves, clean, stored)
        elif stored is not None:
            self._leaf_diffs += [(base + i, level0, "entry-changed") for i in range(width) if leaves[i] != stored[i]]
        from_entries = leaves if ok else (stored or [_ZERO] * width)
        from_tiles = stored if stored is not None else (leaves if ok else [_ZERO] * width)
        self._feed(from_entries, from_tiles)
        return entries if ok else None

    def _bundle_fault(
        self, bundle: Tile, base: int, width: int, entries: list[bytes], leaves: list[bytes], clean: bool,
        stored: list[bytes] | None,
    ) -> None:  # fmt: skip
        """Say which entry a malformed bundle lost or gained, when the stored tile shows it."""
        if stored is not None and clean:
            p = next((i for i in range(min(len(leaves), width)) if leaves[i] != stored[i]), min(len(leaves), width))
            if len(leaves) == width - 1 and leaves[p:] == stored[p + 1 :]:
                self._leaf_diffs.append((base + p, Tile(0, bundle.index, width), "entry-deleted"))
                return
            if len(leaves) == width + 1 and leaves[p + 1 :] == stored[p:]:
                self._leaf_diffs.append((base + p, Tile(0, bundle.index, width), "entry-inserted"))
                return
            index = base + p
        else:
            index = base + min(len(entries), width)
        why = "is truncated or malformed" if not clean else f"holds {len(entries)} entries, not {width}"
        self._note_malformed(Finding("bundle-malformed", index, f"{bundle.path} {why}: entries from {index} on "
                                     "cannot be matched to the tree"))  # fmt: skip

    def _feed(self, from_entries: list[bytes], from_tiles: list[bytes]) -> None:
        cut = self._earlier.size - self._next if self._earlier is not None else -1
        if 0 < cut < len(from_entries):
            self._append(from_entries[:cut], from_tiles[:cut])
            self._append(from_entries[cut:], from_tiles[cut:])
        else:
            self._append(from_entries, from_tiles)

    def _append(self, from_entries: list[bytes], from_tiles: list[bytes]) -> None:
        for side, tree, hashes in (("entries", self._from_entries, from_entries),
                                   ("tiles", self._from_tiles, from_tiles)):  # fmt: skip
            for write in tree.append_hashes(hashes):
                if write.tile.level >= 1 and write.tile.width == TILE_WIDTH:  # edges: at the end, in finish()
                    self._compare_upper(side, write)
        self._next += len(from_entries)
        if self._earlier is not None and self._next == self._earlier.size:
            self._prefix = {"entries": self._from_entries.root() == self._earlier.root,
                            "tiles": self._from_tiles.root() == self._earlier.root}  # fmt: skip

    def _compare_upper(self, side: str, write: TileWrite) -> None:
        stored = self._upper.get(write.tile)
        if stored == write.data:
            return
        n = len(write.data) // merkle.HASH_SIZE
        at = n if stored is None or len(stored) != len(write.data) else next(
            i for i in range(n) if stored[i * 32 : i * 32 + 32] != write.data[i * 32 : i * 32 + 32])  # fmt: skip
        index = (write.tile.index * TILE_WIDTH + min(at, n - 1)) << (TILE_HEIGHT * write.tile.level)
        self._upper_diffs[side].append((index, write.tile))

    def _note_malformed(self, finding: Finding) -> None:
        if len(self._malformed) < MAX_FINDINGS:
            self._malformed.append(finding)
        else:
            self.dropped += 1

    def finish(self) -> list[Finding]:
        """Every fault found, in index order (empty: the copy is exactly the tree the checkpoint signs).

        Raises:
            ValueError: not every bundle was added.
        """
        if self._next != self._cp.size:
            raise ValueError(f"{self._next} of {self._cp.size} entries were added")
        for side, tree in (("entries", self._from_entries), ("tiles", self._from_tiles)):
            for write in tree.edge_tiles():
                if write.tile.level >= 1:
                    self._compare_upper(side, write)
        entries_ok = self._entries_sound and self._from_entries.root() == self._cp.root
        tiles_ok = self._tiles_sound and self._from_tiles.root() == self._cp.root
        out = list(self._malformed)
        if entries_ok:
            out += [Finding("tile-changed", i, f"{t.path} was altered at entry {i}: the entries hash to the signed "
                            "root, the stored tile does not (proofs served from it would be wrong)")
                    for i, t, _ in self._leaf_diffs]  # fmt: skip
            out += self._upper_findings("entries")
        elif tiles_ok:
            out += [_entry_finding(i, t, kind) for i, t, kind in self._leaf_diffs]
            out += self._upper_findings("tiles")
        else:
            out.append(Finding("root-mismatch", None, f"neither the entries nor the stored tiles hash to the signed "
                               f"root of size {self._cp.size}: the copy does not match its checkpoint"))  # fmt: skip
            out += [Finding("entry-changed", i, f"entry {i} does not match its hash in {t.path} (the entry or the "
                            "tile was altered)") for i, t, _ in self._leaf_diffs]  # fmt: skip
            out += self._upper_findings("entries")
        if self._earlier is not None and self._prefix and not self._prefix["entries" if entries_ok else "tiles"]:
            out.append(Finding("history-rewritten", self._earlier.size, f"the first {self._earlier.size} entries no "
                               "longer hash to the checkpoint of that size you verified before: the history was "
                               "rewritten"))  # fmt: skip
        self.dropped += max(0, len(out) - MAX_FINDINGS)
        return sorted(out[:MAX_FINDINGS], key=lambda f: -1 if f.index is None else f.index)

    def _upper_findings(self, side: str) -> list[Finding]:
        faulty = {i for i, _, _ in self._leaf_diffs}
        out = []
        for index, tile in self._upper_diffs[side]:
            span = TILE_WIDTH ** (tile.level + 1) if tile.width == TILE_WIDTH else 1 << (TILE_HEIGHT * tile.level)
            if side == "entries" and any(index <= i < index + span for i in faulty) and not self._cp_vouches():
                continue  # a consequence of a faulty entry already named
            out.append(Finding("tile-changed", index, f"{tile.path} differs from the tree at entry {index} "
                               "(proofs served from it would be wrong)"))  # fmt: skip
        return out

    def _cp_vouches(self) -> bool:
        return self._entries_sound and self._from_entries.root() == self._cp.root


def _entry_finding(index: int, tile: Tile, kind: FindingKind) -> Finding:
    if kind == "entry-deleted":
        return Finding(kind, index, f"entry {index} is missing: its bundle holds one entry too few and the rest match "
                                    f"{tile.path} shifted by one (deleted)")  # fmt: skip
    if kind == "entry-inserted":
        return Finding(kind, index, f"an entry was inserted before entry {index}: its bundle holds one entry too "
                                    f"many and the rest match {tile.path} shifted by one")  # fmt: skip
    return Finding("entry-changed", index, f"entry {index} was altered: its leaf hash differs from {tile.path}, "
                                           "which hashes to the signed root")  # fmt: skip


def tiles_for_entries(indexes: Sequence[int], size: int) -> list[Tile]:
    """The level-0 tiles holding the leaf hashes of ``indexes`` in a tree of ``size`` (what a partial replay
    fetches, beside :func:`upper_tiles` and the level-0 edge)."""
    return sorted({tile_for(0, i, size) for i in indexes})


class SubsetCheck:
    """Entries picked by index or filter, checked against the tree: the stored tiles must hash to the signed root
    (every full tile against its parent's hash, as :class:`TileNodeReader` does), and each entry's leaf hash must
    be the tree's hash at its index. ``tiles`` must hold :func:`upper_tiles`, the level-0 edge and the level-0 tiles
    of the entries checked (:func:`tiles_for_entries`); the caller adds them as it fetches pages.

    It proves what it is shown is in the log; it cannot prove that nothing matching a filter was left out (only a
    full replay, :class:`CopyCheck`, sees every entry).
    """

    def __init__(self, checkpoint: Checkpoint, tiles: Mapping[Tile, bytes]) -> None:
        self._cp = checkpoint
        self._reader = TileNodeReader(checkpoint.size, lambda t: tiles[t])

    def root(self) -> Finding | None:
        """None if the stored tiles hash to the signed root, else what is wrong."""
        try:
            root = merkle.tree_root(self._reader, self._cp.size)
        except InvalidProof as exc:
            return Finding("tile-changed", exc.index, f"the stored tiles are damaged: {exc.detail}")
        if root != self._cp.root:
            return Finding("root-mismatch", None, f"the stored tiles do not hash to the signed root of size "
                                                  f"{self._cp.size}")  # fmt: skip
        return None

    def entry(self, index: int, entry: bytes) -> Finding | None:
        """None if ``entry`` is the log's leaf at ``index``, else what is wrong."""
        if not 0 <= index < self._cp.size:
            return Finding("entry-inserted", index, f"entry {index} is beyond the checkpoint's size {self._cp.size}")
        try:
            expected = self._reader.node(0, index)
        except InvalidProof as exc:
            return Finding("tile-changed", exc.index, f"the stored tiles are damaged: {exc.detail}")
        if merkle.leaf_hash(entry) != expected:
            return Finding("entry-changed", index, f"entry {index} was altered: its leaf hash is not the tree's hash "
                                                   "at that index")  # fmt: skip
        return None
