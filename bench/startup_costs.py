"""What the publisher's start-up checks cost (docs/reliability.md quotes a run of this).

    python -m bench.startup_costs [--events 100000] [--records 200000]

1. ``PRAGMA integrity_check`` (and ``quick_check``, for comparison) on a state file holding ``--events`` published
   events to three jurisdictions: outbox rows with envelopes of a realistic size, requests, items, versions.
2. Reading a topic back (``reconcile.scan``) with an empty state — the worst case, a lost state or a new key — over
   ``--records`` envelopes signed by another key, on a throwaway local broker; and again for envelopes of this key
   that the state holds (a restart after a crash that lost every delivery mark).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sqlite3
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from services.publisher import reconcile, state
from services.publisher.committer import GroupCommitter
from services.shared.avro import AvroCodec
from services.shared.cluster import akafka_cluster
from services.shared.envelope import seal
from services.shared.kafka import TopicSpec, ensure_topics, make_producer
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings

TOPIC_COUNT = 3


def _envelope(codec: AvroCodec, signer: SigningKey, topic: str, sequence: int) -> bytes:
    record = {"event_id": str(uuid.uuid4()), "item_id": f"ITEM-{sequence}", "withdrawn_version": 1,
              "publisher": {"organisation": "bench", "key_id": signer.key_id}, "case_ids": ["CASE-1"],
              "jurisdiction": topic.split(".", 1)[1], "reason": "x" * 1200,
              "published_at": datetime.now(UTC)}  # fmt: skip
    return seal(codec, schema="evidence_withdrawal", record=record, topic=topic, signer=signer, sequence=sequence)


def integrity(events: int, work: Path) -> dict[str, float]:
    codec, signer = AvroCodec.load(), SigningKey.generate()
    path = work / "publisher.sqlite3"
    conn = state.connect(path)
    sample = {t: _envelope(codec, signer, f"evidence.J{t}", 1) for t in range(TOPIC_COUNT)}
    began = time.monotonic()
    conn.execute("BEGIN")
    for n in range(1, events + 1):
        event_id = str(uuid.uuid4())
        for t in range(TOPIC_COUNT):
            conn.execute(
                "INSERT INTO outbox (event_id, jurisdiction, topic, kafka_key, key_id, sequence, envelope, "
                "partition, offset, delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event_id, f"J{t}", f"evidence.J{t}", b"CASE-1", signer.key_id, n, sample[t], n % 3, n, "x"),
            )
        conn.execute(
            "INSERT INTO requests VALUES (?, ?, 'publish', ?, ?, 1, 'x')",
            (f"publish:ITEM-{n}:{n:064x}", "f" * 64, event_id, f"ITEM-{n}"),
        )
        conn.execute(
            "INSERT INTO items VALUES (?, 1, ?, ?, ?, NULL, NULL)",
            (f"ITEM-{n}", event_id, json.dumps(["CASE-1"]), json.dumps(["J0", "J1", "J2"])),
        )
        conn.execute("INSERT INTO versions VALUES (?, 1, ?, ?, 'image/png', 48213, 'x')",
                     (f"ITEM-{n}", event_id, f"{n:064x}"))  # fmt: skip
        if n % 10_000 == 0:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    for t in range(TOPIC_COUNT):
        state.raise_counter(conn, signer.key_id, f"evidence.J{t}", events)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    built = time.monotonic() - began
    check_s = state.check(path)
    quick = sqlite3.connect(path)
    began = time.monotonic()
    quick.execute("PRAGMA quick_check").fetchall()
    quick_s = time.monotonic() - began
    quick.close()
    return {"events": events, "bytes": path.stat().st_size, "build_s": built, "integrity_check_s": check_s,
            "quick_check_s": quick_s}  # fmt: skip


async def scan(records: int) -> dict[str, float]:
    codec, ours, other = AvroCodec.load(), SigningKey.generate(), SigningKey.generate()
    out: dict[str, float] = {"records": records}
    async with akafka_cluster(KafkaSettings()) as kafka:
        for who, signer in (("other key", other), ("this key, held by the state", ours)):
            topic = f"evidence.B{uuid.uuid4().hex[:6].upper()}"
            await ensure_topics(kafka.bootstrap, [TopicSpec(topic, 3)])
            producer = make_producer(kafka.bootstrap, client_id="startup-costs", max_batch_size=256 << 10)
            await producer.start()
            envelopes = [_envelope(codec, signer, topic, n) for n in range(1, 1001)]
            work = Path(tempfile.mkdtemp(prefix="evhub-startup-"))
            committer = GroupCommitter(state.connect(work / "publisher.sqlite3"))
            try:
                rows = []
                for n in range(1, records + 1):
                    env = envelopes[(n - 1) % 1000] if signer is other else _envelope(codec, signer, topic, n)
                    await producer.send(topic, env, key=str(n % 64).encode())
                    if signer is ours:
                        rows.append((str(n), "B", topic, b"k", ours.key_id, n, env))
                await producer.flush()
                if rows:
                    await committer.run(functools.partial(_hold, rows))
                result = await reconcile.scan(bootstrap=kafka.bootstrap, topic=topic, codec=codec, key=ours.public,
                                              committer=committer, timeout_s=3600)  # fmt: skip
                out[f"{who}: seconds"] = result.seconds
                out[f"{who}: records/s"] = records / result.seconds
                out[f"{who}: marks found"] = len(result.ledger.marks)
            finally:
                await producer.stop()
                committer.close()
    return out


def _hold(rows: list[tuple[str, str, str, bytes, str, int, bytes]], conn: sqlite3.Connection) -> None:
    conn.executemany("INSERT INTO outbox (event_id, jurisdiction, topic, kafka_key, key_id, sequence, envelope) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_costs")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evhub-integrity-") as work:
        print(json.dumps(integrity(args.events, Path(work)), indent=2), flush=True)
    print(json.dumps(asyncio.run(scan(args.records)), indent=2))


if __name__ == "__main__":
    main()
