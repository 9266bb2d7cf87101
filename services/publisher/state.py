"""The publisher's durable state in SQLite: idempotency records, items and versions, per-(key, topic) sequence
numbers, and the outbox of signed envelopes waiting for Kafka's acknowledgement.

Owns: the schema and the SQL. An envelope is signed and written to the outbox in the same transaction that
allocates its sequence number and records the request, so a crash can neither lose an accepted publication nor
reuse a sequence number; the outbox relay re-sends what Kafka has not acknowledged.

:class:`GroupCommitter` runs many callers' units of work in one transaction (each in its own savepoint) on one
writer thread: one fsync serves a whole group, as the measured costs suggest (118 µs per record vs 0.9).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from services.shared.errors import StoreUnavailable

T = TypeVar("T")
MAX_GROUP: Final = 512

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS requests (
    idempotency_key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, operation TEXT NOT NULL,
    event_id TEXT NOT NULL, item_id TEXT NOT NULL, version INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, latest_version INTEGER NOT NULL, latest_event_id TEXT NOT NULL,
    case_ids TEXT NOT NULL, jurisdictions TEXT NOT NULL, withdrawn_at TEXT, withdraw_reason TEXT);
CREATE TABLE IF NOT EXISTS versions (
    item_id TEXT NOT NULL, version INTEGER NOT NULL, event_id TEXT NOT NULL, sha256 TEXT, media_type TEXT,
    size INTEGER, published_at TEXT NOT NULL, PRIMARY KEY (item_id, version));
CREATE TABLE IF NOT EXISTS sequences (
    key_id TEXT NOT NULL, topic TEXT NOT NULL, last INTEGER NOT NULL, PRIMARY KEY (key_id, topic));
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT NOT NULL, jurisdiction TEXT NOT NULL, topic TEXT NOT NULL, kafka_key BLOB NOT NULL,
    key_id TEXT NOT NULL, sequence INTEGER NOT NULL, envelope BLOB NOT NULL,
    partition INTEGER, offset INTEGER, delivered_at TEXT, PRIMARY KEY (event_id, jurisdiction));
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (delivered_at) WHERE delivered_at IS NULL;
"""


@dataclass(frozen=True)
class OutboxRow:
    event_id: str
    jurisdiction: str
    topic: str
    kafka_key: bytes
    key_id: str
    sequence: int
    envelope: bytes
    partition: int | None
    offset: int | None


def connect(path: Path) -> sqlite3.Connection:
    """Raises: StoreUnavailable if the database can't be opened."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not just a crash
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        conn.row_factory = sqlite3.Row
        return conn
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open publisher state at {path}: {exc}") from exc


def next_sequence(conn: sqlite3.Connection, key_id: str, topic: str) -> int:
    row = conn.execute(
        "INSERT INTO sequences (key_id, topic, last) VALUES (?, ?, 1) "
        "ON CONFLICT (key_id, topic) DO UPDATE SET last = last + 1 RETURNING last",
        (key_id, topic),
    ).fetchone()
    return int(row[0])


def request(conn: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM requests WHERE idempotency_key = ?", (key,)).fetchone()
    return row


def original_publication(conn: sqlite3.Connection, item_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM requests WHERE item_id = ? AND operation = 'publish'", (item_id,)
    ).fetchone()
    return row


def item(conn: sqlite3.Connection, item_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM items WHERE item_id = ?", (item_id,)).fetchone()
    return row


def versions(conn: sqlite3.Connection, item_id: str) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM versions WHERE item_id = ? ORDER BY version", (item_id,)).fetchall()


def outbox(conn: sqlite3.Connection, event_id: str) -> list[OutboxRow]:
    rows = conn.execute("SELECT * FROM outbox WHERE event_id = ? ORDER BY jurisdiction", (event_id,)).fetchall()
    return [_row(r) for r in rows]


def pending(conn: sqlite3.Connection, limit: int = 1000) -> list[OutboxRow]:
    rows = conn.execute(
        "SELECT * FROM outbox WHERE delivered_at IS NULL ORDER BY rowid LIMIT ?", (limit,)
    ).fetchall()
    return [_row(r) for r in rows]


def _row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        r["event_id"], r["jurisdiction"], r["topic"], r["kafka_key"], r["key_id"], r["sequence"], r["envelope"],
        r["partition"], r["offset"],
    )  # fmt: skip


def mark_delivered(
    conn: sqlite3.Connection, event_id: str, jurisdiction: str, partition: int, offset: int, at: str
) -> None:
    conn.execute(
        "UPDATE outbox SET partition = ?, offset = ?, delivered_at = ? WHERE event_id = ? AND jurisdiction = ?",
        (partition, offset, at, event_id, jurisdiction),
    )


def insert(conn: sqlite3.Connection, table: str, values: dict[str, Any]) -> None:
    assert table in {"requests", "items", "versions", "outbox"}
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values.values()))  # noqa: S608


class GroupCommitter:
    """Runs units of work ``fn(conn) -> T`` on one writer thread, many per transaction.

    A unit that raises rolls back its own savepoint only; its caller gets the exception. If the COMMIT fails, every
    caller in the group gets :class:`StoreUnavailable` and nothing of the group is kept.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="publisher-state", daemon=True)
        self._thread.start()
        self.groups = 0

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise StoreUnavailable("publisher state is closed")
            self._queue.append((fn, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue and self._closed:
                    return
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            self._commit_group(group)

    def _commit_group(self, group: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]]) -> None:
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for i, (fn, future) in enumerate(group):
                self._conn.execute(f"SAVEPOINT s{i}")
                try:
                    results.append((future, fn(self._conn), None))
                    self._conn.execute(f"RELEASE s{i}")
                except Exception as exc:  # the unit failed, not the group: its caller gets the error
                    self._conn.execute(f"ROLLBACK TO s{i}")
                    self._conn.execute(f"RELEASE s{i}")
                    results.append((future, None, exc))
            self._conn.execute("COMMIT")
            self.groups += 1
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"publisher state commit failed: {exc}")
            for _, future in group:
                if not future.done():
                    future.set_exception(failure)
            return
        for future, value, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._conn.close()
