"""The gateway's own state in SQLite: how far its readers have verified each evidence topic, and what they found.

Owns, per evidence topic: the next offset the live reader will verify per partition, the sequence tracker's
state (``services.shared.sequences``), the records that failed verification (never released; kept so that a
catch-up read of an old offset refuses them too), and an index of the verified records (item id, version, kind,
the attributes the policy decides on, content digests, embargo end) that answers item look-ups, withdrawals and
delayed releases without keeping the history in memory. One transaction per verified batch: offsets and what was
learned from the records before them are committed together (the local-state-consumer pattern), so a restart
resumes exactly where the reader stopped. Commits are not fsynced (``synchronous=NORMAL``): everything here is
derived from Kafka, so a transaction lost to a power cut only means reading those records again.

Blocking (sqlite3), and called on the event loop once the gateway runs: commits do not fsync and queries use
indexes, so each call is short, while a call in a worker thread waited for the GIL behind the busy loop at every
statement (measured under load: 55-68 ms to commit a batch of 7 records from a thread). One lock serialises the
connection (start-up reads still run in a thread).
Does not own: verification (``reader``), what is released (``release``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.shared.errors import StoreUnavailable
from services.shared.sequences import SequenceTracker, Stream

_SCHEMA = """
CREATE TABLE IF NOT EXISTS positions (topic TEXT, part INTEGER, next_offset INTEGER, PRIMARY KEY (topic, part));
CREATE TABLE IF NOT EXISTS sequences (key_id TEXT, topic TEXT, state TEXT, PRIMARY KEY (key_id, topic));
CREATE TABLE IF NOT EXISTS rejected (topic TEXT, part INTEGER, off INTEGER, reason TEXT,
                                     PRIMARY KEY (topic, part, off));
CREATE TABLE IF NOT EXISTS records (topic TEXT, part INTEGER, off INTEGER, kind TEXT, item_id TEXT, version INTEGER,
                                    event_id TEXT, attributes TEXT, content TEXT, embargo_until INTEGER,
                                    PRIMARY KEY (topic, part, off));
CREATE INDEX IF NOT EXISTS records_by_item ON records (topic, item_id);
CREATE INDEX IF NOT EXISTS records_by_embargo ON records (topic, embargo_until, part, off)
    WHERE embargo_until IS NOT NULL;
"""


@dataclass(frozen=True)
class IndexedRecord:
    """One verified record as the index knows it (the envelope itself stays in Kafka)."""

    topic: str
    partition: int
    offset: int
    kind: str
    item_id: str
    version: int
    event_id: str
    attributes: Mapping[str, Any] | None  # ItemAttributes as JSON, for events
    content: tuple[str, ...]  # SHA-256 digests of the event's files
    embargo_until: int | None  # µs since the epoch


class GatewayStore:
    def __init__(self, path: Path) -> None:
        """Raises: StoreUnavailable if the database cannot be opened."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Every row here is derived from Kafka and re-derived by reading on from where the state says, so a
            # transaction lost to a power cut is read again, not lost; NORMAL (no fsync per commit in WAL mode; a
            # process crash loses nothing) keeps an fsync off the path of every record to the offices.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"gateway state {path}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"gateway state: {exc}") from exc

    def positions(self, topic: str) -> dict[int, int]:
        return {p: o for p, o in self._query("SELECT part, next_offset FROM positions WHERE topic = ?", [topic])}

    def tracker(self, *, window: int) -> SequenceTracker:
        rows = self._query("SELECT key_id, topic, state FROM sequences")
        return SequenceTracker.restore({(k, t): json.loads(s) for k, t, s in rows}, window=window)

    def rejected(self, topic: str) -> dict[tuple[int, int], str]:
        rows = self._query("SELECT part, off, reason FROM rejected WHERE topic = ?", [topic])
        return {(p, o): r for p, o, r in rows}

    def withdrawn(self, topic: str) -> set[str]:
        rows = self._query("SELECT item_id FROM records WHERE topic = ? AND kind = 'withdrawal'", [topic])
        return {r[0] for r in rows}

    def commit(
        self, topic: str, *, positions: Mapping[int, int], sequences: Mapping[Stream, Mapping[str, Any]],
        rejected: Iterable[tuple[int, int, str]], records: Iterable[IndexedRecord],
    ) -> None:  # fmt: skip
        """One verified batch, atomically.

        Raises:
            StoreUnavailable: the disk or database failed (nothing of the batch is kept).
        """
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT OR REPLACE INTO positions VALUES (?, ?, ?)",
                                         [(topic, p, o) for p, o in positions.items()])  # fmt: skip
                    self._db.executemany(
                        "INSERT OR REPLACE INTO sequences VALUES (?, ?, ?)",
                        [(k, t, json.dumps(s)) for (k, t), s in sequences.items()],
                    )
                    self._db.executemany(
                        "INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?)", [(topic, *r) for r in rejected]
                    )
                    self._db.executemany(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(r.topic, r.partition, r.offset, r.kind, r.item_id, r.version, r.event_id,
                          None if r.attributes is None else json.dumps(r.attributes), json.dumps(list(r.content)),
                          r.embargo_until) for r in records],
                    )  # fmt: skip
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"gateway state: {exc}") from exc

    @staticmethod
    def _indexed(row: tuple[Any, ...]) -> IndexedRecord:
        topic, part, off, kind, item_id, version, event_id, attributes, content, embargo = row
        return IndexedRecord(topic, part, off, kind, item_id, version, event_id,
                             None if attributes is None else json.loads(attributes), tuple(json.loads(content)),
                             embargo)  # fmt: skip

    def item(self, topic: str, item_id: str) -> list[IndexedRecord]:
        """Every verified record of the item on ``topic``, in (version, partition, offset) order."""
        rows = self._query("SELECT * FROM records WHERE topic = ? AND item_id = ? ORDER BY version, part, off",
                           [topic, item_id])  # fmt: skip
        return [self._indexed(r) for r in rows]

    def embargoes_ending(
        self, topic: str, *, after: tuple[int, int, int], until: int, limit: int
    ) -> list[IndexedRecord]:
        """Records whose embargo ends in ``(after, until]`` (ordered by end, partition, offset), at most ``limit``."""
        rows = self._query(
            "SELECT * FROM records WHERE topic = ? AND embargo_until IS NOT NULL AND embargo_until <= ?"
            " AND (embargo_until, part, off) > (?, ?, ?) ORDER BY embargo_until, part, off LIMIT ?",
            [topic, until, *after, limit],
        )
        return [self._indexed(r) for r in rows]
