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
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from services.shared.errors import StoreUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
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
    partition INTEGER, offset INTEGER, delivered_at TEXT, abandoned TEXT, PRIMARY KEY (event_id, jurisdiction));
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (delivered_at) WHERE delivered_at IS NULL AND abandoned IS NULL;
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
    """The oldest envelopes neither acknowledged by Kafka nor abandoned."""
    rows = conn.execute(
        "SELECT * FROM outbox WHERE delivered_at IS NULL AND abandoned IS NULL ORDER BY rowid LIMIT ?", (limit,)
    ).fetchall()
    return [_row(r) for r in rows]


def abandon(conn: sqlite3.Connection, rows: list[tuple[str, str, str]]) -> None:
    """``rows``: (reason, event_id, jurisdiction) of envelopes that must never be sent (e.g. their key was revoked
    past their sequence number: every receiver would refuse them). They stay in the outbox as a record."""
    conn.executemany("UPDATE outbox SET abandoned = ? WHERE event_id = ? AND jurisdiction = ?", rows)


def _row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        r["event_id"], r["jurisdiction"], r["topic"], r["kafka_key"], r["key_id"], r["sequence"], r["envelope"],
        r["partition"], r["offset"],
    )  # fmt: skip


def mark_delivered(conn: sqlite3.Connection, marks: list[tuple[int | None, int | None, str, str, str]]) -> None:
    """``marks``: (partition, offset, delivered_at, event_id, jurisdiction) per acknowledged envelope."""
    conn.executemany(
        "UPDATE outbox SET partition = ?, offset = ?, delivered_at = ? WHERE event_id = ? AND jurisdiction = ?", marks
    )


def insert(conn: sqlite3.Connection, table: str, values: dict[str, Any]) -> None:
    assert table in {"requests", "items", "versions", "outbox"}
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values.values()))  # noqa: S608


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("publisher state update failed: %r", future.exception())


class GroupCommitter:
    """Runs units of work ``fn(conn) -> T`` many per transaction, on the event loop's thread.

    Every unit queued during one turn of the event loop joins the same transaction, so one fsync serves them all.
    A unit that raises rolls back its own savepoint only; its caller gets the exception. If the COMMIT fails, every
    caller in the group gets :class:`StoreUnavailable` and nothing of the group is kept.

    Why on the loop's thread: a writer thread contends for the GIL with the busy loop and waits up to the switch
    interval (5 ms) after every SQLite call releases it — measured at 1.4k events/s against 11k/s for raw Kafka.
    A group costs the loop one commit (~0.2 ms with fsync on these disks); units are short and CPU-bound.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._closed = False
        self.groups = 0

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group; returns once that group is committed (durable)."""
        return await self._enqueue(fn)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for the next group without waiting; its failure is logged (nobody awaits it).

        Raises:
            StoreUnavailable: the committer is closed.
        """
        future = self._enqueue(fn)
        future.add_done_callback(_log_failure)
        return future

    def _enqueue(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._closed:
            raise StoreUnavailable("publisher state is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain)
        return future

    def _drain(self) -> None:
        self._scheduled = False
        while self._queue:
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            self._commit_group(group)

    def _commit_group(self, group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
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
        except BaseException as exc:  # the group failed (SQLite, or KeyboardInterrupt mid-unit): nothing is kept
            self._abort(group, exc)
            if not isinstance(exc, sqlite3.Error):
                raise
            return
        for future, value, error in results:
            if future.done():  # the caller went away (cancelled); the work is committed all the same
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def _abort(self, group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
               exc: BaseException) -> None:  # fmt: skip
        """Roll the group back and tell every caller; leave the committer usable for the next group."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")
        failure = StoreUnavailable(f"publisher state commit failed: {exc!r}")
        for _, future in group:
            if not future.done():
                future.set_exception(failure)
        if self._queue and not self._scheduled:  # an escaping exception must not strand what is still queued
            try:
                asyncio.get_running_loop().call_soon(self._drain)
                self._scheduled = True
            except RuntimeError:  # no loop (close() at exit): close() drains what is left itself
                pass

    def close(self) -> None:
        """Commit whatever is still queued, then close the database."""
        self._closed = True
        self._drain()
        self._conn.close()
