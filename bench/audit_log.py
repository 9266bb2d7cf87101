"""``python -m bench.audit_log``: the audit log's three numbers on this machine (not yet part of ``make bench``).

1. Sustained integration: N entries waiting on a fresh hub.audit topic (batches of B entries, as the gateway
   writes them), the audit service started in-process; entries integrated per second until a checkpoint covers
   them all (one SQLite commit, tile writes with fsync and a signed checkpoint per integration).
2. Latency: with the service caught up, batches produced at a steady rate; time from the broker's ack of a batch
   to the commit of the first checkpoint that covers it (p50 / p99).
3. Replay: recompute and verify the tree of M entries in the pure core (``verify.verify_entries``), the entries
   already in memory (fetching them is the CLI's cost), and verify one checkpoint signature.

Prints a table and one JSON line. Starts its own broker (services.shared.cluster) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from services.audit import api
from services.audit.checkpoint import Checkpoint, open_checkpoint
from services.audit.note import NoteSigner
from services.audit.service import create_app
from services.audit.settings import AuditSettings
from services.audit.tiles import TiledTree
from services.audit.verify import verify_entries
from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.cluster import kafka_cluster
from services.shared.kafka import TopicSpec, ensure_topics, make_producer
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings

ORIGIN = "bench.evidence-hub.example/audit"


def _entry(codec: AvroCodec, n: int) -> bytes:
    return audit_records.encode_entry(codec, {
        "entry_id": str(uuid.uuid4()), "at": 1_777_000_000_000_000 + n, "gateway": "gw-1",
        "office": ("DE-GBA-WCU", "FR-PNAT", "SE-ICC")[n % 3], "client_cert_sha256": "ab" * 32,
        "request_id": f"req-{n}", "action": "ReadItem", "purpose": "investigation", "jurisdiction": "DE",
        "item": {"topic": "evidence.DE", "partition": n % 3, "offset": n, "payload_type": "application/vnd.evhub",
                 "event_id": str(uuid.uuid4()), "item_id": f"item-{n % 5000}", "version": 1, "key_id": "k" * 64,
                 "sequence": n, "envelope_sha256": "cd" * 32},
        "attributes": {"jurisdictions": ["DE"], "case_ids": ["case-1"], "classification": "RESTRICTED",
                       "sensitivity": ["GRAPHIC"], "consent_jurisdictions": ["DE", "FR"],
                       "consent_purposes": ["investigation"], "withdrawn": False, "protected_fields": []},
        "decision": "RELEASED" if n % 4 else "REFUSED", "policy_version": "p" * 64,
        "determining_policies": ["permit-de-investigators"],
    })  # fmt: skip


async def _produce(bootstrap: str, topic: str, batches: list[bytes]) -> None:
    producer = make_producer(bootstrap, client_id="bench-gateway", max_batch_size=1 << 20, linger_ms=5)
    await producer.start()
    try:
        for i in range(0, len(batches), 200):
            await asyncio.gather(*[await producer.send(topic, b) for b in batches[i : i + 200]])
    finally:
        await producer.stop()


async def _service(settings: AuditSettings, bootstrap: str, signer: NoteSigner) -> tuple[web.AppRunner, Any]:
    app = create_app(settings, bootstrap=bootstrap, signer=signer)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner, app


async def integration(bootstrap: str, codec: AvroCodec, tmp: Path, entries: int, per_batch: int) -> dict[str, Any]:
    topic = f"bench.audit.{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [TopicSpec(topic, 1), TopicSpec(topic + ".dlq", 1)])
    raw = [_entry(codec, n) for n in range(entries)]
    batches = [
        audit_records.encode_batch(codec, batch_id=str(uuid.uuid4()), gateway="gw-1", entries=raw[i : i + per_batch])
        for i in range(0, entries, per_batch)
    ]
    await _produce(bootstrap, topic, batches)
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    settings = AuditSettings(topic=topic, dead_letter_topic=topic + ".dlq", data_dir=tmp / "sustained", origin=ORIGIN,
                             unsafe_plaintext=True)  # fmt: skip
    started = time.perf_counter()
    runner, app = await _service(settings, bootstrap, signer)
    try:
        integrator = app[api.INTEGRATOR]
        commits = 0
        while integrator.view.size < entries:
            await integrator.integrated.wait()
            commits += 1
        elapsed = time.perf_counter() - started
    finally:
        await runner.cleanup()
    return {"entries": entries, "entries_per_batch": per_batch, "seconds": round(elapsed, 2),
            "entries_per_s": round(entries / elapsed), "integrations": commits,
            "entry_bytes": round(sum(map(len, raw)) / len(raw))}  # fmt: skip


async def latency(
    bootstrap: str, codec: AvroCodec, tmp: Path, batches: int, per_batch: int, rate: float
) -> dict[str, Any]:
    topic = f"bench.audit.{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [TopicSpec(topic, 1), TopicSpec(topic + ".dlq", 1)])
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    settings = AuditSettings(topic=topic, dead_letter_topic=topic + ".dlq", data_dir=tmp / "latency", origin=ORIGIN,
                             unsafe_plaintext=True)  # fmt: skip
    runner, app = await _service(settings, bootstrap, signer)
    integrator = app[api.INTEGRATOR]
    commits: list[tuple[float, int]] = []

    async def watch() -> None:
        while True:
            await integrator.integrated.wait()
            commits.append((time.perf_counter(), integrator.view.size))

    watcher = asyncio.create_task(watch())
    producer = make_producer(bootstrap, client_id="bench-gateway", linger_ms=0)
    await producer.start()
    acked: list[tuple[float, int]] = []
    try:
        for i in range(batches):
            fresh = [_entry(codec, i * per_batch + j) for j in range(per_batch)]
            data = audit_records.encode_batch(codec, batch_id=str(uuid.uuid4()), gateway="gw-1", entries=fresh)
            await producer.send_and_wait(topic, data)
            acked.append((time.perf_counter(), (i + 1) * per_batch))
            await asyncio.sleep(1 / rate)
        while integrator.view.size < batches * per_batch:
            await integrator.integrated.wait()
    finally:
        await producer.stop()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await runner.cleanup()
    delays = []
    for at, size in acked:
        covered = next(t for t, s in commits if s >= size)
        delays.append(max(0.0, covered - at) * 1000)
    delays.sort()
    return {"batches": batches, "entries_per_batch": per_batch, "rate_batches_per_s": rate,
            "p50_ms": round(statistics.median(delays), 1), "p99_ms": round(delays[int(len(delays) * 0.99) - 1], 1),
            "max_ms": round(delays[-1], 1)}  # fmt: skip


def replay(codec: AvroCodec, entries: int) -> dict[str, Any]:
    raw = [_entry(codec, n % 100_000) for n in range(min(entries, 100_000))]
    leaves = [raw[n % len(raw)][:-8] + n.to_bytes(8, "big") for n in range(entries)]  # distinct, realistic size
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    expected = TiledTree()
    for i in range(0, entries, 65_536):
        expected.append(leaves[i : i + 65_536], keep_bundles=False)
    note = Checkpoint(ORIGIN, entries, expected.root()).sign(signer)
    started = time.perf_counter()
    checkpoint = open_checkpoint(note, log=signer.verifier()).checkpoint
    verify_entries(leaves, checkpoint)
    elapsed = time.perf_counter() - started
    return {"entries": entries, "seconds": round(elapsed, 2), "entries_per_s": round(entries / elapsed)}


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_log")
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--per-batch", type=int, default=50)
    parser.add_argument("--replay", type=int, default=1_000_000)
    parser.add_argument("--latency-batches", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="batches per second in the latency run")
    args = parser.parse_args()
    codec = AvroCodec.load()
    results: dict[str, Any] = {"replay": replay(codec, args.replay)}
    print("replay", results["replay"], flush=True)
    with kafka_cluster(KafkaSettings()) as target, tempfile.TemporaryDirectory() as tmp:
        results["integration"] = await integration(target.bootstrap, codec, Path(tmp), args.entries, args.per_batch)
        print("integration", results["integration"], flush=True)
        results["latency"] = await latency(target.bootstrap, codec, Path(tmp), args.latency_batches, 10, args.rate)
        print("latency", results["latency"], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
