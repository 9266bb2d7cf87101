"""Where tiles, entry bundles and the checkpoint live: the :class:`TileStore` port and its POSIX adapter.

Owns writing them durably and atomically (like Tessera's POSIX driver: write a temporary file in the same
directory, fsync it, rename it over the final name, fsync the directory) and reading them back. Writes are
idempotent: a path always holds the same bytes (full tiles never change; a partial tile is named by its width,
and the tree is a function of the topic), so re-writing after a crash is harmless. An object store can implement
the same port (PUT is atomic per object); a tile then needs no directory fsync.

Partial tiles accumulate while a tile fills (one per committed size); once the full tile is committed they are
deleted (tlog-tiles: a log MAY delete a partial tile once the full one is available), so a level holds at most
one tile's worth of partials. A crash between commit and pruning leaves a few partials behind: harmless.

Blocking I/O: the service calls it from a worker thread. Every OS error becomes :class:`StoreUnavailable` (a full
disk says so), so the integrator stops and retries instead of committing anything.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from services.audit.tiles import Tile, TileWrite
from services.shared.durable_files import replace_atomically, sync_dir
from services.shared.errors import NotFound, StoreUnavailable

CHECKPOINT = "checkpoint"


class TileStore(Protocol):
    def write(self, writes: Sequence[TileWrite]) -> None:
        """Store every tile durably before returning. Raises: StoreUnavailable."""

    def read(self, tile: Tile) -> bytes:
        """Raises: NotFound (no such tile), StoreUnavailable."""

    def write_checkpoint(self, data: bytes) -> None:
        """Replace the served checkpoint atomically. Raises: StoreUnavailable."""

    def close(self) -> None:
        """Release the store's resources (its writer threads)."""

    def prune_partials(self, full: Sequence[Tile]) -> None:
        """Delete the partial versions of tiles that are now full and committed (tlog-tiles allows it: clients
        fall back to the full tile). Best effort: a failure leaves harmless garbage."""


def _translate(exc: OSError, what: str) -> StoreUnavailable:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnavailable(f"no space left to write {what}: integration stopped until space returns")
    return StoreUnavailable(f"cannot write {what}: {exc.strerror or exc}")


class PosixTileStore:
    """Tiles as files under ``root`` at their C2SP paths (``root/tile/0/000``, ``root/checkpoint``)."""

    def __init__(self, *, root: Path, parallel: int = 8) -> None:
        self._root = root
        # fsync releases the GIL: files of one integration are written and synced in parallel, so the filesystem
        # can commit them in fewer journal transactions (one fsync each is still what makes each durable).
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="tiles")

    @property
    def root(self) -> Path:
        return self._root

    def write(self, writes: Sequence[TileWrite]) -> None:
        try:
            paths = [self._root / w.tile.path for w in writes]
            for path in {p.parent for p in paths}:
                path.mkdir(parents=True, exist_ok=True)
            list(self._pool.map(_write_unsynced, paths, [w.data for w in writes]))
            list(self._pool.map(sync_dir, sorted({p.parent for p in paths})))
        except OSError as exc:
            raise _translate(exc, "tiles") from exc

    def read(self, tile: Tile) -> bytes:
        try:
            return (self._root / tile.path).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no {tile.path}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {tile.path}: {exc.strerror or exc}") from exc

    def write_checkpoint(self, data: bytes) -> None:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            replace_atomically(self._root / CHECKPOINT, data)
        except OSError as exc:
            raise _translate(exc, "the checkpoint") from exc

    def prune_partials(self, full: Sequence[Tile]) -> None:
        for tile in full:
            partials = self._root / (tile.path + ".p")
            shutil.rmtree(partials, ignore_errors=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _write_unsynced(path: Path, data: bytes) -> None:
    """One tile or bundle; the directories are synced together once the whole batch is written."""
    replace_atomically(path, data, sync_directory=False)
