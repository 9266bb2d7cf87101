"""The audit log's query index and commit point: the :class:`LogIndex` port and its SQLite adapter.

Owns the one transaction per integration that makes it durable: the indexed rows of the new leaves, the log state
(size, root, the next ``hub.audit`` offset, counters) and the signed checkpoint commit together, or not at all.
This is the log's commit point (see docs/architecture.md, "Crash consistency"): tiles are written before it and are
idempotent, the ``checkpoint`` file after it is a copy. It also answers the queries: entries by index range and by
filter (office, item, decision, time range), an entry by its id, the checkpoint signed at a size.

Blocking I/O: the service calls it from worker threads; one writer connection and one reader connection (WAL lets
readers proceed while a batch commits), each behind a lock. SQLite errors become :class:`StoreUnavailable`.
A server database can implement the same port (the rows and state in one transaction).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.audit import note
from services.audit.log import IndexedEntry, Integration
from services.shared.errors import StoreUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY, entry_id TEXT NOT NULL UNIQUE, office TEXT NOT NULL, item_id TEXT,
    decision TEXT NOT NULL, at_us INTEGER NOT NULL, action TEXT NOT NULL, jurisdiction TEXT NOT NULL,
    kafka_offset INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_office ON entries (office, idx);
CREATE INDEX IF NOT EXISTS entries_item ON entries (item_id, idx);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1), size INTEGER NOT NULL, root BLOB NOT NULL, next_offset INTEGER NOT NULL,
    dead_letters INTEGER NOT NULL, duplicates INTEGER NOT NULL, signed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL, name TEXT NOT NULL, key_id INTEGER NOT NULL, signature BLOB NOT NULL,
    PRIMARY KEY (size, name, key_id)
);
"""
_COLUMNS = "idx, entry_id, office, item_id, decision, at_us, action, jurisdiction, kafka_offset"


@dataclass(frozen=True)
class LogState:
    size: int
    root: bytes
    next_offset: int
    dead_letters: int
    duplicates: int
    checkpoint: bytes | None
    signed_at: float


@dataclass(frozen=True)
class EntryQuery:
    """Entries with ``start <= index < end`` matching every filter given, in log order, at most ``limit``."""

    start: int = 0
    end: int | None = None
    office: str | None = None
    item_id: str | None = None
    decision: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    limit: int = 100


class LogIndex(Protocol):
    def load(self) -> LogState | None: ...

    def known(self, entry_ids: list[str]) -> set[str]: ...

    def commit(self, integration: Integration, *, signed_at: float) -> None: ...

    def touch(self, signed_at: float) -> None: ...

    def query(self, q: EntryQuery) -> list[IndexedEntry]: ...

    def find(self, entry_id: str) -> IndexedEntry | None: ...

    def at(self, index: int) -> IndexedEntry | None: ...

    def checkpoint_at(self, size: int) -> bytes | None: ...

    def add_cosignatures(self, size: int, signatures: Sequence[note.Signature]) -> bytes | None: ...

    def cosigned(self, limit: int) -> list[tuple[int, list[str]]]: ...

    def close(self) -> None: ...


def _row(row: Sequence[object]) -> IndexedEntry:
    idx, entry_id, office, item_id, decision, at_us, action, jurisdiction, offset = row
    return IndexedEntry(int(str(idx)), str(entry_id), str(office), None if item_id is None else str(item_id),
                        str(decision), int(str(at_us)), str(action), str(jurisdiction), int(str(offset)))  # fmt: skip


class SqliteIndex:
    """The index in one SQLite file (WAL, synchronous=FULL: a commit is on disk when it returns)."""

    def __init__(self, *, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect(path)
            self._writer.executescript(_SCHEMA)
            self._reader = self._connect(path)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open the audit index {path}: {exc}") from exc
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            try:
                yield self._reader
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the audit index failed: {exc}") from exc

    def load(self) -> LogState | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT size, root, next_offset, dead_letters, duplicates, signed_at FROM state"
            ).fetchone()
            if row is None:
                return None
        return LogState(row[0], row[1], row[2], row[3], row[4], self.checkpoint_at(row[0]), row[5])

    def known(self, entry_ids: list[str]) -> set[str]:
        found: set[str] = set()
        with self._reading() as db:
            for i in range(0, len(entry_ids), 500):
                chunk = entry_ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found |= {r[0] for r in db.execute(f"SELECT entry_id FROM entries WHERE entry_id IN ({marks})", chunk)}  # noqa: S608
        return found

    def commit(self, integration: Integration, *, signed_at: float) -> None:
        """Raises: StoreUnavailable (nothing of the integration is then committed)."""
        cp = integration.checkpoint
        rows = [(e.index, e.entry_id, e.office, e.item_id, e.decision, e.at_us, e.action, e.jurisdiction, e.offset)
                for e in integration.entries]  # fmt: skip
        with self._write_lock:
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT size FROM state").fetchone()
                current = row[0] if row else 0
                if current != integration.start:
                    raise StoreUnavailable(f"the index is at size {current}, not {integration.start}: another writer?")
                db.executemany(f"INSERT INTO entries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", rows)  # noqa: S608
                db.execute(
                    "INSERT INTO state (id, size, root, next_offset, dead_letters, duplicates, signed_at) "
                    "VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET size = excluded.size, "
                    "root = excluded.root, next_offset = excluded.next_offset, "
                    "dead_letters = dead_letters + excluded.dead_letters, "
                    "duplicates = duplicates + excluded.duplicates, signed_at = excluded.signed_at",
                    (cp.size, cp.root, integration.next_offset, len(integration.dead_letters),
                     integration.duplicates, signed_at),
                )  # fmt: skip
                db.execute(
                    "INSERT OR IGNORE INTO checkpoints (size, note) VALUES (?, ?)", (cp.size, integration.signed)
                )
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(f"the audit index could not commit: {exc}") from exc
                raise

    def touch(self, signed_at: float) -> None:
        """Record that the current checkpoint was re-signed (the log is idle but alive)."""
        with self._write_lock:
            try:
                self._writer.execute("UPDATE state SET signed_at = ?", (signed_at,))
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the audit index failed: {exc}") from exc

    def query(self, q: EntryQuery) -> list[IndexedEntry]:
        where: list[str] = ["idx >= ?"]
        args: list[object] = [q.start]
        filters: list[tuple[str, object]] = [
            ("office = ?", q.office), ("item_id = ?", q.item_id), ("decision = ?", q.decision),
            ("idx < ?", q.end), ("at_us >= ?", q.since_us), ("at_us < ?", q.until_us),
        ]  # fmt: skip
        for clause, value in filters:
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT {_COLUMNS} FROM entries WHERE {' AND '.join(where)} ORDER BY idx LIMIT ?"  # noqa: S608
        with self._reading() as db:
            return [_row(r) for r in db.execute(sql, [*args, q.limit])]

    def find(self, entry_id: str) -> IndexedEntry | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE entry_id = ?", (entry_id,)).fetchone()  # noqa: S608
        return None if row is None else _row(row)

    def at(self, index: int) -> IndexedEntry | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE idx = ?", (index,)).fetchone()  # noqa: S608
        return None if row is None else _row(row)

    def checkpoint_at(self, size: int) -> bytes | None:
        """The checkpoint the log signed at ``size``, carrying every cosignature it accepted for it."""
        with self._reading() as db:
            row = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
            cosigs = db.execute("SELECT name, key_id, signature FROM cosignatures WHERE size = ? ORDER BY name, key_id",
                                (size,)).fetchall()  # fmt: skip
        if row is None:
            return None
        signed = bytes(row[0])
        if not cosigs:
            return signed
        return note.with_signatures(signed, [note.Signature(n, int(k), bytes(d)) for n, k, d in cosigs])

    def add_cosignatures(self, size: int, signatures: Sequence[note.Signature]) -> bytes | None:
        """Keep verified witness cosignatures of the checkpoint of ``size`` (a witness's newer one replaces its
        older one); returns that checkpoint with all of them, or None if the log signed none of that size.

        Raises: StoreUnavailable."""
        with self._write_lock:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                if self._writer.execute("SELECT 1 FROM checkpoints WHERE size = ?", (size,)).fetchone() is None:
                    self._writer.execute("ROLLBACK")
                    return None
                self._writer.executemany(
                    "INSERT OR REPLACE INTO cosignatures (size, name, key_id, signature) VALUES (?, ?, ?, ?)",
                    [(size, s.name, s.key_id, s.data) for s in signatures],
                )
                self._writer.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                raise StoreUnavailable(f"the audit index could not keep a cosignature: {exc}") from exc
        return self.checkpoint_at(size)

    def cosigned(self, limit: int) -> list[tuple[int, list[str]]]:
        """The newest ``limit`` sizes that carry cosignatures, with the names of the witnesses that cosigned."""
        with self._reading() as db:
            rows = db.execute("SELECT size, group_concat(name, char(10)) FROM cosignatures GROUP BY size "
                              "ORDER BY size DESC LIMIT ?", (limit,)).fetchall()  # fmt: skip
        return [(int(size), sorted(set(str(names).split("\n")))) for size, names in rows]

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
