"""Recomputing the audit log from its entries and checking it against stored tiles and a signed checkpoint.

Owns :class:`Recomputation` — what an auditor's replay does with a copy of the log: feed it every entry in order
(as bytes, e.g. page by page from the query API or from entry bundles), optionally the log's stored tiles, and
finish with a verified checkpoint. It recomputes every leaf hash and every tile, compares each with the stored
tile as soon as that tile is complete, and finally compares size and root with the checkpoint. A changed, deleted
or inserted entry, or a changed tile, fails with :class:`InvalidProof` naming the first entry index at fault.

Pure: no I/O (tiles come through a callable), no clock. Does not own fetching (the CLI) or signatures
(``checkpoint.open_checkpoint`` comes first: only a verified checkpoint should be finished against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from services.audit import merkle
from services.audit.checkpoint import Checkpoint
from services.audit.tiles import TILE_HEIGHT, TILE_WIDTH, Tile, TiledTree, TileWrite
from services.shared.errors import InvalidProof

TileSource = Callable[[Tile], bytes]


class Recomputation:
    """The tree rebuilt from entries; with ``stored`` tiles, each one checked against the rebuilt one."""

    def __init__(self, *, stored: TileSource | None = None) -> None:
        self._tree = TiledTree()
        self._stored = stored

    @property
    def size(self) -> int:
        return self._tree.size

    def add(self, entries: Iterable[bytes]) -> None:
        """Append the next entries (in log order).

        Raises:
            InvalidProof: a stored full tile differs from the recomputed one (names the first index at fault), or
                an entry cannot be a leaf at all.
        """
        batch = list(entries)
        for i, entry in enumerate(batch):
            if not 0 < len(entry) <= 0xFFFF:
                index = self._tree.size + i
                raise InvalidProof(f"entry {index} of {len(entry)} bytes cannot be a leaf", index=index)
        for write in self._tree.append_hashes([merkle.leaf_hash(e) for e in batch]):
            if write.tile.width == TILE_WIDTH:
                self._compare(write)

    def finish(self, checkpoint: Checkpoint) -> None:
        """Compare the rebuilt tree with a verified checkpoint (and the stored partial tiles of its size).

        Raises:
            InvalidProof: a different number of entries, a stored partial tile that differs, or a different root.
        """
        if self._tree.size != checkpoint.size:
            index = min(self._tree.size, checkpoint.size)
            what = "missing" if self._tree.size < checkpoint.size else "not covered by the checkpoint"
            raise InvalidProof(f"{self._tree.size} entries for a checkpoint of size {checkpoint.size}: entry {index} "
                               f"is {what}", index=index)  # fmt: skip
        if self._stored is not None:
            for write in self._tree.edge_tiles():
                self._compare(write)
        if self._tree.root() != checkpoint.root:
            raise InvalidProof(f"the {checkpoint.size} entries do not hash to the checkpoint's root")

    def _compare(self, write: TileWrite) -> None:
        if self._stored is None:
            return
        stored = self._stored(write.tile)
        if stored == write.data:
            return
        level, n = write.tile.level, len(write.data) // merkle.HASH_SIZE
        position = next(
            (i for i in range(n) if stored[i * 32 : i * 32 + 32] != write.data[i * 32 : i * 32 + 32]),
            n,
        )
        index = (write.tile.index * TILE_WIDTH + position) << (TILE_HEIGHT * level)
        raise InvalidProof(f"stored {write.tile.path} differs from the entries at entry {index}", index=index)


def verify_entries(
    entries: Iterable[bytes], checkpoint: Checkpoint, *, stored: TileSource | None = None, chunk: int = 4096
) -> None:
    """Recompute the tree of ``entries`` and check it against ``checkpoint`` (and ``stored`` tiles, if given).

    Raises:
        InvalidProof: as :meth:`Recomputation.add` and :meth:`Recomputation.finish`.
    """
    check = Recomputation(stored=stored)
    batch: list[bytes] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == chunk:
            check.add(batch)
            batch = []
    check.add(batch)
    check.finish(checkpoint)
