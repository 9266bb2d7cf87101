"""An office's subscription directory: the evidence it received, its receipts, its cursor — durable and resumable.

Layout of ``DIR`` (see docs/operations.md, "An office's setup")::

    state.sqlite3                the commit point: cursor, sequence state, key records, items, receipts, counts
    items/<item>/v<N>/           one released version: envelope.avro (the signed envelope as received, with its
                                 disclosures), event.json (the payload decoded from the verified envelope, with
                                 its receipt and audit location), disclosures.json (the protected values received,
                                 and the labels withheld), content/<file name> (the bytes, SHA-256 checked)
    items/<item>/withdrawal-vN/  a withdrawal: envelope.avro, withdrawal.json
    rejected/<n>.json            every event that failed verification, as the gateway sent it
    proofs/<receipt>.tlog-proof  inclusion proofs of receipts (c2sp.org/tlog-proof@v1), once fetched

Owns: writing every file atomically (temporary file, fsync, rename, fsync of the directory) *before* the SQLite
transaction that records it (``synchronous=FULL``), so that after a crash — ``kill -9`` included — the state names
only complete files, and a file that exists without its row is rewritten with the same bytes when the feed
resumes from the committed cursor; one process per directory (an exclusive ``flock``); choosing directory names
(``subscription.item_dir_candidates``) so that two items never share one, even on a case-folding file system.

Blocking (sqlite3, files): ``evhub subscribe`` is a one-user process; it calls these from its event loop.
Does not own: verification or naming rules (``subscription``), HTTP (``subscribe_cmd``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cli.subscription import Tally, item_dir_candidates
from services.shared.durable_files import replace_atomically
from services.shared.errors import ConfigurationError, Conflict, DecodeError, StoreUnavailable
from services.shared.sequences import SequenceTracker, Stream

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (key_id TEXT, topic TEXT, state TEXT NOT NULL, PRIMARY KEY (key_id, topic));
CREATE TABLE IF NOT EXISTS key_records (n INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT UNIQUE NOT NULL,
                                        record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dirs (folded TEXT PRIMARY KEY, item_id TEXT UNIQUE NOT NULL, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (topic TEXT, part INTEGER, off INTEGER, kind TEXT NOT NULL, item_id TEXT NOT NULL,
                                  version INTEGER NOT NULL, event_id TEXT NOT NULL, key_id TEXT NOT NULL,
                                  sequence INTEGER NOT NULL, path TEXT NOT NULL, receipt TEXT NOT NULL,
                                  late INTEGER NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (topic, part, off));
CREATE TABLE IF NOT EXISTS contents (topic TEXT, part INTEGER, off INTEGER, sha256 TEXT, path TEXT, size INTEGER,
                                     status TEXT NOT NULL, receipt TEXT, PRIMARY KEY (topic, part, off, sha256));
CREATE TABLE IF NOT EXISTS receipts (receipt TEXT PRIMARY KEY, kind TEXT NOT NULL, topic TEXT, part INTEGER,
                                     off INTEGER, item_id TEXT, sha256 TEXT, audit_topic TEXT NOT NULL,
                                     audit_part INTEGER NOT NULL, audit_off INTEGER NOT NULL,
                                     audit_index INTEGER NOT NULL, received_at TEXT NOT NULL, proof TEXT);
CREATE TABLE IF NOT EXISTS failures (n INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, reason TEXT NOT NULL,
                                     cursor TEXT, position TEXT, path TEXT NOT NULL);
"""


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never a mix (creating its directory first).

    Raises:
        OSError: the disk refused (the caller stops before recording anything).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, data)


def to_json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


@dataclass
class Batch:
    """What one commit records (the files it names are already durable)."""

    cursor: str | None = None
    items: list[tuple[Any, ...]] = field(default_factory=list)
    contents: list[tuple[Any, ...]] = field(default_factory=list)
    receipts: list[tuple[Any, ...]] = field(default_factory=list)
    failures: list[tuple[Any, ...]] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)

    def __bool__(self) -> bool:
        return bool(self.cursor or self.items or self.contents or self.receipts or self.failures)


class SubscriptionStore:
    def __init__(self, root: Path, *, meta: Mapping[str, str]) -> None:
        """Open (or create) the subscription in ``root`` for ``meta`` (jurisdiction, office, topic).

        Raises:
            Conflict: another process holds the directory. ConfigurationError: the directory belongs to another
                jurisdiction or office. StoreUnavailable: the directory or its database cannot be used.
        """
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock = (root / ".lock").open("a")
        except OSError as exc:
            raise StoreUnavailable(f"cannot use {root}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise Conflict(f"another evhub subscribe is using {root}") from exc
        try:
            self._db = sqlite3.connect(root / "state.sqlite3", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            self.close()
            raise StoreUnavailable(f"{root / 'state.sqlite3'}: {exc}") from exc
        for key, value in meta.items():
            if key in stored and stored[key] != value:
                self.close()
                raise ConfigurationError(f"{root} holds the subscription of {key} {stored[key]!r}, not {value!r};"
                                         " use another --out directory")  # fmt: skip
        self._execute_many("INSERT OR IGNORE INTO meta VALUES (?, ?)", list(meta.items()))
        self.meta = dict(meta)
        self._dirs: dict[str, str] = {item: name for item, name in self._query("SELECT item_id, name FROM dirs")}
        self._folded = {name.casefold() for name in self._dirs.values()}
        self._pending_dirs: list[tuple[str, str, str]] = []
        self.total = self._tally()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._db.close()
        with contextlib.suppress(Exception):
            self._lock.close()

    # --- reading ---------------------------------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"subscription state: {exc}") from exc

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"subscription state: {exc}") from exc

    def _state(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM state WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def cursor(self) -> str | None:
        return self._state("cursor")

    def _tally(self) -> Tally:
        text = self._state("tally")
        try:
            return Tally.from_json(json.loads(text)) if text else Tally()
        except (ValueError, DecodeError) as exc:
            raise StoreUnavailable(f"subscription state: unreadable counts ({exc})") from exc

    def tracker(self, *, window: int) -> SequenceTracker:
        """Raises: StoreUnavailable if the stored sequence state is damaged."""
        rows = self._query("SELECT key_id, topic, state FROM sequences")
        try:
            return SequenceTracker.restore({(k, t): json.loads(s) for k, t, s in rows}, window=window)
        except (ValueError, DecodeError) as exc:
            raise StoreUnavailable(f"subscription state: damaged sequence state ({exc})") from exc

    def key_records(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._query("SELECT record FROM key_records ORDER BY n")]

    def add_key_records(self, records: list[tuple[str, bytes]]) -> None:
        """Remember key records (sha256 hex, bytes) this office's registry accepted, in the order applied."""
        self._execute_many("INSERT OR IGNORE INTO key_records (sha256, record) VALUES (?, ?)", records)

    def has_position(self, topic: str, partition: int, offset: int) -> bool:
        return bool(self._query("SELECT 1 FROM items WHERE topic = ? AND part = ? AND off = ?",
                                (topic, partition, offset)))  # fmt: skip

    def path_holder(self, path: Path) -> tuple[str, int, int] | None:
        """The record (topic, partition, offset) whose files are at ``path``, if any."""
        rows = self._query("SELECT topic, part, off FROM items WHERE path = ?", (str(path.relative_to(self.root)),))
        return (str(rows[0][0]), int(rows[0][1]), int(rows[0][2])) if rows else None

    def items(self) -> list[dict[str, Any]]:
        cols = ("topic", "partition", "offset", "kind", "item_id", "version", "event_id", "key_id", "sequence", "path",
                "receipt", "late", "received_at")  # fmt: skip
        rows = self._query("SELECT * FROM items ORDER BY received_at, topic, part, off")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def contents(self) -> list[dict[str, Any]]:
        cols = ("topic", "partition", "offset", "sha256", "path", "size", "status", "receipt")
        return [dict(zip(cols, r, strict=True)) for r in self._query("SELECT * FROM contents")]

    def receipts(self) -> list[dict[str, Any]]:
        cols = ("receipt", "kind", "topic", "partition", "offset", "item_id", "sha256", "audit_topic",
                "audit_partition", "audit_offset", "audit_index", "received_at", "proof")  # fmt: skip
        return [dict(zip(cols, r, strict=True)) for r in self._query("SELECT * FROM receipts ORDER BY received_at")]

    def failures(self, *, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._query("SELECT at, reason, position, path FROM failures ORDER BY n DESC LIMIT ?", (limit,))
        return [{"at": a, "reason": r, "position": p, "file": f} for a, r, p, f in rows]

    def failure_count(self) -> int:
        return int(self._query("SELECT count(*) FROM failures")[0][0])

    # --- naming ----------------------------------------------------------------------------------------------------

    def item_dir(self, item_id: str) -> Path:
        """``items/<name>`` for this item: the name it already has, or the first free candidate (reserved until the
        next commit records it)."""
        name = self._dirs.get(item_id)
        if name is None:
            name = next(c for c in item_dir_candidates(item_id) if c.casefold() not in self._folded)
            self._dirs[item_id] = name
            self._folded.add(name.casefold())
            self._pending_dirs.append((name.casefold(), item_id, name))
        return self.root / "items" / name

    def rejected_path(self) -> Path:
        n = int(self._query("SELECT coalesce(max(n), 0) FROM failures")[0][0]) + 1
        return self.root / "rejected" / f"{n}.json"

    # --- writing ---------------------------------------------------------------------------------------------------

    def commit(self, batch: Batch, *, sequences: Mapping[Stream, Mapping[str, Any]]) -> None:
        """Record one batch — cursor, rows, sequence state, counts — in one transaction.

        Raises:
            StoreUnavailable: the database refused (nothing of the batch is recorded).
        """
        total = Tally()
        total.merge(self.total)
        total.merge(batch.tally)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO dirs VALUES (?, ?, ?)", self._pending_dirs)
                self._db.executemany("INSERT OR REPLACE INTO items VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", batch.items)
                self._db.executemany("INSERT OR REPLACE INTO contents VALUES (?,?,?,?,?,?,?,?)", batch.contents)
                self._db.executemany("INSERT OR REPLACE INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,NULL)",
                                     batch.receipts)  # fmt: skip
                self._db.executemany("INSERT INTO failures (at, reason, cursor, position, path) VALUES (?,?,?,?,?)",
                                     batch.failures)  # fmt: skip
                self._db.executemany("INSERT OR REPLACE INTO sequences VALUES (?, ?, ?)",
                                     [(k, t, json.dumps(s)) for (k, t), s in sequences.items()])  # fmt: skip
                rows = [("tally", json.dumps(total.to_json()))]
                if batch.cursor is not None:
                    rows.append(("cursor", batch.cursor))
                self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"subscription state: {exc}") from exc
        self._pending_dirs.clear()
        self.total = total

    # --- receipt proofs (the hook for `evhub audit prove`) --------------------------------------------------------

    def receipts_without_proof(self, *, limit: int = 1000) -> list[str]:
        return [r[0] for r in self._query("SELECT receipt FROM receipts WHERE proof IS NULL LIMIT ?", (limit,))]

    def proof_counts(self) -> dict[str, int]:
        """Receipts whose proof is kept, and those still awaiting one (no checkpoint covered them yet)."""
        rows = self._query("SELECT proof IS NOT NULL, COUNT(*) FROM receipts GROUP BY proof IS NOT NULL")
        counts = {bool(kept): int(n) for kept, n in rows}
        return {"kept": counts.get(True, 0), "awaiting": counts.get(False, 0)}

    def save_proof(self, receipt: str, proof: bytes) -> Path:
        """Keep a receipt's inclusion proof beside the items (``proofs/<receipt>.tlog-proof``) and note it."""
        path = self.root / "proofs" / f"{receipt}.tlog-proof"
        write_atomically(path, proof)
        self._execute_many("UPDATE receipts SET proof = ? WHERE receipt = ?",
                           [(str(path.relative_to(self.root)), receipt)])  # fmt: skip
        return path


@contextlib.contextmanager
def opened(root: Path, *, meta: Mapping[str, str]) -> Iterator[SubscriptionStore]:
    store = SubscriptionStore(root, meta=meta)
    try:
        yield store
    finally:
        store.close()
