"""Rebuilding the publisher's state from Kafka: the deliberate way on when the start-up check refuses the state.

``evhub publisher recover`` (or ``python -m services.publisher recover``), with the publisher's own settings and
the publisher stopped. It

1. locks the data directory and checks the state's integrity (a damaged file is refused: move it aside and recover
   into a new one — what it had signed but never delivered is then lost, and was never published);
2. takes the signing key's fence on every topic, so that no other process with the key writes meanwhile;
3. reads every topic back from the offsets the state has checked (0 for a new state), without a deadline;
4. adds every envelope of this key that the state lacks, as delivered; abandons (keeps, never sends) each
   envelope the state was still waiting to send whose sequence number Kafka already holds with another envelope;
   rebuilds items, versions and the idempotency records that follow from the added events (a publication's is
   its item id and content digest; client-chosen ``Idempotency-Key`` values are not in Kafka and cannot be
   restored); raises each sequence counter to the highest number of this key in Kafka;
5. reports what it did, and any sequence number Kafka already holds twice with different envelopes (signed twice
   before this check existed): those need the key revoked (``evhub keys revoke --last-valid``).

Does not own: the scan (``reconcile``), the decisions (``ledger``), the SQL (``state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.publisher import decide, reconcile, state
from services.publisher.committer import GroupCommitter
from services.publisher.courier import OutboxSettings, take_fence
from services.publisher.datadir import DataDir
from services.publisher.ledger import Found, claimed
from services.publisher.settings import PublisherSettings
from services.shared.avro import AvroCodec
from services.shared.envelope import MAX_ENVELOPE_BYTES, SCHEMA_FOR_TYPE
from services.shared.errors import ConfigurationError, DecodeError, EvidenceHubError
from services.shared.kafka import evidence_topic
from services.shared.kafka_connection import Kafka
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)


@dataclass
class TopicReport:
    topic: str
    records: int = 0
    known: int = 0
    added: int = 0
    marked: int = 0
    abandoned: int = 0
    counter_before: int = 0
    counter_after: int = 0
    highest_in_kafka: int = 0
    signed_twice: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Report:
    topics: list[TopicReport]
    events_rebuilt: int = 0

    @property
    def signed_twice(self) -> bool:
        return any(t.signed_twice for t in self.topics)


async def recover(settings: PublisherSettings, *, progress: Callable[[str], None] = print) -> Report:
    """Rebuild the state in ``settings.data_dir`` from Kafka (see the module docstring).

    Raises:
        StateRefused: the data directory is in use, or the state file is damaged.
        KafkaUnavailable: Kafka did not answer. ConfigurationError: settings incomplete.
    """
    if not settings.kafka.bootstrap:
        raise ConfigurationError("EVHUB_KAFKA_BOOTSTRAP is required to recover the publisher's state")
    bootstrap = settings.kafka.connection()
    codec, signer = AvroCodec.load(), settings.signing_key()
    datadir = DataDir(settings.data_dir)
    datadir.lock()
    try:
        if datadir.state.is_file():
            await asyncio.to_thread(state.check, datadir.state)
        committer = GroupCommitter(state.connect(datadir.state), timeout=settings.store_timeout_s)
        fences = []
        try:
            outbox_settings = OutboxSettings(
                bootstrap=bootstrap, transaction_timeout_s=settings.transaction_timeout_s,
                request_timeout_ms=settings.kafka.request_timeout_ms,
            )  # fmt: skip
            topics = [evidence_topic(j) for j in settings.jurisdictions]
            for topic in topics:
                fences.append(await take_fence(signer.public.key_id, topic, outbox_settings))
            first_new = await committer.run(lambda conn: _last_rowid(conn))
            reports = [await _recover_topic(topic, codec, signer.public, committer, bootstrap, progress)
                       for topic in topics]  # fmt: skip
            rebuilt = await committer.run(lambda conn: _rebuild(conn, codec, signer.public.key_id, first_new))
            return Report(reports, rebuilt)
        finally:
            for fence in fences:
                with contextlib.suppress(Exception):
                    await fence.stop()
            committer.close()
    finally:
        datadir.unlock()


async def _recover_topic(topic: str, codec: AvroCodec, key: PublicKey, committer: GroupCommitter,
                         bootstrap: Kafka, progress: Callable[[str], None]) -> TopicReport:  # fmt: skip
    report = TopicReport(topic)
    report.counter_before = await committer.run(lambda conn: state.counter(conn, key.key_id, topic))
    began = time.monotonic()

    async def adopt(found: list[Found]) -> None:
        await committer.run(_adopt_unit(codec, key.key_id, topic, found))
        report.added += len(found)
        if report.added % 10_000 < len(found):
            progress(f"{topic}: {report.added} envelopes of this key added so far")

    result = await reconcile.scan(bootstrap=bootstrap, topic=topic, codec=codec, key=key, committer=committer,
                                  timeout_s=float("inf"), adopt=adopt)  # fmt: skip
    ledger = result.ledger
    now = datetime.now(UTC).isoformat()
    abandon, twice = [], []
    for found, held in ledger.conflicts:
        if held.offset is None:  # never sent, and now never sendable: Kafka holds that number with another envelope
            abandon.append((found, held))
        else:
            twice.append(found.sequence)
    marks: list[tuple[int | None, int | None, str, str, str]] = [
        (f.partition, f.offset, now, held.event_id, held.jurisdiction) for held, f in ledger.marks
    ]

    def finish(conn: sqlite3.Connection) -> int:
        state.mark_delivered(conn, marks)
        state.abandon(conn, [(f"sequence {f.sequence} on {topic} is held in Kafka by another envelope (found by "
                              "recover)", held.event_id, held.jurisdiction) for f, held in abandon])  # fmt: skip
        _insert_found(conn, codec, key.key_id, topic, [f for f, _ in abandon])
        highest = conn.execute("SELECT MAX(sequence) FROM outbox WHERE key_id = ? AND topic = ?",
                               (key.key_id, topic)).fetchone()[0] or 0  # fmt: skip
        state.raise_counter(conn, key.key_id, topic, max(highest, ledger.highest))
        state.advance_checked(conn, topic, result.ends)
        return state.counter(conn, key.key_id, topic)

    report.counter_after = await committer.run(finish)
    report.records, report.known, report.marked = ledger.records, ledger.known, len(marks)
    report.added += len(abandon)
    report.abandoned, report.signed_twice = len(abandon), sorted(set(twice))
    report.highest_in_kafka, report.seconds = ledger.highest, time.monotonic() - began
    return report


def _adopt_unit(codec: AvroCodec, key_id: str, topic: str, found: list[Found]) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: _insert_found(conn, codec, key_id, topic, found)


def _insert_found(conn: sqlite3.Connection, codec: AvroCodec, key_id: str, topic: str, found: list[Found]) -> None:
    """Envelopes of this key found in Kafka, as delivered outbox rows (their events are rebuilt by ``_rebuild``)."""
    now = datetime.now(UTC).isoformat()
    for f in found:
        record = _decode(codec, f.payload_type, f.payload)
        if record is None:
            log.warning("%s offset %d: a genuine envelope of this key with an undecodable payload", topic, f.offset)
            continue
        conn.execute(
            "INSERT OR IGNORE INTO outbox (event_id, jurisdiction, topic, kafka_key, key_id, sequence, envelope, "
            "partition, offset, delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record["event_id"],
                record["jurisdiction"],
                topic,
                f.record_key or b"",
                key_id,
                f.sequence,
                f.envelope,
                f.partition,
                f.offset,
                now,
            ),
        )


def _decode(codec: AvroCodec, payload_type: str, payload: bytes) -> dict[str, Any] | None:
    schema = SCHEMA_FOR_TYPE.get(payload_type)
    if schema is None:
        return None
    try:
        record: dict[str, Any] = codec.decode(payload, expect=schema, max_bytes=MAX_ENVELOPE_BYTES)
    except (DecodeError, EvidenceHubError):
        return None
    return {**record, "_schema": schema}


def _last_rowid(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM outbox").fetchone()[0])


def _rebuild(conn: sqlite3.Connection, codec: AvroCodec, key_id: str, after_rowid: int) -> int:
    """Items, versions and idempotency records for the events added since ``after_rowid``: evidence events first,
    then withdrawals, so an item exists before it is withdrawn. Returns how many events were applied."""
    rows = conn.execute(
        "SELECT event_id, jurisdiction, envelope FROM outbox WHERE rowid > ? AND key_id = ? ORDER BY rowid",
        (after_rowid, key_id),
    ).fetchall()
    records = []
    for row in rows:
        found = _payload(codec, key_id, row["envelope"])
        if found is not None:
            records.append(found)
    records.sort(key=lambda r: (r["_schema"] != "evidence_event", r.get("version", 0)))
    for record in records:
        if record["_schema"] == "evidence_event":
            _apply_event(conn, record)
        else:
            _apply_withdrawal(conn, record)
    return len({r["event_id"] for r in records})


def _payload(codec: AvroCodec, key_id: str, envelope: bytes) -> dict[str, Any] | None:
    found = claimed(codec, key_id, 0, 0, envelope)
    return None if found is None else _decode(codec, found.payload_type, found.payload)


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _apply_event(conn: sqlite3.Connection, event: dict[str, Any]) -> None:
    content = event["content"][0] if event["content"] else {}
    item_id, version, event_id = event["item_id"], event["version"], event["event_id"]
    conn.execute(
        "INSERT OR IGNORE INTO versions (item_id, version, event_id, sha256, media_type, size, published_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (item_id, version, event_id, content.get("sha256"), content.get("media_type"), content.get("size"),
         _iso(event["published_at"])),
    )  # fmt: skip
    existing = state.item(conn, item_id)
    jurisdictions = sorted({event["jurisdiction"], *(json.loads(existing["jurisdictions"]) if existing else [])})
    if existing is None or version > existing["latest_version"]:
        conn.execute(
            "INSERT INTO items (item_id, latest_version, latest_event_id, case_ids, jurisdictions) VALUES (?,?,?,?,?) "
            "ON CONFLICT (item_id) DO UPDATE SET latest_version = excluded.latest_version, "
            "latest_event_id = excluded.latest_event_id, case_ids = excluded.case_ids, "
            "jurisdictions = excluded.jurisdictions",
            (item_id, version, event_id, json.dumps(event["case_ids"]), json.dumps(jurisdictions)),
        )
    else:
        conn.execute("UPDATE items SET jurisdictions = ? WHERE item_id = ?", (json.dumps(jurisdictions), item_id))
    if version == 1 and content.get("sha256"):
        conn.execute(
            "INSERT OR IGNORE INTO requests (idempotency_key, fingerprint, operation, event_id, item_id, version, "
            "created_at) VALUES (?, ?, 'publish', ?, ?, 1, ?)",
            (f"publish:{item_id}:{content['sha256']}", decide.recovered(content["sha256"]), event_id, item_id,
             _iso(event["published_at"])),
        )  # fmt: skip


def _apply_withdrawal(conn: sqlite3.Connection, withdrawal: dict[str, Any]) -> None:
    item_id, reason = withdrawal["item_id"], withdrawal["reason"]
    conn.execute("UPDATE items SET withdrawn_at = ?, withdraw_reason = ? WHERE item_id = ? AND withdrawn_at IS NULL",
                 (_iso(withdrawal["published_at"]), reason, item_id))  # fmt: skip
    fingerprint = hashlib.sha256(f"withdraw\0{item_id}\0{reason}".encode()).hexdigest()  # as pipeline.withdraw
    conn.execute(
        "INSERT OR IGNORE INTO requests (idempotency_key, fingerprint, operation, event_id, item_id, version, "
        "created_at) VALUES (?, ?, 'withdraw', ?, ?, ?, ?)",
        (f"withdraw:{item_id}", fingerprint, withdrawal["event_id"], item_id, withdrawal["withdrawn_version"],
         _iso(withdrawal["published_at"])),
    )  # fmt: skip


def describe(report: Report) -> list[str]:
    lines = []
    for t in report.topics:
        lines.append(
            f"{t.topic}: read {t.records} records in {t.seconds:.1f}s; {t.known} already in the state, {t.added} "
            f"added, {t.marked} marked delivered, {t.abandoned} abandoned; counter {t.counter_before} → "
            f"{t.counter_after} (highest of this key in Kafka: {t.highest_in_kafka})"
        )
        if t.signed_twice:
            lines.append(
                f"{t.topic}: Kafka holds sequence numbers {t.signed_twice[:10]} twice with different envelopes "
                f"(signed twice before this check existed): revoke this key with --last-valid "
                f"{t.topic}={min(t.signed_twice) - 1} and register a new one"
            )
    lines.append(f"rebuilt items, versions and idempotency records from {report.events_rebuilt} events")
    return lines


def run(settings: PublisherSettings, out: Callable[[str], None] = print) -> int:
    """Recover and print a report. Exit code 0, or 1 if Kafka holds a sequence number twice."""
    report = asyncio.run(recover(settings, progress=out))
    for line in describe(report):
        out(line)
    return 1 if report.signed_twice else 0


def main(args: list[str]) -> int:
    """``python -m services.publisher recover``: settings from the environment, like the service."""
    from services.publisher.__main__ import exit_code

    if args:
        print(f"publisher recover: unexpected arguments {args}", file=sys.stderr)
        return 2
    try:
        return run(PublisherSettings())
    except EvidenceHubError as exc:
        print(f"publisher recover: {exc.detail}", file=sys.stderr)
        return exit_code(exc)
